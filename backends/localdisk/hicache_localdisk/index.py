"""What this process knows is stored, and (single-process mode) the capacity accounting.

- ``pages``     published pages this process knows: key -> bytes on disk. ``exists`` reads it
                without a lock (a dict lookup is atomic).
- ``policy``    the core's capacity policy (``options.eviction``) over published pages *and*
                reservations of puts in flight, so room is made before a page's bytes hit the
                disk and usage never passes the bound. ``None`` in shared mode, where capacity
                is global.
- ``inflight``  reservation count per key (the same key may be written by two threads).
- ``evicted``   keys dropped on the backend's own account since the last ``take_evicted``.

Every method takes the lock. The only I/O under it goes through the callables the backend
passes in, ``unlink(key)``, ``on_disk(key)`` and ``retire(key)``: a page file this index forgets
is unlinked (or, for a put that will reuse it, renamed away by ``retire``) before the lock is
released, and a file another writer of the same key published (or that a
reader missed) is looked at under it. Otherwise a concurrent put of that key could find the
doomed file (``ALREADY_EXISTS``), account for it, and then lose it to the pending unlink. A
packed page (``hicache_localdisk.packs``) is forgotten by its pack under the lock instead: from
then on a put of its key registers a record of its own, and the old record's punch may follow
the lock's release.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from hicache.storage import (
    DEFAULT_EVICTION,
    CapacityPolicy,
    EvictionPolicy,
    PageStatus,
    make_capacity_policy,
)

__all__ = ["PageIndex"]


class PageIndex:
    """Thread-safe index of one namespace's pages (see the module docstring)."""

    def __init__(
        self,
        stored_bytes: int,
        unlink: Callable[[str], object],
        on_disk: Callable[[str], bool],
        retire: Callable[[str], Any] | None = None,
    ) -> None:
        self.stored_bytes = stored_bytes
        self._unlink = unlink
        self._on_disk = on_disk
        self._retire = retire
        self.lock = threading.Lock()
        self.pages: dict[str, int] = {}
        self.policy: CapacityPolicy | None = None
        self._inflight: dict[str, int] = {}
        self._evicted: list[str] = []
        self.evictions = 0

    def load(
        self,
        keys: Sequence[str],
        sizes: Sequence[int],
        capacity: int | None,
        eviction: EvictionPolicy = DEFAULT_EVICTION,
        batch: int | None = None,
    ) -> None:
        """Replace the contents with pages found on disk, newest first; ``capacity`` (bytes)
        enables the local policy ``eviction``, fed puts of at most ``batch`` pages."""
        with self.lock:
            self.pages = dict(zip(keys, sizes, strict=True))
            self._inflight = {}
            self.policy = None
            if capacity is not None:
                # Newest first: the policy records a batch tail-first, so the head ends newest.
                self.policy = make_capacity_policy(eviction, capacity, batch=batch)
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
        """Drop (and unlink) least recent pages until the policy fits its capacity (after a
        smaller bound); return the keys whose files went."""
        policy = self.policy
        assert policy is not None
        with self.lock:
            return self._drop(policy.evict_for(0))

    def reserve(
        self,
        keys: Sequence[str],
        statuses: list[PageStatus | None],
        spares: list[Any] | None = None,
    ) -> list[int]:
        """Decide which pages of a put to write and make room for them first.

        Fills ``statuses`` for pages already stored (and any refused); returns the indices to
        write. Evicted pages are unlinked before this returns; with ``spares`` (and a
        ``retire`` callable) the files of evicted pages of the stored size are retired instead
        and what ``retire`` returned is appended there, for this put to reuse.
        """
        policy = self.policy
        assert policy is not None
        stored = self.stored_bytes
        with self.lock:
            todo: list[int]
            existing: list[str] = []
            new: list[str]
            distinct = len(set(keys)) == len(keys)
            if distinct and self.pages.keys().isdisjoint(keys):
                # the usual put: distinct pages, none stored yet (in C, not a loop per page)
                todo = list(range(len(keys)))
                new = policy.missing(keys)
            else:
                todo, existing, new = self._sort_put(keys, statuses, policy)
            # Re-stored pages are used again: refresh them first so room is made elsewhere.
            if existing:
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
            # A key reserved by another put in flight was not counted as new, but evict_for may
            # just have taken that reservation: re-adding it can pass the bound. Least recent
            # first, so this batch's own reservations are the last to go.
            victims += policy.evict_for(0)
            inflight = self._inflight
            if distinct and inflight.keys().isdisjoint(reserve):
                inflight.update(dict.fromkeys(reserve, 1))
            else:
                for key in reserve:
                    inflight[key] = inflight.get(key, 0) + 1
            dropped = self._drop(victims, spares) if victims else set()
        if existing and dropped:
            for i, key in enumerate(keys):
                if key in dropped and statuses[i] is PageStatus.ALREADY_EXISTS:
                    statuses[i] = PageStatus.FAILED  # evicted by its own batch (tiny capacity)
        return todo

    def _sort_put(
        self, keys: Sequence[str], statuses: list[PageStatus | None], policy: CapacityPolicy
    ) -> tuple[list[int], list[str], list[str]]:
        """``reserve``'s split of a put with stored or repeated keys: the indices to write,
        the keys already stored (their statuses filled), the keys the policy lacks (once
        each)."""
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
        return todo, existing, new

    def settle(
        self, keys: Sequence[str], todo: Iterable[int], statuses: Sequence[PageStatus | None]
    ) -> int:
        """Record the outcome of written pages; return the bytes newly published (for the
        shared counter).

        Single-process, a page evicted while its write was in flight is unlinked here. A page
        whose put met another writer of the same key (``ALREADY_EXISTS``, or a writer still in
        flight) is accounted only if its file is on disk now: the file it met may be one that
        a settle or an eviction has unlinked since.
        """
        stored = self.stored_bytes
        published = 0
        with self.lock:
            policy = self.policy
            if policy is not None:
                written = [keys[i] for i in todo]
                if self._settle_clean(written, [statuses[i] for i in todo], policy):
                    return stored * len(written)
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
                if key in self.pages:
                    continue  # accounted by another writer of this key (pages only hold files)
                if stored_ok and key in policy:
                    contended = left > 0 or status is PageStatus.ALREADY_EXISTS
                    if not contended or self._on_disk(key):
                        self.pages[key] = stored
                        continue
                elif status is PageStatus.OK:
                    # Evicted while in flight: the file was never accounted; it goes, and is
                    # reported like any other eviction.
                    self._unlink(key)
                    self._evicted.append(key)
                    self.evictions += 1
                if not left:
                    policy.remove(key)  # no file and no writer left: drop the reservation
        return published

    def _settle_clean(
        self, keys: list[str], statuses: list[PageStatus | None], policy: CapacityPolicy
    ) -> bool:
        """``settle`` of the usual put, in C rather than a loop per page, if it is one: every
        page written (``OK``), each the only writer of its key, still reserved and not yet
        known. Returns False, changing nothing, otherwise."""
        inflight = self._inflight
        if (
            statuses.count(PageStatus.OK) != len(statuses)
            or list(map(inflight.get, keys)) != [1] * len(keys)
            or not self.pages.keys().isdisjoint(keys)
            or policy.missing(keys)
        ):
            return False
        # (a key twice in ``keys`` would have two reservations: not a clean put)
        deque(map(inflight.__delitem__, keys), 0)
        self.pages.update(dict.fromkeys(keys, self.stored_bytes))
        return True

    # ------------------------------------------------------------------ what reads learn

    def note_present(self, key: str, size: int) -> None:
        """A page found on disk that this process did not know (shared mode)."""
        with self.lock:
            self.pages[key] = size

    def note_missing(self, keys: Iterable[str]) -> None:
        """Pages that vanished behind our back (another process, an operator) or were deleted.

        A key whose file is on disk again (a concurrent put re-stored it since it was missed)
        stays known.
        """
        with self.lock:
            for key in keys:
                if key in self.pages and self._on_disk(key):
                    continue
                self.pages.pop(key, None)
                if self.policy is not None and key not in self._inflight:
                    self.policy.remove(key)

    def note_corrupt(self, key: str, unlink: bool) -> bool:
        """A page that failed verification: forgotten, and reported as evicted if known.

        With ``unlink`` its file is removed under the lock (single-process mode; see the module
        docstring); returns whether this call removed it.
        """
        with self.lock:
            known = self.pages.pop(key, None) is not None
            if self.policy is not None and key not in self._inflight:
                self.policy.remove(key)
            if known:
                self._evicted.append(key)
            return bool(self._unlink(key)) if unlink else False

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

    def _drop(self, victims: Sequence[str], spares: list[Any] | None = None) -> set[str]:
        """Forget evicted keys and unlink (or retire into ``spares``) their files (lock held:
        see the module docstring); return those that had published files. A victim that was
        only a reservation has no file yet: its writer unlinks it when it settles."""
        dropped: set[str] = set()
        retire = self._retire if spares is not None else None
        for key in victims:
            size = self.pages.pop(key, None)
            if size is not None:
                spare = retire(key) if retire is not None and size == self.stored_bytes else None
                if spare is not None:
                    assert spares is not None
                    spares.append(spare)
                else:
                    self._unlink(key)
                dropped.add(key)
                self._evicted.append(key)
        self.evictions += len(dropped)
        return dropped
