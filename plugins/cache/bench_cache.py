"""What the cache is worth and what it costs: requests/s for cache hits against uncached
proxying, and the memory store's bound under a load of distinct keys, measured by the harness of
scripts/bench (loadtest/bench.py).

    scripts/install && .venv/bin/python plugins/cache/bench_cache.py [--rounds 3] [--duration 5]

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
import http.client
import json
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))
import bench  # noqa: E402  (loadtest/bench.py: the harness behind scripts/bench)

PLUGINS = {
    "x": '[plugins.cache]\ndefault_ttl = "0s"\n',
    "m": '[plugins.cache]\nstore = "memory"\ndefault_ttl = "60s"\n',
    "s": '[plugins.cache]\nstore = "shared"\ndefault_ttl = "60s"\n',
}
LABELS = {"d": "gateway, no plugins", "x": "cache, every request a miss", "m": "cache hits, memory store",
          "s": "cache hits, shared store"}
DISTINCT_PATHS = """
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/k/" .. math.random(1, 1000000000) .. "/" .. counter)
end
"""


class CacheBench(bench.Bench):
    """scripts/bench's harness, with the gateway configurations of this benchmark."""

    def start(self, key: str, port: int, tag: str, plugins: str | None = None):
        if key == "d":
            return super().start(key, port, tag)
        admin_port = bench.free_port()
        conf = self.dir / f"gateway-{tag}.toml"
        conf.write_text(self.cache_config(port, admin_port) + (plugins or PLUGINS[key]))
        logfile = self.dir / f"gateway-{tag}.log"
        proc = bench.spawn([str(bench.VENV_BIN / "plugway"), "run", "-c", str(conf)], logfile)
        ready = bench.wait_ready(proc, admin_port, "/ready", logfile, f"the gateway ({conf.name})")
        self.admin_port = admin_port
        return proc, logfile, ready

    def cache_config(self, port: int, admin_port: int) -> str:
        """scripts/bench's gateway configuration ("d"), to which each configuration adds its table."""
        return f"""\
[server]
listen = ["{bench.HOST}:{port}"]
workers = {self.args.workers}
[admin]
listen = "{bench.HOST}:{admin_port}"
[log]
access = false
[[upstreams]]
name = "up"
targets = [{{ url = "http://{bench.HOST}:{self.upstream_port}" }}]
[[routes]]
name = "all"
prefix = "/"
upstream = "up"
"""

    def check_hits(self) -> None:
        """The cached configurations really answer from the cache (otherwise m and s measure nothing)."""
        for key in "ms":
            port = bench.free_port()
            proc, _, _ = self.start(key, port, f"check-{key}")
            try:  # new connections: with the memory store, each worker misses once
                statuses = [cache_status(port, "/") for _ in range(20)]
            finally:
                bench.stop(proc)
            if statuses[0] != "MISS" or statuses[-1] != "HIT" or statuses.count("MISS") > self.args.workers:
                raise bench.BenchError(f"config {key}: X-Cache was {statuses}, expected a MISS per worker, then HITs")

    def memory_run(self, args: argparse.Namespace) -> list[dict]:
        port = bench.free_port()
        plugins = f'[plugins.cache]\nstore = "memory"\ndefault_ttl = "60s"\nmemory_size = "{args.memory_size}"\n'
        proc, _, _ = self.start("mem", port, "memory", plugins)
        samples = []
        try:
            script = self.dir / "distinct.lua"
            script.write_text(DISTINCT_PATHS)
            out = self.dir / "memory.wrk"
            samples.append(self.sample(0.0))
            started = time.monotonic()
            wrk = bench.spawn(["wrk", "-t1", f"-c{bench.CONNECTIONS}", f"-d{args.memory_duration:g}s", "--latency",
                               "--timeout", "5s", "-s", str(script), f"http://{bench.HOST}:{port}/"], out)
            while not bench.wait_exit(wrk, min(args.memory_duration / 6, 5.0)):
                samples.append(self.sample(time.monotonic() - started))
            bench.stop(wrk)
            result = bench.parse_wrk(out.read_text(errors="replace"))
            samples.append(self.sample(time.monotonic() - started))
            samples[-1]["requests"] = result.requests
            samples[-1]["rps"] = result.rps
            samples[-1]["errors"] = result.socket_errors + result.non2xx
        finally:
            bench.stop(proc)
        return samples

    def sample(self, seconds: float) -> dict:
        with urllib.request.urlopen(f"http://{bench.HOST}:{self.admin_port}/status", timeout=5) as response:
            workers = json.load(response)["workers"]
        with urllib.request.urlopen(f"http://{bench.HOST}:{self.admin_port}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        return {
            "seconds": seconds,
            "rss": [rss_bytes(worker["pid"]) for worker in workers],
            "bytes": metric(metrics, "plugway_cache_memory_bytes"),
            "entries": metric(metrics, "plugway_cache_memory_entries"),
            "evictions": metric(metrics, "plugway_cache_evictions_total"),
        }


def cache_status(port: int, path: str) -> str | None:
    connection = http.client.HTTPConnection(bench.HOST, port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.getheader("X-Cache")
    finally:
        connection.close()


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


def report(configs: dict[str, bench.Config], samples: list[dict], header: dict[str, str],
           args: argparse.Namespace) -> str:
    lines = [f"cache benchmark: {header['date']}, nproc {header['nproc']}, {header['gateway']}",
             f"command: .venv/bin/python plugins/cache/bench_cache.py {' '.join(args.argv)}".rstrip(), ""]
    rows = [[f"{c.key}. {c.label}", bench.median_range([r.rps for r in c.runs], ",.0f"),
             bench.median_range([r.p50_ms for r in c.runs], ".2f"),
             bench.median_range([r.p99_ms for r in c.runs], ".2f"),
             bench.median_range(c.cpu_us_per_req, ".0f"), f"{max(c.foreign):.0f}", bench.errors_text(c)]
            for c in configs.values()]
    lines += bench._text_table(["config", "req/s median (min–max)", "p50 ms", "p99 ms", "CPU µs/req",
                                "foreign CPU %", "errors"], rows)
    lines.append("")
    for key in "xms":
        values = bench.ratios(configs, key, "d")
        lines.append(f"{LABELS[key]} / no plugins: {statistics.median(values):.2f}x "
                     f"({min(values):.2f}–{max(values):.2f}) over {len(values)} round(s)")
    lines.append(f"wrk -t1 -c{bench.CONNECTIONS} -d{args.duration:g}s after {args.warmup:g}s warm-up; "
                 f"{args.workers} worker(s); upstream: nginx, fixed 100-byte JSON body")
    lines += ["", f"memory store bounded to {args.memory_size} per worker, {args.workers} worker(s), "
                  f"a new path on every request for {args.memory_duration:g}s:"]
    table = [[f"{s['seconds']:.0f}", " / ".join(mib(rss) for rss in s["rss"]), mib(s["bytes"]), f"{s['entries']:,.0f}",
              f"{s['evictions']:,.0f}"] for s in samples]
    lines += bench._text_table(["s", "worker RSS MiB", "cache MiB (all workers)", "entries", "evictions"], table)
    last = samples[-1]
    lines.append(f"{last.get('requests', 0):,} distinct keys requested at {last.get('rps', 0):,.0f} req/s "
                 f"({last.get('errors', 0)} errors); RSS growth per worker: "
                 + ", ".join(mib(end - start) for start, end in zip(samples[0]["rss"], last["rss"])) + " MiB")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every configuration (default 3)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of each measured run (default 5)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of the discarded warm-up (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="gateway workers (default 2)")
    parser.add_argument("--memory-size", default="32MiB", help="memory store per worker in the memory run")
    parser.add_argument("--memory-duration", type=float, default=30.0, help="seconds of the memory run (default 30)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    args.argv = argv
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    def terminate(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, terminate)

    workdir = Path(tempfile.mkdtemp(prefix="plugway-bench-cache-"))
    try:
        harness = CacheBench(args, workdir)
        configs = {key: bench.Config(key, label) for key, label in LABELS.items()}
        harness.start_upstream()
        harness.check_hits()
        for round_no in range(1, args.rounds + 1):
            for config in configs.values():
                harness.run_once(config, round_no)
        bench.log("memory run")
        samples = harness.memory_run(args)
        print(report(configs, samples, bench.machine_header(args), args), end="")
        return 0
    except bench.BenchError as error:
        bench.log(f"bench_cache: {error}")
        args.keep = True
        return 1
    except KeyboardInterrupt:
        bench.log("bench_cache: interrupted, stopping everything")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.stop_all()
        if args.keep:
            bench.log(f"(scratch directory kept: {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
