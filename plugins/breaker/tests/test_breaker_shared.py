"""Two workers' breakers sharing one real store (the in-process table the local store is made
of, or a local-store client whose store is gone): counts, transitions, probes and store
failures, without a gateway around them."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.store import InProcessStore
from gateway.store.local import LocalStore
from plugway_breaker.shared import STALE_AFTER, SYNC_INTERVAL, Events, SharedBreaker
from plugway_breaker.state import CLOSED, HALF_OPEN, OPEN, Period, Policy


class Recorder(Events):
    """Events of every breaker it is given, in order."""

    def __init__(self) -> None:
        self.transitions: list[tuple[str, str, str, bool]] = []
        self.store_errors = 0

    def changed(self, breaker, old, new):
        pass

    def transition(self, breaker, old, new, period, local):
        self.transitions.append((breaker.worker, old, new, local))

    def store_failed(self, breaker, error):
        self.store_errors += 1


class Workers:
    """Breakers for upstream "app" as several workers keep them, on the stores given."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.events = Recorder()
        self.tasks: list[asyncio.Future] = []

    def worker(self, name: str, store) -> SharedBreaker:
        breaker = SharedBreaker("app", self.policy, store, probe_ttl=5.0, events=self.events,
                                spawn=lambda coroutine: self.tasks.append(asyncio.ensure_future(coroutine)))
        breaker.worker = name
        return breaker

    async def settle(self, *breakers: SharedBreaker) -> None:
        """Let background work finish, then sync each breaker in turn."""
        await asyncio.gather(*self.tasks)
        for breaker in breakers:
            await breaker.sync()


async def fail(breaker: SharedBreaker, count: int) -> None:
    for _ in range(count):
        ticket = await breaker.admit_with_store(time.time()) if breaker.needs_store(time.time()) \
            else breaker.admit(time.time())
        assert ticket is not None
        breaker.record(ticket, True, time.time())
        await breaker.sync()


@pytest.fixture
def store() -> InProcessStore:
    return InProcessStore(10_000, 10_000_000)


async def test_failures_seen_by_two_workers_open_the_breaker_for_both(store):
    workers = Workers(Policy(consecutive_failures=5, failure_ratio=0))
    a, b = workers.worker("a", store), workers.worker("b", store)
    await fail(a, 3)
    assert a.breaker.state(time.time()) == CLOSED and a.breaker.consecutive == 3  # 3 alone do not open it
    await fail(b, 2)
    await workers.settle(a, b)
    assert a.breaker.state(time.time()) == OPEN and b.breaker.state(time.time()) == OPEN
    assert a.breaker.period == b.breaker.period == Period.decode(await store.get("breaker:{app}:period"))
    assert "5 consecutive failures across workers" in a.breaker.period.reason
    assert workers.events.transitions == [("b", CLOSED, OPEN, False)]  # counted once, by the worker that opened it


async def test_a_success_on_one_worker_restarts_the_host_count(store):
    workers = Workers(Policy(consecutive_failures=4, failure_ratio=0))
    a, b = workers.worker("a", store), workers.worker("b", store)
    await fail(a, 2)
    await fail(b, 1)
    assert b.host_consecutive == 3
    b.record(b.admit(time.time()), False, time.time())
    await workers.settle(b)
    await fail(a, 1)  # 4 failures on the host, but not in a row
    await workers.settle(a, b)
    assert a.breaker.state(time.time()) == CLOSED and a.host_consecutive == 1 and a.breaker.consecutive == 3


async def test_the_failure_ratio_counts_the_requests_of_every_worker(store):
    workers = Workers(Policy(consecutive_failures=0, failure_ratio=0.5, min_requests=20, window=10))
    a, b = workers.worker("a", store), workers.worker("b", store)
    for breaker in (a, b):
        for failed in [True, False] * 5:  # 5 of 10 each: under min_requests alone
            breaker.record(breaker.admit(time.time()), failed, time.time())
        await breaker.sync()
    await workers.settle(a, b)
    assert a.breaker.state(time.time()) == OPEN and b.breaker.state(time.time()) == OPEN
    assert "failures in 20 requests" in b.breaker.period.reason


async def test_two_workers_opening_at_once_agree_on_one_period(store):
    workers = Workers(Policy(consecutive_failures=1))
    a, b = workers.worker("a", store), workers.worker("b", store)
    ta, tb = a.admit(time.time()), b.admit(time.time())
    a.record(ta, True, time.time())
    b.record(tb, True, time.time())  # both open locally before either has published
    await workers.settle(a, b, a)
    assert a.breaker.period == b.breaker.period
    assert [t[1:] for t in workers.events.transitions] == [(CLOSED, OPEN, False)]


async def test_a_transition_reaches_a_busy_worker_at_its_next_sync(store):
    """A worker in use syncs every SYNC_INTERVAL (the bound, checked on sync_due's clock); the
    other worker's transition is visible from its next sync. The delay is printed, not bounded:
    on a busy machine the tick itself can be late."""
    workers = Workers(Policy(consecutive_failures=1, open_for=30))
    a, b = workers.worker("a", store), workers.worker("b", store)
    await workers.settle(a, b)

    async def tick(breaker: SharedBreaker, until: asyncio.Event) -> None:
        while not until.is_set():
            await asyncio.sleep(SYNC_INTERVAL)
            breaker.used = True  # requests keep arriving
            if breaker.sync_due(time.time()):
                await breaker.sync()

    done = asyncio.Event()
    ticking = asyncio.create_task(tick(b, done))
    await asyncio.sleep(0.05)
    opened = time.monotonic()
    a.record(a.admit(time.time()), True, time.time())
    while b.breaker.state(time.time()) != OPEN:
        assert time.monotonic() - opened < 10, "worker b never saw the breaker open"
        await asyncio.sleep(0.005)
    delay = time.monotonic() - opened
    done.set()
    await ticking
    print(f"propagation delay: {delay * 1000:.0f} ms")
    b.used = True
    assert not b.sync_due(b.synced_at + SYNC_INTERVAL * 0.5)
    assert b.sync_due(b.synced_at + SYNC_INTERVAL)


async def test_a_stale_view_is_refreshed_before_a_request_is_admitted(store):
    workers = Workers(Policy(consecutive_failures=1, open_for=30))
    a, b = workers.worker("a", store), workers.worker("b", store)
    await workers.settle(a, b)
    a.record(a.admit(time.time()), True, time.time())
    await workers.settle(a)
    b.synced_at = time.time() - STALE_AFTER - 0.01  # b has not synced for a while (idle)
    assert b.needs_store(time.time())
    assert await b.admit_with_store(time.time()) is None  # refused: the view was brought up to date first
    assert b.breaker.state(time.time()) == OPEN


async def test_half_open_probes_are_counted_for_the_whole_host(store):
    workers = Workers(Policy(consecutive_failures=1, open_for=0.1, half_open_probes=1))
    a, b = workers.worker("a", store), workers.worker("b", store)
    a.record(a.admit(time.time()), True, time.time())
    await workers.settle(a, b)
    await asyncio.sleep(0.1)  # open_for passes
    now = time.time()
    assert a.breaker.state(now) == HALF_OPEN and b.breaker.state(now) == HALF_OPEN
    probe = await a.admit_with_store(now)
    assert probe is not None and probe.probe and probe.slot == 0
    assert await b.admit_with_store(now) is None  # the host's one probe is out
    a.record(probe, False, time.time())
    await workers.settle(a, b)
    assert a.breaker.state(time.time()) == CLOSED and b.breaker.state(time.time()) == CLOSED
    assert [t[1:] for t in workers.events.transitions] == [
        (CLOSED, OPEN, False), (OPEN, HALF_OPEN, False), (HALF_OPEN, CLOSED, False)]


async def test_a_probe_that_ends_without_an_answer_frees_the_slot_for_another_worker(store):
    workers = Workers(Policy(consecutive_failures=1, open_for=0.1, half_open_probes=1))
    a, b = workers.worker("a", store), workers.worker("b", store)
    a.record(a.admit(time.time()), True, time.time())
    await workers.settle(a, b)
    await asyncio.sleep(0.1)
    probe = await a.admit_with_store(time.time())
    a.release(probe)  # the client went away
    await workers.settle()
    b.probes_full_until = 0.0
    assert (await b.admit_with_store(time.time())).slot == 0


async def test_without_the_store_each_worker_decides_and_publishes_once_it_is_back(store, tmp_path):
    workers = Workers(Policy(consecutive_failures=2, open_for=30))
    gone = LocalStore(str(tmp_path / "no-store.sock"), 0.05)
    a, b = workers.worker("a", gone), workers.worker("b", store)
    await workers.settle(b)
    await fail(a, 2)
    assert a.breaker.state(time.time()) == OPEN and not a.store_usable(time.time())
    assert workers.events.transitions == [("a", CLOSED, OPEN, True)]  # this worker only
    assert workers.events.store_errors >= 1
    assert b.breaker.state(time.time()) == CLOSED
    a.store = store  # the store answers again (same keys, as after a Redis restart)
    while not a.store_usable(time.time()):
        await asyncio.sleep(0.05)
    await workers.settle(a, b)
    assert b.breaker.state(time.time()) == OPEN and b.breaker.period == a.breaker.period
    assert len(workers.events.transitions) == 1


async def test_a_store_that_lost_the_period_gets_it_back(store):
    workers = Workers(Policy(consecutive_failures=1, open_for=30))
    a, b = workers.worker("a", store), workers.worker("b", store)
    a.record(a.admit(time.time()), True, time.time())
    await workers.settle(a, b)
    await store.delete_prefix("breaker:")  # the store process restarted empty
    await b.sync()
    assert Period.decode(await store.get("breaker:{app}:period")) == a.breaker.period
    await store.set("breaker:{app}:period", b"written by another version", None)
    await a.sync()
    assert Period.decode(await store.get("breaker:{app}:period")) == a.breaker.period
