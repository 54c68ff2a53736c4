"""Cluster mode with the real supervisor and real worker processes."""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.testing import PlugwayProcess
from support import PLUGWAY, async_wait_until, route_config, wait_until
from load import LoadResult, constant_load


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
    store_pid = status["store_pid"]
    assert store_pid not in {w["pid"] for w in workers}
    assert Path(f"/proc/{store_pid}/stat").read_text().split(") ")[1].split()[1] == str(gateway.process.pid)  # a child
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


def is_gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its parent's wait() counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


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
    wait_until(lambda: all(is_gone(pid) for pid in pids), timeout=15)
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", gateway.port)) != 0  # nobody holds the port any more


async def test_metrics_are_summed_over_workers_and_include_the_supervisor(plugway_process, upstream_url):
    gateway = plugway_process(route_config(upstream_url, server="workers = 2"))
    gateway.wait_for_workers(2)
    for _ in range(40):
        await get(gateway.port, "/api/x")
    assert gateway.cli("reload").returncode == 0
    gateway.wait_for_workers(2, generation=2)
    text = await scraped_requests(gateway, 40)  # the workers that left count
    assert "plugway_workers_alive 2.0" in text
    assert 'plugway_reloads_total{result="success"} 1.0' in text
    assert "plugway_config_generation 2.0" in text


REQUESTS_LINE = 'plugway_requests_total{method="GET",route="api",status_class="2xx"} '


async def scraped_requests(gateway, count: int) -> str:
    """The /metrics text once it counts ``count`` requests (workers write theirs within a second);
    fails if it ever counts more, or not that many within 10 s."""
    deadline = time.monotonic() + 10
    while True:
        status, text = await get(gateway.admin_port, "/metrics")
        assert status == 200
        seen = next((float(line.removeprefix(REQUESTS_LINE)) for line in text.splitlines()
                     if line.startswith(REQUESTS_LINE)), 0.0)
        assert seen <= count
        if seen == count:
            return text
        assert time.monotonic() < deadline, f"{seen:g} of {count} requests in /metrics after 10 s"
        await asyncio.sleep(0.1)


async def test_a_scrape_counts_the_requests_of_every_worker(plugway_process, upstream_url):
    gateway = plugway_process(route_config(upstream_url, server="workers = 2"))
    gateway.wait_for_workers(2)
    for _ in range(20):
        await get(gateway.port, "/api/x")  # a connection each: both workers serve some
    started = time.monotonic()
    text = await scraped_requests(gateway, 20)
    print(f"all 20 requests in /metrics {time.monotonic() - started:.2f} s after the last one")
    assert REQUESTS_LINE + "20.0" in text.splitlines()


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


def slot_serves_again(gateway: PlugwayProcess, dead: dict) -> bool:
    """A new worker in the dead worker's slot is ready and has served requests (heartbeat counts)."""
    return any(w["slot"] == dead["slot"] and w["pid"] != dead["pid"] and w["state"] == "ready" and w["requests"] > 0
               for w in gateway.status().get("workers", []))


async def test_kill_9_under_load_loses_at_most_the_requests_in_flight_and_the_rate_recovers(
    plugway_process, aiohttp_raw_server,
):
    async def handler(request):
        await asyncio.sleep(0.05)
        return web.Response(text="ok")

    server = await aiohttp_raw_server(handler)
    gateway = plugway_process(route_config(str(server.make_url("")).rstrip("/"), server="workers = 2"))
    victim = gateway.wait_for_workers(2)[0]
    load, stop = LoadResult(), asyncio.Event()
    # A new connection per request: a request sent after the kill on a kept-alive connection to the dead
    # worker would fail without having been in flight at the kill.
    running = asyncio.create_task(constant_load(gateway.port, rate=100, duration=300, keepalive=0,
                                                result=load, stop=stop))
    await async_wait_until(lambda: load.outcomes["200"] >= 100, timeout=60)
    in_flight, killed_at = load.in_flight, time.monotonic()  # no await in between: the same instant
    os.kill(victim["pid"], signal.SIGKILL)
    await async_wait_until(lambda: slot_serves_again(gateway, victim), timeout=60)
    await async_wait_until(lambda: load.succeeded_since(killed_at) >= 100, timeout=60)  # completions resumed
    stop.set()
    result = await running
    print(f"kill -9 under load: {result}; {in_flight} requests in flight at the kill")
    assert result.failed <= in_flight, result


def test_a_worker_that_cannot_start_stops_the_supervisor_with_one_clear_error(tmp_path, upstream_url):
    config = route_config(upstream_url, server="workers = 2") + '[plugins.sample]\nfail_start = "no database"\n'
    process = PlugwayProcess(tmp_path, config)
    result = subprocess.run([PLUGWAY, "run", "-c", str(process.config_path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "a worker failed to start: RuntimeError: no database" in result.stderr
    assert "HaltServer" not in result.stderr  # no second traceback from the supervisor's own clean-up


# --- log files, memory recycling, commands -------------------------------------------------------


async def get_all(port: int, paths: list[str]) -> list[tuple[int, str]]:
    """Each path over its own new connection, concurrently (the kernel spreads them over the workers)."""
    return await asyncio.gather(*(get(port, path) for path in paths))


def logged_paths(access_log: Path, marker: str) -> list[str]:
    """Paths containing ``marker`` in an access log file (complete JSON lines only)."""
    paths = []
    for line in access_log.read_text().splitlines() if access_log.exists() else []:
        try:
            path = json.loads(line)["path"]
        except (ValueError, KeyError):
            continue
        if marker in path:
            paths.append(path)
    return paths


def open_files(pid: int) -> set[str]:
    """What the process's file descriptors point to (a renamed file shows its new name)."""
    targets = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return targets  # the process is gone
    for fd in fds:
        try:
            targets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return targets


async def test_usr1_makes_every_worker_reopen_the_access_log_file(plugway_process, upstream_url, tmp_path):
    access_log, rotated = tmp_path / "access.log", tmp_path / "access.log.1"
    config = route_config(upstream_url, server="workers = 2").replace("access = false", f'access_path = "{access_log}"')
    gateway = plugway_process(config)
    workers = [w["pid"] for w in gateway.wait_for_workers(2)]
    await get_all(gateway.port, [f"/api/before-{i}" for i in range(10)])
    wait_until(lambda: len(logged_paths(access_log, "before-")) == 10)
    access_log.rename(rotated)  # what logrotate does, before its postrotate script sends USR1
    gateway.signal(signal.SIGUSR1)
    wait_until(lambda: all(str(access_log) in open_files(pid) and str(rotated) not in open_files(pid)
                           for pid in workers))
    answers = await get_all(gateway.port, [f"/api/after-{i}" for i in range(20)])
    assert {status for status, _ in answers} == {200}
    wait_until(lambda: len(logged_paths(access_log, "after-")) == 20)
    assert len(logged_paths(rotated, "before-")) == 10
    assert logged_paths(rotated, "after-") == [] and logged_paths(access_log, "before-") == []


def pids_in_status(gateway: PlugwayProcess) -> set[int]:
    return {w["pid"] for w in gateway.status().get("workers", [])}


async def test_max_memory_recycles_every_worker_through_the_drain_without_failing_a_request(
    plugway_process, upstream_url,
):
    gateway = plugway_process(route_config(upstream_url, server='workers = 2\nmax_memory = "1MiB"'))
    first = {w["pid"] for w in gateway.wait_for_workers(2)}
    load, stop = LoadResult(), asyncio.Event()
    running = asyncio.create_task(constant_load(gateway.port, rate=50, duration=300, result=load, stop=stop))
    # Every worker is over the limit: each one is replaced, and the replacements again, while the load runs.
    await async_wait_until(lambda: not first & pids_in_status(gateway) and len(gateway.ready_workers()) >= 1,
                           timeout=120)
    stop.set()
    result = await running
    print(f"max_memory recycling under load: {result}")
    assert gateway.logged("): max_memory")  # "recycling worker PID (slot N): max_memory"
    assert result.sent > 0 and result.failed == 0, result


async def test_status_and_stop_commands_talk_to_the_running_supervisor(plugway_process, upstream_url, slow_started):
    gateway = plugway_process(route_config(upstream_url, server="workers = 2"))
    workers = {w["pid"] for w in gateway.wait_for_workers(2)}
    shown = gateway.cli("status")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert status["supervisor_pid"] == gateway.process.pid
    assert (status["state"], status["ready"], status["generation"]) == ("serving", True, 1)
    assert status["config_path"] == str(gateway.config_path.resolve())
    assert {w["pid"] for w in status["workers"]} == workers
    assert sorted(w["slot"] for w in status["workers"]) == [0, 1]
    slow = asyncio.create_task(get(gateway.port, "/api/slow"))
    await asyncio.wait_for(slow_started.wait(), 10)
    stopped = await asyncio.to_thread(gateway.cli, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert all(is_gone(pid) for pid in workers)  # stop returned only once the workers had exited
    assert await slow == (200, "path=/slow")  # drained, not cut
    assert await asyncio.to_thread(gateway.wait) == 0
    after = gateway.cli("status")
    assert after.returncode != 0 and "no running gateway found" in after.stderr


# --- a new worker that never becomes ready -------------------------------------------------------


def starting_pids(gateway: PlugwayProcess, generation: int) -> list[int]:
    return [w["pid"] for w in gateway.status().get("workers", [])
            if w["state"] == "starting" and w["generation"] == generation]


async def test_a_new_worker_that_never_becomes_ready_is_killed_and_the_reload_fails(plugway_process, upstream_url):
    config = route_config(upstream_url, server="workers = 1")
    gateway = plugway_process(config)
    old = gateway.wait_for_workers(1)[0]["pid"]
    gateway.write_config(config.replace("workers = 1", 'workers = 1\nready_timeout = "2s"')
                         + "[plugins.sample]\nhang_start = 600\n")
    reload = asyncio.create_task(asyncio.to_thread(gateway.cli, "reload"))
    await async_wait_until(lambda: starting_pids(gateway, 2), timeout=30)
    hung = starting_pids(gateway, 2)[0]
    statuses = []
    while not reload.done():  # the old worker serves throughout
        statuses.append((await get(gateway.port, "/api/x"))[0])
    result = await reload
    assert result.returncode == 1
    assert "the new worker for slot 0 failed: it did not report ready in time" in result.stderr
    assert statuses and set(statuses) == {200}
    wait_until(lambda: is_gone(hung))
    assert [w["pid"] for w in gateway.wait_for_workers(1, generation=1)] == [old]
    assert (gateway.status()["generation"], gateway.status()["last_reload"]["result"]) == (1, "failure")
    assert (await get(gateway.port, "/api/x"))[0] == 200


async def test_a_failed_reload_puts_the_slots_already_switched_back_on_the_old_config(
    plugway_process, upstream_url, tmp_path,
):
    config = route_config(upstream_url, server="workers = 2")
    gateway = plugway_process(config)
    before = {w["slot"]: w["pid"] for w in gateway.wait_for_workers(2)}
    marker = tmp_path / "first-new-worker"  # slot 0's new worker creates it and starts; slot 1's then hangs
    gateway.write_config(
        config.replace('prefix = "/api"', 'prefix = "/v2"').replace("workers = 2", 'workers = 2\nready_timeout = "5s"')
        + f'[plugins.sample]\nhang_start = 600\nhang_start_marker = "{marker}"\n')
    result = gateway.cli("reload")
    assert result.returncode == 1
    assert "the new worker for slot 1 failed: it did not report ready in time" in result.stderr
    assert marker.exists()

    def rolled_back() -> bool:
        workers = gateway.status().get("workers", [])
        return (len(workers) == 2 and all(w["state"] == "ready" and w["generation"] == 1 for w in workers)
                and before[0] not in {w["pid"] for w in workers})

    wait_until(rolled_back, timeout=60)
    after = {w["slot"]: w["pid"] for w in gateway.status()["workers"]}
    assert after[1] == before[1]  # never switched
    assert after[0] != before[0] and is_gone(before[0])  # switched to the new config, then back
    answers = await get_all(gateway.port, ["/api/x"] * 20 + ["/v2/x"] * 20)
    assert [status for status, _ in answers] == [200] * 20 + [404] * 20


# --- metrics, inherited sockets ------------------------------------------------------------------


def metric_value(text: str, sample: str) -> float:
    """The value of one sample line of /metrics, e.g. 'name{label="x"}' (0.0 when absent)."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for_new_worker(gateway: PlugwayProcess, old: set[int]) -> int:
    """With one slot: wait until its only worker is a ready one not in ``old``."""
    wait_until(lambda: len(gateway.status().get("workers", [])) == 1 and len(gateway.ready_workers()) == 1
               and gateway.ready_workers()[0]["pid"] not in old)
    return gateway.ready_workers()[0]["pid"]


async def test_worker_restarts_are_counted_by_reason(plugway_process, upstream_url):
    gateway = plugway_process(route_config(upstream_url, server="workers = 1\nmax_requests = 20"))
    crashed = gateway.wait_for_workers(1)[0]["pid"]
    os.kill(crashed, signal.SIGKILL)
    recycled = wait_for_new_worker(gateway, {crashed})
    for _ in range(25):
        assert (await get(gateway.port, "/api/x"))[0] == 200
    wait_for_new_worker(gateway, {crashed, recycled})
    status, text = await get(gateway.admin_port, "/metrics")
    assert status == 200
    assert metric_value(text, 'plugway_worker_restarts_total{reason="crash"}') == 1.0
    assert metric_value(text, 'plugway_worker_restarts_total{reason="max_requests"}') == 1.0


async def send_request(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: queued\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def read_status(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
    """The answer's status code, or what went wrong (a reset connection, silence)."""
    try:
        answer = await asyncio.wait_for(reader.read(-1), 60)
    except (OSError, asyncio.TimeoutError) as exc:
        return type(exc).__name__
    finally:
        writer.close()
    return answer[9:12].decode() if answer.startswith(b"HTTP/1.1 ") else "empty"


async def test_connections_queued_on_a_slot_are_answered_by_the_worker_that_replaces_its_worker(
    plugway_process, upstream_url,
):
    # worker_timeout: the stopped worker is not killed as stuck while the test runs (it would change nothing).
    gateway = plugway_process(route_config(upstream_url, server='workers = 1\nworker_timeout = "300s"'))
    old = gateway.wait_for_workers(1)[0]["pid"]
    os.kill(old, signal.SIGSTOP)  # it accepts nothing more: new connections wait in the slot's accept queue
    try:
        queued = [await send_request(gateway.port, f"/api/queued-{i}") for i in range(20)]
        gateway.signal(signal.SIGHUP)  # the replacement inherits the slot's socket, queue included
        await async_wait_until(lambda: any(w["generation"] == 2 and w["state"] == "ready"
                                           for w in gateway.status().get("workers", [])), timeout=60)
    finally:
        os.kill(old, signal.SIGKILL)  # its copy of the socket closes; the supervisor's keeps the queue alive
    answers = await asyncio.gather(*(read_status(*connection) for connection in queued))
    assert answers == ["200"] * 20
    gateway.wait_for_workers(1, generation=2)


# --- plugins: only workers import them, and a reload imports them afresh ----------------------------


PROBE_PLUGIN = """
import os
import time

from gateway import PluginDeclaration, hookimpl

VERSION = {version!r}
with open({record!r}, "a") as record:
    record.write(f"{{os.getpid()}} {{VERSION}}\\n")
time.sleep({import_seconds})  # a plugin slow to import


@hookimpl
def declare_plugin():
    return PluginDeclaration()


@hookimpl
def on_response(response):
    response.headers["X-Probe-Version"] = VERSION
"""


def install_probe_plugin(site: Path, version: str, record: Path, import_seconds: float = 0) -> None:
    """What ``pip install -U plugway-probe`` leaves in site-packages: the module (its old bytecode gone)
    and the distribution's metadata with the entry point in the ``plugway`` group."""
    for old in site.glob("plugway_probe-*.dist-info"):
        shutil.rmtree(old)
    shutil.rmtree(site / "__pycache__", ignore_errors=True)
    (site / "plugway_probe.py").write_text(PROBE_PLUGIN.format(version=version, record=str(record),
                                                               import_seconds=import_seconds))
    metadata = site / f"plugway_probe-{version}.dist-info"
    metadata.mkdir()
    (metadata / "METADATA").write_text(f"Metadata-Version: 2.1\nName: plugway-probe\nVersion: {version}\n")
    (metadata / "entry_points.txt").write_text("[plugway]\nprobe = plugway_probe\n")


def imports(record: Path) -> set[tuple[int, str]]:
    """(pid, version) of every process that imported the probe plugin."""
    if not record.exists():
        return set()
    return {(int(pid), version) for pid, version in (line.split() for line in record.read_text().splitlines())}


async def probe_versions(port: int, count: int) -> set[str]:
    async with aiohttp.ClientSession() as session:
        versions = set()
        for _ in range(count):
            async with session.get(f"http://127.0.0.1:{port}/api/x", headers={"Connection": "close"}) as response:
                assert response.status == 200
                versions.add(response.headers.get("X-Probe-Version"))
        return versions


async def test_only_workers_import_plugins_and_a_reload_runs_an_upgraded_plugin(
    plugway_process, upstream_url, tmp_path,
):
    site, record = tmp_path / "site", tmp_path / "imports.txt"
    site.mkdir()
    install_probe_plugin(site, "1.0", record)
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    gateway = plugway_process(route_config(upstream_url, server="workers = 2") + "[plugins.probe]\n",
                              env={"PYTHONPATH": path})
    first = {w["pid"] for w in gateway.wait_for_workers(2)}
    assert await probe_versions(gateway.port, 10) == {"1.0"}
    assert imports(record) == {(pid, "1.0") for pid in first}  # the workers, and not the supervisor
    assert gateway.process.pid not in {pid for pid, _ in imports(record)}
    install_probe_plugin(site, "2.0", record)  # pip install -U plugway-probe
    result = gateway.cli("reload")
    assert result.returncode == 0, result.stderr
    second = {w["pid"] for w in gateway.wait_for_workers(2, generation=2)}
    assert await probe_versions(gateway.port, 10) == {"2.0"}
    assert imports(record) == {(pid, "1.0") for pid in first} | {(pid, "2.0") for pid in second}


async def test_a_worker_starting_during_logrotate_survives_usr1_and_writes_to_the_new_log(
    plugway_process, upstream_url, tmp_path,
):
    access_log, rotated = tmp_path / "access.log", tmp_path / "access.log.1"
    config = route_config(upstream_url, server="workers = 1").replace("access = false", f'access_path = "{access_log}"')
    gateway = plugway_process(config)
    gateway.wait_for_workers(1)
    gateway.write_config(config + "[plugins.sample]\nhang_start = 5\n")  # the new worker starts slowly
    reload = asyncio.create_task(asyncio.to_thread(gateway.cli, "reload"))
    await async_wait_until(lambda: starting_pids(gateway, 2), timeout=30)
    starting = starting_pids(gateway, 2)[0]
    await async_wait_until(lambda: str(access_log) in open_files(starting), timeout=30)  # into its start-up
    access_log.rename(rotated)
    gateway.signal(signal.SIGUSR1)  # logrotate during the reload
    result = await reload
    assert result.returncode == 0, result.stderr
    assert [w["pid"] for w in gateway.wait_for_workers(1, generation=2)] == [starting]
    wait_until(lambda: str(access_log) in open_files(starting) and str(rotated) not in open_files(starting))


async def test_usr1_while_a_worker_imports_its_plugins_does_not_kill_it(plugway_process, upstream_url, tmp_path):
    site, record = tmp_path / "site", tmp_path / "imports.txt"
    site.mkdir()
    install_probe_plugin(site, "1.0", record, import_seconds=5)
    config = route_config(upstream_url, server="workers = 1")
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    gateway = plugway_process(config, env={"PYTHONPATH": path})
    gateway.wait_for_workers(1)
    gateway.write_config(config + "[plugins.probe]\n")
    reload = asyncio.create_task(asyncio.to_thread(gateway.cli, "reload"))
    await async_wait_until(lambda: imports(record), timeout=30)  # the new worker is importing the plugin
    gateway.signal(signal.SIGUSR1)
    result = await reload
    assert result.returncode == 0, result.stderr
    assert [w["pid"] for w in gateway.wait_for_workers(1, generation=2)] == [pid for pid, _ in imports(record)]
