"""Misbehaving upstreams for the breaker's tests: raw asyncio servers on loopback, each doing
one thing wrong, and a healthy one that can be told to misbehave and recover.

- ``refusing``: a free port nobody listens on (connection refused).
- ``black_hole``: accepts and never answers.
- ``failing``: answers 500.
- ``slow``: answers 200 after a delay.
- ``dies_mid_body``: sends a Content-Length and half the body, then closes.
- ``switchable``: answers 200, or behaves like any of the above while ``mode`` says so;
  ``hits`` counts the requests it received.
"""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Awaitable, Callable

import pytest

from gateway.testing import free_port

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
ERROR = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\nerror"
HALF = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 500


class RawUpstream:
    """An HTTP/1.1 upstream on 127.0.0.1 written on asyncio streams, answering per ``mode``:
    ok, error (500), hole (never answers), slow (200 after ``delay``), held (200 once
    ``release`` is set), cut (half the body), refuse (the listener is closed: connections are refused)."""

    def __init__(self, mode: str = "ok", delay: float = 1.0) -> None:
        self.mode = mode
        self.delay = delay
        self.hits = 0
        self.release = asyncio.Event()
        self.port = 0
        self.server: asyncio.Server | None = None
        self.held: set[asyncio.StreamWriter] = set()
        self.handlers: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> RawUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def set_mode(self, mode: str) -> None:
        """Switch behaviour; "refuse" closes the listener, leaving it restarts it on the same port."""
        if mode == "refuse" and self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        elif mode != "refuse" and self.server is None:
            await self.start(self.port)
        self.mode = mode

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.held.add(writer)
        self.handlers.add(asyncio.current_task())
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                               if line.startswith(b"content-length:")), 0)
                if length:
                    await reader.readexactly(length)
                self.hits += 1
                mode = self.mode
                if mode == "hole":
                    await asyncio.Event().wait()
                if mode == "slow":
                    await asyncio.sleep(self.delay)
                if mode == "held":
                    await self.release.wait()
                writer.write(ERROR if mode == "error" else HALF if mode == "cut" else OK)
                await writer.drain()
                if mode == "cut":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.held.discard(writer)
            self.handlers.discard(asyncio.current_task())
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        handlers = list(self.handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


@pytest.fixture
async def raw_upstream() -> Callable[..., Awaitable[RawUpstream]]:
    """Factory: ``await raw_upstream("hole")`` -> a started ``RawUpstream`` (closed after the test)."""
    started: list[RawUpstream] = []

    async def start(mode: str = "ok", delay: float = 1.0) -> RawUpstream:
        upstream = await RawUpstream("ok", delay).start()
        started.append(upstream)
        await upstream.set_mode(mode)
        return upstream

    yield start
    for upstream in started:
        await upstream.close()


@pytest.fixture
def refusing_url() -> str:
    """A loopback port nobody listens on: connections to it are refused."""
    return f"http://127.0.0.1:{free_port()}"


def _breaker_config(targets: list[str], plugin: str = "", *, upstream: str = "", extra: str = "",
                    server: str = "", store: str = "", access_log: bool = False) -> str:
    target_list = ", ".join(f'{{ url = "{url}" }}' for url in targets)
    timeouts = "\n".join(f'{key} = "200ms"' for key in ("connect_timeout", "read_timeout") if key not in upstream)
    return textwrap.dedent(f"""
        [server]
        {textwrap.dedent(server).strip()}
        [store]
        {textwrap.dedent(store).strip()}
        [log]
        access = {"true" if access_log else "false"}
        [[upstreams]]
        name = "app"
        targets = [{target_list}]
        {timeouts}
        {textwrap.dedent(upstream).strip()}
        [[routes]]
        name = "api"
        prefix = "/api"
        upstream = "app"
        {textwrap.dedent(extra).strip()}
        [plugins.breaker]
        {textwrap.dedent(plugin).strip()}
    """)


@pytest.fixture
def breaker_config() -> Callable[..., str]:
    """``breaker_config(targets, plugin, upstream=, extra=, server=, store=, access_log=)``: one upstream "app"
    (200 ms timeouts, so that tests stay fast), one route "api" on /api, and the breaker
    enabled everywhere with ``plugin`` as its table; ``extra`` goes after the route."""
    return _breaker_config
