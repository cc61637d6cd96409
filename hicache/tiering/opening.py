"""Opening one tier's backend: within a deadline at start-up, again in the background after.

- ``TierOpener(name, backend, deadline_s=..., cooldown_s=..., stats=...)``  one per tier
- ``available``            the backend is open and in the cascade; while it is not, asking starts
                           one background open per cool-down (a request never waits for it)
- ``start()``              start-up: open on a thread of its own, returning a ``Future``
- ``settle(attempt, s)``   wait at most ``s`` seconds for it; ``None`` or why the tier is out
- ``close()``              close the backend, or leave that to an open still blocked in it

Why a thread per open: ``open`` of a frozen endpoint blocks for as long as the client's own
timeouts and retries allow (30 s and more for S3), and a start-up must not. An open that outlives
its deadline keeps running; when it returns it decides like a background reopen would: the tier
joins the cascade, or waits a cool-down before the next attempt. One lock orders the waiter
giving up and the open finishing, so exactly one of them decides.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from hicache.storage import Backend
from hicache.tiering.stats import TierCounters

__all__ = ["TierOpener"]

logger = logging.getLogger(__name__)


class TierOpener:
    """Opens, reopens and closes one tier's backend (see the module docstring)."""

    def __init__(
        self,
        name: str,
        backend: Backend,
        *,
        deadline_s: float,
        cooldown_s: float,
        stats: TierCounters,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.backend = backend
        self.deadline_s = deadline_s
        self.cooldown_s = cooldown_s
        self._stats = stats
        self._clock = clock
        self._lock = threading.Lock()
        self._available = True
        #: An open of the backend is running (at start-up or in the background).
        self._opening = False
        self._closed = False
        self._next_attempt = 0.0

    @property
    def available(self) -> bool:
        """Whether the tier is in the cascade; when not, starts a due background reopen."""
        if self._available:
            return True
        with self._lock:
            now = self._clock()
            if self._closed or self._opening or now < self._next_attempt:
                return False
            self._opening = True
        threading.Thread(
            target=self._open, args=(now, None), name=f"hicache-reopen-{self.name}", daemon=True
        ).start()
        return False

    @property
    def is_available(self) -> bool:
        """:attr:`available` without starting anything (for stats)."""
        return self._available

    def set_available(self, value: bool) -> None:
        """Put the tier in or out of the cascade (out: the next open waits a cool-down)."""
        self._available = value
        if not value:
            self._next_attempt = self._clock() + self.cooldown_s

    def start(self) -> Future[None]:
        """Open the backend on a thread of its own; the future says how it went."""
        attempt: Future[None] = Future()
        with self._lock:
            self._closed = False
            self._opening = True
            started = self._clock()
        threading.Thread(
            target=self._open,
            args=(started, attempt),
            name=f"hicache-open-{self.name}",
            daemon=True,
        ).start()
        return attempt

    def settle(self, attempt: Future[None], timeout: float) -> str | None:
        """Wait up to ``timeout`` s for ``attempt``; ``None`` when the tier opened, else why not.

        An attempt still running at the timeout is given up on: the tier starts out of the
        cascade and the attempt, when it returns, decides as a background reopen would.
        """
        try:
            error = attempt.exception(timeout=timeout)
        except TimeoutError:
            with self._lock:
                # cancel() fails when the attempt finished meanwhile: then its outcome counts
                if attempt.cancel():
                    self.set_available(False)
                    self._stats.error(None, "open_timeout")
                    return f"did not open within its deadline_s of {self.deadline_s:g} s"
            error = attempt.exception()
        return None if error is None else f"cannot open: {error}"

    def _open(self, started: float, attempt: Future[None] | None) -> None:
        error: Exception | None = None
        try:
            self.backend.open()
        except Exception as exc:
            error = exc
            self._stats.error(exc, "open")
        with self._lock:
            self._opening = False
            awaited = attempt is not None and not attempt.cancelled()
            if attempt is not None and awaited:
                if error is None:
                    attempt.set_result(None)
                else:
                    attempt.set_exception(error)
            close_now = error is None and self._closed
            if error is not None:
                self._available = False
                self._next_attempt = started + self.cooldown_s  # counted from this attempt
            elif not self._closed:
                self._available = True
        if close_now:
            self._close_backend()  # close() ran while this open was blocked and left it here
        elif awaited:
            pass  # the start-up waiting for it reports the outcome
        elif error is not None:
            logger.warning("tier %s: still cannot open: %s", self.name, error)
        else:
            logger.warning(
                "tier %s: opened after an earlier failure; back in the cascade", self.name
            )

    def close(self) -> None:
        """Close the backend (idempotent; never raises). While an open is still blocked in the
        backend, that open's thread closes it when it returns: ``close`` would wait on the
        backend's lock for as long as the open hangs."""
        with self._lock:
            self._closed = True
            opening = self._opening
        if not opening:
            self._close_backend()

    def _close_backend(self) -> None:
        try:
            self.backend.close()
        except Exception as exc:
            logger.warning("tier %s: close failed: %r", self.name, exc)
