"""Backend calls with a deadline, retries with backoff and a circuit breaker (no torch).

- ``TierCaller(name, deadline_s=..., threads=..., breaker=..., retry=...)``  one per tier
- ``caller.start(fn, on_done, on_return=..., lane=...)``  run ``fn()`` on the tier's own
  threads; ``on_done`` gets a :class:`CallOutcome` (value or failure kind) once, when ``fn``
  returned or the deadline passed, whichever came first; never raises. Reads (``Lane.READ``)
  go ahead of queued writes (:mod:`hicache.tiering.lanes`)
- ``caller.call(fn, ...)``  the same, waiting for the outcome (``wait_result``)
- ``failure_kind(exc)``  the :class:`FailureKind` of an exception
- ``RetryPolicy``    how often and how long to back off before retrying a retryable failure

Why threads of its own: a backend call is synchronous and may block far past any reasonable
time (a hung NFS mount, a black-holed endpoint). The caller stops *waiting* at the deadline and
counts a failure; the call itself keeps running on its thread. Whatever the call uses (host
pages it reads or writes, bytes counted in flight) must stay reserved until it really returns,
so the caller passes ``on_return``: it runs exactly once, on the worker thread, when the call
finished (after all retries; before ``on_done``, so whoever sees the outcome finds the buffers
released), or right away when the call never started (breaker open, caller closed, cancelled
while queued). Release holds there, not in ``on_done``.

Why ``start`` and not a thread waiting for each call: the storage engine continues each job
(the next tier of a cascade, the report to the cache) in ``on_done``, on the thread that ran the
call, so a read goes cache thread -> tier thread -> cache thread, with no thread in between
that only waits (on a small machine each such hand-off costs a wake-up under the GIL). The
deadlines are kept by one watchdog thread per caller (``_Watchdog``), asleep until the earliest
deadline of a call in flight: a call that ends in time costs it nothing but a queue entry.

A call whose deadline passed first may still succeed: its value is not lost but handed to
``on_late`` (on the worker thread, before ``on_return``), so a put the tier did store after all
can still be announced. ``on_done`` had its ``TIMEOUT`` outcome by then.

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
import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
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
    "wait_result",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


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


class _Call(Generic[T]):
    """One call in flight. Whichever comes first, its end (on a tier thread) or its deadline
    (on the watchdog), settles it under one lock: the outcome goes to ``on_done`` exactly once.
    A value that comes after the deadline goes to ``on_late`` instead; ``on_return`` runs once,
    when the call really ended (or was cancelled while queued)."""

    __slots__ = (
        "attempts",
        "breaker",
        "future",
        "lock",
        "on_done",
        "on_late",
        "on_return",
        "owner",
        "queue",
        "settled",
    )

    def __init__(
        self,
        owner: TierCaller,
        attempts: _Attempts[T],
        breaker: CircuitBreaker | None,
        on_done: Callable[[CallOutcome[T]], None],
        on_return: Callable[[], None] | None,
        on_late: Callable[[T], None] | None,
    ) -> None:
        self.owner = owner
        self.attempts = attempts
        self.breaker = breaker
        self.on_done = on_done
        self.on_return = on_return
        self.on_late = on_late
        self.lock = threading.Lock()
        self.settled = False
        self.future: Future[T] | None = None
        #: The watchdog's queue this call waits in (set by ``_Watchdog.add``).
        self.queue: dict[_Call[Any], float] | None = None

    def _settle(self) -> bool:
        """Whether this is the first of end and deadline (the one that reports)."""
        with self.lock:
            first = not self.settled
            self.settled = True
            return first

    def ended(self, future: Future[T]) -> None:
        """The call's worker is done with it, or it was cancelled while queued."""
        owner = self.owner
        if self._settle():
            owner._watchdog.discard(self)
            if future.cancelled():  # close() cancelled it while queued
                out = owner._failed(FailureKind.CLOSED, CancelledError(), 0, self.breaker)
            elif (exc := future.exception()) is not None:
                out = owner._failed(failure_kind(exc), exc, self.attempts.attempts, self.breaker)
            else:
                if self.breaker is not None:
                    self.breaker.record_success()
                out = CallOutcome(value=future.result(), attempts=self.attempts.attempts)
            # holds first: whoever sees the outcome finds the buffers free of this call
            owner._finished(self.on_return)
            owner._report(self.on_done, out)
            return
        # past the deadline: the caller was told TIMEOUT already
        if not future.cancelled():
            owner.failures.bump("late_returns")
            if self.on_late is not None and future.exception() is None:
                try:
                    self.on_late(future.result())
                except Exception:  # a late handler that fails must not kill the worker
                    logger.exception("tier %s: on_late callback failed", owner.name)
        owner._finished(self.on_return)

    def expired(self) -> None:
        """The deadline passed (on the watchdog): report ``TIMEOUT`` unless the call ended."""
        if not self._settle():
            return
        self.attempts.gave_up = True  # further retries would help nobody
        future = self.future
        if future is not None and future.cancel():
            # still queued behind hung calls: it will never run (ended() released it just now)
            logger.debug("tier %s: call cancelled while queued", self.owner.name)
        out = self.owner._failed(FailureKind.TIMEOUT, None, self.attempts.attempts, self.breaker)
        self.owner._report(self.on_done, out)


class _Watchdog:
    """One thread per caller that expires calls at their deadlines.

    The calls in flight wait in one queue per budget (seconds to their deadline), so each
    queue is in deadline order and a call that ends in time just leaves its queue: nothing of
    it stays behind. The thread sleeps until the earliest deadline it knows of, and at least
    one budget while nothing is in flight, so a call that ends in time costs no wake-up."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._cv = threading.Condition(threading.Lock())
        #: budget -> {call: deadline}, in deadline order
        self._queues: dict[float, dict[_Call[Any], float]] = {}
        self._wake_at = math.inf
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, budget: float, call: _Call[Any]) -> None:
        """Expire ``call`` ``budget`` seconds from now unless it settled by then."""
        with self._cv:
            due = time.monotonic() + budget
            queue = self._queues.get(budget)
            if queue is None:
                queue = self._queues[budget] = {}
            queue[call] = due
            call.queue = queue
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"{self._name}-deadlines", daemon=True
                )
                self._thread.start()
            elif due < self._wake_at:  # earlier than the thread sleeps until
                self._cv.notify()

    def discard(self, call: _Call[Any]) -> None:
        """``call`` ended in time: forget its deadline."""
        queue = call.queue
        if queue is not None:
            with self._cv:
                queue.pop(call, None)

    def close(self) -> None:
        """Let the thread end once no call is left to expire."""
        with self._cv:
            self._closed = True
            self._cv.notify()

    def _due(self) -> list[_Call[Any]]:
        """Wait until some deadline passed; the calls due (empty: closed, nothing left)."""
        with self._cv:
            while True:
                now = time.monotonic()
                due: list[_Call[Any]] = []
                earliest = math.inf
                for queue in self._queues.values():
                    passed: list[_Call[Any]] = []
                    for call, at in queue.items():
                        if at > now:
                            earliest = min(earliest, at)
                            break
                        passed.append(call)
                    for call in passed:
                        del queue[call]
                    due += passed
                if due:
                    return due
                if math.isinf(earliest):
                    if self._closed:
                        self._thread = None
                        return []
                    # nothing in flight: sleep one budget, so the next call wakes nobody
                    earliest = now + min(self._queues, default=1.0)
                self._wake_at = earliest
                self._cv.wait(earliest - now)
                self._wake_at = math.inf

    def _run(self) -> None:
        while True:
            due = self._due()
            if not due:
                return
            for call in due:
                try:
                    call.expired()
                except Exception:  # a failing report must not stop the deadlines of others
                    logger.exception("tier %s: expiring a call failed", self._name)


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
        self._watchdog = _Watchdog(f"hicache-tier-{name}")
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
        """:meth:`start` the call and wait for its outcome (at most the deadline); never raise.

        For a thread that has nothing else to do meanwhile (tools, tests, opening a tier): the
        engine starts its calls and goes on."""
        return wait_result(
            functools.partial(
                self.start,
                fn,
                on_return=on_return,
                deadline_s=deadline_s,
                use_breaker=use_breaker,
                lane=lane,
                ticket=ticket,
                on_late=on_late,
            )
        )

    def start(
        self,
        fn: Callable[[], T],
        on_done: Callable[[CallOutcome[T]], None],
        *,
        on_return: Callable[[], None] | None = None,
        deadline_s: float | None = None,
        use_breaker: bool = True,
        lane: Lane = Lane.WRITE,
        ticket: LaneTicket | None = None,
        on_late: Callable[[T], None] | None = None,
    ) -> None:
        """Run ``fn()`` with retries on the tier's threads; ``on_done`` gets its outcome once,
        when it returned or its deadline passed, whichever came first; never raise.

        ``on_done`` runs on the tier thread that ran ``fn`` (on the deadline's thread for a
        ``TIMEOUT``, on this thread for a call refused at once): keep it short, it must not
        block. ``on_return`` runs exactly once, when ``fn`` is really done (or will never run),
        before ``on_done`` unless the deadline came first. A value ``fn`` returns after the
        deadline went by goes to ``on_late`` (once, before ``on_return``, on a worker thread).
        With ``use_breaker=False`` the breaker is neither asked nor told (housekeeping calls).
        ``lane=Lane.READ`` (lookups, reads a request waits for) goes ahead of queued writes;
        a ``ticket`` lets :meth:`promote` move the call there while it is queued.
        """
        breaker = self.breaker if use_breaker else None
        if self.closed or (breaker is not None and not breaker.allow()):
            kind = FailureKind.CLOSED if self.closed else FailureKind.BREAKER_OPEN
            self.failures.add(kind)
            _run_callback(on_return, self.name)
            self._report(on_done, CallOutcome(failure=kind))
            return
        budget = self.deadline_s if deadline_s is None else deadline_s
        attempts = _Attempts(self, fn, self.clock() + budget)
        call = _Call(self, attempts, breaker, on_done, on_return, on_late)
        with self._running_lock:
            self._running += 1
        # watched before it can end: a call that ends in time leaves nothing behind
        self._watchdog.add(budget, call)
        try:
            future = self._executor.submit(attempts, lane, ticket)
        except RuntimeError:  # shut down between the check above and here
            first = call._settle()  # else the deadline came first and reported
            self._watchdog.discard(call)
            self._finished(on_return)
            if first:
                self.failures.add(FailureKind.CLOSED)
                self._report(on_done, CallOutcome(failure=FailureKind.CLOSED))
            return
        call.future = future
        future.add_done_callback(call.ended)

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

    def _finished(self, on_return: Callable[[], None] | None) -> None:
        with self._running_lock:
            self._running -= 1
        _run_callback(on_return, self.name)

    def _report(self, on_done: Callable[[CallOutcome[T]], None], out: CallOutcome[T]) -> None:
        try:
            on_done(out)
        except Exception:  # a report that fails must not kill the worker or the watchdog
            logger.exception("tier %s: on_done callback failed", self.name)

    def close(self, *, wait: bool = False) -> None:
        """Refuse new calls and cancel queued ones; ``wait`` joins running ones (may block as
        long as a hung call does)."""
        self.closed = True
        self._executor.shutdown(wait=wait, cancel_futures=True)
        self._watchdog.close()


def _run_callback(callback: Callable[[], None] | None, name: str) -> None:
    if callback is None:
        return
    try:
        callback()
    except Exception:  # a release that fails must not kill the worker or the caller
        logger.exception("tier %s: on_return callback failed", name)


def wait_result(start: Callable[[Callable[[R], None]], None]) -> R:
    """Call ``start(done)`` (an asynchronous call) and wait for what it hands ``done``: for a
    thread with nothing else to do meanwhile (tools, tests, the synchronous tier methods)."""
    box: list[R] = []
    ready = threading.Event()

    def done(value: R) -> None:
        box.append(value)
        ready.set()

    start(done)
    ready.wait()
    return box[0]
