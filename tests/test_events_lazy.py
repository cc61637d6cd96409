"""Events are built lazily: nothing is hashed for a medium nobody keeps, and a queued run of
pages builds, when taken, exactly the event it would have built when it was queued."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from array import array
from typing import Any

import pytest
import torch

from hicache.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventQueue,
    Medium,
    StoredRun,
    build_events,
    per_block,
)
from hicache.hiradix import HiRadixCache
from hicache.keys import (
    ModelIdentity,
    block_id,
    block_ids,
    chain_hashes,
    seed_hash,
    tokens_to_bytes,
)
from hicache.pools import DevicePool, HostPool, KVLayout
from hicache.radix import RadixCache
from hicache.transfer import CpuTransferEngine

PS = 4
SEED = seed_hash(ModelIdentity("lazy-events"))


def _cache(events: bool) -> HiRadixCache:
    layout = KVLayout(1, 1, 2, PS, torch.float32)
    dev = DevicePool(layout, 64, "cpu")
    host = HostPool(layout, 64, pin=False)
    return HiRadixCache(
        dev,
        host,
        CpuTransferEngine(dev, host),
        identity=ModelIdentity("lazy-events"),
        events=events,
    )


def _expected(tokens: list[int], medium: str, parent: bytes = SEED) -> list[BlockStored]:
    """The one ``BlockStored`` a run of pages gives: every page's id, chained after ``parent``."""
    ids = [block_id(h) for h in chain_hashes(parent, tokens, PS)]
    prev = None if parent == SEED else block_id(parent)
    return [BlockStored(ids, prev, list(tokens), PS, None, medium)]


def test_events_off_hash_nothing() -> None:
    cache = _cache(events=False)
    tokens = list(range(100, 100 + 4 * PS))
    pages = cache.device_pool.alloc(4)
    assert pages is not None
    cache.insert(tokens, pages)
    cache.writing_check()  # the CPU engine copied in submit: this finishes the write
    node = cache.match_prefix(tokens).last_node
    assert node.host_value is not None and not cache.ongoing_write_through  # acked
    assert node.hashes is None  # no event wanted them, no tier published them
    assert cache.take_events() == [] and len(cache.events) == 0


def test_events_on_build_every_page_once_per_medium() -> None:
    cache = _cache(events=True)
    tokens = list(range(7, 7 + 3 * PS))
    pages = cache.device_pool.alloc(3)
    assert pages is not None
    cache.insert(tokens, pages)
    assert len(cache.events) == 1  # one run, one event
    cache.writing_check()
    assert len(cache.events) == 2
    got = cache.take_events()
    assert got == _expected(tokens, Medium.GPU) + _expected(tokens, Medium.CPU_PINNED)
    # own lists per event: a consumer that extends one event's lists changes no other
    stored = [e for e in got if isinstance(e, BlockStored)]
    assert len({id(e.token_ids) for e in stored}) == len({id(e.block_hashes) for e in stored})
    assert len({id(e.block_hashes) for e in stored}) == len(got)


def test_a_run_queued_before_a_split_builds_what_it_held_then() -> None:
    tree = RadixCache(PS, gpu_events=True, seed=SEED)
    tokens = list(range(1, 1 + 4 * PS))
    tree.insert(tokens, [0, 1, 2, 3])
    # a match ending inside the node splits it before the run is built
    tree.match_prefix(tokens[: 2 * PS] + [999] * PS)
    assert len(tree.root.children) == 1
    prefix = next(iter(tree.root.children.values()))
    assert prefix.num_tokens == 2 * PS
    assert tree.take_events() == _expected(tokens, Medium.GPU)


def test_runs_over_the_same_pages_share_their_decoding() -> None:
    tokens = list(range(50, 50 + 2 * PS))
    hashes = chain_hashes(SEED, tokens, PS)
    packed = tokens_to_bytes(tokens)
    assert packed is not None
    runs = [StoredRun(hashes, None, packed, PS, 3, m) for m in (Medium.GPU, Medium.CPU_PINNED)]
    built = build_events(runs)
    assert [e.medium for e in built if isinstance(e, BlockStored)] == ["GPU", "CPU_PINNED"]
    assert built == [runs[0].build(), runs[1].build()]
    assert all(isinstance(e, BlockStored) and e.lora_id == 3 for e in built)


def test_overflow_counts_a_run_as_one_event() -> None:
    tokens = list(range(10, 10 + 3 * PS))
    packed = tokens_to_bytes(tokens)
    assert packed is not None
    q = EventQueue(max_events=2)
    q.put(StoredRun(chain_hashes(SEED, tokens, PS), None, packed, PS, None, "GPU"))
    q.put(StoredRun(chain_hashes(SEED, tokens, PS), None, packed, PS, None, "CPU_PINNED"))
    assert len(q) == 2 and q.overflows == 0
    q.put(StoredRun(chain_hashes(SEED, tokens, PS), None, packed, PS, None, "DISK"))
    got = q.take()
    assert q.overflows == 1 and q.dropped == 2
    assert got == [AllBlocksCleared(), *_expected(tokens, "DISK")]


def test_block_ids_match_block_id_and_refuse_short_hashes() -> None:
    hashes = chain_hashes(SEED, list(range(8 * PS)), PS)
    assert block_ids(hashes) == [block_id(h) for h in hashes]
    assert block_ids([]) == []
    with pytest.raises(ValueError, match="32 bytes each"):
        block_ids([hashes[0][:16]])


def test_an_insert_keeps_its_own_copy_of_a_list_key_for_the_event() -> None:
    tree = RadixCache(PS, gpu_events=True, seed=SEED)
    tokens = list(range(30, 30 + 2 * PS))
    want = _expected(tokens, Medium.GPU)
    tree.insert(tokens, [0, 1])
    tokens[:] = [0] * len(tokens)  # the caller reuses its list before the events are taken
    assert tree.take_events() == want


def test_per_block_splits_a_run_into_chained_pages() -> None:
    tokens = list(range(60, 60 + 3 * PS))
    hashes = chain_hashes(SEED, tokens, PS)
    ids = [block_id(h) for h in hashes]
    run = _expected(tokens[PS:], Medium.GPU, parent=hashes[0])
    removed = BlockRemoved(ids, Medium.GPU)
    assert per_block([*run, removed]) == [
        BlockStored([ids[1]], ids[0], tokens[PS : 2 * PS], PS, None, Medium.GPU),
        BlockStored([ids[2]], ids[1], tokens[2 * PS :], PS, None, Medium.GPU),
        removed,
    ]


def _packed_tokens(event: BlockStored) -> Any:
    """What the event holds for its tokens (packed bytes until ``token_ids`` is read)."""
    return BlockStored.__dict__["_token_ids"].__get__(event)


def test_a_packed_event_decodes_its_tokens_once_on_first_read() -> None:
    tokens = [0, 1, 127_999, 2**32 - 1, 7, 7, 8, 9]
    packed = tokens_to_bytes(tokens)
    assert packed is not None
    hashes = chain_hashes(SEED, tokens, PS)
    ids = [block_id(h) for h in hashes]
    lazy = BlockStored.packed(ids, 5, packed, PS, 2, Medium.GPU)
    assert _packed_tokens(lazy) == packed  # nothing decoded yet
    first = lazy.token_ids
    assert type(first) is list and first == tokens
    assert lazy.token_ids is first  # decoded once, then the event's own list
    plain = BlockStored(ids, 5, list(tokens), PS, 2, Medium.GPU)
    fresh = BlockStored.packed(ids, 5, packed, PS, 2, Medium.GPU)
    # every other way in sees the list: equality, repr, to_dict, copies, pickles, fields
    assert fresh == plain and repr(fresh) == repr(plain)
    assert BlockStored.packed(ids, 5, packed, PS, 2, Medium.GPU).to_dict() == plain.to_dict()
    lazy2 = BlockStored.packed(ids, 5, packed, PS, 2, Medium.GPU)
    assert copy.copy(lazy2) == plain and pickle.loads(pickle.dumps(lazy2)) == plain
    assert dataclasses.astuple(BlockStored.packed(ids, 5, packed, PS, 2, Medium.GPU)) == (
        dataclasses.astuple(plain)
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        lazy.token_ids = []  # type: ignore[misc]
    # what the constructor took comes back as it is (a list stays that very list)
    assert (
        plain.token_ids == tokens and BlockStored(ids, 5, tokens, PS, 2, "GPU").token_ids is tokens
    )


def test_events_nobody_reads_the_tokens_of_keep_them_packed() -> None:
    cache = _cache(events=True)
    tokens = list(range(300, 300 + 3 * PS))
    pages = cache.device_pool.alloc(3)
    assert pages is not None
    cache.insert(tokens, pages)
    cache.writing_check()
    got = [e for e in cache.take_events() if isinstance(e, BlockStored)]
    assert [e.medium for e in got] == [Medium.GPU, Medium.CPU_PINNED]
    node = cache.match_prefix(tokens).last_node
    # both events share the node's own packed tokens: nothing decoded, nothing copied
    shared = holder = _packed_tokens(got[0])
    assert _packed_tokens(got[1]) is shared
    assert shared.packed is node.tokens and shared._list is None
    want = [_expected(tokens, m)[0] for m in (Medium.GPU, Medium.CPU_PINNED)]
    assert got == want  # read now: the ids, chained hashes and tokens of before
    # decoded once for both, each event its own list: extending one changes no other
    assert holder._list == tokens
    assert got[0].token_ids is not got[1].token_ids
    got[0].token_ids.append(1)
    assert got[1].token_ids == tokens


def test_write_through_host_pages_are_an_array_from_the_pool() -> None:
    cache = _cache(events=True)
    tokens = list(range(400, 400 + 4 * PS))
    pages = cache.device_pool.alloc(4)
    assert pages is not None
    cache.insert(tokens, pages)
    cache.writing_check()
    node = cache.match_prefix(tokens).last_node
    host = node.host_value
    assert isinstance(host, array) and len(host) == 4
    cache.match_prefix(tokens[: 2 * PS] + [1] * PS)  # a split slices the array
    assert cache.evict(4) == 4  # both halves keep their host copy, L2-only
    r = cache.match_prefix(tokens)
    assert r.host_hit_pages == 4
    back = cache.load_back(r.last_host_node)
    assert back is not None and len(back) == 4
    assert cache.match_prefix(tokens).device_pages == back
    free_before = cache.host_pool.available
    assert cache.evict(4) == 4 and cache.evict_host(4) == 4
    assert cache.host_pool.available == free_before + 4
