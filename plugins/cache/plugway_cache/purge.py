"""Purges: by exact key, by path prefix, by tag; in the shared store and in every worker's memory.

A purge is run by whichever worker answers the admin call. It deletes from the shared store
at once, and from that worker's memory store; it is also appended to a log in the shared
store (``cache-purge:seq`` and ``cache-purge:<n>``) that every worker polls every
``POLL_INTERVAL`` seconds to purge its own memory store. With Redis the log reaches every
host's workers. ``cache-purge:log`` names the log (a random id): when the store loses its data
(a restart), a new log starts at 1 under a new name, and followers start over with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass

from gateway.store import StoreUnavailable

from .keys import ENTRY_PREFIX

log = logging.getLogger("plugway.cache")
SEQUENCE_KEY = "cache-purge:seq"
LOG_NAME_KEY = "cache-purge:log"
LOG_PREFIX = "cache-purge:"
LOG_TTL = 3600.0
POLL_INTERVAL = 0.5
MISSING_GRACE = 5.0  # a log slot still empty after this long was lost (its writer died): skip it
KINDS = ("key", "prefix", "tag")
MAX_VALUE = 8192


@dataclass(frozen=True)
class PurgeRule:
    kind: str  # key | prefix | tag
    value: str

    @classmethod
    def from_json(cls, data: object) -> PurgeRule:
        """``{"key": ...}``, ``{"prefix": "/..."}`` or ``{"tag": ...}``; ValueError with the reason."""
        if not isinstance(data, dict) or len(data) != 1 or next(iter(data)) not in KINDS:
            raise ValueError('send one of {"key": KEY}, {"prefix": "/PATH"} or {"tag": TAG}')
        kind, value = next(iter(data.items()))
        if not isinstance(value, str) or not value or len(value) > MAX_VALUE or not value.isprintable():
            raise ValueError(f"{kind} must be a non-empty printable string of at most {MAX_VALUE} characters")
        if kind == "prefix" and not value.startswith("/"):
            raise ValueError('a prefix is a path prefix and starts with "/"')
        return cls(kind, value)

    async def apply(self, store) -> int:
        """Delete what the rule names from one store (memory or shared); returns how many keys went."""
        if self.kind == "key":
            return await store.purge_key(ENTRY_PREFIX + self.value)
        if self.kind == "prefix":
            return await store.purge_prefix(ENTRY_PREFIX + self.value)
        return await store.purge_tag(self.value)


async def publish(store, rule: PurgeRule, origin: str) -> int:
    """Append the rule to the purge log for the other workers' memory stores; ``origin`` names
    the worker that already applied it (it skips the rule when it reads it back: re-applied,
    it would delete what was stored since)."""
    await store.add(LOG_NAME_KEY, os.urandom(8).hex().encode(), None)
    number = await store.incr(SEQUENCE_KEY)
    entry = {"rule": {rule.kind: rule.value}, "origin": origin}
    await store.set(f"{LOG_PREFIX}{number}", json.dumps(entry).encode(), LOG_TTL)
    return number


def _read_log_entry(data: bytes) -> tuple[PurgeRule | None, str]:
    try:
        entry = json.loads(data)
        return PurgeRule.from_json(entry["rule"]), entry["origin"]
    except (ValueError, KeyError, TypeError):
        return None, ""


class PurgeFollower:
    """Applies the purges in the shared log to this worker's memory store."""

    def __init__(self, store, memory, origin: str, on_purged=None) -> None:
        self.store = store
        self.memory = memory
        self.origin = origin
        self.on_purged = on_purged
        self.seen: int | None = None
        self.log_name: bytes | None = None
        self._missing_since: float | None = None

    async def run(self) -> None:
        while True:
            try:
                await self.poll()
            except StoreUnavailable as exc:
                log.debug("cache purge log unreadable: %s", exc)
            await asyncio.sleep(POLL_INTERVAL)

    async def poll(self) -> None:
        log_name = await self.store.get(LOG_NAME_KEY)
        sequence = int(await self.store.get(SEQUENCE_KEY) or 0)
        if self.seen is None:
            self.seen, self.log_name = sequence, log_name  # a new worker's memory is empty: nothing before now concerns it
            return
        if log_name != self.log_name:
            self.seen, self.log_name = 0, log_name  # a new log (the store lost its data): it starts at 1
        while self.seen < sequence:
            data = await self.store.get(f"{LOG_PREFIX}{self.seen + 1}")
            if data is None:
                now = time.monotonic()
                self._missing_since = self._missing_since or now
                if now - self._missing_since < MISSING_GRACE:
                    return  # written next (incr comes before set): try again at the next poll
            else:
                rule, origin = _read_log_entry(data)
                if rule is not None and origin != self.origin:
                    await rule.apply(self.memory)
                    if self.on_purged is not None:
                        self.on_purged()
            self._missing_since = None
            self.seen += 1
