"""The circuit breaker of one upstream (or one target), as one worker keeps it.

Pure: no I/O and no clock of its own. Every call takes ``now`` (wall-clock seconds, because
periods are shared with other processes through the store), so tests drive it through time
without sleeping. ``shared.py`` keeps it in step with the other workers.

A breaker lives through *periods*: a closed period, then an open one, and so on. Half-open
is not a period of its own: it is an open period whose ``open_until`` has passed, so every
worker agrees on it from the clock alone. Each period has a random ``epoch``; an outcome
counts only in the period its request was admitted in, so the late answers of requests sent
before the breaker opened cannot close it, and the counters start afresh in every period.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
GAUGE_VALUES = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}
MAX_LEVEL = 32  # open_for * backoff ** level is capped by open_for_max long before this
WINDOW_BUCKETS = 10


@dataclass(frozen=True)
class Policy:
    """When to open, for how long, and how to probe (the settings that decide the state)."""

    consecutive_failures: int = 5
    failure_ratio: float = 0.5
    min_requests: int = 20
    window: float = 10.0
    open_for: float = 30.0
    open_for_max: float = 300.0
    backoff: float = 2.0
    half_open_probes: int = 1

    def open_duration(self, level: int) -> float:
        """How long an open period lasts after ``level`` failed rounds of probes in a row."""
        return min(self.open_for * self.backoff ** level, max(self.open_for, self.open_for_max))

    def trip_reason(self, total: int, failures: int, consecutive: int) -> str | None:
        """Why these counts open the breaker, or None if they do not."""
        if self.consecutive_failures and consecutive >= self.consecutive_failures:
            return f"{consecutive} consecutive failures"
        if self.failure_ratio and total >= self.min_requests and failures >= self.failure_ratio * total:
            return f"{failures} failures in {total} requests within {self.window:g}s"
        return None


@dataclass(frozen=True)
class Period:
    """One closed or open stretch of a breaker's life; what the store holds for the host."""

    state: str  # CLOSED or OPEN
    epoch: str
    opened_at: float = 0.0
    open_until: float = 0.0
    level: int = 0  # failed rounds of probes since the breaker last closed: open_for grows with it
    reason: str = ""

    def state_at(self, now: float) -> str:
        if self.state == CLOSED:
            return CLOSED
        return OPEN if now < self.open_until else HALF_OPEN

    def encode(self) -> bytes:
        return json.dumps([self.state, self.epoch, self.opened_at, self.open_until, self.level, self.reason],
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes | None) -> Period | None:
        """The period stored as ``data``, or None when absent or unreadable (another version's)."""
        if not data:
            return None
        try:
            state, epoch, opened_at, open_until, level, reason = json.loads(data)
            if state not in (CLOSED, OPEN):
                return None
            return cls(state, str(epoch), float(opened_at), float(open_until), int(level), str(reason))
        except (ValueError, TypeError):
            return None


INITIAL = Period(CLOSED, "0")


def new_epoch() -> str:
    return secrets.token_hex(6)


class Ticket:
    """What a request was admitted with: its period, whether it is a half-open probe, and
    the host-wide probe slot it holds (-1: none, the store is not used)."""

    __slots__ = ("epoch", "probe", "slot")

    def __init__(self, epoch: str, probe: bool, slot: int = -1) -> None:
        self.epoch = epoch
        self.probe = probe
        self.slot = slot


class RollingWindow:
    """Requests and failures over the last ``length`` seconds, in ten buckets."""

    __slots__ = ("width", "stamps", "totals", "failures")

    def __init__(self, length: float) -> None:
        self.width = length / WINDOW_BUCKETS
        self.stamps = [-1] * WINDOW_BUCKETS
        self.totals = [0] * WINDOW_BUCKETS
        self.failures = [0] * WINDOW_BUCKETS

    def add(self, now: float, *, requests: int, failures: int) -> None:
        index = int(now // self.width)
        slot = index % WINDOW_BUCKETS
        if self.stamps[slot] != index:
            self.stamps[slot], self.totals[slot], self.failures[slot] = index, 0, 0
        self.totals[slot] += requests
        self.failures[slot] += failures

    def counts(self, now: float) -> tuple[int, int]:
        """(requests, failures) within the window ending now."""
        oldest = int(now // self.width) - WINDOW_BUCKETS
        total = failed = 0
        for slot in range(WINDOW_BUCKETS):
            if self.stamps[slot] > oldest:
                total += self.totals[slot]
                failed += self.failures[slot]
        return total, failed


@dataclass
class Pending:
    """Outcomes not yet added to the host's counters (see ``shared.py``)."""

    requests: int = 0
    failures: int = 0
    success_seen: bool = False  # a success since the last flush: the host's consecutive count restarts
    trailing_failures: int = 0  # failures since the last success (or flush)

    def __bool__(self) -> bool:
        return bool(self.requests or self.failures)


class Breaker:
    """The state machine. ``admit`` before the request, ``record`` or ``release`` after it.

    ``record`` returns the new period when an outcome changes the state (it is already in
    force here); the caller publishes it. ``adopt`` follows a period another worker made.
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.period = INITIAL
        self.window = RollingWindow(policy.window)
        self.consecutive = 0
        self.probes = 0  # probes admitted by this worker in this period and not released
        self.probe_successes = 0
        self.pending = Pending()
        self._closed_ticket = Ticket(self.period.epoch, False)  # shared by the requests of a closed period

    def state(self, now: float) -> str:
        return self.period.state_at(now)

    def admit(self, now: float) -> Ticket | None:
        """A ticket for a request, or None to refuse it (open, or every probe taken)."""
        period = self.period
        if period.state == CLOSED:
            return self._closed_ticket
        if now < period.open_until or self.probes >= self.policy.half_open_probes:
            return None
        self.probes += 1
        return Ticket(period.epoch, True)

    def ticket_at(self, now: float) -> Ticket | None:
        """The ticket of a request that did not go through ``admit`` (per-target breakers learn
        the target only from the answer): a probe when half-open, nothing while open."""
        state = self.period.state_at(now)
        if state == OPEN:
            return None
        return Ticket(self.period.epoch, state == HALF_OPEN)

    def release(self, ticket: Ticket) -> None:
        """The request ended without telling anything about the upstream (the client left...)."""
        if ticket.probe and ticket.epoch == self.period.epoch:
            self.probes -= 1

    def record(self, ticket: Ticket, failed: bool, now: float) -> Period | None:
        """Count one outcome; the new period if it opens, re-opens or closes the breaker."""
        period = self.period
        if ticket.epoch != period.epoch:
            return None  # admitted in an earlier period: says nothing about this one
        if ticket.probe:
            if failed:
                return self.open(now, min(period.level + 1, MAX_LEVEL), "a half-open probe failed")
            self.probe_successes += 1
            return self.probes_succeeded(self.probe_successes, now)
        if period.state != CLOSED:
            return None
        self.window.add(now, requests=1, failures=int(failed))
        pending = self.pending
        pending.requests += 1
        if not failed:
            self.consecutive = 0
            pending.success_seen, pending.trailing_failures = True, 0
            return None
        self.consecutive += 1
        pending.failures += 1
        pending.trailing_failures += 1
        return self._check(now)

    def probes_succeeded(self, count: int, now: float) -> Period | None:
        """``count`` probes of this period succeeded (here, or host-wide): close once all did."""
        if self.period.state == CLOSED or count < self.policy.half_open_probes:
            return None
        return self.close(now)

    def trip_check(self, total: int, failures: int, consecutive: int, now: float) -> Period | None:
        """Open on counts gathered elsewhere (the host's), if they cross a threshold."""
        if self.period.state != CLOSED:
            return None
        reason = self.policy.trip_reason(total, failures, consecutive)
        return self.open(now, 0, reason + " across workers") if reason else None

    def open(self, now: float, level: int, reason: str) -> Period:
        period = Period(OPEN, new_epoch(), now, now + self.policy.open_duration(level), level, reason)
        self.adopt(period)
        return period

    def close(self, now: float) -> Period:
        period = Period(CLOSED, new_epoch(), reason=f"{self.policy.half_open_probes} probe(s) succeeded")
        self.adopt(period)
        return period

    def adopt(self, period: Period) -> None:
        """Enter ``period``; counters restart when it is a new one."""
        if period.epoch != self.period.epoch:
            self.window = RollingWindow(self.policy.window)
            self.consecutive = self.probes = self.probe_successes = 0
            self.pending = Pending()
            self._closed_ticket = Ticket(period.epoch, False)
        self.period = period

    def take_pending(self) -> Pending:
        pending, self.pending = self.pending, Pending()
        return pending

    def retry_after(self, now: float) -> int:
        """Seconds a refused client should wait: to the end of the open period, at least 1."""
        return max(1, math.ceil(self.period.open_until - now))

    def _check(self, now: float) -> Period | None:
        total, failures = self.window.counts(now)
        reason = self.policy.trip_reason(total, failures, self.consecutive)
        return self.open(now, 0, reason) if reason else None
