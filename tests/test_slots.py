"""The supervisor's decisions, without forking."""


import pytest

from gateway.slots import (
    CRASH_BACKOFF_CAP, WorkerProcess, crash_delay, crashes_after_death, exit_reason, is_stuck, requests_limit,
)


def worker(**fields) -> WorkerProcess:
    return WorkerProcess(pid=1, slot=0, generation=1, channel=None, started=0.0, **fields)


@pytest.mark.parametrize("crashes, delay", [(0, 0), (1, 0), (2, 0.5), (3, 1.0), (4, 2.0), (12, CRASH_BACKOFF_CAP)])
def test_crash_backoff_is_exponential_and_capped(crashes, delay):
    assert crash_delay(crashes) == delay


def test_a_worker_that_served_a_while_starts_a_new_crash_series():
    assert crashes_after_death(5, worker(ready_at=100.0), now=111.0) == 1
    assert crashes_after_death(5, worker(ready_at=100.0), now=103.0) == 6
    assert crashes_after_death(2, worker(), now=1.0) == 3  # never became ready


def test_only_ready_workers_can_be_stuck():
    assert is_stuck(worker(state="ready", last_beat=10.0), now=41.0, timeout=30.0)
    assert not is_stuck(worker(state="ready", last_beat=10.0), now=39.0, timeout=30.0)
    assert not is_stuck(worker(state="draining", last_beat=10.0), now=100.0, timeout=30.0)


def test_requests_limit_with_jitter():
    assert requests_limit(0, 50, 0.5) == 0
    assert requests_limit(1000, 0, 0.9) == 1000
    assert requests_limit(1000, 50, 0.5) == 1025


def test_exit_reasons_read_like_words():
    assert exit_reason(3 << 8) == "exit code 3"
    assert exit_reason(9) == "killed by SIGKILL"
