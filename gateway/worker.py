"""One worker: the gateway's state in one process, its event loop, and its drain.

``Gateway`` is everything a worker knows at run time (routes with their
chains, upstreams with their pools, metrics, the access log); it is built
once per configuration. ``Worker`` runs a ``Gateway`` on listening sockets it
is given, until it is told to stop.

The stop sequence drops no request (measured in the research for this
design): stop accepting by removing the listening socket from the event loop
first and giving already-accepted connections 50 ms to attach, then close the
listener (this process's copy only: in cluster mode the supervisor keeps the
socket), answer every further request with ``Connection: close`` for up to
``DRAIN_IDLE_SECONDS`` so keep-alive clients move on cleanly, then close idle
connections and wait for in-flight requests until ``graceful_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from .accesslog import AccessLog
from .admin import start_admin
from .config.model import GatewaySettings
from .context import RequestContext
from .errors import GatewayError
from .forwarding import FORWARDING, TrustedProxies
from .metrics import NO_ROUTE, GatewayMetrics
from .plugins import PluginSet, load_plugins
from .routing import Router, compile_route
from .server import ListenerServer
from .upstream import Upstream
from .upstream.resolver import Resolver

log = logging.getLogger("plugway.worker")
DRAIN_IDLE_SECONDS = 1.0
ACCEPT_SETTLE_SECONDS = 0.05


class Gateway:
    """The gateway as one worker runs it, for one configuration."""

    def __init__(self, settings: GatewaySettings, plugins: PluginSet, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.plugins = plugins
        self.loop = loop
        self.metrics = GatewayMetrics()
        self.access_log = AccessLog(loop) if settings.log.access else None
        server = settings.server
        self.trusted_proxies = TrustedProxies(server.trusted_proxies)
        self.request_id_header_name = server.request_id_header
        self.request_id_header = server.request_id_header.encode()
        self.dropped_request_headers = FORWARDING | {self.request_id_header.lower()}
        self.resolver = Resolver(loop)
        self.upstreams = {u.name: Upstream(u, loop, self.resolver) for u in settings.upstreams}
        routes = []
        for index, route_settings in enumerate(settings.routes):
            route = compile_route(route_settings, index)
            route.chain = plugins.chain(route_settings.name)
            route.upstream = self.upstreams[route_settings.upstream]
            routes.append(route)
        self.router = Router(routes)
        self.in_flight = 0
        self.requests_served = 0
        self.draining = False
        self.ready = False
        self._tasks: set[asyncio.Task] = set()

    def upstream(self, name: str) -> Upstream:
        try:
            return self.upstreams[name]
        except KeyError:
            raise GatewayError(f'a plugin chose the unknown upstream "{name}"') from None

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run ``coroutine`` in the background, keeping a reference until it ends."""
        task = self.loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def request_finished(self, ctx: RequestContext, seconds: float) -> None:
        self.requests_served += 1
        route = ctx.route.name if ctx.route is not None else NO_ROUTE
        self.metrics.request_done(route, ctx.method, ctx.status, seconds)
        if ctx.upstream_seconds is not None:
            self.metrics.upstream_answered(ctx.upstream.name, ctx.upstream_seconds)
        elif ctx.upstream is not None and ctx.error is not None and ctx.error.status >= 500:
            self.metrics.upstream_failed(ctx.upstream.name, ctx.error.code)
        if self.access_log is not None:
            self.access_log.record(ctx, seconds)

    async def start_plugins(self) -> None:
        for started in self.plugins.lifecycle("worker_started"):
            result = started(gateway=self)
            if result is not None and hasattr(result, "__await__"):
                await result

    async def stop_plugins(self) -> None:
        for stopping in self.plugins.lifecycle("worker_stopping"):
            try:
                result = stopping(gateway=self)
                if result is not None and hasattr(result, "__await__"):
                    await result
            except Exception:
                log.exception("a plugin failed to stop cleanly")

    def close(self) -> None:
        for upstream in self.upstreams.values():
            upstream.close()
        self.resolver.close()
        if self.access_log is not None:
            self.access_log.flush()


class Worker:
    """Serves one configuration on given sockets until SIGTERM/SIGINT (graceful) or SIGQUIT (at once)."""

    def __init__(
        self,
        settings: GatewaySettings,
        listeners: list[tuple[socket.socket, str]],
        admin_socket: socket.socket | None,
        *,
        plugins: PluginSet | None = None,
        on_ready: Callable[[Gateway], None] | None = None,
        handle_signals: bool = True,
    ) -> None:
        self.settings = settings
        self.listeners = listeners
        self.admin_socket = admin_socket
        self._plugins = plugins
        self._on_ready = on_ready
        self._handle_signals = handle_signals
        self._stop: asyncio.Event | None = None
        self._immediate = False
        self.gateway: Gateway | None = None

    def run(self) -> None:
        _install_uvloop()
        asyncio.run(self.serve())

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        plugins = self._plugins or load_plugins(self.settings)
        gateway = self.gateway = Gateway(self.settings, plugins, loop)
        await gateway.start_plugins()
        servers = [await self._listen(gateway, sock, scheme) for sock, scheme in self.listeners]
        admin = await start_admin(gateway, self.admin_socket) if self.admin_socket is not None else None
        if self._handle_signals:
            for signum, immediate in ((signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGQUIT, True)):
                loop.add_signal_handler(signum, self.stop, immediate)
        gateway.ready = True
        if self._on_ready is not None:
            self._on_ready(gateway)
        await self._stop.wait()
        await self._drain(gateway, servers)
        if admin is not None:
            await admin.cleanup()
        await gateway.stop_plugins()
        gateway.close()

    def stop(self, immediate: bool = False) -> None:
        self._immediate = self._immediate or immediate
        if self._stop is not None:
            self._stop.set()

    async def _listen(self, gateway: Gateway, sock: socket.socket, scheme: str) -> tuple[asyncio.Server, ListenerServer]:
        server = gateway.settings.server
        handler = ListenerServer(
            gateway, scheme,
            keepalive_timeout=server.keepalive_timeout,
            max_line_size=server.max_request_line,
            max_field_size=server.max_header_size,
            max_headers=server.max_headers,
            auto_decompress=False,
            access_log=None,
            lingering_time=2.0,
        )
        listener = await gateway.loop.create_server(handler, sock=sock, backlog=server.backlog)
        return listener, handler

    async def _drain(self, gateway: Gateway, servers: list[tuple[asyncio.Server, ListenerServer]]) -> None:
        gateway.draining = True
        gateway.ready = False
        loop = gateway.loop
        for listener, _ in servers:
            for sock in listener.sockets:
                _stop_reading(loop, sock)
        await asyncio.sleep(ACCEPT_SETTLE_SECONDS)
        for listener, _ in servers:
            listener.close()
        deadline = loop.time() + gateway.settings.server.graceful_timeout
        if not self._immediate:
            idle_until = loop.time() + DRAIN_IDLE_SECONDS
            while loop.time() < idle_until and any(handler.connections for _, handler in servers):
                await asyncio.sleep(0.05)
        for _, handler in servers:
            handler.pre_shutdown()
        remaining = 0.0 if self._immediate else max(deadline - loop.time(), 0.0)
        await asyncio.gather(*(handler.shutdown(remaining) for _, handler in servers))


def _stop_reading(loop: asyncio.AbstractEventLoop, sock: Any) -> None:
    """Stop accepting on a listening socket without closing it (asyncio's selector loops)."""
    try:
        loop.remove_reader(sock.fileno())
    except (NotImplementedError, ValueError, OSError):
        pass


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
