"""The upstream's end of a proxied WebSocket: the request the core would send, and the handshake.

The request is the core's (``pipeline.outgoing_request``: hop-by-hop headers removed,
forwarding headers, the request id) as changed by the ``before_upstream`` hooks of the plugins
above this one; aiohttp's client makes the handshake and checks the 101 (status, ``Upgrade``,
``Connection``, ``Sec-WebSocket-Accept``), so anything else is refused, never tunnelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
from aiohttp import ClientWSTimeout, WSServerHandshakeError
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import pipeline

from .errors import UpstreamRefused, UpstreamTimeout, UpstreamUnreachable
from .handshake import offered_protocols, upstream_headers, upstream_url
from .relay import GOING_AWAY

log = logging.getLogger("plugway.websocket")


async def open_upstream(ctx, settings: Any, session: aiohttp.ClientSession, cache: dict, plugin: Any) -> Any:
    """The upstream's side of the WebSocket (its target counts it in flight until the caller is done),
    or the answer of a plugin's ``before_upstream``; raises the HTTP error that refuses the handshake."""
    outgoing = pipeline.outgoing_request(ctx)
    for step in earlier_before_upstream(ctx, cache, plugin):
        result = step(ctx, outgoing)
        if result is not None and hasattr(result, "__await__"):
            result = await result
        if result is not None:
            return result
    upstream = ctx.gateway.upstream(outgoing.upstream_name) if outgoing.upstream_name else ctx.route.upstream
    ctx.upstream = upstream
    target = ctx.target = upstream.choose(ctx)
    target.in_flight += 1  # least_conn and p2c see long-lived connections as load
    try:
        return await connect(ctx, session, outgoing, target, settings)
    except BaseException:
        target.in_flight -= 1
        raise


def earlier_before_upstream(ctx, cache: dict[str, tuple], plugin: Any) -> tuple:
    """The route's ``before_upstream`` steps of the plugins above this one: those that saw the handshake.

    Plugins below this one never see it (this plugin answers it), as for any early answer.
    ``plugin`` is this plugin's module; ``cache`` keeps the answer per route.
    """
    route = ctx.route
    steps = cache.get(route.name)
    if steps is None:
        manager = ctx.gateway.plugins.manager
        implementing = {impl.plugin_name for impl in manager.hook.before_upstream.get_hookimpls()}
        chain = route.chain
        earlier = set(chain.plugins[:chain.plugins.index(manager.get_name(plugin))])
        names = [name for name in chain.plugins if name in implementing]
        steps = tuple(step for name, step in zip(names, chain.before_upstream) if name in earlier)
        cache[route.name] = steps
    return steps


async def connect(ctx, session: aiohttp.ClientSession, outgoing: Any, target: Any, settings: Any) -> Any:
    """The upstream's side of the WebSocket, or the HTTP error that refuses the handshake.

    The outcome counts for the target's passive health (outlier detection) as an HTTP try does.
    """
    upstream = ctx.upstream
    host = ctx.request.headers.get("Host", "") if ctx.route.settings.preserve_host else target.host_header.decode("latin-1")
    started = time.monotonic()
    try:
        async with asyncio.timeout(settings.handshake_timeout):
            upstream_ws = await session.ws_connect(
                upstream_url(target.url, outgoing.path, outgoing.query),
                protocols=offered_protocols(outgoing.headers),
                headers=upstream_headers(outgoing.headers, host),
                autoclose=False, autoping=False, compress=0, max_msg_size=settings.max_message_size,
                decode_text=False, ssl=upstream.ssl_context or True,
                timeout=ClientWSTimeout(ws_receive=None, ws_close=settings.close_timeout),
            )
    except TimeoutError:
        upstream.record(target, ok=False)
        raise UpstreamTimeout("the upstream did not accept the WebSocket in time") from None
    except WSServerHandshakeError as exc:
        upstream.record(target, ok=exc.status < 500)
        detail = f"answered {exc.status}" if exc.status != 101 else f"sent an invalid 101 ({exc.message.lower()})"
        raise UpstreamRefused(f"the upstream {detail} instead of accepting the WebSocket") from None
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        upstream.record(target, ok=False)
        log.info("WebSocket upstream %s unreachable: %s", target.url, exc, extra={"request_id": ctx.request_id})
        raise UpstreamUnreachable() from None
    upstream.record(target, ok=True)
    ctx.upstream_seconds = time.monotonic() - started
    return upstream_ws


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


def forget_handshake(response) -> None:
    """Drop the handshake's headers that aiohttp keeps with the upstream side for the WebSocket's
    whole life: the upstream's 101 and the request sent (about 4 KiB of the 32 KiB an idle
    connection would cost). Nothing reads them once the 101 is relayed."""
    response._headers = _NO_HEADERS
    response._raw_headers = ()
    response._request_info = response._request_info._replace(headers=_NO_HEADERS)


async def close_quietly(ws, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            await ws.close(code=GOING_AWAY)
    except (TimeoutError, OSError, RuntimeError):
        pass
