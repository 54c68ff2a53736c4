"""Cluster mode with the real supervisor and real worker processes."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import time

import aiohttp
import pytest
from aiohttp import web

from gateway.testing import PlugwayProcess
from support import PLUGWAY, async_wait_until, http_response, route_config, wait_until
from load import constant_load


@pytest.fixture
def slow_started():
    return asyncio.Event()


@pytest.fixture
async def upstream_url(aiohttp_raw_server, slow_started):
    async def handler(request):
        if request.path == "/slow":
            slow_started.set()
            await asyncio.sleep(1.5)
        return web.Response(text=f"path={request.path}")

    server = await aiohttp_raw_server(handler)
    return str(server.make_url("")).rstrip("/")


async def get(port: int, path: str, headers: dict | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}{path}", headers=headers) as response:
            return response.status, await response.text()


async def test_starts_the_configured_number_of_workers_each_on_its_own_socket(plugway_process, upstream_url):
    gateway = plugway_process(route_config(upstream_url, server="workers = 3"))
    workers = gateway.wait_for_workers(3)
    assert len({w["pid"] for w in workers}) == 3
    assert sorted(w["slot"] for w in workers) == [0, 1, 2]
    status = gateway.status()
    assert status["supervisor_pid"] == gateway.process.pid and status["generation"] == 1
    for _ in range(60):  # new connections spread over the workers' reuseport sockets
        assert (await get(gateway.port, "/api/x"))[0] == 200
    # heartbeats carry the counts to the status file
    wait_until(lambda: sum(w["requests"] for w in gateway.status()["workers"]) == 60, timeout=15)
    assert sum(1 for w in gateway.status()["workers"] if w["requests"] > 0) >= 2


async def test_hup_with_a_changed_route_serves_the_new_config_with_new_workers(plugway_process, upstream_url):
    gateway = plugway_process(route_config(upstream_url, server="workers = 2"))
    before = {w["pid"] for w in gateway.wait_for_workers(2)}
    assert (await get(gateway.port, "/v2/x"))[0] == 404
    gateway.write_config(route_config(upstream_url, server="workers = 2").replace('prefix = "/api"', 'prefix = "/v2"'))
    result = gateway.cli("reload")
    assert result.returncode == 0, result.stderr
    assert "generation 2" in result.stdout
    # Once the reload is reported, no old worker accepts: every new connection gets the new routes.
    answers = await asyncio.gather(*(get(gateway.port, "/v2/x") for _ in range(40)))
    assert answers == [(200, "path=/x")] * 40
    assert (await get(gateway.port, "/api/x"))[0] == 404
    after = {w["pid"] for w in gateway.wait_for_workers(2, generation=2)}
    assert not before & after


@pytest.mark.parametrize("change, reason", [
    (lambda text: text.replace("workers = 2", "workers = 0"), 'server.workers: must be "auto" or a positive integer'),
    (lambda text: text + "[plugins.sample]\ntag = 5\n", "plugins.sample.tag: must be a string"),
    (lambda text: text + "[plugins.nosuch]\n", 'plugins.nosuch: no plugin named "nosuch"'),
], ids=["core", "plugin-settings", "unknown-plugin"])
async def test_hup_with_an_invalid_config_keeps_the_old_one_and_says_why(plugway_process, upstream_url, change, reason):
    good = route_config(upstream_url, server="workers = 2")
    gateway = plugway_process(good)
    before = {w["pid"] for w in gateway.wait_for_workers(2)}
    gateway.config_path.write_text(change(gateway.config_path.read_text()))
    result = gateway.cli("reload")
    assert result.returncode == 1
    assert reason in result.stderr
    assert gateway.logged(reason)  # logged by the supervisor too
    status = gateway.status()
    assert status["last_reload"]["result"] == "failure" and status["generation"] == 1
    assert {w["pid"] for w in gateway.wait_for_workers(2)} == before
    assert (await get(gateway.port, "/api/x"))[0] == 200


async def test_ttin_and_ttou_change_the_worker_count(plugway_process, upstream_url):
    gateway = plugway_process(route_config(upstream_url, server="workers = 2"))
    gateway.wait_for_workers(2)
    gateway.signal(signal.SIGTTIN)
    assert len(gateway.wait_for_workers(3)) == 3
    gateway.signal(signal.SIGTTOU)  # signals of one kind do not queue: one at a time
    assert len(gateway.wait_for_workers(2)) == 2
    gateway.signal(signal.SIGTTOU)
    assert len(gateway.wait_for_workers(1)) == 1
    gateway.signal(signal.SIGTTOU)  # never below one
    time.sleep(0.3)
    assert len(gateway.wait_for_workers(1)) == 1
    assert (await get(gateway.port, "/api/x"))[0] == 200


async def test_a_killed_worker_is_replaced_at_once(plugway_process, upstream_url):
    gateway = plugway_process(route_config(upstream_url, server="workers = 2"))
    victim = gateway.wait_for_workers(2)[0]
    killed_at = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    wait_until(lambda: victim["pid"] not in {w["pid"] for w in gateway.ready_workers()}
               and len(gateway.ready_workers()) == 2)
    repaired = time.monotonic() - killed_at
    print(f"worker replaced and ready {repaired * 1000:.0f} ms after kill -9")
    assert gateway.logged("restarting now")
    assert gateway.logged("killed by SIGKILL")
    for _ in range(20):
        assert (await get(gateway.port, "/api/x"))[0] == 200


async def test_a_slot_that_keeps_crashing_backs_off(plugway_process, upstream_url):
    gateway = plugway_process(route_config(upstream_url, server="workers = 1"))
    for attempt in range(3):
        pid = gateway.wait_for_workers(1)[0]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: pid not in {w["pid"] for w in gateway.status().get("workers", [])})
    wait_until(lambda: gateway.logged("restarting in 1.0s"))
    assert gateway.logged("restarting in 0.5s")
    gateway.wait_for_workers(1)


async def test_a_stuck_worker_is_killed_and_replaced(plugway_process, upstream_url):
    gateway = plugway_process(route_config(upstream_url, server='workers = 1\nworker_timeout = "1s"'))
    stuck = gateway.wait_for_workers(1)[0]["pid"]
    os.kill(stuck, signal.SIGSTOP)  # its event loop stops: no more heartbeats
    wait_until(lambda: gateway.ready_workers() and gateway.ready_workers()[0]["pid"] != stuck)
    assert gateway.logged("sent no heartbeat")
    assert (await get(gateway.port, "/api/x"))[0] == 200


async def test_term_lets_a_slow_in_flight_request_finish(plugway_process, upstream_url, slow_started):
    gateway = plugway_process(route_config(upstream_url, server="workers = 2"))
    gateway.wait_for_workers(2)
    slow = asyncio.create_task(get(gateway.port, "/api/slow"))
    await asyncio.wait_for(slow_started.wait(), 10)
    gateway.signal(signal.SIGTERM)
    assert await slow == (200, "path=/slow")
    assert await asyncio.to_thread(gateway.wait) == 0
    assert not (gateway.runtime_dir / "plugway.pid").exists()


async def test_quit_stops_at_once(plugway_process, upstream_url, slow_started):
    gateway = plugway_process(route_config(upstream_url, server="workers = 2"))
    gateway.wait_for_workers(2)
    slow = asyncio.create_task(get(gateway.port, "/api/slow"))
    await asyncio.wait_for(slow_started.wait(), 10)
    gateway.signal(signal.SIGQUIT)
    assert await asyncio.to_thread(gateway.wait) == 0
    with pytest.raises(aiohttp.ClientError):
        await slow


def children(pid: int) -> set[int]:
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = open(f"/proc/{entry.name}/stat").read()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                found.add(int(entry.name))
    return found


async def test_workers_exit_when_the_supervisor_is_killed(plugway_process, upstream_url):
    gateway = plugway_process(route_config(upstream_url, server="workers = 2"))
    workers = {w["pid"] for w in gateway.wait_for_workers(2)}
    pids = children(gateway.process.pid)
    assert workers < pids  # the workers and the store process
    gateway.process.kill()
    gateway.process.wait()

    def gone(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] == "Z"

    wait_until(lambda: all(gone(pid) for pid in pids), timeout=15)
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", gateway.port)) != 0  # nobody holds the port any more


async def test_metrics_are_summed_over_workers_and_include_the_supervisor(plugway_process, upstream_url):
    gateway = plugway_process(route_config(upstream_url, server="workers = 2"))
    gateway.wait_for_workers(2)
    for _ in range(40):
        await get(gateway.port, "/api/x")
    assert gateway.cli("reload").returncode == 0
    gateway.wait_for_workers(2, generation=2)
    status, text = await get(gateway.admin_port, "/metrics")
    assert status == 200
    assert 'plugway_requests_total{method="GET",route="api",status_class="2xx"} 40.0' in text  # dead workers count
    assert "plugway_workers_alive 2.0" in text
    assert 'plugway_reloads_total{result="success"} 1.0' in text
    assert "plugway_config_generation 2.0" in text


async def test_admin_status_and_reload_with_a_bearer_token(plugway_process, upstream_url):
    token = "s3cret-token-0123456789"
    config = route_config(upstream_url, server="workers = 2") + '\n[admin]\ntoken_env = "PLUGWAY_ADMIN_TOKEN"\n'
    gateway = plugway_process(config, env={"PLUGWAY_ADMIN_TOKEN": token})
    pids = {w["pid"] for w in gateway.wait_for_workers(2)}
    assert (await get(gateway.admin_port, "/status"))[0] == 401
    assert (await get(gateway.admin_port, "/status", {"Authorization": "Bearer wrong"}))[0] == 401
    status, body = await get(gateway.admin_port, "/status", {"Authorization": f"Bearer {token}"})
    cluster = json.loads(body)
    assert status == 200 and cluster["supervisor_pid"] == gateway.process.pid
    assert {w["pid"] for w in cluster["workers"]} == pids
    assert all({"slot", "age_seconds", "state", "requests"} <= set(w) for w in cluster["workers"])
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{gateway.admin_port}/reload",
                                headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 202
    assert {w["pid"] for w in gateway.wait_for_workers(2, generation=2)}.isdisjoint(pids)


def test_the_admin_api_refuses_a_public_address_without_a_token(tmp_path):
    from gateway import config
    from gateway.config.schema import ConfigErrors

    with pytest.raises(ConfigErrors) as caught:
        config.loads('[admin]\nlisten = "0.0.0.0:9901"\n')
    assert "admin.token_env: is required" in str(caught.value)


async def test_max_requests_recycles_workers_through_the_drain(plugway_process, upstream_url):
    gateway = plugway_process(route_config(upstream_url, server="workers = 1\nmax_requests = 30"))
    first = gateway.wait_for_workers(1)[0]["pid"]
    statuses = [(await get(gateway.port, "/api/x"))[0] for _ in range(45)]
    assert statuses == [200] * 45
    wait_until(lambda: gateway.ready_workers() and gateway.ready_workers()[0]["pid"] != first)
    assert gateway.logged("recycling worker") and gateway.logged("max_requests")


async def test_ten_reloads_under_constant_load_fail_no_request(plugway_process, upstream_url):
    config = route_config(upstream_url, server="workers = 2")
    gateway = plugway_process(config)
    gateway.wait_for_workers(2)
    load = asyncio.create_task(constant_load(gateway.port, rate=150, duration=12))
    for generation in range(2, 12):  # each reload adds a route
        gateway.write_config(config + f'\n[[routes]]\nname = "gen{generation}"\nprefix = "/gen{generation}"\nupstream = "app"\n')
        result = await asyncio.to_thread(gateway.cli, "reload")
        assert result.returncode == 0, result.stderr
    result = await load
    print(f"10 reloads under load: {result}")
    assert gateway.status()["generation"] == 11
    assert (await get(gateway.port, "/gen11/x"))[0] == 200
    assert result.failed == 0, result


async def test_kill_9_under_load_loses_at_most_the_in_flight_requests(plugway_process, aiohttp_raw_server):
    async def handler(request):
        await asyncio.sleep(0.05)
        return web.Response(text="ok")

    server = await aiohttp_raw_server(handler)
    gateway = plugway_process(route_config(str(server.make_url("")).rstrip("/"), server="workers = 2"))
    victim = gateway.wait_for_workers(2)[0]["pid"]
    load = asyncio.create_task(constant_load(gateway.port, rate=100, duration=6, keepalive=0))
    await asyncio.sleep(2)
    os.kill(victim, signal.SIGKILL)
    result = await load
    print(f"kill -9 under load: {result}")
    # 100 req/s with 50 ms upstream latency: about 5 in flight per worker at the moment of the kill.
    assert result.failed <= 15, result
    assert result.outcomes["200"] >= result.sent - 15


def test_a_worker_that_cannot_start_stops_the_supervisor_with_one_clear_error(tmp_path, upstream_url):
    config = route_config(upstream_url, server="workers = 2") + '[plugins.sample]\nfail_start = "no database"\n'
    process = PlugwayProcess(tmp_path, config)
    result = subprocess.run([PLUGWAY, "run", "-c", str(process.config_path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "a worker failed to start: RuntimeError: no database" in result.stderr
    assert "HaltServer" not in result.stderr  # no second traceback from the supervisor's own clean-up
