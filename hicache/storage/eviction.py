"""Capacity policies backends share: which stored pages to drop to make room.

- :class:`CapacityPolicy`  the interface: track resident keys with their sizes, pick victims
- :class:`TailFirstLRU`    LRU in which a chain is recorded tail first, so heads outlive suffixes
- :class:`ClockSlots`      CLOCK (second chance) over a fixed set of slots, one hand per range
- :class:`EvictionPolicy`  the policies a tier may choose in YAML (``options.eviction``), and
  :func:`make_capacity_policy` to build one (``predicted_reuse``, the default, is
  :class:`~hicache.storage.reuse_policy.PredictedReuse`; see docs/cache-efficiency.md)

Why tail first: a request's pages form a chain ``k0, k1, ..., kn`` and a reader can only use
``kj`` if ``k0..kj-1`` are stored too. Plain LRU over puts makes ``k0`` the *least* recent page of
its chain, evicts it first and strands every suffix. Recording ``kn`` first and ``k0`` last makes
every page more recent than its suffixes, so eviction eats chains from the tail and what stays
stored is always prefix-closed (as long as adds and touches are whole chain prefixes, which is
what the cache does).

All classes are thread-safe (one lock each) and cost O(1) per key.
"""

from __future__ import annotations

import enum
import itertools
import threading
from abc import ABC, abstractmethod
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from hicache.errors import BackendCapacityError

__all__ = [
    "DEFAULT_EVICTION",
    "CapacityPolicy",
    "ClockSlots",
    "EvictionPolicy",
    "TailFirstLRU",
    "make_capacity_policy",
]


class CapacityPolicy(ABC):
    """Tracks resident keys and their sizes against a byte capacity; picks eviction victims.

    Notes for implementers: every method must be safe to call from several threads at once and
    cost O(1) per key (``evict_for`` O(1) per victim). ``add`` and ``touch`` take a chain in
    head-first order, as the cache holds it.
    """

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self._capacity = capacity_bytes

    @property
    def capacity_bytes(self) -> int:
        """The byte budget ``evict_for`` enforces."""
        return self._capacity

    @staticmethod
    def _check_batch(keys: Sequence[object], sizes: Sequence[int]) -> None:
        """The argument checks every ``add`` makes before it changes anything."""
        if len(keys) != len(sizes):
            raise ValueError(f"{len(keys)} keys but {len(sizes)} sizes")
        for size in sizes:
            if size < 0:
                raise ValueError(f"sizes must be >= 0, got {size}")

    @property
    @abstractmethod
    def used_bytes(self) -> int:
        """Sum of the sizes of the resident keys."""

    @abstractmethod
    def __contains__(self, key: object) -> bool:
        """True when ``key`` is resident."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of resident keys."""

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys of ``keys`` that are not resident, in their order.

        Note for implementers: the default asks ``in`` once per key; a policy keeping its
        resident keys in a dict answers in one C-level pass (callers ask for whole puts).
        """
        return [key for key in keys if key not in self]

    @abstractmethod
    def add(self, keys: Sequence[str], sizes: Sequence[int]) -> None:
        """Record a chain batch (head first) as resident, most recent use now.

        The batch is recorded tail first, so its head ends up the most recent key. A key that is
        already resident is touched (and its size updated). Does not evict: call ``evict_for``
        before storing.
        """

    @abstractmethod
    def touch(self, keys: Sequence[str]) -> None:
        """Mark a chain (head first) as just used, tail first; keys not resident are ignored."""

    @abstractmethod
    def remove(self, key: str) -> bool:
        """Forget ``key``; return whether it was resident."""

    @abstractmethod
    def evict_for(self, nbytes: int) -> list[str]:
        """Drop least recent keys until ``used_bytes + nbytes <= capacity_bytes``; return them.

        Victims are returned least recent first and are no longer resident. Raises
        :class:`~hicache.errors.BackendCapacityError` (evicting nothing) when ``nbytes`` exceeds
        the whole capacity.
        """


class TailFirstLRU(CapacityPolicy):
    """Least-recently-used eviction with chains recorded tail first.

    An ``OrderedDict`` is a hash map threaded on a doubly linked list in C: membership, move to
    the most-recent end and pop from the least-recent end are all O(1) without Python-level node
    objects.
    """

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # least recent first
        self._used = 0

    @property
    def used_bytes(self) -> int:
        return self._used

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def missing(self, keys: Iterable[str]) -> list[str]:
        # docstring inherited
        return list(itertools.filterfalse(self._sizes.__contains__, keys))

    def add(self, keys: Sequence[str], sizes: Sequence[int]) -> None:
        # docstring inherited
        self._check_batch(keys, sizes)
        with self._lock:
            table = self._sizes
            for i in range(len(keys) - 1, -1, -1):
                key = keys[i]
                old = table.pop(key, None)
                if old is not None:
                    self._used -= old
                table[key] = sizes[i]
                self._used += sizes[i]

    def touch(self, keys: Sequence[str]) -> None:
        # docstring inherited
        with self._lock:
            move = self._sizes.move_to_end
            for key in reversed(keys):
                # One hash lookup, no context manager per key (suppress() costs ~3x here).
                try:  # noqa: SIM105
                    move(key)
                except KeyError:
                    pass

    def remove(self, key: str) -> bool:
        # docstring inherited
        with self._lock:
            size = self._sizes.pop(key, None)
            if size is None:
                return False
            self._used -= size
            return True

    def evict_for(self, nbytes: int) -> list[str]:
        # docstring inherited
        if nbytes > self._capacity:
            raise BackendCapacityError(
                f"cannot make room for {nbytes} bytes: capacity is {self._capacity} bytes"
            )
        victims: list[str] = []
        with self._lock:
            table = self._sizes
            while table and self._used + nbytes > self._capacity:
                key, size = table.popitem(last=False)
                self._used -= size
                victims.append(key)
        return victims

    def keys_by_recency(self) -> list[str]:
        """Snapshot of the resident keys, least recent first (for tests and tools)."""
        with self._lock:
            return list(self._sizes)

    def clear(self) -> None:
        """Forget every key."""
        with self._lock:
            self._sizes.clear()
            self._used = 0


class EvictionPolicy(enum.StrEnum):
    """Which :class:`CapacityPolicy` a tier runs (its ``options.eviction`` in YAML)."""

    #: :class:`TailFirstLRU`: least recently used first.
    LRU = "lru"
    #: :class:`~hicache.storage.reuse_policy.PredictedReuse` (classes by uses): least likely
    #: to be used again first, learned online per class (docs/cache-efficiency.md).
    PREDICTED_REUSE = "predicted_reuse"


#: What a tier runs when its options name no policy.
DEFAULT_EVICTION = EvictionPolicy.PREDICTED_REUSE


def make_capacity_policy(
    kind: EvictionPolicy, capacity_bytes: int, *, batch: int | None = None
) -> CapacityPolicy:
    """Build the policy ``kind`` for ``capacity_bytes``.

    ``batch``: the most pages the caller adds at once (a backend's ``max_batch``: a tier cuts
    a put into adds of that many pages). ``predicted_reuse`` then takes the last page of a
    shorter add for the tail of its chain (a prompt's last page, rarely reused); without it,
    it has no tail class.
    """
    if kind is EvictionPolicy.LRU:
        return TailFirstLRU(capacity_bytes)
    # Imported here: reuse_policy builds on this module's CapacityPolicy.
    from hicache.storage.reuse_policy import PredictedReuse

    # An add of ``batch`` pages may go on in the next add (the tier cut the put there): its
    # last page is no tail; taking it for one would evict it early and strand the next batch
    # (docs/cache-efficiency.md).
    if batch is None:
        return PredictedReuse(capacity_bytes, tail_class=False)
    return PredictedReuse(capacity_bytes, full_batch=batch)


class ClockSlots:
    """CLOCK (second chance) over ``num_slots`` fixed slots, with one hand per slot range.

    Made for set-associative stores (a memory mapping cut into sets of ``ways`` slots): a key's
    set is the range ``[start, end)`` it may live in, and ``choose(start, end)`` returns a free
    slot there or else the victim CLOCK picks among the range's unpinned slots. Each range keeps
    its own hand (stored at index ``start``), so ranges must not overlap unless they share their
    start.

    The caller owns the slot -> key map and serialises ``choose`` with its ``mark_used`` (or uses
    :meth:`claim`, which does both atomically). ``pin`` protects a used slot under I/O from being
    chosen as a victim (free slots are free whatever their pins); pins nest.
    """

    def __init__(self, num_slots: int) -> None:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self._n = num_slots
        self._lock = threading.Lock()
        # bytearrays keep one byte per slot and let ``find`` scan a range in C.
        self._used = bytearray(num_slots)
        self._ref = bytearray(num_slots)
        self._pins = array("I", bytes(4 * num_slots))
        self._hands = array("q", range(num_slots))
        self._num_used = 0

    @property
    def num_slots(self) -> int:
        """Total number of slots."""
        return self._n

    @property
    def num_used(self) -> int:
        """Number of slots marked used."""
        return self._num_used

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self._n:
            raise IndexError(f"slot {slot} out of range [0, {self._n})")

    def is_used(self, slot: int) -> bool:
        """True when ``slot`` holds a page."""
        self._check_slot(slot)
        return bool(self._used[slot])

    def mark_used(self, slot: int) -> None:
        """Record that ``slot`` now holds a page (referenced, so it gets a second chance)."""
        self._check_slot(slot)
        with self._lock:
            if not self._used[slot]:
                self._used[slot] = 1
                self._num_used += 1
            self._ref[slot] = 1

    def touch(self, slot: int) -> None:
        """Set the reference bit of a used slot (a read hit); free slots are ignored."""
        self._check_slot(slot)
        # A single byte store needs no lock: the worst race is a bit set just after the hand
        # cleared it, which CLOCK tolerates by design.
        if self._used[slot]:
            self._ref[slot] = 1

    def release(self, slot: int) -> None:
        """Mark ``slot`` free (its page was deleted or evicted)."""
        self._check_slot(slot)
        with self._lock:
            if self._used[slot]:
                self._used[slot] = 0
                self._num_used -= 1
            self._ref[slot] = 0

    def pin(self, slot: int) -> None:
        """Keep ``slot`` from being chosen as a victim until a matching ``unpin``."""
        self._check_slot(slot)
        with self._lock:
            self._pins[slot] += 1

    def unpin(self, slot: int) -> None:
        """Undo one ``pin``; raises ``ValueError`` if the slot is not pinned."""
        self._check_slot(slot)
        with self._lock:
            if self._pins[slot] == 0:
                raise ValueError(f"slot {slot} is not pinned")
            self._pins[slot] -= 1

    def choose(self, start: int, end: int) -> int:
        """Return a free slot in ``[start, end)``, else the CLOCK victim there (still marked used).

        Raises :class:`~hicache.errors.BackendCapacityError` when every used slot of the range is
        pinned.
        """
        with self._lock:
            return self._choose_locked(start, end)

    def claim(self, start: int, end: int) -> tuple[int, bool]:
        """Atomically ``choose`` and ``mark_used``; return ``(slot, was_used)``.

        ``was_used`` tells the caller it must evict the slot's previous page.
        """
        with self._lock:
            slot = self._choose_locked(start, end)
            was_used = bool(self._used[slot])
            if not was_used:
                self._used[slot] = 1
                self._num_used += 1
            self._ref[slot] = 1
            return slot, was_used

    def _choose_locked(self, start: int, end: int) -> int:
        if not 0 <= start < end <= self._n:
            raise IndexError(f"slot range [{start}, {end}) invalid for {self._n} slots")
        free = self._used.find(0, start, end)
        if free >= 0:
            return free
        hand = self._hands[start]
        if not start <= hand < end:
            hand = start
        ref, pins = self._ref, self._pins
        # Two sweeps suffice: the first clears every reference bit it passes.
        for _ in range(2 * (end - start)):
            slot = hand
            hand = hand + 1 if hand + 1 < end else start
            if pins[slot]:
                continue
            if ref[slot]:
                ref[slot] = 0
                continue
            self._hands[start] = hand
            return slot
        self._hands[start] = hand
        raise BackendCapacityError(f"every slot of [{start}, {end}) is pinned by I/O in flight")
