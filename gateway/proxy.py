"""The data path: send one request to a target and hand back the response head.

The request body is re-framed by the gateway: Content-Length when the client
sent one (or when a plugin set the body), chunked when the client sent
chunked. Small bodies (up to ``BUFFER_BODY_UP_TO`` bytes) are read whole
first, so that they go out in the same write as the head and can be sent
again: a request that meets the normal race of a reused keep-alive
connection closing under it is retried once on a new connection, as nginx
does, provided its whole body is in memory. Bigger bodies stream with flow
control and are counted against ``client_max_body`` as they arrive.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from .errors import BodyTooLarge, GatewayError, RequestTimeout
from .messages import OutgoingRequest, UpstreamResponse
from .upstream.connection import PrematureClose

if TYPE_CHECKING:
    from .context import RequestContext
    from .upstream import Target, Upstream
    from .upstream.connection import Exchange, UpstreamConnection

BUFFER_BODY_UP_TO = 64 * 1024
_BODY_EXPECTED = frozenset(("POST", "PUT", "PATCH"))


async def send(ctx: RequestContext, outgoing: OutgoingRequest, upstream: Upstream) -> UpstreamResponse:
    """Send ``outgoing`` to a target of ``upstream``; return once the response head is in.

    The caller owns the response and must call ``finish(ctx, response)``.
    """
    request = ctx.request
    limit = ctx.gateway.settings.server.client_max_body
    body = outgoing.body
    if body is None and request.body_exists:
        length = request.content_length
        if length is not None and length > limit:
            raise BodyTooLarge()
        if length is not None and length <= BUFFER_BODY_UP_TO:
            body = await _read_small_body(ctx, length)
    target = upstream.choose(ctx)
    ctx.target = target
    started = time.monotonic()
    target.in_flight += 1
    try:
        exchange = await _exchange(ctx, outgoing, upstream, target, body)
    except BaseException:
        target.in_flight -= 1
        raise
    ctx.upstream_seconds = time.monotonic() - started
    return UpstreamResponse(exchange)


def finish(ctx: RequestContext, response: UpstreamResponse) -> None:
    """The response went out (or failed): release its connection and stop counting it."""
    response.exchange.release()
    ctx.target.in_flight -= 1


async def _exchange(
    ctx: RequestContext, outgoing: OutgoingRequest, upstream: Upstream, target: Target, body: bytes | None,
) -> Exchange:
    settings = upstream.settings
    head = _request_head(ctx, outgoing, target, body)
    for attempt in (1, 2):
        connection, reused = await target.pool.acquire()
        exchange = connection.begin(outgoing.method == "HEAD", settings.read_timeout)
        try:
            if body is not None or not ctx.request.body_exists:
                connection.write(head + body if body else head)
            else:
                await _stream_body(ctx, connection, head, settings.write_timeout)
            await exchange.head()
            return exchange
        except PrematureClose:
            exchange.release()
            if not reused or attempt == 2 or (body is None and ctx.request.body_exists):
                raise
        except GatewayError:
            if exchange.head_done and exchange.error is None:
                return exchange  # the target answered before taking the whole body
            exchange.release()
            raise
        except BaseException:
            connection.close()
            exchange.release()
            raise
    raise AssertionError("unreachable")


def _request_head(ctx: RequestContext, outgoing: OutgoingRequest, target: Target, body: bytes | None) -> bytes:
    route = ctx.route.settings
    host = ctx.request.headers.get("Host", "").encode("latin-1") if route.preserve_host else target.host_header
    if body is not None:
        framing = b"Content-Length: %d\r\n" % len(body)
    elif ctx.request.body_exists:
        length = ctx.request.content_length
        framing = b"Content-Length: %d\r\n" % length if length is not None else b"Transfer-Encoding: chunked\r\n"
    elif outgoing.method in _BODY_EXPECTED:
        framing = b"Content-Length: 0\r\n"
    else:
        framing = b""
    return b"".join((
        outgoing.method.encode("ascii"), b" ", outgoing.target_bytes(), b" HTTP/1.1\r\nHost: ", host, b"\r\n",
        outgoing.header_block.serialize(), framing, b"\r\n",
    ))


async def body_chunks(ctx: RequestContext, limit: int | None = None) -> AsyncIterator[bytes]:
    """The client's body as it arrives, within the gateway's limits.

    Raises ``RequestTimeout`` (408) when it stops arriving for ``client_body_timeout``, and
    ``BodyTooLarge`` (413) past ``limit`` bytes (``client_max_body`` when not given). It
    counts ``ctx.bytes_in``. The body can be read only once: a plugin that reads it must
    hand the upstream what it wants sent with ``OutgoingRequest.set_body``.
    """
    server = ctx.gateway.settings.server
    limit = server.client_max_body if limit is None else min(limit, server.client_max_body)
    content = ctx.request.content
    while True:
        try:
            async with asyncio.timeout(server.client_body_timeout):
                chunk = await content.readany()
        except TimeoutError:
            raise RequestTimeout() from None
        if not chunk:
            return
        ctx.bytes_in += len(chunk)
        if ctx.bytes_in > limit:
            raise BodyTooLarge()
        yield chunk


async def read_body(ctx: RequestContext, limit: int | None = None) -> bytes:
    """The whole client body in memory, within ``limit`` (see ``body_chunks``)."""
    return b"".join([chunk async for chunk in body_chunks(ctx, limit)])


async def _read_small_body(ctx: RequestContext, length: int) -> bytes:
    body = await read_body(ctx)
    if len(body) != length:
        raise asyncio.IncompleteReadError(body, length)
    return body


async def _stream_body(
    ctx: RequestContext, connection: UpstreamConnection, head: bytes, write_timeout: float,
) -> None:
    chunked = ctx.request.content_length is None
    pending = head
    async for chunk in body_chunks(ctx):
        frame = b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk
        connection.write(pending + frame if pending else frame)
        pending = b""
        await connection.drain(write_timeout)
    end = b"0\r\n\r\n" if chunked else b""
    if pending or end:
        connection.write(pending + end)
