"""Fixtures of the websocket plugin's tests: a real WebSocket upstream, configurations, a client.

The client is the ``websockets`` library (written by nobody here); the upstream is an aiohttp
server whose behaviour is chosen by path (``wsupstream.py``). Helpers are fixtures, or modules
with names of their own (``wsupstream``, ``wsframes``), because several conftest.py files in one
run cannot be imported by name.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import connect
from wsupstream import PeakRss, ThreadedUpstream, UpstreamRecord, ws_handler


@pytest.fixture
async def ws_upstream(aiohttp_raw_server):
    """The upstream of ``ws_handler`` in the test's event loop; ``.record`` is what it saw, ``.base`` its URL."""
    record = UpstreamRecord()
    server = await aiohttp_raw_server(lambda request: ws_handler(request, record))
    server.record = record
    server.base = str(server.make_url("")).rstrip("/")
    return server


@pytest.fixture
def threaded_upstream():
    upstream = ThreadedUpstream().start()
    yield upstream
    upstream.stop()


def make_config(upstream: str, plugin: str = "", *, server: str = "", extra: str = "", route: str = "",
                upstream_options: str = "", access_log: bool = False) -> str:
    return textwrap.dedent(f"""
        [server]
        {textwrap.dedent(server)}
        [log]
        access = {"true" if access_log else "false"}
        [[upstreams]]
        name = "app"
        targets = [{{ url = "{upstream}" }}]
        {upstream_options}
        [[routes]]
        name = "ws"
        prefix = "/ws"
        strip_prefix = true
        upstream = "app"
        {textwrap.dedent(route)}
        [routes.plugins.websocket]
        {textwrap.dedent(plugin)}
    """) + textwrap.dedent(extra)


@pytest.fixture
def ws_config():
    """``ws_config(upstream_url, plugin_toml, server=..., extra=..., route=..., upstream_options=..., access_log=...)``:
    a route /ws (prefix stripped) -> the upstream "app", with the websocket plugin and ``plugin_toml`` as its settings."""
    return make_config


@pytest.fixture
def ws_connect():
    """``ws_connect(url, **options)``: the websockets client, with no proxy and no pings of its own."""

    def open_connection(url: str, **options: Any):
        options.setdefault("proxy", None)
        options.setdefault("ping_interval", None)
        options.setdefault("open_timeout", 10)
        options.setdefault("close_timeout", 5)
        return connect(url, **options)

    return open_connection


@pytest.fixture
def ws_url():
    """``ws_url(gateway, path)``: the ws:// URL of a path on a running gateway."""

    def url(gateway: Any, path: str) -> str:
        port = gateway.port
        return f"ws://127.0.0.1:{port}{path}"

    return url


async def handshake_status(ws_connect, url: str, **options: Any) -> tuple[int, dict]:
    """Only for refusals: the HTTP status and JSON body the handshake got."""
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        async with ws_connect(url, **options):
            pass
    response = refused.value.response
    return response.status_code, json.loads(response.body or b"{}")


@pytest.fixture
def peak_rss():
    """``with peak_rss(pid) as memory:`` ... ``memory.peak - memory.baseline``."""
    return PeakRss


@pytest.fixture
def eventually():
    """``await eventually(condition, timeout=10)``: poll until ``condition()`` holds, or fail the test."""

    async def wait(condition, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            if loop.time() > deadline:
                raise AssertionError(f"condition not met within {timeout}s")
            await asyncio.sleep(0.02)

    return wait


@pytest.fixture
def refused():
    """``await refused(ws_connect, url, **options)`` -> (status, JSON body) of a refused handshake."""
    return handshake_status
