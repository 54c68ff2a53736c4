"""Cost of one rate-limit check in each store backend, and the local store's memory for many keys.

usage: .venv/bin/python loadtest/store_bench.py [--ops 20000] [--keys 1000000] [--markdown]

For each backend (in-process table, the host-local store process over its Unix
socket, Redis on loopback) it times ``take`` of one token-bucket limit:
sequentially from one client (latency of one check), then from 4 client
processes at once (contention, as 4 workers would). Each client also runs a
1 ms ticker and reports the worst delay of its event loop, which shows that a
check never blocks the loop. Then it fills the local store with ``--keys``
distinct limit keys and reports the store process's resident memory.
Everything runs on loopback and stops by itself.

Two mechanisms the host-local store could have used instead are measured the same way, so
that the choice rests on figures (issue 4): ``sqlite-tmpfs``, a SQLite database on /dev/shm
with one transaction per check, and ``shm-lock``, a hash table in shared memory created
before fork and guarded by one process-shared lock, the way nginx's shared zones work. Both
are called straight from the event loop, as a worker would have to (their waits on the lock
block it).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from multiprocessing import shared_memory
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.config.model import StoreSettings  # noqa: E402
from gateway.store import InProcessStore, Limit  # noqa: E402
from gateway.store.local import LocalStore, run_store_process  # noqa: E402
from gateway.testing import free_port, wait_until  # noqa: E402
from harness import rss_kib  # noqa: E402


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


BLOCKING = ("sqlite-tmpfs", "shm-lock")  # called straight from the event loop, never yielding
SLOTS = 1 << 16  # the shared-memory table's size: 65,536 buckets
_SLOT = struct.Struct("<Qdd")  # key hash, tokens, last refill
_SHARED: dict[str, object] = {}  # the shared memory and its lock, made before the clients fork


class SqliteTmpfsStore:
    """Token buckets in SQLite on tmpfs: one IMMEDIATE transaction per check."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, timeout=5, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE IF NOT EXISTS buckets (key TEXT PRIMARY KEY, tokens REAL, last REAL)")

    async def connect(self) -> None: ...

    async def close(self) -> None:
        self.db.close()

    async def take(self, limits: list[Limit]) -> None:
        (limit,) = limits
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        row = self.db.execute("SELECT tokens, last FROM buckets WHERE key = ?", (limit.key,)).fetchone()
        tokens = limit.limit if row is None else min(limit.limit, row[0] + (now - row[1]) * limit.limit / limit.period)
        self.db.execute("INSERT OR REPLACE INTO buckets VALUES (?, ?, ?)", (limit.key, max(tokens - 1, 0), now))
        self.db.execute("COMMIT")


class SharedMemoryStore:
    """Token buckets in a shared-memory hash table (open addressing) behind one process-shared lock."""

    def __init__(self) -> None:
        self.buffer = _SHARED["memory"].buf
        self.lock = _SHARED["lock"]

    async def connect(self) -> None: ...

    async def close(self) -> None:
        del self.buffer

    async def take(self, limits: list[Limit]) -> None:
        (limit,) = limits
        digest = int.from_bytes(hashlib.blake2b(limit.key.encode(), digest_size=8).digest(), "little") or 1
        now = time.time()
        with self.lock:
            slot = digest % SLOTS
            while True:
                key, tokens, last = _SLOT.unpack_from(self.buffer, slot * _SLOT.size)
                if key in (0, digest):
                    break
                slot = (slot + 1) % SLOTS
            tokens = limit.limit if key == 0 else min(limit.limit, tokens + (now - last) * limit.limit / limit.period)
            _SLOT.pack_into(self.buffer, slot * _SLOT.size, digest, max(tokens - 1, 0), now)


def make_store(kind: str, socket_path: str, redis_url: str):
    if kind == "in-process":
        return InProcessStore(2_000_000, 1 << 30)
    if kind == "local":
        return LocalStore(socket_path, 1.0)
    if kind == "sqlite-tmpfs":
        return SqliteTmpfsStore(_SHARED["sqlite"])
    if kind == "shm-lock":
        return SharedMemoryStore()
    from gateway.store.redis import RedisStore
    return RedisStore(StoreSettings(backend="redis", url=redis_url, timeout=1.0))


async def client_run(kind: str, socket_path: str, redis_url: str, ops: int, client: int) -> tuple[list[float], float]:
    store = make_store(kind, socket_path, redis_url)
    await store.connect()
    worst_lag = 0.0
    running = True

    async def ticker():
        nonlocal worst_lag
        loop = asyncio.get_running_loop()
        while running:
            expected = loop.time() + 0.001
            await asyncio.sleep(0.001)
            worst_lag = max(worst_lag, loop.time() - expected)

    tick = asyncio.create_task(ticker())
    latencies = []
    for i in range(ops):
        limit = Limit(f"bench:{client}:{i % 1000}", "token_bucket", 1_000_000, 60)
        started = time.perf_counter()
        await store.take([limit])
        latencies.append(time.perf_counter() - started)
    running = False
    await tick
    await store.close()
    if kind in BLOCKING:  # the ticker never ran: each call held the loop for its whole duration
        worst_lag = max(latencies)
    return latencies, worst_lag


def client_process(args) -> tuple[list[float], float]:
    return asyncio.run(client_run(*args))


def measure(kind: str, socket_path: str, redis_url: str, ops: int) -> dict[str, float]:
    alone, alone_lag = asyncio.run(client_run(kind, socket_path, redis_url, ops, 0))
    row = {"p50": percentile(alone, 0.5), "p99": percentile(alone, 0.99), "alone_lag": alone_lag}
    if kind == "in-process":
        return row  # one process by definition: nothing to contend with
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(client_process, [(kind, socket_path, redis_url, ops // 2, c) for c in range(1, 5)])
    together = [latency for latencies, _ in results for latency in latencies]
    row.update(c_p50=percentile(together, 0.5), c_p99=percentile(together, 0.99),
               lag=max(lag for _, lag in results))
    return row


async def fill(socket_path: str, keys: int) -> float:
    store = LocalStore(socket_path, 10.0)
    started = time.perf_counter()
    batch = 500
    for first in range(0, keys, batch):
        await asyncio.gather(*(store.take([Limit(f"rl:{{api:default:ip:10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}}}",
                                                   "token_bucket", 100, 60)])
                               for n in range(first, min(first + batch, keys))))
    elapsed = time.perf_counter() - started
    stats = await store.stats()
    await store.close()
    assert stats["keys"] >= keys and stats["evicted"] == 0, stats
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=20000)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="plugway-store-bench-")
    socket_path = os.path.join(directory, "store.sock")
    store_process = multiprocessing.get_context("fork").Process(
        target=run_store_process, args=(socket_path, 2_000_000, 1 << 30), daemon=True)
    store_process.start()
    wait_until(lambda: os.path.exists(socket_path))
    redis_port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", directory], stdout=subprocess.DEVNULL)
    try:
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        wait_until(lambda: subprocess.run(["redis-cli", "-p", str(redis_port), "ping"], capture_output=True,
                                          text=True).stdout.strip() == "PONG")
        _SHARED["memory"] = shared_memory.SharedMemory(create=True, size=SLOTS * _SLOT.size)
        _SHARED["lock"] = multiprocessing.get_context("fork").Lock()
        _SHARED["sqlite"] = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else directory,
                                         f"plugway-store-bench-{os.getpid()}.db")
        kinds = ("in-process", "local", "redis", "sqlite-tmpfs", "shm-lock")
        rows = {kind: measure(kind, socket_path, redis_url, args.ops) for kind in kinds}
        before = rss_kib(store_process.pid) / 1024
        fill_seconds = asyncio.run(fill(socket_path, args.keys))
        after = rss_kib(store_process.pid) / 1024
    finally:
        if "memory" in _SHARED:
            _SHARED["memory"].close()
            _SHARED["memory"].unlink()
        for suffix in ("", "-wal", "-shm"):
            if "sqlite" in _SHARED and os.path.exists(_SHARED["sqlite"] + suffix):
                os.unlink(_SHARED["sqlite"] + suffix)
        redis.terminate()
        redis.wait()
        store_process.terminate()
        store_process.join()
        shutil.rmtree(directory, ignore_errors=True)
    report(rows, args, before, after, fill_seconds)


def report(rows, args, before: float, after: float, fill_seconds: float) -> None:
    us = lambda seconds: f"{seconds * 1e6:,.0f}"  # noqa: E731
    print(f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, nproc {os.cpu_count()}: store, one rate-limit check")
    print()
    print(f"`.venv/bin/python loadtest/store_bench.py --ops {args.ops} --keys {args.keys}`")
    print()
    print("| backend | p50 µs, one client | p99 µs, one client | worst loop delay, one client "
          "| p50 µs, 4 clients | p99 µs, 4 clients | worst loop delay, 4 clients |")
    print("|---|---|---|---|---|---|---|")
    for kind, row in rows.items():
        alone = f"| {kind} | {us(row['p50'])} | {us(row['p99'])} | {row['alone_lag'] * 1000:.2f} ms "
        if "c_p50" in row:
            print(alone + f"| {us(row['c_p50'])} | {us(row['c_p99'])} | {row['lag'] * 1000:.2f} ms |")
        else:
            print(alone + "| – | – | – |")
    print()
    per_key = (after - before) * 1024 * 1024 / args.keys
    print(f"Local store process with {args.keys:,} distinct token-bucket keys: RSS {before:.0f} MiB -> {after:.0f} MiB "
          f"(about {per_key:.0f} bytes per key), filled in {fill_seconds:.1f} s.")


if __name__ == "__main__":
    main()
