"""pytest fixtures for plugin authors: a real gateway, in the test's event loop, on real sockets.

Installed with Plugway as a pytest plugin (entry point ``pytest11``), so a
plugin's test suite only needs ``pytest-aiohttp``::

    from aiohttp import web

    async def test_adds_header(plugway_gateway, aiohttp_raw_server):
        upstream = await aiohttp_raw_server(lambda request: web.Response(text="hi"))
        gateway = await plugway_gateway(f'''
            [[upstreams]]
            name = "app"
            targets = [{{ url = "{upstream.make_url('')}" }}]
            [[routes]]
            name = "all"
            prefix = "/"
            upstream = "app"
            [plugins.myplugin]
            greeting = "hello"
        ''', plugins={"myplugin": myplugin})
        async with gateway.client.get("/") as response:
            assert response.headers["X-Greeting"] == "hello"

``plugins`` registers plugin modules under a name without installing them;
installed plugins are found by entry point as in production. Everything
started is stopped at the end of the test.
"""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from . import config
from .plugins import load_plugins
from .sockets import bind_listener
from .worker import Gateway, Worker


class RunningGateway:
    """A gateway started by ``plugway_gateway``: where it listens and how to talk to it."""

    def __init__(self, worker: Worker, task: asyncio.Task, port: int, admin_port: int) -> None:
        self.worker = worker
        self.task = task
        self.port = port
        self.admin_port = admin_port
        self.url = f"http://127.0.0.1:{port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.client = aiohttp.ClientSession(base_url=self.url, auto_decompress=False)

    @property
    def gateway(self) -> Gateway:
        return self.worker.gateway

    async def stop(self) -> None:
        await self.client.close()
        self.worker.stop()
        await self.task


async def start_gateway(config_text: str, plugins: dict[str, Any] | None = None) -> RunningGateway:
    settings = config.loads(textwrap.dedent(config_text))
    plugin_set = load_plugins(settings, extra=plugins)
    listener = bind_listener("127.0.0.1:0", backlog=128, reuse_port=False)
    admin = bind_listener("127.0.0.1:0", backlog=128, reuse_port=False)
    ready = asyncio.get_running_loop().create_future()
    worker = Worker(
        settings, [(listener, "http")], admin, plugins=plugin_set, handle_signals=False,
        on_ready=lambda gateway: ready.set_result(None),
    )
    task = asyncio.create_task(worker.serve())
    await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # start-up failed: raise its error here
    return RunningGateway(worker, task, listener.getsockname()[1], admin.getsockname()[1])


@pytest.fixture
async def plugway_gateway() -> AsyncIterator[Callable[..., Awaitable[RunningGateway]]]:
    """Factory: ``await plugway_gateway(toml_text, plugins={name: module})`` -> ``RunningGateway``."""
    started: list[RunningGateway] = []

    async def start(config_text: str, plugins: dict[str, Any] | None = None) -> RunningGateway:
        running = await start_gateway(config_text, plugins)
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        await running.stop()
