"""Revoked tokens in the shared store, and each worker's short-lived view of them.

Two kinds of revocation, each one store key with a TTL (so the store forgets a revocation
once no token it covers can still be valid):

- a token, by its ``jti``: ``auth:rv:j:<hash>``, kept for the token's remaining life (until
  its ``exp`` plus ``leeway``, the last moment it would be accepted);
- every token of a consumer issued before a time: ``auth:rv:c:<hash>`` holding that time,
  kept for the longest life a token may have (``max_lifetime`` plus ``leeway``) after that
  time, or after now when it is past. A token of that consumer without ``iat`` counts as
  issued before.

Every revocation also writes a new random value to ``auth:rv:epoch``. A worker caches its
lookups (a token checked twice costs no second round trip) and reads the epoch at most
every ``MAX_AGE`` seconds, awaited by the requests that need it: when the epoch has
changed (or a minute has passed), every cached answer is dropped. So a revocation reaches every worker of every host
sharing the store within ``MAX_AGE`` plus one store round trip, and a steady stream of
known tokens costs one store read per worker every ``MAX_AGE``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable

from gateway.store import Store

EPOCH_KEY = "auth:rv:epoch"
MAX_AGE = 0.5
MAX_ENTRIES = 100_000
FORGET_AFTER = 60.0  # cached answers are dropped this often even without a new epoch (a lost epoch write)
MAX_TTL = 10 * 366 * 86400.0  # the longest a revocation is kept, whatever times the admin call names


def token_key(jti: str) -> str:
    return "auth:rv:j:" + hashlib.sha256(jti.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def consumer_key(consumer: str) -> str:
    return "auth:rv:c:" + hashlib.sha256(consumer.encode("utf-8", "surrogateescape")).hexdigest()[:40]


async def revoke_token(store: Store, jti: str, ttl: float) -> None:
    await store.set(token_key(jti), b"1", max(ttl, 1.0))
    await _new_epoch(store)


async def revoke_consumer(store: Store, consumer: str, before: float, longest_life: float,
                          now: float) -> tuple[float, float]:
    """Revoke the consumer's tokens issued before ``before`` (an earlier call's later time wins).

    Kept until the last such token has expired: ``longest_life`` (``max_lifetime`` plus
    ``leeway``) after ``before``, or after now when ``before`` is past. Returns the time in
    force and the key's TTL.
    """
    key = consumer_key(consumer)
    existing = await store.get(key)
    if existing is not None:
        before = max(before, float(existing))
    ttl = min(max(longest_life + max(before - now, 0.0), 1.0), MAX_TTL)
    await store.set(key, repr(before).encode(), ttl)
    await _new_epoch(store)
    return before, ttl


async def revoked_now(store: Store, jti: str | None, consumer: str, issued_at: float | None) -> bool:
    """The store's answer itself, without a worker's cache (for introspection)."""
    if jti is not None and await store.get(token_key(jti)) is not None:
        return True
    cutoff = await store.get(consumer_key(consumer))
    return _before(cutoff, issued_at)


def _before(cutoff: bytes | None, issued_at: float | None) -> bool:
    return cutoff is not None and (issued_at is None or issued_at < float(cutoff))


async def _new_epoch(store: Store) -> None:
    await store.set(EPOCH_KEY, os.urandom(12).hex().encode(), None)


class RevocationView:
    """One worker's cached view of the revocations in ``store`` (see the module docstring)."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.clock = clock
        self._epoch: bytes | None = None
        self._checked_at = -float("inf")
        self._cleared_at = clock()
        self._generation = 0
        self._pending: asyncio.Future | None = None
        self._answers: dict[tuple[str, str], bytes | None] = {}

    async def revoked(self, jti: str | None, consumer: str, issued_at: float | None) -> bool:
        """Whether the token is revoked; raises ``StoreUnavailable`` when the store cannot say."""
        if self.clock() - self._checked_at > MAX_AGE:
            await self._refresh_epoch()
        wanted = [("c", consumer)] + ([("j", jti)] if jti is not None else [])
        known = self._answers
        answers = {item: known[item] for item in wanted if item in known}
        if len(answers) < len(wanted):
            missing = [item for item in wanted if item not in answers]
            generation = self._generation
            values = await asyncio.gather(*(self.store.get(_store_key(item)) for item in missing))
            found = dict(zip(missing, values))
            answers.update(found)
            if generation == self._generation:  # an epoch change meanwhile may have made these stale
                if len(known) + len(found) > MAX_ENTRIES:
                    known.clear()
                known.update(found)
        if jti is not None and answers[("j", jti)] is not None:
            return True
        return _before(answers[("c", consumer)], issued_at)

    async def _refresh_epoch(self) -> None:
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._read_epoch())
            self._pending.add_done_callback(_retrieve)
        await asyncio.shield(self._pending)

    async def _read_epoch(self) -> None:
        sent = self.clock()
        try:
            epoch = await self.store.get(EPOCH_KEY)
        finally:
            self._pending = None
        if epoch != self._epoch or sent - self._cleared_at > FORGET_AFTER:
            self._epoch = epoch
            self._answers.clear()
            self._cleared_at = sent
            self._generation += 1
        self._checked_at = sent


def _store_key(item: tuple[str, str]) -> str:
    kind, value = item
    return token_key(value) if kind == "j" else consumer_key(value)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
