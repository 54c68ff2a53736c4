"""What the cache is worth and what it costs: requests/s for cache hits against uncached
proxying, and the memory store's bound under a load of distinct keys, measured by the harness of
scripts/bench (loadtest/variants.py).

    scripts/install && .venv/bin/python plugins/cache/bench_cache.py [--rounds 3] [--duration 5] [--markdown]

It needs wrk and nginx (scripts/bench installs them). The upstream is scripts/bench's nginx
answering every path with a fixed 100-byte JSON body and no caching headers, so the cached
routes set default_ttl. Each round starts each configuration fresh, in turn (round-robin),
warms it up (which fills the cache), then measures it with wrk; the ratios to "no plugins"
are computed per round, and their median is what to read (see loadtest/README.md on noise).

    d  the gateway, no plugins (uncached proxying)
    x  the cache on, nothing stored (default_ttl 0s): every request a miss
    m  the cache, memory store, every request a hit
    s  the cache, shared store (the host's store process), every request a hit

Then the memory run: the memory store bounded to --memory-size per worker, under wrk requesting
a new path every time (/k/<random>/<counter>) for --memory-duration seconds; it reports each
worker's resident memory (from /proc) and the cache's byte count, entries and evictions (from
/metrics) as the load goes on.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))
import variants  # noqa: E402  (loadtest/variants.py: scripts/bench's harness, for variants of the gateway)
from bench import CONNECTIONS, Bench, BenchError, Config, parse_wrk, table  # noqa: E402
from harness import HOST, free_port, http_request, log, spawn, stop, wait_exit  # noqa: E402

VARIANTS = [
    Config("x", "cache, every request a miss", toml='[plugins.cache]\ndefault_ttl = "0s"\n'),
    Config("m", "cache hits, memory store", toml='[plugins.cache]\nstore = "memory"\ndefault_ttl = "60s"\n'),
    Config("s", "cache hits, shared store", toml='[plugins.cache]\nstore = "shared"\ndefault_ttl = "60s"\n'),
]
DISTINCT_PATHS = """
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/k/" .. math.random(1, 1000000000) .. "/" .. counter)
end
"""


def check_hits(bench: Bench, configs: dict[str, Config]) -> None:
    """The cached variants really answer from the cache (otherwise m and s measure nothing)."""
    for key in "ms":
        with variants.running(bench, configs[key]) as port:  # new connections: with memory, each worker misses once
            statuses = [http_request(port, timeout=5)[2].get("X-Cache") for _ in range(20)]
        if statuses[0] != "MISS" or statuses[-1] != "HIT" or statuses.count("MISS") > bench.args.workers:
            raise BenchError(f"config {key}: X-Cache was {statuses}, expected a MISS per worker, then HITs")


def memory_run(bench: Bench, configs: dict[str, Config]) -> list[str]:
    """The memory store bounded to --memory-size per worker under a new path on every request; the
    report's lines on it."""
    args = bench.args
    log("memory run")
    port, admin_port = free_port(), free_port()
    toml = f'[plugins.cache]\nstore = "memory"\ndefault_ttl = "60s"\nmemory_size = "{args.memory_size}"\n'
    proc, _ = bench.launch_gateway(bench.gateway_config(port, admin_port, False, args.workers) + toml,
                                   admin_port, "memory")
    samples = []
    try:
        script = bench.dir / "distinct.lua"
        script.write_text(DISTINCT_PATHS)
        out = bench.dir / "memory.wrk"
        samples.append(sample(admin_port, 0.0))
        started = time.monotonic()
        wrk = spawn(["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{args.memory_duration:g}s", "--latency",
                     "--timeout", "5s", "-s", str(script), f"http://{HOST}:{port}/"], out)
        while not wait_exit(wrk, min(args.memory_duration / 6, 5.0)):
            samples.append(sample(admin_port, time.monotonic() - started))
        stop(wrk)
        result = parse_wrk(out.read_text(errors="replace"))
        samples.append(sample(admin_port, time.monotonic() - started))
    finally:
        stop(proc)
    rows = [[f"{s['seconds']:.0f}", " / ".join(mib(rss) for rss in s["rss"]), mib(s["bytes"]), f"{s['entries']:,.0f}",
             f"{s['evictions']:,.0f}"] for s in samples]
    growth = ", ".join(mib(end - start) for start, end in zip(samples[0]["rss"], samples[-1]["rss"]))
    return [f"memory store bounded to {args.memory_size} per worker, {args.workers} worker(s), "
            f"a new path on every request for {args.memory_duration:g}s:", "",
            *table(["s", "worker RSS MiB", "cache MiB (all workers)", "entries", "evictions"], rows, args.markdown),
            "", f"{result.requests:,} distinct keys requested at {result.rps:,.0f} req/s "
                f"({result.socket_errors + result.non2xx} errors); RSS growth per worker: {growth} MiB"]


def sample(admin_port: int, seconds: float) -> dict:
    with urllib.request.urlopen(f"http://{HOST}:{admin_port}/status", timeout=5) as response:
        workers = json.load(response)["workers"]
    with urllib.request.urlopen(f"http://{HOST}:{admin_port}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    return {
        "seconds": seconds,
        "rss": [rss_bytes(worker["pid"]) for worker in workers],
        "bytes": metric(metrics, "plugway_cache_memory_bytes"),
        "entries": metric(metrics, "plugway_cache_memory_entries"),
        "evictions": metric(metrics, "plugway_cache_evictions_total"),
    }


def rss_bytes(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) * 1024 if match else 0


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def mib(value: float) -> str:
    return f"{value / 1048576:.1f}"


def add_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--memory-size", default="32MiB", help="memory store per worker in the memory run")
    ap.add_argument("--memory-duration", type=float, default=30.0, help="seconds of the memory run (default 30)")


if __name__ == "__main__":
    sys.exit(variants.main(sys.argv[1:], "plugins/cache/bench_cache.py", __doc__, lambda bench: VARIANTS,
                           add_options=add_options, check=check_hits, after=memory_run))
