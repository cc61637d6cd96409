"""HiRadixCache over tiers that fail: under every injected fault no exception or hang reaches the
cache's caller, the counters move, the breaker opens and closes, and host holds return to zero.
Two tiers (memory + a slow wrapped one): the cascade reads each page from the tier that has it,
promotion copies into the earlier tier only when enabled, nothing goes back to its source."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from hicache.config import TierSettings
from hicache.events import BlockRemoved, BlockStored, KVEvent, Medium, per_block
from hicache.hiradix import HiRadixCache, WritePolicy
from hicache.keys import ModelIdentity, chain_hashes, seed_hash, storage_key
from hicache.pools import DevicePool, HostPool, KVLayout
from hicache.storage.backend import PageStatus
from hicache.storage.memory import MemoryBackend
from hicache.testing.backends import memory_backend, shared_store_name
from hicache.testing.clock import ManualClock
from hicache.testing.faults import FaultOp, FaultyBackend
from hicache.tiering.breaker import BreakerState
from hicache.tiering.prefetch import PrefetchPolicy, PrefetchRules
from hicache.tiering.tiers import Tier, Tiers
from hicache.transfer import CpuTransferEngine

PS = 2
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, page_size=PS, dtype=torch.float32)
IDENTITY = ModelIdentity("faults-model")
SEED = seed_hash(IDENTITY)
NS = LAYOUT.namespace_spec().namespace()
WAIT = 30.0
# Deadline of tiers whose calls the test makes hang (and the prefetch budget of those tests).
# It bounds every call of that tier, so it is long enough for a healthy call on a loaded
# machine: only the hung call may reach it.
SHORT = 2.0


def backend(shared: str | None = None) -> MemoryBackend:
    return memory_backend(LAYOUT.page_bytes, namespace=NS, shared=shared)


def settings(**kw: object) -> TierSettings:
    base: dict[str, object] = {"retry_attempts": 1, "deadline_s": WAIT}
    base.update(kw)
    return TierSettings(**base)  # type: ignore[arg-type]


def make(tiers: Sequence[Tier], *, rules: PrefetchRules | None = None) -> HiRadixCache:
    dev = DevicePool(LAYOUT, 64, "cpu")
    host = HostPool(LAYOUT, 64, pin=False)
    return HiRadixCache(
        dev,
        host,
        CpuTransferEngine(dev, host),
        identity=IDENTITY,
        tiers=Tiers(tiers),
        write_policy=WritePolicy.WRITE_THROUGH,
        prefetch_threshold_tokens=0,
        prefetch_rules=rules,
        gpu_events=False,
    )


def insert(cache: HiRadixCache, tokens: list[int]) -> None:
    pages = cache.device_pool.alloc(len(tokens) // PS)
    assert pages is not None
    for j, p in enumerate(pages):
        cache.device_pool.write_page(
            p, torch.full(LAYOUT.page_shape, float(sum(tokens[: (j + 1) * PS])))
        )
    dup = cache.insert(tokens, pages)
    cache.device_pool.free(pages[: dup // PS])


def settle(cache: HiRadixCache, events: list[KVEvent]) -> None:
    """Every job done, every hold released, every result collected."""
    assert cache.storage is not None
    for _ in range(3):
        cache.writing_check()
        assert cache.storage.wait_idle(WAIT)
    cache.writing_check()
    events += cache.take_events()
    assert cache.host_pool.total_holds() == 0
    assert cache.host_pool.pending_frees() == 0


def keys_of(tokens: list[int]) -> list[str]:
    return [storage_key(h) for h in chain_hashes(SEED, tokens, PS)]


def tier_medium(events: Sequence[KVEvent], medium: str) -> list[list[int]]:
    return [
        e.token_ids for e in per_block(events) if isinstance(e, BlockStored) and e.medium == medium
    ]


def tier_stats(cache: HiRadixCache, name: str) -> dict[str, object]:
    stats = cache.stats()["storage"]
    return stats["tiers"][name]  # type: ignore[index,no-any-return]


TOKENS = list(range(1, 13))  # 6 pages


# ---------------------------------------------------------------------- publish under faults


@pytest.mark.parametrize("fault", ["latency", "key_failed", "call_error", "hang", "evict"])
def test_publish_under_each_fault_never_reaches_the_caller(fault: str) -> None:
    fb = FaultyBackend(backend())
    tier = Tier("t", fb, settings(medium="DISK", deadline_s=SHORT if fault == "hang" else WAIT))
    cache = make([tier])
    keys = keys_of(TOKENS)
    release = None
    if fault == "latency":
        fb.latency_s = 0.002
    elif fault == "key_failed":
        fb.fail_keys([keys[2]], PageStatus.FAILED, ops=[FaultOp.PUT])
    elif fault == "call_error":
        fb.fail_calls(None, ops=[FaultOp.PUT])
    elif fault == "hang":
        release = fb.hang(ops=[FaultOp.PUT])
    events: list[KVEvent] = []
    insert(cache, TOKENS)  # write-through: backed up, acked, published
    cache.writing_check()
    assert cache.storage is not None
    if release is not None:
        assert fb.wait_hung(1)
        assert cache.storage.wait_idle(WAIT, holds=False)  # the engine gave up waiting ...
        cache.writing_check()
        assert cache.host_pool.total_holds() > 0  # ... but the pages stay held
        release.set()
    if fault == "evict":
        settle(cache, events)
        fb.evict(keys[3:])
        cache.storage.evict_poll_interval_s = 0.0
        cache.writing_check()
    settle(cache, events)
    stats = tier_stats(cache, "t")
    announced = tier_medium(events, "DISK")
    pages = [TOKENS[i : i + PS] for i in range(0, len(TOKENS), PS)]
    if fault in ("latency", "evict"):
        assert announced == pages
    elif fault == "key_failed":
        assert announced == pages[:2] and stats["put_failed"] == 1
    elif fault == "call_error":
        assert announced == [] and stats["failures"] == {"unavailable": 1}  # type: ignore[comparison-overlap]
    elif fault == "hang":
        # counted failed at the deadline, announced when the put came back OK after all
        assert announced == pages and stats["failures"] == {"timeout": 1}  # type: ignore[comparison-overlap]
        assert stats["late_returns"] == 1 and stats["late_acked_pages"] == len(pages)
    if fault == "evict":
        removed = [e for e in events if isinstance(e, BlockRemoved) and e.medium == "DISK"]
        assert len(removed) == 1 and len(removed[0].block_hashes) == 3
        assert stats["evicted_pages"] == 3
    # the cache itself is intact: the pages are in L1 and L2 whatever L3 did
    r = cache.match_prefix(TOKENS)
    assert len(r.device_pages) == 6
    cache.close()


def test_breaker_opens_and_closes_through_the_cache() -> None:
    clock = ManualClock()
    fb = FaultyBackend(backend())
    tier = Tier(
        "t", fb, settings(medium="DISK", breaker_failures=2, breaker_cooldown_s=5), clock=clock
    )
    cache = make([tier])
    events: list[KVEvent] = []
    fb.fail_calls(None, ops=[FaultOp.PUT])
    for i in range(3):
        insert(cache, [100 + i, 0, 1, 2])
        settle(cache, events)
    assert tier.breaker.state is BreakerState.OPEN
    stats = tier_stats(cache, "t")
    assert stats["dropped_breaker"] == 2 and stats["breaker"]["state"] == "open"  # type: ignore[index]
    assert fb.calls["put"] == 2
    fb.heal()
    clock.now += 5
    insert(cache, [200, 0, 1, 2])
    settle(cache, events)
    assert tier.breaker.state is BreakerState.CLOSED
    assert tier_medium(events, "DISK") == [[200, 0], [1, 2]]
    cache.close()


def test_backpressure_drops_publishes_of_a_hung_tier_and_counts_them() -> None:
    fb = FaultyBackend(backend())
    tier = Tier(
        "t",
        fb,
        settings(
            medium="DISK",
            deadline_s=SHORT,
            max_inflight_bytes=2 * LAYOUT.page_bytes,
            breaker_failures=100,
        ),
    )
    cache = make([tier])
    release = fb.hang(ops=[FaultOp.PUT])
    events: list[KVEvent] = []
    insert(cache, [1, 2, 3, 4])
    cache.writing_check()
    assert fb.wait_hung(1)
    insert(cache, [5, 6, 7, 8])
    cache.writing_check()
    stats = tier_stats(cache, "t")
    assert stats["dropped_backpressure"] == 2
    assert stats["inflight"]["inflight_bytes"] == 2 * LAYOUT.page_bytes  # type: ignore[index]
    release.set()
    settle(cache, events)
    assert fb.calls["put"] == 1  # the dropped publish was never queued
    cache.close()


# ---------------------------------------------------------------------- prefetch under faults


def published_store(tokens: list[int], name: str) -> None:
    """A first cache publishes ``tokens`` into the shared memory store ``name``."""
    a = make([Tier("mem", backend(name), settings())])
    insert(a, tokens)
    settle(a, [])
    a.close()


@pytest.mark.parametrize("fault", ["corrupt", "failed", "vanish", "call_error"])
def test_prefetch_under_faults_yields_the_usable_prefix(fault: str) -> None:
    name = shared_store_name("f")
    published_store(TOKENS, name)
    keys = keys_of(TOKENS)
    fb = FaultyBackend(backend(name))
    cache = make([Tier("mem", fb, settings())])
    want = {"corrupt": 3, "failed": 3, "vanish": 3, "call_error": 0}[fault]
    if fault == "corrupt":
        fb.fail_keys([keys[3]], PageStatus.CORRUPT, ops=[FaultOp.GET])
    elif fault == "failed":
        fb.fail_keys([keys[3]], PageStatus.FAILED, ops=[FaultOp.GET])
    elif fault == "vanish":
        fb.vanish_on_get([keys[3]])
    else:
        fb.fail_calls(None, ops=[FaultOp.GET])
    handle = cache.prefetch_from_storage(TOKENS)
    assert handle is not None
    assert cache.check_prefetch(handle, wait=True) == want * PS
    events: list[KVEvent] = []
    settle(cache, events)
    r = cache.match_prefix(TOKENS)
    assert r.host_hit_pages == want
    assert cache.host_pool.available == 64 - want  # the pages not used went back
    outcome = {"corrupt": "failed", "failed": "failed", "vanish": "short", "call_error": "failed"}
    assert cache.stats()["storage"]["prefetch"] == {outcome[fault]: 1}  # type: ignore[index]
    cache.close()
    MemoryBackend.drop_shared_store(name)


@pytest.mark.parametrize("policy", [PrefetchPolicy.BEST_EFFORT, PrefetchPolicy.TIMEOUT])
def test_hung_prefetch_stops_waiting_and_frees_pages_when_the_read_returns(
    policy: PrefetchPolicy,
) -> None:
    name = shared_store_name("f")
    published_store(TOKENS, name)
    fb = FaultyBackend(backend(name))
    rules = PrefetchRules(policy, threshold_tokens=0, timeout_base_s=SHORT, timeout_max_s=SHORT)
    cache = make([Tier("mem", fb, settings())], rules=rules)
    release = fb.hang(ops=[FaultOp.GET])
    handle = cache.prefetch_from_storage(TOKENS)
    assert handle is not None
    # the serving loop's writing_check collects the lookup and starts the read
    for _ in range(3000):
        cache.writing_check()
        if fb.wait_hung(1, timeout=0.01):
            break
    assert fb.hung_now == 1
    # the request does not wait past its budget (best effort: not at all)
    got = cache.check_prefetch(handle, wait=policy is PrefetchPolicy.TIMEOUT)
    if got is None:  # the timeout budget had not passed at the first look
        got = cache.check_prefetch(handle, wait=True)
    assert got == 0
    assert cache.host_pool.total_holds() == 6  # the read still runs into the pages
    assert cache.host_pool.pending_frees() == 6
    release.set()
    events: list[KVEvent] = []
    settle(cache, events)
    assert cache.host_pool.available == 64
    assert cache.stats()["storage"]["prefetch"] == {"timed_out": 1}  # type: ignore[index]
    cache.close()
    MemoryBackend.drop_shared_store(name)


# ---------------------------------------------------------------------- two tiers


@pytest.mark.parametrize("promote", [False, True])
def test_two_tiers_cascade_and_promotion(promote: bool) -> None:
    fast_name, slow_name = (shared_store_name("f") for _ in range(2))
    published_store(TOKENS, slow_name)  # the slow tier holds the whole chain
    published_store(TOKENS[:4], fast_name)  # the fast one its first two pages
    keys = keys_of(TOKENS)
    fast = FaultyBackend(backend(fast_name))
    slow = FaultyBackend(backend(slow_name), latency_s=0.002)
    cache = make(
        [
            Tier("fast", fast, settings(medium="SHM")),
            Tier("slow", slow, settings(medium="REMOTE", promote=promote)),
        ]
    )
    handle = cache.prefetch_from_storage(TOKENS)
    assert handle is not None
    assert cache.check_prefetch(handle, wait=True) == len(TOKENS)
    events: list[KVEvent] = []
    settle(cache, events)
    assert fast.get_log == keys[:2] and slow.get_log == keys[2:]
    assert cache.stats()["storage"]["tiers"]["fast"]["get_ok"] == 2  # type: ignore[index]
    assert slow.put_log == []  # never written back to its source
    # what was read from a tier is on it, so it is announced there (in prefix order: the slow
    # tier's pages hang below pages it was never seen to hold, so they are not)
    assert tier_medium(events, "REMOTE") == []
    if promote:
        assert fast.put_log == keys[2:]
        assert fast.inner.exists(keys) == [True] * 6
        assert tier_medium(events, "SHM") == [TOKENS[i : i + PS] for i in range(0, 12, PS)]
    else:
        assert fast.put_log == []
        assert tier_medium(events, "SHM") == [TOKENS[i : i + PS] for i in range(0, 4, PS)]
    # the bytes are the first instance's (the KV encodes the prefix sums)
    r = cache.match_prefix(TOKENS)
    dev = cache.load_back(r.last_host_node)
    assert dev is not None
    for j, p in enumerate(dev):
        want = torch.full(LAYOUT.page_shape, float(sum(TOKENS[: (j + 1) * PS])))
        assert torch.equal(cache.device_pool.read_page(p), want)
    cache.close()
    for n in (fast_name, slow_name):
        MemoryBackend.drop_shared_store(n)


def test_published_children_of_prefetched_pages_are_announced() -> None:
    """A page read from a tier is on it: it is announced there, then its children below it."""
    name = shared_store_name("f")
    published_store(TOKENS[:4], name)
    cache = make([Tier("mem", FaultyBackend(backend(name)), settings(medium="DISK"))])
    handle = cache.prefetch_from_storage(TOKENS[:4])
    assert handle is not None and cache.check_prefetch(handle, wait=True) == 4
    r = cache.match_prefix(TOKENS[:4])
    assert cache.load_back(r.last_host_node) is not None
    insert(cache, TOKENS)
    events: list[KVEvent] = []
    settle(cache, events)
    assert tier_medium(events, "DISK") == [TOKENS[i : i + PS] for i in range(0, 12, PS)]
    cache.close()
    MemoryBackend.drop_shared_store(name)


def test_stats_are_plain_data() -> None:
    import json

    cache = make([Tier("t", FaultyBackend(backend()), settings())])
    insert(cache, TOKENS)
    settle(cache, [])
    stats = cache.stats()
    assert json.loads(json.dumps(stats)) == stats
    t = stats["storage"]["tiers"]["t"]  # type: ignore[index]
    for key in ("hit_pages", "miss_pages", "bytes_written", "failures", "breaker", "inflight"):
        assert key in t
    assert Medium.CPU_PINNED
    cache.close()


def test_prefetch_allocates_host_pages_only_for_pages_a_tier_holds() -> None:
    """Lookup first: a miss costs no L2 page, a partial hit exactly the pages found."""
    name = shared_store_name("f")
    published_store(TOKENS[:6], name)  # 3 of the 6 pages are stored
    fb = FaultyBackend(backend(name))
    cache = make([Tier("mem", fb, settings())])
    free = cache.host_pool.available
    miss = cache.prefetch_from_storage([99, 98, 97, 96])
    assert miss is not None
    assert cache.host_pool.available == free  # nothing allocated before the lookup answers
    assert cache.check_prefetch(miss, wait=True) == 0
    assert cache.host_pool.available == free and fb.calls["get"] == 0
    hit = cache.prefetch_from_storage(TOKENS)
    assert hit is not None
    assert cache.check_prefetch(hit, wait=True) == 6
    assert len(hit.host_pages) == 3  # only the pages the tier holds
    settle(cache, [])
    assert cache.host_pool.available == free - 3
    assert cache.counters["prefetch_discarded_pages"] == 0
    assert cache.stats()["storage"]["prefetch"] == {"miss": 1, "complete": 1}  # type: ignore[index]
    cache.close()
    MemoryBackend.drop_shared_store(name)


def test_second_hit_tier_stores_a_prefix_when_it_is_used_again() -> None:
    """A ``second_hit`` tier refuses a prefix the first time it is published and takes it when
    a later request uses it again; single-use pages never reach it."""
    from hicache.tiering.admission import Admission

    picky = FaultyBackend(backend())
    eager = FaultyBackend(backend())
    cache = make(
        [
            Tier("picky", picky, settings(medium="PICKY", admission=Admission.SECOND_HIT)),
            Tier("eager", eager, settings(medium="EAGER")),
        ]
    )
    events: list[KVEvent] = []
    shared = [1, 2, 3, 4]
    insert(cache, [*shared, 5, 6])  # first use: the picky tier refuses everything
    settle(cache, events)
    assert picky.put_log == [] and len(eager.put_log) == 3
    assert tier_stats(cache, "picky")["dropped_admission"] == 3
    insert(cache, [*shared, 7, 8])  # the shared prefix is used again (and split off)
    settle(cache, events)
    keys = keys_of([*shared, 5, 6])
    assert picky.put_log == keys[:2]  # offered again and admitted; [5, 6] was used once
    assert tier_medium(events, "PICKY") == [[1, 2], [3, 4]]
    assert eager.put_log.count(keys[0]) == 1  # the eager tier is not asked twice
    insert(cache, [*shared, 5, 6])  # now [5, 6] is used again too
    settle(cache, events)
    assert picky.put_log == keys
    assert tier_medium(events, "PICKY") == [[1, 2], [3, 4], [5, 6]]
    cache.close()
