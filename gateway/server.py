"""The client side: aiohttp's HTTP/1.1 server (llhttp parser) wired to the gateway.

aiohttp parses requests and manages connections; everything after that is
ours. The handler writes the response itself through the connection's
writer, so nothing is added to what the upstream sent except the gateway's
own headers (no ``Server``, ``Date`` or default ``Content-Type``).

Requests aiohttp's parser refuses are answered here too, in the gateway's
JSON error format: 414 for a request line over ``max_request_line``, 431 for
headers over ``max_header_size``/``max_headers``, 400 otherwise, and the
connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from aiohttp import web_protocol, web_server
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from . import pipeline, proxy
from .context import RequestContext
from .errors import (
    BadRequest, BadRequestPath, ClientClosedRequest, GatewayError, HeadersTooLarge, UriTooLong,
)
from .forwarding import request_id
from .headers import HeaderInjection
from .messages import Response, UpstreamResponse
from .paths import BadPath, canonical_path
from .routing import request_host

if TYPE_CHECKING:
    from aiohttp.web_request import BaseRequest

    from .worker import Gateway

log = logging.getLogger("plugway.server")
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_NO_BODY_STATUSES = frozenset((204, 304))
_FRAMING_HEADERS = frozenset((b"content-length", b"transfer-encoding"))


class _Sent:
    """What the handler gives back to aiohttp: the response is already written."""

    __slots__ = ("keep_alive",)

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive

    async def prepare(self, request: Any) -> None:
        return None

    async def write_eof(self) -> None:
        return None


_KEEP_ALIVE, _CLOSE = _Sent(True), _Sent(False)


class _ConnectionHandler(web_protocol.RequestHandler):
    """aiohttp's connection protocol, with parser errors answered by the gateway."""

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None,
    ) -> _ErrorResponse:
        error = _parser_error(exc) if status == 400 else GatewayError()
        if status != 400:
            log.error("aiohttp failed to handle a request", exc_info=exc)
        else:
            log.info("refused a malformed request", extra={"reason": str(message or exc)})
        return _ErrorResponse(error, self._manager.gateway if self._manager else None)


class _ErrorResponse:
    """A parser-level refusal, rendered and logged like every other gateway error; the connection closes."""

    keep_alive = False

    def __init__(self, error: GatewayError, gateway: Gateway | None) -> None:
        self.error = error
        self.gateway = gateway

    async def prepare(self, request: BaseRequest) -> None:
        if self.gateway is None:  # the connection is already gone
            return
        ctx = RequestContext(request, self.gateway, time.monotonic())
        _identify(ctx, self.gateway)
        try:
            await _write(ctx, pipeline.error_response(ctx, self.error))
        finally:
            self.gateway.request_finished(ctx, time.monotonic() - ctx.started)

    async def write_eof(self) -> None:
        return None


def _parser_error(exc: BaseException | None) -> GatewayError:
    if isinstance(exc, LineTooLong):
        # aiohttp's C parser reports an over-long URL with the line buffer (a bytearray), headers with bytes.
        return UriTooLong() if isinstance(exc.args[0], bytearray) else HeadersTooLarge()
    if isinstance(exc, BadHttpMessage) and "too many headers" in str(exc).lower():
        return HeadersTooLarge()
    return BadRequest()


class ListenerServer(web_server.Server):
    """aiohttp's low-level server for one listener, creating our connection handlers."""

    def __init__(self, gateway: Gateway, scheme: str, **kwargs: Any) -> None:
        self.gateway = gateway
        self.scheme = scheme
        super().__init__(self.handle, handler_cancellation=True, loop=gateway.loop, **kwargs)

    def __call__(self) -> _ConnectionHandler:
        return _ConnectionHandler(self, loop=self._loop, **self._kwargs)

    async def handle(self, request: BaseRequest) -> _Sent:
        gateway = self.gateway
        started = time.monotonic()
        ctx = RequestContext(request, gateway, started)
        ctx.scheme = self.scheme
        gateway.in_flight += 1
        response: Response | UpstreamResponse | None = None
        keep_alive = False
        try:
            _identify(ctx, gateway)
            _admit(ctx, gateway)
            response = await pipeline.run(ctx)
            keep_alive = await _write(ctx, response)
        except GatewayError as error:
            keep_alive = await _write_error(ctx, error)
        except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError) as exc:
            ctx.status, ctx.error = 499, ClientClosedRequest()
            if isinstance(exc, asyncio.CancelledError):
                gateway.spawn(pipeline.after_response(ctx))
                raise
        except Exception as exc:
            log.exception("request failed inside the gateway", extra={"request_id": ctx.request_id})
            keep_alive = await _write_error(ctx, GatewayError(), cause=exc)
        finally:
            gateway.in_flight -= 1
            if isinstance(response, UpstreamResponse):
                proxy.finish(ctx, response)
            gateway.request_finished(ctx, time.monotonic() - started)
        if ctx.route is not None and ctx.route.chain.after_response:
            await pipeline.after_response(ctx)
        return _KEEP_ALIVE if keep_alive else _CLOSE


def _identify(ctx: RequestContext, gateway: Gateway) -> None:
    """Peer, client address and request id: first, so that every log line has them."""
    peer = ctx.request.protocol.peername
    address = peer[0] if isinstance(peer, tuple) else "unix"
    if address.startswith("::ffff:") and "." in address:
        address = address[7:]
    ctx.peer_ip = address
    trusted = gateway.trusted_proxies.trusts(address) if gateway.trusted_proxies.networks else False
    ctx.peer_trusted = trusted
    headers = ctx.request.headers
    ctx.client_ip = gateway.trusted_proxies.client_address(address, headers.get("X-Forwarded-For")) if trusted else address
    ctx.request_id = request_id(headers.get(gateway.request_id_header_name), trusted)


def _admit(ctx: RequestContext, gateway: Gateway) -> None:
    """Canonical path and route, or the error that refuses the request."""
    path, _, ctx.query = ctx.request.raw_path.partition("?")
    try:
        ctx.path = canonical_path(path)
    except BadPath as exc:
        raise BadRequestPath(exc.reason) from None
    ctx.host = request_host(ctx.request.headers.get("Host"))
    ctx.route, ctx.path_params = gateway.router.match(ctx.host, ctx.path, ctx.method)


def _status_line(status: int, reason: bytes) -> bytes:
    return b"HTTP/1.1 %d %b\r\n" % (status, reason or _REASONS.get(status, b"Unknown"))


async def _write(ctx: RequestContext, response: Response | UpstreamResponse) -> bool:
    """Write ``response`` to the client; return whether the connection stays open."""
    request = ctx.request
    gateway = ctx.gateway
    keep_alive = request.keep_alive and not gateway.draining and not (ctx.error is not None and ctx.error.close)
    status = response.status
    ctx.status = status
    block = response.header_block
    from_upstream = isinstance(response, UpstreamResponse)
    if not from_upstream or response.length_changed:
        block.remove(_FRAMING_HEADERS)
    try:
        headers = block.serialize()
    except HeaderInjection as exc:
        raise GatewayError() from exc
    bodiless = status in _NO_BODY_STATUSES or status < 200
    body = None if bodiless else response.body_in_memory()
    keeps_upstream_length = (
        from_upstream and not response.length_changed and response.exchange.content_length is not None
    )
    framing = b""
    chunked = False
    if bodiless or keeps_upstream_length or ctx.method == "HEAD" and from_upstream:
        pass
    elif body is not None:
        framing = b"Content-Length: %d\r\n" % len(body)
    elif request.version[1] == 1 and ctx.method != "HEAD":
        chunked = True
        framing = b"Transfer-Encoding: chunked\r\n"
    else:
        keep_alive = False
    head = b"".join((
        _status_line(status, response.reason), headers, gateway.request_id_header, b": ",
        ctx.request_id.encode(), b"\r\n", framing, b"" if keep_alive else b"Connection: close\r\n", b"\r\n",
    ))
    writer = request.writer
    if ctx.method == "HEAD" or bodiless:
        await writer.write(head)
    elif body is not None:
        ctx.bytes_out = len(body)
        await writer.write(head + body)
    else:
        await _stream(ctx, writer, head, response, chunked)
    return keep_alive


async def _stream(ctx: RequestContext, writer: Any, head: bytes, response: Any, chunked: bool) -> None:
    await writer.write(head)
    try:
        async for chunk in response.iter_body():
            ctx.bytes_out += len(chunk)
            await writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
    except GatewayError as error:
        # The head is out: the only honest signal left is to cut the connection.
        ctx.error = error
        if ctx.request.transport is not None:
            ctx.request.transport.abort()
        return
    if chunked:
        await writer.write(b"0\r\n\r\n")


async def _write_error(ctx: RequestContext, error: GatewayError, cause: BaseException | None = None) -> bool:
    if ctx.request.writer.output_size > 0:
        ctx.error = error
        ctx.status = ctx.status or error.status
        if ctx.request.transport is not None:
            ctx.request.transport.abort()
        return False
    return await _write(ctx, pipeline.error_response(ctx, error))
