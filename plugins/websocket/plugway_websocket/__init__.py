"""WebSocket proxying for Plugway routes (see README.md for every setting and the semantics).

The handshake is a request like any other until this plugin's ``on_request`` (priority 600):
auth, RBAC and rate limits have already passed or refused it with their HTTP error. Here the
handshake is checked (400/426), then the worker's state (503 while draining), the ``Origin``
(403) and the connection caps (503 per worker, 429 per consumer). The request is then prepared
for the upstream as the core would prepare it (forwarding headers, request id, and the
``before_upstream`` hooks of the plugins that already saw it, such as auth's consumer headers),
the upstream's handshake is made first, and only its 101 makes the gateway answer the client
with 101 and the subprotocol the upstream chose. Any upstream failure is an HTTP error
(502, 504), never a tunnel. The connection is then relayed (``relay.py``) until it closes, and
the plugin returns ``gateway.Upgraded()``: the core writes nothing more and logs one line.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway import Duration, PluginDeclaration, Rate, Response, Size, Upgraded, hookimpl, setting

from .clientside import ClientSocket
from .errors import Draining, OriginNotAllowed, UpgradeRequired
from .handshake import OriginRule, check_allowed_origin, check_handshake, relayed_response_headers, wants_websocket
from .limits import Connections, MessageRate, consumer_key
from .relay import Relay
from .upstreamside import close_quietly, forget_handshake, open_upstream

log = logging.getLogger("plugway.websocket")
NAME = "websocket"


@dataclass(frozen=True)
class WebSocketSettings:
    allowed_origins: tuple[str, ...] = setting(
        (), doc='Origins that may open WebSockets: "https://app.example.com", "https://*.example.com", "null" '
                'or "*" (any); empty: only the gateway\'s own origin.',
    )
    require_origin: bool = setting(False, doc="Refuse handshakes without an Origin header (browser-only endpoints).")
    require_websocket: bool = setting(
        False, doc="Answer plain HTTP requests on the route with 426 instead of proxying them as HTTP.",
    )
    max_message_size: Size = setting(
        Size("1MiB"), doc="Largest message either way; a side sending a bigger one is closed with 1009.",
    )
    idle_timeout: Duration = setting(
        Duration("5m"), doc="Close both sides with 1001 after this long without a message or ping either way (0s: never).",
    )
    heartbeat: Duration = setting(
        Duration("30s"), doc="Ping a side that sent nothing for this long; no pong within half of it ends it (0s: off).",
    )
    handshake_timeout: Duration = setting(
        Duration("10s"), doc="Time for the upstream to accept the handshake, connection included (504 beyond it).",
    )
    close_timeout: Duration = setting(Duration("5s"), doc="Time a side gets to answer a close frame before it is cut.")
    max_connections_per_worker: int = setting(10000, doc="Open WebSockets per worker process; more get 503 (0: no cap).")
    max_connections_per_consumer: int = setting(
        0, doc="Open WebSockets per consumer (else per client address) in each worker; more get 429 (0: no cap).",
    )
    message_rate: Rate | None = setting(
        None, doc='Messages a client may send per connection, as "20/s"; beyond it the connection closes with 1008.',
    )
    message_burst: int = setting(0, doc="Messages a client may send at once above message_rate (0: the rate's count).")
    drain_timeout: Duration = setting(
        Duration("10s"), doc="When the worker drains (reload, stop), close its WebSockets with 1001 after this long.",
    )

    def validate(self):
        for index, entry in enumerate(self.allowed_origins):
            try:
                check_allowed_origin(entry)
            except ValueError as exc:
                yield f"allowed_origins[{index}]", str(exc)
        if self.max_message_size < 1:
            yield "max_message_size", "must be at least 1B"
        if self.close_timeout <= 0 or self.handshake_timeout <= 0:
            yield "close_timeout", "close_timeout and handshake_timeout must be longer than zero"
        if min(self.max_connections_per_worker, self.max_connections_per_consumer, self.message_burst) < 0:
            yield "max_connections_per_worker", "connection caps and message_burst must be 0 or more"

    def validate_with(self, gateway_settings: Any):
        graceful = gateway_settings.server.graceful_timeout
        if self.drain_timeout >= graceful:
            yield "drain_timeout", (f"must be below server.graceful_timeout ({Duration(graceful)}), so that WebSockets "
                                    "are closed with 1001 before the worker stops")

    @functools.cached_property
    def origin_rule(self) -> OriginRule:
        return OriginRule(self.allowed_origins, self.require_origin)


@dataclass
class WorkerState:
    """This worker's WebSockets, its client session towards upstreams, and the plugin's metrics."""

    session: aiohttp.ClientSession
    metrics: Any
    relays: dict[Relay, float] = field(default_factory=dict)  # open connection -> its drain_timeout
    connections: Connections = field(default_factory=Connections)
    draining_since: float | None = None
    tick: float = 1.0  # how often the sweeper visits the relays: a quarter of the shortest timeout, at most 1 s
    sweeper: asyncio.Task | None = None
    earlier_steps: dict[str, tuple] = field(default_factory=dict)


@dataclass(frozen=True)
class Metrics:
    connections: Any
    messages: Any
    bytes: Any
    closes: Any
    refusals: Any


@hookimpl
def declare_plugin():
    return PluginDeclaration(settings=WebSocketSettings, priority=600)


@hookimpl
async def worker_started(gateway):
    metrics = gateway.metrics
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True, ttl_dns_cache=10),
        cookie_jar=aiohttp.DummyCookieJar(),  # one client session serves every client: it must keep no cookies
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        auto_decompress=False,
        trust_env=False,
        timeout=aiohttp.ClientTimeout(total=None),
    )
    state = gateway.state[NAME] = WorkerState(session=session, metrics=Metrics(
        connections=metrics.gauge("plugway_websocket_connections", "Open proxied WebSocket connections.", ("route",)),
        messages=metrics.counter("plugway_websocket_messages_total",
                                 "Messages relayed, by route and the side that sent them.", ("route", "direction"),
                                 per_request=True),
        bytes=metrics.counter("plugway_websocket_bytes_total",
                              "Message payload bytes relayed, by route and the side that sent them.",
                              ("route", "direction"), per_request=True),
        closes=metrics.counter("plugway_websocket_closes_total",
                               "Closed WebSockets, by route and the close code exchanged with the client.",
                               ("route", "code")),
        refusals=metrics.counter("plugway_websocket_handshake_refusals_total",
                                 "WebSocket handshakes answered with an error, by route and error code.",
                                 ("route", "reason")),
    ))
    state.sweeper = gateway.loop.create_task(_sweep(state))


@hookimpl
def worker_draining(gateway):
    state = gateway.state.get(NAME)
    if state is not None:
        if state.relays:  # logged first: its time is no later than the drain's start
            log.info("draining: %d open WebSockets get 1001 going away at their routes' drain_timeout",
                     len(state.relays))
        state.draining_since = gateway.loop.time()


@hookimpl
async def worker_stopping(gateway):
    state = gateway.state.get(NAME)
    if state is None:
        return
    state.sweeper.cancel()
    closing = [relay.going_away("going away") for relay in state.relays]
    if closing:
        await asyncio.wait(closing, timeout=1.0)
    await state.session.close()


@hookimpl
async def on_request(ctx, settings):
    headers = ctx.request.headers
    if not wants_websocket(headers):
        if settings.require_websocket:
            raise UpgradeRequired()
        return None
    check_handshake(ctx.method, ctx.request.version, headers)
    state = ctx.gateway.state[NAME]
    if state.draining_since is not None:
        raise Draining()
    if not settings.origin_rule.allows(headers.get("Origin"), ctx.scheme, headers.get("Host")):
        raise OriginNotAllowed()
    key = consumer_key(ctx.consumer.id if ctx.consumer is not None else None, ctx.client_ip)
    state.connections.admit(key, settings.max_connections_per_worker, settings.max_connections_per_consumer)
    try:
        upstream_ws = await open_upstream(ctx, settings, state.session, state.earlier_steps, sys.modules[__name__])
        if isinstance(upstream_ws, Response):
            return upstream_ws  # an earlier plugin's before_upstream answered
        try:
            return await _serve(ctx, settings, state, upstream_ws)
        finally:
            ctx.target.in_flight -= 1
            if not upstream_ws.closed:
                await close_quietly(upstream_ws, settings.close_timeout)
    finally:
        state.connections.release(key)


@hookimpl
def after_response(ctx):
    if ctx.status != 101 and wants_websocket(ctx.request.headers):
        state = ctx.gateway.state.get(NAME)
        if state is not None:
            reason = ctx.error.code if ctx.error is not None else f"status_{ctx.status}"
            state.metrics.refusals.labels(ctx.route.name, reason).inc()


# --- the handshake -------------------------------------------------------------------------------


async def _serve(ctx, settings: WebSocketSettings, state: WorkerState, upstream_ws) -> Upgraded:
    """Answer the client with 101 and relay until both sides are closed."""
    client_ws = await _accept_client(ctx, settings, state, upstream_ws)
    rate = settings.message_rate
    relay = Relay(
        ctx, client_ws, upstream_ws, counters=_counters(state, ctx.route.name),
        rate=MessageRate(rate.count, rate.period, settings.message_burst) if rate is not None else None,
        idle_timeout=settings.idle_timeout, heartbeat=settings.heartbeat, close_timeout=settings.close_timeout,
    )
    metrics = state.metrics
    gauge = metrics.connections.labels(ctx.route.name)
    state.relays[relay] = settings.drain_timeout
    state.tick = min((state.tick, *(timeout / 4 for timeout in (settings.idle_timeout, settings.heartbeat,
                                                                   settings.drain_timeout) if timeout)))
    gauge.inc()
    try:
        await relay.run()
    finally:
        del state.relays[relay]
        gauge.dec()
        metrics.closes.labels(ctx.route.name, str(relay.close_code)).inc()
        ctx.bytes_in, ctx.bytes_out = relay.client.bytes, relay.upstream.bytes
        ctx.log.update(
            websocket_messages_in=relay.client.messages, websocket_messages_out=relay.upstream.messages,
            websocket_close=relay.close_code, websocket_upstream_close=relay.upstream.code or 1006,
            websocket_subprotocol=upstream_ws.protocol,
        )
    return Upgraded()


async def _accept_client(ctx, settings: WebSocketSettings, state: WorkerState, upstream_ws) -> ClientSocket:
    """The client's 101: the upstream's chosen subprotocol and its other headers, and the request id."""
    if state.draining_since is not None:
        raise Draining()
    id_header = ctx.gateway.request_id_header_name
    relayed = relayed_response_headers(upstream_ws._response.headers, id_header) + [(id_header, ctx.request_id)]
    forget_handshake(upstream_ws._response)
    protocol = upstream_ws.protocol
    client_ws = ClientSocket(
        relayed_headers=relayed, protocols=(protocol,) if protocol else (), timeout=settings.close_timeout,
        autoclose=False, autoping=False, compress=False, max_msg_size=settings.max_message_size, decode_text=False,
    )
    await client_ws.prepare(ctx.request)
    return client_ws


def _counters(state: WorkerState, route: str) -> dict:
    """Each side's (messages, bytes) series on this route (per-request metrics keep their series)."""
    metrics = state.metrics
    return {direction: (metrics.messages.labels(route, direction), metrics.bytes.labels(route, direction))
            for direction in ("client", "upstream")}


# --- timers --------------------------------------------------------------------------------------


async def _sweep(state: WorkerState) -> None:
    """Visit every relay of the worker about once a second (idle timeout, heartbeat) and, once the
    worker drains, close each with 1001 when its route's drain_timeout has passed."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(state.tick)
        now = loop.time()
        draining_since = state.draining_since
        drained = 0
        for relay, drain_timeout in list(state.relays.items()):
            if draining_since is not None and now >= draining_since + drain_timeout:
                drained += not relay.ending
                relay.going_away("going away")
            else:
                relay.check(now)
        if drained:
            log.info("drain_timeout reached: closing %d WebSockets with 1001 going away", drained)
