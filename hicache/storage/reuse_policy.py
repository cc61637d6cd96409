"""``PredictedReuse``: evict the stored page least likely to be read again, learned online.

Why not plain LRU: on conversation traffic most stored pages are never read again (a
conversation that does not come back, the partial last page of a prompt), and recency alone
cannot tell them from the pages of a conversation that will. Whether a page is read again
depends strongly on what is already known about it:

- how many times it was used before (a page used once, twice, three times or more is more and
  more likely to be used again: a document reread across turns, a shared system prompt), and
- whether it was the last page of the batch that stored it (a prompt's tail, rarely reused:
  the next turn extends the prompt, so its last page differs). Only for callers that store
  whole chains (``tail_class=True``, the study's default): the tiers split puts into batches,
  so they run without it (:func:`~hicache.storage.eviction.make_capacity_policy`).

So every resident key is in one of a few *classes* (uses so far x tail flag), each a tail-first
LRU queue. For each class the policy learns, from the requests it sees, the share of its keys
used again and the distribution of the idle time before that reuse (a histogram in octaves of
the policy's own clock, which counts key uses, not seconds: nothing is tied to a trace's
timestamps or key values). The probability that a key idle for ``a`` is still used again is
``p S(a) / (1 - p + p S(a))`` (``p`` the class's reuse share, ``S`` the survival of its reuse
idle times): it falls with idle time, so within a class the least recent key is the least
likely, and eviction compares only the least recent key of each class (O(classes) per victim).
Ties (before anything is learned) go to the least recent key: the policy starts as LRU.

Keys dropped by eviction are remembered (keys only, a bounded FIFO "ghost" of a few times the
resident count), so a page stored again after its eviction keeps its use count and its reuse
is learned even when the tier was too small to keep it.

Chains stay prefix-closed as with :class:`~hicache.storage.eviction.TailFirstLRU` (when adds
and touches are whole chain prefixes): a key is used at least as often as its suffixes, is more
recent than them, and is never the tail of a batch its suffixes are in; the estimates are kept
non-decreasing in uses (and a tail's at most its batch's other new keys'), and within a class
the older key goes first, so a suffix always goes before its head.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence

from hicache.errors import BackendCapacityError
from hicache.storage.eviction import CapacityPolicy

__all__ = ["PredictedReuse"]

#: Uses counted per key before they saturate.
MAX_USES = 3
#: Classes: 0 = never used again, not a batch's tail; 1 = never used again, a batch's tail;
#: 1 + u = used again u times (1 <= u <= MAX_USES; a key used again is no longer "a tail").
NUM_CLASSES = MAX_USES + 2
#: The classes in the order their keep probabilities are made non-decreasing (see _refresh).
_BY_USES = (0, *range(2, NUM_CLASSES))
#: Idle-time histogram buckets: one per power of two of the key clock.
NUM_BUCKETS = 64
#: Ghost keys kept per resident key (at its peak count).
GHOST_FACTOR = 4
#: Weight kept by old observations at each refresh, so the estimates follow a drifting workload.
DECAY = 0.95
#: Refresh the per-class tables after this share of the peak resident count entered (at least
#: MIN_PERIOD keys): often enough to adapt, rare enough to cost nothing per key.
PERIOD_SHARE = 4
MIN_PERIOD = 256


def _uses(cls: int) -> int:
    return 0 if cls < 2 else cls - 1


#: The class of a key after one more use.
_NEXT_CLASS = tuple(min(MAX_USES, _uses(c) + 1) + 1 for c in range(NUM_CLASSES))


class PredictedReuse(CapacityPolicy):
    """Capacity policy evicting the key least likely to be used again (see module docstring).

    Keys are any hashable values (the cache and backends use page key strings; the replay's
    simulation uses trace block ids), so the simulation runs this very class.
    """

    def __init__(
        self,
        capacity_bytes: int,
        *,
        tail_class: bool = True,
        full_batch: int | None = None,
        min_period: int = MIN_PERIOD,
    ) -> None:
        super().__init__(capacity_bytes)
        if min_period <= 0:
            raise ValueError(f"min_period must be positive, got {min_period}")
        if full_batch is not None and full_batch <= 0:
            raise ValueError(f"full_batch must be positive, got {full_batch}")
        # A caller that cuts a chain into adds of at most ``full_batch`` keys (a tier's
        # max_batch): an add that long may go on in the next one, so its last key is no tail.
        self._full_batch = full_batch
        # keys entering between two refreshes of the estimates, at least (tests use few)
        self._min_period = min_period
        # False: classes by uses only (the study's ablation of the tail flag)
        self._tail_class = tail_class
        self._lock = threading.Lock()
        self._class: dict[Hashable, int] = {}
        self._sizes: dict[Hashable, int] = {}
        # per class: key -> stamp of its last use, least recent first
        self._queues: list[OrderedDict[Hashable, int]] = [OrderedDict() for _ in range(NUM_CLASSES)]
        # evicted key -> (class it left, stamp of its last use); least recently evicted first
        self._ghost: OrderedDict[Hashable, tuple[int, int]] = OrderedDict()
        self._used = 0
        self._clock = 0
        self._peak = 0
        self._since_refresh = 0
        # keys that entered class 0 / 1 as new keys (the other classes' entries are reuses)
        self._fresh = [1.0, 1.0]
        # idle time before each reuse, per class: row ``cls`` is [cls * NUM_BUCKETS, ...)
        self._idle = [0.0] * (NUM_CLASSES * NUM_BUCKETS)
        self._keep = [[0.5] * NUM_BUCKETS for _ in range(NUM_CLASSES)]

    # ------------------------------------------------------------------ CapacityPolicy

    @property
    def used_bytes(self) -> int:
        return self._used

    def __contains__(self, key: object) -> bool:
        return key in self._class

    def __len__(self) -> int:
        return len(self._class)

    def add(self, keys: Sequence[Hashable], sizes: Sequence[int]) -> None:
        # docstring inherited
        self._check_batch(keys, sizes)
        with self._lock:
            tail = self._tail_class and (self._full_batch is None or len(keys) < self._full_batch)
            last = len(keys) - 1 if tail else -1
            for i in range(len(keys) - 1, -1, -1):
                self._use(keys[i], sizes[i], 1 if i == last else 0)
            self._after_entries()

    def touch(self, keys: Sequence[Hashable]) -> None:
        # docstring inherited
        # The hot path (every read hit): _use's resident branch inlined, locals bound once; the
        # keys entering each class are counted from the reuse histograms (see _entries).
        with self._lock:
            class_of, queues, nxt, idle = self._class, self._queues, _NEXT_CLASS, self._idle
            clock = self._clock
            for i in range(len(keys) - 1, -1, -1):
                key = keys[i]
                cls = class_of.get(key)
                if cls is None:
                    continue
                clock += 1
                # bit_length < NUM_BUCKETS for any clock below 2**63
                idle[cls * NUM_BUCKETS + (clock - queues[cls].pop(key)).bit_length()] += 1.0
                new = nxt[cls]
                queues[new][key] = clock
                if new != cls:
                    class_of[key] = new
            self._clock = clock

    def remove(self, key: Hashable) -> bool:
        # docstring inherited
        with self._lock:
            cls = self._class.pop(key, None)
            if cls is None:
                return False
            del self._queues[cls][key]
            self._used -= self._sizes.pop(key)
            return True

    def evict_for(self, nbytes: int) -> list[str]:
        # docstring inherited
        if nbytes > self._capacity:
            raise BackendCapacityError(
                f"cannot make room for {nbytes} bytes: capacity is {self._capacity} bytes"
            )
        victims: list[str] = []
        with self._lock:
            while self._class and self._used + nbytes > self._capacity:
                victims.append(self._evict_one())  # type: ignore[arg-type]
        return victims

    # ------------------------------------------------------------------ tools

    def keys_by_eviction_order(self) -> list[Hashable]:
        """Snapshot of the resident keys in the order eviction would take them now."""
        with self._lock:
            saved = (
                dict(self._class),
                dict(self._sizes),
                [OrderedDict(q) for q in self._queues],
                OrderedDict(self._ghost),
                self._used,
            )
            order = []
            while self._class:
                order.append(self._evict_one())
            self._class, self._sizes, self._queues, self._ghost, self._used = saved
            return order

    def eviction_value(self, key: Hashable) -> tuple[float, int]:
        """What eviction compares for a resident ``key``: (the estimated probability that it is
        used again, its stamp); the smallest goes first. ``KeyError`` if not resident."""
        with self._lock:
            cls = self._class[key]
            stamp = self._queues[cls][key]
            return self._value(cls, stamp), stamp

    def reuse_estimates(self) -> list[float]:
        """The learned share of keys used again, per class (uses x tail flag), for reports."""
        with self._lock:
            entered = self._entries()
            return [self._reused(cls) / entered[cls] for cls in range(NUM_CLASSES)]

    def clear(self) -> None:
        """Forget every key (the learned estimates stay)."""
        with self._lock:
            self._class.clear()
            self._sizes.clear()
            for q in self._queues:
                q.clear()
            self._ghost.clear()
            self._used = 0

    # ------------------------------------------------------------------ internals (locked)

    def _use(self, key: Hashable, size: int, tail: int) -> None:
        """Record a use of ``key`` (resident, ghost or new) as its class's most recent key."""
        # The clock counts key uses: every key gets its own stamp, so within a batch recorded
        # tail first the tail is the oldest, and equal estimates evict it first.
        self._clock = clock = self._clock + 1
        old = self._class.get(key)
        if old is not None:
            stamp = self._queues[old].pop(key)
            self._used -= self._sizes[key]
            self._idle[old * NUM_BUCKETS + (clock - stamp).bit_length()] += 1.0
            cls = _NEXT_CLASS[old]
        else:
            gone = self._ghost.pop(key, None)
            if gone is not None:
                old, stamp = gone
                self._idle[old * NUM_BUCKETS + (clock - stamp).bit_length()] += 1.0
                cls = _NEXT_CLASS[old]
            else:
                cls = tail
                self._fresh[tail] += 1.0
            self._since_refresh += 1
        self._class[key] = cls
        self._sizes[key] = size
        self._queues[cls][key] = clock
        self._used += size

    def _reused(self, cls: int) -> float:
        # every reuse adds one to its class's idle histogram; 0.5 is the prior's
        return 0.5 + sum(self._idle[cls * NUM_BUCKETS : (cls + 1) * NUM_BUCKETS])

    def _entries(self) -> list[float]:
        """Keys that entered each class: new keys, or reuses of the class below (or itself)."""
        reused = [self._reused(cls) - 0.5 for cls in range(NUM_CLASSES)]
        entered = [*self._fresh, *([0.0] * (NUM_CLASSES - 2))]
        for cls in range(NUM_CLASSES):
            entered[_NEXT_CLASS[cls]] += reused[cls]
        return [max(1.0, e) for e in entered]

    def _after_entries(self) -> None:
        n = len(self._class)
        if n > self._peak:
            self._peak = n
        ghost = self._ghost
        limit = GHOST_FACTOR * self._peak
        while len(ghost) > limit:
            ghost.popitem(last=False)
        if self._since_refresh >= max(self._min_period, self._peak // PERIOD_SHARE):
            self._since_refresh = 0
            self._refresh()

    def _refresh(self) -> None:
        """Recompute P(used again | class, idle bucket) and age the observations."""
        entered = self._entries()
        for cls in range(NUM_CLASSES):
            share = min(1.0, self._reused(cls) / entered[cls])
            base = cls * NUM_BUCKETS
            hist = self._idle[base : base + NUM_BUCKETS]
            total = sum(hist)
            above = total
            row = self._keep[cls]
            for b in range(NUM_BUCKETS):
                survive = above / total if total > 0 else 1.0
                above -= hist[b]
                still = share * survive
                denom = 1.0 - share + still
                row[b] = still / denom if denom > 0 else 1.0
                self._idle[base + b] = hist[b] * DECAY
        self._fresh = [f * DECAY for f in self._fresh]
        # A key is used at least as often as its suffixes and is at most as idle: keeping the
        # probabilities non-decreasing in uses makes eviction take suffixes before their heads
        # (chains stay prefix-closed), whatever the estimates' noise.
        # A batch's tail (class 1) is the suffix of the batch's other new keys (class 0): it may
        # not be more likely than them.
        keep = self._keep
        for lower, upper in itertools.pairwise(_BY_USES):
            keep[upper] = [max(a, b) for a, b in zip(keep[lower], keep[upper], strict=True)]
        keep[1] = [min(a, b) for a, b in zip(keep[0], keep[1], strict=True)]

    def _value(self, cls: int, stamp: int) -> float:
        return self._keep[cls][(self._clock - stamp).bit_length()]

    def _evict_one(self) -> Hashable:
        clock = self._clock
        keep = self._keep
        best_cls = -1
        best = (2.0, 0)
        for cls, queue in enumerate(self._queues):
            if not queue:
                continue
            stamp = queue[next(iter(queue))]
            value = (keep[cls][(clock - stamp).bit_length()], stamp)
            if value < best:
                best, best_cls = value, cls
        key, stamp = self._queues[best_cls].popitem(last=False)
        del self._class[key]
        self._used -= self._sizes.pop(key)
        self._ghost[key] = (best_cls, stamp)
        return key
