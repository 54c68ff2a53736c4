"""Retries and their budget, timeouts, bulkheads, health checks and DNS discovery, with real
misbehaving upstreams and a real DNS server (dnsmasq)."""

import asyncio
import collections
import os
import shutil
import signal
import subprocess
import textwrap

import aiohttp
import pytest
from aiohttp import web

from support import async_wait_until, free_port, http_response, route_config
from gateway.testing import wait_until


def config(targets: list[str], upstream: str = "", route: str = "", server: str = "") -> str:
    listed = ", ".join(f'{{ url = "{url}" }}' for url in targets)
    return route_config(targets[0], upstream=upstream, route=route, server=server).replace(
        f'targets = [{{ url = "{targets[0]}" }}]', f"targets = [{listed}]")


async def statuses(gateway, count: int, method: str = "GET", path: str = "/api/x") -> list[int]:
    results = []
    for _ in range(count):
        async with gateway.client.request(method, path) as response:
            await response.read()
            results.append(response.status)
    return results


async def test_idempotent_requests_survive_a_dead_target_and_it_gets_ejected(plugway_gateway, raw_upstream):
    alive = await raw_upstream(lambda request: http_response(body=b"alive"))
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = await plugway_gateway(config([alive.url, dead], upstream="outlier_detection = { consecutive_failures = 3 }"))
    assert await statuses(gateway, 20) == [200] * 20  # every try on the dead one was retried on the other
    upstream = gateway.gateway.upstreams["app"]
    dead_target = next(t for t in upstream.targets if t.url == dead)
    assert dead_target.ejected_until > 0 and dead_target in upstream.unavailable
    assert len(alive.received) == 20
    posts = await statuses(gateway, 4, method="POST")
    assert posts == [200] * 4  # the dead target is ejected: POSTs, never retried, do not meet it
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.admin_url + "/upstreams") as response:
            view = (await response.json())["upstreams"]["app"]["targets"]
    assert next(t for t in view if t["url"] == dead)["ejections"] == 1


async def test_a_post_is_not_retried(plugway_gateway, raw_upstream):
    dead = f"http://127.0.0.1:{free_port()}"
    alive = await raw_upstream(lambda request: http_response())
    gateway = await plugway_gateway(config([dead, alive.url], upstream="outlier_detection = { consecutive_failures = 0 }"))
    results = await statuses(gateway, 4, method="POST")
    assert results.count(502) == 2 and results.count(200) == 2  # round robin: every other POST hit the dead one


async def test_statuses_are_retried_on_another_target_when_configured(plugway_gateway, raw_upstream):
    failing = await raw_upstream(lambda request: http_response(503, b"busy"))
    healthy = await raw_upstream(lambda request: http_response(200, b"fine"))
    gateway = await plugway_gateway(config(
        [failing.url, healthy.url],
        upstream='retries = { on = ["503"], attempts = 1, budget = 100 }\noutlier_detection = { consecutive_failures = 0 }'))
    await statuses(gateway, 1)  # a first deposit in the (100%) retry budget
    before = len(failing.received), len(healthy.received)
    assert await statuses(gateway, 10) == [200] * 10
    # round robin: every other first try failed, and each was retried on the healthy target
    assert (len(failing.received) - before[0], len(healthy.received) - before[1]) == (5, 10)


async def test_the_retry_budget_bounds_what_a_failing_upstream_sees(plugway_gateway, raw_upstream):
    failing = await raw_upstream(lambda request: http_response(503, b"down"))
    gateway = await plugway_gateway(config(
        [failing.url],
        upstream='retries = { on = ["503", "connect_failure"], attempts = 3, budget = 20, backoff = "1ms" }\n'
                 'outlier_detection = { consecutive_failures = 0 }'))
    results = await statuses(gateway, 200)
    assert results == [503] * 200
    print(f"200 client requests -> {len(failing.received)} upstream requests with a 20% budget")
    assert 200 <= len(failing.received) <= 200 * 1.2


async def test_timeouts_per_try_in_total_and_per_route(plugway_gateway, aiohttp_raw_server):
    async def slow(request):
        await asyncio.sleep(0.5 if request.path != "/fast" else 0)
        return web.Response(text="late")

    url = str((await aiohttp_raw_server(slow)).make_url("")).rstrip("/")
    gateway = await plugway_gateway(config(
        [url], upstream='timeout = "300ms"\nretries = { on = ["timeout"], attempts = 5, per_try_timeout = "100ms", budget = 100 }',
        route='read_timeout = "5s"'))
    async with gateway.client.get("/api/slow") as response:
        assert response.status == 504
        assert "300" in (await response.json())["error"]["message"] or response.status == 504
    async with gateway.client.get("/api/fast") as response:
        assert response.status == 200


async def test_a_route_can_shorten_the_read_timeout(plugway_gateway, aiohttp_raw_server):
    async def slow(request):
        await asyncio.sleep(0.5)
        return web.Response(text="late")

    url = str((await aiohttp_raw_server(slow)).make_url("")).rstrip("/")
    gateway = await plugway_gateway(config([url], route='read_timeout = "100ms"'))
    async with gateway.client.get("/api/x") as response:
        assert response.status == 504


async def test_the_bulkhead_refuses_at_once_instead_of_queueing(plugway_gateway, aiohttp_raw_server):
    release = asyncio.Event()

    async def held(request):
        await release.wait()
        return web.Response(text="done")

    url = str((await aiohttp_raw_server(held)).make_url("")).rstrip("/")
    gateway = await plugway_gateway(config([url], upstream="max_concurrent = 2"))
    first = [asyncio.create_task(gateway.client.get("/api/x")) for _ in range(2)]
    await async_wait_until(lambda: gateway.gateway.upstreams["app"].in_flight == 2)
    async with gateway.client.get("/api/x") as response:
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "upstream_busy"
    release.set()
    for task in first:
        async with await task as response:
            assert response.status == 200
    assert gateway.gateway.upstreams["app"].in_flight == 0


async def test_active_health_checks_take_a_target_out_and_back(plugway_gateway, aiohttp_raw_server):
    health = {"a": 200, "b": 200}
    served = collections.Counter()

    def handler_for(name):
        async def handler(request):
            if request.path == "/health":
                return web.Response(status=health[name])
            served[name] += 1
            return web.Response(text=name)
        return handler

    urls = [str((await aiohttp_raw_server(handler_for(name))).make_url("")).rstrip("/") for name in ("a", "b")]
    check = 'health_check = { path = "/health", interval = "100ms", healthy_threshold = 2, unhealthy_threshold = 2 }'
    gateway = await plugway_gateway(config(urls, upstream=check))
    upstream = gateway.gateway.upstreams["app"]
    health["b"] = 500
    await async_wait_until(lambda: not next(t for t in upstream.targets if t.url == urls[1]).healthy)
    served.clear()
    assert await statuses(gateway, 10) == [200] * 10
    assert served == {"a": 10}
    health["b"] = 200
    await async_wait_until(lambda: next(t for t in upstream.targets if t.url == urls[1]).healthy)
    served.clear()
    await statuses(gateway, 10)
    assert served == {"a": 5, "b": 5}


async def test_when_every_target_is_down_503_unless_panic_mode(plugway_gateway, aiohttp_raw_server):
    async def handler(request):
        return web.Response(status=500 if request.path == "/health" else 200, text="served")

    url = str((await aiohttp_raw_server(handler)).make_url("")).rstrip("/")
    check = 'health_check = { interval = "100ms", unhealthy_threshold = 1 }'
    for panic, expected in (("false", 503), ("true", 200)):
        gateway = await plugway_gateway(config([url], upstream=f"{check}\npanic_mode = {panic}"))
        target = gateway.gateway.upstreams["app"].targets[0]
        await async_wait_until(lambda: not target.healthy)
        async with gateway.client.get("/api/x") as response:
            assert response.status == expected
            if expected == 503:
                assert (await response.json())["error"]["code"] == "no_target_available"


async def test_one_checker_per_host_whatever_the_worker_count(plugway_process, aiohttp_raw_server):
    checks = []

    async def handler(request):
        if request.path == "/health":
            checks.append(asyncio.get_running_loop().time())
        return web.Response(text="ok")

    url = str((await aiohttp_raw_server(handler)).make_url("")).rstrip("/")
    gateway = plugway_process(config([url], server="workers = 3", upstream='health_check = { interval = "200ms" }'))
    gateway.wait_for_workers(3)
    await async_wait_until(lambda: len(checks) >= 2)
    first = len(checks)
    started = asyncio.get_running_loop().time()
    await asyncio.sleep(2.0)  # the interval is what is measured here
    elapsed = asyncio.get_running_loop().time() - started
    done = len(checks) - first
    print(f"{done} checks in {elapsed:.1f}s at a 200 ms interval, with 3 workers")
    assert done <= elapsed / 0.2 + 2  # three checkers would make about three times as many


@pytest.fixture
def dnsmasq(tmp_path):
    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq is not installed (scripts/install installs dnsmasq-base)")
    started = []

    def start(hosts: str, srv: list[str]) -> dict:
        port = free_port()
        (tmp_path / "hosts").write_text(hosts)
        conf = tmp_path / "dnsmasq.conf"
        conf.write_text(textwrap.dedent(f"""
            port={port}
            listen-address=127.0.0.1
            bind-interfaces
            no-resolv
            no-hosts
            addn-hosts={tmp_path / "hosts"}
            local-ttl=1
            user={os.environ.get("USER", "root") if os.geteuid() else "root"}
        """) + "".join(f"srv-host={record}\n" for record in srv))
        process = subprocess.Popen(["dnsmasq", "-C", str(conf), "--keep-in-foreground", "--log-facility=-"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(process)
        wait_until(lambda: process.poll() is not None or _udp_port_taken(port))
        assert process.poll() is None, "dnsmasq did not start"
        return {"port": port, "process": process, "hosts": tmp_path / "hosts"}

    yield start
    for process in started:
        process.terminate()
        process.wait()


def _udp_port_taken(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


async def serve_on(address: str, text: str) -> tuple[web.AppRunner, int]:
    async def handler(request):
        return web.Response(text=text)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, address, 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


async def test_dns_targets_follow_their_records(plugway_gateway, dnsmasq):
    port = free_port()
    runners = []
    for address, text in (("127.0.0.11", "eleven"), ("127.0.0.12", "twelve"), ("127.0.0.13", "thirteen")):
        runner = web.AppRunner(web.Application())
        app = web.Application()

        async def handler(request, text=text):
            return web.Response(text=text)

        app.router.add_get("/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, address, port).start()
        runners.append(runner)
    dns = dnsmasq("127.0.0.11 svc.test\n127.0.0.12 svc.test\n", [])
    gateway = await plugway_gateway(config(
        [f"dns://svc.test:{port}"], upstream=f'resolver = ["127.0.0.1:{dns["port"]}"]'))

    async def bodies(count):
        seen = collections.Counter()
        for _ in range(count):
            async with gateway.client.get("/api/x") as response:
                seen[await response.text()] += 1
        return seen

    assert await bodies(10) == {"eleven": 5, "twelve": 5}
    dns["hosts"].write_text("127.0.0.11 svc.test\n127.0.0.13 svc.test\n")
    dns["process"].send_signal(signal.SIGHUP)  # dnsmasq re-reads its hosts file
    upstream = gateway.gateway.upstreams["app"]
    await async_wait_until(lambda: {t.url for t in upstream.targets} == {
        f"http://127.0.0.11:{port}", f"http://127.0.0.13:{port}"}, timeout=15)
    assert await bodies(10) == {"eleven": 5, "thirteen": 5}
    for runner in runners:
        await runner.cleanup()


async def test_srv_targets_bring_their_ports_and_weights(plugway_gateway, dnsmasq):
    servers = [await serve_on("127.0.0.1", name) for name in ("light", "heavy")]
    (_, light_port), (_, heavy_port) = servers
    dns = dnsmasq("127.0.0.1 a.svc.test\n127.0.0.1 b.svc.test\n",
                  [f"_http._tcp.svc.test,a.svc.test,{light_port},0,1",
                   f"_http._tcp.svc.test,b.svc.test,{heavy_port},0,3"])
    gateway = await plugway_gateway(config(
        ["srv://_http._tcp.svc.test"], upstream=f'resolver = ["127.0.0.1:{dns["port"]}"]'))
    seen = collections.Counter()
    for _ in range(20):
        async with gateway.client.get("/api/x") as response:
            seen[await response.text()] += 1
    assert seen == {"light": 5, "heavy": 15}
    for runner, _ in servers:
        await runner.cleanup()
