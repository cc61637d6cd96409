"""TierCaller: deadlines, retries with backoff, failure kinds, breaker wiring, on_return holds."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable

import pytest

from hicache.errors import (
    BackendCapacityError,
    BackendClosedError,
    BackendError,
    BackendReadOnlyError,
    BackendUnavailableError,
)
from hicache.testing.clock import ManualClock
from hicache.tiering.breaker import BreakerState, CircuitBreaker
from hicache.tiering.calls import FailureKind, RetryPolicy, TierCaller, failure_kind
from hicache.tiering.lanes import Lane

#: The ``run_python`` fixture of tests/conftest.py.
RunPython = Callable[..., "subprocess.CompletedProcess[str]"]

LONG = 30.0  # a deadline no healthy call in these tests gets near, even on a loaded machine
SHORT = 0.05  # only ever used where the call is made to hang


class Returns:
    """An on_return callback that records how often it ran."""

    def __init__(self) -> None:
        self.count = 0
        self.event = threading.Event()

    def __call__(self) -> None:
        self.count += 1
        self.event.set()


def failing(exc: Exception, times: int, then: object = "ok") -> Callable[[], object]:
    left = [times]

    def fn() -> object:
        if left[0] > 0:
            left[0] -= 1
            raise exc
        return then

    return fn


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def caller(sleeps: list[float]) -> TierCaller:
    c = TierCaller(
        "t",
        deadline_s=LONG,
        threads=2,
        retry=RetryPolicy(attempts=3, backoff_s=0.01, multiplier=2.0, backoff_max_s=0.015),
        sleep=sleeps.append,
    )
    yield c  # type: ignore[misc]
    c.close(wait=True)


def test_success_returns_value_and_runs_on_return_once(caller: TierCaller) -> None:
    done = Returns()
    out = caller.call(lambda: 42, on_return=done)
    assert out.ok and out.value == 42 and out.attempts == 1
    assert done.event.wait(LONG) and done.count == 1


def test_retryable_error_is_retried_with_backoff(caller: TierCaller, sleeps: list[float]) -> None:
    out = caller.call(failing(BackendUnavailableError("down"), 2))
    assert out.ok and out.value == "ok" and out.attempts == 3
    assert sleeps == [0.01, 0.015]  # doubled, then capped
    assert caller.failures.as_dict()["retries"] == 2
    assert caller.failures.get(FailureKind.UNAVAILABLE) == 0  # recovered: not a failure


def test_retries_exhausted_counts_one_failure(caller: TierCaller, sleeps: list[float]) -> None:
    done = Returns()
    out = caller.call(failing(BackendUnavailableError("down"), 5), on_return=done)
    assert not out.ok and out.failure is FailureKind.UNAVAILABLE
    assert isinstance(out.error, BackendUnavailableError) and out.attempts == 3
    assert caller.failures.get(FailureKind.UNAVAILABLE) == 1
    assert done.event.wait(LONG) and done.count == 1


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (BackendCapacityError("full"), FailureKind.CAPACITY),
        (BackendReadOnlyError("ro"), FailureKind.READ_ONLY),
        (BackendClosedError("closed"), FailureKind.CLOSED),
        (BackendError("other"), FailureKind.BACKEND),
        (KeyError("bug"), FailureKind.UNEXPECTED),
    ],
)
def test_non_retryable_errors_fail_at_once(
    caller: TierCaller, sleeps: list[float], exc: Exception, kind: FailureKind
) -> None:
    out = caller.call(failing(exc, 1))
    assert out.failure is kind and out.attempts == 1 and sleeps == []
    assert caller.failures.get(kind) == 1


def test_classify_builtins() -> None:
    # untranslated builtins break the contract: counted as unexpected, never retried
    assert failure_kind(ConnectionResetError()) is FailureKind.UNEXPECTED
    assert failure_kind(TimeoutError()) is FailureKind.UNEXPECTED
    assert failure_kind(ValueError()) is FailureKind.UNEXPECTED


def test_no_retry_past_the_deadline() -> None:
    clock = ManualClock(0.0)
    c = TierCaller(
        "t",
        deadline_s=LONG,
        retry=RetryPolicy(attempts=5, backoff_s=LONG, backoff_max_s=LONG),  # pause > deadline
        clock=clock,
        sleep=lambda s: None,
    )
    try:
        out = c.call(failing(BackendUnavailableError("down"), 1))
        assert out.failure is FailureKind.UNAVAILABLE and out.attempts == 1
    finally:
        c.close(wait=True)


def test_deadline_miss_keeps_resources_until_the_worker_returns() -> None:
    c = TierCaller("t", deadline_s=SHORT, threads=1)
    release = threading.Event()
    started = threading.Event()
    done = Returns()

    def hung() -> str:
        started.set()
        release.wait()
        return "late"

    try:
        out = c.call(hung, on_return=done)
        assert out.failure is FailureKind.TIMEOUT
        assert started.is_set() and done.count == 0  # still running: holds must stay
        assert c.running == 1
        release.set()
        assert done.event.wait(LONG) and done.count == 1
        c.close(wait=True)
        assert c.running == 0
        stats = c.failures.as_dict()
        assert stats["by_kind"] == {"timeout": 1} and stats["late_returns"] == 1
    finally:
        release.set()
        c.close(wait=True)


def test_call_queued_behind_a_hung_one_is_cancelled_and_never_runs() -> None:
    c = TierCaller("t", deadline_s=SHORT, threads=1)
    release = threading.Event()
    ran = []
    first, second = Returns(), Returns()
    try:
        assert c.call(release.wait, on_return=first).failure is FailureKind.TIMEOUT
        out = c.call(lambda: ran.append(1), on_return=second)
        assert out.failure is FailureKind.TIMEOUT
        assert second.count == 1  # cancelled in the queue: released at once
        assert first.count == 0
        release.set()
        assert first.event.wait(LONG)
        c.close(wait=True)
        assert ran == []
    finally:
        release.set()
        c.close(wait=True)


def test_breaker_opens_skips_calls_and_closes_after_probe() -> None:
    clock = ManualClock(0.0)
    breaker = CircuitBreaker(2, 10.0, clock=clock)
    c = TierCaller("t", deadline_s=LONG, breaker=breaker, retry=RetryPolicy(attempts=1))
    ran = []
    try:
        for _ in range(2):
            assert c.call(failing(BackendUnavailableError("x"), 1)).failure is (
                FailureKind.UNAVAILABLE
            )
        assert breaker.state is BreakerState.OPEN
        done = Returns()
        out = c.call(lambda: ran.append(1), on_return=done)
        assert out.failure is FailureKind.BREAKER_OPEN and done.count == 1 and ran == []
        assert c.failures.get(FailureKind.BREAKER_OPEN) == 1
        clock.advance(10)
        assert c.call(lambda: "probe").ok
        assert breaker.state is BreakerState.CLOSED
        # housekeeping calls neither ask nor tell the breaker
        for _ in range(3):
            c.call(failing(BackendUnavailableError("x"), 1), use_breaker=False)
        assert breaker.state is BreakerState.CLOSED
    finally:
        c.close(wait=True)


def test_deadline_misses_open_the_breaker() -> None:
    breaker = CircuitBreaker(2, 60.0)
    c = TierCaller("t", deadline_s=SHORT, threads=2, breaker=breaker)
    release = threading.Event()
    try:
        assert c.call(release.wait).failure is FailureKind.TIMEOUT
        assert c.call(release.wait).failure is FailureKind.TIMEOUT
        assert breaker.state is BreakerState.OPEN
        assert c.call(lambda: 1).failure is FailureKind.BREAKER_OPEN
    finally:
        release.set()
        c.close(wait=True)


def test_closed_caller_refuses_and_releases() -> None:
    c = TierCaller("t", deadline_s=LONG)
    c.close(wait=True)
    done = Returns()
    out = c.call(lambda: 1, on_return=done)
    assert out.failure is FailureKind.CLOSED and done.count == 1


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="deadline_s"):
        TierCaller("t", deadline_s=0)
    with pytest.raises(ValueError, match="threads"):
        TierCaller("t", deadline_s=1, threads=0)
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)


def test_a_call_hung_for_good_does_not_keep_the_process_alive(run_python: RunPython) -> None:
    """Worker threads are daemons: a backend call that never returns costs its thread, not the
    process's exit (ThreadPoolExecutor would join it at interpreter exit, forever)."""
    code = (
        "import threading\n"
        "from hicache.tiering.calls import FailureKind, TierCaller\n"
        "c = TierCaller('t', deadline_s=0.05)\n"
        "out = c.call(threading.Event().wait)\n"
        "assert out.failure is FailureKind.TIMEOUT, out\n"
        "c.close()\n"
        "print('exiting')\n"
    )
    result = run_python(code)
    assert result.returncode == 0 and "exiting" in result.stdout, result.stderr


def test_threads_are_started_on_demand_up_to_the_bound() -> None:
    c = TierCaller("t", deadline_s=LONG, threads=3)
    release = threading.Event()
    started = threading.Semaphore(0)

    def block() -> None:
        started.release()
        release.wait()

    results: list[object] = []
    # reads may use every thread (writes leave one free for them)
    callers = [
        threading.Thread(target=lambda: results.append(c.call(block, lane=Lane.READ)))
        for _ in range(5)
    ]
    try:
        for t in callers:
            t.start()
        for _ in range(3):
            assert started.acquire(timeout=LONG)  # three run at once ...
        assert not started.acquire(timeout=0.05)  # ... and no fourth while they block
        assert c.running == 5
    finally:
        release.set()
        for t in callers:
            t.join(LONG)
        c.close(wait=True)
    assert len(results) == 5 and c.running == 0
