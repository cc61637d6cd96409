"""State several processes share on one root (``shared: true``): a usage counter and a lock.

- ``.hicache-usage``  8 bytes: the bytes this namespace holds on disk, updated under ``flock`` by
  every process (read-modify-write of 8 bytes). Pages are added after their rename and removed
  inside an eviction round, so the counter only ever errs high.
- ``.hicache-evict``  whoever holds its ``flock`` is the one process enforcing ``max_bytes`` right
  now. Election is per round: a writer that finds the counter over the bound takes the lock
  (waiting for a running round to finish), re-reads the counter, and evicts only if it is still
  over. The kernel drops the lock of a dead process, so a crash never wedges the others.

- ``.hicache-members``  every open instance holds a shared ``flock`` on it; an opener that gets
  it exclusively is alone and re-anchors the counter on its scan.

The counter is an estimate (a process killed between a rename and its count leaves drift);
each eviction round rescans the directory and corrects it, and so does a lone opener.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from hicache.storage import TailFirstLRU, create_file
from hicache_localdisk.fsio import remove
from hicache_localdisk.layout import Layout

__all__ = ["SharedState", "join_shared", "settle_shared"]

log = logging.getLogger(__name__)

#: An eviction round frees this share of ``max_bytes`` beyond what is needed, so rounds (each a
#: directory scan) stay rare under steady writing.
SLACK = 1 / 16

_COUNTER = struct.Struct("<q")
USAGE_FILE = ".hicache-usage"
EVICT_FILE = ".hicache-evict"
MEMBERS_FILE = ".hicache-members"


class SharedState:
    """The cross-process counter and eviction lock of one namespace directory."""

    def __init__(self, ns_dir: str, file_mode: int) -> None:
        self._ns_dir = ns_dir
        self._file_mode = file_mode
        # flock belongs to the open file description: threads of one process share it, so a
        # thread lock serializes them first.
        self._usage_tlock = threading.Lock()
        self._evict_tlock = threading.Lock()
        self._usage_fd = -1
        self._evict_fd = -1
        self._members_fd = -1

    def open(self) -> bool:
        """Open (creating) the files and join the members; True when no other process is in.

        Every open instance holds a shared ``flock`` on ``.hicache-members`` until it closes. An
        opener that gets it exclusively is alone: nothing is in flight, so it may re-anchor the
        counter on a scan (:meth:`set`) before calling :meth:`admit_others`.
        """
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
        path = os.path.join
        self._usage_fd = create_file(path(self._ns_dir, USAGE_FILE), flags, self._file_mode)
        self._evict_fd = create_file(path(self._ns_dir, EVICT_FILE), flags, self._file_mode)
        self._members_fd = create_file(path(self._ns_dir, MEMBERS_FILE), flags, self._file_mode)
        try:
            fcntl.flock(self._members_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(self._members_fd, fcntl.LOCK_SH)  # waits out a lone opener's re-anchor
            return False
        return True

    def admit_others(self) -> None:
        """Turn a lone opener's exclusive membership into a shared one."""
        fcntl.flock(self._members_fd, fcntl.LOCK_SH)

    def close(self) -> None:
        # Closing the descriptors releases every flock this instance holds.
        for fd in (self._usage_fd, self._evict_fd, self._members_fd):
            if fd >= 0:
                os.close(fd)
        self._usage_fd = self._evict_fd = self._members_fd = -1

    @contextmanager
    def _usage_locked(self) -> Iterator[int]:
        with self._usage_tlock:
            fd = self._usage_fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield fd
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    @staticmethod
    def _read(fd: int) -> int:
        raw = os.pread(fd, _COUNTER.size, 0)
        return _COUNTER.unpack(raw)[0] if len(raw) == _COUNTER.size else 0

    def read(self) -> int:
        """Current value of the counter."""
        with self._usage_locked() as fd:
            return self._read(fd)

    def add(self, delta: int) -> int:
        """Add ``delta`` to the counter (never below zero); return the new value."""
        with self._usage_locked() as fd:
            value = max(0, self._read(fd) + delta)
            os.pwrite(fd, _COUNTER.pack(value), 0)
            return value

    def set(self, value: int) -> None:
        """Set the counter (only a lone opener may: see :meth:`open`)."""
        with self._usage_locked() as fd:
            os.pwrite(fd, _COUNTER.pack(value), 0)

    def init_if_unset(self, value: int) -> bool:
        """Set the counter to ``value`` if no process has set it yet; True if this call did."""
        with self._usage_locked() as fd:
            if os.fstat(fd).st_size >= _COUNTER.size:
                return False
            os.pwrite(fd, _COUNTER.pack(value), 0)
            return True

    @contextmanager
    def evict_round(self) -> Iterator[None]:
        """Hold the enforcer lock (blocking until the current holder finishes)."""
        with self._evict_tlock:
            fd = self._evict_fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ capacity

    def enforce(self, layout: Layout, stored: int, max_bytes: int, need: int) -> list[str]:
        """Run one eviction round if the counter plus ``need`` is (still) over ``max_bytes``;
        return the keys it removed.

        The round rescans the directory, so it decides on what is really there, ranks pages by
        mtime (every put and get stamps them tail-first) with the core's tail-first LRU, evicts
        down to the bound minus the writes in flight and some slack, and re-anchors the counter
        by a delta (concurrent additions are kept), which also removes a killed process's drift.
        """
        with self.evict_round():
            before = self.read()
            if before + need <= max_bytes:
                return []  # another process's round made room while we waited
            scan = layout.scan()
            pages = [p for p in scan.pages if p.size == stored]
            on_disk = sum(p.size for p in pages)
            # Other writers' temporaries are pages about to land: make room for them too.
            pending = scan.live_temps * stored + need
            pages.sort(key=lambda p: p.mtime_ns, reverse=True)
            ranking = TailFirstLRU(max_bytes)
            ranking.add([p.key for p in pages], [p.size for p in pages])
            victims = ranking.evict_for(min(pending + int(max_bytes * SLACK), max_bytes))
            removed = [key for key in victims if remove(layout.page_path(key))]
            self.add(on_disk - before - len(removed) * stored)
        log.debug("localdisk shared round: evicted %d pages", len(removed))
        return removed

    def remove(self, paths: Sequence[str], stored: int, failed: list[str] | None = None) -> int:
        """Unlink page files inside a round's lock and count them out; return how many went.

        Holding the lock means no round rescans between an unlink and its decrement (which
        would count the page as gone twice).
        """
        with self.evict_round():
            freed = sum(remove(path, failed) for path in paths)
            if freed:
                self.add(-freed * stored)
        return freed


def join_shared(ns_dir: str, file_mode: int) -> tuple[SharedState | None, bool]:
    """Open the shared state before the scan: (the state, whether no other process has the
    root); ``(None, False)`` when the state files are unusable (logged)."""
    shared = SharedState(ns_dir, file_mode)
    try:
        alone = shared.open()
    except OSError as exc:
        shared.close()
        log.warning("localdisk shared state unavailable in %s: %s", ns_dir, exc)
        return None, False
    return shared, alone


def settle_shared(shared: SharedState, total: int, alone: bool) -> int:
    """Anchor the counter on the scan's ``total`` bytes when alone, else set it only when
    unset; returns the counter."""
    if alone:
        # Nobody else is in: the scan is the truth, whatever drift killed processes left.
        shared.set(total)
        shared.admit_others()
    else:
        with shared.evict_round():
            shared.init_if_unset(total)
    return shared.read()
