"""Every hook a Plugway plugin can implement, and its contract.

A plugin is a module (or any object) with functions marked ``@gateway.hookimpl``,
found through the ``plugway`` entry-point group or named by import path in the
configuration. Only plugins named in the configuration are loaded.

**The request protocol.** For each request the gateway canonicalises the path,
matches a route, and then runs the route's plugin chain, built once per
configuration (a route without plugins runs no plugin code at all):

1. ``on_request`` for each plugin on the route, highest priority first. A
   plugin may answer at once (return a ``Response`` or raise a
   ``GatewayError``): the remaining request hooks and the upstream are skipped.
2. ``before_upstream``, highest priority first: the last chance to change
   the outgoing request or pick another upstream.
3. The gateway sends the request to a target and waits for the response head.
   If that fails, ``on_error`` runs (highest priority first) and the first
   ``Response`` returned replaces the error.
4. ``on_response``, lowest priority first (the chain unwinds like an onion):
   change the status, headers or body, or replace the response. When a
   plugin answered in step 1, only plugins of higher priority than it see
   that answer here.
5. The response is written to the client.
6. ``after_response`` for every plugin on the route, once the client has the
   answer (or has gone away); for logging and accounting only.

**Arguments.** An implementation may accept any subset of a hook's arguments,
by name (pluggy's rule). ``settings`` is the plugin's own settings object for
the route being served: an instance of the class its ``declare_plugin``
returned, with the route's ``[routes.plugins.NAME]`` keys over the global
``[plugins.NAME]`` ones.

**Async.** Every hook of a request and of the worker lifecycle may be an
``async def`` or return an awaitable; the gateway awaits it. Do not block the
event loop: a worker serves every request on one thread.

**Order.** Plugins run by priority (higher first in the request phases), as
Kong does; ``priority = N`` in a plugin's table overrides the declared value.
pluggy's ``tryfirst``/``trylast`` are not used for ordering.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .context import RequestContext
    from .errors import GatewayError
    from .messages import OutgoingRequest, Response, UpstreamResponse, WebSocketMessage
    from .plugins import PluginDeclaration
    from .worker import Gateway

PROJECT = "plugway"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# --- Declaration --------------------------------------------------------------------------------


@hookspec
def declare_plugin() -> PluginDeclaration:
    """Say what the plugin's configuration looks like and where it runs.

    Called once per process, right after the plugin is loaded, before any
    configuration is checked (also by ``plugway check`` and ``plugway plugins``).

    Return a ``gateway.PluginDeclaration(settings=Cls, priority=N)``:
    ``Cls`` is a frozen dataclass whose fields are declared with
    ``gateway.setting`` (None if the plugin takes no settings); ``N`` orders
    the plugin among others (higher runs first in the request phases).
    Every plugin must implement this hook. It must not be async.

    Example: ``tests/sample_plugin/plugway_sample/__init__.py``.
    """


# --- Worker lifecycle ---------------------------------------------------------------------------


@hookspec
def worker_started(gateway: Gateway) -> None | Awaitable[None]:
    """Open what the plugin needs in this worker: pools, connections, caches.

    Called once in each worker process after its configuration is loaded and
    before it accepts connections. The worker reports itself ready only when
    every implementation has returned (or its awaitable has completed); an
    exception fails the worker's start-up, and a reload that needed it is
    reported as failed.

    :param gateway: the worker's ``Gateway``: ``gateway.settings`` (the core
        configuration), ``gateway.plugin_settings(name)`` (a plugin's parsed
        settings by route), ``gateway.store`` (shared state), ``gateway.state``
        (per-worker state, by plugin name), ``gateway.metrics``, ``gateway.loop``.

    The return value is ignored. May be async.

    Example: ``tests/sample_plugin/plugway_sample/__init__.py``.
    """


@hookspec
def worker_stopping(gateway: Gateway) -> None | Awaitable[None]:
    """Close what ``worker_started`` opened.

    Called once when the worker stops (graceful stop, reload or recycle),
    after in-flight requests have finished or the drain deadline has passed.
    Implementations run in reverse priority order; an exception is logged and
    does not stop the others.

    :param gateway: the same ``Gateway`` as in ``worker_started``.

    The return value is ignored. May be async.

    Example: ``tests/sample_plugin/plugway_sample/__init__.py``.
    """


@hookspec
def worker_draining(gateway: Gateway) -> None | Awaitable[None]:
    """The worker stops taking new connections (stop, reload, recycle); finish long-lived ones.

    Called once, right after the worker stops accepting and before it waits for in-flight
    requests (up to ``server.graceful_timeout``). Plugins that hold connections open for
    long (WebSockets, streams) should close them within their own deadline, before that
    timeout, so clients reconnect to the new workers.

    :param gateway: the worker's ``Gateway`` (``gateway.draining`` is now true).

    The return value is ignored. May be async; it is awaited before the drain goes on, so
    schedule long waits with ``gateway.spawn`` rather than awaiting them here.

    Example: ``tests/sample_plugin/plugway_sample/__init__.py``.
    """


@hookspec
def admin_routes(gateway: Gateway) -> list[tuple[str, str, Any]]:
    """Add endpoints to the admin API (revoking tokens, purging a cache...).

    Called once per worker, when the admin listener starts (after ``worker_started``).

    :param gateway: the worker's ``Gateway``.

    Return a list of ``(method, path, handler)``: ``handler`` is an aiohttp handler
    (``async def handler(request) -> web.Response``) and ``path`` should start with
    ``/<plugin name>/``. Every plugin endpoint requires the admin bearer token when
    ``admin.token_env`` is set. In cluster mode any worker may answer a call, so an
    endpoint that changes state must change it in ``gateway.store``. Must not be async.

    Example: ``tests/sample_plugin/plugway_sample/__init__.py``.
    """


@hookspec
def cli_commands(commands: Any) -> None:
    """Add subcommands to the ``plugway`` command (``plugway apikey new``...).

    Called when ``plugway`` is run with a subcommand the core does not have, with every
    installed plugin loaded (so never in the supervisor, which imports no plugin).

    :param commands: the ``argparse`` subparsers object; add a parser with
        ``commands.add_parser(name, help=...)`` and give it
        ``set_defaults(command=function)``, where ``function(args)`` returns the exit status.

    The return value is ignored. Must not be async.

    Example: ``tests/sample_plugin/plugway_sample/__init__.py``.
    """


# --- The request --------------------------------------------------------------------------------


@hookspec
def on_request(ctx: RequestContext, settings: Any) -> Response | None | Awaitable[Response | None]:
    """Decide about a request before anything is sent upstream (the access phase).

    Called once per request on routes where the plugin is enabled, after
    routing, highest priority first. ``Expect: 100-continue`` is answered
    only after every implementation has passed, so a refusal reaches the
    client before it sends the body.

    :param ctx: the ``RequestContext``; set ``ctx.consumer`` to identify the
        caller, ``ctx.state[...]`` to share data with later hooks.
    :param settings: the plugin's settings for this route.

    Return None to let the request continue, or a ``Response`` to answer it
    at once (for instance a 401 or 429); raising a ``GatewayError`` answers
    with that error's status and JSON body. May be async.

    Example: ``tests/sample_plugin/plugway_sample/__init__.py``.
    """


@hookspec
def before_upstream(ctx: RequestContext, settings: Any, outgoing: OutgoingRequest) -> Response | None | Awaitable[Response | None]:
    """Change the request about to be sent upstream (the upstream phase).

    Called once per request that passed every ``on_request``, highest
    priority first, before a target is chosen.

    :param ctx: the ``RequestContext``.
    :param settings: the plugin's settings for this route.
    :param outgoing: the ``OutgoingRequest``: change ``method``, ``path``,
        ``query``, ``headers``, the body (``set_body``) or the upstream
        (``upstream_name``).

    Return None to continue, or a ``Response`` to answer without contacting
    the upstream. May be async.

    Example: ``tests/sample_plugin/plugway_sample/__init__.py``.
    """


@hookspec
def on_error(ctx: RequestContext, settings: Any, error: GatewayError) -> Response | None | Awaitable[Response | None]:
    """Offer a fallback when the upstream could not give an answer.

    Called when sending the request or waiting for the response head failed
    (unreachable, timeout, invalid response, no target available), highest
    priority first, until one implementation returns a response.

    :param ctx: the ``RequestContext``.
    :param settings: the plugin's settings for this route.
    :param error: the ``GatewayError`` that would otherwise be sent.

    Return a ``Response`` to send instead of the error (a cached copy, a
    static fallback), or None to leave the error as it is. May be async.

    Example: ``tests/sample_plugin/plugway_sample/__init__.py``.
    """


@hookspec
def on_response(ctx: RequestContext, settings: Any, response: UpstreamResponse | Response) -> Response | None | Awaitable[Response | None]:
    """Change the response before it is written to the client (the response phase).

    Called once per response, lowest priority first. The response is the
    upstream's (``UpstreamResponse``, body still streaming) or one made by
    the gateway or a plugin (``Response``, including error responses).

    :param ctx: the ``RequestContext``.
    :param settings: the plugin's settings for this route.
    :param response: change ``status`` and ``headers`` in place; read the
        body with ``await response.read(limit)``, replace it with
        ``set_body(bytes)`` or transform it while it streams with
        ``wrap_body(async_generator_function)``.

    Return None to keep the (possibly changed) response, or a ``Response`` to
    send instead. May be async.

    Example: ``tests/sample_plugin/plugway_sample/__init__.py``.
    """


@hookspec
def after_response(ctx: RequestContext, settings: Any) -> None | Awaitable[None]:
    """Account for a request once it is over (the log phase).

    Called once per request on routes where the plugin is enabled, after the
    response was written or the client went away (``ctx.status`` is then
    499), in priority order. It cannot change the response.

    :param ctx: the ``RequestContext``, with ``status``, ``bytes_in``,
        ``bytes_out`` and ``upstream_seconds`` filled in.
    :param settings: the plugin's settings for this route.

    The return value is ignored. May be async; it is awaited after the
    response has been written, so it adds no latency for the client.

    Example: ``tests/sample_plugin/plugway_sample/__init__.py``.
    """


# --- WebSockets (called by the websocket plugin on routes where it runs) ---------------------


@hookspec
def websocket_open(ctx: RequestContext, settings: Any) -> None | Awaitable[None]:
    """A proxied WebSocket is open at both ends.

    Called once per connection on routes where the websocket plugin proxies it, after the
    upstream accepted the handshake and the client got its 101, in priority order. The
    handshake itself went through ``on_request`` like any request (auth, rate limits).

    :param ctx: the handshake's ``RequestContext`` (``ctx.consumer``, ``ctx.state``...).
    :param settings: the plugin's settings for this route.

    The return value is ignored; raising closes the connection with 1011. May be async.

    Example: ``tests/sample_plugin/plugway_sample/__init__.py``.
    """


@hookspec
def websocket_message(
    ctx: RequestContext, settings: Any, message: WebSocketMessage, direction: str,
) -> WebSocketMessage | None | Awaitable[WebSocketMessage | None]:
    """Inspect, change or drop one message on its way through.

    Called for every text or binary message, in priority order (for both directions):
    ``direction`` is ``"client"`` (from the client to the upstream) or ``"upstream"``.
    Control frames (ping, pong, close) are not passed here.

    :param ctx: the handshake's ``RequestContext``.
    :param settings: the plugin's settings for this route.
    :param message: a ``WebSocketMessage(kind, data)``.

    Return None to pass the message on as it is (or as an earlier plugin changed it), a
    new ``WebSocketMessage`` to replace it, or ``gateway.DROP`` to drop it. May be async;
    it runs on every message, so keep it cheap.

    Example: ``tests/sample_plugin/plugway_sample/__init__.py``.
    """


@hookspec
def websocket_close(ctx: RequestContext, settings: Any, code: int) -> None | Awaitable[None]:
    """A proxied WebSocket closed.

    Called once per connection that ``websocket_open`` saw open, in priority order.

    :param ctx: the handshake's ``RequestContext``.
    :param settings: the plugin's settings for this route.
    :param code: the close code sent to the client (1000 normal, 1001 going away,
        1009 message too big, 1011 error...).

    The return value is ignored. May be async.

    Example: ``tests/sample_plugin/plugway_sample/__init__.py``.
    """
