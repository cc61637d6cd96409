"""Backpressure: a per-tier bound on the bytes of publishes in flight (no torch).

- ``gate.try_acquire(nbytes)``  reserve bytes for one publish call; ``False`` = over the bound:
                               the caller drops the publish and counts it (never queues it)
- ``gate.release(nbytes)``      give them back when the call really returned (``on_return``)

A slow or hung tier therefore holds at most ``max_bytes`` of host pages; everything past that is
dropped at once instead of piling up in a queue and starving the host pool. One publish larger
than the whole bound is let through when nothing else is in flight, so an undersized bound
degrades to "one at a time" rather than "never".
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["InflightGate"]


class InflightGate:
    """Thread-safe byte budget for one tier's publishes in flight."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._inflight = 0
        self._peak = 0
        self._admitted = 0
        self._dropped = 0
        self._dropped_bytes = 0

    @property
    def inflight_bytes(self) -> int:
        """Bytes currently reserved."""
        with self._lock:
            return self._inflight

    def try_acquire(self, nbytes: int) -> bool:
        """Reserve ``nbytes``; ``False`` (and a counted drop) when that would pass the bound."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        with self._lock:
            if self._inflight and self._inflight + nbytes > self.max_bytes:
                self._dropped += 1
                self._dropped_bytes += nbytes
                return False
            self._inflight += nbytes
            self._peak = max(self._peak, self._inflight)
            self._admitted += 1
            return True

    def release(self, nbytes: int) -> None:
        """Return ``nbytes`` reserved by a successful ``try_acquire``."""
        with self._lock:
            if nbytes > self._inflight:
                raise ValueError(f"release of {nbytes} bytes but only {self._inflight} in flight")
            self._inflight -= nbytes

    def stats(self) -> dict[str, Any]:
        """Counters as plain data."""
        with self._lock:
            return {
                "max_bytes": self.max_bytes,
                "inflight_bytes": self._inflight,
                "peak_bytes": self._peak,
                "admitted": self._admitted,
                "dropped": self._dropped,
                "dropped_bytes": self._dropped_bytes,
            }
