"""An open-model load generator for tests: requests at a fixed rate, every outcome recorded.

Half the requests use a new connection each (exercising accept), half go over
a few keep-alive connections (exercising the drain of idle connections).
Loops are bounded by the duration (or end earlier when ``stop`` is set); it only
targets the given loopback port. A test may pass its own ``LoadResult`` to watch the
load while it runs: ``in_flight`` at a given moment, successes since a moment.
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
    finished: list[tuple[float, str]] = field(default_factory=list)  # (monotonic start time, outcome)

    @property
    def failed(self) -> int:
        return self.sent - self.outcomes["200"]

    @property
    def in_flight(self) -> int:
        """Requests started and not finished at this moment."""
        return self.sent - len(self.finished)

    def succeeded_since(self, moment: float) -> int:
        """Requests started at or after ``moment`` (time.monotonic()) that got a 200."""
        return sum(1 for started, outcome in self.finished if started >= moment and outcome == "200")

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


async def constant_load(
    port: int, rate: float, duration: float, path: str = "/api/x", keepalive: int = 4, *,
    result: LoadResult | None = None, stop: asyncio.Event | None = None,
) -> LoadResult:
    result = LoadResult() if result is None else result
    clients = [KeepAliveClient(port) for _ in range(keepalive)]
    tasks = []
    start = time.monotonic()
    interval = 1.0 / rate

    async def record(coroutine) -> None:
        started = time.monotonic()
        outcome = await coroutine
        result.outcomes[outcome] += 1
        result.finished.append((started, outcome))

    while time.monotonic() - start < duration and not (stop is not None and stop.is_set()):
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
