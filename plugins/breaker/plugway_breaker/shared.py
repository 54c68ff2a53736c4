"""One breaker kept in step with the other workers of the host through the store.

Each worker runs its own state machine (``state.Breaker``) and the store carries what the
workers must agree on, without a store round trip on a closed breaker's requests:

- **The period.** A transition is in force in the worker that made it at once, and is
  published: the first worker to claim the end of a period (``store.add``) writes the new
  one; a worker that loses the claim follows the winner's. Every worker reads the period
  back every ``SYNC_INTERVAL`` while it uses the breaker (every ``IDLE_SYNC_INTERVAL``
  otherwise), at once after its own failures, and before admitting a request on a view
  older than ``STALE_AFTER``.
- **The counts.** Outcomes are batched and added to host-wide counters of the period at
  each sync: requests and failures per window (one counter holding both), and consecutive
  failures. The worker whose addition crosses a threshold opens the breaker for the host,
  so one worker's failures protect the others.
- **The probes.** Half-open, a probe needs one of ``half_open_probes`` slots (``store.add``
  keys that expire after the longest a probe can take); successes are counted host-wide.

When the store fails (``StoreUnavailable``) the worker carries on with its own state and
counts, tries the store again after ``STORE_RETRY``, and publishes what it decided
meanwhile if the host's period has not moved on.

Keys, hash-tagged by the breaker's name for Redis Cluster::

    breaker:{NAME}:period            the current period                        1 day
    breaker:{NAME}:claim:EPOCH       the right to end period EPOCH             10 s
    breaker:{NAME}:w:EPOCH:INDEX     requests + failures * 2**32 in a window   2 windows
    breaker:{NAME}:c:EPOCH           consecutive failures                      1 window
    breaker:{NAME}:probe:EPOCH:SLOT  a half-open probe in flight               probe time
    breaker:{NAME}:ok:EPOCH          probes that succeeded                     probe time
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

from gateway.store import Store, StoreUnavailable

from .state import CLOSED, HALF_OPEN, OPEN, Breaker, Period, Policy, Ticket

SYNC_INTERVAL = 0.1
IDLE_SYNC_INTERVAL = 1.0
STALE_AFTER = 0.25
STORE_RETRY = 1.0
CLAIM_TTL = 10.0
PERIOD_TTL = 86400.0
FAILURE_UNIT = 1 << 32  # one window counter holds requests (low bits) and failures (high bits)


class Events:
    """What a breaker tells the plugin: ``changed`` whenever this worker's view of the state
    changes (gauges), ``transition`` once per transition of the host's breaker, by the worker
    that made it (``local``: while the store is unused or unavailable, per worker), and
    ``store_failed``."""

    def changed(self, breaker: SharedBreaker, old: str, new: str) -> None: ...

    def transition(self, breaker: SharedBreaker, old: str, new: str, period: Period, local: bool) -> None: ...

    def store_failed(self, breaker: SharedBreaker, error: StoreUnavailable) -> None: ...


class SharedBreaker:
    """A worker's breaker for one upstream (or target), synchronised through ``store``
    (None: this worker's own state only)."""

    def __init__(
        self, name: str, policy: Policy, store: Store | None, *, probe_ttl: float, events: Events,
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
    ) -> None:
        self.name = name
        self.guard: Any = None  # for the plugin: the upstream's guard and the target, if per target
        self.target: str | None = None
        self.breaker = Breaker(policy)
        self.store = store
        self.probe_ttl = probe_ttl
        self.events = events
        self.spawn = spawn
        self.observed = CLOSED  # this worker's view, as last reported through events.changed
        self.used = False  # a request was admitted since the last sync
        self.synced_at = 0.0
        self.store_down_until = 0.0
        self.unpublished_base: str | None = None  # the host's period our unpublished transition ended
        self.unreported: list[tuple[str, str, Period]] = []  # transitions made here, reported once published
        self.host_consecutive = 0
        self.probes_full_until = 0.0
        self._probing_epoch = ""
        self._sync_task: asyncio.Future | None = None
        self._prefix = "breaker:{%s}:" % name

    # --- the request path (no store round trip unless stale or half-open) ----------------------

    def store_usable(self, now: float) -> bool:
        return self.store is not None and now >= self.store_down_until

    def needs_store(self, now: float) -> bool:
        """Whether admitting now needs the store: a stale view, or a half-open probe slot."""
        if not self.store_usable(now):
            return False
        period = self.breaker.period
        return now - self.synced_at > STALE_AFTER or period.state == OPEN and now >= period.open_until

    def admit(self, now: float) -> Ticket | None:
        """A ticket, or None to refuse; for when ``needs_store`` is false."""
        ticket = self.breaker.admit(now)
        if ticket is not None:
            self.used = True
            if ticket.probe:
                self._probing(ticket, now)
        return ticket

    async def admit_with_store(self, now: float) -> Ticket | None:
        """``admit`` on an up-to-date view, with a host-wide probe slot when half-open."""
        if now - self.synced_at > STALE_AFTER:
            await self.sync()
            now = time.time()
        breaker = self.breaker
        if breaker.state(now) != HALF_OPEN or not self.store_usable(now):
            return self.admit(now)
        if now < self.probes_full_until:
            return None
        ticket = breaker.admit(now)
        if ticket is None:
            return None
        self.used = True
        try:
            ticket.slot = await self._take_probe_slot(ticket.epoch)
        except StoreUnavailable as exc:
            self._store_failed(exc)
            return self._probing(ticket, now)
        if ticket.epoch != breaker.period.epoch:  # the period ended meanwhile: decide again
            self.release(ticket)
            return self.admit(time.time())
        if ticket.slot < 0:
            breaker.release(ticket)
            self.probes_full_until = time.time() + SYNC_INTERVAL
            return None
        return self._probing(ticket, now)

    def ticket_at(self, now: float) -> Ticket | None:
        """See ``Breaker.ticket_at`` (per-target breakers)."""
        ticket = self.breaker.ticket_at(now)
        if ticket is not None:
            self.used = True
            if ticket.probe:
                self._probing(ticket, now)
        return ticket

    def record(self, ticket: Ticket, failed: bool, now: float) -> None:
        if ticket.probe and not failed and self.store_usable(now):
            self.breaker.probe_successes += 1
            self.spawn(self._probe_succeeded(ticket.epoch))
            return
        before = self.breaker.period
        self._made(before, self.breaker.record(ticket, failed, now), now)
        if failed and self.store_usable(now):
            self.sync()  # at once, or right after the sync in flight

    def release(self, ticket: Ticket) -> None:
        self.breaker.release(ticket)
        if ticket.slot >= 0 and ticket.epoch == self.breaker.period.epoch and self.store_usable(time.time()):
            self.spawn(self._free_probe_slot(ticket))

    def observe(self, now: float) -> None:
        """Report a change the clock made (open becomes half-open)."""
        self._view(self.breaker.state(now))

    def sync_due(self, now: float) -> bool:
        """Whether the periodic tick should sync: every SYNC_INTERVAL while the breaker is in
        use, not closed, or has news; every IDLE_SYNC_INTERVAL otherwise (views, gauges)."""
        if not self.store_usable(now) or now - self.synced_at < SYNC_INTERVAL * 0.9:
            return False
        if self.used or self.breaker.period.state != CLOSED or self.unpublished_base is not None:
            return True
        return now - self.synced_at >= IDLE_SYNC_INTERVAL

    # --- the store ---------------------------------------------------------------------------

    @property
    def syncing(self) -> bool:
        return self._sync_task is not None and not self._sync_task.done()

    def sync(self) -> asyncio.Future:
        """Publish, read back, and add the counts; one sync at a time (later callers share it)."""
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.ensure_future(self._sync_guarded())
        return self._sync_task

    async def _sync_guarded(self) -> None:
        try:
            for _ in range(3):  # again when a transition or a failure came during the round trips
                await self._sync_once()
                if self.unpublished_base is None and not self.breaker.pending.failures:
                    break
        except StoreUnavailable as exc:
            self._store_failed(exc)

    async def _sync_once(self) -> None:
        started = time.time()
        self.used = False
        stored = await self.store.get(self._key("period"))
        await self._reconcile(Period.decode(stored), stored is not None)
        self.synced_at = started
        if self.breaker.period.state == CLOSED:
            await self._add_counts()

    async def _reconcile(self, shared: Period | None, present: bool) -> None:
        store, key = self.store, self._key("period")
        if shared is None:
            if present:  # written by an incompatible version: ours replaces it
                await store.set(key, self.breaker.period.encode(), PERIOD_TTL)
                return self._published()
            if await store.add(key, self.breaker.period.encode(), PERIOD_TTL):
                return self._published()
            shared = Period.decode(await store.get(key))
            if shared is None:
                return None
        if shared.epoch == self.breaker.period.epoch:
            return self._published()
        if self.unpublished_base == shared.epoch:
            if await store.add(self._key(f"claim:{shared.epoch}"), b"1", CLAIM_TTL):
                await store.set(key, self.breaker.period.encode(), PERIOD_TTL)
                return self._published()
            shared = Period.decode(await store.get(key)) or shared
        return self._follow(shared)

    async def _add_counts(self) -> None:
        breaker = self.breaker
        pending = breaker.take_pending()
        if not pending:
            return
        store, now = self.store, time.time()
        epoch, policy = breaker.period.epoch, breaker.policy
        requests = failures = 0.0
        if policy.failure_ratio:
            index = int(now // policy.window)
            current = await store.incr(self._key(f"w:{epoch}:{index}"),
                                       pending.requests + pending.failures * FAILURE_UNIT, ttl=2 * policy.window + 1)
            previous = int(await store.get(self._key(f"w:{epoch}:{index - 1}")) or 0)
            overlap = 1.0 - (now - index * policy.window) / policy.window
            requests = current % FAILURE_UNIT + previous % FAILURE_UNIT * overlap
            failures = current // FAILURE_UNIT + previous // FAILURE_UNIT * overlap
        consecutive_key = self._key(f"c:{epoch}")
        if pending.success_seen:
            if self.host_consecutive or pending.trailing_failures:
                await store.delete(consecutive_key)
                if pending.trailing_failures:
                    await store.incr(consecutive_key, pending.trailing_failures, ttl=policy.window)
            self.host_consecutive = pending.trailing_failures
        elif pending.trailing_failures:
            self.host_consecutive = await store.incr(consecutive_key, pending.trailing_failures, ttl=policy.window)
        if breaker.period.epoch == epoch:
            before, now = breaker.period, time.time()
            self._made(before, breaker.trip_check(round(requests), round(failures), self.host_consecutive, now), now)

    async def _take_probe_slot(self, epoch: str) -> int:
        for slot in range(self.breaker.policy.half_open_probes):
            if await self.store.add(self._key(f"probe:{epoch}:{slot}"), b"1", self.probe_ttl):
                return slot
        return -1

    async def _free_probe_slot(self, ticket: Ticket) -> None:
        try:
            await self.store.delete(self._key(f"probe:{ticket.epoch}:{ticket.slot}"))
        except StoreUnavailable as exc:
            self._store_failed(exc)

    async def _probe_succeeded(self, epoch: str) -> None:
        try:
            count = await self.store.incr(self._key(f"ok:{epoch}"), 1, ttl=self.probe_ttl)
        except StoreUnavailable as exc:
            self._store_failed(exc)
            count = self.breaker.probe_successes
        if self.breaker.period.epoch == epoch:
            before, now = self.breaker.period, time.time()
            self._made(before, self.breaker.probes_succeeded(count, now), now)

    # --- transitions -------------------------------------------------------------------------

    def _made(self, before: Period, period: Period | None, now: float) -> None:
        """A transition made here (already in force): report it once published, or at once
        when there is no store to publish it to."""
        if period is None:
            return
        old = before.state_at(now)
        new = period.state_at(now)
        self._view(new)
        if not self.store_usable(now):
            self.events.transition(self, old, new, period, True)
            if self.store is not None and self.unpublished_base is None:
                self.unpublished_base = before.epoch  # published once the store is back
            return
        if self.unpublished_base is None:
            self.unpublished_base = before.epoch
        self.unreported.append((old, new, period))
        self.sync()

    def _published(self) -> None:
        self.unpublished_base = None
        unreported, self.unreported = self.unreported, []
        for old, new, period in unreported:
            self.events.transition(self, old, new, period, False)

    def _follow(self, shared: Period) -> None:
        """Another worker moved the host's breaker first: take its period, drop ours."""
        self.breaker.adopt(shared)
        self.unpublished_base = None
        self.unreported = []
        self.host_consecutive = 0
        self._view(shared.state_at(time.time()))

    def _probing(self, ticket: Ticket | None, now: float) -> Ticket | None:
        """The first probe of a period is the move to half-open, reported once: by the holder
        of the host's first slot, or by each worker when the store is not used."""
        if ticket is not None and ticket.epoch != self._probing_epoch:
            self._probing_epoch = ticket.epoch
            self._view(HALF_OPEN)
            if ticket.slot <= 0:
                self.events.transition(self, OPEN, HALF_OPEN, self.breaker.period, ticket.slot < 0)
        return ticket

    def _view(self, state: str) -> None:
        if state != self.observed:
            old, self.observed = self.observed, state
            self.events.changed(self, old, state)

    def _store_failed(self, exc: StoreUnavailable) -> None:
        self.store_down_until = time.time() + STORE_RETRY
        unreported, self.unreported = self.unreported, []
        for old, new, period in unreported:
            self.events.transition(self, old, new, period, True)
        self.events.store_failed(self, exc)

    def _key(self, suffix: str) -> str:
        return self._prefix + suffix
