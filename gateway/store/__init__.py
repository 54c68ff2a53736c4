"""Shared state for plugins: rate limits, keys with a TTL, counters. One interface, three homes.

- ``local`` (the default): a store process that the supervisor starts
  beside the workers and keeps for the life of the service, so it outlives
  reloads and worker crashes. Every worker of the host talks to it over a
  Unix socket (``gateway.store.local``), without ever blocking its event
  loop. Bounded by ``store.max_keys`` and ``store.max_bytes``, least
  recently used keys first out.
- ``redis``: Redis, Redis Cluster or Redis behind Sentinel, for several
  hosts (``gateway.store.redis``); multi-step operations are Lua scripts.
- in-process: the same table as the local store, called directly, for a
  gateway running on its own (tests).

Plugins never talk to Redis or the store process directly: they use
``gateway.store`` (the configured backend) and, as a fallback while Redis is
away, ``gateway.local_store``. Every operation either completes within
``store.timeout`` or raises ``StoreUnavailable``; what to do then is the
plugin's policy (``on_store_error``).

Keys are plain strings; the backend adds ``store.key_prefix``. For Redis
Cluster, put the part that must stay in one slot in braces (``{...}``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from .memory import Limit, LimitResult, MemoryTable

__all__ = ["Limit", "LimitResult", "Store", "StoreUnavailable", "InProcessStore"]


class StoreUnavailable(Exception):
    """The store did not answer in time or could not be reached."""


class Store(Protocol):
    name: str

    async def take(self, limits: Sequence[Limit]) -> list[LimitResult]:
        """Check rate limits and, only if all allow, count the request against every one."""

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float | None) -> None: ...

    async def delete(self, *keys: str) -> int: ...

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Add to a counter (created at 0 with ``ttl``); returns the new value."""

    async def add(self, key: str, value: bytes, ttl: float | None) -> bool:
        """Set ``key`` only if absent (a lock with an expiry); True if this call set it."""

    async def set_add(self, key: str, *members: str, ttl: float | None = None) -> int:
        """Add members to a set; ``ttl`` sets its expiry when it is created and extends it (never
        shortens it) when it exists. Returns the set's size."""

    async def set_members(self, key: str) -> list[str]: ...

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with ``prefix`` (an O(keys) scan: for purges, not requests)."""

    async def connect(self) -> None:
        """Prepare connections at worker start; failures are left for the first operations."""

    async def close(self) -> None: ...


class InProcessStore:
    """The local store's table inside this process: for a gateway running without a supervisor."""

    name = "local"

    def __init__(self, max_keys: int, max_bytes: int) -> None:
        self.table = MemoryTable(max_keys, max_bytes, time.monotonic)

    async def take(self, limits: Sequence[Limit]) -> list[LimitResult]:
        return self.table.take(limits)

    async def get(self, key: str) -> bytes | None:
        return self.table.get(key)

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        self.table.set(key, value, ttl)

    async def delete(self, *keys: str) -> int:
        return self.table.delete(keys)

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        return self.table.incr(key, amount, ttl)

    async def add(self, key: str, value: bytes, ttl: float | None) -> bool:
        return self.table.add(key, value, ttl)

    async def set_add(self, key: str, *members: str, ttl: float | None = None) -> int:
        return self.table.set_add(key, members, ttl)

    async def set_members(self, key: str) -> list[str]:
        return self.table.set_members(key)

    async def delete_prefix(self, prefix: str) -> int:
        return self.table.delete_prefix(prefix)

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

