"""The data path: send one request to a target (retrying when allowed) and hand back the response head.

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
import random
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from .config.units import Duration
from .errors import (
    BodyTooLarge, GatewayError, RequestTimeout, UpstreamBusy, UpstreamInvalidResponse, UpstreamTimeout,
    UpstreamUnreachable,
)
from .messages import OutgoingRequest, UpstreamResponse
from .upstream.connection import PrematureClose
from .upstream.pool import ConnectFailure, ConnectTimeout, HandshakeFailure

if TYPE_CHECKING:
    from .context import RequestContext
    from .upstream import Target, Upstream
    from .upstream.connection import Exchange, UpstreamConnection

BUFFER_BODY_UP_TO = 64 * 1024
_BODY_EXPECTED = frozenset(("POST", "PUT", "PATCH"))


async def send(ctx: RequestContext, outgoing: OutgoingRequest, upstream: Upstream) -> UpstreamResponse:
    """Send ``outgoing`` to a target of ``upstream``; return once the response head is in.

    Retries, within the upstream's retry budget, what ``retries.on`` names (for the methods
    in ``retries.methods``, and only when the body is in memory), on another target where
    there is one. The caller owns the response and must call ``finish(ctx, response)``.

    Timeouts, each a bound of its own (the first to expire wins, none lengthens another):
    ``connect_timeout`` per connection, ``per_try_timeout`` for each try's response head,
    ``read_timeout`` for the head and then each gap between body bytes, and ``timeout``
    across every try and backoff until the response head (not the body: a long download or
    event stream is bounded by ``read_timeout`` between its bytes). The route's
    ``connect_timeout``, ``read_timeout`` and ``timeout`` replace the upstream's.
    """
    request = ctx.request
    settings = upstream.settings
    body = outgoing.body
    if body is None and request.body_exists:
        length = request.content_length  # over client_max_body, refused at the door (server._admit)
        if length is not None and length <= BUFFER_BODY_UP_TO:
            body = await _read_small_body(ctx, length)
    if settings.max_concurrent and upstream.in_flight >= settings.max_concurrent:
        raise UpstreamBusy(f'upstream "{upstream.name}" has {settings.max_concurrent} requests in flight already')
    upstream.budget.deposit()
    route = ctx.route.settings
    total = route.timeout if route.timeout is not None else settings.timeout
    started = time.monotonic()
    upstream.in_flight += 1
    try:
        if total:
            async with asyncio.timeout(total):
                exchange = await _tries(ctx, outgoing, upstream, body)
        else:
            exchange = await _tries(ctx, outgoing, upstream, body)
    except TimeoutError:
        upstream.in_flight -= 1
        raise UpstreamTimeout(f"the upstream sent no response head within timeout ({Duration(total)}), "
                              "across every try") from None
    except BaseException:
        upstream.in_flight -= 1
        raise
    ctx.upstream_seconds = time.monotonic() - started
    return UpstreamResponse(exchange)


def finish(ctx: RequestContext, response: UpstreamResponse) -> None:
    """The response went out (or failed): release its connection and stop counting it."""
    response.exchange.release()
    ctx.target.in_flight -= 1
    ctx.upstream.in_flight -= 1


async def _tries(ctx: RequestContext, outgoing: OutgoingRequest, upstream: Upstream, body: bytes | None) -> Exchange:
    retries = upstream.settings.retries
    replayable = body is not None or not ctx.request.body_exists
    tries = 1 + retries.attempts if replayable and outgoing.method in retries.methods else 1
    tried: frozenset = frozenset()
    for attempt in range(tries):
        target = upstream.choose(ctx, tried)
        ctx.target = target
        target.in_flight += 1
        try:
            exchange = await _exchange(ctx, outgoing, upstream, target, body)
        except GatewayError as error:
            target.in_flight -= 1
            if _counts_against_target(error):
                upstream.record(target, ok=False)
            if attempt + 1 < tries and _retryable(error, retries.on) and (
                    _never_reached(error) or upstream.budget.withdraw()):
                ctx.gateway.metrics.upstream_retried(upstream.name, error.code)
                ctx.failed_tries += ((target.url, error.code),)
                tried |= {target}
                await asyncio.sleep(_backoff(retries, attempt))
                continue
            raise
        except BaseException:
            target.in_flight -= 1
            raise
        status = exchange.status
        upstream.record(target, ok=status < 500)
        if str(status) in retries.on and attempt + 1 < tries and upstream.budget.withdraw():
            ctx.gateway.metrics.upstream_retried(upstream.name, str(status))
            ctx.failed_tries += ((target.url, str(status)),)
            exchange.release()
            target.in_flight -= 1
            tried |= {target}
            await asyncio.sleep(_backoff(retries, attempt))
            continue
        return exchange
    raise AssertionError("unreachable")


def _counts_against_target(error: GatewayError) -> bool:
    """Failures that say something about the target (not a full pool, not the client)."""
    return isinstance(error, (UpstreamUnreachable, UpstreamTimeout, UpstreamInvalidResponse))


def _never_reached(error: GatewayError) -> bool:
    """The try never got to the target (refused, unreachable, name not resolved): retrying it
    elsewhere adds nothing to any target's load, so it costs nothing from the retry budget.

    A connect timeout is not one of these: it is what an overloaded target looks like (its
    accept queue full, the kernel drops the SYNs), so its retries spend budget like any other,
    lest free retries amplify the overload. Nor is a failed TLS handshake: the target did it.
    """
    return isinstance(error, ConnectFailure) and not isinstance(error, HandshakeFailure)


def _retryable(error: GatewayError, conditions: tuple[str, ...]) -> bool:
    if isinstance(error, (ConnectFailure, PrematureClose)):
        return "connect_failure" in conditions
    if isinstance(error, UpstreamTimeout):
        return "timeout" in conditions or isinstance(error, ConnectTimeout) and "connect_failure" in conditions
    return False


def _backoff(retries, attempt: int) -> float:
    """Exponential, capped, with jitter (half fixed, half random) so retries do not synchronise."""
    delay = min(retries.backoff_max, retries.backoff * 2 ** attempt)
    return delay / 2 + random.random() * delay / 2


async def _exchange(
    ctx: RequestContext, outgoing: OutgoingRequest, upstream: Upstream, target: Target, body: bytes | None,
) -> Exchange:
    settings = upstream.settings
    route = ctx.route.settings
    read_timeout = route.read_timeout or settings.read_timeout
    per_try_timeout = settings.retries.per_try_timeout
    connect_timeout = route.connect_timeout or settings.connect_timeout
    head = _request_head(ctx, outgoing, target, body)
    for attempt in (1, 2):
        connection, reused = await target.pool.acquire(connect_timeout)
        exchange = connection.begin(outgoing.method == "HEAD", read_timeout, per_try_timeout)
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
