"""The client's end of a proxied WebSocket: aiohttp's server-side WebSocket with the gateway's rules.

Two things differ from ``aiohttp.web.WebSocketResponse``:

- Frames from the client must be masked (RFC 6455 section 5.1: "a server MUST close the
  connection upon receiving a frame that is not masked"); aiohttp's parser accepts unmasked
  ones. ``MaskedFramesOnly`` reads the frame headers on their way into the parser and fails
  the connection with 1002 (protocol error) at the first unmasked frame. It looks at headers
  only and skips payloads, so its cost is per frame, not per byte.
- The 101 carries no ``Date`` or ``Server`` of the gateway's (as no other gateway answer
  does); the upstream's own, if it sent them, are relayed. Once sent, the 101's headers are
  dropped.
"""

from __future__ import annotations

from typing import Any

from aiohttp import WSCloseCode, hdrs, web
from aiohttp.http_websocket import WebSocketError

_HEADER_BASE = 2
_MASK_BIT = 0x80


class ClientSocket(web.WebSocketResponse):
    def __init__(self, *, relayed_headers: list[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.headers.extend(relayed_headers)

    async def prepare(self, request: Any) -> Any:
        writer = await super().prepare(request)
        self.headers.clear()  # sent: nothing reads them again, and idle connections add up
        return writer

    async def _prepare_headers(self) -> None:
        relayed = [name for name in (hdrs.DATE, hdrs.SERVER) if name in self.headers]
        await super()._prepare_headers()
        for name in (hdrs.DATE, hdrs.SERVER):
            if name not in relayed:
                self.headers.popall(name, None)

    def _post_start(self, request: Any, protocol: str | None, writer: Any) -> None:
        # Bytes the client sent right behind its handshake wait in the connection's tail; they are
        # fed through the check like every later byte, so that it starts on a frame boundary.
        connection = request.protocol
        tail, connection._message_tail = connection._message_tail, b""
        super()._post_start(request, protocol, writer)
        check = MaskedFramesOnly(connection._payload_parser, self._reader)
        connection._payload_parser = check
        if tail:
            eof, _ = check.feed_data(tail)
            if eof:
                connection.close()


class MaskedFramesOnly:
    """Stands between the connection and aiohttp's WebSocket parser; fails the connection at an unmasked frame."""

    __slots__ = ("parser", "queue", "header", "skip", "failed")

    def __init__(self, parser: Any, queue: Any) -> None:
        self.parser = parser
        self.queue = queue
        self.header = bytearray()
        self.skip = 0
        self.failed = False

    def feed_eof(self) -> None:
        self.parser.feed_eof()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self.failed:
            return True, b""
        if not self._all_masked(data):
            self.failed = True
            self.queue.set_exception(WebSocketError(WSCloseCode.PROTOCOL_ERROR, "the client sent an unmasked frame"))
            return True, b""
        return self.parser.feed_data(data)

    def _all_masked(self, data: bytes) -> bool:
        """Walk the frame headers in ``data`` (a header may be split across calls)."""
        position, size = 0, len(data)
        header = self.header
        while position < size:
            if self.skip:
                step = min(self.skip, size - position)
                self.skip -= step
                position += step
                continue
            needed = _header_length(header)
            take = min(needed - len(header), size - position)
            header += data[position:position + take]
            position += take
            if len(header) < needed or len(header) < _header_length(header):
                continue
            if not header[1] & _MASK_BIT:
                return False
            self.skip = _payload_length(header)
            header.clear()
        return True


def _header_length(header: bytearray) -> int:
    """How many header bytes the frame starting with ``header`` has (2 while the second byte is unknown)."""
    if len(header) < _HEADER_BASE:
        return _HEADER_BASE
    length = header[1] & 0x7F
    extended = 2 if length == 126 else 8 if length == 127 else 0
    return _HEADER_BASE + extended + (4 if header[1] & _MASK_BIT else 0)


def _payload_length(header: bytearray) -> int:
    length = header[1] & 0x7F
    if length == 126:
        return int.from_bytes(header[2:4], "big")
    if length == 127:
        return int.from_bytes(header[2:10], "big")
    return length
