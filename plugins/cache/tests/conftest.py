"""Fixtures for the cache's tests: a real upstream whose answers each test scripts, and a real
gateway with the cache in front of it (``cache_gateway``), or the real cluster
(``cache_process``) for what only several workers show."""

from __future__ import annotations

import asyncio
import re
import textwrap
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]


@dataclass
class Reply:
    status: int
    headers: object  # CIMultiDictProxy
    body: bytes

    @property
    def cache(self) -> str | None:
        return self.headers.get("X-Cache")


@dataclass
class Upstream:
    """What the upstream answers, per path: ``answer(path, body=..., status=..., headers=...)`` or
    a handler; every request it receives is recorded in ``seen``. While ``gate`` is set and not
    open, requests wait for it."""

    answers: dict = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    gate: asyncio.Event | None = None
    url: str = ""
    server: object = None

    def answer(self, path: str, body: bytes | str = b"ok", status: int = 200,
               headers: dict[str, str] | list[tuple[str, str]] | None = None) -> None:
        self.answers[path] = (status, headers or {}, body.encode() if isinstance(body, str) else body)

    def handler(self, path: str, function: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]) -> None:
        self.answers[path] = function

    def hits(self, path: str | None = None) -> int:
        return sum(1 for seen in self.seen if path is None or seen.path_qs.split("?")[0] == path)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.seen.append(Seen(request.method, request.path_qs, dict(request.headers)))
        if self.gate is not None:
            await self.gate.wait()
        spec = self.answers.get(request.path)
        if spec is None:
            return web.Response(status=404, text="not scripted")
        if callable(spec):
            return await spec(request)
        status, headers, body = spec
        return web.Response(status=status, body=body, headers=headers)


class CacheGateway:
    """A gateway with the cache, and its upstream."""

    def __init__(self, running, upstream: Upstream) -> None:
        self.running = running
        self.upstream = upstream

    @property
    def gateway(self):
        return self.running.gateway

    async def get(self, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> Reply:
        async with self.running.client.request(method, path, headers=headers, allow_redirects=False) as response:
            return Reply(response.status, response.headers, await response.read())

    def metric(self, name: str, **labels: str) -> float:
        return self.running.metric(name, **labels)

    async def wait_for_metric(self, name: str, value: float, timeout: float = 10.0, **labels: str) -> None:
        await async_wait_until(lambda: self.metric(name, **labels) >= value, timeout)


async def async_wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


def gateway_config(upstream_url: str, plugin: str = "", *, route: str = "", extra: str = "", server: str = "") -> str:
    return textwrap.dedent(f"""
        [server]
        {textwrap.dedent(server).strip()}
        [log]
        access = false
        [[upstreams]]
        name = "app"
        targets = [{{ url = "{upstream_url}" }}]
        [[routes]]
        name = "all"
        prefix = "/"
        upstream = "app"
        {textwrap.dedent(route).strip()}
        [plugins.cache]
        {textwrap.dedent(plugin).strip()}
        {textwrap.dedent(extra).strip()}
    """)


@pytest.fixture
async def upstream(aiohttp_raw_server) -> Upstream:
    scripted = Upstream()
    scripted.server = await aiohttp_raw_server(scripted.handle)
    scripted.url = str(scripted.server.make_url("")).rstrip("/")
    return scripted


@pytest.fixture
def cache_gateway(plugway_gateway, upstream):
    """Factory: ``await cache_gateway(plugin_keys, route=..., extra=...)`` -> ``CacheGateway``."""

    async def start(plugin: str = "", *, route: str = "", extra: str = "", server: str = "") -> CacheGateway:
        running = await plugway_gateway(gateway_config(upstream.url, plugin, route=route, extra=extra, server=server))
        return CacheGateway(running, upstream)

    return start


@pytest.fixture
def wait_until_async():
    return async_wait_until


@pytest.fixture
async def raw_get():
    """``await raw_get(port, path, headers)`` -> Reply, over a new connection (so that the kernel
    spreads requests over every worker of a cluster)."""

    async def get(port: int, path: str, headers: dict[str, str] | None = None) -> Reply:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            async with session.get(f"http://127.0.0.1:{port}{path}", headers=headers, allow_redirects=False) as response:
                return Reply(response.status, response.headers, await response.read())

    return get


def cluster_config(upstream_url: str, plugin: str = "", *, workers: int = 2, store: str = 'timeout = "2s"') -> str:
    """A configuration for ``plugway_process``: the cache on every route, ``workers`` workers."""
    store_table = f"[store]\n{textwrap.dedent(store)}"
    return gateway_config(upstream_url, plugin, server=f"workers = {workers}", extra=store_table)


@pytest.fixture
def cluster():
    """``cluster(upstream_url, plugin_keys, workers=2, store=...)`` -> configuration text."""
    return cluster_config


@pytest.fixture
async def scrape():
    """``await scrape(admin_port, name, **labels)`` -> a sample of /metrics (summed over workers)."""

    async def read(admin_port: int, name: str, **labels: str) -> float:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{admin_port}/metrics") as response:
                text = await response.text()
        selector = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
        sample = re.escape(f"{name}{{{selector}}}" if labels else name)
        match = re.search(rf"^{sample} ([0-9.e+-]+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    return read
