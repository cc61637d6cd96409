"""Eviction and admission policies compared on a trace's block ids (the cache-efficiency study).

Every simulator returns the prefix hits of each request in blocks (a block is a hit only while
the request's chain is unbroken), like :mod:`hicache.replay.simulate`:

- ``simulate_capacity_policy(chains, policy)``  one cache run by a real
  :class:`~hicache.storage.eviction.CapacityPolicy` (``TailFirstLRU``, ``PredictedReuse``): each
  request adds its whole chain as one batch (its hit prefix is used again), then the policy
  evicts to its capacity; the very classes the backends run, on block ids instead of page keys.
- ``simulate_second_hit(chains, capacity)``  tail-first LRU that admits a block only at its
  second reference (the first is remembered in a bounded ghost list).
- ``simulate_arc(chains, capacity)``  ARC with tail-first recording: a recency list, a list of
  blocks used twice or more, their ghosts, and the adaptive split between them.

The study itself (capacities, table, plot) is :mod:`hicache.replay.policy_study`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from hicache.replay.simulate import _prefix_hits
from hicache.storage.eviction import CapacityPolicy, TailFirstLRU
from hicache.storage.reuse_policy import PredictedReuse

__all__ = [
    "GHOST_FACTOR",
    "simulate_arc",
    "simulate_capacity_policy",
    "simulate_second_hit",
    "simulate_tiered_policy",
]

#: Ghost entries per cached block for the admission policies (as ``PredictedReuse`` keeps).
GHOST_FACTOR = 4


def simulate_capacity_policy(
    chains: Sequence[Sequence[int]], policy: CapacityPolicy
) -> tuple[int, ...]:
    """One cache run by ``policy`` (sizes of one per block: capacity counts blocks)."""
    hits = []
    add, evict = policy.add, policy.evict_for
    for chain in chains:
        hits.append(_prefix_hits(chain, policy))
        # The whole chain in one batch: resident keys are used again, the rest stored.
        add(chain, [1] * len(chain))  # type: ignore[arg-type]
        evict(0)
    return tuple(hits)


def simulate_second_hit(chains: Sequence[Sequence[int]], capacity: int) -> tuple[int, ...]:
    """Tail-first LRU admitting a block at its second reference (see module docstring)."""
    cache: OrderedDict[int, None] = OrderedDict()
    seen: OrderedDict[int, None] = OrderedDict()
    hits = []
    for chain in chains:
        hits.append(_prefix_hits(chain, cache))
        for block in reversed(chain):
            if block in cache:
                cache.move_to_end(block)
            elif block in seen:
                del seen[block]
                cache[block] = None
            else:
                seen[block] = None
        while len(seen) > GHOST_FACTOR * capacity:
            seen.popitem(last=False)
        while len(cache) > capacity:
            cache.popitem(last=False)
    return tuple(hits)


def simulate_arc(chains: Sequence[Sequence[int]], capacity: int) -> tuple[int, ...]:
    """Adaptive Replacement Cache with chains recorded tail first (see module docstring).

    A hit in the recency ghost grows the recency list's target, a hit in the frequency ghost
    shrinks it: the split between "seen once" and "seen again" adapts to the workload.
    """
    once: OrderedDict[int, None] = OrderedDict()
    again: OrderedDict[int, None] = OrderedDict()
    ghost_once: OrderedDict[int, None] = OrderedDict()
    ghost_again: OrderedDict[int, None] = OrderedDict()
    target = 0.0
    hits = []
    for chain in chains:
        n = 0
        for block in chain:
            if block not in once and block not in again:
                break
            n += 1
        hits.append(n)
        for block in reversed(chain):
            if block in once:
                del once[block]
                again[block] = None
            elif block in again:
                again.move_to_end(block)
            elif block in ghost_once:
                target = min(capacity, target + max(len(ghost_again) / len(ghost_once), 1.0))
                del ghost_once[block]
                again[block] = None
            elif block in ghost_again:
                target = max(0.0, target - max(len(ghost_once) / len(ghost_again), 1.0))
                del ghost_again[block]
                again[block] = None
            else:
                once[block] = None
        while len(once) + len(again) > capacity:
            if once and (len(once) > target or not again):
                ghost_once[once.popitem(last=False)[0]] = None
            else:
                ghost_again[again.popitem(last=False)[0]] = None
        for ghost in (ghost_once, ghost_again):
            while len(ghost) > GHOST_FACTOR * capacity:
                ghost.popitem(last=False)
    return tuple(hits)


def simulate_tiered_policy(
    chains: Sequence[Sequence[int]],
    l1: int,
    l2: int,
    l3: int,
    l3_policy: Callable[[int], CapacityPolicy],
    *,
    min_prefetch: int = 1,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Inclusive write-through L1 ⊆ L2 (tail-first LRUs touched by every request) over an L3 run
    by ``l3_policy(l3)``, touched only by its own traffic: its read prefix and the published
    computed suffix (with the ancestors it lost republished first), as
    :func:`hicache.replay.simulate.simulate_hierarchy` models the replay. Returns the hits per
    request of L1, L2 and L3."""
    lru1, lru2 = TailFirstLRU(l1), TailFirstLRU(l2)
    pol3 = l3_policy(l3)
    h1: list[int] = []
    h2: list[int] = []
    h3: list[int] = []
    for chain in chains:
        a = _prefix_hits(chain, lru1)
        b = a
        while b < len(chain) and chain[b] in lru2:
            b += 1
        c = b
        if len(chain) - b >= min_prefetch:
            while c < len(chain) and chain[c] in pol3:
                c += 1
        h1.append(a)
        h2.append(b - a)
        h3.append(c - b)
        for lru in (lru1, lru2):
            lru.add(chain, [1] * len(chain))  # type: ignore[arg-type]
            lru.evict_for(0)
        start = b
        if c == b < len(chain):
            while start > 0 and chain[start - 1] not in pol3:
                start -= 1
        if start < b:
            pol3.add(chain[start:b], [1] * (b - start))  # type: ignore[arg-type]
        if c > b:
            pol3.touch(chain[b:c])  # type: ignore[arg-type]
        if c < len(chain):
            pol3.add(chain[c:], [1] * (len(chain) - c))  # type: ignore[arg-type]
        pol3.evict_for(0)
    return tuple(h1), tuple(h2), tuple(h3)


def predicted_reuse(capacity: int) -> CapacityPolicy:
    """Factory for ``simulate_tiered_policy`` (sizes count blocks)."""
    return PredictedReuse(capacity)
