"""The store interface against every backend: in-process, the local store process, Redis, Redis Cluster."""

import asyncio
import multiprocessing
import os

import pytest

from gateway.config.model import StoreSettings
from gateway.config.units import Duration
from gateway.store import InProcessStore, Limit, StoreUnavailable
from gateway.store.local import LocalStore, run_store_process
from gateway.store.memory import KEY_OVERHEAD, MemoryTable
from gateway.testing import free_port, wait_until


@pytest.fixture
def local_store_path(tmp_path):
    path = str(tmp_path / "store.sock")
    process = multiprocessing.get_context("fork").Process(target=run_store_process, args=(path, 10_000, 1 << 24))
    process.start()
    wait_until(lambda: os.path.exists(path))
    yield path
    process.terminate()
    process.join()


@pytest.fixture(params=["in-process", "local", "redis", "redis-cluster"])
async def store(request, tmp_path):
    kind = request.param
    if kind == "in-process":
        yield InProcessStore(10_000, 1 << 24)
        return
    if kind == "local":
        path = request.getfixturevalue("local_store_path")
        store = LocalStore(path, 1.0)
    else:
        from gateway.store.redis import RedisStore

        if kind == "redis":
            url = request.getfixturevalue("redis_server")().url
            store = RedisStore(StoreSettings(backend="redis", url=url, timeout=1.0))
        else:
            nodes = request.getfixturevalue("redis_cluster")(3)
            store = RedisStore(StoreSettings(backend="redis", url=nodes[0].url, cluster=True, timeout=1.0))
    await store.connect()
    yield store
    await store.close()


async def test_keys_values_and_expiry(store):
    await store.set("k", b"value", None)
    assert await store.get("k") == b"value"
    await store.set("short", b"x", 0.2)
    assert await store.get("short") == b"x"
    await asyncio.sleep(0.35)
    assert await store.get("short") is None
    assert await store.delete("k", "missing") == 1
    assert await store.get("k") is None


async def test_counters_and_first_writer_wins(store):
    assert await store.incr("n") == 1
    assert await store.incr("n", 5) == 6
    assert await store.add("lock", b"a", 5) is True
    assert await store.add("lock", b"b", 5) is False
    assert await store.get("lock") == b"a"


async def test_sets_and_purging_by_prefix(store):
    assert await store.set_add("{tag}:t1", "a", "b", ttl=60) == 2
    assert await store.set_add("{tag}:t1", "b", "c") == 3
    assert await store.set_members("{tag}:t1") == ["a", "b", "c"]
    for key in ("cache:/a/1", "cache:/a/2", "cache:/b/1"):
        await store.set(key, b"x", 60)
    assert await store.delete_prefix("cache:/a/") == 2
    assert await store.get("cache:/b/1") == b"x"


async def test_a_counter_keeps_the_expiry_it_was_created_with(store):
    assert await store.incr("c", 1, ttl=0.3) == 1
    assert await store.incr("c", -1) == 0
    assert await store.incr("c", 1, ttl=60) == 1  # back to the amount added: not a new counter
    await asyncio.sleep(0.5)
    assert await store.get("c") is None
    await store.set("n", b"5", None)
    assert await store.incr("n") == 6  # a number written with set counts, on every backend


async def test_adding_to_a_set_extends_its_expiry_and_never_shortens_it(store):
    await store.set_add("{tag}:short", "a", ttl=0.3)
    await store.set_add("{tag}:short", "b", ttl=60)
    await store.set_add("{tag}:long", "a", ttl=60)
    await store.set_add("{tag}:long", "b", ttl=0.3)
    await asyncio.sleep(0.5)
    assert await store.set_members("{tag}:short") == ["a", "b"]
    assert await store.set_members("{tag}:long") == ["a", "b"]


async def test_rate_limits_are_all_or_nothing(store):
    tight = Limit("rl:{t}", "token_bucket", 2, 3600)
    loose = Limit("rl:{l}", "token_bucket", 100, 3600)
    assert [r.allowed for r in await store.take([tight, loose])] == [True, True]
    assert [r.allowed for r in await store.take([tight, loose])] == [True, True]
    refused = await store.take([tight, loose])
    assert not refused[0].allowed and refused[0].retry_after > 0
    (after,) = await store.take([loose])
    assert after.remaining == 97  # the refused request took nothing from the loose limit


async def test_sliding_window_counts_within_the_limit(store):
    limit = Limit("rl:{w}", "sliding_window", 3, 3600)
    results = [(await store.take([limit]))[0].allowed for _ in range(5)]
    assert results == [True, True, True, False, False]


async def test_an_unreachable_store_raises_store_unavailable(tmp_path):
    from gateway.store.redis import RedisStore

    stores = [LocalStore(str(tmp_path / "nobody.sock"), 0.2),
              RedisStore(StoreSettings(backend="redis", url=f"redis://127.0.0.1:{free_port()}/0", timeout=0.2))]
    for store in stores:
        for operation in (store.get("k"), store.delete_prefix("cache:")):
            with pytest.raises(StoreUnavailable):
                await operation
        await store.close()


async def test_the_local_store_refuses_one_oversized_value_and_keeps_serving(local_store_path):
    store = LocalStore(local_store_path, 5.0)
    pending = asyncio.ensure_future(store.incr("n"))
    with pytest.raises(StoreUnavailable, match="frame limit"):
        await store.set("big", b"x" * (17 << 20), None)
    assert await pending == 1  # the other operations on the connection were not failed
    await store.set("ttl", b"v", Duration("60s"))  # a float subclass, which marshal alone refuses
    assert await store.get("ttl") == b"v"
    await store.close()


def test_sets_grow_in_place_with_their_bytes_accounted():
    table = MemoryTable(max_keys=100, max_bytes=1 << 20, clock=lambda: 0.0)
    table.set_add("s", ["a", "b"], None)
    table.set_add("s", ["b", "c"], None)
    assert table.set_members("s") == ["a", "b", "c"]
    assert table.get("s") == frozenset("abc")
    assert table.bytes == KEY_OVERHEAD + 1 + 3 * 81
    table.delete(["s"])
    assert table.bytes == 0


def test_the_table_is_bounded_in_keys_and_bytes_least_recently_used_first():
    now = [0.0]
    table = MemoryTable(max_keys=3, max_bytes=10_000, clock=lambda: now[0])
    for key in "abc":
        table.set(key, b"v", None)
    table.get("a")  # a is now the most recently used
    table.set("d", b"v", None)
    assert (table.get("a"), table.get("b"), table.get("d")) == (b"v", None, b"v")
    small = MemoryTable(max_keys=100, max_bytes=KEY_OVERHEAD * 2 + 2000, clock=lambda: now[0])
    small.set("x", b"1" * 1000, None)
    small.set("y", b"2" * 1000, None)  # over max_bytes: x goes
    assert small.get("x") is None and small.get("y") is not None and small.evicted == 1
    table.set("ttl", b"v", 10)
    now[0] = 11
    assert table.sweep() == 1 and table.get("ttl") is None
