"""Circuit breaker: closed -> open after N failures -> half-open probe after the cool-down."""

from __future__ import annotations

import threading

import pytest

from hicache.testing.clock import ManualClock
from hicache.tiering.breaker import BreakerState, CircuitBreaker


def make(threshold: int = 3, cooldown: float = 10.0) -> tuple[CircuitBreaker, ManualClock]:
    clock = ManualClock(100.0)
    return CircuitBreaker(threshold, cooldown, name="t", clock=clock), clock


def test_opens_after_consecutive_failures_only() -> None:
    b, _ = make(3)
    b.record_failure()
    b.record_failure()
    b.record_success()  # resets the run
    b.record_failure()
    b.record_failure()
    assert b.state is BreakerState.CLOSED and b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN
    assert not b.allow() and not b.allow()
    snap = b.snapshot()
    assert snap.opened == 1 and snap.rejected == 2 and snap.retry_in_s == 10.0


def test_half_open_probe_success_closes() -> None:
    b, clock = make(1, cooldown=5.0)
    b.record_failure()
    clock.now += 4.9
    assert not b.allow()
    assert b.snapshot().retry_in_s == pytest.approx(0.1)
    clock.now += 0.1
    assert not b.would_refuse() and b.state is BreakerState.OPEN  # a peek uses no probe
    assert b.allow()  # the probe
    assert b.would_refuse()
    assert b.state is BreakerState.HALF_OPEN
    assert not b.allow()  # only one probe at a time
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.allow() and not b.would_refuse()
    snap = b.snapshot()
    assert snap.closed_after_probe == 1 and snap.consecutive_failures == 0
    assert snap.retry_in_s is None


def test_half_open_probe_failure_reopens_with_fresh_cooldown() -> None:
    b, clock = make(2, cooldown=5.0)
    b.record_failure()
    b.record_failure()
    clock.now += 5
    assert b.allow()
    b.record_failure()  # one failure suffices in half-open
    assert b.state is BreakerState.OPEN
    assert b.snapshot().opened == 2
    clock.now += 4
    assert not b.allow()
    clock.now += 1
    assert b.allow()


def test_stragglers_while_open_are_ignored() -> None:
    b, clock = make(1, cooldown=5.0)
    b.record_failure()
    b.record_success()  # a call allowed before the breaker opened finishes late
    assert b.state is BreakerState.OPEN
    b.record_failure()
    assert b.snapshot().opened == 1
    clock.now += 5
    assert b.allow()


def test_lost_probe_is_replaced_after_another_cooldown() -> None:
    b, clock = make(1, cooldown=5.0)
    b.record_failure()
    clock.now += 5
    assert b.allow()  # probe sent, its outcome never recorded
    clock.now += 4
    assert not b.allow()
    clock.now += 1
    assert b.allow()


def test_snapshot_is_plain_data() -> None:
    b, _ = make(1)
    b.record_failure()
    d = b.snapshot().as_dict()
    assert d["state"] == "open" and isinstance(d["state"], str)
    assert set(d) == {
        "state",
        "consecutive_failures",
        "opened",
        "closed_after_probe",
        "rejected",
        "retry_in_s",
    }


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(0, 1.0)
    with pytest.raises(ValueError, match="cooldown_s"):
        CircuitBreaker(1, 0.0)


def test_thread_safe_counting() -> None:
    b, _ = make(10_000)
    barrier = threading.Barrier(4)

    def work() -> None:
        barrier.wait()
        for _ in range(2000):
            b.record_failure()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 8000 failures < threshold: none lost under contention.
    assert b.snapshot().consecutive_failures == 8000
    assert b.state is BreakerState.CLOSED
