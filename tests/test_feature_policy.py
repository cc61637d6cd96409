"""FeatureReuse (the study's finer-class variants of predicted reuse): with no feature it is the
shipped PredictedReuse exactly, every design keeps its capacity, and the feature study prints
its table."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from hicache.replay.feature_policy import FeatureReuse
from hicache.replay.feature_study import DESIGNS, feature_ratios, main, oracle_ratio, reuse_shares
from hicache.replay.policies import simulate_capacity_policy
from hicache.replay.simulate import simulate_hierarchy, simulate_lru
from hicache.replay.sweep import token_ratio
from hicache.replay.workloads import conversations, few_shot
from hicache.storage import EvictionPolicy, make_capacity_policy
from hicache.storage.eviction import CapacityPolicy
from hicache.storage.reuse_policy import PredictedReuse


class Recording(CapacityPolicy):
    """Passes every call to ``inner`` and records what eviction returned."""

    def __init__(self, inner: CapacityPolicy) -> None:
        super().__init__(inner.capacity_bytes)
        self.inner = inner
        self.victims: list[str] = []

    @property
    def used_bytes(self) -> int:
        return self.inner.used_bytes

    def __contains__(self, key: object) -> bool:
        return key in self.inner

    def __len__(self) -> int:
        return len(self.inner)

    def add(self, keys: Sequence[str], sizes: Sequence[int]) -> None:
        self.inner.add(keys, sizes)

    def touch(self, keys: Sequence[str]) -> None:
        self.inner.touch(keys)

    def remove(self, key: str) -> bool:
        return self.inner.remove(key)

    def evict_for(self, nbytes: int) -> list[str]:
        victims = self.inner.evict_for(nbytes)
        self.victims.extend(victims)
        assert len(self.inner) <= self.capacity_bytes
        return victims


@pytest.mark.parametrize("fraction", [0.01, 0.05])
def test_without_features_it_evicts_exactly_as_predicted_reuse(fraction: float) -> None:
    chains, _ = conversations(seed=3, requests=3000)
    capacity = max(1, int(len({b for c in chains for b in c}) * fraction))
    shipped = Recording(PredictedReuse(capacity))
    ours = Recording(FeatureReuse(capacity))
    assert simulate_capacity_policy(chains, ours) == simulate_capacity_policy(chains, shipped)
    assert ours.victims == shipped.victims
    assert len(ours.victims) > 10 * capacity  # learned estimates decided most evictions


def test_without_features_the_tiers_hierarchy_is_the_shipped_one() -> None:
    chains, _ = few_shot(seed=1, requests=3000)
    capacity = len({b for c in chains for b in c}) // 20

    def shipped(cap: int) -> CapacityPolicy:
        return make_capacity_policy(EvictionPolicy.PREDICTED_REUSE, cap, batch=8)

    def ours(cap: int) -> CapacityPolicy:
        return FeatureReuse(cap, full_batch=8)

    a = simulate_hierarchy(chains, 20, 40, capacity, l3_policy=shipped, l3_batch=8)
    b = simulate_hierarchy(chains, 20, 40, capacity, l3_policy=ours, l3_batch=8)
    assert a == b


#: The designs that are FeatureReuse arguments as they are (not LRU, the shipped policy, or a
#: bound fitted over the whole trace, which feature_ratios builds otherwise).
ONLINE_DESIGNS = [
    name
    for name, args in DESIGNS.items()
    if args is not None and not args.keys() & {"lru", "fitted"}
]


@pytest.mark.parametrize("name", ONLINE_DESIGNS)
def test_every_online_design_keeps_its_capacity_and_finds_hits(name: str) -> None:
    chains, _ = conversations(seed=2, requests=1500)
    capacity = len({b for c in chains for b in c}) // 20
    policy = Recording(FeatureReuse(capacity, **(DESIGNS[name] or {})))
    hits = simulate_capacity_policy(chains, policy)
    assert len(policy) <= capacity and policy.victims
    assert sum(hits) > 0


@pytest.mark.parametrize("name", list(DESIGNS))
def test_every_design_finds_hits_in_the_tiers_hierarchy(name: str) -> None:
    chains, tokens = conversations(seed=2, requests=1500)
    capacity = len({b for c in chains for b in c}) // 20
    assert 0.0 < feature_ratios(chains, tokens, capacity, DESIGNS[name], hier=True) < 1.0


def test_the_reuse_oracle_is_at_least_lru() -> None:
    chains, tokens = conversations(seed=4, requests=2000)
    capacity = len({b for c in chains for b in c}) // 50
    lru = token_ratio(simulate_lru(chains, capacity).hits, 512, tokens)
    assert oracle_ratio(chains, tokens, capacity) > lru


def test_the_study_prints_one_row_per_design(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--limit", "400", "--fractions", "0.05", "--designs", "LRU", "depth 4 / 16"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows] == ["| design", "| LRU", "| depth 4 / 16"]


def test_reuse_shares_count_every_reference_of_a_new_or_used_block(
    capsys: pytest.CaptureFixture[str],
) -> None:
    chains = [[1, 2, 3], [1, 2, 4], [1, 5], [9]]
    shares = reuse_shares(chains)
    # new non-last blocks: 1 and 2 of the first request (both used again), 5 is a last block
    assert shares["new, all"] == (2, 1.0)
    # block 1 used once before, again at request 2; block 2 once before, never again
    assert shares["used 1, idle 01 (octave of requests)"] == (2, 0.5)
    assert shares["used 2, idle 01 (octave of requests)"] == (1, 0.0)
    assert main(["--limit", "2000", "--shares"]) == 0
    assert "| new, all |" in capsys.readouterr().out
