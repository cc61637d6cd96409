"""Backend calls with a deadline, retries with backoff and a circuit breaker (no torch).

- ``TierCaller(name, deadline_s=..., threads=..., breaker=..., retry=...)``  one per tier
- ``caller.call(fn, on_return=..., lane=...)``  run ``fn()`` on the tier's own threads, wait at
  most the deadline, return a :class:`CallOutcome` (value or failure kind), never raise; reads
  (``Lane.READ``) go ahead of queued writes (:mod:`hicache.tiering.lanes`)
- ``failure_kind(exc)``  the :class:`FailureKind` of an exception
- ``RetryPolicy``    how often and how long to back off before retrying a retryable failure

Why a thread per call in flight: a backend call is synchronous and may block far past any
reasonable time (a hung NFS mount, a black-holed endpoint). The caller stops *waiting* at the
deadline and counts a failure; the call itself keeps running on its thread. Whatever the call
uses (host pages it reads or writes, bytes counted in flight) must stay reserved until it really
returns, so the caller passes ``on_return``: it runs exactly once, on the worker thread, when
the call finished (after all retries), or right away when the call never started (breaker open,
caller closed, cancelled while queued). Release holds there, not after ``call`` returns.

A call the caller stopped waiting for may still succeed: its value is not lost but handed to
``on_late`` (on the worker thread, before ``on_return``), so a put the tier did store after all
can still be announced. The caller has already returned its ``TIMEOUT`` outcome by then.

Retries: only whole-call errors that say "try again"
(:class:`~hicache.errors.BackendUnavailableError`) are retried, on the worker thread, with
exponential backoff, and never past the deadline. Per-page statuses (``FAILED``, ``CORRUPT``,
``NOT_FOUND``) are results, never retried here. A call that timed out is not retried either:
it may still be writing into its buffers.

The breaker sees one outcome per logical call (after retries): success, or failure (an exception
or a missed deadline). Calls refused by an open breaker fail fast with ``BREAKER_OPEN`` and are
not counted as failures of the tier.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from hicache.errors import (
    BackendCapacityError,
    BackendClosedError,
    BackendError,
    BackendReadOnlyError,
    BackendUnavailableError,
)
from hicache.tiering.breaker import CircuitBreaker
from hicache.tiering.lanes import Lane, LanedPool, LaneTicket

__all__ = [
    "CallOutcome",
    "FailureCounts",
    "FailureKind",
    "RetryPolicy",
    "TierCaller",
    "failure_kind",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class FailureKind(enum.StrEnum):
    """Why a backend call did not produce a result (counted per tier under these names)."""

    #: The deadline passed before the call returned (it may still be running).
    TIMEOUT = "timeout"
    #: The storage cannot be reached (``BackendUnavailableError``).
    UNAVAILABLE = "unavailable"
    CAPACITY = "capacity"
    READ_ONLY = "read_only"
    CLOSED = "closed"
    #: Any other ``BackendError``.
    BACKEND = "backend_error"
    #: Anything else, builtins included: a backend broke its contract (it should have translated
    #: its client's exception into a ``BackendError``).
    UNEXPECTED = "unexpected"
    #: Not called: the tier's circuit breaker is open.
    BREAKER_OPEN = "breaker_open"


#: Kinds worth another attempt: the next call may well succeed.
RETRYABLE: frozenset[FailureKind] = frozenset({FailureKind.UNAVAILABLE})


def failure_kind(exc: BaseException) -> FailureKind:
    """The failure kind of an exception raised by a backend call."""
    if isinstance(exc, BackendUnavailableError):
        return FailureKind.UNAVAILABLE
    if isinstance(exc, BackendCapacityError):
        return FailureKind.CAPACITY
    if isinstance(exc, BackendReadOnlyError):
        return FailureKind.READ_ONLY
    if isinstance(exc, BackendClosedError):
        return FailureKind.CLOSED
    if isinstance(exc, BackendError):
        return FailureKind.BACKEND
    # A builtin ConnectionError/TimeoutError that escaped untranslated is a contract violation:
    # counted as such and not retried (the backend, not the engine, knows what is transient).
    return FailureKind.UNEXPECTED


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Attempts and exponential backoff for retryable failures."""

    #: Total attempts per call (1 = no retry).
    attempts: int = 3
    #: Sleep before the first retry; multiplied by ``multiplier`` before each further one.
    backoff_s: float = 0.02
    multiplier: float = 2.0
    backoff_max_s: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.backoff_s < 0 or self.backoff_max_s < 0 or self.multiplier < 1:
            raise ValueError(f"invalid backoff in {self!r}")

    def delay(self, retry: int) -> float:
        """Seconds to sleep before retry number ``retry`` (1-based)."""
        return float(min(self.backoff_max_s, self.backoff_s * self.multiplier ** (retry - 1)))


@dataclass(frozen=True, slots=True)
class CallOutcome(Generic[T]):
    """What one call produced: a value, or the kind of failure (and the last exception)."""

    value: T | None = None
    failure: FailureKind | None = None
    error: BaseException | None = None
    #: Attempts made (0 when the call never started).
    attempts: int = 0

    @property
    def ok(self) -> bool:
        """True when the call returned a value in time."""
        return self.failure is None


class FailureCounts:
    """Thread-safe counters of failures by kind, plus retries and late returns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_kind: dict[str, int] = {}
        self.retries = 0
        #: Calls that returned after their caller had stopped waiting.
        self.late_returns = 0

    def add(self, kind: FailureKind, n: int = 1) -> None:
        """Count ``n`` failures of ``kind``."""
        with self._lock:
            self._by_kind[kind.value] = self._by_kind.get(kind.value, 0) + n

    def bump(self, name: str) -> None:
        """Add one to ``retries`` or ``late_returns``."""
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def get(self, kind: FailureKind) -> int:
        """Failures counted for ``kind``."""
        with self._lock:
            return self._by_kind.get(kind.value, 0)

    def as_dict(self) -> dict[str, Any]:
        """``{"by_kind": {...}, "retries": n, "late_returns": n}``."""
        with self._lock:
            return {
                "by_kind": dict(self._by_kind),
                "retries": self.retries,
                "late_returns": self.late_returns,
            }


class _LateValue(Generic[T]):
    """Whether the caller gave up on a call, decided against the call's own end under one lock,
    so a value that comes after the deadline reaches ``on_late`` exactly once, or the caller
    learns that the call ended before it gave up."""

    __slots__ = ("_ended", "_lock", "gave_up", "on_late")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ended = False
        self.gave_up = False
        self.on_late: Callable[[T], None] | None = None

    def give_up(self, on_late: Callable[[T], None] | None) -> bool:
        """The caller stops waiting: ``False`` when the call already ended (the caller then
        delivers its value itself)."""
        with self._lock:
            if self._ended:
                return False
            self.gave_up = True
            self.on_late = on_late
            return True

    def end(self) -> bool:
        """The call ended (on its worker): whether the caller had given up on it."""
        with self._lock:
            self._ended = True
            return self.gave_up


class _Attempts(Generic[T]):
    """The retry loop run on a worker thread; remembers how it ended."""

    __slots__ = ("attempts", "deadline_at", "fn", "gave_up", "owner")

    def __init__(self, owner: TierCaller, fn: Callable[[], T], deadline_at: float) -> None:
        self.owner = owner
        self.fn = fn
        self.deadline_at = deadline_at
        self.attempts = 0
        # Set by the caller when it stops waiting: further retries would help nobody.
        self.gave_up = False

    def __call__(self) -> T:
        owner = self.owner
        while True:
            self.attempts += 1
            try:
                return self.fn()
            except Exception as exc:
                kind = failure_kind(exc)
                retry = self.attempts
                if (
                    kind not in RETRYABLE
                    or retry >= owner.retry.attempts
                    or self.gave_up
                    or owner.closed
                ):
                    raise
                pause = owner.retry.delay(retry)
                if owner.clock() + pause >= self.deadline_at:
                    raise
                owner.failures.bump("retries")
                logger.debug("tier %s: %s (%r), retry %d", owner.name, kind, exc, retry)
                owner.sleep(pause)


class TierCaller:
    """Runs one tier's backend calls on ``threads`` worker threads (see the module docstring)."""

    def __init__(
        self,
        name: str,
        *,
        deadline_s: float,
        threads: int = 4,
        breaker: CircuitBreaker | None = None,
        retry: RetryPolicy | None = None,
        failures: FailureCounts | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be positive, got {deadline_s}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.name = name
        self.deadline_s = deadline_s
        self.breaker = breaker
        self.retry = retry or RetryPolicy()
        self.failures = failures or FailureCounts()
        self.clock = clock
        self.sleep = sleep
        self.closed = False
        self._executor = LanedPool(threads, f"hicache-tier-{name}")
        self._running_lock = threading.Lock()
        self._running = 0

    @property
    def threads(self) -> int:
        """The most calls this tier runs at once."""
        return self._executor.threads

    def promote(self, ticket: LaneTicket) -> int:
        """Move calls queued with ``ticket`` ahead of the queued writes (see ``LanedPool``)."""
        return self._executor.promote(ticket)

    @property
    def running(self) -> int:
        """Calls submitted whose worker has not returned yet (timed-out ones included)."""
        with self._running_lock:
            return self._running

    def call(
        self,
        fn: Callable[[], T],
        *,
        on_return: Callable[[], None] | None = None,
        deadline_s: float | None = None,
        use_breaker: bool = True,
        lane: Lane = Lane.WRITE,
        ticket: LaneTicket | None = None,
        on_late: Callable[[T], None] | None = None,
    ) -> CallOutcome[T]:
        """Run ``fn()`` with retries; wait at most the deadline; never raise.

        ``on_return`` runs exactly once, when ``fn`` is really done (or will never run). A value
        ``fn`` returns after the deadline went by goes to ``on_late`` (once, before
        ``on_return``, on a worker thread). With
        ``use_breaker=False`` the breaker is neither asked nor told (housekeeping calls).
        ``lane=Lane.READ`` (lookups, reads a request waits for) goes ahead of queued writes;
        a ``ticket`` lets :meth:`promote` move the call there while it is queued.
        """
        breaker = self.breaker if use_breaker else None
        if self.closed or (breaker is not None and not breaker.allow()):
            kind = FailureKind.CLOSED if self.closed else FailureKind.BREAKER_OPEN
            self.failures.add(kind)
            _run_callback(on_return, self.name)
            return CallOutcome(failure=kind)
        budget = self.deadline_s if deadline_s is None else deadline_s
        attempts = _Attempts(self, fn, self.clock() + budget)
        with self._running_lock:
            self._running += 1
        try:
            future = self._executor.submit(attempts, lane, ticket)
        except RuntimeError as exc:  # shut down between the check above and here
            self._finished(on_return)
            self.failures.add(FailureKind.CLOSED)
            return CallOutcome(failure=FailureKind.CLOSED, error=exc)
        late: _LateValue[T] = _LateValue()
        future.add_done_callback(lambda f: self._ended(f, late, on_return))
        try:
            value = future.result(timeout=budget)
        except FutureTimeoutError:
            attempts.gave_up = True
            if future.cancel():  # still queued behind hung calls: it will never run
                logger.debug("tier %s: call cancelled while queued", self.name)
            elif not late.give_up(on_late):
                # it ended between the wait and here: past the deadline all the same
                self.failures.bump("late_returns")
                self._deliver_late(on_late, future)
            return self._failed(FailureKind.TIMEOUT, None, attempts.attempts, breaker)
        except CancelledError as exc:  # close() cancelled it while queued
            return self._failed(FailureKind.CLOSED, exc, 0, breaker)
        except Exception as exc:
            return self._failed(failure_kind(exc), exc, attempts.attempts, breaker)
        if breaker is not None:
            breaker.record_success()
        return CallOutcome(value=value, attempts=attempts.attempts)

    def call_here(self, fn: Callable[[], T], *, use_breaker: bool = True) -> CallOutcome[T]:
        """Run ``fn()`` on this thread, with retries and the breaker as :meth:`call`, but no
        deadline: only for calls that cannot block (a backend's ``memory_lookups``)."""
        breaker = self.breaker if use_breaker else None
        if self.closed or (breaker is not None and not breaker.allow()):
            kind = FailureKind.CLOSED if self.closed else FailureKind.BREAKER_OPEN
            self.failures.add(kind)
            return CallOutcome(failure=kind)
        attempts = _Attempts(self, fn, self.clock() + self.deadline_s)
        try:
            value = attempts()
        except Exception as exc:
            return self._failed(failure_kind(exc), exc, attempts.attempts, breaker)
        if breaker is not None:
            breaker.record_success()
        return CallOutcome(value=value, attempts=attempts.attempts)

    def _failed(
        self,
        kind: FailureKind,
        exc: BaseException | None,
        attempts: int,
        breaker: CircuitBreaker | None,
    ) -> CallOutcome[Any]:
        self.failures.add(kind)
        if breaker is not None and kind is not FailureKind.CLOSED:
            breaker.record_failure()
        if kind is FailureKind.UNEXPECTED:
            logger.error("tier %s: backend call raised %r (not a BackendError)", self.name, exc)
        else:
            logger.warning("tier %s: call failed: %s (%r)", self.name, kind, exc)
        return CallOutcome(failure=kind, error=exc, attempts=attempts)

    def _ended(
        self, future: Future[T], late: _LateValue[T], on_return: Callable[[], None] | None
    ) -> None:
        """The call's worker is done with it (any outcome)."""
        # the late value first: whoever waits for on_return (holds) then also sees its effect
        if late.end():
            self.failures.bump("late_returns")
            self._deliver_late(late.on_late, future)
        self._finished(on_return)

    def _finished(self, on_return: Callable[[], None] | None) -> None:
        with self._running_lock:
            self._running -= 1
        _run_callback(on_return, self.name)

    def _deliver_late(self, on_late: Callable[[T], None] | None, future: Future[T]) -> None:
        """Hand the value of a call that ended after its deadline to ``on_late`` (nothing for
        a call that raised or was cancelled)."""
        if on_late is None or future.cancelled() or future.exception() is not None:
            return
        value = future.result()
        try:
            on_late(value)
        except Exception:  # a late handler that fails must not kill the worker
            logger.exception("tier %s: on_late callback failed", self.name)

    def close(self, *, wait: bool = False) -> None:
        """Refuse new calls and cancel queued ones; ``wait`` joins running ones (may block as
        long as a hung call does)."""
        self.closed = True
        self._executor.shutdown(wait=wait, cancel_futures=True)


def _run_callback(callback: Callable[[], None] | None, name: str) -> None:
    if callback is None:
        return
    try:
        callback()
    except Exception:  # a release that fails must not kill the worker or the caller
        logger.exception("tier %s: on_return callback failed", name)
