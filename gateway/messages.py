"""The messages plugins see and change: the outgoing request and the responses.

- ``OutgoingRequest``: what will be sent upstream (upstream phase).
- ``UpstreamResponse``: what the target answered; its body streams unless a
  plugin reads it.
- ``Response``: an answer made by the gateway or a plugin, body in memory;
  returning one from a request-phase hook short-circuits the request.

Both responses offer the same interface to the response phase: ``status``,
``headers``, ``read``, ``set_body`` and ``wrap_body``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from multidict import CIMultiDict

from .errors import UpstreamInvalidResponse
from .headers import HeaderBlock, RawHeaders
from .upstream.connection import Exchange

BodyWrapper = Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]]


class OutgoingRequest:
    """The request the gateway is about to send to the upstream.

    Plugins may change ``method``, ``path`` (canonical and already stripped;
    keep it canonical), ``query`` (raw, without ``?``), ``headers`` and the
    body (``set_body``), and may send it to another upstream by setting
    ``upstream_name``.
    """

    __slots__ = ("method", "path", "query", "header_block", "body", "upstream_name")

    def __init__(self, method: str, path: str, query: str, headers: RawHeaders) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.header_block = HeaderBlock(headers)
        self.body: bytes | None = None
        self.upstream_name: str | None = None

    @property
    def headers(self) -> CIMultiDict[str]:
        return self.header_block.editable

    def set_body(self, body: bytes) -> None:
        """Send ``body`` instead of the client's; Content-Length follows it."""
        self.body = body

    def target_bytes(self) -> bytes:
        target = self.path + "?" + self.query if self.query else self.path
        return target.encode("latin-1")


class _ResponseBody:
    """Body handling shared by both responses: stream, buffer, replace or wrap."""

    __slots__ = ()

    @property
    def headers(self) -> CIMultiDict[str]:
        return self.header_block.editable

    async def read(self, limit: int) -> bytes:
        """The whole body in memory; a 502 if it is larger than ``limit`` bytes."""
        if self._body is None or self._wrappers:
            chunks, size = [], 0
            async for chunk in self.iter_body():
                size += len(chunk)
                if size > limit:
                    raise UpstreamInvalidResponse("the response is larger than a plugin can buffer")
                chunks.append(chunk)
            self._body = b"".join(chunks)
            self._wrappers = []
        return self._body

    def set_body(self, body: bytes) -> None:
        """Send ``body`` instead; Content-Length follows it."""
        self._body = body
        self._wrappers = []
        self.length_changed = True

    def wrap_body(self, wrapper: BodyWrapper) -> None:
        """Transform the body as it streams; its length becomes unknown (chunked)."""
        self._wrappers.append(wrapper)
        self.length_changed = True

    def iter_body(self) -> AsyncIterator[bytes]:
        stream = _once(self._body) if self._body is not None else self._stream()
        for wrapper in self._wrappers:
            stream = wrapper(stream)
        return stream

    def body_in_memory(self) -> bytes | None:
        """The whole body if it is known without waiting (and not wrapped), else None."""
        return None if self._wrappers else self._body


class Response(_ResponseBody):
    """A complete answer from the gateway itself."""

    status_reason = b""

    __slots__ = ("status", "reason", "header_block", "_body", "_wrappers", "length_changed")

    def __init__(
        self,
        status: int = 200,
        body: bytes | str = b"",
        headers: Iterable[tuple[str, str]] | CIMultiDict[str] = (),
        *,
        content_type: str | None = None,
    ) -> None:
        self.status = status
        self.reason = b""
        self._body = body.encode() if isinstance(body, str) else body
        self._wrappers: list[BodyWrapper] = []
        self.length_changed = True
        self.header_block = HeaderBlock([])
        editable = self.header_block.editable
        editable.extend(headers.items() if isinstance(headers, CIMultiDict) else headers)
        if content_type is not None:
            editable["Content-Type"] = content_type

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> Response:
        body = json.dumps(data, separators=(",", ":")).encode()
        return cls(status, body, headers, content_type="application/json")

    async def _stream(self) -> AsyncIterator[bytes]:
        yield self._body


@dataclass(frozen=True)
class WebSocketMessage:
    """One WebSocket message passing through the gateway (``websocket_message`` hook)."""

    kind: Literal["text", "binary"]
    data: str | bytes


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


DROP = _Drop()  # returned by a websocket_message hook: the message goes no further


class Upgraded(Response):
    """What a plugin returns once it has taken the connection over (a WebSocket it answered
    with 101 and served until the end): the gateway writes nothing more and closes the
    connection. Set ``ctx.bytes_in``/``bytes_out`` and ``ctx.log`` for the access log.

    While the plugin serves the connection, aiohttp cancels the request's task as soon as the
    client's side closes, also when the plugin closed it itself: close in a task of its own
    (or shield the closing) and expect ``CancelledError`` around it. Higher-priority plugins'
    ``on_response`` hooks see the ``Upgraded`` only after the connection has ended, so headers
    they set never reach the 101; add such headers in the plugin that answers the upgrade."""

    def __init__(self) -> None:
        super().__init__(101)


class UpstreamResponse(_ResponseBody):
    """The target's answer; the body streams through untouched unless a plugin
    reads, replaces or wraps it."""

    __slots__ = ("status", "reason", "header_block", "exchange", "_body", "_wrappers", "length_changed")

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.status = exchange.status
        self.reason = exchange.reason
        self.header_block = HeaderBlock(exchange.headers)
        self._body: bytes | None = None
        self._wrappers: list[BodyWrapper] = []
        self.length_changed = False

    @property
    def upstream_status(self) -> int:
        """The status the upstream answered, whatever a plugin has set ``status`` to since."""
        return self.exchange.status

    def body_in_memory(self) -> bytes | None:
        if self._body is None and not self._wrappers and self.exchange.complete and self.exchange.error is None:
            self._body = self.exchange.take_buffered()
        return super().body_in_memory()

    @property
    def content_length(self) -> int | None:
        """The body's length when the upstream declared it and no plugin changed the body, else None."""
        declared = self.exchange.content_length
        if self.length_changed or declared is None:
            return None
        return int(declared)

    @property
    def status_reason(self) -> bytes:
        """The upstream's reason phrase, or none if a plugin changed the status (the phrase was the old one's)."""
        return self.reason if self.status == self.exchange.status else b""

    def _stream(self) -> AsyncIterator[bytes]:
        return self.exchange.iter_body()


async def _once(body: bytes) -> AsyncIterator[bytes]:
    if body:
        yield body
