"""Retries and their budget, timeouts, bulkheads, health checks and DNS discovery, with real
misbehaving upstreams and a real DNS server (dnsmasq)."""

import asyncio
import collections
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time

import aiohttp
import pytest
from aiohttp import web

from support import _read_request, async_wait_until, free_port, http_response, route_config
from gateway import PluginDeclaration, hookimpl
from gateway.config.model import RetrySettings
from gateway.config.units import Duration
from gateway.proxy import _backoff
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


class Scripted:
    """A raw asyncio HTTP/1.1 upstream: ``answer(path, reader, writer)`` writes each response
    (or waits, or returns False to close the connection). Records every request (with the
    number of the connection it came on) and counts connections accepted and closed."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.requests: list[tuple[int, str, bytes]] = []  # (connection number, path, whole request)
        self.accepted = 0
        self.closed = 0
        self.port = 0
        self.host = "127.0.0.1"
        self.server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def paths(self, *, health: bool = False) -> list[str]:
        return [path for _, path, _ in self.requests if health or path != "/health"]

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> "Scripted":
        self.host = host
        self.server = await asyncio.start_server(self._serve, host, port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        number = self.accepted
        self._handlers.add(asyncio.current_task())
        self._writers.add(writer)
        try:
            while (request := await _read_request(reader)) is not None:
                path = request.split(b" ", 2)[1].decode()
                self.requests.append((number, path, request))
                if await self.answer(path, reader, writer) is False:
                    break
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # close() ends a handler still waiting (a test that failed half-way)
        finally:
            self.closed += 1
            self._writers.discard(writer)
            self._handlers.discard(asyncio.current_task())
            writer.close()

    async def close(self) -> None:
        self.server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers)
        await self.server.wait_closed()


@pytest.fixture
async def scripted():
    """Factory: ``await scripted(answer, host=..., port=...)`` -> a started ``Scripted`` upstream."""
    started: list[Scripted] = []

    async def start(answer, host: str = "127.0.0.1", port: int = 0) -> Scripted:
        upstream = await Scripted(answer).start(host, port)
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.close()


def answering(status: int = 200, body: bytes = b"ok"):
    async def answer(path, reader, writer):
        writer.write(http_response(status, body))
    return answer


async def never_answering(path, reader, writer):
    """Take the request, never answer; the connection ends when the gateway gives up on it."""
    await reader.read()
    return False


def _accept_queue(listener: socket.socket) -> tuple[int, int]:
    """(connections waiting in a listening socket's accept queue, its limit), as ``ss -lt``
    shows them: Linux reports them as tcpi_unacked and tcpi_sacked of TCP_INFO."""
    return struct.unpack_from("II", listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 24)


@pytest.fixture
def unanswered_port():
    """A loopback port where connecting hangs, the way it does to a target too busy to accept.

    A listener that never accepts, with listen(0), whose accept queue is filled first: once
    the queue is full, Linux drops further SYNs (whatever SYN cookies say), so connect()
    waits (retransmitting its SYN) until the caller gives up. No routing tricks needed."""
    if not sys.platform.startswith("linux"):
        pytest.skip("relies on Linux dropping SYNs to a listener whose accept queue is full")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers = []
    while (queued := _accept_queue(listener))[0] <= queued[1]:
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(address)
        fillers.append(filler)
        wait_until(lambda: _accept_queue(listener)[0] > queued[0])
    yield address[1]
    for sock in fillers:
        sock.close()
    listener.close()


async def read_until_closed(port: int, data: bytes) -> tuple[bytes, bool]:
    """Send raw bytes to the gateway; read until it closes the connection.

    Returns what arrived and whether the gateway closed (or reset) the connection; False
    when it stayed open and silent for a whole minute instead (a failure guard, not a bound)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    chunks = []
    closed = False
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 60)
            if not chunk:
                closed = True
                break
            chunks.append(chunk)
    except ConnectionError:
        closed = True
    except TimeoutError:
        pass
    writer.close()
    return b"".join(chunks), closed


async def admin_view(gateway) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.admin_url + "/upstreams") as response:
            return await response.json()


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


class RecordTries:
    """Keeps, for each request, the tries the core retried elsewhere and the target that answered."""

    def __init__(self) -> None:
        self.seen: list[tuple[tuple[tuple[str, str], ...], str]] = []

    @hookimpl
    def declare_plugin(self):
        return PluginDeclaration()

    @hookimpl
    def after_response(self, ctx):
        self.seen.append((ctx.failed_tries, ctx.target.url))


async def test_plugins_see_the_tries_that_were_retried_elsewhere(plugway_gateway, raw_upstream):
    dead = f"http://127.0.0.1:{free_port()}"
    alive = await raw_upstream(lambda request: http_response())
    recorder = RecordTries()
    gateway = await plugway_gateway(
        config([dead, alive.url], upstream="outlier_detection = { consecutive_failures = 0 }") + "\n[plugins.tries]\n",
        plugins={"tries": recorder})
    assert await statuses(gateway, 4) == [200] * 4
    retried = (((dead, "upstream_unreachable"),), alive.url)
    assert sorted(recorder.seen) == sorted([((), alive.url), retried] * 2)  # round robin: every other first try


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


async def test_timeouts_per_try_in_total_and_per_route(plugway_gateway, scripted):
    async def answer(path, reader, writer):
        if path == "/fast":
            writer.write(http_response(body=b"fast"))
            return None
        return await never_answering(path, reader, writer)

    upstream = await scripted(answer)
    routes = """
        [[routes]]
        name = "total"
        prefix = "/total"
        upstream = "app"
        strip_prefix = true
        timeout = "250ms"
        [[routes]]
        name = "read"
        prefix = "/read"
        upstream = "app"
        strip_prefix = true
        read_timeout = "50ms"
    """
    gateway = await plugway_gateway(route_config(
        upstream.url, extra=routes, upstream='read_timeout = "30s"\ntimeout = "20s"\n'
        'retries = { on = ["timeout"], attempts = 2, per_try_timeout = "100ms", budget = 100 }'))
    assert await statuses(gateway, 6, path="/api/fast") == [200] * 6  # 6 tokens in the (100%) retry budget
    cases = (
        # path, the timeout the error must name, the least time it can have taken
        ("/api/pertry", "response head within per_try_timeout (100ms)", 3 * 0.1),  # 3 tries, none answered
        ("/read/short", "response head within read_timeout (50ms)", 3 * 0.05),  # the route's, shorter than per-try
        ("/total/all", "response head within timeout (250ms), across every try", 0.25),  # the route's, not 20s
    )
    for path, fired, at_least in cases:
        started = time.monotonic()
        async with gateway.client.get(path) as response:
            error = (await response.json())["error"]
        elapsed = time.monotonic() - started
        assert (response.status, error["code"]) == (504, "upstream_timeout"), path
        assert fired in error["message"], (path, error["message"])
        assert elapsed >= at_least, path
    # Each try of /pertry and /short ended on its own timeout and was retried: 1 + 2 tries.
    await async_wait_until(lambda: len(upstream.paths()) >= 6 + 3 + 3 + 1)
    assert upstream.paths().count("/pertry") == 3 and upstream.paths().count("/short") == 3


async def test_the_total_timeout_covers_every_try_and_its_backoff(plugway_gateway, scripted):
    async def answer(path, reader, writer):
        if path == "/fast":
            writer.write(http_response(body=b"fast"))
            return None
        return await never_answering(path, reader, writer)

    upstream = await scripted(answer)
    gateway = await plugway_gateway(config([upstream.url], upstream=(
        'read_timeout = "30s"\ntimeout = "400ms"\n'
        'retries = { on = ["timeout"], attempts = 10, per_try_timeout = "150ms", budget = 100, backoff = "1ms" }')))
    assert await statuses(gateway, 9, path="/api/fast") == [200] * 9  # budget for every retry
    started = time.monotonic()
    async with gateway.client.get("/api/slow") as response:
        error = (await response.json())["error"]
    elapsed = time.monotonic() - started
    assert response.status == 504
    assert "within timeout (400ms), across every try" in error["message"]
    assert elapsed >= 0.4  # so more than one try (each ends at 150 ms): the total spans them
    await async_wait_until(lambda: upstream.paths().count("/slow") >= 1)
    assert upstream.paths().count("/slow") < 11  # the total ended the tries before they ran out


async def test_timeouts_bound_the_response_head_not_the_body(plugway_gateway, scripted):
    """per_try_timeout and timeout end with the response head; read_timeout alone bounds the
    body, between its bytes (a long download or an event stream is not cut)."""
    async def trickle(path, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n")
        for _ in range(3):
            await writer.drain()
            await asyncio.sleep(0.25)
            writer.write(b"x")

    upstream = await scripted(trickle)
    gateway = await plugway_gateway(config([upstream.url], upstream=(
        'read_timeout = "10s"\ntimeout = "300ms"\nretries = { per_try_timeout = "100ms" }')))
    started = time.monotonic()
    async with gateway.client.get("/api/x") as response:
        body = await response.read()
    assert (response.status, body) == (200, b"xxx")
    assert time.monotonic() - started >= 0.75  # longer than the total, gaps longer than per-try


async def test_a_stall_in_the_middle_of_the_body_cuts_the_client_and_discards_the_connection(
        plugway_gateway, scripted):
    async def stall(path, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
        await writer.drain()
        return await never_answering(path, reader, writer)  # the other 900 bytes never come

    upstream = await scripted(stall)
    gateway = await plugway_gateway(config([upstream.url], upstream='read_timeout = "200ms"'))
    started = time.monotonic()
    received, closed = await read_until_closed(gateway.port, b"GET /api/x HTTP/1.1\r\nHost: t\r\n\r\n")
    elapsed = time.monotonic() - started
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: 1000" in head.lower()
    assert body == b"x" * 100 and closed  # the head was out: cutting the connection is the only signal
    assert elapsed >= 0.2
    target = gateway.gateway.upstreams["app"].targets[0]
    # the upstream connection was closed, not kept for another request
    await async_wait_until(lambda: upstream.closed == 1 and target.pool.open == 0)
    assert (len(target.pool.idle), target.in_flight) == (0, 0)


async def test_a_connect_timeout_fires_and_a_route_can_shorten_it(plugway_gateway, unanswered_port):
    url = f"http://127.0.0.1:{unanswered_port}"
    for upstream, route, fired in (
        ('connect_timeout = "300ms"', "", "connect_timeout (300ms)"),
        ('connect_timeout = "30s"\ntimeout = "20s"', 'connect_timeout = "200ms"', "connect_timeout (200ms)"),
    ):
        gateway = await plugway_gateway(config([url], upstream=upstream + "\nretries = { attempts = 0 }", route=route))
        started = time.monotonic()
        async with gateway.client.get("/api/x") as response:
            error = (await response.json())["error"]
        assert (response.status, error["code"]) == (504, "upstream_timeout")
        assert fired in error["message"], error["message"]
        assert time.monotonic() - started >= float(Duration(fired.split("(")[1].rstrip(")")))


async def test_connect_timeouts_spend_the_retry_budget_refusals_do_not(plugway_gateway, scripted, unanswered_port):
    """A refused connection reached nobody: retried for free. A connect timeout may be a target
    whose accept queue is full: its retries spend budget, lest they add to the overload."""
    alive = await scripted(answering(body=b"alive"))
    refused = f"http://127.0.0.1:{free_port()}"
    overloaded = f"http://127.0.0.1:{unanswered_port}"
    keys = 'connect_timeout = "200ms"\noutlier_detection = {{ consecutive_failures = 0 }}\n' \
           'retries = {{ attempts = 1, budget = {budget} }}'
    cases = (
        (refused, 0, 200),  # no budget at all, and yet retried on the live target
        (overloaded, 0, 504),  # no budget: not retried
        (overloaded, 100, 200),  # with budget, a connect timeout is retried like any failure
    )
    for first, budget, expected in cases:
        before = len(alive.requests)
        # the first target listed is the first one round robin picks
        gateway = await plugway_gateway(config([first, alive.url], upstream=keys.format(budget=budget)))
        async with gateway.client.get("/api/x") as response:
            body = await response.read()
        assert response.status == expected, (first, budget, body)
        assert len(alive.requests) - before == (1 if expected == 200 else 0)
        if expected == 504:
            assert b"connect_timeout (200ms)" in body


async def test_a_failed_tls_handshake_spends_the_retry_budget(plugway_gateway, scripted):
    handshakes = []

    async def not_tls(reader, writer):  # takes the ClientHello, answers in plain HTTP
        handshakes.append(await reader.read(5))
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await reader.read()
        writer.close()

    server = await asyncio.start_server(not_tls, "127.0.0.1", 0)
    alive = await scripted(answering(body=b"alive"))
    gateway = await plugway_gateway(config(
        [f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}", alive.url],
        upstream="tls_verify = false\noutlier_detection = { consecutive_failures = 0 }\n"
                 "retries = { attempts = 1, budget = 0 }"))
    async with gateway.client.get("/api/x") as response:
        error = (await response.json())["error"]
    assert (response.status, error["code"]) == (502, "upstream_unreachable") and "TLS" in error["message"]
    assert len(handshakes) == 1 and handshakes[0][:1] == b"\x16"  # a TLS record reached the target
    assert alive.requests == []  # the target did a handshake's work: no free retry
    server.close()


def test_backoff_doubles_up_to_its_cap_with_jitter():
    retries = RetrySettings(backoff=Duration("10ms"), backoff_max=Duration("100ms"))
    means = []
    for attempt in range(7):
        ceiling = min(0.1, 0.01 * 2 ** attempt)  # 10, 20, 40, 80, then 100 ms
        draws = [_backoff(retries, attempt) for _ in range(5000)]
        assert all(ceiling / 2 <= draw <= ceiling for draw in draws), attempt
        # jitter: the draws cover the upper half of the range, not one fixed value
        assert min(draws) < ceiling * 0.55 and max(draws) > ceiling * 0.95, attempt
        means.append(sum(draws) / len(draws))
    for attempt in range(3):
        assert 1.9 < means[attempt + 1] / means[attempt] < 2.1  # exponential growth
    assert 1.1 < means[4] / means[3] < 1.4  # 80 ms -> capped at 100 ms
    assert 0.9 < means[6] / means[4] < 1.1  # and it stays capped


@pytest.mark.parametrize("body", ["small", "large", "chunked"])
async def test_only_a_body_held_in_memory_is_retried(plugway_gateway, scripted, body):
    upstream = await scripted(answering(503, b"busy"))
    gateway = await plugway_gateway(config([upstream.url], upstream=(
        'read_timeout = "5s"\nretries = { on = ["503"], attempts = 1, budget = 100 }\n'
        'outlier_detection = { consecutive_failures = 0 }')))

    async def pieces():
        for piece in (b"one-", b"two-", b"three"):
            yield piece

    data = {"small": b"s" * 1000, "large": b"L" * 100_000, "chunked": pieces()}[body]
    async with gateway.client.put("/api/x", data=data) as response:
        assert (response.status, await response.read()) == (503, b"busy")  # the upstream's own answer
    sent = upstream.requests
    if body == "small":  # in memory: sent again (once: attempts = 1)
        assert len(sent) == 2 and all(request.endswith(b"s" * 1000) for _, _, request in sent)
    elif body == "large":  # over 64 KiB, streamed: never sent twice
        assert len(sent) == 1 and sent[0][2].endswith(b"L" * 100_000)
    else:  # chunked: streamed whatever its size
        assert len(sent) == 1 and b"transfer-encoding: chunked" in sent[0][2].lower()
        assert sent[0][2].endswith(b"0\r\n\r\n")


@pytest.mark.parametrize("percent, cap", [(50, 2), (75, 3)])
async def test_max_ejection_percent_caps_how_many_targets_are_ejected(plugway_gateway, percent, cap):
    dead = set()
    while len(dead) < 4:
        dead.add(f"http://127.0.0.1:{free_port()}")  # nothing listens: refused
    gateway = await plugway_gateway(config(sorted(dead), upstream=(
        "retries = { attempts = 0 }\noutlier_detection = { consecutive_failures = 1, base_ejection_time = \"60s\", "
        f"max_ejection_percent = {percent} }}")))
    # every try fails; the targets beyond the cap keep taking (and failing) the requests
    assert await statuses(gateway, 12) == [502] * 12
    upstream = gateway.gateway.upstreams["app"]
    now = upstream.loop.time()
    ejected = [t for t in upstream.targets if t.ejected_until > now]
    kept = [t for t in upstream.targets if t.ejected_until <= now]
    assert len(ejected) == cap
    assert all(t.ejections == 0 and t.failures >= 2 for t in kept)  # failed again and again, never ejected


async def test_ejection_time_grows_with_the_number_of_ejections(plugway_gateway, scripted):
    alive = await scripted(answering(body=b"alive"))
    dead_url = f"http://127.0.0.1:{free_port()}"
    gateway = await plugway_gateway(config([dead_url, alive.url], upstream=(
        'outlier_detection = { consecutive_failures = 1, base_ejection_time = "300ms" }')))
    upstream = gateway.gateway.upstreams["app"]
    dead = next(t for t in upstream.targets if t.url == dead_url)
    loop = upstream.loop
    for ejections in (1, 2, 3):
        await async_wait_until(lambda: loop.time() >= dead.ejected_until)  # the last ejection is over
        before = loop.time()
        for _ in range(4):  # round robin comes back to the dead target within two requests
            assert await statuses(gateway, 1) == [200]  # its try was retried on the live one
            if dead.ejections == ejections:
                break
        after = loop.time()
        assert dead.ejections == ejections
        # ejected at some moment between before and after, for 300 ms times its ejections
        assert dead.ejected_until - after - 1e-6 <= 0.3 * ejections <= dead.ejected_until - before + 1e-6


async def test_admin_upstreams_shows_health_ejection_and_in_flight(plugway_gateway, scripted):
    release = asyncio.Event()

    def target(health: int, status: int):
        async def answer(path, reader, writer):
            if path == "/health":
                writer.write(http_response(health))
                return None
            if path == "/hold":
                await release.wait()
            writer.write(http_response(status))
        return answer

    steady = await scripted(target(200, 200))
    down = await scripted(target(500, 200))  # fails its active checks
    failing = await scripted(target(200, 500))  # passes them, fails real requests: ejected
    gateway = await plugway_gateway(config([steady.url, down.url, failing.url], upstream=(
        'health_check = { path = "/health", interval = "100ms", unhealthy_threshold = 1 }\n'
        'outlier_detection = { consecutive_failures = 1, base_ejection_time = "60s" }')))
    upstream = gateway.gateway.upstreams["app"]
    await async_wait_until(lambda: not upstream.targets[1].healthy)
    for _ in range(4):
        await statuses(gateway, 1)
        if upstream.targets[2].ejections:
            break
    held = asyncio.create_task(gateway.client.get("/api/hold"))
    try:
        await async_wait_until(lambda: "/hold" in steady.paths())
        view = (await admin_view(gateway))["upstreams"]["app"]
    finally:
        release.set()
    async with await held as response:
        assert response.status == 200
    targets = {t["url"]: t for t in view["targets"]}
    assert view["in_flight"] == 1
    assert targets[steady.url]["healthy"] and targets[steady.url]["in_flight"] == 1
    assert targets[steady.url]["open_connections"] >= 1 and targets[steady.url]["ejected_for_seconds"] == 0
    assert not targets[down.url]["healthy"] and targets[down.url]["in_flight"] == 0
    assert targets[failing.url]["healthy"] and targets[failing.url]["ejections"] == 1
    assert 0 < targets[failing.url]["ejected_for_seconds"] <= 60
    view = (await admin_view(gateway))["upstreams"]["app"]
    assert view["in_flight"] == 0 and all(t["in_flight"] == 0 for t in view["targets"])


async def test_every_worker_applies_the_hosts_active_check_results(plugway_process, scripted):
    up = await scripted(answering(body=b"up"))
    down = await scripted(answering(500, b"down"))  # its /health answers 500 too
    gateway = plugway_process(config([up.url, down.url], server="workers = 3", upstream=(
        'health_check = { path = "/health", interval = "100ms", unhealthy_threshold = 1 }\n'
        'outlier_detection = { consecutive_failures = 0 }')))
    gateway.wait_for_workers(3)
    admin = f"http://127.0.0.1:{gateway.admin_port}/upstreams"
    judged_down: set[int] = set()  # workers whose view has the target down

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async def poll() -> None:
            while len(judged_down) < 3:
                async with session.get(admin) as response:
                    view = await response.json()
                targets = {t["url"]: t for t in view["upstreams"]["app"]["targets"]}
                if not targets[down.url]["healthy"]:
                    judged_down.add(view["worker_pid"])

        await asyncio.wait_for(poll(), 60)  # any worker answers the admin API: until all three have
        # New connections land on any worker: go on until each of the three has sent the target
        # several requests (a worker sends them one after the other on its own keep-alive
        # connection, so three connections with 4 requests each = three workers with 4 each;
        # in round robin, a worker still seeing both targets would have sent 2 of them elsewhere).
        def busy_workers() -> int:
            per_connection = collections.Counter(number for number, path, _ in up.requests if path != "/health")
            return sum(1 for count in per_connection.values() if count >= 4)

        served = 0
        while busy_workers() < 3:
            async with session.get(gateway.url + "/api/x") as response:
                assert (response.status, await response.read()) == (200, b"up")
            served += 1
            assert served < 1000, "the requests never reached three workers"
    assert down.paths() == []  # no worker sent it a request, only the checker its checks


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


class AvoidTargets:
    """Keeps each request away from the targets whose URLs its X-Avoid header lists."""

    @hookimpl
    def declare_plugin(self):
        return PluginDeclaration()

    @hookimpl
    def on_request(self, ctx):
        ctx.avoid_targets = frozenset(ctx.request.headers.get("X-Avoid", "").split())


async def test_a_plugin_keeps_requests_away_from_targets_even_in_panic_mode(plugway_gateway, aiohttp_raw_server):
    served = collections.Counter()

    def handler_for(name):
        async def handler(request):
            served[name] += 1
            return web.Response(text=name)
        return handler

    a, b = [str((await aiohttp_raw_server(handler_for(name))).make_url("")).rstrip("/") for name in ("a", "b")]
    for panic in ("false", "true"):
        gateway = await plugway_gateway(config([a, b], upstream=f"panic_mode = {panic}") + "\n[plugins.avoid]\n",
                                        plugins={"avoid": AvoidTargets()})
        served.clear()
        for _ in range(6):
            async with gateway.client.get("/api/x", headers={"X-Avoid": b}) as response:
                assert response.status == 200
        assert served == {"a": 6}
        async with gateway.client.get("/api/x", headers={"X-Avoid": f"{a} {b}"}) as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "no_target_available"
        assert served == {"a": 6}
        await statuses(gateway, 4)
        assert served == {"a": 8, "b": 2}  # avoiding is per request


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


async def test_connections_to_targets_removed_from_dns_drain(plugway_gateway, scripted, dnsmasq):
    port = free_port()
    release = asyncio.Event()

    def named(name: bytes):
        async def answer(path, reader, writer):
            if path == "/hold":
                await release.wait()
            writer.write(http_response(body=name))
        return answer

    kept = await scripted(named(b"eleven"), "127.0.0.11", port)
    removed = await scripted(named(b"twelve"), "127.0.0.12", port)
    dns = dnsmasq("127.0.0.11 svc.test\n127.0.0.12 svc.test\n", [])
    gateway = await plugway_gateway(config(
        [f"dns://svc.test:{port}"], upstream=f'resolver = ["127.0.0.1:{dns["port"]}"]'))
    upstream = gateway.gateway.upstreams["app"]
    await async_wait_until(lambda: {t.url for t in upstream.targets} == {kept.url, removed.url})
    held = [asyncio.create_task(gateway.client.get("/api/hold")) for _ in range(2)]  # one on each target
    await async_wait_until(lambda: kept.paths() == ["/hold"] and removed.paths() == ["/hold"])
    leaving = next(t for t in upstream.targets if t.url == removed.url)

    dns["hosts"].write_text("127.0.0.11 svc.test\n")
    dns["process"].send_signal(signal.SIGHUP)  # dnsmasq re-reads its hosts file
    await async_wait_until(lambda: [t.url for t in upstream.targets] == [kept.url])
    # out of the upstream, but its busy connection is left to finish its request
    assert leaving.pool.retired and leaving.in_flight == 1 and leaving.pool.open == 1 and removed.closed == 0
    assert await statuses(gateway, 6) == [200] * 6
    assert removed.paths() == ["/hold"] and kept.paths().count("/x") == 6  # no new request went there
    release.set()
    answers = []
    for task in held:
        async with await task as response:
            answers.append((response.status, await response.read()))
    assert sorted(answers) == [(200, b"eleven"), (200, b"twelve")]  # the request in flight completed
    # then its connection closed, instead of waiting idle for requests that will not come
    await async_wait_until(lambda: removed.closed == 1 and leaving.pool.open == 0)
    assert kept.closed == 0 and leaving.in_flight == 0
