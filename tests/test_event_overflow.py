"""A bounded event queue never leaves a consumer believing in a block that is gone."""

from __future__ import annotations

import logging
import random

import pytest
from pydantic import ValidationError

from hicache.config import HicacheConfig
from hicache.events import AllBlocksCleared, BlockRemoved, BlockStored, EventQueue, KVEvent


def stored(*ids: int) -> BlockStored:
    return BlockStored(list(ids), None, [], 16, None, "CPU_PINNED")


def removed(*ids: int) -> BlockRemoved:
    return BlockRemoved(list(ids), "CPU_PINNED")


def apply(view: set[int], events: list[KVEvent]) -> None:
    """What a router does with the events of one cache."""
    for event in events:
        if isinstance(event, AllBlocksCleared):
            view.clear()
        elif isinstance(event, BlockStored):
            view.update(event.block_hashes)
        else:
            view.difference_update(event.block_hashes)


def test_overflow_keeps_the_newest_events_after_a_clear_marker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    queue = EventQueue(max_events=4)
    with caplog.at_level(logging.WARNING, logger="hicache.events"):
        for i in range(6):
            queue.put(stored(i))
    events = queue.take()
    assert isinstance(events[0], AllBlocksCleared)
    assert events[1:] == [stored(3), stored(4), stored(5)]
    assert (queue.dropped, queue.overflows) == (3, 2)
    # Warned once, naming the bound and the knob.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "max_events=4" in warnings[0].getMessage()
    assert "events.max_queue" in warnings[0].getMessage()
    # A drained queue starts clean: no marker without a new overflow.
    queue.extend([removed(3)])
    assert queue.take() == [removed(3)]


def test_a_batch_larger_than_the_bound_keeps_its_suffix() -> None:
    queue = EventQueue(max_events=3)
    queue.extend([stored(1), stored(2), removed(1), stored(3)])
    assert queue.take() == [AllBlocksCleared(), removed(1), stored(3)]
    assert queue.dropped == 2


@pytest.mark.parametrize("seed", range(20))
def test_consumer_view_is_never_more_than_the_truth(seed: int) -> None:
    """A router draining at random moments: its view is always a subset of what is cached,
    and equal to it whenever nothing overflowed since it last caught up."""
    rng = random.Random(seed)
    queue = EventQueue(max_events=rng.randint(2, 12))
    truth: set[int] = set()
    view: set[int] = set()
    exact = True
    for _ in range(400):
        if truth and rng.random() < 0.45:
            gone = rng.sample(sorted(truth), rng.randint(1, min(3, len(truth))))
            truth.difference_update(gone)
            queue.put(removed(*gone))
        else:
            new = [rng.randrange(10_000) for _ in range(rng.randint(1, 3))]
            truth.update(new)
            queue.put(stored(*new))
        if rng.random() < 0.2:
            overflows = queue.overflows
            events = queue.take()
            apply(view, events)
            assert view <= truth
            if overflows == 0 and exact:
                assert view == truth
            exact = exact and overflows == 0


def test_bound_below_two_is_refused() -> None:
    with pytest.raises(ValueError, match=r"max_events must be >= 2.*got 1"):
        EventQueue(max_events=1)
    with pytest.raises(ValidationError, match="max_queue"):
        HicacheConfig(events={"max_queue": 1})


def test_cache_from_config_bounds_its_events_and_counts_what_it_dropped() -> None:
    pytest.importorskip("torch")
    from hicache.hiradix import HiRadixCache

    config = HicacheConfig(
        cache={"page_size": 4, "host_pool": 64 * 1024, "device": "cpu"},
        model={"name": "events-model", "num_layers": 1, "num_kv_heads": 1, "head_dim": 4},
        events={"max_queue": 5},
    )
    cache = HiRadixCache.from_config(config, device_pages=64)  # events on: GPU ones too
    try:
        for start in range(0, 40, 4):  # ten one-page sequences, one GPU event each
            pages = cache.device_pool.alloc(1)
            assert pages is not None
            cache.insert(list(range(1000 + start, 1004 + start)), pages)
        stats = cache.stats()
        assert stats["events_overflows"] >= 1
        assert stats["events_dropped"] == 10 - 4
        events = cache.take_events()
        assert isinstance(events[0], AllBlocksCleared) and len(events) == 5
    finally:
        cache.close()
