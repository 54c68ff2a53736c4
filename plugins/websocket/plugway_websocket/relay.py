"""One proxied WebSocket, from the first message to the last close.

Two loops move messages, one per direction: the handler's task reads the client and writes
to the upstream, a second task does the reverse. Every send is awaited, and aiohttp's send
waits for the socket to drain once a writer has more than 64 KiB outstanding, so a side that
reads slowly stops the loop that writes to it, which stops reading the other side; aiohttp then
pauses that socket once 128 KiB of messages wait unread (see README.md, "Backpressure").

How each way of ending closes the other side:

- a close frame from one side goes to the other with the same code and reason, and is
  echoed back to the side that sent it;
- a side that disappears (no close frame, reset, missed heartbeat) or breaks the protocol
  (a message over ``max_message_size`` gets 1009, bad framing 1002, invalid UTF-8 1007, too
  many messages 1008) is gone: the upstream is then told 1001 (the client went away), the
  client 1011 (the upstream failed);
- the gateway's own reasons (``idle_timeout``, a draining worker) close both with 1001;
  a plugin hook failing closes the client with 1011.

Timers cost memory per connection, so a relay has none: the worker's sweeper
(``Relay.check``, called about once a second) applies the idle timeout and the heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType
from aiohttp.http_websocket import WebSocketError

from gateway import DROP, WebSocketMessage

if TYPE_CHECKING:
    from gateway import RequestContext

    from .limits import MessageRate

log = logging.getLogger("plugway.websocket")

TEXT, BINARY, PING, PONG, CLOSE = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.PING, WSMsgType.PONG, WSMsgType.CLOSE
NORMAL, GOING_AWAY, INVALID_DATA, POLICY, INTERNAL_ERROR = 1000, 1001, 1007, 1008, 1011
ABNORMAL = 1006  # never sent: the code of a connection that ended without a close frame
SEND_ERRORS = (OSError, RuntimeError)  # aiohttp raises ConnectionResetError subclasses on a closing socket
CLIENT_GONE = (GOING_AWAY, "client went away")


class Side:
    """One end of a relay (``name`` is "client" or "upstream") and what is known about it."""

    __slots__ = ("ws", "name", "heard", "pinged", "busy", "pongs_owed", "code", "messages", "bytes", "counters")

    def __init__(self, ws: Any, name: str, now: float, counters: tuple[Any, Any]) -> None:
        self.ws = ws
        self.name = name
        self.heard = now  # when the last frame came from this side
        self.pinged = 0.0  # when the gateway's heartbeat ping went unanswered since (0: none outstanding)
        self.busy = False  # a frame from this side is being passed on (it is not read meanwhile)
        self.pongs_owed = 0  # pings passed on to this side whose pongs go back to the other
        self.code: int | None = None  # the close code exchanged with this side
        self.messages = self.bytes = 0  # received from this side
        self.counters = counters  # its (messages, bytes) metric children


class Relay:
    """Both ends of one proxied WebSocket and what has passed between them."""

    __slots__ = (
        "ctx", "client", "upstream", "loop", "hooks", "rate", "idle_timeout", "heartbeat", "close_timeout",
        "last_activity", "ending", "closing", "opened",
    )

    def __init__(
        self, ctx: RequestContext, client: Any, upstream: Any, *, rate: MessageRate | None,
        counters: dict[str, tuple[Any, Any]], idle_timeout: float, heartbeat: float, close_timeout: float,
    ) -> None:
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        now = self.loop.time()
        self.client = Side(client, "client", now, counters["client"])
        self.upstream = Side(upstream, "upstream", now, counters["upstream"])
        self.hooks = ctx.route.chain.websocket_message
        self.rate = rate
        self.idle_timeout = idle_timeout
        self.heartbeat = heartbeat
        self.close_timeout = close_timeout
        self.last_activity = now  # the last message or ping passed on, either way
        self.ending = False
        self.closing: asyncio.Task | None = None
        self.opened = False

    # --- the life of the connection ----------------------------------------------------------------

    async def run(self) -> None:
        """Relay until both sides are closed; call the open and close hooks around it.

        aiohttp cancels the handler's task when the client's connection goes, which includes the
        gateway closing it: the closing itself runs in a task of its own (``end``), and this task
        waits for it through any such cancellation.
        """
        other = None
        try:
            if await self._open_hooks():
                other = self.loop.create_task(self._pump(self.upstream, self.client))
                try:
                    await self._pump(self.client, self.upstream)
                except asyncio.CancelledError:
                    asyncio.current_task().uncancel()
                    self._lost(self.client)
            await self._settle(other)
        finally:
            if self.opened:
                await self._close_hooks()

    def end(self, client: tuple[int, str] | None, upstream: tuple[int, str] | None) -> asyncio.Task:
        """Start closing the client and the upstream with these (code, reason); None leaves a side as it is.

        The first call decides; later ones get the same closing task.
        """
        if self.closing is None:
            self.ending = True
            self.closing = self.loop.create_task(self._close_both(client, upstream))
        return self.closing

    def going_away(self, reason: str) -> asyncio.Task:
        """Close both sides with 1001 (idle timeout, draining worker)."""
        return self.end((GOING_AWAY, reason), (GOING_AWAY, reason))

    def check(self, now: float) -> None:
        """The sweeper's visit: close an idle relay, ping a quiet side, cut one that never answered."""
        if self.ending:
            return
        if self.idle_timeout and now - self.last_activity >= self.idle_timeout:
            self.going_away("idle timeout")
            return
        if self.heartbeat:
            for side in (self.client, self.upstream):
                if side.busy or side.ws.closed:
                    continue  # a side is not read while its frame waits to be passed on
                if side.pinged:
                    if now - side.pinged >= self.heartbeat / 2:
                        _abort(side.ws)  # its loop then sees the connection end
                elif now - side.heard >= self.heartbeat:
                    side.pinged = now
                    self.ctx.gateway.spawn(_ping(side.ws))

    @property
    def close_code(self) -> int:
        """The close code exchanged with the client (1006 when its connection ended without one)."""
        return self.client.code or ABNORMAL

    # --- moving messages -------------------------------------------------------------------------

    async def _pump(self, source: Side, sink: Side) -> None:
        """Pass frames from ``source`` to ``sink`` until ``source`` ends or the relay is ending."""
        receive = source.ws.receive
        loop = self.loop
        try:
            while True:
                message = await receive()
                source.heard = now = loop.time()
                source.pinged = 0.0  # any frame shows the side is alive
                kind = message.type
                if kind is TEXT or kind is BINARY:
                    source.busy = True
                    passed = await self._forward(kind, message.data, source, sink, now)
                    source.busy = False
                    if not passed:
                        return
                elif kind is PING or kind is PONG:
                    source.busy = True
                    passed = await self._control(kind, message.data, source, sink, now)
                    source.busy = False
                    if not passed:
                        self._lost(sink)
                        return
                elif kind is CLOSE:
                    source.code = message.data or NORMAL  # a close frame without a code is answered with 1000
                    how = (source.code, message.extra or "")
                    self.end(how, how)
                    return
                else:  # CLOSING (the relay is closing this side), CLOSED, or ERROR
                    self._lost(source, message)
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the WebSocket relay failed", extra={"request_id": self.ctx.request_id})
            self.end((INTERNAL_ERROR, "gateway error"), (GOING_AWAY, "gateway error"))

    async def _forward(self, kind: WSMsgType, data: bytes, source: Side, sink: Side, now: float) -> bool:
        """Count, limit, filter and send one message; False when the relay is ending."""
        source.messages += 1
        source.bytes += len(data)
        messages, volume = source.counters
        messages.inc()
        volume.inc(len(data))
        self.last_activity = now
        if self.rate is not None and source is self.client and not self.rate.allow():
            self.end((POLICY, "message rate exceeded"), CLIENT_GONE)
            return False
        if self.hooks:
            try:
                filtered = await self._apply_hooks(kind, data, source.name)
            except UnicodeDecodeError:
                self._failed(source, INVALID_DATA, "invalid UTF-8 in a text message")
                return False
            if filtered is None:
                return True
            kind, data = filtered
        try:
            await sink.ws.send_frame(data, kind)
        except SEND_ERRORS:
            self._lost(sink)
            return False
        return True

    async def _control(self, kind: WSMsgType, data: bytes, source: Side, sink: Side, now: float) -> bool:
        """Pass a ping on, and a pong that answers a ping passed on; False if the sink is gone.

        Pongs answering the gateway's own heartbeat pings go no further.
        """
        try:
            if kind is PING:
                self.last_activity = now
                sink.pongs_owed += 1
                await sink.ws.ping(data)
            elif source.pongs_owed:
                source.pongs_owed -= 1
                await sink.ws.pong(data)
        except SEND_ERRORS:
            return False
        return True

    async def _apply_hooks(self, kind: WSMsgType, data: bytes, direction: str) -> tuple[WSMsgType, bytes] | None:
        """The message as the route's websocket_message hooks leave it, or None if one dropped it."""
        original = message = WebSocketMessage("text", data.decode("utf-8")) if kind is TEXT else WebSocketMessage("binary", data)
        ctx = self.ctx
        for hook in self.hooks:
            result = hook(ctx, message, direction)
            if result is not None and hasattr(result, "__await__"):
                result = await result
            if result is DROP:
                return None
            if result is not None:
                message = result
        if message is original:
            return kind, data
        payload = message.data.encode("utf-8") if isinstance(message.data, str) else bytes(message.data)
        return (TEXT if message.kind == "text" else BINARY), payload

    # --- ending ----------------------------------------------------------------------------------

    def _lost(self, side: Side, message: Any = None) -> None:
        """A side ended without a close frame (or aiohttp failed it for a protocol error)."""
        if self.ending:
            return
        error = message.data if message is not None and message.type is WSMsgType.ERROR else None
        side.code = error.code if isinstance(error, WebSocketError) else ABNORMAL
        if side is self.client:
            self.end(None, CLIENT_GONE)
        else:
            self.end((INTERNAL_ERROR, "upstream went away"), None)

    def _failed(self, side: Side, code: int, reason: str) -> None:
        """A side broke a rule: it gets ``code``; the other learns that its peer is gone."""
        if side is self.client:
            self.end((code, reason), CLIENT_GONE)
        else:
            self.end((INTERNAL_ERROR, "upstream failed"), (code, reason))

    async def _close_both(self, client: tuple[int, str] | None, upstream: tuple[int, str] | None) -> None:
        await asyncio.gather(self._close(self.client, client), self._close(self.upstream, upstream))

    async def _close(self, side: Side, how: tuple[int, str] | None) -> None:
        if how is None or side.ws.closed:
            return
        code, reason = how
        side.code = side.code or code
        try:
            async with asyncio.timeout(self.close_timeout):
                await side.ws.close(code=code, message=reason.encode("utf-8")[:123])
        except (TimeoutError, *SEND_ERRORS):
            _abort(side.ws)

    async def _settle(self, other: asyncio.Task | None) -> None:
        """Wait for the other loop and the closing; past the close timeout, cut both connections."""
        pending = {task for task in (other, self.closing) if task is not None and not task.done()}
        deadline = self.loop.time() + self.close_timeout + 1.0
        while pending:
            try:
                _, pending = await asyncio.wait(pending, timeout=max(deadline - self.loop.time(), 0))
            except asyncio.CancelledError:
                asyncio.current_task().uncancel()
                continue
            if pending and self.loop.time() >= deadline:
                _abort(self.client.ws)
                _abort(self.upstream.ws)
                for task in pending:
                    task.cancel()
                deadline += self.close_timeout

    # --- hooks -----------------------------------------------------------------------------------

    async def _open_hooks(self) -> bool:
        self.opened = True
        try:
            for hook in self.ctx.route.chain.websocket_open:
                result = hook(self.ctx)
                if result is not None and hasattr(result, "__await__"):
                    await result
        except Exception:
            log.exception("a websocket_open hook failed", extra={"request_id": self.ctx.request_id})
            self.end((INTERNAL_ERROR, "gateway error"), (GOING_AWAY, "gateway error"))
            return False
        return True

    async def _close_hooks(self) -> None:
        code = self.close_code
        for hook in self.ctx.route.chain.websocket_close:
            try:
                result = hook(self.ctx, code)
                if result is not None and hasattr(result, "__await__"):
                    await result
            except Exception:
                log.exception("a websocket_close hook failed", extra={"request_id": self.ctx.request_id})


async def _ping(ws: Any) -> None:
    try:
        await ws.ping()
    except SEND_ERRORS:
        pass  # the side's own loop sees the connection end


def _abort(ws: Any) -> None:
    """Cut a side's TCP connection at once (a peer that does not read never lets a close flush)."""
    transport = getattr(getattr(ws, "_writer", None), "transport", None)
    if transport is not None:
        transport.abort()
