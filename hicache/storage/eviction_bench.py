"""``hicache bench eviction``: operations per second of the capacity policies.

Each figure comes with a raw limit measured in the same run: the same loop over the bare data
structure with no policy, no lock and no bookkeeping (``OrderedDict.move_to_end`` for the LRU, a
``bytearray`` store for CLOCK), so the ratio shows what the policy layer costs.

- ``lru_touch_chain``   ``TailFirstLRU.touch`` of 64-key chains, keys/s
- ``lru_touch_single``  ``TailFirstLRU.touch`` of one key per call, touches/s
- ``lru_churn``         ``evict_for`` + ``add`` of 64-key chains at full capacity, keys/s
- ``clock_touch``       ``ClockSlots.touch``, touches/s
- ``clock_claim``       ``ClockSlots.claim`` in full 16-way sets (a victim every time), claims/s
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable

from hicache.storage.benchmark import Figure
from hicache.storage.eviction import ClockSlots, TailFirstLRU

__all__ = ["run_eviction_bench"]

CHAIN = 64
WAYS = 16


def _rate(ops: int, fn: Callable[[], None]) -> float:
    began = time.perf_counter()
    fn()
    return ops / (time.perf_counter() - began)


def run_eviction_bench(num_keys: int = 100_000, rounds: int = 2_000, seed: int = 0) -> list[Figure]:
    """Measure the policies on ``num_keys`` resident keys; ``rounds`` chains per figure."""
    rng = random.Random(seed)
    keys = [f"{i:064x}" for i in range(num_keys)]
    chains = [keys[s : s + CHAIN] for s in (rng.randrange(num_keys - CHAIN) for _ in range(rounds))]
    singles = [keys[rng.randrange(num_keys)] for _ in range(rounds * CHAIN)]
    figures: list[Figure] = []

    lru = TailFirstLRU(num_keys)
    for start in range(0, num_keys, CHAIN):
        lru.add(keys[start : start + CHAIN], [1] * len(keys[start : start + CHAIN]))
    raw: OrderedDict[str, int] = OrderedDict((k, 1) for k in keys)

    def lru_chains() -> None:
        for chain in chains:
            lru.touch(chain)

    def raw_chains() -> None:
        move = raw.move_to_end
        for chain in chains:
            for k in reversed(chain):
                move(k)

    n = rounds * CHAIN
    figures.append(Figure("lru_touch_chain", "keys/s", _rate(n, lru_chains), _rate(n, raw_chains)))

    def lru_singles() -> None:
        touch = lru.touch
        for k in singles:
            touch((k,))

    def raw_singles() -> None:
        move = raw.move_to_end
        for k in singles:
            move(k)

    figures.append(
        Figure("lru_touch_single", "touches/s", _rate(n, lru_singles), _rate(n, raw_singles))
    )

    fresh = [[f"f{r}-{j}" for j in range(CHAIN)] for r in range(rounds)]
    sizes = [1] * CHAIN

    def lru_churn() -> None:
        for chain in fresh:
            lru.evict_for(CHAIN)
            lru.add(chain, sizes)

    def raw_churn() -> None:
        for chain in fresh:
            for _ in range(CHAIN):
                raw.popitem(last=False)
            for k in reversed(chain):
                raw[k] = 1

    figures.append(Figure("lru_churn", "keys/s", _rate(n, lru_churn), _rate(n, raw_churn)))

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

    figures.append(Figure("clock_touch", "touches/s", _rate(n, clock_touch), _rate(n, raw_touch)))

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

    figures.append(Figure("clock_claim", "claims/s", _rate(n, clock_claim), _rate(n, raw_claim)))
    return figures
