"""systemd integration without systemd as PID 1: the notify protocol over a datagram socket,
and the unit file checked by systemd-analyze."""

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from support import ROOT, PLUGWAY, route_config, wait_until


class NotifySocket:
    def __init__(self, address: str, bind_to: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def collect(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except (socket.timeout, BlockingIOError):
                return [fields for _, fields in self.messages]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key: str, value: str | None = None, after: int = 0) -> dict[str, str]:
        found = {}

        def seen():
            for fields in self.collect()[after:]:
                if key in fields and (value is None or fields[key] == value):
                    found.update(fields)
                    return True
            return False

        wait_until(seen, timeout=30)
        return found


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_reloading_ready_stopping_in_order(plugway_process, tmp_path, abstract):
    if abstract:
        name = f"plugway-test-{os.getpid()}-{time.monotonic_ns()}"
        notify = NotifySocket("@" + name, "\0" + name)
    else:
        path = str(tmp_path / "notify.sock")
        notify = NotifySocket(path, path)
    gateway = plugway_process(route_config("http://127.0.0.1:9", server="workers = 2"),
                              env={"NOTIFY_SOCKET": notify.address})
    ready = notify.wait_for("READY", "1")
    assert "serving with 2 workers" in ready["STATUS"]
    count = len(notify.collect())
    gateway.signal(signal.SIGHUP)
    sent_at = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading = notify.wait_for("RELOADING", "1", after=count)
    assert abs(int(reloading["MONOTONIC_USEC"]) - sent_at) < 1_000_000
    notify.wait_for("READY", "1", after=count)
    order = [f for f in notify.collect()[count:] if "RELOADING" in f or "READY" in f]
    assert "RELOADING" in order[0] and "READY" in order[-1]
    count = len(notify.collect())
    gateway.signal(signal.SIGTERM)
    assert "STOPPING" in notify.wait_for("STOPPING", "1", after=count)
    gateway.wait()


def test_a_failed_reload_reports_its_reason_in_status(plugway_process, tmp_path):
    path = str(tmp_path / "notify.sock")
    notify = NotifySocket(path, path)
    gateway = plugway_process(route_config("http://127.0.0.1:9", server="workers = 1"), env={"NOTIFY_SOCKET": path})
    notify.wait_for("READY", "1")
    gateway.config_path.write_text(gateway.config_path.read_text().replace("workers = 1", "workers = -1"))
    gateway.signal(signal.SIGHUP)
    wait_until(lambda: any("reload failed" in f.get("STATUS", "") for f in notify.collect()))
    message = next(f["STATUS"] for f in notify.collect() if "reload failed" in f.get("STATUS", ""))
    assert "server.workers" in message


def test_watchdog_pings_at_half_the_interval(plugway_process, tmp_path):
    path = str(tmp_path / "notify.sock")
    notify = NotifySocket(path, path)
    plugway_process(route_config("http://127.0.0.1:9", server="workers = 1"),
                    env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    notify.wait_for("READY", "1")
    start = len(notify.collect())
    time.sleep(1.0)
    pings = [f for f in notify.collect()[start:] if f.get("WATCHDOG") == "1"]
    assert len(pings) >= 2


def _unit_for_this_machine(tmp_path):
    unit = (ROOT / "systemd" / "plugway.service").read_text().replace("/opt/plugway/bin/plugway", PLUGWAY)
    path = tmp_path / "plugway.service"
    path.write_text(unit)
    return path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_unit_passes_systemd_analyze_verify_without_a_word(tmp_path):
    result = subprocess.run(["systemd-analyze", "verify", str(_unit_for_this_machine(tmp_path))],
                            capture_output=True, text=True)
    assert result.stderr == "" and result.returncode == 0  # verify exits 0 on many errors: read stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_unit_hardening_score_does_not_regress(tmp_path):
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20",
                             str(_unit_for_this_machine(tmp_path))], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-500:]  # measured 1.8 ("OK") when written


def test_the_unit_has_what_ops_rely_on():
    unit = (ROOT / "systemd" / "plugway.service").read_text()
    for line in ("Type=notify", "KillMode=mixed", "Restart=on-failure", "RuntimeDirectory=plugway",
                 "AmbientCapabilities=CAP_NET_BIND_SERVICE", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ExecReload=/opt/plugway/bin/plugway reload", "LimitNOFILE="):
        assert line in unit, line
    stop = int(next(l for l in unit.splitlines() if l.startswith("TimeoutStopSec=")).split("=")[1])
    assert stop > 30 + 5  # graceful_timeout default plus the supervisor's margin
