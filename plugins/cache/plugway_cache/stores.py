"""Where entries live: a worker's memory (an LRU bounded in bytes) or the gateway's shared store.

Both take the same calls (``get``, ``put``, ``delete``, the purges) so that the request path
does not care which one a route uses. Records are objects in memory and bytes (see
``entries.encode``) in the shared store.

The shared store (``gateway.store``) is host-wide (the local store process) or Redis. A tag's
index is one store set (``keys.tag_key``) of the keys of its entries: every ``set_add``
extends the set's TTL to the entry's (never shortens it), so the set outlives every entry
listed in it.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from .entries import Entry, Record, decode, encode
from .keys import ENTRY_PREFIX, lock_key, tag_key


class MemoryStore:
    """One worker's entries, least recently used first out, within ``max_bytes``."""

    shared = False

    def __init__(self, max_bytes: int, clock=time.time) -> None:
        self.max_bytes = max_bytes
        self.clock = clock
        self.bytes = 0
        self.evictions = 0
        self._data: OrderedDict[str, tuple[float, Record, int]] = OrderedDict()  # key -> (expires, record, size)
        self._tags: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._data)

    async def get(self, key: str) -> Record | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[0] <= self.clock():
            self._remove(key)
            return None
        self._data.move_to_end(key)
        return item[1]

    async def put(self, key: str, record: Record, ttl: float) -> None:
        size = len(key) + record.size
        if ttl <= 0 or size > self.max_bytes:
            self._remove(key)
            return
        self._remove(key)
        self._data[key] = (self.clock() + ttl, record, size)
        self.bytes += size
        if isinstance(record, Entry):
            for tag in record.tags:
                self._tags.setdefault(tag, set()).add(key)
        while self.bytes > self.max_bytes:
            oldest = next(iter(self._data))
            self._remove(oldest)
            self.evictions += 1

    async def delete(self, key: str) -> int:
        return self._remove(key)

    async def purge_key(self, key: str) -> int:
        """The key and every key under it (variants, per-consumer entries)."""
        return await self.delete(key) + await self.purge_prefix(key + " ")

    async def purge_prefix(self, prefix: str) -> int:
        return sum(self._remove(key) for key in [key for key in self._data if key.startswith(prefix)])

    async def purge_tag(self, tag: str) -> int:
        return sum(self._remove(key) for key in list(self._tags.get(tag, ())))

    def _remove(self, key: str) -> int:
        item = self._data.pop(key, None)
        if item is None:
            return 0
        self.bytes -= item[2]
        record = item[1]
        if isinstance(record, Entry):
            for tag in record.tags:
                keys = self._tags.get(tag)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self._tags[tag]
        return 1


class SharedStore:
    """Entries in ``gateway.store``; every call may raise ``StoreUnavailable``. TTLs are passed as
    plain floats: the local store's client marshals its arguments, and marshal refuses float
    subclasses such as the settings' ``Duration``."""

    shared = True

    def __init__(self, store) -> None:
        self.store = store

    async def get(self, key: str) -> Record | None:
        return decode(await self.store.get(key))

    async def put(self, key: str, record: Record, ttl: float) -> None:
        if ttl <= 0:
            await self.store.delete(key)
            return
        await self.store.set(key, encode(record), float(ttl))
        for tag in record.tags if isinstance(record, Entry) else ():
            await self.store.set_add(tag_key(tag), key, ttl=float(ttl))

    async def delete(self, key: str) -> int:
        return await self.store.delete(key)

    async def lock(self, key: str, ttl: float) -> bool:
        """Become the one fetching ``key`` for every worker (and host) sharing the store."""
        return await self.store.add(lock_key(key), b"1", max(float(ttl), 0.001))

    async def unlock(self, key: str) -> None:
        await self.store.delete(lock_key(key))

    async def locked(self, key: str) -> bool:
        return await self.store.get(lock_key(key)) is not None

    async def purge_key(self, key: str) -> int:
        return await self.store.delete(key) + await self.store.delete_prefix(key + " ")

    async def purge_prefix(self, prefix: str) -> int:
        return await self.store.delete_prefix(prefix)

    async def purge_tag(self, tag: str) -> int:
        index = tag_key(tag)
        members = await self.store.set_members(index)
        removed = await self.store.delete(*members) if members else 0
        await self.store.delete(index)
        return removed


def entry_key_prefix(prefix: str) -> str:
    """The store prefix of a path prefix purge."""
    return ENTRY_PREFIX + prefix
