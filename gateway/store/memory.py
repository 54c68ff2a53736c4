"""The host-local store's data: a bounded table of keys with TTLs, and the operations on it.

Pure and synchronous: the store process (``gateway.store.local``) runs it
behind a socket for every worker of a host, and a gateway running on its own
(tests, ``gateway.testing``) calls it directly. Each operation is atomic
because one thread runs them one at a time.

Bounds: at most ``max_keys`` keys and ``max_bytes`` bytes of values (plus a
fixed overhead per key, ``KEY_OVERHEAD``); when full, the least recently used
keys go first. Expired keys are dropped when touched and by ``sweep``.

Rate limiting (see ``Limit``):

- token bucket: a bucket of ``burst`` tokens refilled at ``limit/period``
  per second; a request takes ``cost`` tokens or is refused.
- sliding window counter: the count of the current fixed window plus the
  previous window's count weighted by how much of it still overlaps the
  sliding window. It never admits more than ``limit`` within one fixed
  window; over an arbitrary sliding window it can admit more only when the
  previous window's traffic was bunched at its end, at worst up to twice the
  limit (Cloudflare measured 0.003% of requests wrongly admitted on real
  traffic).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

# Bytes of memory per key besides the key's characters and a bytes value: the entry, its state tuple,
# the ordered dict's slot and node. Measured: 1,000,000 token-bucket keys of ~40 characters took
# ~410 bytes each in the store process (loadtest/store_bench.py, RESULTS.md).
KEY_OVERHEAD = 390


class Limit(NamedTuple):
    """One rate limit to check for a request: ``limit`` per ``period`` seconds on ``key``."""

    key: str
    algorithm: str  # "token_bucket" | "sliding_window"
    limit: int
    period: float
    burst: int = 0  # token bucket capacity; 0 means ``limit``
    cost: int = 1


class LimitResult(NamedTuple):
    allowed: bool
    limit: int
    remaining: int
    reset: float  # seconds until the limit is fully available again (bucket full / window over)
    retry_after: float  # seconds until a refused request could pass; 0 when allowed


class MemoryTable:
    def __init__(self, max_keys: int, max_bytes: int, clock: Callable[[], float]) -> None:
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self.clock = clock
        self.bytes = 0
        self.evicted = 0
        self._data: OrderedDict[str, list[Any]] = OrderedDict()  # key -> [expires_at, value]

    def __len__(self) -> int:
        return len(self._data)

    # --- plain keys ------------------------------------------------------------------------------

    def get(self, key: str) -> Any:
        entry = self._live(key)
        if entry is None:
            return None
        return frozenset(entry[1]) if isinstance(entry[1], _Members) else entry[1]

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        self._store(key, value, self._expiry(ttl))

    def delete(self, keys: Sequence[str]) -> int:
        removed = 0
        for key in keys:
            entry = self._data.pop(key, None)
            if entry is not None:
                self.bytes -= _size(key, entry[1])
                removed += 1
        return removed

    def incr(self, key: str, amount: int, ttl: float | None) -> int:
        """Add to the integer at ``key`` (a number written with ``set`` counts, as in Redis);
        ``ttl`` applies only when this call creates the key."""
        entry = self._live(key)
        value = (_integer(entry[1]) if entry is not None else 0) + amount
        self._store(key, value, entry[0] if entry is not None else self._expiry(ttl))
        return value

    def add(self, key: str, value: Any, ttl: float | None) -> bool:
        """Set ``key`` only if it is absent (a lock, a first writer wins); True if it was set."""
        if self._live(key) is not None:
            return False
        self._store(key, value, self._expiry(ttl))
        return True

    def set_add(self, key: str, members: Sequence[str], ttl: float | None) -> int:
        """Add members to the set at ``key``, in place; ``ttl`` sets its expiry when it is created
        and extends it (never shortens it) when it exists. Returns the set's size."""
        entry = self._live(key)
        if entry is None or not isinstance(entry[1], _Members):
            stored = _Members(members)
            self._store(key, stored, self._expiry(ttl))
            return len(stored)
        stored = entry[1]
        added = [member for member in set(members) if member not in stored]
        stored.update(added)
        grown = sum(_member_size(member) for member in added)
        stored.size += grown
        self.bytes += grown
        entry[0] = _later(entry[0], self._expiry(ttl))
        self._evict()
        return len(stored)

    def set_members(self, key: str) -> list[str]:
        entry = self._live(key)
        return sorted(entry[1]) if entry is not None and isinstance(entry[1], _Members) else []

    def delete_prefix(self, prefix: str) -> int:
        return self.delete([key for key in self._data if key.startswith(prefix)])

    # --- rate limits -----------------------------------------------------------------------------

    def take(self, limits: Sequence[Limit]) -> list[LimitResult]:
        """Check every limit; take from all of them only if all allow (all or nothing)."""
        now = self.clock()
        results = [_evaluate(limit, self.get(limit.key), now) for limit in limits]
        if all(result.allowed for result, _ in results):
            for limit, (_, new_state) in zip(limits, results):
                self._store(limit.key, new_state, now + _state_ttl(limit))
        return [result for result, _ in results]

    # --- housekeeping ----------------------------------------------------------------------------

    def sweep(self, budget: int = 1000) -> int:
        """Drop up to ``budget`` expired keys, oldest-used first; returns how many went."""
        now = self.clock()
        expired = []
        for index, (key, entry) in enumerate(self._data.items()):
            if index >= budget:
                break
            if entry[0] is not None and entry[0] <= now:
                expired.append(key)
        return self.delete(expired)

    def _expiry(self, ttl: float | None) -> float | None:
        return None if ttl is None else self.clock() + ttl

    def _live(self, key: str) -> list[Any] | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[0] is not None and entry[0] <= self.clock():
            self.delete([key])
            return None
        self._data.move_to_end(key)
        return entry

    def _store(self, key: str, value: Any, expires_at: float | None) -> None:
        old = self._data.get(key)
        if old is not None:
            self.bytes -= _size(key, old[1])
            old[0], old[1] = expires_at, value
            self._data.move_to_end(key)
        else:
            self._data[key] = [expires_at, value]
        self.bytes += _size(key, value)
        self._evict()

    def _evict(self) -> None:
        while len(self._data) > self.max_keys or self.bytes > self.max_bytes:
            oldest, entry = self._data.popitem(last=False)
            self.bytes -= _size(oldest, entry[1])
            self.evicted += 1


class _Members(set):
    """A stored set, with the bytes its members account for kept up to date."""

    __slots__ = ("size",)

    def __init__(self, members: Sequence[str]) -> None:
        super().__init__(members)
        self.size = sum(_member_size(member) for member in self)


def _integer(value: Any) -> int:
    if isinstance(value, int):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _member_size(member: str) -> int:
    return len(member) + 80


def _later(expires_at: float | None, wanted: float | None) -> float | None:
    """An expiry extended to ``wanted``: None (no expiry) stays None, and so does no new ttl."""
    if expires_at is None or wanted is None:
        return expires_at
    return max(expires_at, wanted)


def _size(key: str, value: Any) -> int:
    if isinstance(value, _Members):
        return KEY_OVERHEAD + len(key) + value.size
    return KEY_OVERHEAD + len(key) + (len(value) if isinstance(value, (bytes, str)) else 0)


def _state_ttl(limit: Limit) -> float:
    return limit.period * 2 if limit.algorithm == "sliding_window" else limit.period * max(1.0, _burst(limit) / limit.limit)


def _burst(limit: Limit) -> int:
    return limit.burst or limit.limit


def _evaluate(limit: Limit, state: Any, now: float) -> tuple[LimitResult, Any]:
    if limit.algorithm == "token_bucket":
        return token_bucket(limit, state, now)
    return _sliding_window(limit, state, now)


def token_bucket(limit: Limit, state: Any, now: float) -> tuple[LimitResult, Any]:
    """One token-bucket decision: the result and the new state (``None`` starts a full bucket).
    Public for plugins that keep a per-connection bucket in memory (WebSocket message rates)."""
    capacity = _burst(limit)
    rate = limit.limit / limit.period
    tokens, last = state if isinstance(state, tuple) and len(state) == 2 else (float(capacity), now)
    tokens = min(float(capacity), tokens + (now - last) * rate)
    allowed = tokens >= limit.cost
    if allowed:
        tokens -= limit.cost
    retry_after = 0.0 if allowed else (limit.cost - tokens) / rate
    reset = (capacity - tokens) / rate
    return LimitResult(allowed, capacity, int(math.floor(tokens)), reset, retry_after), (tokens, now)


def _sliding_window(limit: Limit, state: Any, now: float) -> tuple[LimitResult, Any]:
    period = limit.period
    window = math.floor(now / period)
    start, current, previous = state if isinstance(state, tuple) and len(state) == 3 else (window, 0, 0)
    if window != start:
        previous = current if window == start + 1 else 0
        current, start = 0, window
    elapsed = now - window * period
    weight = 1.0 - elapsed / period
    estimate = previous * weight + current
    allowed = estimate + limit.cost <= limit.limit
    if allowed:
        current += limit.cost
        estimate += limit.cost
    remaining = max(0, int(limit.limit - math.ceil(estimate)))
    reset = period - elapsed
    if allowed:
        retry_after = 0.0
    elif previous and current + limit.cost <= limit.limit:
        # wait until enough of the previous window has slid out
        needed = (estimate + limit.cost - limit.limit) / previous * period
        retry_after = min(needed, reset)
    else:
        retry_after = reset
    return LimitResult(allowed, limit.limit, remaining, reset, retry_after), (start, current, previous)
