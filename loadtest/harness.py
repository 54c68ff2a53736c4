"""Process and measurement helpers shared by the load tests in this directory (bench.py and the
scenario benchmarks): start servers in their own process groups and always stop them, wait until
they answer, find free ports, read CPU use from /proc, and frame a benchmark's main (signals,
scratch directory, cleanup).

Everything listens on and sends to 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
NGINX_CONFS = ROOT / "loadtest" / "nginx"
HOST = "127.0.0.1"  # the only address anything here listens on or sends to
START_TIMEOUT = 30.0  # seconds a server has to become ready
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# -- processes ---------------------------------------------------------------------------------

_started: list[subprocess.Popen] = []  # every process group this run started, for cleanup


def spawn(cmd: list[str], logfile: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start cmd in a new session (its own process group), output to logfile."""
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=ROOT, env=env)
    _started.append(proc)
    return proc


def exited(proc: subprocess.Popen) -> bool:
    """Whether proc has exited, without reaping it: an unreaped leader keeps its process group id
    reserved, so signalling the group can never reach a process that is not ours."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not exited(proc):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, wait (bounded), SIGKILL whatever of the group is left, reap."""
    if proc.returncode is None:  # not reaped yet, so the group id (the leader's pid) is still ours
        pgid = proc.pid  # start_new_session: the group id is the leader's pid
        _signal_group(pgid, signal.SIGTERM)
        if not wait_exit(proc, STOP_TIMEOUT):
            log(f"  (pid {proc.pid} did not stop within {STOP_TIMEOUT:.0f}s of SIGTERM: SIGKILL)")
        # The leader is gone but not reaped: stray members of its group (the workers of a
        # supervisor that exited first, say) go too.
        _signal_group(pgid, signal.SIGKILL)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log(f"  (pid {proc.pid} survived SIGKILL?)")
    if proc in _started:
        _started.remove(proc)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all() -> None:
    for proc in list(reversed(_started)):
        stop(proc)


def run_in_scratch(prog: str, prefix: str, keep: bool, body: Callable[[Path], str]) -> int:
    """The frame of a benchmark's main: body(a new scratch directory) runs and what it returns (the
    report) is printed; SIGINT, SIGTERM and SIGHUP interrupt it; however it ends, every process
    started is stopped and the scratch directory removed, unless keep or a BenchError (logs kept).
    Returns the exit status: 0, 1 after a BenchError, 130 when interrupted."""
    def terminate(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT too: ignored when started with &
        signal.signal(signum, terminate)
    workdir: Path | None = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        print(body(workdir), end="")
        return 0
    except BenchError as error:
        log(f"{prog}: {error}")
        log(f"(logs kept in {workdir})")
        workdir = None
        return 1
    except KeyboardInterrupt:
        log(f"{prog}: interrupted, stopping everything")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_all()
        if workdir is not None and keep:
            log(f"(scratch directory kept: {workdir})")
        elif workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def http_request(port: int, path: str = "/", timeout: float = 2.0, *, method: str = "GET",
                 headers: Sequence[str] = ()) -> tuple[int, bytes, http.client.HTTPMessage]:
    """One request on a new connection, with headers given as wrk takes them ("Name: value");
    returns the status, body and response headers."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, headers=dict(map(str.strip, header.split(":", 1)) for header in headers))
        response = conn.getresponse()
        return response.status, response.read(), response.headers
    finally:
        conn.close()


def http_get(port: int, path: str = "/", timeout: float = 2.0, headers: Sequence[str] = ()) -> tuple[int, bytes]:
    return http_request(port, path, timeout, headers=headers)[:2]


def wait_ready(proc: subprocess.Popen, port: int, path: str, logfile: Path, what: str,
               get: Callable[..., tuple[int, bytes]] = http_get) -> float:
    """Poll GET path on port until 200; returns the seconds it took. get is http_get, or a function
    with its signature that speaks another protocol (HTTPS, say)."""
    started = time.monotonic()
    deadline = started + START_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        if exited(proc):
            raise BenchError(f"{what} exited while starting:\n{tail(logfile)}")
        try:
            status, _ = get(port, path, timeout=1.0)
            if status == 200:
                return time.monotonic() - started
            last = f"status {status}"
        except OSError as error:
            last = str(error)
        time.sleep(0.05)
    raise BenchError(f"{what} not ready after {START_TIMEOUT:.0f}s ({last}):\n{tail(logfile)}")


# -- the machine -------------------------------------------------------------------------------

def command_output(*cmd: str) -> str:
    """What a command printed (stdout and stderr), or "?" when it could not run."""
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=ROOT)
        return (result.stdout + result.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def gateway_commit() -> str:
    """The commit measured, and whether gateway/ differs from it."""
    dirty = command_output("git", "status", "--porcelain", "--", "gateway")
    return f"commit {command_output('git', 'rev-parse', '--short', 'HEAD')}" + (
        " (gateway/ has uncommitted changes)" if dirty else "")


def aiohttp_version() -> str:
    try:
        import aiohttp
    except ImportError:
        return "?"
    return aiohttp.__version__


# -- the gateway -------------------------------------------------------------------------------

def gateway_toml(port: int, admin_port: int, upstream_port: int, runtime_dir: str | Path, *, workers: int = 2,
                 server: str = "", upstream: str = "app", upstream_keys: str = "", route: str = "all",
                 prefix: str = "/", extra: str = "") -> str:
    """The configuration every script here starts the gateway with: one upstream on 127.0.0.1,
    one route to it, its own runtime directory, no access log. ``server`` and ``upstream_keys``
    add lines to those tables; ``extra`` is appended (plugin tables, more routes)."""
    return f"""\
[server]
listen = ["{HOST}:{port}"]
workers = {workers}
runtime_dir = "{runtime_dir}"
{server}
[admin]
listen = "{HOST}:{admin_port}"
[log]
access = false
[[upstreams]]
name = "{upstream}"
targets = [{{ url = "http://{HOST}:{upstream_port}" }}]
{upstream_keys}
[[routes]]
name = "{route}"
prefix = "{prefix}"
upstream = "{upstream}"
{extra}"""


# -- nginx -------------------------------------------------------------------------------------

def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def spawn_nginx(name: str, port: int, workdir: Path, upstream_port: int = 0,
                nginx: str | None = None) -> subprocess.Popen:
    """nginx, 1 worker, with loadtest/nginx/NAME.conf (@PORT@, @UPSTREAM_PORT@ and @DIR@ filled in,
    the copy and its logs in workdir)."""
    text = (NGINX_CONFS / f"{name}.conf").read_text()
    text = text.replace("@PORT@", str(port)).replace("@UPSTREAM_PORT@", str(upstream_port))
    text = text.replace("@DIR@", str(workdir))
    conf = workdir / f"{name}.conf"
    conf.write_text(text)
    cmd = [nginx or nginx_binary(), "-p", f"{workdir}/", "-c", str(conf), "-e", str(workdir / f"{name}.err"),
           "-g", "worker_processes 1;"]
    return spawn(cmd, workdir / f"{name}.log")


def start_nginx_upstream(workdir: Path, nginx: str | None = None) -> tuple[subprocess.Popen, int]:
    """The fast upstream (loadtest/nginx/upstream.conf: 200 with a fixed 100-byte body) on a free
    port, ready and checked; returns the process and its port."""
    port = free_port()
    proc = spawn_nginx("upstream", port, workdir, nginx=nginx)
    wait_ready(proc, port, "/", workdir / "upstream.log", "the upstream nginx")
    status, body = http_get(port)
    if status != 200 or len(body) != 100:
        raise BenchError(f"the upstream answered {status} with {len(body)} bytes, expected 200 with 100")
    return proc, port


def rss_kib(pid: int) -> int:
    """The resident memory of process pid, in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1])


def process_tree(root: int) -> list[int]:
    """root and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo and len(tree) < 10_000:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def cpu_ticks(root: int) -> int:
    """CPU clock ticks used so far by root's process tree: each live member's own time plus that of
    the children it has reaped (cutime, cstime), so a worker that exits is still counted."""
    total = 0
    for pid in process_tree(root):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += sum(int(n) for n in fields[11:15])  # utime, stime, cutime, cstime
    return total


def all_ticks() -> dict[int, tuple[str, int, str]]:
    """{pid: (start time, utime + stime, name)} for every user-space process on the machine."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if entry.name != "2" and fields[1] != "2":  # not a kernel thread (ksoftirqd does loopback work)
                name = stat[stat.index("(") + 1:stat.rindex(")")]
                out[int(entry.name)] = (fields[19], int(fields[11]) + int(fields[12]), name)
    return out


def foreign_cpu(before: dict[int, tuple[str, int, str]], seconds: float) -> tuple[float, str]:
    """CPU (% of one core) used since `before` by processes that this run did not start (other
    people's work on the machine), and the busiest of them. Approximate: a process that exited
    meanwhile is not seen."""
    ours = set(process_tree(os.getpid()))
    hz = os.sysconf("SC_CLK_TCK")
    used = {}
    for pid, (start, total, name) in all_ticks().items():
        if pid not in ours:
            old = before.get(pid)
            ticks = total - old[1] if old and old[0] == start else total
            if ticks > 0:
                used[f"{name}[{pid}]"] = 100.0 * ticks / hz / max(seconds, 0.001)
    busiest = sorted(used.items(), key=lambda item: -item[1])[:3]
    return sum(used.values()), ", ".join(f"{name} {percent:.0f}%" for name, percent in busiest)
