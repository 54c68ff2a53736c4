"""Runs one routed request through its route's chain, phase by phase, and the upstream.

The order is the one documented in ``gateway.hookspecs``. A route whose chain
is empty goes straight to the upstream. A ``GatewayError`` raised by a
plugin or by the data path becomes an error ``Response`` here, so that
plugins further out in the chain (CORS, security headers) still see it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import proxy
from .errors import GatewayError
from .forwarding import forwarding_headers, strip_request_headers
from .messages import OutgoingRequest, Response, UpstreamResponse

if TYPE_CHECKING:
    from .context import RequestContext
    from .plugins import Chain

log = logging.getLogger("plugway.pipeline")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def run(ctx: RequestContext) -> Response | UpstreamResponse:
    """The response to write for ``ctx``, whose route is already matched."""
    chain = ctx.route.chain
    if not chain:
        _answer_expect(ctx)
        ctx.upstream = ctx.route.upstream
        return await proxy.send(ctx, outgoing_request(ctx), ctx.upstream)
    try:
        response, depth = await _request_phase(ctx, chain)
        if response is None and ctx.method_refusal is not None:
            raise ctx.method_refusal  # an OPTIONS request no plugin answered, on a route without OPTIONS
        if response is None:
            _answer_expect(ctx)
            response = await _upstream_phase(ctx, chain)
    except GatewayError as error:
        response, depth = error_response(ctx, error), len(chain.plugins)
    if chain.on_response:
        response = await _response_phase(ctx, chain, response, depth)
    return response


async def after_response(ctx: RequestContext) -> None:
    """The log phase; a failing plugin is logged and never affects the client."""
    if ctx.route is None:
        return
    for step in ctx.route.chain.after_response:
        try:
            await _settle(step(ctx))
        except Exception:
            log.exception("after_response hook failed", extra={"request_id": ctx.request_id})


def outgoing_request(ctx: RequestContext) -> OutgoingRequest:
    gateway = ctx.gateway
    raw = ctx.request.raw_headers
    headers = strip_request_headers(
        raw, gateway.dropped_request_headers, keep_underscored=gateway.settings.server.underscores_in_headers,
    )
    headers += forwarding_headers(
        raw, trusted=ctx.peer_trusted, peer=ctx.peer_ip, scheme=ctx.listener_scheme, host=ctx.request.headers.get("Host"),
    )
    headers.append((gateway.request_id_header, ctx.request_id.encode()))
    return OutgoingRequest(ctx.method, ctx.route.upstream_path(ctx.path), ctx.query, headers)


@contextlib.asynccontextmanager
async def upstream_request(
    ctx: RequestContext, method: str = "GET", *, set_headers: Mapping[str, str] | None = None,
    remove_headers: Iterable[str] = (), hide_state: Iterable[str] = (),
) -> AsyncIterator[UpstreamResponse | None]:
    """``async with ctx.upstream_request(...) as response``: a request of a plugin's own (a cache
    revalidating, say) for ``ctx``'s path and query, with ``method`` and the client's headers as
    the core forwards them, minus ``remove_headers``, plus ``set_headers``; no body. It goes
    through the route's ``before_upstream`` hooks as the client's request would (``hide_state``:
    keys of ``ctx.state`` those hooks do not see in the copy, e.g. the caller's own) and through
    the data path (balancing, retries, timeouts) to the upstream they chose. ``response`` is the
    ``UpstreamResponse`` (read it with ``read(limit)``), or None when a hook answered instead;
    the upstream connection is released when the block ends. Raises ``GatewayError`` when the
    upstream fails."""
    sub = ctx.subrequest(method)
    for key in hide_state:
        sub.state.pop(key, None)
    outgoing = outgoing_request(sub)
    for name in remove_headers:
        outgoing.headers.popall(name, None)
    for name, value in (set_headers or {}).items():
        outgoing.headers[name] = value
    if ctx.request.body_exists:
        outgoing.set_body(b"")  # the client's body stays the client's request's
    if await _before_upstream(sub, sub.route.chain, outgoing) is not None:
        yield None
        return
    response = await proxy.send(sub, outgoing, sub.upstream)
    try:
        yield response
    finally:
        proxy.finish(sub, response)


def error_response(ctx: RequestContext, error: GatewayError) -> Response:
    ctx.error = error
    return Response(error.status, error.body(ctx.request_id), error.headers, content_type="application/json")


async def _settle(result: Any) -> Any:
    if result is not None and hasattr(result, "__await__"):
        return await result
    return result


async def _request_phase(ctx: RequestContext, chain: Chain) -> tuple[Response | None, int]:
    for depth, step in chain.on_request:
        try:
            result = await _settle(step(ctx))
        except GatewayError as error:
            return error_response(ctx, error), depth
        if result is not None:
            return result, depth
    return None, len(chain.plugins)


async def _before_upstream(ctx: RequestContext, chain: Chain, outgoing: OutgoingRequest) -> Response | None:
    """The ``before_upstream`` hooks: the answer of one that answers, or None with
    ``ctx.upstream`` set to the upstream they chose (the route's unless one changed it)."""
    for step in chain.before_upstream:
        result = await _settle(step(ctx, outgoing))
        if result is not None:
            return result
    ctx.upstream = ctx.gateway.upstream(outgoing.upstream_name) if outgoing.upstream_name else ctx.route.upstream
    return None


async def _upstream_phase(ctx: RequestContext, chain: Chain) -> Response | UpstreamResponse:
    outgoing = outgoing_request(ctx)
    answer = await _before_upstream(ctx, chain, outgoing)
    if answer is not None:
        return answer
    try:
        return await proxy.send(ctx, outgoing, ctx.upstream)
    except GatewayError as error:
        if error.status < 500:
            raise
        for step in chain.on_error:
            result = await _settle(step(ctx, error))
            if result is not None:
                ctx.error = error
                return result
        raise


async def _response_phase(
    ctx: RequestContext, chain: Chain, response: Response | UpstreamResponse, depth: int,
) -> Response | UpstreamResponse:
    for plugin_depth, step in chain.on_response:
        if plugin_depth >= depth:
            continue
        try:
            result = await _settle(step(ctx, response))
        except GatewayError as error:
            result = error_response(ctx, error)
        if result is not None:
            if isinstance(response, UpstreamResponse):
                proxy.finish(ctx, response)
            response = result
    return response


def _answer_expect(ctx: RequestContext) -> None:
    """Tell a client waiting on ``Expect: 100-continue`` to send its body, now that it may."""
    request = ctx.request
    if request.body_exists and request.version[1] == 1 and request.headers.get("Expect", "").lower() == "100-continue":
        transport = request.transport
        if transport is not None:
            transport.write(_CONTINUE)
