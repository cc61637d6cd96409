"""A tier that lost a chain's head gets it back ahead of a new fragment below it.

A shared head hot in L1/L2 is never touched on the tier, so the tier's own LRU can age it out
while chains below it keep being published: without republishing, those pages would be stored
but never announced and unreachable for a cold instance (the cascade stops at the head)."""

from __future__ import annotations

import uuid

import torch

from hicache.events import BlockRemoved, BlockStored, Medium
from hicache.hiradix import HiRadixCache, WritePolicy
from hicache.keys import ModelIdentity, block_id, chain_hashes, seed_hash, storage_key
from hicache.pools import DevicePool, HostPool, KVLayout
from hicache.storage.backend import BackendContext
from hicache.storage.memory import MemoryBackend, MemoryConfig
from hicache.testing.faults import FaultyBackend
from hicache.tiering.tiers import Tiers
from hicache.transfer import CpuTransferEngine

PS = 4
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, page_size=PS, dtype=torch.bfloat16)
IDENTITY = ModelIdentity("m", revision="r1")


def mem(name: str) -> MemoryBackend:
    ns = LAYOUT.namespace_spec(tp_rank=0, tp_size=1).namespace()
    ctx = BackendContext(page_bytes=LAYOUT.page_bytes, namespace=ns, tier_name="mem")
    return MemoryBackend(MemoryConfig(shared_name=name), ctx)


def make(backend: MemoryBackend | FaultyBackend) -> HiRadixCache:
    dev = DevicePool(LAYOUT, 32, "cpu")
    host = HostPool(LAYOUT, 32, pin=False)
    cache = HiRadixCache(
        dev,
        host,
        CpuTransferEngine(dev, host),
        identity=IDENTITY,
        tiers=Tiers.from_backends([("disk", backend)]),
        write_policy=WritePolicy.WRITE_THROUGH,
        prefetch_threshold_tokens=0,
        gpu_events=False,
    )
    assert cache.storage is not None
    cache.storage.evict_poll_interval_s = 0.0  # learn the tier's evictions at every poll
    return cache


def insert(cache: HiRadixCache, tokens: list[int], seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    pages = cache.device_pool.alloc(len(tokens) // PS)
    assert pages is not None
    for p in pages:
        cache.device_pool.write_page(
            p, torch.randn(LAYOUT.page_shape, generator=gen).to(LAYOUT.dtype)
        )
    dup = cache.insert(tokens, pages)
    cache.device_pool.free(pages[: dup // PS])
    return pages


def publish_all(cache: HiRadixCache) -> None:
    assert cache.storage is not None
    cache.writing_check()
    assert cache.storage.wait_idle(timeout=30)
    cache.writing_check()
    assert cache.storage.wait_idle(timeout=30)
    cache.writing_check()
    assert cache.host_pool.total_holds() == 0
    assert cache.storage.pending_groups() == 0


def disk_stored(cache: HiRadixCache) -> list[tuple[int, int | None]]:
    assert cache.storage is not None
    medium = cache.storage.tiers.tiers[0].medium
    assert medium != Medium.CPU_PINNED
    return [
        (e.block_hashes[0], e.parent_block_hash)
        for e in cache.take_events()
        if isinstance(e, BlockStored) and e.medium == medium
    ]


def test_evicted_head_is_republished_before_a_new_fragment_and_a_cold_instance_reads_it() -> None:
    name = "r" + uuid.uuid4().hex[:12]
    fb = FaultyBackend(mem(name))
    a = make(fb)
    head = list(range(100, 100 + 3 * PS))
    tail = list(range(500, 500 + 2 * PS))
    insert(a, head, seed=1)
    publish_all(a)
    ids = [block_id(h) for h in chain_hashes(seed_hash(IDENTITY), head + tail, PS)]
    keys = [storage_key(h) for h in chain_hashes(seed_hash(IDENTITY), head + tail, PS)]
    assert disk_stored(a) == list(zip(ids[:3], [None, *ids[:2]], strict=True))

    # the tier ages the head's last two pages out while the head stays hot in L1/L2
    fb.evict(keys[1:3])
    a.writing_check()
    assert a.storage is not None
    assert a.storage.wait_idle(timeout=30)
    a.writing_check()
    removed = [e for e in a.take_events() if isinstance(e, BlockRemoved)]
    assert [e.block_hashes for e in removed] == [ids[1:3]]
    assert fb.exists(keys[:3]) == [True, False, False]

    # a new fragment below the head: the lost pages go first, in order, then the fragment
    fb.put_log.clear()
    insert(a, head + tail, seed=2)
    publish_all(a)
    # each lost page and each new page written once (batches may reach the tier concurrently, so
    # the order of puts is free; the order of announcements below is not)
    assert sorted(fb.put_log) == sorted(keys[1:5])
    assert disk_stored(a) == list(zip(ids[1:5], ids[0:4], strict=True))
    tier = a.storage.tiers.tiers[0]
    assert tier.stats.republished_pages == 2
    assert a.storage.counters["republished_pages"] == 2
    assert a.storage.counters["published_pages"] == 5  # each acked page once; 2 republished
    assert fb.exists(keys) == [True] * 5

    # a cold instance sharing the tier reaches the whole chain, byte-identical
    b = make(mem(name))
    handle = b.prefetch_from_storage(head + tail)
    assert handle is not None
    assert b.check_prefetch(handle, wait=True) == 5 * PS
    r_a = a.match_prefix(head + tail)
    r_b = b.match_prefix(head + tail)
    assert r_b.host_hit_pages == 5
    dev_b = b.load_back(r_b.last_host_node)
    assert dev_b is not None

    def raw(c: HiRadixCache, pages: list[int]) -> list[bytes]:
        return [
            bytes(c.device_pool.read_page(p).contiguous().view(torch.uint8).numpy()) for p in pages
        ]

    assert raw(b, dev_b) == raw(a, r_a.device_pages)
    a.close()
    b.close()
    MemoryBackend.drop_shared_store(name)


def test_a_tier_holding_the_parent_gets_no_republish() -> None:
    name = "r" + uuid.uuid4().hex[:12]
    fb = FaultyBackend(mem(name))
    a = make(fb)
    head = list(range(100, 100 + 2 * PS))
    insert(a, head, seed=1)
    publish_all(a)
    fb.put_log.clear()
    insert(a, head + list(range(7, 7 + PS)), seed=2)
    publish_all(a)
    keys = [
        storage_key(h) for h in chain_hashes(seed_hash(IDENTITY), head + list(range(7, 7 + PS)), PS)
    ]
    assert fb.put_log == keys[2:]
    assert a.storage is not None and a.storage.counters["republished_pages"] == 0
    a.close()
    MemoryBackend.drop_shared_store(name)
