"""One keep-alive HTTP/1.1 connection to a target, on raw asyncio.

Responses are parsed by llhttp (through httptools) in strict mode. On top of
what llhttp refuses, a response is invalid when its framing is ambiguous (two
different Content-Length values, Content-Length with Transfer-Encoding), when
a header value holds a control character, or when its head is larger than
the configured limits. Hop-by-hop headers (and those ``Connection``
names) are dropped as they are parsed. An invalid response is never relayed: the exchange
fails with ``UpstreamInvalidResponse`` and the connection is discarded.

Flow control runs both ways: writing pauses while the kernel buffer towards
the target is full (``drain``), and reading from the target pauses while more
than ``BODY_HIGH_WATER`` bytes of body wait for the client.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from httptools import HttpParserError, HttpResponseParser

from ..config.units import Duration
from ..errors import GatewayError, UpstreamInvalidResponse, UpstreamTimeout, UpstreamUnreachable
from ..forwarding import CONNECTION_OPTIONS, HOP_BY_HOP, connection_tokens

if TYPE_CHECKING:
    from .pool import ConnectionPool

BODY_HIGH_WATER = 256 * 1024
BODY_LOW_WATER = 64 * 1024
MAX_RESPONSE_HEADERS = 256
MAX_RESPONSE_HEAD_BYTES = 64 * 1024
_NO_BODY_STATUSES = frozenset((204, 304))


class PrematureClose(UpstreamUnreachable):
    """The target closed the connection before the response began.

    On a reused keep-alive connection this is the normal race with the
    target's idle timeout, and the request may be retried on a new connection.
    """

    message = "the upstream closed the connection before answering"


class UpstreamConnection(asyncio.Protocol):
    """A connection; at most one exchange (request and response) at a time."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._exchange: Exchange | None = None

    # asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is None:
            self.close()  # bytes nobody asked for: the connection is out of step
            return
        exchange.feed(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if self._exchange is not None:
            self._exchange.connection_lost()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(UpstreamUnreachable("the upstream closed the connection while receiving the request"))
        self.pool.forget(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # used by the proxy

    def begin(self, head_request: bool, read_timeout: float, per_try_timeout: float | None = None) -> Exchange:
        self._exchange = Exchange(self, head_request, read_timeout, per_try_timeout)
        return self._exchange

    def write(self, data: bytes) -> None:
        if self.transport is None:
            raise UpstreamUnreachable("the upstream closed the connection while receiving the request")
        self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        if not self._write_paused:
            return
        self._drain_waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, _expire, self._drain_waiter, "the upstream stopped reading the request")
        try:
            await self._drain_waiter
        finally:
            timer.cancel()
            self._drain_waiter = None

    def finish(self, reusable: bool) -> None:
        """The exchange is over: give the connection back to the pool, or close it."""
        self._exchange = None
        if reusable and not self.closed:
            self.pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.closed = True

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()


def _expire(waiter: asyncio.Future, message: str) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout(message))


def _expire_read(waiter: asyncio.Future, what: str, setting: str, limit: float) -> None:
    """A read timeout expired: the message names the setting, so a log tells which one fired."""
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout(f"the upstream sent no {what} within {setting} ({Duration(limit)})"))


class Exchange:
    """The response to one request on one connection, as llhttp parses it.

    Two bounds, each on its own, the first to expire wins: ``read_timeout`` for the response
    head and then for each gap between body bytes, and ``per_try_timeout`` (when there is
    one) for the response head only. Neither lengthens the other.
    """

    __slots__ = (
        "connection", "loop", "head_request", "read_timeout", "per_try_timeout", "parser", "status", "reason",
        "headers", "head_bytes", "head_done", "complete", "error", "body", "buffered", "keep_alive", "_until_eof",
        "_waiter", "_paused", "content_length", "_transfer_encoding", "_chunked", "_saw_byte", "_connection_named",
    )

    def __init__(
        self, connection: UpstreamConnection, head_request: bool, read_timeout: float,
        per_try_timeout: float | None = None,
    ) -> None:
        self.connection = connection
        self.loop = connection.loop
        self.head_request = head_request
        self.read_timeout = read_timeout
        self.per_try_timeout = per_try_timeout
        self.parser = HttpResponseParser(self)
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.head_done = False
        self.complete = False
        self.error: GatewayError | None = None
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.keep_alive = False
        self._until_eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.content_length: bytes | None = None
        self._transfer_encoding = False
        self._chunked = False
        self._saw_byte = False
        self._connection_named: set[bytes] = set()

    # llhttp callbacks

    def on_message_begin(self) -> None:
        self.headers = []
        self.head_bytes = 0
        self.content_length = None
        self._transfer_encoding = False
        self._chunked = False
        self._connection_named = set()

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if len(self.headers) >= MAX_RESPONSE_HEADERS or self.head_bytes > MAX_RESPONSE_HEAD_BYTES:
            raise UpstreamInvalidResponse("the upstream response headers are larger than allowed")
        if b"\x00" in value or b"\r" in value or b"\n" in value:
            raise UpstreamInvalidResponse("the upstream sent a control character in a header")
        lower = name.lower()
        if lower == b"content-length":
            if self.content_length is not None and self.content_length != value:
                raise UpstreamInvalidResponse("the upstream sent conflicting Content-Length headers")
            self.content_length = value
        elif lower == b"transfer-encoding":
            self._transfer_encoding = True
            self._chunked = value.rstrip().lower().endswith(b"chunked")
        if lower in HOP_BY_HOP:
            if lower == b"connection":
                self._connection_named |= connection_tokens(value)
            return
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            self.reason = b""  # an interim 1xx answer: wait for the final one
            return
        if self._transfer_encoding and self.content_length is not None:
            raise UpstreamInvalidResponse("the upstream sent both Content-Length and Transfer-Encoding")
        if self._connection_named - CONNECTION_OPTIONS:
            named = self._connection_named
            self.headers = [(key, value) for key, value in self.headers if key.lower() not in named]
        self.status = status
        self.head_done = True
        no_body = self.head_request or status in _NO_BODY_STATUSES
        self._until_eof = not (no_body or self._chunked or self.content_length is not None)
        if no_body:
            self._complete(self.parser.should_keep_alive())
        self._wake()

    def on_body(self, data: bytes) -> None:
        if self.head_request:
            self.keep_alive = False  # a body after a HEAD answer: this connection is out of step
            return
        self.body.append(data)
        self.buffered += len(data)
        if self.buffered > BODY_HIGH_WATER and not self._paused:
            self._paused = True
            self.connection.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status and not self.complete:
            self._complete(self.parser.should_keep_alive())

    # feeding and failing

    def feed(self, data: bytes) -> None:
        self._saw_byte = True
        if self.complete:
            self.keep_alive = False
            return
        try:
            self.parser.feed_data(data)
        except GatewayError as exc:
            self.fail(exc)
        except HttpParserError as exc:
            cause = exc.__context__
            self.fail(cause if isinstance(cause, GatewayError) else UpstreamInvalidResponse())

    def connection_lost(self) -> None:
        if self.complete:
            return
        if self._until_eof:
            self._complete(False)
        elif not self._saw_byte:
            self.fail(PrematureClose())
        else:
            self.fail(UpstreamUnreachable("the upstream closed the connection in the middle of the response"))

    def fail(self, error: GatewayError) -> None:
        if self.error is None and not self.complete:
            self.error = error
            self.keep_alive = False
            self.connection.close()
            self._wake()

    def _complete(self, keep_alive: bool) -> None:
        self.complete = True
        self.keep_alive = keep_alive and not self._until_eof
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, timeout: float, what: str, setting: str, limit: float) -> None:
        self._waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, _expire_read, self._waiter, what, setting, limit)
        try:
            await self._waiter
        except UpstreamTimeout as exc:
            self.fail(exc)
            raise
        finally:
            timer.cancel()
            self._waiter = None

    # used by the proxy

    @property
    def saw_response(self) -> bool:
        return self._saw_byte

    async def head(self) -> None:
        """Wait for the status line and headers of the final response.

        Within ``read_timeout``, or ``per_try_timeout`` when that is shorter; the error names
        the one that expired.
        """
        if self.per_try_timeout is not None and self.per_try_timeout < self.read_timeout:
            limit, name = self.per_try_timeout, "per_try_timeout"
        else:
            limit, name = self.read_timeout, "read_timeout"
        deadline = self.loop.time() + limit
        while not self.head_done:
            if self.error is not None:
                raise self.error
            await self._wait(max(0.0, deadline - self.loop.time()), "response head", name, limit)
        if self.error is not None:
            raise self.error

    def take_buffered(self) -> bytes:
        """Every body byte received so far, at once."""
        chunks = self.body
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        self._resume()
        return data

    async def iter_body(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk as it arrives; raises the exchange's error."""
        while True:
            if self.body:
                yield self.take_buffered()
                continue
            if self.error is not None:
                raise self.error
            if self.complete:
                return
            await self._wait(self.read_timeout, "body bytes", "read_timeout", self.read_timeout)

    def _resume(self) -> None:
        if self._paused and self.buffered < BODY_LOW_WATER:
            self._paused = False
            self.connection.resume_reading()

    def release(self) -> None:
        """Hand the connection back once the whole response has been consumed."""
        self.connection.finish(self.complete and self.keep_alive and self.error is None and not self.body)
