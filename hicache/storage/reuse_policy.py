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
Evicting moves neither the clock nor the estimates, so the chosen class keeps its value until
its next key falls in another idle-time bucket: its keys up to there (and, on a tie, before the
next class's head) go as one run, with C-level bulk calls rather than a comparison per victim.

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

import bisect
import functools
import itertools
import operator
import threading
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable, Sequence
from typing import cast

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
#: A key's code is its stamp shifted left by CLASS_BITS, or'd with its class: one int per key.
CLASS_BITS = 3
CLASS_MASK = (1 << CLASS_BITS) - 1
assert NUM_CLASSES <= CLASS_MASK + 1, "a class must fit in CLASS_BITS"


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
        # resident key -> its code: the stamp of its last use (every use gets its own) and its
        # class (see CLASS_BITS); one dict read and one write per use
        self._code: dict[Hashable, int] = {}
        # per class: its keys -> their sizes, least recent first (the sizes live here, not in
        # a dict of their own: one hash table fewer to update per key)
        self._queues: list[OrderedDict[Hashable, int]] = [OrderedDict() for _ in range(NUM_CLASSES)]
        # evicted key -> its code when evicted; least recently evicted first
        self._ghost: OrderedDict[Hashable, int] = OrderedDict()
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
        return key in self._code

    def __len__(self) -> int:
        return len(self._code)

    def missing(self, keys: Iterable[Hashable]) -> list[Hashable]:  # type: ignore[override]
        # docstring inherited
        return list(itertools.filterfalse(self._code.__contains__, keys))

    def add(self, keys: Sequence[Hashable], sizes: Sequence[int]) -> None:
        # docstring inherited
        self._check_batch(keys, sizes)
        n = len(keys)
        with self._lock:
            tail = self._tail_class and (self._full_batch is None or n < self._full_batch)
            code_of = self._code
            if (
                n
                and not any(map(code_of.__contains__, keys))
                and self._ghost.keys().isdisjoint(keys)
                and len(set(keys)) == n
            ):
                self._add_fresh(keys, sizes, tail)
            else:
                last = n - 1 if tail else -1
                for i in range(n - 1, -1, -1):
                    self._use(keys[i], sizes[i], 1 if i == last else 0)
            self._after_entries()

    def touch(self, keys: Sequence[Hashable]) -> None:
        # docstring inherited
        # The hot path (every read hit). Keys of a chain that are used together share their
        # history, so a chain is mostly a few runs of keys of one class: each run is moved
        # with C-level bulk calls (map, update, extend), not a Python loop per key, with the
        # effect of touching its keys one by one, tail first.
        n = len(keys)
        if n == 1:
            with self._lock:
                code = self._code.get(keys[0])
                if code is not None:
                    self._touch_one(keys[0], code)
            return
        if n == 0:
            return
        with self._lock:
            found = list(map(self._code.get, keys))
            if len(set(keys)) != n or None in found:
                # a key twice in one call (its second use must see the first's class), or
                # keys not resident: one by one
                for key in reversed(keys):
                    code = self._code.get(key)
                    if code is not None:
                        self._touch_one(key, code)
            else:
                codes = cast("list[int]", found)  # every key resident
                classes = list(map(operator.and_, codes, itertools.repeat(CLASS_MASK)))
                if classes.count(classes[0]) == n:
                    self._touch_run(keys[::-1], codes[::-1], classes[0])
                else:
                    end = n
                    for cls, run in itertools.groupby(reversed(classes)):
                        m = len(list(run))
                        start = end - m
                        self._touch_run(keys[start:end][::-1], codes[start:end][::-1], cls)
                        end = start

    def remove(self, key: Hashable) -> bool:
        # docstring inherited
        with self._lock:
            code = self._code.pop(key, None)
            if code is None:
                return False
            self._used -= self._queues[code & CLASS_MASK].pop(key)
            return True

    def evict_for(self, nbytes: int) -> list[str]:
        # docstring inherited
        if nbytes > self._capacity:
            raise BackendCapacityError(
                f"cannot make room for {nbytes} bytes: capacity is {self._capacity} bytes"
            )
        with self._lock:
            need = self._used + nbytes - self._capacity
            if need <= 0:
                return []
            return self._evict(need)  # type: ignore[return-value]

    # ------------------------------------------------------------------ tools

    def keys_by_eviction_order(self) -> list[Hashable]:
        """Snapshot of the resident keys in the order eviction would take them now."""
        with self._lock:
            saved = (
                dict(self._code),
                [OrderedDict(q) for q in self._queues],
                OrderedDict(self._ghost),
                self._used,
            )
            # more than every resident size together: eviction takes every key
            order = self._evict(self._used + 1)
            (
                self._code,
                self._queues,
                self._ghost,
                self._used,
            ) = saved
            return order

    def eviction_value(self, key: Hashable) -> tuple[float, int]:
        """What eviction compares for a resident ``key``: (the estimated probability that it is
        used again, its stamp); the smallest goes first. ``KeyError`` if not resident."""
        with self._lock:
            code = self._code[key]
            stamp = code >> CLASS_BITS
            return self._value(code & CLASS_MASK, stamp), stamp

    def reuse_estimates(self) -> list[float]:
        """The learned share of keys used again, per class (uses x tail flag), for reports."""
        with self._lock:
            entered = self._entries()
            return [self._reused(cls) / entered[cls] for cls in range(NUM_CLASSES)]

    def clear(self) -> None:
        """Forget every key (the learned estimates stay)."""
        with self._lock:
            self._code.clear()
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
        code = self._code.get(key)
        if code is not None:
            old = code & CLASS_MASK
            self._used -= self._queues[old].pop(key)
        else:
            # a ghost's code is the one it had when it was evicted
            code = self._ghost.pop(key, None)
            self._since_refresh += 1
            if code is None:
                self._fresh[tail] += 1.0
                self._code[key] = clock << CLASS_BITS | tail
                self._queues[tail][key] = size
                self._used += size
                return
            old = code & CLASS_MASK
        self._idle[old * NUM_BUCKETS + (clock - (code >> CLASS_BITS)).bit_length()] += 1.0
        cls = _NEXT_CLASS[old]
        self._code[key] = clock << CLASS_BITS | cls
        self._queues[cls][key] = size
        self._used += size

    def _add_fresh(self, keys: Sequence[Hashable], sizes: Sequence[int], tail: bool) -> None:
        """``_use`` of distinct keys neither resident nor ghosts, tail first, in C-level bulk
        calls (most puts store only new pages)."""
        n = len(keys)
        first = self._clock + 1
        self._clock += n
        self._since_refresh += n
        by_age = keys[::-1]  # the tail first: it gets the oldest stamp
        sizes_by_age = sizes[::-1]
        # every key in class 0 but, with a tail class, the tail (the oldest stamp) in class 1
        self._code.update(
            zip(
                by_age,
                range(first << CLASS_BITS, (first + n) << CLASS_BITS, 1 << CLASS_BITS),
                strict=True,
            )
        )
        self._used += sum(sizes)
        if tail:
            self._code[by_age[0]] = first << CLASS_BITS | 1
            self._queues[1][by_age[0]] = sizes_by_age[0]
            self._fresh[1] += 1.0
            by_age, sizes_by_age = by_age[1:], sizes_by_age[1:]
        deque(map(self._queues[0].__setitem__, by_age, sizes_by_age), 0)
        # one float addition per key, as ``_use`` makes them: a sum rounded once could differ
        # in its last bit and, through the estimates, change a decision
        self._fresh[0] = functools.reduce(
            operator.add, itertools.repeat(1.0, len(by_age)), self._fresh[0]
        )

    def _touch_one(self, key: Hashable, code: int) -> None:
        """Use the resident ``key`` whose code is ``code``."""
        self._clock = clock = self._clock + 1
        stamp, cls = code >> CLASS_BITS, code & CLASS_MASK
        self._idle[cls * NUM_BUCKETS + (clock - stamp).bit_length()] += 1.0
        new = _NEXT_CLASS[cls]
        self._code[key] = clock << CLASS_BITS | new
        if new == cls:
            self._queues[cls].move_to_end(key)
        else:
            self._queues[new][key] = self._queues[cls].pop(key)

    def _touch_run(self, keys: Sequence[Hashable], codes: Sequence[int], cls: int) -> None:
        """Use resident ``keys`` (tail first, their ``codes``), all of class ``cls``, one after
        another."""
        m = len(keys)
        first = self._clock + 1
        self._clock += m
        base = cls * NUM_BUCKETS
        idle = self._idle
        # key j (from 0) gets stamp first + j: its idle time lies between these two bounds.
        # Keys used together before have consecutive stamps, so the bounds are close and
        # usually in one bucket: then so is every key's, counted at once.
        lo = (first - (max(codes) >> CLASS_BITS)).bit_length()
        hi = (self._clock - (min(codes) >> CLASS_BITS)).bit_length()
        if lo == hi:
            idle[base + lo] += m
        else:
            # count the keys per bucket from their sorted idle times, shifted as the codes are
            # ((idle << CLASS_BITS) - cls, so computed in C from the codes): bucket b holds the
            # idle times of bit length b
            step = 1 << CLASS_BITS
            scaled = sorted(
                map(
                    operator.sub, range(first << CLASS_BITS, (first + m) << CLASS_BITS, step), codes
                )
            )
            below = 0
            for b in range(lo, hi):
                upto = bisect.bisect_left(scaled, (1 << (b + CLASS_BITS)) - cls)
                idle[base + b] += upto - below
                below = upto
            idle[base + hi] += m - below
        self._requeue_run(keys, first, cls)

    def _requeue_run(self, keys: Sequence[Hashable], first: int, cls: int) -> None:
        """Give ``keys`` (of class ``cls``) the stamps ``first``, ``first + 1``, ... and the
        class of one more use, at the ends of its queue."""
        new = _NEXT_CLASS[cls]
        step = 1 << CLASS_BITS
        self._code.update(
            zip(
                keys,
                range(first << CLASS_BITS | new, (first + len(keys)) << CLASS_BITS, step),
                strict=True,
            )
        )
        queue = self._queues[cls]
        # moved in C, one call per key (a deque of length 0 runs the map to its end)
        if new == cls:
            deque(map(queue.move_to_end, keys), 0)
        else:
            deque(map(self._queues[new].__setitem__, keys, map(queue.pop, keys)), 0)

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
        n = len(self._code)
        if n > self._peak:
            self._peak = n
        ghost = self._ghost
        excess = len(ghost) - GHOST_FACTOR * self._peak
        if excess > 0:  # the least recently evicted go
            deque(map(ghost.popitem, itertools.repeat(False, excess)), 0)
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

    def _evict(self, need: int) -> list[Hashable]:
        """Evict keys, least likely to be used again first, until their sizes reach ``need``
        (> 0) or none is left; return them in that order.

        The victim is always the class head of least ``(value, stamp)`` (within a class the
        least recent key, see the module docstring). Evicting changes neither the clock nor
        the estimates, so a class's value changes only where its keys' idle-time bucket does:
        the keys of the best class before the next bucket boundary, and before the second
        class's head, go in a run, moved with C-level bulk calls, not one head scan per key.
        """
        clock = self._clock
        keep = self._keep
        code_of = self._code
        queues = self._queues
        ghost = self._ghost
        victims: list[Hashable] = []
        # (value, stamp, class) of every class's head: only the evicted class's changes
        heads = []
        for cls, queue in enumerate(queues):
            if queue:
                stamp = code_of[next(iter(queue))] >> CLASS_BITS
                heads.append((keep[cls][(clock - stamp).bit_length()], stamp, cls))
        while heads:
            heads.sort()
            value, stamp, cls = heads[0]
            # the last stamp of the head's bucket (its keys share the head's value) ...
            bucket = (clock - stamp).bit_length()
            limit = clock - (1 << (bucket - 1)) if bucket else clock
            # ... and, on a tie of values, below the next best class's head
            if len(heads) > 1 and heads[1][0] == value:
                limit = min(limit, heads[1][1] - 1)
            last_code = limit << CLASS_BITS | CLASS_MASK
            queue = queues[cls]
            head_size = queue[next(iter(queue))]
            while True:
                # as many keys as the bytes still needed take if sized as the head (all are, in
                # the tiers): usually the whole chunk goes
                chunk = list(itertools.islice(queue, -(-need // head_size) if head_size else 16))
                codes = list(map(code_of.__getitem__, chunk))
                run = bisect.bisect_right(codes, last_code)  # a queue's codes ascend
                freed = list(itertools.accumulate(map(queue.__getitem__, chunk[:run])))
                done = bisect.bisect_left(freed, need)
                taken = done + 1 if done < run else run
                gone = chunk[:taken] if taken < len(chunk) else chunk
                deque(map(queue.__delitem__, gone), 0)
                deque(map(code_of.__delitem__, gone), 0)
                ghost.update(zip(gone, codes, strict=False))  # codes of the chunk
                victims += gone
                if taken:
                    self._used -= freed[taken - 1]
                    need -= freed[taken - 1]
                if need <= 0:
                    return victims
                if taken < len(chunk) or not queue:
                    break  # the run ended (or the class emptied) before the bytes were found
                head_size = queue[next(iter(queue))]
            if queue:
                stamp = code_of[next(iter(queue))] >> CLASS_BITS
                heads[0] = (keep[cls][(clock - stamp).bit_length()], stamp, cls)
            else:
                del heads[0]
        return victims
