"""The store on Redis, Redis Cluster or Redis behind Sentinel (redis-py's asyncio client).

Every multi-step operation is one Lua script (sent with EVALSHA; redis-py
loads it again on NOSCRIPT), using Redis's own clock (``TIME``) so that the
hosts sharing a limit agree on time. Each worker has its own connection pool.

A rate-limit check over several keys is one script, atomic, on a single
Redis. On Redis Cluster the keys of one request usually live in different
slots, so each key is checked atomically on its own, in order, and when a
later one refuses, the ones already taken are given back (the all-or-nothing
result holds; a concurrent request may briefly see the refunded tokens as
taken). A sliding window's count goes back to the window it was counted in:
if another request rolled the window meanwhile, that count is now the
previous window's, and older ones are gone, so nothing else is decremented.

The password comes from the URL (redis-py reads ``redis://:PASSWORD@host``)
or from ``password_env``; it is masked in every error raised from here.
``rediss://`` verifies the server against ``tls_ca_file`` or the system's CAs.

At most ``pool_size`` operations of a worker are in flight at once; more wait
for a connection (within the timeout). Failures (connection refused,
timeouts, cluster errors) raise ``StoreUnavailable``. After one, operations fail at once for
``retry_interval`` instead of each waiting out the timeout, then Redis is
tried again: limits are enforced again at most that long after Redis returns.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from ..config.model import StoreSettings, parse_address
from . import StoreUnavailable
from .memory import Limit, LimitResult

_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local results, states, all = {}, {}, true
for i = 1, #KEYS do
  local b = (i - 1) * 5
  local algo, limit, period = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local burst, cost = tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])
  if burst == 0 then burst = limit end
  if algo == 'token_bucket' then
    local rate = limit / period
    local s = redis.call('HMGET', KEYS[i], 't', 'ts')
    local tokens, ts = tonumber(s[1]) or burst, tonumber(s[2]) or now
    tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
    local allowed = tokens >= cost
    if allowed then tokens = tokens - cost end
    local retry = 0
    if not allowed then retry = (cost - tokens) / rate end
    results[i] = {allowed and 1 or 0, burst, math.floor(tokens), tostring((burst - tokens) / rate), tostring(retry),
                  '0'}
    states[i] = {'t', tostring(tokens), 'ts', tostring(now), math.ceil(period * math.max(1, burst / limit) * 1000)}
    all = all and allowed
  else
    local window = math.floor(now / period)
    local s = redis.call('HMGET', KEYS[i], 'w', 'c', 'p')
    local start, cur, prev = tonumber(s[1]) or window, tonumber(s[2]) or 0, tonumber(s[3]) or 0
    if window ~= start then
      if window == start + 1 then prev = cur else prev = 0 end
      cur, start = 0, window
    end
    local elapsed = now - window * period
    local est = prev * (1 - elapsed / period) + cur
    local allowed = est + cost <= limit
    if allowed then cur = cur + cost; est = est + cost end
    local reset = period - elapsed
    local retry = 0
    if not allowed then
      retry = reset
      if prev > 0 and cur + cost <= limit then retry = math.min(reset, (est + cost - limit) / prev * period) end
    end
    results[i] = {allowed and 1 or 0, limit, math.max(0, limit - math.ceil(est)), tostring(reset), tostring(retry),
                  tostring(start)}
    states[i] = {'w', start, 'c', cur, 'p', prev, math.ceil(period * 2000)}
    all = all and allowed
  end
end
if all then
  for i = 1, #KEYS do
    local s = states[i]
    if #s == 5 then
      redis.call('HSET', KEYS[i], s[1], s[2], s[3], s[4])
      redis.call('PEXPIRE', KEYS[i], s[5])
    else
      redis.call('HSET', KEYS[i], s[1], s[2], s[3], s[4], s[5], s[6])
      redis.call('PEXPIRE', KEYS[i], s[7])
    end
  end
end
return results
"""

_REFUND = """
local algo, cost, burst = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if algo == 'token_bucket' then
  local tokens = tonumber(redis.call('HGET', KEYS[1], 't')) or 0
  redis.call('HSET', KEYS[1], 't', tostring(math.min(burst, tokens + cost)))
  return 1
end
-- a sliding window: give the count back to the window it was counted in. If another request
-- rolled the window meanwhile, that count is now the previous window's; older, it is gone.
local window = tonumber(ARGV[4])
local start = tonumber(redis.call('HGET', KEYS[1], 'w'))
local field
if start == window then field = 'c' elseif start == window + 1 then field = 'p' else return 0 end
local count = tonumber(redis.call('HGET', KEYS[1], field)) or 0
redis.call('HSET', KEYS[1], field, math.max(0, count - cost))
return 1
"""

_INCR = """
local existed = redis.call('EXISTS', KEYS[1])
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if existed == 0 and tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return value
"""


_SET_ADD = """
local existed = redis.call('EXISTS', KEYS[1])
redis.call('SADD', KEYS[1], unpack(ARGV, 2))
local wanted = tonumber(ARGV[1])
if wanted > 0 then
  local left = redis.call('PTTL', KEYS[1])
  if existed == 0 or (left >= 0 and left < wanted) then redis.call('PEXPIRE', KEYS[1], wanted) end
end
return redis.call('SCARD', KEYS[1])
"""


def _glob_escape(text: str) -> str:
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


class RedisStore:
    name = "redis"

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self.prefix = settings.key_prefix
        self.timeout = settings.timeout
        self.client = _client(settings)
        self.cluster = settings.cluster
        self._take = self.client.register_script(_TAKE)
        self._refund = self.client.register_script(_REFUND)
        self._incr = self.client.register_script(_INCR)
        self._set_add = self.client.register_script(_SET_ADD)
        self._failed_until = 0.0
        # redis-py's pools raise at once when all connections are busy: wait for one here instead.
        self._slots = asyncio.Semaphore(settings.pool_size)

    async def connect(self) -> None:
        """Learn the cluster's slots before traffic arrives (concurrent first requests would each try)."""
        if self.cluster:
            try:
                await self._call(self.client.initialize)
            except StoreUnavailable:
                pass  # retried by the first operations after retry_interval

    async def take(self, limits: Sequence[Limit]) -> list[LimitResult]:
        if self.cluster and len(limits) > 1:
            return await self._take_per_slot(limits)
        return await self._call(self._take_script, limits)

    async def _take_script(self, limits: Sequence[Limit]) -> list[LimitResult]:
        return [result for result, _ in await self._take_rows(limits)]

    async def _take_rows(self, limits: Sequence[Limit]) -> list[tuple[LimitResult, str]]:
        """Each limit's result and the window its count went into (sliding windows; "0" otherwise)."""
        args: list[Any] = []
        for limit in limits:
            args += [limit.algorithm, limit.limit, limit.period, limit.burst, limit.cost]
        rows = await self._take(keys=[self.prefix + limit.key for limit in limits], args=args)
        return [(LimitResult(bool(row[0]), int(row[1]), int(row[2]), float(row[3]), float(row[4])), _text(row[5]))
                for row in rows]

    async def _take_per_slot(self, limits: Sequence[Limit]) -> list[LimitResult]:
        """One script per key (the keys of a request live in different slots), in order; when one
        refuses, the counts already taken are given back, each to the window it went into."""
        taken: list[tuple[Limit, str]] = []
        results: list[LimitResult] = []
        for limit in limits:
            ((result, window),) = await self._call(self._take_rows, [limit])
            results.append(result)
            if not result.allowed:
                for earlier, earlier_window in taken:
                    await self._call(self._refund_one, earlier, earlier_window)
                return results + [LimitResult(True, l.limit, 0, 0.0, 0.0) for l in limits[len(results):]]
            taken.append((limit, window))
        return results

    async def _refund_one(self, limit: Limit, window: str) -> None:
        await self._refund(keys=[self.prefix + limit.key],
                           args=[limit.algorithm, limit.cost, limit.burst or limit.limit, window])

    async def get(self, key: str) -> bytes | None:
        return await self._call(self.client.get, self.prefix + key)

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        expiry = max(1, int(ttl * 1000)) if ttl is not None else None
        await self._call(self.client.set, self.prefix + key, value, px=expiry)

    async def delete(self, *keys: str) -> int:
        total = 0
        for key in keys:  # one by one: on a cluster the keys may live in different slots
            total += await self._call(self.client.delete, self.prefix + key)
        return total

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        expiry = int(ttl * 1000) if ttl is not None else 0
        return int(await self._call(self._incr, keys=[self.prefix + key], args=[amount, expiry]))

    async def add(self, key: str, value: bytes, ttl: float | None) -> bool:
        expiry = max(1, int(ttl * 1000)) if ttl is not None else None
        return bool(await self._call(self.client.set, self.prefix + key, value, px=expiry, nx=True))

    async def set_add(self, key: str, *members: str, ttl: float | None = None) -> int:
        expiry = int(ttl * 1000) if ttl is not None else 0
        return int(await self._call(self._set_add, keys=[self.prefix + key], args=[expiry, *members]))

    async def set_members(self, key: str) -> list[str]:
        members = await self._call(self.client.smembers, self.prefix + key)
        return sorted(member.decode() if isinstance(member, bytes) else member for member in members)

    async def delete_prefix(self, prefix: str) -> int:
        """SCAN (every master of a cluster) and delete; for purges, never on the request path."""
        pattern = _glob_escape(self.prefix + prefix) + "*"
        deleted = 0
        try:  # each SCAN call is bounded by redis-py's socket timeout
            keys = [key async for key in self.client.scan_iter(match=pattern, count=1000)]
        except Exception as exc:  # noqa: BLE001 - as in _call
            raise StoreUnavailable(f"Redis failed a scan: {type(exc).__name__}: {exc}") from None
        for key in keys:
            deleted += await self._call(self.client.delete, key)
        return deleted

    async def close(self) -> None:
        await self.client.aclose()

    async def _call(self, operation: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one operation. redis-py's own socket timeouts bound it (cancelling redis-py from
        outside in the middle of a connection handshake leaves broken connections behind), and
        an outer deadline of twice the timeout guards against anything else."""
        if time.monotonic() < self._failed_until:
            raise StoreUnavailable("Redis failed recently; not retried yet")
        try:
            async with asyncio.timeout(self.timeout * 2):
                async with self._slots:
                    return await operation(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure of the client is the store being unavailable
            self._failed_until = time.monotonic() + self.settings.retry_interval
            reason = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            raise StoreUnavailable(self._scrub(f"Redis {reason}")) from None

    def _scrub(self, message: str) -> str:
        """Never let the password reach a log line through an error's text."""
        password = self.settings.password
        if password:
            for form in {password, quote(password, safe="")}:
                message = message.replace(form, "***")
        return message


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _client(settings: StoreSettings) -> Any:
    """The redis-py client: RESP2 (every Redis since 2.6 speaks it), no retries of its own (the
    caller's policy decides what a failure means), socket timeouts of ``store.timeout``.
    A password in the URL is read by redis-py itself; ``password_env`` supplies one otherwise."""
    options: dict[str, Any] = {
        "socket_timeout": settings.timeout, "socket_connect_timeout": settings.timeout,
        "max_connections": settings.pool_size, "protocol": 2, "retry": Retry(NoBackoff(), 0),
    }
    if settings.password_env:
        options["password"] = os.environ.get(settings.password_env) or None
    if settings.tls_ca_file and (settings.url or "").startswith("rediss://"):
        options["ssl_ca_certs"] = settings.tls_ca_file
    if settings.sentinels:
        sentinel = Sentinel([parse_address(address) for address in settings.sentinels], **options)
        return sentinel.master_for(settings.sentinel_master, **options)
    if settings.cluster:
        return RedisCluster.from_url(settings.url, **options)
    return aioredis.Redis.from_url(settings.url, **options)
