"""What this process knows is stored, and (single-process mode) the capacity accounting.

- ``pages``     published pages this process knows: key -> bytes on disk. ``exists`` reads it
                without a lock (a dict lookup is atomic).
- ``policy``    the core's tail-first LRU over published pages *and* reservations of puts in
                flight, so room is made before a page's bytes hit the disk and usage never
                passes the bound. ``None`` in shared mode, where capacity is global.
- ``inflight``  reservation count per key (the same key may be written by two threads).
- ``evicted``   keys dropped on the backend's own account since the last ``take_evicted``.

Every method takes the lock; none does I/O (the backend unlinks what these return).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from hicache.storage.backend import PageStatus
from hicache.storage.eviction import TailFirstLRU

__all__ = ["PageIndex"]


class PageIndex:
    """Thread-safe index of one namespace's pages (see the module docstring)."""

    def __init__(self, stored_bytes: int) -> None:
        self.stored_bytes = stored_bytes
        self.lock = threading.Lock()
        self.pages: dict[str, int] = {}
        self.policy: TailFirstLRU | None = None
        self._inflight: dict[str, int] = {}
        self._evicted: list[str] = []
        self.evictions = 0

    def load(self, keys: Sequence[str], sizes: Sequence[int], capacity: int | None) -> None:
        """Replace the contents with pages found on disk, newest first; ``capacity`` (bytes)
        enables the local policy."""
        with self.lock:
            self.pages = dict(zip(keys, sizes, strict=True))
            self._inflight = {}
            self.policy = None
            if capacity is not None:
                # Newest first: the policy records a batch tail-first, so the head ends newest.
                self.policy = TailFirstLRU(capacity)
                self.policy.add(keys, sizes)

    def clear(self) -> None:
        """Forget everything (on close)."""
        with self.lock:
            self.pages = {}
            self._inflight = {}
            self.policy = None

    def used_bytes(self) -> int:
        """Bytes of the published pages this index knows."""
        with self.lock:
            return sum(self.pages.values())

    # ------------------------------------------------------------------ single-process puts

    def evict_to_capacity(self) -> set[str]:
        """Drop least recent pages until the policy fits its capacity (after a smaller bound)."""
        policy = self.policy
        assert policy is not None
        with self.lock:
            return self._forget(policy.evict_for(0))

    def reserve(
        self, keys: Sequence[str], statuses: list[PageStatus | None]
    ) -> tuple[list[int], set[str]]:
        """Decide which pages of a put to write and make room for them first.

        Fills ``statuses`` for pages already stored (and any refused); returns the indices to
        write and the evicted keys whose files the caller must unlink.
        """
        policy = self.policy
        assert policy is not None
        stored = self.stored_bytes
        with self.lock:
            todo: list[int] = []
            existing: list[str] = []
            new: list[str] = []
            seen: set[str] = set()
            for i, key in enumerate(keys):
                if key in self.pages:
                    statuses[i] = PageStatus.ALREADY_EXISTS
                    existing.append(key)
                    continue
                todo.append(i)
                if key not in policy and key not in seen:
                    new.append(key)
                seen.add(key)
            # Re-stored pages are used again: refresh them first so room is made elsewhere.
            policy.touch(existing)
            fit = min(len(new), policy.capacity_bytes // stored)
            victims = policy.evict_for(fit * stored)
            room = max(0, (policy.capacity_bytes - policy.used_bytes) // stored)
            refused = set(new[min(fit, room) :])
            if refused:
                # Only when one batch is larger than the whole capacity: its tail is dropped.
                todo = [i for i in todo if keys[i] not in refused]
                for i, key in enumerate(keys):
                    if key in refused:
                        statuses[i] = PageStatus.FAILED
            reserve = [keys[i] for i in todo]
            policy.add(reserve, [stored] * len(reserve))
            for key in reserve:
                self._inflight[key] = self._inflight.get(key, 0) + 1
            dropped = self._forget(victims)
        for i, key in enumerate(keys):
            if key in dropped and statuses[i] is PageStatus.ALREADY_EXISTS:
                statuses[i] = PageStatus.FAILED  # evicted by its own batch (tiny capacity)
        return todo, dropped

    def settle(
        self, keys: Sequence[str], todo: Iterable[int], statuses: Sequence[PageStatus | None]
    ) -> tuple[int, list[str]]:
        """Record the outcome of written pages.

        Returns the bytes newly published (for the shared counter) and, single-process, the
        keys evicted while their write was in flight, whose fresh files the caller unlinks.
        """
        stored = self.stored_bytes
        published = 0
        late: list[str] = []
        with self.lock:
            policy = self.policy
            for i in todo:
                key, status = keys[i], statuses[i]
                stored_ok = status is PageStatus.OK or status is PageStatus.ALREADY_EXISTS
                if status is PageStatus.OK:
                    published += stored
                if policy is None:
                    if stored_ok:
                        self.pages[key] = stored
                    continue
                left = self._inflight.get(key, 1) - 1
                if left:
                    self._inflight[key] = left
                else:
                    self._inflight.pop(key, None)
                if stored_ok:
                    if key in policy:
                        self.pages[key] = stored
                    elif key not in self.pages and status is PageStatus.OK:
                        # Evicted while in flight: the file was never accounted; it goes, and
                        # is reported like any other eviction.
                        late.append(key)
                        self._evicted.append(key)
                        self.evictions += 1
                elif not left and key not in self.pages:
                    policy.remove(key)
        return published, late

    # ------------------------------------------------------------------ what reads learn

    def note_present(self, key: str, size: int) -> None:
        """A page found on disk that this process did not know (shared mode)."""
        with self.lock:
            self.pages[key] = size

    def note_missing(self, keys: Iterable[str]) -> None:
        """Pages that vanished behind our back (another process, an operator)."""
        with self.lock:
            for key in keys:
                self.pages.pop(key, None)
                if self.policy is not None and key not in self._inflight:
                    self.policy.remove(key)

    def note_corrupt(self, key: str) -> None:
        """A page that failed verification: forgotten, and reported as evicted if known."""
        with self.lock:
            known = self.pages.pop(key, None) is not None
            if self.policy is not None:
                self.policy.remove(key)
            if known:
                self._evicted.append(key)

    def note_evicted(self, keys: Sequence[str]) -> None:
        """Pages a shared eviction round of this process removed."""
        with self.lock:
            for key in keys:
                self.pages.pop(key, None)
            self._evicted.extend(keys)
            self.evictions += len(keys)

    def touch(self, keys: Sequence[str]) -> None:
        """Pages just read, head first: they become the most recent, tail first."""
        if self.policy is not None and keys:
            with self.lock:
                self.policy.touch(keys)

    def take_evicted(self) -> list[str]:
        """Drain the evicted keys."""
        with self.lock:
            out, self._evicted = self._evicted, []
        return out

    def _forget(self, victims: Sequence[str]) -> set[str]:
        """Drop evicted keys (lock held); return those that had published files."""
        dropped: set[str] = set()
        for key in victims:
            if self.pages.pop(key, None) is not None:
                dropped.add(key)
                self._evicted.append(key)
        self.evictions += len(dropped)
        return dropped
