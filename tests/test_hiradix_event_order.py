"""Events in prefix order, and every page a tier acknowledged announced (issue 15, section 8).

- A prefetch that inserts L3 pages under a node whose write-through is still pending must not
  announce them ``CPU_PINNED`` before the parent's ack announces the parent.
- A page a prefetch read back before the engine processed that page's put result must still be
  announced on its tier, before the children announced under it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import torch

from hicache.config import TierSettings
from hicache.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    Medium,
    per_block,
)
from hicache.hiradix import HiRadixCache, WritePolicy
from hicache.keys import ModelIdentity, block_id, chain_hashes, seed_hash, storage_key
from hicache.pools import DevicePool, HostPool, KVLayout
from hicache.storage.backend import Backend, BackendContext
from hicache.storage.memory import MemoryBackend, MemoryConfig
from hicache.testing.faults import FaultOp, FaultyBackend
from hicache.tiering.tiers import Tiers
from hicache.transfer import CpuTransferEngine, ManualTransferEngine, TransferEngine

PS = 4
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, page_size=PS, dtype=torch.float32)
IDENTITY = ModelIdentity("order")
NS = LAYOUT.namespace_spec().namespace()


def mem(name: str) -> MemoryBackend:
    ctx = BackendContext(page_bytes=LAYOUT.page_bytes, namespace=NS, tier_name="disk")
    return MemoryBackend(MemoryConfig(shared_name=name), ctx)


def make(backend: Backend, manual: bool, deadline_s: float = 120.0) -> HiRadixCache:
    dev = DevicePool(LAYOUT, 16, "cpu")
    host = HostPool(LAYOUT, 16, pin=False)
    transfer: TransferEngine = (
        ManualTransferEngine(dev, host) if manual else CpuTransferEngine(dev, host)
    )
    # a long deadline by default: a put held back by the test is a slow put, never a failed one
    settings = TierSettings(deadline_s=deadline_s, medium=Medium.DISK)
    return HiRadixCache(
        dev,
        host,
        transfer,
        identity=IDENTITY,
        tiers=Tiers.from_backends([("disk", backend, settings)]),
        write_policy=WritePolicy.MANUAL if manual else WritePolicy.WRITE_THROUGH,
        prefetch_threshold_tokens=0,
        gpu_events=False,
    )


def insert(cache: HiRadixCache, tokens: list[int]) -> None:
    pages = cache.device_pool.alloc(len(tokens) // PS)
    assert pages is not None
    for j, p in enumerate(pages):
        cache.device_pool.write_page(p, torch.full(LAYOUT.page_shape, float(tokens[j * PS])))
    dup = cache.insert(tokens, pages)
    cache.device_pool.free(pages[: dup // PS])


def settle(cache: HiRadixCache) -> None:
    assert cache.storage is not None
    cache.writing_check()
    assert cache.storage.wait_idle(timeout=60)
    cache.writing_check()
    assert cache.storage.wait_idle(timeout=60)
    cache.writing_check()


def out_of_order(events: Iterable[KVEvent]) -> list[tuple[str, int, int | None]]:
    """``(medium, block, parent)`` of every ``BlockStored`` whose parent was not announced on
    that medium before (and not removed since); a block announced twice in one residency is
    reported with itself as the parent."""
    resident: dict[str, set[int]] = {}
    bad: list[tuple[str, int, int | None]] = []
    for e in events:
        if isinstance(e, AllBlocksCleared):
            resident.clear()
        elif isinstance(e, BlockRemoved):
            resident.setdefault(e.medium, set()).difference_update(e.block_hashes)
        elif isinstance(e, BlockStored):
            on = resident.setdefault(e.medium, set())
            parent = e.parent_block_hash
            for bid in e.block_hashes:
                if parent is not None and parent not in on:
                    bad.append((e.medium, bid, parent))
                if bid in on:
                    bad.append((e.medium, bid, bid))
                on.add(bid)
                parent = bid
    return bad


def test_prefetched_pages_under_a_pending_write_are_announced_after_its_ack() -> None:
    name = "o" + uuid.uuid4().hex[:12]
    cache = make(mem(name), manual=True)
    assert isinstance(cache.transfer, ManualTransferEngine)
    head = list(range(100, 100 + 2 * PS))
    tail = list(range(500, 500 + 2 * PS))
    ids = [block_id(h) for h in chain_hashes(seed_hash(IDENTITY), head + tail, PS)]
    try:
        # head and tail reach the tier, then leave L1 and L2
        insert(cache, head + tail)
        r = cache.match_prefix(head + tail)
        assert cache.write_backup(r.last_node) is not None
        cache.transfer.complete_all()
        settle(cache)
        cache.evict(4)
        assert cache.evict_host(4) == 4
        events = cache.take_events()

        # the head comes back on the device; its write-through is pending (no ack yet)
        insert(cache, head)
        head_node = cache.match_prefix(head).last_node
        assert cache.write_backup(head_node) is not None
        handle = cache.prefetch_from_storage(head + tail)
        assert handle is not None and handle.base is head_node
        assert cache.check_prefetch(handle, wait=True) == 2 * PS  # the tail hangs below the head
        mid = cache.take_events()
        # nothing of the head is announced on the host yet, so nothing below it either
        assert [
            e for e in mid if isinstance(e, BlockStored) and e.medium == Medium.CPU_PINNED
        ] == []

        cache.transfer.complete_all()
        settle(cache)
        later = cache.take_events()
        host = [
            (e.block_hashes[0], e.parent_block_hash)
            for e in per_block(mid + later)
            if isinstance(e, BlockStored) and e.medium == Medium.CPU_PINNED
        ]
        # the head at its ack, then the tail below it
        assert host == list(zip(ids, [None, *ids[:3]], strict=True))
        assert out_of_order(events + mid + later) == []
    finally:
        cache.close()
        MemoryBackend.drop_shared_store(name)


def test_a_page_read_back_before_its_put_result_is_still_announced_on_the_tier() -> None:
    name = "o" + uuid.uuid4().hex[:12]
    faulty = FaultyBackend(mem(name))
    # A lookup waits for the puts of the pages it looks up (``before_lookup``), so the head is
    # read back only once its held put passed its deadline: the put then answers late. The
    # deadline is short so that wait is seconds, not the default's two minutes; a put that is
    # not held and still runs past it is a late ack, announced all the same.
    cache = make(faulty, manual=False, deadline_s=5.0)
    head = list(range(100, 100 + PS))
    child = list(range(500, 500 + PS))
    hashes = chain_hashes(seed_hash(IDENTITY), head + child, PS)
    ids = [block_id(h) for h in hashes]
    other = mem(name)  # another instance sharing the tier already stored the head
    other.open()
    try:
        assert other.put([storage_key(hashes[0])], [memoryview(bytearray(LAYOUT.page_bytes))])[
            0
        ].stored
        release = faulty.hang(ops=[FaultOp.PUT], count=1)
        insert(cache, head)  # write-through: acked at once, published, the put held back
        cache.writing_check()
        assert faulty.wait_hung(1)
        cache.evict(1)
        assert cache.evict_host(1) == 1
        # the head is read back while its put result is still outstanding
        handle = cache.prefetch_from_storage(head)
        assert handle is not None
        assert cache.check_prefetch(handle, wait=True) == PS
        release.set()
        settle(cache)  # the put answers ALREADY_EXISTS: the tier acknowledged the head
        insert(cache, head + child)  # the child is published under the head
        settle(cache)
        events = cache.take_events()
        disk = [
            (e.block_hashes[0], e.parent_block_hash)
            for e in events
            if isinstance(e, BlockStored) and e.medium == Medium.DISK
        ]
        assert disk == [(ids[0], None), (ids[1], ids[0])]
        assert out_of_order(events) == []
    finally:
        other.close()
        cache.close()
        MemoryBackend.drop_shared_store(name)
