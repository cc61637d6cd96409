"""Eviction and admission policies compared on a trace's block ids (the cache-efficiency study).

Every simulator returns the prefix hits of each request in blocks (a block is a hit only while
the request's chain is unbroken), like :mod:`hicache.replay.simulate`:

- ``simulate_capacity_policy(chains, policy)``  one cache run by a real
  :class:`~hicache.storage.eviction.CapacityPolicy` (``TailFirstLRU``, ``PredictedReuse``): each
  request touches its hit prefix, then puts the rest (room made for its new blocks first, as
  the backends' reservations do); the very classes the backends run, on block ids.
- ``simulate_second_hit(chains, capacity)``  tail-first LRU that admits a block only at its
  second reference (the first is remembered in a bounded ghost list).
- ``simulate_arc(chains, capacity)``  ARC with tail-first recording: a recency list, a list of
  blocks used twice or more, their ghosts, and the adaptive split between them.
- ``simulate_exclusive_hierarchy(chains, l1, l2, policy)``  write-back tiers: L3 gets only what
  L2 evicts. (The study's designs with L2 evicting by predicted reuse are
  :func:`~hicache.replay.simulate.simulate_hierarchy`'s ``l2_policy``.)

- ``l3_policy_of(tiers)``  the policy a replay's L3 tiers run, for its same-policy simulation.
- ``l3_batch_of(tiers)``   the pages per backend call of those tiers (how their puts are cut).

The study itself (capacities, table, plot) is :mod:`hicache.replay.policy_study`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hicache.replay.simulate import (
    _prefix_hits,
    put_blocks,
    touch_tail_first,
)
from hicache.storage.eviction import (
    DEFAULT_EVICTION,
    CapacityPolicy,
    EvictionPolicy,
    make_capacity_policy,
)

__all__ = [
    "GHOST_FACTOR",
    "l3_batch_of",
    "l3_policy_of",
    "simulate_arc",
    "simulate_capacity_policy",
    "simulate_exclusive_hierarchy",
    "simulate_second_hit",
]

#: Ghost entries per cached block for the admission policies (as ``PredictedReuse`` keeps).
GHOST_FACTOR = 4


def simulate_capacity_policy(
    chains: Sequence[Sequence[int]], policy: CapacityPolicy
) -> tuple[int, ...]:
    """One cache run by ``policy`` (sizes of one per block: capacity counts blocks)."""
    hits = []
    touch = policy.touch
    for chain in chains:
        h = _prefix_hits(chain, policy)
        hits.append(h)
        # as a backend sees it: the hit prefix read (touched), then a put of the rest that makes
        # room for its new pages (reservations) before adding them
        if h:
            touch(chain[:h])  # type: ignore[arg-type]
        put_blocks(policy, chain[h:])
    return tuple(hits)


def simulate_exclusive_hierarchy(
    chains: Sequence[Sequence[int]], l1: int, l2: int, policy: CapacityPolicy
) -> tuple[int, ...]:
    """Exclusive tiers, write-back: L1 ⊆ L2 tail-first LRUs as in the replay, and an L3 run by
    ``policy`` that gets only what L2 evicts (no write-through: a page reaches L3 when L2 drops
    it) and is touched by its own reads. Total prefix hits per request."""
    lru1: OrderedDict[int, None] = OrderedDict()
    lru2: OrderedDict[int, None] = OrderedDict()
    hits = []
    for chain in chains:
        b = _prefix_hits(chain, lru2, _prefix_hits(chain, lru1))
        c = _prefix_hits(chain, policy, b)
        hits.append(c)
        if c > b:
            policy.touch(chain[b:c])  # type: ignore[arg-type]
        touch_tail_first(lru1, l1, chain)
        dropped = touch_tail_first(lru2, l2, chain)
        # L2's victims come least recent (a chain's tail) first: put head first
        put_blocks(policy, dropped[::-1])
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


#: Backends whose capacity is kept by the core's policies (``options.eviction``).
_CORE_POLICY_BACKENDS = ("memory", "localdisk")


def l3_policy_of(
    tiers: Mapping[str, Any], batch: int | None = None
) -> Callable[[int], CapacityPolicy] | None:
    """The policy the L3 ``tiers`` (name -> tier config) run, as a factory of a capacity in
    blocks: their ``options.eviction`` when each is a backend the core's policies serve and
    they agree; ``None`` (tail-first LRU, the simulation's default) otherwise. ``batch``: their
    backends' ``max_batch`` (what the backends tell their policy)."""
    kinds = set()
    for tier in tiers.values():
        if tier.backend not in _CORE_POLICY_BACKENDS:
            return None
        kinds.add(EvictionPolicy(tier.options.get("eviction", DEFAULT_EVICTION)))
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    return lambda capacity: make_capacity_policy(kind, capacity, batch=batch)


def l3_batch_of(tiers: Mapping[str, Any]) -> int | None:
    """The pages per backend call of the L3 ``tiers`` (name -> tier config), their smallest:
    each tier's ``batch_pages`` or its backend's ``max_batch``, read from an unopened backend
    (construction does no I/O). ``None`` when there is no tier."""
    from hicache.storage.backend import BackendContext
    from hicache.storage.registry import create_backend

    batches = []
    for name, tier in tiers.items():
        if tier.batch_pages is not None:
            batches.append(int(tier.batch_pages))
            continue
        context = BackendContext(page_bytes=1, namespace="sweep", tier_name=name)
        backend = create_backend(tier.backend, tier.options, context, path=f"{name}.options")
        batches.append(max(1, backend.capabilities.max_batch))
    return min(batches, default=None)
