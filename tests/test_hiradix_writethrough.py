"""HiRadixCache write-through: acks, splits while a copy is in flight, per-fragment publishing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest
import torch

from hicache.events import BlockRemoved, BlockStored, KVEvent, Medium
from hicache.hiradix import HiRadixCache, WritePolicy
from hicache.keys import ModelIdentity, block_id, chain_hashes, seed_hash, storage_key
from hicache.pools import DevicePool, HostPool, KVLayout
from hicache.radix import TreeNode
from hicache.storage.backend import Backend, BackendConfig, BackendContext, Capabilities, PageStatus
from hicache.storage.memory import MemoryBackend, MemoryConfig
from hicache.storage.tiers import Tiers
from hicache.transfer import ManualTransferEngine

PS = 2
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, page_size=PS, dtype=torch.float32)
IDENTITY = ModelIdentity("test-model")
SEED = seed_hash(IDENTITY)
NAMESPACE = LAYOUT.namespace_spec().namespace()


class CountingBackend(Backend):
    """Delegates to a MemoryBackend, counting puts per key; can fail chosen keys or whole calls."""

    def __init__(self, inner: MemoryBackend) -> None:
        super().__init__(BackendConfig(), inner.context)
        self.inner = inner
        self.puts: Counter[str] = Counter()
        self.fail_keys: set[str] = set()
        self.raise_calls = False

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(max_batch=3, default_medium="DISK")

    def _open(self) -> None:
        self.inner.open()

    def _close(self) -> None:
        self.inner.close()

    def _exists(self, keys: Sequence[str]) -> list[bool]:
        return self.inner.exists(keys)

    def _put(self, keys: Sequence[str], srcs: Sequence[memoryview]) -> list[PageStatus]:
        self.puts.update(keys)
        if self.raise_calls:
            raise ConnectionError("injected whole-call failure")
        out = []
        for k, s in zip(keys, srcs, strict=True):
            out.append(PageStatus.FAILED if k in self.fail_keys else self.inner.put([k], [s])[0])
        return out

    def _get_into(self, keys: Sequence[str], dsts: Sequence[memoryview]) -> list[PageStatus]:
        return self.inner.get_into(keys, dsts)

    def _delete(self, keys: Sequence[str]) -> None:
        self.inner.delete(keys)


def memory_backend(shared: str | None = None, namespace: str = NAMESPACE) -> MemoryBackend:
    ctx = BackendContext(page_bytes=LAYOUT.page_bytes, namespace=namespace, tier_name="mem")
    return MemoryBackend(MemoryConfig(shared_name=shared), ctx)


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
    """Let storage workers finish and collect their results."""
    if cache.storage is not None:
        assert cache.storage.wait_idle(timeout=30)
    cache.writing_check()


def cpu_events(events: list[KVEvent]) -> list[BlockStored]:
    return [e for e in events if isinstance(e, BlockStored) and e.medium == Medium.CPU_PINNED]


def node_at(cache: HiRadixCache, tokens: list[int]) -> TreeNode:
    r = cache.match_prefix(tokens)
    assert len(r.device_pages) + r.host_hit_pages == len(tokens) // PS
    return r.last_host_node


def check_invariants(
    cache: SpyCache, events: list[KVEvent], counting: Sequence[CountingBackend] = ()
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
        assert b.puts == want_puts
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
