"""``hicache bench eviction``: operations per second of the capacity policies.

Each figure comes with a raw limit measured in the same run: the same loop over the bare data
structure with no policy, no lock and no bookkeeping (``OrderedDict.move_to_end`` for the LRU, a
``bytearray`` store for CLOCK), so the ratio shows what the policy layer costs.

- ``lru_touch_chain``   ``TailFirstLRU.touch`` of 64-key chains, keys/s
- ``lru_touch_single``  ``TailFirstLRU.touch`` of one key per call, touches/s
- ``lru_churn``         ``evict_for`` + ``add`` of 64-key chains at full capacity, keys/s
- ``reuse_touch_chain``, ``reuse_touch_single``, ``reuse_churn``  the same three operations of
  ``PredictedReuse`` (the default policy) against the same raw loops: its ``value`` over the
  ``lru_`` figure's is what choosing it costs per operation
- ``reuse_vs_lru_touch_chain``, ``reuse_vs_lru_touch_single``  ``PredictedReuse`` touches
  against ``TailFirstLRU``'s as the limit, the two interleaved in short slices and summed over
  each round (the median of the rounds' ratios): the same-run answer to "how much slower than
  LRU", which the figures above give only through their separate raw loops
- ``clock_touch``       ``ClockSlots.touch``, touches/s
- ``clock_claim``       ``ClockSlots.claim`` in full 16-way sets (a victim every time), claims/s
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable

from hicache.storage.eviction import CapacityPolicy, ClockSlots, TailFirstLRU
from hicache.storage.reuse_policy import PredictedReuse
from hicache.tools.benchmark import Figure

__all__ = ["run_eviction_bench"]

CHAIN = 64
WAYS = 16


#: Each figure is the best of this many alternating runs of policy and raw loop: on a shared
#: machine the best run is the one least disturbed by other processes, for both sides alike.
REPEATS = 3


def _figure(
    name: str, unit: str, ops: int, ours: Callable[[], None], raw: Callable[[], None]
) -> Figure:
    best = [0.0, 0.0]
    for _ in range(REPEATS):
        for side, fn in enumerate((ours, raw)):
            began = time.perf_counter()
            fn()
            best[side] = max(best[side], ops / (time.perf_counter() - began))
    return Figure(name, unit, best[0], best[1])


def run_eviction_bench(num_keys: int = 100_000, rounds: int = 2_000, seed: int = 0) -> list[Figure]:
    """Measure the policies on ``num_keys`` resident keys; ``rounds`` chains per figure."""
    rng = random.Random(seed)
    keys = [f"{i:064x}" for i in range(num_keys)]
    chains = [keys[s : s + CHAIN] for s in (rng.randrange(num_keys - CHAIN) for _ in range(rounds))]
    singles = [keys[rng.randrange(num_keys)] for _ in range(rounds * CHAIN)]
    figures: list[Figure] = []

    figures += _policy_figures("lru", TailFirstLRU(num_keys), keys, chains, singles, rounds)
    figures += _policy_figures("reuse", PredictedReuse(num_keys), keys, chains, singles, rounds)
    figures += _versus_lru_figures(keys, chains, singles)
    n = rounds * CHAIN

    clock = ClockSlots(num_keys)
    for slot in range(num_keys):
        clock.mark_used(slot)
    slots = [rng.randrange(num_keys) for _ in range(n)]
    ref = bytearray(num_keys)

    def clock_touch() -> None:
        touch = clock.touch
        for s in slots:
            touch(s)

    def raw_touch() -> None:
        for s in slots:
            ref[s] = 1

    figures.append(_figure("clock_touch", "touches/s", n, clock_touch, raw_touch))

    sets = [rng.randrange(num_keys // WAYS) * WAYS for _ in range(n)]

    def clock_claim() -> None:
        claim = clock.claim
        for start in sets:
            claim(start, start + WAYS)

    def raw_claim() -> None:
        # The bare second-chance scan: clear reference bits from the set start to a cold slot.
        for start in sets:
            for slot in range(start, start + WAYS):
                if ref[slot]:
                    ref[slot] = 0
                else:
                    ref[slot] = 1
                    break

    figures.append(_figure("clock_claim", "claims/s", n, clock_claim, raw_claim))
    return figures


def _fill(policy: CapacityPolicy, keys: list[str]) -> None:
    """Add ``keys`` to ``policy`` in chains of ``CHAIN`` (one unit each), first chain first."""
    for start in range(0, len(keys), CHAIN):
        chain = keys[start : start + CHAIN]
        policy.add(chain, [1] * len(chain))


def _policy_figures(
    prefix: str,
    policy: CapacityPolicy,
    keys: list[str],
    chains: list[list[str]],
    singles: list[str],
    rounds: int,
) -> list[Figure]:
    """Touches of chains and of single keys, then churn, of ``policy`` full of ``keys``."""
    figures: list[Figure] = []
    _fill(policy, keys)
    raw: OrderedDict[str, int] = OrderedDict((k, 1) for k in keys)

    def ours_chains() -> None:
        for chain in chains:
            policy.touch(chain)

    def raw_chains() -> None:
        move = raw.move_to_end
        for chain in chains:
            for k in reversed(chain):
                move(k)

    n = rounds * CHAIN
    figures.append(_figure(f"{prefix}_touch_chain", "keys/s", n, ours_chains, raw_chains))

    def ours_singles() -> None:
        touch = policy.touch
        for k in singles:
            touch((k,))

    def raw_singles() -> None:
        move = raw.move_to_end
        for k in singles:
            move(k)

    figures.append(_figure(f"{prefix}_touch_single", "touches/s", n, ours_singles, raw_singles))

    # Every churn run inserts keys never seen before (each run takes the next batch).
    fresh = [
        [[f"f{prefix}{rep}-{r}-{j}" for j in range(CHAIN)] for r in range(rounds)]
        for rep in range(REPEATS)
    ]
    sizes = [1] * CHAIN
    runs = {"ours": iter(fresh), "raw": iter(fresh)}

    def ours_churn() -> None:
        for chain in next(runs["ours"]):
            policy.evict_for(CHAIN)
            policy.add(chain, sizes)

    def raw_churn() -> None:
        for chain in next(runs["raw"]):
            for _ in range(CHAIN):
                raw.popitem(last=False)
            for k in reversed(chain):
                raw[k] = 1

    figures.append(_figure(f"{prefix}_churn", "keys/s", n, ours_churn, raw_churn))

    return figures


#: Chains (or single keys x CHAIN) per slice of the interleaved comparison: short enough that
#: both policies see the same load, long enough that a slice is not all timer overhead.
SLICE = 50


def _versus_lru_figures(
    keys: list[str], chains: list[list[str]], singles: list[str]
) -> list[Figure]:
    """``PredictedReuse`` touches against ``TailFirstLRU``'s, interleaved slice by slice."""
    policies: list[CapacityPolicy] = [TailFirstLRU(len(keys)), PredictedReuse(len(keys))]
    for policy in policies:
        _fill(policy, keys)
    single_calls = [(k,) for k in singles]
    figures = []
    for name, calls, per_call in (
        ("reuse_vs_lru_touch_chain", chains, CHAIN),
        ("reuse_vs_lru_touch_single", single_calls, 1),
    ):
        step = SLICE * (CHAIN // per_call)
        ratios = []
        totals = [0.0, 0.0]
        for _ in range(REPEATS):
            spent = [0.0, 0.0]
            for n, start in enumerate(range(0, len(calls), step)):
                part = calls[start : start + step]
                # each side goes first in every other slice: neither always finds the caches warm
                for side in (0, 1) if n % 2 == 0 else (1, 0):
                    touch = policies[side].touch
                    began = time.perf_counter()
                    for call in part:
                        touch(call)
                    spent[side] += time.perf_counter() - began
            ratios.append(spent[0] / spent[1])
            totals = [t + x for t, x in zip(totals, spent, strict=True)]
        ops = REPEATS * len(calls) * per_call
        figures.append(
            Figure(
                name,
                "keys/s",
                ops / totals[1],
                ops / totals[0],
                round_ratios=tuple(ratios),
            )
        )
    return figures
