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
import importlib
import logging
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiodns

from .accesslog import AccessLog
from .admin import start_admin
from .config.model import GatewaySettings, ListenerSettings, StoreSettings
from .config.schema import ConfigErrors
from .context import RequestContext
from .errors import GatewayError
from .forwarding import FORWARDING, TrustedProxies
from .garbage import Collector, freeze_startup_objects
from .heartbeat import EXIT_BOOT_FAILED, WorkerChannel
from .logs import setup_logging
from .metrics import NO_ROUTE, GatewayMetrics
from .plugins import PluginSet, load_plugins
from .requesthead import HeadRules
from .routing import Router, compile_route
from .server import CONNECTION_REFUSED, ListenerServer, require_c_parser
from .store import InProcessStore, Store
from .store.local import LocalStore
from .tls import listener_contexts
from .upstream import Upstream
from .upstream.discovery import Discovery
from .upstream.health import HealthChecker, watch_health
from .upstream.resolver import Resolver

log = logging.getLogger("plugway.worker")
DISCOVERY_WAIT_SECONDS = 5.0
DRAIN_IDLE_SECONDS = 1.0
REFUSAL_LOG_INTERVAL = 1.0
ACCEPT_SETTLE_SECONDS = 0.05


class Gateway:
    """The gateway as one worker runs it, for one configuration.

    What plugins use (``ctx.gateway`` in request hooks, the argument of
    ``worker_started``): ``settings``, ``loop``, ``metrics`` (create your
    metrics with ``metrics.counter/histogram/gauge`` so that they are exported
    in every mode), ``state`` (a dict for per-worker plugin state, keyed by
    plugin name; module globals would be shared by gateways in one test
    process), ``spawn`` (background tasks), ``upstream(name)``.
    """

    def __init__(
        self, settings: GatewaySettings, plugins: PluginSet, loop: asyncio.AbstractEventLoop,
        store_path: str | None = None,
    ) -> None:
        self.settings = settings
        self.plugins = plugins
        self.loop = loop
        self.metrics = GatewayMetrics()
        self.access_log = AccessLog(loop, settings.log.access_path) if settings.log.access else None
        self.status_file: Path | None = None
        server = settings.server
        self.trusted_proxies = TrustedProxies(server.trusted_proxies)
        self.request_id_header_name = server.request_id_header
        self.request_id_header = server.request_id_header.encode()
        self.dropped_request_headers = FORWARDING | {self.request_id_header.lower()} | {
            name.lower().encode() for name in server.identity_headers
        }
        self.head_rules = HeadRules(frozenset(server.methods), server.max_header_total)
        self.connections = 0
        self.connections_by_ip: dict[str, int] = {}
        self.resolver = Resolver(loop)
        self.local_store, self.store = _stores(settings.store, store_path)
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
        self.state: dict[str, Any] = {}
        # Plugins add functions name -> dict of extra fields for the admin /upstreams view.
        self.upstream_annotations: list[Callable[[str], dict[str, Any]]] = []
        self._tasks: set[asyncio.Task] = set()
        self._refusals_logged: dict[str, tuple[float, int]] = {}  # reason -> (last logged, unlogged since)
        self._discoveries: list[Discovery] = []

    def admit_connection(self, peer_ip: str) -> bytes | None:
        """Count a new client connection, or the 503 to answer it with when over a cap."""
        server = self.settings.server
        if self.connections >= server.max_connections:
            self.refused(peer_ip, "max_connections")
            return CONNECTION_REFUSED
        per_ip = self.connections_by_ip.get(peer_ip, 0)
        if server.max_connections_per_ip and per_ip >= server.max_connections_per_ip:
            self.refused(peer_ip, "max_connections_per_ip")
            return CONNECTION_REFUSED
        self.connections += 1
        self.connections_by_ip[peer_ip] = per_ip + 1
        return None

    def connection_closed(self, peer_ip: str) -> None:
        self.connections -= 1
        remaining = self.connections_by_ip[peer_ip] - 1
        if remaining:
            self.connections_by_ip[peer_ip] = remaining
        else:
            del self.connections_by_ip[peer_ip]

    def refused(self, peer_ip: str, reason: str) -> None:
        """A connection turned away before any request: counted, and logged at most once a second
        per reason (with how many went unlogged), so a client reconnecting in a loop cannot flood
        the log."""
        self.metrics.connections_refused.labels(reason).inc()
        now = self.loop.time()
        logged_at, unlogged = self._refusals_logged.get(reason, (-REFUSAL_LOG_INTERVAL, 0))
        if now - logged_at < REFUSAL_LOG_INTERVAL:
            self._refusals_logged[reason] = (logged_at, unlogged + 1)
            return
        self._refusals_logged[reason] = (now, 0)
        more = f" (and {unlogged} more since the last such line)" if unlogged else ""
        log.info("refused a connection from %s: %s%s", peer_ip, reason, more,
                 extra={"reason": reason, "unlogged": unlogged})

    def reopen_logs(self) -> None:
        if self.access_log is not None:
            self.access_log.reopen()

    def plugin_settings(self, name: str) -> dict[str, Any]:
        """Plugin ``name``'s parsed settings on each route it is enabled on: {route name: settings}.
        Routes without a table of their own share one object, the global settings."""
        return dict(self.plugins.get(name).route_settings)

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
        if ctx.upstream is not None and ctx.error is not None and ctx.error.status >= 500:
            self.metrics.upstream_failed(ctx.upstream.name, ctx.error.code)  # also after the head (a stalled body)
        if self.access_log is not None:
            self.access_log.record(ctx, seconds)

    async def start_upstreams(self, runs_health_checks: bool) -> None:
        """Resolve discovered targets (waiting up to DISCOVERY_WAIT_SECONDS) and start the
        background work: re-resolution, health checks (one worker per host), health views."""
        upstreams = list(self.upstreams.values())
        for upstream in upstreams:
            if not upstream.discovered:
                continue
            discovery = Discovery(upstream)
            self._discoveries.append(discovery)
            try:
                async with asyncio.timeout(DISCOVERY_WAIT_SECONDS):
                    await discovery.resolve_once()
            except (TimeoutError, aiodns.error.DNSError) as exc:
                log.warning("no targets resolved yet for upstream %s: %s", upstream.name, exc)
            self.spawn(discovery.run())
        if runs_health_checks:
            self.spawn(HealthChecker(upstreams, self.local_store).run())
        self.spawn(watch_health(upstreams, self.local_store))

    async def start_plugins(self) -> None:
        for started in self.plugins.lifecycle("worker_started"):
            result = started(gateway=self)
            if result is not None and hasattr(result, "__await__"):
                await result

    async def drain_plugins(self) -> None:
        for draining in self.plugins.lifecycle("worker_draining"):
            try:
                result = draining(gateway=self)
                if result is not None and hasattr(result, "__await__"):
                    await result
            except Exception:
                log.exception("a plugin failed to start draining")

    async def stop_plugins(self) -> None:
        for stopping in self.plugins.lifecycle("worker_stopping"):
            try:
                result = stopping(gateway=self)
                if result is not None and hasattr(result, "__await__"):
                    await result
            except Exception:
                log.exception("a plugin failed to stop cleanly")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for discovery in self._discoveries:
            discovery.close()
        for upstream in self.upstreams.values():
            upstream.close()
        self.resolver.close()
        await self.store.close()
        if self.local_store is not self.store:
            await self.local_store.close()
        if self.access_log is not None:
            self.access_log.flush()


class Worker:
    """Serves one configuration on given sockets until SIGTERM/SIGINT (graceful) or SIGQUIT (at once)."""

    def __init__(
        self,
        settings: GatewaySettings,
        listeners: list[tuple[socket.socket, ListenerSettings]],
        admin_socket: socket.socket | None,
        *,
        plugins: PluginSet | None = None,
        on_ready: Callable[[Gateway], None] | None = None,
        handle_signals: bool = True,
        channel: WorkerChannel | None = None,
        request_limit: int = 0,
        status_file: Path | None = None,
        store_path: str | None = None,
        runs_health_checks: bool = True,
        tls_contexts: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        # Built by the supervisor before forking (shared ticket keys), else here.
        self._tls_contexts = tls_contexts if tls_contexts is not None else listener_contexts(
            listener for _, listener in listeners)
        self._store_path = store_path
        self._runs_health_checks = runs_health_checks
        self.listeners = listeners
        self.admin_socket = admin_socket
        self._plugins = plugins
        self._on_ready = on_ready
        self._handle_signals = handle_signals
        self._channel = channel
        self._request_limit = request_limit
        self._status_file = status_file
        self._stop: asyncio.Event | None = None
        self._immediate = False
        self.gateway: Gateway | None = None

    def run(self) -> None:
        _install_uvloop()
        asyncio.run(self.serve())

    async def serve(self) -> None:
        require_c_parser()
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self._handle_signals:  # before the access log is opened, so that no rotation is missed
            loop.add_signal_handler(signal.SIGUSR1, self._reopen_logs)
        plugins = self._plugins or load_plugins(self.settings)
        gateway = self.gateway = Gateway(self.settings, plugins, loop, self._store_path)
        gateway.status_file = self._status_file
        await gateway.store.connect()
        await gateway.start_upstreams(self._runs_health_checks)
        await gateway.start_plugins()
        servers = [await self._listen(gateway, sock, listener) for sock, listener in self.listeners]
        admin = await start_admin(gateway, self.admin_socket) if self.admin_socket is not None else None
        if self._handle_signals:
            for signum, immediate in ((signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGQUIT, True)):
                loop.add_signal_handler(signum, self.stop, immediate)
        worker_process = self._channel is not None  # not a gateway inside a test
        if worker_process:
            freeze_startup_objects()
        server = self.settings.server
        collector = Collector(gateway.metrics, freeze_after=server.gc_freeze_pause if worker_process else 0.0,
                              thaw_interval=server.gc_thaw_interval)
        collector.install()
        gateway.ready = True
        if self._on_ready is not None:
            self._on_ready(gateway)
        if worker_process:
            self._channel.send("ready")
            gateway.spawn(self._heartbeat(gateway, collector))
        await self._stop.wait()
        await self._drain(gateway, servers)
        collector.remove()
        gateway.metrics.flush()  # what the last second's requests added, before the process goes
        if admin is not None:
            await admin.cleanup()
        await gateway.stop_plugins()
        await gateway.close()

    async def _heartbeat(self, gateway: Gateway, collector: Collector) -> None:
        """Tell the supervisor this event loop is alive; ask to be recycled past the limits; thaw
        the frozen objects when it is time (gateway/garbage.py)."""
        server = gateway.settings.server
        interval = min(1.0, server.worker_timeout / 4)
        parent = os.getppid()
        recycling = False
        while True:
            await asyncio.sleep(interval)
            if os.getppid() != parent:
                log.error("the supervisor is gone: stopping")
                self.stop()
                return
            collector.thaw_when_due()
            gateway.metrics.flush()
            gateway.metrics.in_flight.set(gateway.in_flight)
            rss = _rss_bytes()
            self._channel.send("beat", requests=gateway.requests_served, rss=rss)
            if recycling or gateway.draining:
                continue
            if self._request_limit and gateway.requests_served >= self._request_limit:
                recycling = True
                self._channel.send("recycle", reason="max_requests")
            elif server.max_memory and rss > server.max_memory:
                recycling = True
                self._channel.send("recycle", reason="max_memory")

    def _reopen_logs(self) -> None:
        if self.gateway is not None:
            self.gateway.reopen_logs()

    def stop(self, immediate: bool = False) -> None:
        self._immediate = self._immediate or immediate
        if self._stop is not None:
            self._stop.set()

    async def _listen(
        self, gateway: Gateway, sock: socket.socket, listener: ListenerSettings,
    ) -> tuple[asyncio.Server, ListenerServer]:
        server = gateway.settings.server
        handler = ListenerServer(
            gateway, listener,
            keepalive_timeout=server.keepalive_timeout,
            max_line_size=server.max_request_line,
            max_field_size=server.max_header_size,
            max_headers=server.max_headers,
            auto_decompress=False,
            access_log=None,
            lingering_time=2.0,
        )
        context = self._tls_contexts.get(listener.address)
        serving = await gateway.loop.create_server(
            handler, sock=sock, backlog=server.backlog, ssl=context,
            ssl_handshake_timeout=server.client_header_timeout if context else None,
        )
        return serving, handler

    async def _drain(self, gateway: Gateway, servers: list[tuple[asyncio.Server, ListenerServer]]) -> None:
        gateway.metrics.flush()  # what was served before the stop: in every scrape from now on
        gateway.draining = True
        gateway.ready = False
        loop = gateway.loop
        if not _is_uvloop(loop):
            # asyncio's Server.close() races with connections it is accepting: stop reading the
            # listeners first and let accepted connections settle (research: 0 resets this way).
            for listener, _ in servers:
                for sock in listener.sockets:
                    _stop_reading(loop, sock)
            await asyncio.sleep(ACCEPT_SETTLE_SECONDS)
        # uvloop accepts inside libuv (remove_reader does not stop it) and hands each accepted
        # connection over at once, so closing is immediate there. The supervisor keeps each socket
        # and its accept queue open for the slot's next worker either way.
        for listener, _ in servers:
            listener.close()
        if self._channel is not None:
            self._channel.send("closed")  # the supervisor reports a reload done only after this
        await gateway.drain_plugins()
        deadline = loop.time() + gateway.settings.server.graceful_timeout
        if not self._immediate:
            idle_until = loop.time() + DRAIN_IDLE_SECONDS
            while loop.time() < idle_until and any(handler.connections or handler.pending for _, handler in servers):
                await asyncio.sleep(0.05)
        for _, handler in servers:
            handler.pre_shutdown()
        # aiohttp reads a timeout of 0 as "no timeout": cut immediately with a tiny positive one.
        remaining = 0.001 if self._immediate else max(deadline - loop.time(), 0.001)
        await asyncio.gather(*(handler.shutdown(remaining) for _, handler in servers))


def run_worker_process(
    settings: GatewaySettings,
    listeners: list[tuple[socket.socket, ListenerSettings]],
    admin_socket: socket.socket | None,
    channel_fd: int,
    request_limit: int,
    status_file: Path,
    store_path: str,
    runs_health_checks: bool,
    tls_contexts: dict[str, Any],
) -> int:
    """The body of a forked worker process; returns its exit status."""
    setup_logging(settings.log.level)
    channel = WorkerChannel(channel_fd)
    importlib.invalidate_caches()  # see plugins upgraded since the supervisor started
    try:
        plugins = load_plugins(settings)
    except ConfigErrors as exc:
        channel.send("failed", message="; ".join(str(error) for error in exc.errors))
        return EXIT_BOOT_FAILED
    worker = Worker(
        settings, listeners, admin_socket, plugins=plugins, channel=channel, request_limit=request_limit,
        status_file=status_file, store_path=store_path, runs_health_checks=runs_health_checks,
        tls_contexts=tls_contexts,
    )
    try:
        worker.run()
    except Exception as exc:
        log.exception("worker failed")
        if worker.gateway is None or not worker.gateway.ready:
            channel.send("failed", message=f"{type(exc).__name__}: {exc}")
            return EXIT_BOOT_FAILED
        return 1
    return 0




def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _stores(settings: StoreSettings, store_path: str | None) -> tuple[Store, Store]:
    """(host-local store, configured store): the store process when a supervisor runs one, else in-process."""
    if store_path is not None:
        local: Store = LocalStore(store_path, settings.timeout)
    else:
        local = InProcessStore(settings.max_keys, settings.max_bytes)
    if settings.backend == "redis":
        from .store.redis import RedisStore
        return local, RedisStore(settings)
    return local, local


def _is_uvloop(loop: asyncio.AbstractEventLoop) -> bool:
    return type(loop).__module__.startswith("uvloop")


def _stop_reading(loop: asyncio.AbstractEventLoop, sock: Any) -> None:
    """Stop accepting on a listening socket without closing it (asyncio's selector loops)."""
    try:
        loop.remove_reader(sock.fileno())
    except (NotImplementedError, ValueError, OSError):
        pass


def _install_uvloop() -> None:
    """uvloop when installed, unless PLUGWAY_EVENT_LOOP=asyncio asks for the standard loop."""
    if os.environ.get("PLUGWAY_EVENT_LOOP") == "asyncio":
        return
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
