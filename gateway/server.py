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
import weakref
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from aiohttp import web_protocol, web_server
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, BadStatusLine, LineTooLong
from aiohttp.web_protocol import RequestPayloadError

from . import pipeline, proxy
from .context import RequestContext
from .errors import (
    BadRequest, BadRequestPath, BodyTooLarge, ClientClosedRequest, GatewayError, HeadersTooLarge, MethodNotAllowed, RequestTimeout,
    UriTooLong,
)
from .forwarding import request_id
from .headers import HeaderInjection
from .messages import Response, Upgraded, UpstreamResponse
from .paths import BadPath, canonical_path
from .requesthead import BadFraming, VersionNotSupported, check_head
from .routing import request_host

if TYPE_CHECKING:
    from aiohttp.web_request import BaseRequest

    from .config.model import ListenerSettings
    from .worker import Gateway

log = logging.getLogger("plugway.server")
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_NO_BODY_STATUSES = frozenset((204, 304))
_NO_BODY_METHODS = frozenset(("GET", "HEAD", "OPTIONS", "DELETE"))
_FRAMING_HEADERS = frozenset((b"content-length", b"transfer-encoding"))


def _status_line(status: int, reason: bytes) -> bytes:
    return b"HTTP/1.1 %d %b\r\n" % (status, reason or _REASONS.get(status, b"Unknown"))


class ParserUnavailable(RuntimeError):
    pass


def require_c_parser() -> None:
    """Refuse to serve with aiohttp's pure-Python parser: it hangs on some inputs (a 2^64 chunk
    size, a bare-LF trailer) and accepts others the C parser refuses (lowercase methods)."""
    from aiohttp import http_parser

    try:
        from aiohttp._http_parser import HttpRequestParser as CParser
    except ImportError:
        CParser = None
    if CParser is None or http_parser.HttpRequestParser is not CParser:
        raise ParserUnavailable(
            "aiohttp's C HTTP parser is not in use (AIOHTTP_NO_EXTENSIONS is set, or the aiohttp wheel has no "
            "compiled extensions for this platform); Plugway refuses to serve with the pure-Python parser"
        )


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
    """aiohttp's connection protocol, plus what a gateway needs at the connection level.

    - Parser refusals are answered in the gateway's JSON error format.
    - The whole request head must arrive within ``client_header_timeout``
      from its first byte (from the connection for the first request), or
      the client gets 408 and the connection closes: dripping a header every
      few seconds does not extend it.
    - Beyond ``max_connections`` per worker, or ``max_connections_per_ip``
      from one peer, a new connection gets 503 and is closed at once.
    """

    __slots__ = ("gateway", "peer_ip", "requests_served", "_head_timer", "_counted", "__weakref__")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        manager.pending.discard(self)
        self.gateway = manager.gateway
        self.requests_served = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self.peer_ip = _peer_ip(self.peername)
        refusal = self.gateway.admit_connection(self.peer_ip)
        self._counted = refusal is None
        if refusal is not None:
            transport.write(refusal)
            transport.close()
            return
        self._start_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._manager is not None:
            self._manager.pending.discard(self)  # a TLS handshake that failed
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
        if getattr(self, "_counted", False):
            self._counted = False
            self.gateway.connection_closed(self.peer_ip)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and not self._request_in_progress and not self._messages:
            self._start_head_timer()
        super().data_received(data)
        if self._messages and self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _start_head_timer(self) -> None:
        timeout = self.gateway.settings.server.client_header_timeout
        self._head_timer = self._loop.call_later(timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._request_in_progress or self._messages or self.transport is None:
            return  # a request is under way after all; its body has its own timeout
        self.gateway.refused(self.peer_ip, "header_timeout")
        self.transport.write(_close_with(HeaderTimeout()))
        self.force_close()

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None,
    ) -> _ErrorResponse:
        gateway = self._manager.gateway if self._manager else None
        error = _parser_error(exc, gateway) if status == 400 else GatewayError()
        if status != 400:
            log.error("aiohttp failed to handle a request", exc_info=exc)
        return _ErrorResponse(error, gateway, _refusal_reason(exc))


class HeaderTimeout(RequestTimeout):
    code, message = "header_timeout", "the request head did not arrive in time"


def _close_with(error: GatewayError) -> bytes:
    """A complete error response for a connection that has no request (or no complete one)."""
    body = error.body("-")
    return _status_line(error.status, b"") + (
        b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    ) + body


class TooManyConnections(GatewayError):
    status, code, message, close = 503, "too_many_connections", "too many connections; try again later", True


CONNECTION_REFUSED = _close_with(TooManyConnections())


def _peer_ip(peername: Any) -> str:
    address = peername[0] if isinstance(peername, tuple) else "unix"
    if address.startswith("::ffff:") and "." in address:
        address = address[7:]
    return address


class _ErrorResponse:
    """A parser-level refusal, rendered and logged like every other gateway error; the connection closes."""

    keep_alive = False

    def __init__(self, error: GatewayError, gateway: Gateway | None, reason: str) -> None:
        self.error = error
        self.gateway = gateway
        self.reason = reason

    async def prepare(self, request: BaseRequest) -> None:
        if self.gateway is None:  # the connection is already gone
            return
        ctx = RequestContext(request, self.gateway, time.monotonic())
        _identify(ctx, self.gateway)
        ctx.log["reason"] = self.reason  # the access log says what the parser refused; the client is not told
        try:
            await _write(ctx, pipeline.error_response(ctx, self.error))
        finally:
            self.gateway.request_finished(ctx, time.monotonic() - ctx.started)

    async def write_eof(self) -> None:
        return None


def _parser_error(exc: BaseException | None, gateway: Gateway | None) -> GatewayError:
    if isinstance(exc, BadHttpMethod) and gateway is not None:
        # llhttp refuses what is not an upper-case token; methods are case-sensitive, so `get` is
        # a method outside the configured set, like any other.
        return MethodNotAllowed(gateway.head_rules.allowed, close=True)
    if isinstance(exc, LineTooLong):
        # aiohttp's C parser reports an over-long URL with the line buffer (a bytearray), headers with bytes.
        return UriTooLong() if isinstance(exc.args[0], bytearray) else HeadersTooLarge()
    if isinstance(exc, BadHttpMessage) and "too many headers" in str(exc).lower():
        return HeadersTooLarge()
    if isinstance(exc, BadStatusLine) and "invalid http version" in str(exc).lower():
        return VersionNotSupported()
    return BadRequest()


def _refusal_reason(exc: BaseException | None) -> str:
    """The parser's own words, first line only ("Duplicate Content-Length"), for the log."""
    text = getattr(exc, "message", None) or (str(exc) if exc is not None else "")
    first = str(text).strip().splitlines()[0] if str(text).strip() else type(exc).__name__
    return "".join(char for char in first.rstrip(":") if char.isprintable())[:200]


class ListenerServer(web_server.Server):
    """aiohttp's low-level server for one listener, creating our connection handlers."""

    def __init__(self, gateway: Gateway, listener: ListenerSettings, **kwargs: Any) -> None:
        self.gateway = gateway
        self.listener = listener
        self.scheme = listener.scheme
        # Accepted but not yet connected (TLS handshakes): weak, as a failed handshake never tells us.
        self.pending: weakref.WeakSet[_ConnectionHandler] = weakref.WeakSet()
        super().__init__(self.handle, handler_cancellation=True, loop=gateway.loop, **kwargs)

    def __call__(self) -> _ConnectionHandler:
        handler = _ConnectionHandler(self, loop=self._loop, **self._kwargs)
        self.pending.add(handler)  # accepted; on a TLS listener, connection_made waits for the handshake
        return handler

    async def handle(self, request: BaseRequest) -> _Sent:
        gateway = self.gateway
        started = time.monotonic()
        ctx = RequestContext(request, gateway, started)
        ctx.scheme = ctx.listener_scheme = self.scheme
        request.protocol.requests_served += 1
        gateway.in_flight += 1
        response: Response | UpstreamResponse | None = None
        keep_alive = False
        try:
            _identify(ctx, gateway)
            if self.listener.redirect_to_https:
                response = _https_redirect(ctx, self.listener.https_port)
            else:
                _admit(ctx, gateway)
                response = await pipeline.run(ctx)
            keep_alive = await _write(ctx, response)
        except GatewayError as error:
            keep_alive = await _write_error(ctx, error)
        except RequestPayloadError:
            keep_alive = await _write_error(ctx, BadFraming("the request body is malformed"))
        except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError) as exc:
            if ctx.error is None:  # else the gateway cut the connection itself (an upstream failing mid-body)
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
        if isinstance(ctx.error, RequestTimeout):
            request.protocol.force_close()  # the body stopped coming: nothing to linger for
        if ctx.route is not None and ctx.route.chain.after_response:
            await pipeline.after_response(ctx)
        return _KEEP_ALIVE if keep_alive else _CLOSE


def _identify(ctx: RequestContext, gateway: Gateway) -> None:
    """Peer, client address and request id: first, so that every log line has them."""
    address = ctx.peer_ip = ctx.request.protocol.peer_ip
    trusted = gateway.trusted_proxies.trusts(address) if gateway.trusted_proxies.networks else False
    ctx.peer_trusted = trusted
    headers = ctx.request.headers
    ctx.client_ip = gateway.trusted_proxies.client_address(address, headers.get("X-Forwarded-For")) if trusted else address
    ctx.request_id = request_id(headers.get(gateway.request_id_header_name), trusted)
    if trusted:
        proto = headers.get("X-Forwarded-Proto", "").partition(",")[0].strip().lower()
        if proto in ("http", "https"):
            ctx.scheme = proto


def _https_redirect(ctx: RequestContext, port: int) -> Response:
    """The same URL over https (301 for GET and HEAD, 308 so other methods keep their body)."""
    request = ctx.request
    host = request_host(request.headers.get("Host")) or "localhost"
    if not all(char.isalnum() or char in ".-[]:" for char in host):
        raise BadRequest("the Host header is not a host name")
    authority = host if port == 443 else f"{host}:{port}"
    target = request.raw_path if request.raw_path.startswith("/") else "/"
    status = 301 if ctx.method in ("GET", "HEAD") else 308
    return Response(status, headers=[("Location", f"https://{authority}{target}")])


def _admit(ctx: RequestContext, gateway: Gateway) -> None:
    """A well-formed head, the canonical path and the route, or the error that refuses the request."""
    request = ctx.request
    host_header = request.headers.get("Host")
    target = check_head(gateway.head_rules, ctx.method, request.version, request.raw_headers, request.raw_path,
                        host_header)
    path, _, ctx.query = target.partition("?")
    ctx.host = request_host(host_header)
    try:
        ctx.path = canonical_path(path)
        ctx.route, ctx.path_params = gateway.router.match(ctx.host, ctx.path, ctx.method)
    except BadPath as refusal:
        _admit_lenient(ctx, gateway, path, refusal)
    except MethodNotAllowed as refusal:
        if ctx.method != "OPTIONS" or not refusal.route.chain:
            raise
        # The route does not serve OPTIONS, but its plugins may answer a CORS preflight.
        ctx.route, ctx.path_params, ctx.method_refusal = refusal.route, refusal.params, refusal
    route = ctx.route.settings
    if request.body_exists and ctx.method in _NO_BODY_METHODS and ctx.method not in route.allow_body_on:
        raise BadFraming(f"a {ctx.method} request must not have a body on this route")
    length = request.content_length
    if length is not None and length > gateway.settings.server.client_max_body:
        raise BodyTooLarge()  # at the door: a client waiting on Expect: 100-continue never sends the body


def _admit_lenient(ctx: RequestContext, gateway: Gateway, path: str, refusal: BadPath) -> None:
    """Routes may accept encoded slashes or ';' parameters: only those routes may serve such paths."""
    if not refusal.route_may_allow or not gateway.router.lenient:
        raise BadRequestPath(refusal.reason) from None
    try:
        ctx.path = canonical_path(path, keep_encoded_slash=True, allow_semicolon=True)
        ctx.route, ctx.path_params = gateway.router.match(ctx.host, ctx.path, ctx.method)
    except (BadPath, GatewayError):
        raise BadRequestPath(refusal.reason) from None
    route = ctx.route.settings
    lower = path.lower()
    semicolon = ";" in path or "%3b" in lower
    if ("%2f" in lower or "%5c" in lower) and not route.keep_encoded_slashes or semicolon and not route.allow_semicolons:
        raise BadRequestPath(refusal.reason)


async def _write(ctx: RequestContext, response: Response | UpstreamResponse) -> bool:
    """Write ``response`` to the client; return whether the connection stays open."""
    if isinstance(response, Upgraded):
        ctx.status = response.status
        return False
    request = ctx.request
    gateway = ctx.gateway
    keep_alive = (
        request.keep_alive and not gateway.draining and not (ctx.error is not None and ctx.error.close)
        and request.protocol.requests_served < gateway.settings.server.max_requests_per_connection
    )
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
    keeps_upstream_length = from_upstream and response.content_length is not None
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
        _status_line(status, response.status_reason), headers, gateway.request_id_header, b": ",
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
    # aiohttp's writer waits for the client only past 64 KiB per response: a pipelining client
    # that never reads would otherwise have every answer buffered here, and the next request read.
    await writer.drain()
    return keep_alive


async def _stream(ctx: RequestContext, writer: Any, head: bytes, response: Any, chunked: bool) -> None:
    await writer.write(head)
    try:
        async for chunk in response.iter_body():
            if not chunk:
                continue  # an empty chunk would end a chunked body
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
