"""The host-local store: one process per host holding the table, and the workers' client.

The supervisor forks the store process before the workers and restarts it if
it dies (its contents are then lost, as with a Redis restart). Workers send
requests over a Unix socket in the runtime directory (mode 0600): a frame is
a 4-byte length and a ``marshal``-encoded tuple ``(id, op, args)``; replies
are ``(id, ok, result)``. Requests from one worker are pipelined on one
connection; the store process runs each operation to completion before the
next, which makes every operation atomic across workers.
"""

from __future__ import annotations

import asyncio
import itertools
import marshal
import os
import signal
import struct
import time
from collections.abc import Sequence
from typing import Any

from . import StoreUnavailable
from .memory import Limit, LimitResult, MemoryTable

_LENGTH = struct.Struct(">I")
MAX_FRAME = 16 * 1024 * 1024
SWEEP_INTERVAL = 1.0


# --- the store process ------------------------------------------------------------------------------


class StoreServer:
    def __init__(self, path: str, max_keys: int, max_bytes: int) -> None:
        self.path = path
        self.table = MemoryTable(max_keys, max_bytes, time.monotonic)
        self.operations = {
            "take": lambda limits: [tuple(r) for r in self.table.take([Limit(*limit) for limit in limits])],
            "get": self.table.get,
            "set": self.table.set,
            "delete": self.table.delete,
            "incr": self.table.incr,
            "add": self.table.add,
            "set_add": self.table.set_add,
            "set_members": self.table.set_members,
            "delete_prefix": self.table.delete_prefix,
            "stats": lambda: {"keys": len(self.table), "bytes": self.table.bytes, "evicted": self.table.evicted},
        }

    async def serve(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        loop = asyncio.get_running_loop()
        # Listening under a staging name, then renamed: the path appears only once connections
        # are accepted (whoever waits for it may connect at once), and only with mode 0600.
        staging = f"{self.path}.{os.getpid()}"
        umask = os.umask(0o177)
        try:
            server = await loop.create_unix_server(lambda: _ServerConnection(self.operations), staging)
        finally:
            os.umask(umask)
        os.replace(staging, self.path)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            loop.add_signal_handler(signum, stop.set)
        sweeper = loop.create_task(self._sweep())
        await stop.wait()
        sweeper.cancel()
        server.close()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.table.sweep()


class _Frames(asyncio.Protocol):
    """Splits the byte stream into frames and hands each one to ``frame``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset = 0
        while len(buffer) - offset >= 4:
            (length,) = _LENGTH.unpack_from(buffer, offset)
            if length > MAX_FRAME:
                self.transport.close()
                return
            if len(buffer) - offset - 4 < length:
                break
            frame = bytes(buffer[offset + 4:offset + 4 + length])
            offset += 4 + length
            try:
                self.frame(marshal.loads(frame))
            except (ValueError, EOFError, TypeError):
                self.transport.close()
                return
        del buffer[:offset]

    def send(self, message: Any) -> None:
        """Raises ValueError for what marshal cannot encode or a frame over MAX_FRAME."""
        payload = marshal.dumps(message)
        if len(payload) > MAX_FRAME:
            raise ValueError(f"{len(payload)} bytes is over the store's frame limit of {MAX_FRAME}")
        self.transport.write(_LENGTH.pack(len(payload)) + payload)

    def frame(self, message: Any) -> None:
        raise NotImplementedError


class _ServerConnection(_Frames):
    def __init__(self, operations: dict) -> None:
        super().__init__()
        self.operations = operations

    def frame(self, message: Any) -> None:
        request_id, op, args = message
        try:
            self.send((request_id, True, self.operations[op](*args)))
        except Exception as exc:  # an operation's failure goes back to its caller
            self.send((request_id, False, f"{type(exc).__name__}: {exc}"))


def run_store_process(path: str, max_keys: int, max_bytes: int) -> None:
    """The body of the forked store process."""
    asyncio.run(StoreServer(path, max_keys, max_bytes).serve())


# --- the workers' client ----------------------------------------------------------------------------


class LocalStore:
    """A worker's connection to the store process; reconnects on the next call after a failure."""

    name = "local"

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._connection: _ClientConnection | None = None
        self._connecting: asyncio.Lock | None = None

    async def take(self, limits: Sequence[Limit]) -> list[LimitResult]:
        return [LimitResult(*result) for result in await self._call("take", [tuple(limit) for limit in limits])]

    async def get(self, key: str) -> Any:
        return await self._call("get", key)

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        await self._call("set", key, value, _seconds(ttl))

    async def delete(self, *keys: str) -> int:
        return await self._call("delete", list(keys))

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        return await self._call("incr", key, amount, _seconds(ttl))

    async def add(self, key: str, value: bytes, ttl: float | None) -> bool:
        return await self._call("add", key, value, _seconds(ttl))

    async def set_add(self, key: str, *members: str, ttl: float | None = None) -> int:
        return await self._call("set_add", key, list(members), _seconds(ttl))

    async def set_members(self, key: str) -> list[str]:
        return await self._call("set_members", key)

    async def delete_prefix(self, prefix: str) -> int:
        return await self._call("delete_prefix", prefix)

    async def stats(self) -> dict[str, int]:
        return await self._call("stats")

    async def connect(self) -> None:
        try:
            await self._connect()
        except OSError:
            pass  # the first operations retry

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.transport.close()
            self._connection = None

    async def _call(self, op: str, *args: Any) -> Any:
        try:
            async with asyncio.timeout(self.timeout):
                connection = self._connection
                if connection is None or connection.closed:
                    connection = await self._connect()
                ok, result = await connection.request(op, args)
        except TimeoutError:
            raise StoreUnavailable(f"the local store did not answer {op} within {self.timeout * 1000:.0f} ms") from None
        except OSError as exc:
            raise StoreUnavailable(f"the local store is unreachable: {exc.strerror or exc}") from None
        except ValueError as exc:  # this operation only; the connection stays up for the others
            raise StoreUnavailable(f"the local store cannot take {op}: {exc}") from None
        if not ok:
            raise StoreUnavailable(f"the local store failed {op}: {result}")
        return result

    async def _connect(self) -> _ClientConnection:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._connection is None or self._connection.closed:
                loop = asyncio.get_running_loop()
                _, self._connection = await loop.create_unix_connection(_ClientConnection, self.path)
            return self._connection


def _seconds(ttl: float | None) -> float | None:
    """A plain float: marshal refuses subclasses such as the configuration's Duration."""
    return None if ttl is None else float(ttl)


class _ClientConnection(_Frames):
    """Pipelines requests on one connection; replies are matched to requests by id."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()

    def request(self, op: str, args: tuple) -> asyncio.Future:
        request_id = next(self._ids)
        self.send((request_id, op, args))  # before registering: a refused frame leaves nothing pending
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        future.add_done_callback(lambda _: self._pending.pop(request_id, None))
        return future

    def frame(self, message: Any) -> None:
        request_id, ok, result = message
        future = self._pending.get(request_id)
        if future is not None and not future.done():
            future.set_result((ok, result))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(StoreUnavailable("the local store closed the connection"))
