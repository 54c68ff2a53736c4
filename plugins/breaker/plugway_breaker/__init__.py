"""Circuit breaker per upstream (or per target), shared by the workers of a host (README.md).

``on_request`` refuses while the route's upstream's breaker is open (503 with Retry-After,
or the configured fallback). Failures are recorded as soon as they are known: in
``on_error`` (no response head) and ``on_response`` (a failure status); a success only in
``after_response``, once the body went through whole, where also what the other hooks could
not see is settled (a body cut short, a fallback another plugin gave on error, a client that
left). The state machine is ``state.py``, its sharing
through the store ``shared.py``; this module is the glue: settings, hooks, metrics, logs,
the admin view and the per-worker tick that keeps views and gauges fresh.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from gateway import Duration, GatewayError, PluginDeclaration, Response, UpstreamResponse, hookimpl, setting
from gateway.config.schema import parse_settings
from gateway.store import StoreUnavailable

from .shared import SYNC_INTERVAL, Events, SharedBreaker
from .state import CLOSED, GAUGE_VALUES, HALF_OPEN, OPEN, Period, Policy, Ticket

log = logging.getLogger("plugway.breaker")
PLUGIN = "breaker"
UPSTREAM_ERRORS = ("upstream_unreachable", "upstream_timeout", "upstream_invalid_response", "upstream_busy",
                   "no_target_available")
WARN_EVERY_SECONDS = 10.0


class CircuitOpen(GatewayError):
    status, code, message = 503, "circuit_open", "the upstream's circuit breaker is open"


# --- settings ---------------------------------------------------------------------------------


def _parse_statuses(raw: object) -> frozenset[int]:
    if not isinstance(raw, list):
        raise ValueError("must be an array of statuses (500) or ranges (\"500-599\")")
    statuses: set[int] = set()
    for item in raw:
        if isinstance(item, int) and not isinstance(item, bool):
            low = high = item
        elif isinstance(item, str) and item.count("-") == 1 and all(p.strip().isdigit() for p in item.split("-")):
            low, high = (int(p) for p in item.split("-"))
        else:
            raise ValueError(f'{item!r} is neither a status (500) nor a range ("500-599")')
        if not 100 <= low <= high <= 599:
            raise ValueError(f"{item!r} must be statuses between 100 and 599")
        statuses.update(range(low, high + 1))
    return frozenset(statuses)


def _render_statuses(statuses: frozenset[int]) -> list[int | str]:
    out: list[int | str] = []
    ordered = sorted(statuses)
    start = 0
    for index in range(1, len(ordered) + 1):
        if index == len(ordered) or ordered[index] != ordered[index - 1] + 1:
            low, high = ordered[start], ordered[index - 1]
            out.append(low if low == high else f"{low}-{high}")
            start = index
    return out


def _valid_header(name: str, value: str) -> bool:
    token = name and all(33 <= ord(c) < 127 and c not in '"(),/:;<=>?@[\\]{}' for c in name)
    return bool(token) and all(ord(c) >= 32 and ord(c) != 127 or c == "\t" for c in value)


@dataclass(frozen=True)
class FallbackSettings:
    status: int = setting(503, doc="Status of the static answer sent while the breaker is open.")
    body: str = setting("", doc="Its body.")
    headers: Mapping[str, str] = setting(
        factory=dict, doc="Its headers; Content-Type defaults to text/plain when there is a body.",
    )

    def validate(self) -> Iterator[tuple[str, str]]:
        if not 200 <= self.status <= 599:
            yield "status", f"{self.status} must be between 200 and 599"
        for name, value in self.headers.items():
            if not _valid_header(name, value):
                yield "headers", f"{name!r} is not a valid header name and value"


@dataclass(frozen=True)
class BreakerSettings:
    consecutive_failures: int = setting(5, doc="Open after this many failures in a row (0: only the ratio).")
    failure_ratio: float = setting(
        0.5, doc="Open when failures reach this share of the requests in the window (0: only consecutive).",
    )
    min_requests: int = setting(20, doc="The ratio applies once the window holds at least this many requests.")
    window: Duration = setting(Duration("10s"), doc="Rolling window of the failure ratio.")
    failure_statuses: frozenset[int] = setting(
        _parse_statuses(["500-599"]), parse=_parse_statuses, render=_render_statuses,
        doc='Upstream statuses that count as failures: statuses and ranges, as [502, "504-599"].',
    )
    failure_errors: tuple[Literal[UPSTREAM_ERRORS], ...] = setting(
        UPSTREAM_ERRORS, doc="Errors getting a response head that count as failures, by code.",
    )
    open_for: Duration = setting(Duration("30s"), doc="How long the breaker stays open before probing.")
    open_for_max: Duration = setting(Duration("5m"), doc="Cap of open_for as it grows after failed probes.")
    backoff: float = setting(2.0, doc="open_for is multiplied by this after each round of failed probes.")
    half_open_probes: int = setting(1, doc="Requests let through when half-open; all must succeed to close.")
    per_target: bool = setting(False, doc="One breaker per target instead of per upstream (see README).")
    shared: Literal["host", "store", "off"] = setting(
        "host", doc='Share state: "host" (the host-local store), "store" (the configured store), "off".',
    )
    fallback: FallbackSettings | None = setting(None, doc="Static answer while open, instead of the 503.")
    fallback_upstream: str | None = setting(None, doc="Upstream that answers while open, instead of the 503.")

    def validate(self) -> Iterator[tuple[str, str]]:
        if self.consecutive_failures < 0:
            yield "consecutive_failures", "must be 0 or more"
        if not 0 <= self.failure_ratio <= 1:
            yield "failure_ratio", "must be between 0 and 1"
        if self.consecutive_failures == 0 and self.failure_ratio == 0:
            yield "", "consecutive_failures and failure_ratio cannot both be 0: the breaker would never open"
        if self.min_requests < 1:
            yield "min_requests", "must be at least 1"
        if self.window <= 0:
            yield "window", "must be longer than 0"
        if self.open_for <= 0:
            yield "open_for", "must be longer than 0"
        if self.open_for_max < self.open_for:
            yield "open_for_max", "must be at least open_for"
        if self.backoff < 1:
            yield "backoff", "must be 1 or more"
        if not 1 <= self.half_open_probes <= 100:
            yield "half_open_probes", "must be between 1 and 100"
        if self.fallback is not None and self.fallback_upstream is not None:
            yield "fallback_upstream", "set fallback or fallback_upstream, not both"

    def validate_with(self, gateway_settings: Any) -> Iterator[tuple[str, str]]:
        names = {upstream.name for upstream in gateway_settings.upstreams}
        if self.fallback_upstream is not None and self.fallback_upstream not in names:
            yield "fallback_upstream", f'unknown upstream "{self.fallback_upstream}"'
        by_upstream: dict[str, list[tuple[str, tuple]]] = {}
        for route, upstream, settings in _effective_settings(gateway_settings):
            by_upstream.setdefault(upstream, []).append((route, settings.identity))
        for upstream, routes in by_upstream.items():
            first_route, first = routes[0]
            if self.identity != first and any(identity == self.identity for _, identity in routes):
                yield "", (f'routes on upstream "{upstream}" share one breaker, but route "{first_route}" gives it '
                           "other thresholds, durations, per_target or shared; set those in [plugins.breaker]")

    @property
    def policy(self) -> Policy:
        return Policy(
            consecutive_failures=self.consecutive_failures, failure_ratio=self.failure_ratio,
            min_requests=self.min_requests, window=float(self.window), open_for=float(self.open_for),
            open_for_max=float(self.open_for_max), backoff=self.backoff, half_open_probes=self.half_open_probes,
        )

    @property
    def identity(self) -> tuple:
        """What every route on one upstream must agree on: the breaker itself."""
        return self.policy, self.per_target, self.shared


def _effective_settings(gateway_settings: Any) -> Iterator[tuple[str, str, BreakerSettings]]:
    """(route, upstream, settings) of every route the breaker is on, merged as the core merges."""
    global_table = gateway_settings.plugins.get(PLUGIN)
    globally = global_table is not None and global_table.get("enabled", True) is True
    for route in gateway_settings.routes:
        table = route.plugins.get(PLUGIN)
        if table is None and not globally or table is not None and table.get("enabled", True) is not True:
            continue
        merged = {**_own_keys(global_table or {}), **_own_keys(table or {})}
        parsed = parse_settings(BreakerSettings, merged, "", [])
        if parsed is not None:
            yield route.name, route.upstream, parsed


def _own_keys(table: Mapping[str, Any]) -> dict[str, Any]:
    return {key: _thaw(value) for key, value in table.items() if key not in ("enabled", "priority")}


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _thaw(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_thaw(item) for item in value]
    return value


# --- per worker: the breakers, their metrics, logs and tick -------------------------------------


class UpstreamGuard:
    """The breaker of one upstream, or the breakers of its targets (``per_target``)."""

    def __init__(self, workers: WorkerBreakers, upstream: Any, settings: BreakerSettings) -> None:
        self.workers = workers
        self.upstream = upstream
        self.name = upstream.name
        self.settings = settings
        self.per_target = settings.per_target
        self.breaker = None if self.per_target else workers.new_breaker(self, None)
        self.targets: dict[str, SharedBreaker] = {}
        self.unclosed_targets = 0  # per_target: how many of this worker's target views are not closed
        if self.per_target:
            for target in upstream.targets:
                self.target_breaker(target.url)

    def target_breaker(self, url: str) -> SharedBreaker:
        breaker = self.targets.get(url)
        if breaker is None:
            breaker = self.targets[url] = self.workers.new_breaker(self, url)
        return breaker

    def breakers(self) -> list[SharedBreaker]:
        return list(self.targets.values()) if self.per_target else [self.breaker]

    def state(self, now: float) -> str:
        if not self.per_target:
            return self.breaker.breaker.state(now)
        states = {self.target_breaker(t.url).breaker.state(now) for t in self.upstream.targets}
        if CLOSED in states or not states:
            return CLOSED
        return HALF_OPEN if HALF_OPEN in states else OPEN

    def prune(self) -> None:
        """Forget the breakers of targets that left the upstream (DNS discovery)."""
        if self.per_target and len(self.targets) > len(self.upstream.targets):
            current = {target.url for target in self.upstream.targets}
            for url in [url for url in self.targets if url not in current]:
                if self.targets.pop(url).observed != CLOSED:
                    self.unclosed_targets -= 1


class WorkerBreakers(Events):
    def __init__(self, gateway: Any, settings_by_upstream: dict[str, BreakerSettings]) -> None:
        self.gateway = gateway
        metrics = gateway.metrics
        self.state_gauge = metrics.gauge("plugway_breaker_state",
                                         "Circuit breaker state: 0 closed, 1 open, 2 half-open.", ("upstream",),
                                         mode="livemax")
        self.target_gauge = metrics.gauge("plugway_breaker_target_state",
                                          "Per-target circuit breaker state: 0 closed, 1 open, 2 half-open.",
                                          ("upstream", "target"), mode="livemax")
        self.transitions = metrics.counter("plugway_breaker_transitions_total",
                                           "Circuit breaker transitions, by upstream and new state.",
                                           ("upstream", "to"))
        self.rejected = metrics.counter("plugway_breaker_rejected_total",
                                        "Requests the circuit breaker kept from their upstream.", ("upstream",))
        self.store_errors = metrics.counter("plugway_breaker_store_errors_total",
                                            "Store operations that failed; breakers went on per worker.")
        self.last_warning = 0.0
        self.guards = {name: UpstreamGuard(self, gateway.upstreams[name], settings)
                       for name, settings in settings_by_upstream.items()}
        for guard in self.guards.values():
            self.state_gauge.labels(guard.name).set(0)
        self.tick: asyncio.Task | None = None

    def new_breaker(self, guard: UpstreamGuard, target: str | None) -> SharedBreaker:
        settings = guard.settings
        store = {"host": self.gateway.local_store, "store": self.gateway.store, "off": None}[settings.shared]
        timeouts = guard.upstream.settings  # the longest a probe can take: the total timeout, else connect + read
        probe_time = getattr(timeouts, "timeout", 0) or timeouts.connect_timeout + timeouts.read_timeout
        name = guard.name if target is None else f"{guard.name} {target}"
        breaker = SharedBreaker(name, settings.policy, store, probe_ttl=max(1.0, float(probe_time)) + 1.0, events=self,
                                spawn=self.gateway.spawn)
        breaker.guard, breaker.target = guard, target
        if target is not None:
            self.target_gauge.labels(guard.name, target).set(0)
        return breaker

    def changed(self, breaker: SharedBreaker, old: str, new: str) -> None:
        guard = breaker.guard
        if breaker.target is None:
            self.state_gauge.labels(guard.name).set(GAUGE_VALUES[new])
            return
        self.target_gauge.labels(guard.name, breaker.target).set(GAUGE_VALUES[new])
        guard.unclosed_targets += (new != CLOSED) - (old != CLOSED)
        self.state_gauge.labels(guard.name).set(GAUGE_VALUES[guard.state(time.time())])

    def transition(self, breaker: SharedBreaker, old: str, new: str, period: Period, local: bool) -> None:
        guard = breaker.guard
        self.transitions.labels(guard.name, new).inc()
        what = f'upstream "{guard.name}"' + (f" target {breaker.target}" if breaker.target else "")
        scope = " (this worker only: the store is off or unavailable)" if local else ""
        if new == OPEN:
            log.warning("circuit breaker of %s opened for %.1fs: %s%s", what, period.open_until - period.opened_at,
                        period.reason, scope, extra={"reason": period.reason})
        elif new == HALF_OPEN:
            log.info("circuit breaker of %s is half-open: probing%s", what, scope)
        else:
            log.info("circuit breaker of %s closed: %s%s", what, period.reason, scope)

    def store_failed(self, breaker: SharedBreaker, error: StoreUnavailable) -> None:
        self.store_errors.inc()
        now = time.monotonic()
        if now - self.last_warning >= WARN_EVERY_SECONDS:
            self.last_warning = now
            log.warning("circuit breakers go on per worker, the store failed: %s", error)

    def describe(self, name: str) -> dict[str, Any]:
        guard = self.guards.get(name)
        if guard is None:
            return {}
        now = time.time()
        if not guard.per_target:
            return {"breaker": _view(guard.breaker, guard.settings.shared, now)}
        return {"breaker": {"state": guard.state(now), "per_target": True, "shared": guard.settings.shared,
                            "targets": {url: _view(b, guard.settings.shared, now) for url, b in guard.targets.items()}}}

    async def run_tick(self) -> None:
        """Every SYNC_INTERVAL: the clock's transitions into the gauges, and the views in use synced."""
        while True:
            await asyncio.sleep(SYNC_INTERVAL)
            try:
                now = time.time()
                syncs = []
                for guard in self.guards.values():
                    guard.prune()
                    for breaker in guard.breakers():
                        breaker.observe(now)
                        if breaker.sync_due(now):
                            syncs.append(breaker.sync())
                if syncs:
                    await asyncio.gather(*syncs)
            except Exception:
                log.exception("the circuit breaker tick failed")


def _view(breaker: SharedBreaker, shared: str, now: float) -> dict[str, Any]:
    period = breaker.breaker.period
    opened = period.state == OPEN
    return {
        "state": period.state_at(now),
        "opened_at": _timestamp(period.opened_at) if opened else None,
        "open_until": _timestamp(period.open_until) if opened else None,
        "reason": period.reason or None,
        "failed_probe_rounds": period.level,
        "shared": shared if breaker.store_usable(now) or shared == "off" else f"{shared} (unavailable: per worker)",
    }


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- the requests -----------------------------------------------------------------------------


class Attempt:
    """A request the breaker let through: which breaker and ticket its outcome goes to."""

    __slots__ = ("guard", "breaker", "ticket", "probes", "done", "head_ok")

    def __init__(self, guard: UpstreamGuard, breaker: SharedBreaker | None, ticket: Ticket | None,
                 probes: dict[str, tuple[SharedBreaker, Ticket]] | None = None) -> None:
        self.guard = guard
        self.breaker = breaker
        self.ticket = ticket
        self.probes = probes  # per target: the half-open targets this request may probe, by URL
        self.done = False
        self.head_ok = False


FALLBACK = object()  # ctx.state[PLUGIN] of a request sent to the fallback upstream


@hookimpl
def declare_plugin():
    return PluginDeclaration(settings=BreakerSettings, priority=850)


@hookimpl
def worker_started(gateway):
    me = next(p for p in gateway.plugins.plugins if p.module is sys.modules[__name__])
    settings_by_upstream = {}
    for route in gateway.settings.routes:
        if route.name in me.route_settings:
            settings_by_upstream.setdefault(route.upstream, me.route_settings[route.name])
    workers = gateway.state[PLUGIN] = WorkerBreakers(gateway, settings_by_upstream)
    gateway.upstream_annotations.append(workers.describe)
    workers.tick = gateway.loop.create_task(workers.run_tick())


@hookimpl
async def worker_stopping(gateway):
    workers = gateway.state.get(PLUGIN)
    if workers is None:
        return
    workers.tick.cancel()
    syncs = [b.sync() for guard in workers.guards.values() for b in guard.breakers() if b.syncing]
    await asyncio.gather(workers.tick, *syncs, return_exceptions=True)


@hookimpl
def on_request(ctx, settings):
    guard = ctx.gateway.state[PLUGIN].guards[ctx.route.upstream.name]
    now = time.time()
    if guard.per_target:
        if not guard.unclosed_targets:
            ctx.state[PLUGIN] = Attempt(guard, None, None)
            return None
        return _steer(ctx, settings, guard, now)
    breaker = guard.breaker
    if breaker.needs_store(now):
        return _admit_with_store(ctx, settings, guard, now)
    return _admitted(ctx, settings, guard, breaker.admit(now), now)


async def _admit_with_store(ctx, settings: BreakerSettings, guard: UpstreamGuard, now: float):
    ticket = await guard.breaker.admit_with_store(now)
    return _admitted(ctx, settings, guard, ticket, time.time())


async def _steer(ctx, settings: BreakerSettings, guard: UpstreamGuard, now: float):
    """Per target: keep the request away from the targets whose breaker refuses it (open, or
    half-open with every probe taken), holding a probe ticket for each half-open target it may
    go to; refused when that leaves no target."""
    avoid, probes = [], {}
    for target in guard.upstream.targets:
        breaker = guard.target_breaker(target.url)
        if breaker.breaker.period.state == CLOSED:
            continue
        ticket = await breaker.admit_with_store(now) if breaker.needs_store(now) else breaker.admit(now)
        if ticket is None:
            avoid.append(breaker)
        elif ticket.probe:
            probes[target.url] = (breaker, ticket)
    if avoid and len(avoid) == len(guard.upstream.targets):
        return _refuse(ctx, settings, guard, min(b.breaker.retry_after(time.time()) for b in avoid))
    if avoid:
        ctx.avoid_targets |= {breaker.target for breaker in avoid}
    ctx.state[PLUGIN] = Attempt(guard, None, None, probes)
    return None


def _admitted(ctx, settings: BreakerSettings, guard: UpstreamGuard, ticket: Ticket | None, now: float):
    if ticket is None:
        return _refuse(ctx, settings, guard, guard.breaker.breaker.retry_after(now))
    ctx.state[PLUGIN] = Attempt(guard, guard.breaker, ticket)
    return None


def _refuse(ctx, settings: BreakerSettings, guard: UpstreamGuard, retry_after: int):
    ctx.gateway.state[PLUGIN].rejected.labels(guard.name).inc()
    ctx.log["breaker"] = "open"
    if settings.fallback_upstream is not None:
        ctx.state[PLUGIN] = FALLBACK
        return None
    fallback = settings.fallback
    if fallback is None:
        raise CircuitOpen(f'the circuit breaker of upstream "{guard.name}" is open; retry later',
                          headers=[("Retry-After", str(retry_after))])
    response = Response(fallback.status, fallback.body, fallback.headers.items())
    headers = response.headers
    if fallback.body and "Content-Type" not in headers:
        headers["Content-Type"] = "text/plain; charset=utf-8"
    if fallback.status in (429, 503) and "Retry-After" not in headers:
        headers["Retry-After"] = str(retry_after)
    return response


@hookimpl
def before_upstream(ctx, settings, outgoing):
    if ctx.state.get(PLUGIN) is FALLBACK:
        outgoing.upstream_name = settings.fallback_upstream


@hookimpl
def on_error(ctx, settings, error):
    attempt = ctx.state.get(PLUGIN)
    if attempt is not None and attempt is not FALLBACK and not attempt.done:
        counted = error.code in settings.failure_errors
        _outcome(ctx, attempt, failed=counted, neutral=not counted)


@hookimpl
def on_response(ctx, settings, response):
    attempt = ctx.state.get(PLUGIN)
    if attempt is None or attempt is FALLBACK or attempt.done or not isinstance(response, UpstreamResponse):
        return
    if response.upstream_status in settings.failure_statuses:
        _outcome(ctx, attempt, failed=True)
    else:
        attempt.head_ok = True  # a success once the body is through (after_response)


@hookimpl
def after_response(ctx, settings):
    attempt = ctx.state.get(PLUGIN)
    if attempt is None or attempt is FALLBACK or attempt.done:
        return
    error = ctx.error if isinstance(ctx.error, GatewayError) and ctx.status != 499 else None
    if attempt.head_ok:  # a body cut short by the upstream fails; a client leaving says nothing
        _outcome(ctx, attempt, failed=error is not None, neutral=ctx.status == 499)
    else:  # on_error did not run for us (a plugin before us answered with a fallback), or
        # nothing was learnt about the upstream (the client left, a plugin answered)
        failed = error is not None and error.code in settings.failure_errors
        _outcome(ctx, attempt, failed, neutral=not failed)


def _outcome(ctx, attempt: Attempt, failed: bool, *, neutral: bool = False) -> None:
    attempt.done = True
    if attempt.breaker is None:  # per target: the targets are known now
        _record_failed_tries(ctx, attempt)
        if not _take_final_target(ctx, attempt, neutral):
            return
    if neutral or ctx.upstream is not attempt.guard.upstream:  # redirected by another plugin: not ours to judge
        attempt.breaker.release(attempt.ticket)
        return
    attempt.breaker.record(attempt.ticket, failed, time.time())


def _record_failed_tries(ctx, attempt: Attempt) -> None:
    """Per target: a try the core retried on another target failed there; count it for that
    target (a probe it held included), although the client got the last try's answer."""
    if not ctx.failed_tries or ctx.upstream is not attempt.guard.upstream:
        return
    settings, now = attempt.guard.settings, time.time()
    for url, code in ctx.failed_tries:
        if code not in settings.failure_errors and not (code.isdigit() and int(code) in settings.failure_statuses):
            continue
        breaker, ticket = (attempt.probes or {}).pop(url, (None, None))
        if breaker is None:
            breaker = attempt.guard.target_breaker(url)
            ticket = breaker.ticket_at(now)
        if ticket is not None:
            breaker.record(ticket, True, now)


def _take_final_target(ctx, attempt: Attempt, neutral: bool) -> bool:
    """Per target: the breaker and ticket of the target that gave the last answer (its probe
    ticket if it held one; the others are handed back); False when there is nothing to judge."""
    target = ctx.target
    url = target.url if target is not None and ctx.upstream is attempt.guard.upstream else None
    for probed, (breaker, ticket) in (attempt.probes or {}).items():
        if probed == url:
            attempt.breaker, attempt.ticket = breaker, ticket
        else:
            breaker.release(ticket)  # the balancer sent the request elsewhere
    if url is None or neutral and attempt.breaker is None:
        return False
    if attempt.breaker is None:
        attempt.breaker = attempt.guard.target_breaker(url)
        attempt.ticket = attempt.breaker.ticket_at(time.time())
    return attempt.ticket is not None
