"""Reference hit ratios computed on block ids alone, for comparison with a real replay.

- ``simulate_lru``: a prefix cache of ``capacity`` distinct blocks with tail-first LRU (a request
  touches its chain tail first, so the head is the most recent and is evicted last), the policy
  the radix cache's leaf-first LRU implements.
- ``simulate_min``: Belady's offline optimum at the same capacity: on a miss with a full cache,
  drop the resident block whose next reference is farthest in the future (never one of the
  request being served).

Both count a block as a hit only while the request's chain is unbroken: the prefix hit.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

from hicache.storage.eviction import CapacityPolicy

__all__ = [
    "HierarchySimResult",
    "SimResult",
    "lost_start",
    "publish_calls",
    "put_blocks",
    "put_call",
    "read_call",
    "simulate_hierarchy",
    "simulate_infinite",
    "simulate_lru",
    "simulate_min",
]

_NEVER = 1 << 62


@dataclass(frozen=True, slots=True)
class SimResult:
    """Prefix hits per request (in blocks) and the totals."""

    policy: str
    capacity: int
    hits: tuple[int, ...]
    references: int

    @property
    def hit_blocks(self) -> int:
        return sum(self.hits)

    @property
    def hit_ratio(self) -> float:
        return self.hit_blocks / self.references if self.references else 0.0


def _prefix_hits(chain: Sequence[int], resident: Container[int], start: int = 0) -> int:
    """The end of the run of ``chain``'s blocks from ``start`` that ``resident`` holds."""
    n = start
    while n < len(chain) and chain[n] in resident:
        n += 1
    return n


def simulate_infinite(chains: Sequence[Sequence[int]]) -> SimResult:
    """Prefix hits with unbounded capacity: the most any policy can reach."""
    seen: set[int] = set()
    hits = []
    for chain in chains:
        hits.append(_prefix_hits(chain, seen))
        seen.update(chain)
    refs = sum(len(c) for c in chains)
    return SimResult("infinite", 0, tuple(hits), refs)


def touch_tail_first(lru: OrderedDict[int, None], capacity: int, chain: Sequence[int]) -> list[int]:
    """Use ``chain`` in a tail-first LRU (its head ends most recent), then evict down to
    ``capacity``; returns the evicted blocks, least recent first. Eviction waits until the whole
    chain is in, so a request longer than the cache keeps its head."""
    for block in reversed(chain):
        if block in lru:
            lru.move_to_end(block)
        else:
            lru[block] = None
    evicted = []
    while len(lru) > capacity:
        evicted.append(lru.popitem(last=False)[0])
    return evicted


def simulate_lru(chains: Sequence[Sequence[int]], capacity: int) -> SimResult:
    """Tail-first LRU over distinct blocks (see module docstring)."""
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    lru: OrderedDict[int, None] = OrderedDict()
    hits = []
    for chain in chains:
        hits.append(_prefix_hits(chain, lru))
        touch_tail_first(lru, capacity, chain)
    refs = sum(len(c) for c in chains)
    return SimResult("lru", capacity, tuple(hits), refs)


def _next_uses(chains: Sequence[Sequence[int]]) -> list[list[int]]:
    """For every reference, the request index of the same block's next reference."""
    nxt: list[list[int]] = [[_NEVER] * len(c) for c in chains]
    last: dict[int, int] = {}
    for i in range(len(chains) - 1, -1, -1):
        chain = chains[i]
        row = nxt[i]
        for j, block in enumerate(chain):
            row[j] = last.get(block, _NEVER)
        for block in chain:
            last[block] = i
    return nxt


def simulate_min(chains: Sequence[Sequence[int]], capacity: int) -> SimResult:
    """Belady's MIN over distinct blocks, evicting at request granularity."""
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    nxt = _next_uses(chains)
    resident: dict[int, int] = {}  # block -> its next use (the heap may hold stale entries)
    heap: list[tuple[int, int]] = []  # (-next_use, block): farthest next use pops first
    hits = []
    for i, chain in enumerate(chains):
        hits.append(_prefix_hits(chain, resident))
        for j, block in enumerate(chain):
            use = nxt[i][j]
            resident[block] = use
            heapq.heappush(heap, (-use, block))
        while len(resident) > capacity:
            neg_use, block = heapq.heappop(heap)
            if resident.get(block) == -neg_use:
                del resident[block]
    refs = sum(len(c) for c in chains)
    return SimResult("min", capacity, tuple(hits), refs)


def put_blocks(policy: CapacityPolicy, blocks: Sequence[int]) -> None:
    """One backend put of ``blocks`` (head first, one unit each) as the core's backends feed
    their policy (``localdisk``'s reservations, ``memory``'s put): the blocks already stored are
    touched (stored again: used again), room is made for the new ones, then the new ones are
    added; new blocks beyond the whole capacity (the batch's tail) are refused."""
    if not blocks:
        return
    existing = [block for block in blocks if block in policy]
    new = [block for block in blocks if block not in policy]
    policy.touch(existing)  # type: ignore[arg-type]
    fit = min(len(new), policy.capacity_bytes)
    policy.evict_for(fit)
    room = max(0, policy.capacity_bytes - policy.used_bytes)
    kept = new[: min(fit, room)]
    policy.add(kept, [1] * len(kept))  # type: ignore[arg-type]
    policy.evict_for(0)


def put_call(policy: CapacityPolicy, blocks: Sequence[int], batch: int | None) -> None:
    """One put call of a tier: ``batch`` pages per backend put (its ``max_batch``; ``None``
    = all in one), in order."""
    step = len(blocks) if batch is None else batch
    for start in range(0, len(blocks), max(1, step)):
        put_blocks(policy, blocks[start : start + step])


def read_call(policy: CapacityPolicy, blocks: Sequence[int], batch: int | None) -> None:
    """One read of a tier (``Tier.get_into``): each backend get of ``batch`` pages touches the
    pages it found."""
    step = len(blocks) if batch is None else batch
    for start in range(0, len(blocks), max(1, step)):
        policy.touch(blocks[start : start + step])  # type: ignore[arg-type]


def lost_start(chain: Sequence[int], b: int, c: int, held: Container[int]) -> int:
    """Where the ancestors of a request's computed suffix that L3 lost begin: a request that
    read nothing from L3 (``c == b``) after its L1/L2 hits (``b``) republishes the run of
    pages above ``b`` that ``held`` no longer holds."""
    start = b
    if c == b < len(chain):
        while start > 0 and chain[start - 1] not in held:
            start -= 1
    return start


def publish_calls(
    policy: CapacityPolicy, lost: Sequence[int], computed: Sequence[int], batch: int | None
) -> None:
    """A request's puts to L3 as the tiers make them: the republished ancestors in a put of
    their own when they fill a batch, else in one put with the computed suffix."""
    if batch is not None and len(lost) >= batch:
        put_call(policy, lost, batch)
        put_call(policy, computed, batch)
    else:
        put_call(policy, [*lost, *computed], batch)


@dataclass(frozen=True, slots=True)
class HierarchySimResult:
    """Per-request prefix hits of a simulated L1/L2/L3 hierarchy, in blocks."""

    l1: tuple[int, ...]
    l2: tuple[int, ...]
    l3: tuple[int, ...]
    references: int

    @property
    def hits(self) -> tuple[int, ...]:
        """Prefix hits per request over all levels (as ``SimResult.hits``)."""
        return tuple(a + b + c for a, b, c in zip(self.l1, self.l2, self.l3, strict=True))

    def ratio(self, level: str) -> float:
        hits = {"l1": self.l1, "l2": self.l2, "l3": self.l3}[level]
        return sum(hits) / self.references if self.references else 0.0

    @property
    def overall_ratio(self) -> float:
        return sum(self.hits) / self.references if self.references else 0.0


def simulate_hierarchy(
    chains: Sequence[Sequence[int]],
    l1: int,
    l2: int,
    l3: int | None,
    *,
    min_prefetch: int = 1,
    instances: int = 1,
    l3_policy: Callable[[int], CapacityPolicy] | None = None,
    l3_batch: int | None = None,
    l2_policy: Callable[[int], CapacityPolicy] | None = None,
    all_uses_in_l3: bool = False,
) -> HierarchySimResult:
    """The replay's policy on block ids alone: inclusive write-through L1 ⊆ L2 and an L3.

    - L1 and L2 are tail-first LRUs touched by every request (a match touches the whole path);
      L2 holds every backed-up block, so it is at least as large as L1.
    - L3 (``None`` = unbounded, ``0`` = no L3) is a tail-first LRU touched only by its own
      traffic: blocks read from it (the prefix found after L1/L2 stopped) and blocks published to
      it (every block the request computed, i.e. after the hit prefix). When the computed suffix
      starts below a block L3 lost (a head hot in L1/L2 is never touched there), the lost blocks
      above it, up to the nearest one L3 holds, are republished with it, so L3 stays
      prefix-closed.
    - L3 is asked only when at least ``min_prefetch`` blocks follow the L1/L2 hit (the cache's
      prefetch threshold).
    - ``instances``: request ``i`` goes to hierarchy ``i % instances``; each has its own L1 and
      L2 of the given sizes, and all share the one L3.
    - ``l3_policy``: the bounded L3 runs ``l3_policy(l3)`` (a tier's ``options.eviction``, e.g.
      :class:`~hicache.storage.reuse_policy.PredictedReuse`) instead of tail-first LRU, fed what
      the backend sees, in the order and grouping it sees it (see :func:`put_call`):
      the read prefix touched, one backend get of ``l3_batch`` pages after another; then the
      republished ancestors and the computed suffix as the engine sends them, one put call for
      both (one each when the ancestors alone fill a batch: the engine sends a tier's waiting
      pages as soon as they reach its ``max_batch``), cut into backend puts of ``l3_batch``
      pages, each touching its pages already stored and making room for its new pages before
      adding them.
    - ``l2_policy``: each L2 runs ``l2_policy(l2)`` (e.g. ``PredictedReuse``, a design of the
      policy study) instead of tail-first LRU: every request adds its whole chain there, as the
      host pool receives every page the request used, then L2 evicts down to its size.
    - ``all_uses_in_l3`` (with an ``l3_policy``): the pages hit in L1/L2 are touched in L3 too,
      before its own reads, so L3 counts every use of a page wherever it was served.
    """
    use_l3 = l3 is None or l3 > 0
    pol3 = l3_policy(l3) if l3_policy is not None and l3 is not None and l3 > 0 else None
    if all_uses_in_l3 and pol3 is None:
        raise ValueError("all_uses_in_l3 needs a bounded L3 run by an l3_policy")
    tiers = [
        (OrderedDict[int, None](), OrderedDict[int, None]() if l2_policy is None else l2_policy(l2))
        for _ in range(instances)
    ]
    lru3: OrderedDict[int, None] = OrderedDict()
    h1: list[int] = []
    h2: list[int] = []
    h3: list[int] = []
    for i, chain in enumerate(chains):
        lru1, lv2 = tiers[i % instances]
        a = _prefix_hits(chain, lru1)
        b = _prefix_hits(chain, lv2, a)
        c = b
        if use_l3 and len(chain) - b >= min_prefetch:
            c = _prefix_hits(chain, lru3 if pol3 is None else pol3, b)
        h1.append(a)
        h2.append(b - a)
        h3.append(c - b)
        touch_tail_first(lru1, l1, chain)
        if isinstance(lv2, OrderedDict):
            touch_tail_first(lv2, l2, chain)
        else:
            # the whole chain used at once, tail first, then evicted down to the capacity (the
            # host pool evicts leaf first: a head is never dropped before its suffix)
            lv2.add(chain, [1] * len(chain))  # type: ignore[arg-type]
            lv2.evict_for(0)
        if not use_l3:
            continue
        # L3 sees the blocks it lost above the computed suffix first (republished in a put of
        # their own), then the read prefix and the computed (published) suffix
        start = lost_start(chain, b, c, lru3 if pol3 is None else pol3)
        if pol3 is not None:
            # as the backends see it: the read pages touched, then each put makes room for its
            # new pages (its reservations) before adding them
            if all_uses_in_l3 and b > 0:
                read_call(pol3, chain[:b], l3_batch)
            if c > b:
                read_call(pol3, chain[b:c], l3_batch)
            publish_calls(pol3, chain[start:b], chain[c:], l3_batch)
            continue
        for block in [*reversed(chain[start:b]), *reversed(chain[b:])]:
            if block in lru3:
                lru3.move_to_end(block)
            else:
                lru3[block] = None
        if l3 is not None:
            while len(lru3) > l3:
                lru3.popitem(last=False)
    refs = sum(len(c) for c in chains)
    return HierarchySimResult(tuple(h1), tuple(h2), tuple(h3), refs)
