"""The supervisor's bookkeeping and its decisions, as plain data and pure functions.

Tests call these without forking. The supervisor (``gateway.supervisor``)
does the I/O: forking, signalling, reading heartbeats.
"""

from __future__ import annotations

import os
import signal
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .config.model import GatewaySettings
from .heartbeat import SupervisorChannel

STABLE_AFTER_SECONDS = 10.0
CRASH_BACKOFF_BASE = 0.5
CRASH_BACKOFF_CAP = 30.0


@dataclass(eq=False)
class WorkerProcess:
    pid: int
    slot: int
    generation: int
    channel: SupervisorChannel
    started: float
    state: str = "starting"  # starting -> ready -> draining
    accepting: bool = True  # False once a draining worker says its listeners are closed
    last_beat: float = 0.0
    ready_at: float | None = None
    requests: int = 0
    rss: int = 0
    stop_deadline: float | None = None
    failure: str | None = None
    exit_reason: str | None = None

    def status(self, now: float) -> dict[str, Any]:
        return {
            "pid": self.pid, "slot": self.slot, "generation": self.generation, "state": self.state,
            "age_seconds": round(now - self.started, 1), "requests": self.requests, "rss_bytes": self.rss,
        }


@dataclass(eq=False)
class Slot:
    """One place for a worker, with the listening sockets that outlive its workers."""

    index: int
    sockets: dict[str, socket.socket] = field(default_factory=dict)
    worker: WorkerProcess | None = None
    crashes: int = 0
    respawn_at: float = 0.0
    retiring: bool = False


@dataclass(eq=False)
class Rollout:
    """Replacing workers slot by slot: for a reload, a rollback, or recycling one worker."""

    reason: str  # "reload" | "rollback" | "recycle"
    settings: GatewaySettings
    generation: int
    pending: deque[int]
    current: int | None = None
    replacement: WorkerProcess | None = None
    deadline: float = 0.0
    done: list[int] = field(default_factory=list)
    replaced: list[WorkerProcess] = field(default_factory=list)  # told to drain by this rollout


def crash_delay(crashes: int) -> float:
    """How long to wait before refilling a slot whose worker died ``crashes`` times in a row.

    The first death is repaired at once; after that the delay doubles from
    ``CRASH_BACKOFF_BASE`` up to ``CRASH_BACKOFF_CAP`` seconds.
    """
    if crashes <= 1:
        return 0.0
    return min(CRASH_BACKOFF_BASE * 2 ** (crashes - 2), CRASH_BACKOFF_CAP)


def crashes_after_death(previous: int, worker: WorkerProcess, now: float) -> int:
    """A worker that served for a while resets the count: its death starts a new series."""
    if worker.ready_at is not None and now - worker.ready_at >= STABLE_AFTER_SECONDS:
        return 1
    return previous + 1


def exit_reason(status: int) -> str:
    """Words for a wait() status: "exit code 3", "killed by SIGKILL"."""
    if os.WIFSIGNALED(status):
        try:
            name = signal.Signals(os.WTERMSIG(status)).name
        except ValueError:
            name = str(os.WTERMSIG(status))
        return f"killed by {name}"
    return f"exit code {os.WEXITSTATUS(status)}"


def is_stuck(worker: WorkerProcess, now: float, timeout: float) -> bool:
    """A ready worker whose event loop has sent no heartbeat for ``timeout`` seconds."""
    return worker.state == "ready" and now - worker.last_beat > timeout


def requests_limit(max_requests: int, jitter: int, random_value: float) -> int:
    """The request count after which one worker recycles itself (0: never)."""
    if max_requests <= 0:
        return 0
    return max_requests + int(jitter * random_value)
