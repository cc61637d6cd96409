"""HiRadixCache and storage tiers: cross-instance prefetch, namespaces, cascade, config wiring."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from hicache.config import HicacheConfig, TierSettings
from hicache.events import BlockStored, Medium, per_block
from hicache.hiradix import HiRadixCache, WritePolicy
from hicache.keys import ModelIdentity, chain_hashes, seed_hash, storage_key
from hicache.pools import DevicePool, HostPool, KVLayout
from hicache.storage.backend import Backend, Capabilities, PageStatus
from hicache.storage.memory import MemoryBackend
from hicache.testing.backends import memory_backend, shared_store_name
from hicache.testing.faults import FaultOp, FaultyBackend
from hicache.tiering.tiers import Tiers
from hicache.transfer import CpuTransferEngine

PS = 4
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, page_size=PS, dtype=torch.bfloat16)
IDENTITY = ModelIdentity("m", revision="r1")


shared_name = shared_store_name


def mem(
    shared: str | None, *, layout: KVLayout = LAYOUT, tp_rank: int = 0, tp_size: int = 1
) -> MemoryBackend:
    ns = layout.namespace_spec(tp_rank=tp_rank, tp_size=tp_size).namespace()
    return memory_backend(layout.page_bytes, namespace=ns, tier_name="mem", shared=shared)


def make(
    tiers: Sequence[tuple[str, Backend]] | Tiers,
    *,
    identity: ModelIdentity = IDENTITY,
    layout: KVLayout = LAYOUT,
    device_pages: int = 32,
    host_pages: int = 32,
    threshold: int = 0,
    policy: WritePolicy = WritePolicy.WRITE_THROUGH,
    **extra: Any,
) -> HiRadixCache:
    """A CPU cache over ``tiers``; ``extra`` goes to ``HiRadixCache`` (events, rank_sync...)."""
    dev = DevicePool(layout, device_pages, "cpu")
    host = HostPool(layout, host_pages, pin=False)
    return HiRadixCache(
        dev,
        host,
        CpuTransferEngine(dev, host),
        identity=identity,
        tiers=tiers if isinstance(tiers, Tiers) else Tiers.from_backends(tiers),
        write_policy=policy,
        prefetch_threshold_tokens=threshold,
        **{"gpu_events": False, **extra},
    )


def fill_and_insert(cache: HiRadixCache, tokens: list[int], seed: int = 0) -> list[int]:
    """Insert with random KV bytes in the device pages, as a model would have computed them."""
    gen = torch.Generator().manual_seed(seed)
    pages = cache.device_pool.alloc(len(tokens) // PS)
    assert pages is not None
    for p in pages:
        cache.device_pool.write_page(
            p,
            torch.randn(cache.device_pool.layout.page_shape, generator=gen).to(
                cache.device_pool.layout.dtype
            ),
        )
    dup = cache.insert(tokens, pages)
    cache.device_pool.free(pages[: dup // PS])
    return pages


def publish_all(cache: HiRadixCache) -> None:
    cache.writing_check()
    assert cache.storage is not None
    assert cache.storage.wait_idle(timeout=30)
    cache.writing_check()
    assert cache.host_pool.total_holds() == 0


def page_bytes(cache: HiRadixCache, pages: Sequence[int]) -> list[bytes]:
    return [
        bytes(cache.device_pool.read_page(p).contiguous().view(torch.uint8).numpy()) for p in pages
    ]


def test_second_instance_prefetches_longest_stored_prefix_byte_identical() -> None:
    name = shared_name()
    a = make([("mem", mem(name))])
    tokens = list(range(100, 100 + 8 * PS))
    a_pages = fill_and_insert(a, tokens)
    publish_all(a)
    # break the stored chain after page 5: the second instance must stop exactly there
    keys = [storage_key(h) for h in chain_hashes(seed_hash(IDENTITY), tokens, PS)]
    mem_a = a.tiers.tiers[0].backend  # type: ignore[union-attr]
    assert mem_a.exists(keys) == [True] * 8
    mem_a.delete([keys[5]])

    b = make([("mem", mem(name))])
    handle = b.prefetch_from_storage([*tokens, 1, 2])  # a partial trailing page is ignored
    assert handle is not None
    assert b.check_prefetch(handle, wait=True) == 5 * PS
    events = b.take_events()
    pages = [tokens[i * PS : (i + 1) * PS] for i in range(5)]
    # on the host, and on the tier they were read from (they are on it)
    assert b.tiers is not None
    for medium in (Medium.CPU_PINNED, b.tiers.tiers[0].medium):
        stored = [e for e in per_block(events) if isinstance(e, BlockStored) and e.medium == medium]
        assert [e.token_ids for e in stored] == pages
    r = b.match_prefix(tokens)
    assert r.device_pages == [] and r.host_hit_pages == 5
    dev = b.load_back(r.last_host_node)
    assert dev is not None
    assert page_bytes(b, dev) == page_bytes(a, a_pages[:5])
    assert b.host_pool.total_holds() == 0
    assert b.host_pool.available == 32 - 5  # the 3 pages that were not found went back
    a.close()
    b.close()
    MemoryBackend.drop_shared_store(name)


def test_prefetch_below_threshold_or_fully_cached_does_nothing() -> None:
    name = shared_name()
    a = make([("mem", mem(name))], threshold=3 * PS)
    tokens = list(range(4 * PS))
    fill_and_insert(a, tokens)
    publish_all(a)
    assert a.prefetch_from_storage(tokens) is None  # everything is cached already
    b = make([("mem", mem(name))], threshold=3 * PS)
    assert b.prefetch_from_storage(tokens[: 2 * PS]) is None  # 2 pages < threshold
    handle = b.prefetch_from_storage(tokens)
    assert handle is not None and b.check_prefetch(handle, wait=True) == 4 * PS
    a.close()
    b.close()
    MemoryBackend.drop_shared_store(name)


def test_prefetch_extends_a_cached_prefix() -> None:
    name = shared_name()
    a = make([("mem", mem(name))])
    tokens = list(range(6 * PS))
    a_pages = fill_and_insert(a, tokens)
    publish_all(a)
    b = make([("mem", mem(name))])
    # b computed the first two pages itself (same model, so the same KV)
    pages = b.device_pool.alloc(2)
    assert pages is not None
    for src, dst in zip(a_pages[:2], pages, strict=True):
        b.device_pool.write_page(dst, a.device_pool.read_page(src))
    b.insert(tokens[: 2 * PS], pages)
    publish_all(b)
    handle = b.prefetch_from_storage(tokens)
    assert handle is not None and handle.start == 2 * PS
    assert b.check_prefetch(handle, wait=True) == 4 * PS
    r = b.match_prefix(tokens)
    assert len(r.device_pages) == 2 and r.host_hit_pages == 4
    dev = b.load_back(r.last_host_node)
    assert dev is not None and page_bytes(b, dev) == page_bytes(a, a_pages[2:])
    a.close()
    b.close()
    MemoryBackend.drop_shared_store(name)


@pytest.mark.parametrize(
    ("a_kw", "b_kw", "shared"),
    [
        (
            {"identity": ModelIdentity("m", revision="r1")},
            {"identity": ModelIdentity("m", revision="r2")},
            False,
        ),
        ({"tp": (0, 2)}, {"tp": (1, 2)}, False),
        ({"tp": (0, 2), "mla": True}, {"tp": (1, 2), "mla": True}, True),
    ],
    ids=["revisions", "tp-ranks", "mla-ranks-share"],
)
def test_namespace_isolation(
    a_kw: dict[str, object], b_kw: dict[str, object], shared: bool
) -> None:
    name = shared_name()

    def build(kw: dict[str, object]) -> HiRadixCache:
        layout = KVLayout(
            2, 1 if kw.get("mla") else 2, 8, PS, torch.bfloat16, mla=bool(kw.get("mla"))
        )
        rank, size = kw.get("tp", (0, 1))  # type: ignore[misc]
        identity = kw.get("identity", IDENTITY)
        return make(
            [("mem", mem(name, layout=layout, tp_rank=rank, tp_size=size))],
            layout=layout,
            identity=identity,  # type: ignore[arg-type]
        )

    a, b = build(a_kw), build(b_kw)
    tokens = list(range(3 * PS))
    fill_and_insert(a, tokens)
    publish_all(a)
    handle = b.prefetch_from_storage(tokens)
    assert handle is not None
    assert b.check_prefetch(handle, wait=True) == (3 * PS if shared else 0)
    assert b.host_pool.available == b.host_pool.num_pages - (3 if shared else 0)
    a.close()
    b.close()
    MemoryBackend.drop_shared_store(name)


def test_prefetch_stops_at_first_page_that_is_not_ok() -> None:
    name = shared_name()
    a = make([("mem", mem(name))])
    tokens = list(range(5 * PS))
    fill_and_insert(a, tokens)
    publish_all(a)
    keys = [storage_key(h) for h in chain_hashes(seed_hash(IDENTITY), tokens, PS)]
    flaky = FaultyBackend(mem(name), capabilities=Capabilities(default_medium="EXTERNAL"))
    flaky.fail_keys([keys[3]], PageStatus.CORRUPT, ops=[FaultOp.GET])  # a vanished or bad page
    b = make([("flaky", flaky)])
    handle = b.prefetch_from_storage(tokens)
    assert handle is not None and b.check_prefetch(handle, wait=True) == 3 * PS
    assert b.host_pool.available == 32 - 3
    a.close()
    b.close()
    MemoryBackend.drop_shared_store(name)


def test_cascade_reads_each_page_from_the_tier_that_has_it() -> None:
    fast, slow = shared_name(), shared_name()
    a = make([("mem", mem(slow))])
    tokens = list(range(6 * PS))
    a_pages = fill_and_insert(a, tokens)
    publish_all(a)
    keys = [storage_key(h) for h in chain_hashes(seed_hash(IDENTITY), tokens, PS)]
    first = mem(fast)
    first.open()
    buf = bytearray(LAYOUT.page_bytes)
    slow_view = mem(slow)
    slow_view.open()
    for k in keys[:2]:  # the first tier holds only the head of the chain
        assert slow_view.get_into([k], [memoryview(buf)]) == [PageStatus.OK]
        first.put([k], [memoryview(buf)])
    tiers = Tiers.from_backends(
        [
            ("fast", first, TierSettings(publish=False)),
            ("slow", mem(slow), TierSettings(publish=False)),
        ]
    )
    tiers.open()
    ranges = [(r.tier.name, r.start, r.end) for r in tiers.lookup(keys)]
    assert ranges == [("fast", 0, 2), ("slow", 2, 6)]
    b = make(tiers, device_pages=16, host_pages=16)
    handle = b.prefetch_from_storage(tokens)
    assert handle is not None and b.check_prefetch(handle, wait=True) == 6 * PS
    stats = b.stats()["storage"]["tiers"]  # type: ignore[index]
    assert stats["fast"]["get_ok"] == 2 and stats["slow"]["get_ok"] == 4
    r = b.match_prefix(tokens)
    out = b.load_back(r.last_host_node)
    assert out is not None and page_bytes(b, out) == page_bytes(a, a_pages)
    # nothing was published back (both tiers have publish: false)
    assert b.writing_check() >= 0 and stats["fast"]["put_pages"] == 0
    a.close()
    b.close()
    for n in (fast, slow):
        MemoryBackend.drop_shared_store(n)


def test_from_config_builds_tiers_through_the_registry() -> None:
    name = shared_name()
    config = HicacheConfig(
        cache={"page_size": PS, "host_pool": 64 * 1024, "device": "cpu"},
        model={"name": "cfg-model", "num_layers": 2, "num_kv_heads": 2, "head_dim": 4},
        storage={
            "prefetch": {"threshold_tokens": 0},
            "tiers": {"shm": {"backend": "memory", "options": {"shared_name": name}}},
        },
    )
    a = HiRadixCache.from_config(config, device_pages=16)
    b = HiRadixCache.from_config(config, device_pages=16)
    assert a.tiers is not None and a.tiers.tiers[0].name == "shm"
    assert a.host_pool.num_pages == 64 * 1024 // a.host_pool.page_bytes
    tokens = list(range(4 * PS))
    a_pages = fill_and_insert(a, tokens)
    publish_all(a)
    events = a.take_events()
    assert {e.medium for e in events if isinstance(e, BlockStored)} >= {"CPU_PINNED", "CPU"}
    handle = b.prefetch_from_storage(tokens)
    assert handle is not None and b.check_prefetch(handle, wait=True) == 4 * PS
    r = b.match_prefix(tokens)
    dev = b.load_back(r.last_host_node)
    assert dev is not None and page_bytes(b, dev) == page_bytes(a, a_pages)
    a.close()
    b.close()
    MemoryBackend.drop_shared_store(name)


def test_events_off_keeps_nothing_but_still_publishes() -> None:
    name = shared_name()
    cache = make([("mem", mem(name))], device_pages=8, host_pages=8, events=False)
    tokens = list(range(2 * PS))
    fill_and_insert(cache, tokens)
    publish_all(cache)
    assert cache.take_events() == []
    keys = [storage_key(h) for h in chain_hashes(seed_hash(IDENTITY), tokens, PS)]
    assert cache.tiers is not None
    assert cache.tiers.tiers[0].backend.exists(keys) == [True, True]
    cache.close()
    MemoryBackend.drop_shared_store(name)


class OtherRank:
    """A RankSync whose other rank reports the values a test sets (MIN over both ranks)."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.other: list[int] | None = None

    def all_reduce_min(self, values: list[int]) -> list[int]:
        self.calls.append(list(values))
        other = self.other if self.other is not None else values
        return [min(a, b) for a, b in zip(values, other, strict=True)]


def test_rank_sync_agrees_on_acks_and_prefetch_lengths() -> None:
    name = shared_name()
    a = make([("mem", mem(name))])
    tokens = list(range(4 * PS))
    fill_and_insert(a, tokens)
    publish_all(a)
    sync = OtherRank()
    b = make(
        [("mem", mem(name))],
        device_pages=16,
        host_pages=16,
        policy=WritePolicy.MANUAL,
        rank_sync=sync,
    )
    # the sync is called on every writing_check, even with nothing pending
    assert b.writing_check() == 0 and sync.calls == [[0]]
    # a prefetch: this rank read 4 pages, the other only 2: both keep 2
    handle = b.prefetch_from_storage(tokens)
    assert handle is not None
    sync.other = [0, 0]  # the other rank has not finished yet
    assert b.check_prefetch(handle, wait=True) is None
    sync.other = [1, 2]
    assert b.check_prefetch(handle) == 2 * PS
    assert sync.calls[-1] == [1, 4]
    assert b.match_prefix(tokens).host_hit_pages == 2
    assert b.host_pool.available == 16 - 2
    # an ack complete here but not on the other rank is not finished
    other = list(range(50, 50 + 2 * PS))
    fill_and_insert(b, other)
    ack = b.write_backup(b.match_prefix(other).last_node)
    assert ack is not None
    sync.other = [0]
    assert b.writing_check() == 0 and b.ongoing_write_through
    sync.other = [1]
    assert b.writing_check() == 1 and not b.ongoing_write_through
    a.close()
    b.close()
    MemoryBackend.drop_shared_store(name)


def kv_page(prefix: Sequence[int]) -> torch.Tensor:
    """What a model computes for the last page of ``prefix`` (a function of the whole prefix)."""
    gen = torch.Generator().manual_seed(hash(tuple(prefix)) & 0xFFFF_FFFF)
    return torch.randn(LAYOUT.page_shape, generator=gen).to(LAYOUT.dtype)


@pytest.mark.parametrize("policy", [WritePolicy.WRITE_THROUGH, WritePolicy.WRITE_THROUGH_SELECTIVE])
def test_serving_loop_with_two_instances_keeps_kv_correct(policy: WritePolicy) -> None:
    """Requests through a small L1/L2 on two caches sharing a tier, as an engine would drive them:
    every matched page holds exactly the KV of its prefix, whichever tier it came from."""
    import random

    name = shared_name()
    rng = random.Random(5)
    prompts = [[rng.randrange(1000) for _ in range(3 * PS)] for _ in range(4)]
    caches = [
        make([("mem", mem(name))], device_pages=12, host_pages=16, policy=policy) for _ in range(2)
    ]
    for step in range(120):
        cache = caches[step % 2]
        tokens = rng.choice(prompts) + [rng.randrange(3) for _ in range(rng.randrange(0, 3) * PS)]
        h = cache.prefetch_from_storage(tokens)
        if h is not None:
            cache.check_prefetch(h, wait=True)
        r = cache.match_prefix(tokens)
        if r.host_hit_pages and cache.load_back(r.last_host_node) is not None:
            r = cache.match_prefix(tokens)
        cache.inc_lock_ref(r.last_node)
        need = len(tokens) // PS - len(r.device_pages)
        new = cache.device_pool.alloc(need)
        if new is None:
            cache.evict(need)
            new = cache.device_pool.alloc(need)
        if new is not None:
            start = len(r.device_pages)
            for j, p in enumerate(new):
                cache.device_pool.write_page(p, kv_page(tokens[: (start + j + 1) * PS]))
            dup = cache.insert(tokens, r.device_pages + new)
            cache.device_pool.free(new[: max(0, dup // PS - start)])
        cache.dec_lock_ref(r.last_node)
        for p_i, page in enumerate(cache.match_prefix(tokens).device_pages):
            assert torch.equal(cache.device_pool.read_page(page), kv_page(tokens[: (p_i + 1) * PS]))
        cache.writing_check()
    for c in caches:
        publish_all(c)
        assert c.protected_pages == 0 and not c.ongoing_write_through
        assert c.device_pool.available + c.total_device_pages() == 12
    assert sum(c.counters["prefetched_pages"] for c in caches) > 0
    assert sum(c.counters["l2_evicted_pages"] + c.counters["l1_evicted_pages"] for c in caches) > 0
    for c in caches:
        c.close()
    MemoryBackend.drop_shared_store(name)
