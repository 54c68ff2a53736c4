"""An open-model load generator for tests: requests at a fixed rate, every outcome recorded.

Half the requests use a new connection each (exercising accept), half go over
a few keep-alive connections (exercising the drain of idle connections).
Loops are bounded by the duration; it only targets the given loopback port.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    sent: int = 0
    outcomes: Counter = field(default_factory=Counter)

    @property
    def failed(self) -> int:
        return self.sent - self.outcomes["200"]

    def __str__(self) -> str:
        return f"{self.sent} requests, outcomes {dict(self.outcomes)}"


async def _one_request(port: int, path: str) -> str:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    except (OSError, asyncio.TimeoutError) as exc:
        return f"connect:{type(exc).__name__}"
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: load\r\nConnection: close\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(-1), 10)
        return answer[9:12].decode() if answer.startswith(b"HTTP/1.1 ") else "empty"
    except (OSError, asyncio.TimeoutError) as exc:
        return type(exc).__name__
    finally:
        writer.close()


class KeepAliveClient:
    """One keep-alive connection; reconnects when the gateway says Connection: close."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.lock = asyncio.Lock()

    async def request(self, path: str) -> str:
        async with self.lock:
            try:
                if self.writer is None:
                    self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
                self.writer.write(f"GET {path} HTTP/1.1\r\nHost: load\r\n\r\n".encode())
                head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
                length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
                             .split(b":")[1])
                await self.reader.readexactly(length)
                if b"connection: close" in head.lower():
                    self.close()
                return head[9:12].decode()
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, StopIteration) as exc:
                self.close()
                return type(exc).__name__

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def constant_load(port: int, rate: float, duration: float, path: str = "/api/x", keepalive: int = 4) -> LoadResult:
    result = LoadResult()
    clients = [KeepAliveClient(port) for _ in range(keepalive)]
    tasks = []
    start = time.monotonic()
    interval = 1.0 / rate

    async def record(coroutine) -> None:
        result.outcomes[await coroutine] += 1

    while time.monotonic() - start < duration:
        if result.sent % 2 == 0 or not clients:
            coroutine = _one_request(port, path)
        else:
            coroutine = clients[result.sent % len(clients)].request(path)
        tasks.append(asyncio.create_task(record(coroutine)))
        result.sent += 1
        await asyncio.sleep(max(0.0, start + result.sent * interval - time.monotonic()))
    await asyncio.gather(*tasks)
    for client in clients:
        client.close()
    return result
