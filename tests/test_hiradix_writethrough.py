"""HiRadixCache write-through: acks, splits while a copy is in flight, per-fragment publishing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest
import torch

from hicache.events import BlockRemoved, BlockStored, KVEvent, Medium, per_block
from hicache.hiradix import HiRadixCache, WritePolicy
from hicache.keys import ModelIdentity, block_id, chain_hashes, seed_hash, storage_key
from hicache.pools import DevicePool, HostPool, KVLayout
from hicache.radix import TreeNode
from hicache.storage.backend import Backend, Capabilities, PageStatus
from hicache.storage.memory import MemoryBackend
from hicache.testing.backends import memory_backend as new_memory_backend
from hicache.testing.faults import FaultOp, FaultyBackend
from hicache.tiering.tiers import Tiers
from hicache.transfer import ManualTransferEngine

PS = 2
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, page_size=PS, dtype=torch.float32)
IDENTITY = ModelIdentity("test-model")
SEED = seed_hash(IDENTITY)
NAMESPACE = LAYOUT.namespace_spec().namespace()


def counting_backend() -> FaultyBackend:
    """A memory tier that logs every put (``put_counts``), batches of 3 pages, medium DISK."""
    return FaultyBackend(
        memory_backend(), capabilities=Capabilities(max_batch=3, default_medium="DISK")
    )


def memory_backend(shared: str | None = None, namespace: str = NAMESPACE) -> MemoryBackend:
    return new_memory_backend(
        LAYOUT.page_bytes, namespace=namespace, tier_name="mem", shared=shared
    )


class SpyCache(HiRadixCache):
    """Records each write's original range, its fragments at ack time and storage calls."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.originals: dict[int, tuple[list[int], list[int]]] = {}
        self.fragments: dict[int, list[tuple[list[int], list[int]]]] = {}
        self.storage_calls: list[list[int]] = []
        self.released: Counter[int] = Counter()
        self.ack_hashes: dict[int, list[bytes]] = {}
        self.ack_parent: dict[int, int | None] = {}

    def write_backup(self, node: TreeNode) -> int | None:
        ack = super().write_backup(node)
        if ack is not None:
            assert node.host_value is not None
            self.originals[ack] = (list(node.key), list(node.host_value))
        return ack

    def _finish_write_through_ack(self, ack_id: int) -> None:
        rec = self.ongoing_write_through[ack_id]
        frags = [(list(f.key), list(f.host_value or [])) for f in rec.publish_nodes]
        self.fragments[ack_id] = frags
        self.ack_hashes[ack_id] = [h for f in rec.publish_nodes for h in self.node_hashes(f)]
        self.ack_parent[ack_id] = self.parent_block_hash(rec.publish_nodes[0])
        lock_before = rec.lock_node.lock_ref
        super()._finish_write_through_ack(ack_id)
        assert rec.lock_node.lock_ref == lock_before - 1
        self.released[ack_id] += 1

    def write_backup_storage(self, node: TreeNode, group: object = None) -> None:
        self.storage_calls.append(list(node.key))
        super().write_backup_storage(node, group)  # type: ignore[arg-type]


def make_cache(
    tiers: list[tuple[str, Backend]] | None = None,
    *,
    device_pages: int = 64,
    host_pages: int = 64,
    policy: WritePolicy = WritePolicy.MANUAL,
    identity: ModelIdentity = IDENTITY,
) -> tuple[SpyCache, ManualTransferEngine]:
    dev = DevicePool(LAYOUT, device_pages, "cpu")
    host = HostPool(LAYOUT, host_pages, pin=False)
    engine = ManualTransferEngine(dev, host)
    cache = SpyCache(
        dev,
        host,
        engine,
        identity=identity,
        tiers=Tiers.from_backends(tiers) if tiers else None,
        write_policy=policy,
        gpu_events=False,
        prefetch_threshold_tokens=0,
    )
    return cache, engine


def insert(cache: HiRadixCache, tokens: list[int]) -> list[int]:
    """Insert like an engine: allocate device pages, fill them with KV, insert, free duplicates."""
    n = len(tokens) // PS
    pages = cache.device_pool.alloc(n)
    assert pages is not None
    for p, t in zip(pages, range(0, len(tokens), PS), strict=True):
        # KV bytes derived from the tokens, so any mix-up of pages shows
        cache.device_pool.write_page(p, torch.full(LAYOUT.page_shape, float(sum(tokens[: t + PS]))))
    dup = cache.insert(tokens, pages)
    cache.device_pool.free(pages[: dup // PS])
    return pages


def settle(cache: HiRadixCache) -> None:
    """Finish acked writes, let storage workers finish and collect their results."""
    cache.writing_check()
    if cache.storage is not None:
        assert cache.storage.wait_idle(timeout=30)
    cache.writing_check()


def cpu_events(events: list[KVEvent]) -> list[BlockStored]:
    """The ``CPU_PINNED`` announcements, one page each (a node's pages come as one event)."""
    return [
        e for e in per_block(events) if isinstance(e, BlockStored) and e.medium == Medium.CPU_PINNED
    ]


def node_at(cache: HiRadixCache, tokens: list[int]) -> TreeNode:
    r = cache.match_prefix(tokens)
    assert len(r.device_pages) + r.host_hit_pages == len(tokens) // PS
    return r.last_host_node


def check_invariants(
    cache: SpyCache, events: list[KVEvent], counting: Sequence[FaultyBackend] = ()
) -> None:
    """What issue 5 demands of finished writes, checked once the cache is idle."""
    assert not cache.ongoing_write_through
    expected_cpu: Counter[tuple[int, int | None]] = Counter()
    for ack, (key, host) in cache.originals.items():
        frags = cache.fragments[ack]
        # fragments concatenate to the original range (host pages too); lock released once
        assert [t for k, _ in frags for t in k] == key
        assert [p for _, h in frags for p in h] == host
        assert cache.released[ack] == 1
        ids = [block_id(h) for h in cache.ack_hashes[ack]]
        parents = [cache.ack_parent[ack], *ids[:-1]]
        expected_cpu.update(zip(ids, parents, strict=True))
    # every page of every acked write is in exactly one CPU_PINNED event, chained to its parent
    got = Counter((e.block_hashes[0], e.parent_block_hash) for e in cpu_events(events))
    assert got == expected_cpu
    # ... and was handed exactly once to each publishing tier
    want_puts = Counter(storage_key(h) for hs in cache.ack_hashes.values() for h in hs)
    for b in counting:
        assert b.put_counts() == want_puts
    assert cache.protected_pages == 0
    assert cache.host_pool.total_holds() == 0


# ---------------------------------------------------------------------------- the seed scenario


def test_seed_scenario_split_while_write_pending() -> None:
    mem = memory_backend()
    cache, engine = make_cache([("mem", mem)])
    insert(cache, [1, 2, 3, 4])
    leaf = node_at(cache, [1, 2, 3, 4])
    ack = cache.write_backup(leaf)
    assert ack is not None and engine.pending() == [ack]
    insert(cache, [1, 2, 5, 6])  # splits the pending node
    assert leaf.key == [3, 4] and leaf.parent is not None and leaf.parent.key == [1, 2]
    cache.writing_check()
    assert cpu_events(cache.take_events()) == []
    assert cache.storage_calls == []
    assert mem.stats()["puts"] == 0

    engine.complete(ack)
    cache.writing_check()
    events = cache.take_events()
    h = chain_hashes(SEED, [1, 2, 3, 4], PS)
    assert cpu_events(events) == [
        BlockStored([block_id(h[0])], None, [1, 2], PS, None, Medium.CPU_PINNED),
        BlockStored([block_id(h[1])], block_id(h[0]), [3, 4], PS, None, Medium.CPU_PINNED),
    ]
    assert cache.storage_calls == [[1, 2], [3, 4]]
    settle(cache)
    events += cache.take_events()
    tier_events = [e for e in events if isinstance(e, BlockStored) and e.medium != "CPU_PINNED"]
    assert [e.token_ids for e in tier_events] == [[1, 2], [3, 4]]
    assert {e.medium for e in tier_events} == {mem.capabilities.default_medium}
    # both fragments are readable under their storage keys, byte-identical to the host copy
    assert cache.storage is not None
    prefix_node, suffix_node = leaf.parent, leaf
    for h_i, node in ((h[0], prefix_node), (h[1], suffix_node)):
        buf = bytearray(LAYOUT.page_bytes)
        assert mem.get_into([storage_key(h_i)], [memoryview(buf)]) == [PageStatus.OK]
        assert node.host_value is not None
        assert bytes(buf) == bytes(cache.host_pool.page_view(node.host_value[0]))
        assert node.value is not None
        dev = cache.device_pool.read_page(node.value[0]).contiguous().view(torch.uint8)
        assert bytes(buf) == bytes(dev.numpy())
    assert cache.protected_pages == 0
    assert cache.host_pool.total_holds() == 0
    cache.close()


def collect(cache: HiRadixCache, events: list[KVEvent]) -> None:
    settle(cache)
    events += cache.take_events()


def test_seed_scenario_invariants() -> None:
    counting = counting_backend()
    cache, engine = make_cache([("disk", counting)])
    insert(cache, [1, 2, 3, 4])
    ack = cache.write_backup(node_at(cache, [1, 2, 3, 4]))
    assert ack is not None
    insert(cache, [1, 2, 5, 6])
    events: list[KVEvent] = []
    collect(cache, events)
    assert counting.put_counts() == Counter()
    engine.complete_all()
    collect(cache, events)
    check_invariants(cache, events, [counting])
    cache.close()


@pytest.mark.parametrize("order", ["prefix_then_suffix", "suffix_then_prefix"])
def test_nested_splits_on_either_side(order: str) -> None:
    counting = counting_backend()
    cache, engine = make_cache([("disk", counting)])
    seq = [1, 2, 3, 4, 5, 6, 7, 8]
    insert(cache, seq)
    node = node_at(cache, seq)
    ack = cache.write_backup(node)
    assert ack is not None
    insert(cache, [1, 2, 3, 4, 9, 9])  # first split: [1..4] | [5..8]
    second = [[1, 2, 7, 7], [1, 2, 3, 4, 5, 6, 8, 8]]  # split the prefix / the suffix again
    if order == "suffix_then_prefix":
        second.reverse()
    for tokens in second:
        insert(cache, tokens)
    assert [len(f.key) for f in cache.ongoing_write_through[ack].publish_nodes] == [2, 2, 2, 2]
    assert all(
        f.write_through_pending_id == ack for f in cache.ongoing_write_through[ack].publish_nodes
    )
    engine.complete(ack)
    events: list[KVEvent] = []
    collect(cache, events)
    assert [e.token_ids for e in cpu_events(events)] == [[1, 2], [3, 4], [5, 6], [7, 8]]
    assert cache.storage_calls == [[1, 2], [3, 4], [5, 6], [7, 8]]
    check_invariants(cache, events, [counting])
    # the object locked at write_backup is still the deepest fragment
    assert node.key == [7, 8] and node.lock_ref == 0
    cache.close()


def test_split_caused_by_match_prefix() -> None:
    counting = counting_backend()
    cache, engine = make_cache([("disk", counting)])
    insert(cache, [1, 2, 3, 4, 5, 6])
    ack = cache.write_backup(node_at(cache, [1, 2, 3, 4, 5, 6]))
    assert ack is not None
    r = cache.match_prefix([1, 2, 3, 4, 9, 9])  # ends inside the pending node: splits it
    assert r.last_node.key == [1, 2, 3, 4]
    r = cache.match_prefix([1, 2, 0, 0])  # splits the prefix fragment again
    assert r.last_node.key == [1, 2]
    engine.complete(ack)
    events: list[KVEvent] = []
    collect(cache, events)
    assert cache.storage_calls == [[1, 2], [3, 4], [5, 6]]
    check_invariants(cache, events, [counting])
    cache.close()


def test_several_writes_pending_finish_in_submission_order() -> None:
    counting = counting_backend()
    cache, engine = make_cache([("disk", counting)])
    insert(cache, [1, 2, 3, 4])
    a = cache.write_backup(node_at(cache, [1, 2, 3, 4]))
    insert(cache, [1, 2, 3, 4, 5, 6, 7, 8])
    b = cache.write_backup(node_at(cache, [1, 2, 3, 4, 5, 6, 7, 8]))  # parent is pending
    insert(cache, [9, 9, 8, 8])
    c = cache.write_backup(node_at(cache, [9, 9, 8, 8]))
    assert a is not None and b is not None and c is not None
    insert(cache, [1, 2, 3, 4, 5, 6, 0, 0])  # splits b's node
    insert(cache, [1, 2, 0, 0])  # splits a's node
    events: list[KVEvent] = []
    engine.complete(b)
    engine.complete(c)
    collect(cache, events)
    # b and c are acked but wait for a: a child never announces before its parent
    assert cpu_events(events) == [] and counting.put_counts() == Counter()
    engine.complete(a)
    collect(cache, events)
    assert [e.token_ids for e in cpu_events(events)] == [
        [1, 2],
        [3, 4],
        [5, 6],
        [7, 8],
        [9, 9],
        [8, 8],
    ]
    assert cache.storage_calls == [[1, 2], [3, 4], [5, 6], [7, 8], [9, 9, 8, 8]]
    check_invariants(cache, events, [counting])
    cache.close()


def test_write_backup_needs_backed_up_parent() -> None:
    cache, engine = make_cache()
    insert(cache, [1, 2, 3, 4])
    insert(cache, [1, 2, 3, 4, 5, 6])
    assert cache.write_backup(node_at(cache, [1, 2, 3, 4, 5, 6])) is None
    assert cache.write_backup(node_at(cache, [1, 2, 3, 4])) is not None
    assert cache.write_backup(node_at(cache, [1, 2, 3, 4])) is None  # not written twice
    assert cache.write_backup(node_at(cache, [1, 2, 3, 4, 5, 6])) is not None  # parent pending
    assert engine.pending() == [1, 2]
    engine.complete_all()
    cache.writing_check()
    assert cache.protected_pages == 0


def test_l1_and_l2_evictions_race_pending_writes() -> None:
    counting = counting_backend()
    cache, engine = make_cache([("disk", counting)], device_pages=16, host_pages=16)
    cache.gpu_events = True
    insert(cache, [1, 2, 3, 4])
    ack = cache.write_backup(node_at(cache, [1, 2, 3, 4]))
    assert ack is not None
    insert(cache, [7, 7, 8, 8])  # an unrelated, never backed-up node
    # the pending node is locked: evicting everything takes only the other node
    assert cache.evict(100) == 2
    assert cache.evict_host(100) == 0
    assert cache.match_prefix([1, 2, 3, 4]).device_pages != []
    insert(cache, [1, 2, 5, 6])  # split while pending, then evictions again
    cache.evict(100)
    cache.evict_host(100)
    engine.complete(ack)
    release = counting.hang(ops=[FaultOp.PUT])  # storage workers now hang inside put()
    cache.writing_check()  # publishes; the puts are in flight
    assert cache.host_pool.total_holds() == 2
    # L1 then L2 eviction of the just-acked fragments while storage may hold their pages
    evicted = cache.evict(100)
    assert evicted >= 2
    r = cache.match_prefix([1, 2, 3, 4])
    assert r.device_pages == [] and r.host_hit_pages == 2
    assert cache.evict_host(100) == 2
    # the workers still read those host pages: their free waits for the last release
    assert cache.host_pool.pending_frees() == 2
    assert cache.host_pool.total_holds() == 2
    release.set()
    events: list[KVEvent] = []
    collect(cache, events)
    check_invariants(cache, events, [counting])
    removed = [e for e in events if isinstance(e, BlockRemoved)]
    assert {e.medium for e in removed} >= {Medium.GPU, Medium.CPU_PINNED}
    # every host page came back once the workers let go of them
    assert cache.host_pool.available == 16
    assert cache.host_pool.pending_frees() == 0
    cache.close()


def test_failed_head_is_never_followed_by_an_announced_tail() -> None:
    counting = counting_backend()
    cache, engine = make_cache([("disk", counting)])
    tokens = [1, 2, 3, 4, 5, 6]
    insert(cache, tokens)
    ack = cache.write_backup(node_at(cache, tokens))
    assert ack is not None
    insert(cache, [1, 2, 3, 4, 0, 0])  # two fragments: [1..4] and [5, 6]
    h = chain_hashes(SEED, tokens, PS)
    # the second page fails, its neighbours do not
    counting.fail_keys([storage_key(h[1])], PageStatus.FAILED, ops=[FaultOp.PUT])
    engine.complete(ack)
    events: list[KVEvent] = []
    collect(cache, events)
    check_invariants(cache, events, [counting])  # every page was still handed over once
    tier = [e for e in events if isinstance(e, BlockStored) and e.medium == "DISK"]
    assert [e.token_ids for e in tier] == [[1, 2]]
    # the tail page [5, 6] is stored but not announced
    assert counting.inner.exists([storage_key(h[2])]) == [True]
    assert cache.storage is not None
    assert cache.storage.counters["unannounced_pages"] == 2
    cache.close()


def test_whole_call_failure_is_counted_not_raised() -> None:
    counting = counting_backend()
    counting.fail_calls(None, lambda: ConnectionError("injected whole-call failure"), ["put"])
    cache, engine = make_cache([("disk", counting)])
    insert(cache, [1, 2, 3, 4])
    ack = cache.write_backup(node_at(cache, [1, 2, 3, 4]))
    assert ack is not None
    engine.complete(ack)
    events: list[KVEvent] = []
    collect(cache, events)
    check_invariants(cache, events)
    # both pages were handed over once, in the one call that failed (it logs no keys)
    assert counting.calls["put"] == 1 and counting.put_log == []
    assert [e for e in events if isinstance(e, BlockStored) and e.medium == "DISK"] == []
    assert cache.storage is not None
    stats = cache.storage.stats()["tiers"]["disk"]  # type: ignore[index]
    assert stats["errors_by_kind"] == {"ConnectionError": 1}
    assert stats["put_failed"] == 2
    cache.close()


def test_write_through_policy_backs_up_every_new_node() -> None:
    cache, engine = make_cache(policy=WritePolicy.WRITE_THROUGH)
    insert(cache, [1, 2, 3, 4])
    insert(cache, [1, 2, 5, 6])
    assert len(engine.pending()) == 2  # [1..4] then the new branch [5, 6] under a pending parent
    engine.complete_all()
    events: list[KVEvent] = []
    collect(cache, events)
    check_invariants(cache, events)
    assert sorted(e.token_ids for e in cpu_events(events)) == [[1, 2], [3, 4], [5, 6]]


def test_selective_policy_backs_up_on_second_hit() -> None:
    cache, engine = make_cache(policy=WritePolicy.WRITE_THROUGH_SELECTIVE)
    insert(cache, [1, 2, 3, 4])
    assert engine.pending() == []
    insert(cache, [1, 2, 3, 4])
    assert len(engine.pending()) == 1
    engine.complete_all()
    events: list[KVEvent] = []
    collect(cache, events)
    check_invariants(cache, events)
    assert [e.token_ids for e in cpu_events(events)] == [[1, 2], [3, 4]]


def test_l1_eviction_keeps_backed_up_node_in_l2_and_load_back_restores_bytes() -> None:
    cache, engine = make_cache(device_pages=8, host_pages=8)
    cache.gpu_events = True
    tokens = [1, 2, 3, 4, 5, 6]
    insert(cache, tokens)
    node = node_at(cache, tokens)
    assert node.value is not None
    before = [cache.device_pool.read_page(p) for p in node.value]
    assert cache.write_backup(node) is not None
    engine.complete_all()
    cache.writing_check()
    cache.take_events()
    assert cache.evict(100) == 3
    assert [type(e) for e in cache.take_events()] == [BlockRemoved]
    r = cache.match_prefix(tokens)
    assert r.device_pages == [] and r.host_hit_pages == 3 and r.last_node is cache.root
    dev = cache.load_back(r.last_host_node)
    assert dev is not None and len(dev) == 3
    assert cache.match_prefix(tokens).device_pages == dev
    for p, want in zip(dev, before, strict=True):
        assert torch.equal(cache.device_pool.read_page(p), want)
    assert [e.medium for e in per_block(cache.take_events())] == [Medium.GPU] * 3
    # an L2-only node can be evicted from host memory too, leaving nothing
    cache.evict(100)
    assert cache.evict_host(100) == 3
    assert cache.match_prefix(tokens).host_hit_pages == 0
    assert cache.host_pool.available == 8 and cache.device_pool.available == 8


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_write_through_split_evict_and_load_back() -> None:
    from hicache.transfer import CudaTransferEngine

    dev = DevicePool(LAYOUT, 16, "cuda")
    host = HostPool(LAYOUT, 16)
    counting = counting_backend()
    cache = SpyCache(
        dev,
        host,
        CudaTransferEngine(dev, host),
        identity=IDENTITY,
        tiers=Tiers.from_backends([("disk", counting)]),
        write_policy=WritePolicy.MANUAL,
        gpu_events=False,
    )
    insert(cache, [1, 2, 3, 4, 5, 6])
    node = node_at(cache, [1, 2, 3, 4, 5, 6])
    assert node.value is not None
    before = [dev.read_page(p).cpu() for p in node.value]
    ack = cache.write_backup(node)
    assert ack is not None
    insert(cache, [1, 2, 9, 9])  # split while the copy may still be in flight
    cache.transfer.wait(ack)
    events: list[KVEvent] = []
    collect(cache, events)
    check_invariants(cache, events, [counting])
    assert [e.token_ids for e in cpu_events(events)] == [[1, 2], [3, 4], [5, 6]]
    cache.evict(100)
    r = cache.match_prefix([1, 2, 3, 4, 5, 6])
    assert r.host_hit_pages == 3
    pages = cache.load_back(r.last_host_node)
    assert pages is not None
    for p, want in zip(pages, before, strict=True):
        assert torch.equal(dev.read_page(p).cpu(), want)
    cache.close()


def test_eviction_gives_up_only_the_tail_pages_it_needs() -> None:
    """L1 and L2 evict page by page, tail first: a longer leaf is split, its head stays cached
    (the policy the replay's block simulation models, so the two agree request by request)."""
    cache, engine = make_cache(device_pages=8, host_pages=8)
    tokens = [1, 2, 3, 4, 5, 6]
    insert(cache, tokens)
    node = node_at(cache, tokens)
    assert node.value is not None
    before = [cache.device_pool.read_page(p) for p in node.value]
    assert cache.write_backup(node) is not None
    engine.complete_all()
    cache.writing_check()
    assert cache.evict(1) == 1
    r = cache.match_prefix(tokens)
    assert len(r.device_pages) == 2 and r.host_hit_pages == 1
    assert cache.device_pool.available == 8 - 2
    assert cache.evict(100) == 2
    assert cache.evict_host(1) == 1
    r = cache.match_prefix(tokens)
    assert r.device_pages == [] and r.host_hit_pages == 2
    assert cache.host_pool.available == 8 - 2
    # the head that stayed in L2 comes back with its own bytes
    dev = cache.load_back(r.last_host_node)
    assert dev is not None and len(dev) == 2
    for p, want in zip(dev, before[:2], strict=True):
        assert torch.equal(cache.device_pool.read_page(p), want)
