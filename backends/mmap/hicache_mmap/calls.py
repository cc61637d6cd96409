"""``CallGate``: the calls in flight on an open backend, so that closing it never pulls the
mapping out from under one of them.

A data call ``enter()``s before it touches the mapping and ``leave()``s after; ``close()`` shuts
the gate (later calls raise :class:`~hicache.errors.BackendClosedError`), waits for the calls
already in, then releases. Calls are bounded (lock waits have their own timeout), so the wait
is too; should it still run out, the release is handed to the last call that leaves, so the
mapping is freed exactly once and never while in use.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from hicache.errors import BackendClosedError

__all__ = ["CallGate"]

logger = logging.getLogger(__name__)


class CallGate:
    """Counts the calls using a resource; closed until :meth:`open`."""

    __slots__ = ("_active", "_drained", "_is_open", "_lock", "_name", "_pending")

    def __init__(self, name: str) -> None:
        self._name = name
        # A plain lock (not a Condition) keeps enter/leave cheap: they run on every data call.
        self._lock = threading.Lock()
        self._active = 0
        self._is_open = False
        self._drained = threading.Event()
        self._pending: list[Callable[[], None]] = []

    @property
    def active(self) -> int:
        """Calls in flight now."""
        return self._active

    def open(self) -> None:
        with self._lock:
            self._is_open = True

    def enter(self) -> None:
        """Count one more call in flight; ``BackendClosedError`` once the gate is shut."""
        with self._lock:
            if not self._is_open:
                raise BackendClosedError(f"{self._name} is not open")
            self._active += 1

    def leave(self) -> None:
        """The call that entered is done with the resource."""
        with self._lock:
            self._active -= 1
            if self._active or self._is_open:
                return  # only a close() waits on the drain: no Event.set on every call
            self._drained.set()
            pending, self._pending = self._pending, []
        for release in pending:
            release()

    def close(self, release: Callable[[], None], timeout_s: float) -> None:
        """Shut the gate, wait up to ``timeout_s`` for the calls in flight, then ``release``
        (now, or when the last of them leaves)."""
        with self._lock:
            self._is_open = False
            drained = self._drained = threading.Event()
            if not self._active:
                drained.set()
        drained.wait(timeout_s)
        with self._lock:
            if self._active:
                logger.warning(
                    "%s: %d call(s) still in flight %.0fs after close; released when they end",
                    self._name,
                    self._active,
                    timeout_s,
                )
                self._pending.append(release)
                return
        release()
