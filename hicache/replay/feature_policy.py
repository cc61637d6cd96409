"""``FeatureReuse``: ``PredictedReuse``'s estimator over finer classes, for the policy study.

Research only (docs/cache-efficiency.md, "Online features"): no tier runs it. It learns the
same per-class share of reuse and idle-time survival as
:class:`~hicache.storage.reuse_policy.PredictedReuse` and evicts by the same value, with a key
loop in Python (no bulk touches, no locks), but its classes can be split by more of what a
policy sees when a key is added or touched:

- ``depth``: a new key's position in its put (counted on across puts of ``full_batch`` keys,
  which the tier cut from one), split at the given thresholds;
- ``batch_len``: the number of keys in the put that added it, split at the given thresholds;
- ``follows_hit``: whether a touch of a resident key came since the previous add (a put that
  follows a read hit: the request extended a conversation this cache held), as a tier that
  publishes in request order would see it;
- ``gap_groups``: a key used again is classed by the idle time it had (2: at most the median
  octave of its uses level or above it; 3: below, at, above), the median learned online;
- ``max_uses``: the uses counted before they saturate;
- ``density``: evict by hits per unit of remaining time (hits above the idle time over the
  remaining idle time of the keys that were reused or evicted above it) instead of by the
  probability of reuse;
- ``admit``: refuse a new key whose class's value, times ``admit``, is below every queue head's
  (a learned admission threshold; the key is remembered as evicted, so its reuse is learned);
- ``sub_octave_bits``, ``decay``: finer idle-time buckets, another ageing of the estimates.

Default arguments give exactly ``PredictedReuse``'s evictions (tested). ``frozen``: use these
tables of values instead of learning (the study's offline-fitted bound).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

from hicache.errors import BackendCapacityError
from hicache.storage.eviction import CapacityPolicy
from hicache.storage.reuse_policy import DECAY, GHOST_FACTOR, MIN_PERIOD, PERIOD_SHARE

__all__ = ["FeatureReuse"]

#: A split class with fewer entries than this is left out of the monotone fixes (its prior
#: would flatten the others).
MIN_ENTRIES = 50


class FeatureReuse(CapacityPolicy):
    """Predicted reuse over classes split by more features (see module docstring)."""

    def __init__(
        self,
        capacity: int,
        *,
        full_batch: int | None = None,
        tail_class: bool = True,
        depth: Sequence[int] = (),
        batch_len: Sequence[int] = (),
        follows_hit: bool = False,
        gap_groups: int = 0,
        max_uses: int = 3,
        density: bool = False,
        admit: float = 0.0,
        sub_octave_bits: int = 0,
        decay: float = DECAY,
        frozen: list[list[float]] | None = None,
    ) -> None:
        super().__init__(capacity)
        self._full_batch = full_batch
        self._tail = tail_class
        self._depth = list(depth)
        self._batch_len = list(batch_len)
        self._gap_groups = gap_groups
        self._max_uses = max_uses
        self._density = density
        self._admit = admit
        self._sub = sub_octave_bits
        self._decay = decay
        self._frozen = frozen
        # a resident key was touched since the last add (``follows_hit``)
        self._hit_since_add = False
        flags = 2 if follows_hit else 1
        self._follows = follows_hit
        self._new_ids: dict[tuple[int, int, int], int] = {}
        self._tail_ids: dict[int, int] = {}
        self._used_ids: dict[tuple[int, int], int] = {}
        uses_of: list[int] = []
        for flag in range(flags):
            for d in range(len(self._depth) + 1):
                for n in range(len(self._batch_len) + 1):
                    self._new_ids[(flag, d, n)] = len(uses_of)
                    uses_of.append(0)
        for flag in range(flags):
            self._tail_ids[flag] = len(uses_of)
            uses_of.append(-1)
        for u in range(1, max_uses + 1):
            for g in range(max(1, gap_groups)):
                self._used_ids[(u, g)] = len(uses_of)
                uses_of.append(u)
        self._uses_of = uses_of  # -1 for a tail class
        k = len(uses_of)
        nb = 64 << sub_octave_bits
        self._nb = nb
        # resident key -> [stamp, class, uses]
        self._state: dict[Hashable, list[int]] = {}
        self._queues: list[OrderedDict[Hashable, None]] = [OrderedDict() for _ in range(k)]
        self._ghost: OrderedDict[Hashable, list[int]] = OrderedDict()
        self._used = 0
        self._clock = 0
        self._peak = 0
        self._since = 0
        self._offset = 0
        self._entered = [1.0 if u <= 0 else 0.0 for u in uses_of]
        self._hits = [[0.0] * nb for _ in range(k)]
        self._evicted = [[0.0] * nb for _ in range(k)]
        self._keep = (
            [list(r) for r in frozen] if frozen is not None else [[0.5] * nb for _ in range(k)]
        )
        self._gap_hist = [[0.0] * nb for _ in range(max_uses + 1)]
        self._gap_median = [nb] * (max_uses + 1)

    # ------------------------------------------------------------------ CapacityPolicy

    @property
    def used_bytes(self) -> int:
        return self._used

    def __contains__(self, key: object) -> bool:
        return key in self._state

    def __len__(self) -> int:
        return len(self._state)

    def add(self, keys: Sequence[Hashable], sizes: Sequence[int]) -> None:
        # docstring inherited; sizes count as one each (the study counts pages)
        self._check_batch(keys, sizes)
        n = len(keys)
        tail = self._tail and (self._full_batch is None or n < self._full_batch)
        offset = self._offset
        full = self._full_batch is not None and n >= self._full_batch
        self._offset = offset + n if full else 0
        flag = 1 if self._follows and self._hit_since_add else 0
        self._hit_since_add = False
        length = sum(n >= t for t in self._batch_len)
        for i in range(n - 1, -1, -1):
            if tail and i == n - 1:
                cls = self._tail_ids[flag]
            else:
                depth = sum(i + offset >= t for t in self._depth)
                cls = self._new_ids[(flag, depth, length)]
            self._use(keys[i], cls)
        self._after_entries()

    def touch(self, keys: Sequence[Hashable]) -> None:
        # docstring inherited
        for key in reversed(keys):
            if key in self._state:
                self._hit_since_add = True
                self._use(key, -1)

    def remove(self, key: Hashable) -> bool:
        # docstring inherited
        state = self._state.pop(key, None)
        if state is None:
            return False
        del self._queues[state[1]][key]
        self._used -= 1
        return True

    def evict_for(self, nbytes: int) -> list[str]:
        # docstring inherited
        if nbytes > self._capacity:
            raise BackendCapacityError(f"cannot make room for {nbytes}: capacity {self._capacity}")
        victims: list[str] = []
        while self._state and self._used + nbytes > self._capacity:
            victims.append(self._evict_one())  # type: ignore[arg-type]
        return victims

    def keep_tables(self) -> list[list[float]]:
        """The current value tables (per class, per idle bucket), refreshed first."""
        self._refresh(force=True)
        return [list(row) for row in self._keep]

    # ------------------------------------------------------------------ internals

    def _bucket(self, idle: int) -> int:
        n = idle.bit_length()
        if self._sub == 0 or n <= self._sub:
            return n if self._sub == 0 else idle
        # the top sub + 1 bits: 2 ** sub buckets per octave, increasing with idle
        return (n - self._sub - 1) * (1 << self._sub) + (idle >> (n - self._sub - 1))

    def _gap_group(self, uses: int, gap: int) -> int:
        if self._gap_groups <= 1:
            return 0
        octave, median = self._bucket(gap), self._gap_median[uses]
        if self._gap_groups == 2:
            return 0 if octave <= median else 1
        return 0 if octave < median else (1 if octave == median else 2)

    def _use(self, key: Hashable, new_cls: int) -> None:
        """Use ``key``: a new key enters ``new_cls``; a known one moves to its uses' class."""
        self._clock = clock = self._clock + 1
        state = self._state.get(key)
        if state is None:
            state = self._ghost.pop(key, None)
            self._since += 1
            self._used += 1
            if state is None:
                if self._admit and self._refused(new_cls):
                    self._used -= 1
                    self._entered[new_cls] += 1.0
                    self._ghost[key] = [clock, new_cls, 0]
                    return
                self._state[key] = [clock, new_cls, 0]
                self._queues[new_cls][key] = None
                self._entered[new_cls] += 1.0
                return
            self._state[key] = state
        else:
            del self._queues[state[1]][key]
        gap = clock - state[0]
        self._hits[state[1]][self._bucket(gap)] += 1.0
        uses = min(self._max_uses, state[2] + 1)
        self._gap_hist[uses][self._bucket(gap)] += 1.0
        cls = self._used_ids[(uses, self._gap_group(uses, gap))]
        self._entered[cls] += 1.0
        state[0], state[1], state[2] = clock, cls, uses
        self._queues[cls][key] = None

    def _head_value(self, cls: int) -> tuple[float, int]:
        stamp = self._state[next(iter(self._queues[cls]))][0]
        return self._keep[cls][self._bucket(self._clock - stamp)], stamp

    def _refused(self, cls: int) -> bool:
        if self._used < self._capacity:
            return False
        lowest = min((self._head_value(c)[0] for c, q in enumerate(self._queues) if q), default=2)
        return self._keep[cls][1] * self._admit < lowest

    def _evict_one(self) -> Hashable:
        best_cls = min(
            (c for c, q in enumerate(self._queues) if q), key=lambda c: self._head_value(c)
        )
        key = self._queues[best_cls].popitem(last=False)[0]
        state = self._state.pop(key)
        self._used -= 1
        self._evicted[best_cls][self._bucket(self._clock - state[0])] += 1.0
        self._ghost[key] = state
        return key

    def _after_entries(self) -> None:
        self._peak = max(self._peak, len(self._state))
        while len(self._ghost) > GHOST_FACTOR * self._peak:
            self._ghost.popitem(last=False)
        if self._since >= max(MIN_PERIOD, self._peak // PERIOD_SHARE):
            self._refresh()

    def _refresh(self, force: bool = False) -> None:
        self._since = 0
        if self._frozen is not None and not force:
            return
        decay = self._decay
        for uses, hist in enumerate(self._gap_hist):
            total, acc = sum(hist), 0.0
            for b, count in enumerate(hist):
                acc += count
                if total > 0 and acc >= total / 2:
                    self._gap_median[uses] = b
                    break
            self._gap_hist[uses] = [x * decay for x in hist]
        for cls, hist in enumerate(self._hits):
            row = self._density_row(cls) if self._density else self._probability_row(cls)
            self._keep[cls] = row
            self._hits[cls] = [x * decay for x in hist]
            self._evicted[cls] = [x * decay for x in self._evicted[cls]]
        self._entered = [x * decay for x in self._entered]
        self._make_monotone()

    def _probability_row(self, cls: int) -> list[float]:
        """P(used again | idle bucket): ``p S(a) / (1 - p + p S(a))`` as in PredictedReuse."""
        hist = self._hits[cls]
        total = sum(hist)
        share = min(1.0, (0.5 + total) / max(1.0, self._entered[cls]))
        above = total
        row = []
        for count in hist:
            still = share * (above / total if total > 0 else 1.0)
            above -= count
            denom = 1.0 - share + still
            row.append(still / denom if denom > 0 else 1.0)
        return row

    def _density_row(self, cls: int) -> list[float]:
        """Hits per remaining idle time, made non-increasing in idle time (so queue heads are
        still each class's best victim)."""
        hist, gone = self._hits[cls], self._evicted[cls]
        ages = [0.75 * (1 << min(b >> self._sub, 62)) for b in range(self._nb)]
        row = []
        for b in range(self._nb):
            hits = lifetime = 0.0
            for t in range(b, self._nb):
                weight = hist[t] + gone[t]
                if weight:
                    hits += hist[t]
                    lifetime += weight * max(ages[t] - ages[b], 0.25 * ages[b] + 1)
            row.append((hits + 0.01) / (lifetime + 1.0))
        for b in range(1, self._nb):
            row[b] = min(row[b], row[b - 1])
        return row

    def _make_monotone(self) -> None:
        """As PredictedReuse: values non-decreasing in uses (every class of a level at least
        every class of the level below), a tail's at most every new class's."""
        levels: dict[int, list[int]] = {}
        for cls, uses in enumerate(self._uses_of):
            if uses >= 0:
                levels.setdefault(uses, []).append(cls)
        for uses, classes in levels.items():
            if len(classes) > 1:
                levels[uses] = [c for c in classes if self._entered[c] >= MIN_ENTRIES]
        keep = self._keep
        for uses in range(1, self._max_uses + 1):
            lower = levels.get(uses - 1, [])
            if not lower:
                continue
            floor = [max(keep[c][b] for c in lower) for b in range(self._nb)]
            for cls in levels.get(uses, []):
                keep[cls] = [max(a, f) for a, f in zip(keep[cls], floor, strict=True)]
        news = levels.get(0, [])
        if news:
            ceiling = [min(keep[c][b] for c in news) for b in range(self._nb)]
            for cls in self._tail_ids.values():
                keep[cls] = [min(a, f) for a, f in zip(keep[cls], ceiling, strict=True)]
