"""Records and stores on their own: the bytes format of the shared store, the memory LRU's
byte accounting (checked against what Python really allocates), and the purge log."""

from __future__ import annotations

import time
import tracemalloc

from multidict import CIMultiDict

from gateway.store import InProcessStore
from plugway_cache import CacheSettings
from plugway_cache.directives import StaleRules
from plugway_cache.entries import PASS, Entry, PassMarker, ResponseFacts, VaryMarker, decode, encode, new_entry
from plugway_cache.purge import PurgeFollower, PurgeRule, publish
from plugway_cache.stores import MemoryStore, SharedStore

SETTINGS = CacheSettings(tag_header="Surrogate-Key")


def entry(body: bytes = b"body", tags: tuple[str, ...] = (), headers: int = 4) -> Entry:
    names = [("Cache-Control", "max-age=60"), ("Content-Type", "application/json"),
             ("Date", "Mon, 23 Nov 2026 01:17:28 GMT"), ("Server", "upstream/1.0")]
    names += [(f"X-Extra-{n}", "v" * 20) for n in range(max(0, headers - 4))]
    received = CIMultiDict(("".join(name), "".join(value)) for name, value in names[:headers])  # fresh strings
    now = time.time()
    facts = ResponseFacts(200, received, now, now, SETTINGS)
    made = new_entry(200, received, body, facts, now, ("X-Cache",))
    made.tags = tags
    return made


def test_records_round_trip_through_bytes():
    original = entry("café".encode(), tags=("a", "b"))
    original.headers.append(("X-Latin", "caf\xe9"))
    original.etag, original.stale = '"e"', StaleRules(5.0, 7.0, False)
    copy = decode(encode(original))
    assert copy == original
    assert decode(encode(VaryMarker(("accept", "x-a"), "n1"))) == VaryMarker(("accept", "x-a"), "n1")
    assert isinstance(decode(encode(PASS)), PassMarker)
    for junk in (None, b"", b"PWC1", b"PWC1E\x00\x00\x00\x09{}", b"PWC2Exxxx", b"PWC1Z", "text"):
        assert decode(junk) is None


async def test_the_memory_store_evicts_least_recently_used_within_its_bytes():
    one = entry(b"x" * 1000)
    size = len("cache:/k/0") + one.size
    store = MemoryStore(max_bytes=size * 3)
    for number in range(3):
        await store.put(f"cache:/k/{number}", entry(b"x" * 1000), 60)
    await store.get("cache:/k/0")  # now the most recently used
    await store.put("cache:/k/3", entry(b"x" * 1000), 60)
    assert [await store.get(f"cache:/k/{n}") is not None for n in range(4)] == [True, False, True, True]
    assert store.bytes <= store.max_bytes and store.evictions == 1
    await store.put("cache:/huge", entry(b"x" * size * 3), 60)  # larger than the whole store: refused
    assert await store.get("cache:/huge") is None and len(store) == 3


async def test_memory_entries_expire_and_tags_follow_evictions():
    clock = [1000.0]
    store = MemoryStore(max_bytes=10**6, clock=lambda: clock[0])
    await store.put("cache:/a", entry(tags=("t",)), 10)
    await store.put("cache:/b", entry(tags=("t",)), 20)
    clock[0] += 15
    assert await store.get("cache:/a") is None and await store.get("cache:/b") is not None
    assert await store.purge_tag("t") == 1 and len(store) == 0 and store.bytes == 0


async def test_the_byte_count_matches_what_python_allocates():
    for body, headers in ((100, 4), (1000, 4), (100, 12), (20000, 8)):
        store = MemoryStore(max_bytes=10**10)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for number in range(2000):
            await store.put(f"cache:/k/{number}?x=1 http://api.example.com GET", entry(bytes(body), headers=headers), 60)
        allocated = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert 0.85 * allocated <= store.bytes <= 1.15 * allocated, (body, headers, allocated, store.bytes)


async def test_the_shared_store_indexes_tags_and_purges_them():
    shared = SharedStore(InProcessStore(10_000, 10**7))
    await shared.put("cache:/a", entry(tags=("t", "u")), 60)
    await shared.put("cache:/b", entry(tags=("t",)), 60)
    await shared.put("cache:/c", entry(), 60)
    assert await shared.purge_tag("t") == 2
    assert [await shared.get(key) is not None for key in ("cache:/a", "cache:/b", "cache:/c")] == [False, False, True]
    assert await shared.lock("cache:/c", 5) and not await shared.lock("cache:/c", 5)
    await shared.unlock("cache:/c")
    assert not await shared.locked("cache:/c")


async def test_a_tags_index_outlives_every_entry_in_it():
    """The index set's TTL follows its longest-lived entry, whichever was added first: a tagged
    entry can be kept for days and still be purged by its tag."""
    store = InProcessStore(10_000, 10**7)
    clock = [1000.0]
    store.table.clock = lambda: clock[0]
    shared = SharedStore(store)
    await shared.put("cache:/short", entry(tags=("t",)), 10)
    await shared.put("cache:/long", entry(tags=("t",)), 3 * 86400)
    await shared.put("cache:/shorter", entry(tags=("t",)), 5)  # never shortens the index's TTL
    clock[0] += 2 * 86400
    assert [await shared.get(f"cache:/{name}") is not None for name in ("short", "long", "shorter")] == [
        False, True, False]
    assert await shared.purge_tag("t") == 1
    assert await shared.get("cache:/long") is None


async def test_the_purge_log_reaches_a_memory_store():
    store = InProcessStore(10_000, 10**7)
    memory = MemoryStore(10**6)
    follower = PurgeFollower(store, memory, origin="this-worker")
    await follower.poll()  # the baseline: nothing before now concerns a new worker
    await memory.put("cache:/a/1 http://h GET", entry(), 60)
    await memory.put("cache:/b http://h GET", entry(), 60)
    await publish(store, PurgeRule.from_json({"prefix": "/a/"}), origin="another-worker")
    await follower.poll()
    assert len(memory) == 1 and follower.seen == 1
    await store.delete("cache-purge:seq", "cache-purge:log", "cache-purge:1")  # the store restarted empty...
    await publish(store, PurgeRule.from_json({"key": "/b http://h GET"}), origin="another-worker")
    await follower.poll()  # ...and its new log is still followed
    assert len(memory) == 0
    await memory.put("cache:/b http://h GET", entry(), 60)
    await publish(store, PurgeRule.from_json({"key": "/b http://h GET"}), origin="this-worker")
    await follower.poll()  # its own purge, applied when issued, is not applied again
    assert len(memory) == 1 and follower.seen == 2
