"""What one backend instance counts, and the warnings it logs once: ``stats()``'s counters.

- ``Outcomes(ns_dir)``            one per backend instance; thread-safe
- ``count(**deltas)`` / ``snapshot()``  add to counters / read them all
- ``unknown_version(key, detail)``, ``corrupt(key, field, removed)``, ``not_regular(path, n)``
                                  count one outcome of a read; the first of each kind is logged
                                  at warning level, the rest at debug (a damaged tree would
                                  otherwise flood the log)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["COUNTERS", "Outcomes"]

log = logging.getLogger(__name__)

COUNTERS = (
    "puts_ok",
    "puts_existing",
    "puts_failed",
    "gets_ok",
    "gets_missing",
    "gets_failed",
    "corrupt",
    "unknown_version",
    "not_regular",
    "dead_temps_removed",
    "bad_size_removed",
    "other_size_pages",
)


class Outcomes:
    """Counters of one backend instance and which warnings it has logged."""

    def __init__(self, ns_dir: str) -> None:
        self._ns_dir = ns_dir
        self._lock = threading.Lock()
        self._counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._logged: set[str] = set()

    def count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._counters[name] += delta

    def set(self, name: str, value: int) -> None:
        with self._lock:
            self._counters[name] = value

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    def _first(self, name: str, n: int = 1) -> Callable[..., None]:
        """Count ``n`` of ``name``; the log call for it (warning the first time)."""
        with self._lock:
            self._counters[name] += n
            first = name not in self._logged
            self._logged.add(name)
        return log.warning if first else log.debug

    def unknown_version(self, key: str, detail: str) -> None:
        self._first("unknown_version")(
            "localdisk %s: page %s is a newer writer's (%s): a miss, left in place",
            self._ns_dir,
            key,
            detail,
        )

    def corrupt(self, key: str, field: str, remove: Callable[[str], bool]) -> None:
        """Count a page that failed checks, ``remove(key)`` it, log whether it went."""
        emit = self._first("corrupt")
        removed = remove(key)
        emit(
            "localdisk %s: page %s is corrupt (%s): %s",
            self._ns_dir,
            key,
            field,
            "removed" if removed else "left in place",
        )

    def not_regular(self, path: str, n: int) -> None:
        """Count ``n`` names held by something that is not a page (``path``: the first)."""
        self._first("not_regular", n)(
            "localdisk %s: %s is not a regular file (a FIFO, socket, device, directory or "
            "symlink): treated as a miss and left in place",
            self._ns_dir,
            path,
        )
