"""The WebSocket upstream of the plugin's tests (an aiohttp server) and what it records.

Its behaviour is chosen by path (see ``ws_handler``); the fixtures in conftest.py start it in the
test's event loop or in a thread of its own.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

MIB = 1 << 20


@dataclass
class UpstreamRecord:
    """What the upstream saw: its handshakes, the messages, pings and pongs it got, how each WebSocket ended."""

    handshakes: list[dict[str, Any]] = field(default_factory=list)
    received: list[Any] = field(default_factory=list)
    pings: list[bytes] = field(default_factory=list)
    pongs: list[bytes] = field(default_factory=list)
    closes: list[tuple[int | None, str]] = field(default_factory=list)
    sent_bytes: int = 0
    received_bytes: int = 0  # by ``/sink``
    start_reading: threading.Event = field(default_factory=threading.Event)  # set by the test: ``/sink`` reads


async def _echo(ws: web.WebSocketResponse, record: UpstreamRecord) -> None:
    """Echo messages; "close-me" closes with 4001, "ping-me" pings the client; pings are answered by hand."""
    while True:
        message = await ws.receive()
        if message.type is WSMsgType.TEXT:
            record.received.append(message.data)
            if message.data == "close-me":
                await ws.close(code=4001, message=b"upstream says bye")
                record.closes.append((4001, "sent"))
                return
            if message.data == "ping-me":
                await ws.ping(b"from upstream")
                continue
            await ws.send_str(message.data)
        elif message.type is WSMsgType.BINARY:
            record.received.append(message.data)
            await ws.send_bytes(message.data)
        elif message.type is WSMsgType.PING:
            record.pings.append(message.data)
            await ws.pong(message.data)
        elif message.type is WSMsgType.PONG:
            record.pongs.append(message.data)
        elif message.type is WSMsgType.CLOSE:
            record.closes.append((message.data, message.extra))
            await ws.close()
            return
        else:  # CLOSED or ERROR: the connection ended without a close frame
            record.closes.append((None, "gone"))
            return


async def _flood(ws: web.WebSocketResponse, record: UpstreamRecord, total: int, size: int) -> None:
    """Send ``total`` bytes in binary messages of ``size`` bytes, each send awaited (the gateway sets the pace)."""
    chunk = b"\x01" * size
    try:
        while record.sent_bytes < total:
            await ws.send_bytes(chunk)
            record.sent_bytes += len(chunk)
    except ConnectionError:
        return
    message = await ws.receive()
    record.closes.append((message.data, message.extra))


async def _sink(ws: web.WebSocketResponse, record: UpstreamRecord) -> None:
    """Read nothing until the test sets ``record.start_reading``, then count the bytes of binary messages."""
    while not record.start_reading.is_set():
        await asyncio.sleep(0.05)
    while (message := await ws.receive()).type is WSMsgType.BINARY:
        record.received_bytes += len(message.data)
    record.closes.append((message.data, message.extra))
    await ws.close()


async def ws_handler(request: web.BaseRequest, record: UpstreamRecord) -> web.StreamResponse:
    """The upstream: ``/echo...`` echoes, ``/die`` resets its connection after the first message,
    ``/refuse`` answers 403, ``/plain`` is plain HTTP, ``/flood?mib=N&size=S`` sends N MiB in messages
    of S bytes (default 1 MiB), ``/sink`` reads nothing until told to (``_sink``)."""
    if request.path == "/refuse":
        return web.Response(status=403, text="no")
    if request.path == "/plain":
        return web.Response(text="plain http", headers={"X-Path": request.path_qs})
    ws = web.WebSocketResponse(protocols=("chat.v2", "json"), max_msg_size=32 * MIB, autoping=False, autoclose=False)
    ws.headers["Set-Cookie"] = "upstream=1"
    await ws.prepare(request)
    record.handshakes.append({"path": request.path_qs, "headers": request.headers.copy(), "protocol": ws.ws_protocol})
    if request.path == "/die":
        await ws.receive()
        request.transport.abort()
    elif request.path.startswith("/flood"):
        await _flood(ws, record, int(request.query["mib"]) * MIB, int(request.query.get("size", MIB)))
    elif request.path == "/sink":
        await _sink(ws, record)
    else:
        await _echo(ws, record)
    return ws


class ThreadedUpstream:
    """The same upstream in a thread with its own event loop, for tests whose waits block the test's loop
    (``plugway_process`` start and reload helpers wait synchronously)."""

    def __init__(self) -> None:
        self.record = UpstreamRecord()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _listen(self) -> tuple[web.Server, asyncio.AbstractServer]:
        server = web.Server(lambda request: ws_handler(request, self.record))
        return server, await self.loop.create_server(server, "127.0.0.1", 0)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server, listening = self.loop.run_until_complete(self._listen())
        self.port = listening.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()
        listening.close()
        self.loop.run_until_complete(server.shutdown(1))
        self.loop.close()

    def start(self) -> ThreadedUpstream:
        self.thread.start()
        if not self.ready.wait(10):
            raise AssertionError("the threaded upstream did not start")
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class PeakRss:
    """Samples a process's resident memory (VmRSS) in a thread while a test runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
