"""Soak: the gateway with every bundled plugin (scripts/bench's config e) under constant load
for a long run, to show that its memory stays flat.

One nginx upstream (the 100-byte body), the gateway with loadtest/plugins.toml and 2 workers,
and wrk -c64 (with e's Accept-Encoding and Origin headers) for --minutes. Every --every seconds
the resident memory of each of the gateway's processes (supervisor, store process, workers)
is sampled. The report: the samples, and each process's growth from the end of the first
minute (warm: pools, caches and the allocator's arenas filled) to the end of the run, with
wrk's requests, errors and latency. Everything runs on 127.0.0.1 and stops by itself.

    .venv/bin/python loadtest/soak_bench.py                 # 5 minutes
    .venv/bin/python loadtest/soak_bench.py --minutes 30 --markdown
    .venv/bin/python loadtest/soak_bench.py --server 'gc_thaw_interval = "2m"'   # TOML for [server]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench import LOADTEST, PLUGIN_HEADERS, parse_wrk
from harness import (
    HOST, VENV_BIN, BenchError, free_port, gateway_toml, http_get, log, rss_kib, run_in_scratch, spawn,
    start_nginx_upstream, stop, wait_exit, wait_ready,
)

WARM_SECONDS = 60.0


def roles(admin_port: int) -> dict[int, str]:
    """The gateway's processes by pid: supervisor, store, worker N (from the admin /status)."""
    status, body = http_get(admin_port, "/status")
    if status != 200:
        raise BenchError(f"/status answered {status}")
    cluster = json.loads(body)
    named = {cluster["supervisor_pid"]: "supervisor"}
    if cluster.get("store_pid"):
        named[cluster["store_pid"]] = "store"
    named.update((worker["pid"], f"worker {worker['slot']}") for worker in cluster["workers"])
    return named


def soak(args: argparse.Namespace, workdir: Path) -> str:
    _, upstream_port = start_nginx_upstream(workdir)
    port, admin_port = free_port(), free_port()
    extra = (LOADTEST / "plugins.toml").read_text()
    conf = workdir / "gateway.toml"
    conf.write_text(gateway_toml(port, admin_port, upstream_port, workdir / "run", workers=2, upstream="up",
                                 server="\n".join(args.server), extra=extra))
    gateway_log = workdir / "gateway.log"
    gateway = spawn([str(VENV_BIN / "plugway"), "run", "-c", str(conf)], gateway_log)
    wait_ready(gateway, admin_port, "/ready", gateway_log, "the gateway")
    processes = roles(admin_port)
    seconds = args.minutes * 60
    headers = [arg for header in PLUGIN_HEADERS for arg in ("-H", header)]
    wrk_out = workdir / "soak.wrk"
    wrk = spawn(["wrk", "-t1", "-c64", f"-d{seconds:g}s", "--latency", "--timeout", "5s", *headers,
                 f"http://{HOST}:{port}/"], wrk_out)
    log(f"soak: {args.minutes:g} min of wrk -c64 against the gateway with every plugin; "
        f"memory of {len(processes)} processes every {args.every:g} s")
    started = time.monotonic()
    samples: list[tuple[float, dict[int, int]]] = []
    while True:
        elapsed = time.monotonic() - started
        samples.append((elapsed, {pid: rss_kib(pid) for pid in processes}))
        if elapsed >= seconds:
            break
        time.sleep(min(args.every, seconds - elapsed))
    if not wait_exit(wrk, 60):
        raise BenchError("wrk did not finish")
    stop(wrk)
    if set(roles(admin_port)) != set(processes):
        raise BenchError("a gateway process was replaced during the soak (see gateway.log)")
    stop(gateway)
    return report(args, processes, samples, parse_wrk(wrk_out.read_text(errors="replace")))


def report(args: argparse.Namespace, processes: dict[int, str], samples: list, wrk) -> str:
    order = sorted(processes, key=lambda pid: processes[pid])
    warm = min(samples, key=lambda sample: abs(sample[0] - WARM_SECONDS))
    last = samples[-1]
    title = f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, nproc {os.cpu_count()}: soak, every plugin"
    lines = [title, "", "```sh", ".venv/bin/python loadtest/soak_bench.py " + " ".join(sys.argv[1:]), "```", "",
             f"- gateway: 2 workers with loadtest/plugins.toml (config e of scripts/bench), upstream nginx "
             f"(100-byte body); `wrk -t1 -c64 -d{args.minutes * 60:g}s` with {', '.join(PLUGIN_HEADERS)}"
             + (f"; [server] {'; '.join(args.server)}" if args.server else "") + ".",
             f"- wrk: {wrk.requests:,} requests, {wrk.rps:,.0f} req/s, p50 {wrk.p50_ms:.2f} ms, p99 {wrk.p99_ms:.2f} ms, "
             f"non-2xx {wrk.non2xx}, socket errors {wrk.socket_errors}.", "",
             "| s | " + " | ".join(processes[pid] for pid in order) + " |",
             "|---|" + "---|" * len(order)]
    for elapsed, rss in samples:
        lines.append(f"| {elapsed:.0f} | " + " | ".join(f"{rss[pid] / 1024:.1f}" for pid in order) + " |")
    lines += ["", f"Resident memory in MiB. Growth from {warm[0]:.0f} s (warm) to the end ({last[0]:.0f} s): "
              + ", ".join(f"{processes[pid]} {(last[1][pid] - warm[1][pid]) / 1024:+.1f} MiB" for pid in order)
              + ".", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="length of the load (default 5)")
    parser.add_argument("--every", type=float, default=15.0, help="seconds between memory samples (default 15)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (config, logs)")
    parser.add_argument("--server", action="append", default=[], metavar="TOML",
                        help="a line of TOML for the gateway's [server] table (repeatable)")
    args = parser.parse_args()
    if not 1 <= args.minutes <= 24 * 60 or not 1 <= args.every <= 600:
        parser.error("--minutes must be 1 to 1440, --every 1 to 600")
    return run_in_scratch("loadtest/soak_bench.py", "plugway-soak-", args.keep, lambda workdir: soak(args, workdir))


if __name__ == "__main__":
    sys.exit(main())
