"""A per-tier circuit breaker: stop calling a tier that keeps failing, probe it after a cool-down.

- ``allow()``           may a call go to the tier now? (``False`` = skip it: a miss / a drop)
- ``would_refuse()``    the same question without side effects (no probe used, nothing counted)
- ``record_success()``  the call the breaker allowed succeeded
- ``record_failure()``  it failed (an exception or a missed deadline)
- ``snapshot()``        the state as plain data for stats

States: ``closed`` (calls flow; consecutive failures are counted) -> ``open`` after
``failure_threshold`` consecutive failures (every call refused) -> ``half_open`` once
``cooldown_s`` passed (exactly one probe call is let through) -> ``closed`` when the probe
succeeds, back to ``open`` (a fresh cool-down) when it fails.

Outcomes of calls allowed *before* the breaker opened may arrive while it is open (a slow call
finishing late); they are ignored: only the probe decides whether the tier is healthy again, so a
burst of stragglers cannot flap the state. The clock is injectable so tests never sleep.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["BreakerSnapshot", "BreakerState", "CircuitBreaker"]

logger = logging.getLogger(__name__)


class BreakerState(enum.StrEnum):
    """Where a breaker stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """A breaker's state and counters at one moment (plain data)."""

    state: BreakerState
    consecutive_failures: int
    #: Times the breaker went from closed or half-open to open.
    opened: int
    #: Times a half-open probe succeeded and closed the breaker.
    closed_after_probe: int
    #: Calls refused because the breaker was open (or a probe was already out).
    rejected: int
    #: Seconds until an open breaker lets a probe through; ``None`` unless open.
    retry_in_s: float | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-able dict (the state as its string value)."""
        out = asdict(self)
        out["state"] = str(self.state)
        return out


class CircuitBreaker:
    """Thread-safe circuit breaker for one tier (see the module docstring)."""

    def __init__(
        self,
        failure_threshold: int,
        cooldown_s: float,
        *,
        name: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if cooldown_s <= 0:
            raise ValueError(f"cooldown_s must be positive, got {cooldown_s}")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_started: float | None = None
        self._opened = 0
        self._closed_after_probe = 0
        self._rejected = 0

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker whose cool-down passed still reads ``open`` until
        the next ``allow()`` turns it half-open)."""
        with self._lock:
            return self._state

    def allow(self) -> bool:
        """Return whether a call may go to the tier now; a refusal is counted."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            now = self._clock()
            if self._state is BreakerState.OPEN:
                if now - self._opened_at >= self.cooldown_s:
                    self._state = BreakerState.HALF_OPEN
                    self._probe_started = now
                    logger.info("tier %s: circuit half-open, probing", self.name)
                    return True
            elif self._probe_started is not None and now - self._probe_started >= self.cooldown_s:
                # The probe's outcome never came back (its caller vanished): send another one
                # rather than stay half-open forever.
                self._probe_started = now
                return True
            self._rejected += 1
            return False

    def would_refuse(self) -> bool:
        """Whether :meth:`allow` would refuse now; changes nothing and counts nothing (lets a
        caller skip preparing a call without using up the half-open probe)."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return False
            now = self._clock()
            if self._state is BreakerState.OPEN:
                return now - self._opened_at < self.cooldown_s
            return self._probe_started is not None and now - self._probe_started < self.cooldown_s

    def record_success(self) -> None:
        """An allowed call succeeded: reset the failure count; a probe closes the breaker."""
        with self._lock:
            if self._state is BreakerState.OPEN:
                return  # a straggler from before the breaker opened: only the probe decides
            if self._state is BreakerState.HALF_OPEN:
                self._closed_after_probe += 1
                logger.info("tier %s: circuit closed after a successful probe", self.name)
            self._state = BreakerState.CLOSED
            self._failures = 0
            self._probe_started = None

    def record_failure(self) -> None:
        """An allowed call failed or missed its deadline; may open the breaker."""
        with self._lock:
            if self._state is BreakerState.OPEN:
                return
            self._failures += 1
            if self._state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
                self._state = BreakerState.OPEN
                self._opened_at = self._clock()
                self._probe_started = None
                self._opened += 1
                logger.warning(
                    "tier %s: circuit open after %d consecutive failures; retrying in %.3gs",
                    self.name,
                    self._failures,
                    self.cooldown_s,
                )

    def snapshot(self) -> BreakerSnapshot:
        """The state and counters as plain data."""
        with self._lock:
            retry_in = None
            if self._state is BreakerState.OPEN:
                retry_in = max(0.0, self.cooldown_s - (self._clock() - self._opened_at))
            return BreakerSnapshot(
                state=self._state,
                consecutive_failures=self._failures,
                opened=self._opened,
                closed_after_probe=self._closed_after_probe,
                rejected=self._rejected,
                retry_in_s=retry_in,
            )
