"""Online features for predicted reuse: which split of its classes buys hits (issue 21).

``python -m hicache.replay.feature_study --fractions 0.0896 0.01`` prints, for each design of
:class:`~hicache.replay.feature_policy.FeatureReuse`, the token hit ratio of one cache of the
capacity ("single", fed as ``simulate_capacity_policy`` feeds it) and of the replay's hierarchy
with it as the L3 ("hierarchy": ``simulate_hierarchy`` with 64-page calls, what a localdisk
tier runs), with the shipped policy and LRU for reference. "fitted" rows learn once over the
whole trace and replay it with those values frozen from the first request: a bound on what
the same classes could reach with perfect estimates, not a policy.
"""

from __future__ import annotations

import argparse
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from hicache.replay.feature_policy import FeatureReuse
from hicache.replay.policies import simulate_capacity_policy
from hicache.replay.policy_study import BLOCK_TOKENS, DEFAULT_L1, DEFAULT_L2
from hicache.replay.simulate import _NEVER, _next_uses, _prefix_hits, simulate_hierarchy
from hicache.replay.sweep import token_ratio
from hicache.replay.trace import load_trace
from hicache.storage.eviction import (
    CapacityPolicy,
    EvictionPolicy,
    TailFirstLRU,
    make_capacity_policy,
)
from hicache.storage.reuse_policy import PredictedReuse

__all__ = ["DESIGNS", "feature_ratios", "main", "oracle_ratio", "reuse_shares"]

L3_BATCH = 64

#: name -> FeatureReuse arguments (None: the shipped policy by its factory)
DESIGNS: dict[str, dict[str, Any] | None] = {
    "LRU": {"lru": True},
    "shipped predicted reuse": None,
    "same classes (FeatureReuse)": {},
    "depth 4 / 16": {"depth": (4, 16)},
    "depth 2 / 4 / 8 / 16 / 32": {"depth": (2, 4, 8, 16, 32)},
    "put length 4 / 16": {"batch_len": (4, 16)},
    "put length 2 / 4 / 8 / 16 / 32": {"batch_len": (2, 4, 8, 16, 32)},
    "follows a hit": {"follows_hit": True},
    "follows a hit x put length 4 / 16": {"follows_hit": True, "batch_len": (4, 16)},
    "follows a hit x depth 2..32": {"follows_hit": True, "depth": (2, 4, 8, 16, 32)},
    "last gap, 2 groups": {"gap_groups": 2},
    "last gap, 3 groups": {"gap_groups": 3},
    "uses up to 5": {"max_uses": 5},
    "uses up to 8": {"max_uses": 8},
    "depth 2..32 + last gap 3": {"depth": (2, 4, 8, 16, 32), "gap_groups": 3},
    "hit density (LHD-like)": {"density": True},
    "admission x1": {"admit": 1.0},
    "admission x0.5": {"admit": 0.5},
    "half-octave buckets": {"sub_octave_bits": 1},
    "decay 0.8": {"decay": 0.8},
    "decay 0.99": {"decay": 0.99},
    "fitted: same classes": {"fitted": True},
    "fitted: depth 2..32 + last gap 3": {
        "fitted": True,
        "depth": (2, 4, 8, 16, 32),
        "gap_groups": 3,
    },
}

Chains = Sequence[Sequence[int]]


def _run(chains: Chains, capacity: int, make: Callable[[int], CapacityPolicy], hier: bool) -> Any:
    if not hier:
        return simulate_capacity_policy(chains, make(capacity))
    return simulate_hierarchy(
        chains, DEFAULT_L1, DEFAULT_L2, capacity, l3_policy=make, l3_batch=L3_BATCH
    ).hits


def feature_ratios(
    chains: Chains, prompts: Sequence[int], capacity: int, args: dict[str, Any] | None, hier: bool
) -> float:
    """Token hit ratio of one design (``DESIGNS`` value) at ``capacity`` pages."""
    batch = L3_BATCH if hier else None
    if args is None:

        def shipped(cap: int) -> CapacityPolicy:
            # a tier's (tails only where a put ends), or the study's single cache (with tails)
            if hier:
                return make_capacity_policy(EvictionPolicy.PREDICTED_REUSE, cap, batch=batch)
            return PredictedReuse(cap)

        return token_ratio(_run(chains, capacity, shipped, hier), BLOCK_TOKENS, prompts)
    if args.get("lru"):
        return token_ratio(_run(chains, capacity, TailFirstLRU, hier), BLOCK_TOKENS, prompts)
    kwargs = {k: v for k, v in args.items() if k != "fitted"}
    kwargs.setdefault("tail_class", True)
    frozen = None
    if args.get("fitted"):
        # learn over the whole trace without ageing, then replay it with those values
        learners: list[FeatureReuse] = []

        def learner(cap: int) -> CapacityPolicy:
            learners.append(FeatureReuse(cap, full_batch=batch, **{**kwargs, "decay": 1.0}))
            return learners[-1]

        _run(chains, capacity, learner, hier)
        frozen = learners[0].keep_tables()

    def make(cap: int) -> CapacityPolicy:
        return FeatureReuse(cap, full_batch=batch, frozen=frozen, **kwargs)

    return token_ratio(_run(chains, capacity, make, hier), BLOCK_TOKENS, prompts)


def oracle_ratio(chains: Chains, prompts: Sequence[int], capacity: int) -> float:
    """One cache that knows whether each use of a block is followed by another (not when):
    it evicts the least recent block never used again, else the least recent block (tail-first
    order in both). What perfect reuse prediction is worth; single cache only."""
    next_use = _next_uses(chains)
    # per class (0: not used again, 1: used again): its blocks, least recent first
    queues: list[OrderedDict[int, None]] = [OrderedDict(), OrderedDict()]
    where: dict[int, int] = {}
    hits = []
    for i, chain in enumerate(chains):
        h = _prefix_hits(chain, where)
        hits.append(h)
        for j in range(len(chain) - 1, -1, -1):
            block = chain[j]
            old = where.get(block)
            if old is not None:
                del queues[old][block]
            where[block] = cls = int(next_use[i][j] < _NEVER)
            queues[cls][block] = None
        while len(where) > capacity:
            block = queues[0 if queues[0] else 1].popitem(last=False)[0]
            del where[block]
    return token_ratio(hits, BLOCK_TOKENS, prompts)


def reuse_shares(chains: Chains) -> dict[str, tuple[int, float]]:
    """Share of references followed by another reference of the same block, by what a policy
    could know at that reference (new blocks: the prompt's last excluded; used blocks: by uses
    so far, saturated at 3, and the octave of the idle time since the last use, in requests):
    group name -> (references, share used again)."""
    next_use = _next_uses(chains)
    uses: dict[int, int] = {}
    last: dict[int, int] = {}
    seen: set[int] = set()
    counts: dict[str, list[int]] = {}

    def count(group: str, again: bool) -> None:
        row = counts.setdefault(group, [0, 0])
        row[0] += 1
        row[1] += again

    for i, chain in enumerate(chains):
        hit = _prefix_hits(chain, seen)
        added = len(chain) - hit
        for j, block in enumerate(chain):
            again = next_use[i][j] < _NEVER
            used = uses.get(block, 0)
            if used == 0 and j < len(chain) - 1:
                count("new, all", again)
                count(f"new, prefix found {'> 1' if hit > 1 else '<= 1'} blocks", again)
                count(f"new, depth in chain {j.bit_length():02d} (octave)", again)
                count(f"new, blocks added by the request {added.bit_length():02d} (octave)", again)
            elif used:
                gap = (i - last[block]).bit_length()
                count(f"used {min(used, 3)}, idle {gap:02d} (octave of requests)", again)
            uses[block] = used + 1
            last[block] = i
        seen.update(chain)
    return {k: (n, r / n) for k, (n, r) in counts.items()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hicache.replay.feature_study", description=__doc__)
    p.add_argument("trace", nargs="?", help="JSONL trace (default: the shipped Mooncake trace)")
    p.add_argument("--limit", type=int, help="first N requests only")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0896, 0.01])
    p.add_argument("--designs", nargs="+", choices=list(DESIGNS), help="default: all")
    p.add_argument("--oracle", action="store_true", help="also the reuse oracle's single cache")
    p.add_argument("--shares", action="store_true", help="only the reuse shares by feature")
    args = p.parse_args(argv)
    trace = load_trace(args.trace, args.limit)
    chains = [r.block_ids for r in trace]
    prompts = [r.input_length for r in trace]
    if args.shares:
        print("| group | references | share used again |\n|---|---:|---:|")
        for group, (n, share) in sorted(reuse_shares(chains).items()):
            if n >= 200:
                print(f"| {group} | {n:,} | {share:.1%} |")
        return 0
    distinct = len({b for c in chains for b in c})
    caps = [max(1, int(distinct * f)) for f in args.fractions]
    head = " | ".join(f"{f:.2%} {mode}" for f in args.fractions for mode in ("single", "hier"))
    print(f"| design | {head} |")
    print("|---|" + "---:|" * (2 * len(caps)))
    if args.oracle:
        cells = [f"{oracle_ratio(chains, prompts, cap):.2%} | -" for cap in caps]
        print("| oracle: used again or not | " + " | ".join(cells) + " |")
    for name in args.designs or list(DESIGNS):
        began = time.perf_counter()
        cells = [
            f"{feature_ratios(chains, prompts, cap, DESIGNS[name], hier):.2%}"
            for cap in caps
            for hier in (False, True)
        ]
        print(f"| {name} | " + " | ".join(cells) + f" |  ({time.perf_counter() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
