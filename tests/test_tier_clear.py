"""Wiping one L3 tier: BlockRemoved(<tier medium>) for exactly its blocks, in bounded batches,
never AllBlocksCleared; the other media keep theirs, and the tier's chains are announced again
once republished."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from hicache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from hicache.keys import block_id

torch = pytest.importorskip("torch")

from hicache.config import HicacheConfig  # noqa: E402
from hicache.hiradix import HiRadixCache  # noqa: E402
from hicache.tiering.clear import clear_tier  # noqa: E402

WAIT_S = 60.0
PS = 4


def _config(**tier: Any) -> HicacheConfig:
    return HicacheConfig(
        cache={"page_size": PS, "device": "cpu", "host_pool": "64KiB"},
        model={"name": "org/m", "num_layers": 1, "num_kv_heads": 1, "head_dim": 8},
        storage={"tiers": {"ram": {"backend": "memory", "medium": "CPU", **tier}}},
    )


@pytest.fixture
def cache() -> Iterator[HiRadixCache]:
    c = HiRadixCache.from_config(_config(), device_pages=64)
    yield c
    c.close()


def serve(cache: HiRadixCache, tokens: list[int]) -> None:
    """Insert ``tokens`` and let the write-through and its publishes finish."""
    r = cache.match_prefix(tokens)
    need = len(tokens) // PS - len(r.device_pages)
    new = cache.device_pool.alloc(need)
    assert new is not None
    cache.insert(tokens, r.device_pages + new)
    while cache.ongoing_write_through:
        cache.writing_check()
    assert cache.storage is not None and cache.storage.wait_idle(WAIT_S)
    cache.writing_check()


def on_medium(events: list[KVEvent], medium: str) -> tuple[list[int], list[int]]:
    stored = [
        b
        for e in events
        if isinstance(e, BlockStored) and e.medium == medium
        for b in e.block_hashes
    ]
    removed = [
        b
        for e in events
        if isinstance(e, BlockRemoved) and e.medium == medium
        for b in e.block_hashes
    ]
    return stored, removed


def test_clearing_a_tier_removes_exactly_its_blocks_in_bounded_batches(
    cache: HiRadixCache,
) -> None:
    serve(cache, list(range(40)))  # 10 pages
    serve(cache, [*range(20), *range(500, 520)])  # 5 shared, 5 more
    before = cache.take_events()
    stored_l3, _ = on_medium(before, "CPU")
    tier = cache.tiers["ram"]  # type: ignore[index]
    listed = {block_id(p.key) for p in tier.backend.iter_pages()}
    assert len(stored_l3) == 15 and set(stored_l3) == listed

    assert cache.storage is not None
    events: list[KVEvent] = []
    assert clear_tier(cache.storage, "ram", events, max_ids=4) == 15
    assert all(isinstance(e, BlockRemoved) and e.medium == "CPU" for e in events)
    assert [len(e.block_hashes) for e in events] == [4, 4, 4, 3]  # type: ignore[union-attr]
    assert {b for e in events for b in e.block_hashes} == listed  # type: ignore[union-attr]
    assert not list(tier.backend.iter_pages())
    # the public method on a now empty tier: nothing to remove, and never a clear-all
    assert cache.clear_storage_tier("ram") == 0
    after = cache.take_events()
    assert not any(isinstance(e, AllBlocksCleared) for e in after)
    assert on_medium(after, "GPU") == ([], []) and on_medium(after, "CPU_PINNED") == ([], [])


def test_a_cleared_tier_is_announced_again_when_its_pages_come_back(
    cache: HiRadixCache,
) -> None:
    serve(cache, list(range(16)))  # 4 pages, on every medium
    cache.take_events()
    assert cache.clear_storage_tier("ram") == 4
    removed = cache.take_events()
    assert on_medium(removed, "CPU")[1] and not any(
        isinstance(e, AllBlocksCleared) for e in removed
    )
    # a longer prompt on the same prefix: the new page is published, and its ancestors the
    # tier lost are published again ahead of it, so the whole chain is announced on the tier
    serve(cache, [*range(16), *range(900, 904)])
    stored, _ = on_medium(cache.take_events(), "CPU")
    tier = cache.tiers["ram"]  # type: ignore[index]
    listed = {block_id(p.key) for p in tier.backend.iter_pages()}
    assert len(listed) == 5 and set(stored) == listed


def test_tiers_that_cannot_be_cleared_say_why() -> None:
    c = HiRadixCache.from_config(_config(read_only=True, publish=False), device_pages=8)
    try:
        with pytest.raises(ValueError, match="'ram' is read_only"):
            c.clear_storage_tier("ram")
        with pytest.raises(KeyError, match="no tier named 'nope'"):
            c.clear_storage_tier("nope")
    finally:
        c.close()
