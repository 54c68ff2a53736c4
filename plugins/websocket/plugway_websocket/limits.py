"""Limits on WebSocket connections: how many per worker and per consumer, and messages per second.

Connections are counted in the worker (``Connections``): the caps apply per worker process,
across every WebSocket route of it. A connection is counted from the moment its handshake is
admitted, so that handshakes waiting on the upstream count too.

The message rate is a token bucket per connection, with the arithmetic the rate limiting plugin
uses in the store (``gateway.store.memory``); it lives in the connection, so it needs no store.
"""

from __future__ import annotations

import time

from gateway.store import Limit
from gateway.store.memory import token_bucket

from .errors import TooManyForConsumer, WorkerFull


class MessageRate:
    """A token bucket of ``burst`` messages refilled at ``count`` per ``period`` seconds."""

    __slots__ = ("limit", "state", "clock")

    def __init__(self, count: int, period: float, burst: int = 0, clock=time.monotonic) -> None:
        self.limit = Limit("", "token_bucket", count, period, burst)
        self.clock = clock
        self.state = None

    def allow(self) -> bool:
        result, self.state = token_bucket(self.limit, self.state, self.clock())
        return result.allowed


class Connections:
    """Open (and opening) WebSocket connections of this worker, in total and by consumer."""

    __slots__ = ("total", "by_consumer")

    def __init__(self) -> None:
        self.total = 0
        self.by_consumer: dict[str, int] = {}

    def admit(self, consumer_key: str, per_worker: int, per_consumer: int) -> None:
        """Count one more connection, or raise the refusal (503 worker full, 429 consumer over its cap)."""
        if per_worker and self.total >= per_worker:
            raise WorkerFull()
        held = self.by_consumer.get(consumer_key, 0)
        if per_consumer and held >= per_consumer:
            raise TooManyForConsumer()
        self.total += 1
        self.by_consumer[consumer_key] = held + 1

    def release(self, consumer_key: str) -> None:
        self.total -= 1
        held = self.by_consumer[consumer_key] - 1
        if held:
            self.by_consumer[consumer_key] = held
        else:
            del self.by_consumer[consumer_key]


def consumer_key(consumer_id: str | None, client_ip: str) -> str:
    """Who a connection counts against: the consumer an auth plugin set, else the client address."""
    return f"c:{consumer_id}" if consumer_id is not None else f"ip:{client_ip}"
