"""The state machine alone (``plugway_breaker.state``): driven through time by the ``now``
argument, without a gateway, a store or a sleep."""

import pytest

from plugway_breaker.state import CLOSED, HALF_OPEN, OPEN, Breaker, Period, Policy, RollingWindow

T0 = 1_000_000.0


def outcomes(breaker: Breaker, results: str, now: float = T0) -> Period | None:
    """Admit and record one request per character: "f" failed, "s" succeeded; the last transition."""
    last = None
    for result in results:
        ticket = breaker.admit(now)
        assert ticket is not None, "a closed breaker admits every request"
        last = breaker.record(ticket, result == "f", now) or last
    return last


def test_opens_after_the_configured_consecutive_failures_and_a_success_resets_the_count():
    breaker = Breaker(Policy(consecutive_failures=5, failure_ratio=0))
    assert outcomes(breaker, "ffffsffff") is None
    assert breaker.state(T0) == CLOSED
    period = outcomes(breaker, "f")
    assert period is not None and period.state == OPEN and breaker.state(T0) == OPEN
    assert period.reason == "5 consecutive failures"
    assert breaker.admit(T0) is None


def test_the_failure_ratio_needs_the_minimum_number_of_requests():
    breaker = Breaker(Policy(consecutive_failures=0, failure_ratio=0.5, min_requests=10, window=10))
    assert outcomes(breaker, "fsfsfsfsf") is None  # 5 of 9: under min_requests
    period = outcomes(breaker, "f")  # 6 of 10: the ratio is checked on failures
    assert period is not None and period.reason == "6 failures in 10 requests within 10s"


def test_outcomes_older_than_the_window_no_longer_count():
    breaker = Breaker(Policy(consecutive_failures=0, failure_ratio=0.5, min_requests=4, window=10))
    outcomes(breaker, "fff", T0)
    assert breaker.window.counts(T0 + 5) == (3, 3)
    assert breaker.window.counts(T0 + 11) == (0, 0)
    assert outcomes(breaker, "ssfs", T0 + 11) is None  # 1 of 4: the three old failures are gone


def test_the_rolling_window_drops_buckets_one_by_one():
    window = RollingWindow(10)
    window.add(T0, requests=1, failures=1)
    window.add(T0 + 5, requests=1, failures=0)
    assert window.counts(T0 + 9.9) == (2, 1)
    assert window.counts(T0 + 10.5) == (1, 0)


def test_open_lasts_open_for_then_lets_exactly_half_open_probes_through():
    policy = Policy(consecutive_failures=1, open_for=30, half_open_probes=2)
    breaker = Breaker(policy)
    period = outcomes(breaker, "f")
    assert period.open_until == T0 + 30
    assert breaker.state(T0 + 29.9) == OPEN and breaker.admit(T0 + 29.9) is None
    assert breaker.state(T0 + 30) == HALF_OPEN
    first, second = breaker.admit(T0 + 30), breaker.admit(T0 + 30)
    assert first.probe and second.probe
    assert breaker.admit(T0 + 30) is None  # the third waits: two probes are out
    assert breaker.retry_after(T0 + 30) == 1


def test_probes_succeeding_close_the_breaker_and_reset_the_backoff():
    breaker = Breaker(Policy(consecutive_failures=1, open_for=10, half_open_probes=2))
    outcomes(breaker, "f")
    first, second = breaker.admit(T0 + 10), breaker.admit(T0 + 10)
    assert breaker.record(first, False, T0 + 10.1) is None  # one of two: still half-open
    period = breaker.record(second, False, T0 + 10.2)
    assert period.state == CLOSED and period.level == 0
    assert breaker.state(T0 + 10.2) == CLOSED
    assert breaker.admit(T0 + 10.2).probe is False


def test_a_failed_probe_reopens_for_longer_up_to_open_for_max():
    breaker = Breaker(Policy(consecutive_failures=1, open_for=10, open_for_max=35, backoff=2))
    now = T0
    outcomes(breaker, "f", now)
    durations = []
    for _ in range(4):
        now = breaker.period.open_until
        probe = breaker.admit(now)
        period = breaker.record(probe, True, now)
        durations.append(period.open_until - period.opened_at)
    assert durations == [20, 35, 35, 35]
    assert breaker.period.reason == "a half-open probe failed"


def test_answers_from_an_earlier_period_are_ignored():
    breaker = Breaker(Policy(consecutive_failures=2, open_for=10))
    slow = breaker.admit(T0)  # sent while closed, answers much later
    outcomes(breaker, "ff")
    assert breaker.state(T0) == OPEN
    probe = breaker.admit(T0 + 10)
    assert breaker.record(slow, False, T0 + 10) is None  # does not count as the probe's success
    assert breaker.state(T0 + 10) == HALF_OPEN
    assert breaker.record(probe, False, T0 + 10).state == CLOSED
    assert breaker.record(slow, True, T0 + 10) is None and breaker.consecutive == 0


def test_a_released_probe_frees_its_place():
    breaker = Breaker(Policy(consecutive_failures=1, open_for=10, half_open_probes=1))
    outcomes(breaker, "f")
    probe = breaker.admit(T0 + 10)
    assert breaker.admit(T0 + 10) is None
    breaker.release(probe)  # the client went away: nothing learnt
    assert breaker.admit(T0 + 10).probe


def test_per_target_tickets_are_probes_when_half_open_and_nothing_while_open():
    breaker = Breaker(Policy(consecutive_failures=1, open_for=10))
    assert breaker.ticket_at(T0).probe is False
    outcomes(breaker, "f")
    assert breaker.ticket_at(T0 + 5) is None
    ticket = breaker.ticket_at(T0 + 10)
    assert ticket.probe and breaker.record(ticket, False, T0 + 10).state == CLOSED


def test_host_counts_open_the_breaker_only_past_a_threshold():
    breaker = Breaker(Policy(consecutive_failures=5, failure_ratio=0.5, min_requests=20))
    assert breaker.trip_check(19, 19, 4, T0) is None
    period = breaker.trip_check(40, 20, 0, T0)
    assert period.state == OPEN and period.reason.endswith("across workers")


@pytest.mark.parametrize("data", [None, b"", b"not json", b'["ajar","e",0,0,0,""]', b'["open","e","x",0,0,""]'])
def test_an_unreadable_period_decodes_as_none(data):
    assert Period.decode(data) is None


def test_a_period_survives_the_store():
    period = Period(OPEN, "abc", T0, T0 + 30, 2, "5 consecutive failures")
    assert Period.decode(period.encode()) == period
