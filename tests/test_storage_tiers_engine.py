"""Tiers (cascade lookup, failures as misses) and the storage engine (ordered announcements,
per-page holds, evictions announced), driven with real MemoryBackends and a real HostPool."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hicache.config import HicacheConfig, TierSettings
from hicache.errors import BackendUnavailableError
from hicache.events import BlockRemoved, BlockStored
from hicache.keys import block_id
from hicache.pools import HostPool, KVLayout
from hicache.storage.backend import Backend, Capabilities, PageStatus
from hicache.testing.backends import memory_backend
from hicache.testing.faults import FaultOp, FaultyBackend
from hicache.testing.wait import wait_for
from hicache.tiering.engine import PublishPage, StorageEngine
from hicache.tiering.tiers import Tiers

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, page_size=2, dtype=torch.float32)
PB = LAYOUT.page_bytes


def key(i: int) -> str:
    # the event block id is the key's first 16 hex digits: distinct per page, as real hashes are
    return f"{i:016x}" * 4


def switchboard(medium: str = "DISK") -> FaultyBackend:
    """A memory tier whose faults the test turns on: hung puts, failing keys, failing calls."""
    return FaultyBackend(
        memory_backend(PB, namespace="kv-test"),
        capabilities=Capabilities(max_batch=2, default_medium=medium),
    )


def fill(b: Backend, keys: Sequence[str]) -> None:
    for k in keys:
        b.put([k], [memoryview(bytearray(k[-1].encode() * PB))])


def test_cascade_asks_later_tiers_only_after_earlier_ones_stop() -> None:
    first, second, third = switchboard(), switchboard(), switchboard()
    tiers = Tiers.from_backends([("a", first), ("b", second), ("c", third)])
    tiers.open()
    keys = [key(i) for i in range(6)]
    fill(first, keys[:2])
    fill(second, keys[:4])  # holds the head too, but is asked only from page 2 on
    fill(third, keys[4:5])
    got = [(r.tier.name, r.start, r.end) for r in tiers.lookup(keys)]
    assert got == [("a", 0, 2), ("b", 2, 4), ("c", 4, 5)]
    bufs = [memoryview(bytearray(PB)) for _ in keys]
    statuses = tiers.get_into(keys, bufs)
    assert statuses == [PageStatus.OK] * 5 + [PageStatus.NOT_FOUND]
    assert bytes(bufs[5]) == bytes(PB)  # untouched
    stats = tiers.stats()
    assert (stats["a"]["get_ok"], stats["b"]["get_ok"], stats["c"]["get_ok"]) == (2, 2, 1)
    tiers.close()


def test_a_put_takes_the_backends_evictions_in_the_same_call() -> None:
    fb = switchboard()
    tiers = Tiers.from_backends([("t", fb)])
    tiers.open()
    tier = tiers["t"]
    fill(fb, [key(1), key(2)])
    page = memoryview(bytearray(PB))
    fb.evict([key(1)])
    assert tier.put([key(3)], [page]) == [PageStatus.OK]
    assert tier.take_evicted(call=False) == []  # a plain put leaves them with the backend
    assert tier.put([key(4)], [page], take_evicted=True) == [PageStatus.OK]
    fb.evict([key(2)])  # after that put: still with the backend
    assert tier.take_evicted(call=False) == [key(1)]  # handed out once, without a call
    assert tier.take_evicted(call=False) == []
    assert tier.take_evicted() == [key(2)]
    assert tier.snapshot()["evicted_pages"] == 2
    tiers.close()


class _EvictionsUnavailable(FaultyBackend):
    """Puts work; asking for evictions fails (the backend keeps them)."""

    def take_evicted(self) -> list[str]:
        raise BackendUnavailableError("evictions unavailable")


def test_a_put_whose_eviction_check_fails_still_stored_its_pages() -> None:
    fb = _EvictionsUnavailable(
        memory_backend(PB, namespace="kv-test"), capabilities=Capabilities(max_batch=2)
    )
    tiers = Tiers.from_backends([("t", fb, TierSettings(retry_attempts=1))])
    tiers.open()
    tier = tiers["t"]
    page = memoryview(bytearray(b"x" * PB))
    assert tier.put([key(1)], [page], take_evicted=True) == [PageStatus.OK]
    assert fb.inner.exists([key(1)]) == [True]
    snap = tier.snapshot()
    assert snap["put_stored"] == 1 and snap["put_failed"] == 0
    assert snap["errors_by_kind"] == {"BackendUnavailableError": 1}
    assert tier.breaker.allow()  # the put succeeded: not a failure of the tier
    assert tier.take_evicted(call=False) == []
    tiers.close()


def test_a_failing_tier_is_a_miss_and_counted() -> None:
    bad, good = switchboard(), switchboard()
    tiers = Tiers.from_backends([("bad", bad), ("good", good)])
    tiers.open()
    keys = [key(i) for i in range(3)]
    fill(good, keys)
    bad.fail_calls(None, lambda: ConnectionError("endpoint down"), [FaultOp.EXISTS])
    assert [(r.tier.name, r.start, r.end) for r in tiers.lookup(keys)] == [("good", 0, 3)]
    assert tiers.stats()["bad"]["errors_by_kind"] == {"ConnectionError": 1}
    tiers.close()


def pages_for(host: HostPool, ids: Sequence[int], first_host_page: int) -> list[PublishPage]:
    out = []
    parent = None
    for j, i in enumerate(ids):
        host.page_view(first_host_page + j)[:] = bytes([i % 256]) * PB
        bid = block_id(key(i))
        out.append(PublishPage(key(i), first_host_page + j, bid, parent, [i, i]))
        parent = bid
    return out


def announced(events: list[object], medium: str) -> list[list[int]]:
    return [e.token_ids for e in events if isinstance(e, BlockStored) and e.medium == medium]


def test_announcements_follow_fragment_order_not_completion_order() -> None:
    disk = switchboard("DISK")
    # the head's put waits for this test: a deadline no loaded machine reaches meanwhile;
    # 2-page calls and threads for two puts at once, so the fragments are two calls that can
    # finish out of order (one group's fragments otherwise travel in one call)
    tiers = Tiers.from_backends(
        [("disk", disk, TierSettings(deadline_s=30.0, batch_pages=2, io_threads=4))]
    )
    tiers.open()
    host = HostPool(LAYOUT, 8, pin=False)
    assert host.alloc(4) == [0, 1, 2, 3]
    engine = StorageEngine(tiers, host, page_size=2, workers=4)
    release = disk.hang([FaultOp.PUT], keys=[key(1)])  # the head fragment's put hangs
    group = engine.begin_publish()
    engine.publish(group, pages_for(host, [1, 2], 0))
    engine.publish(group, pages_for(host, [3, 4], 2))
    engine.end_publish(group)
    # the tail finishes first: its result is collected (its holds released), nothing announced
    events: list[object] = []

    def tail_collected() -> bool:
        # a job leaves in_flight after queueing its result: seen first, the poll collects it
        done = engine.in_flight() == 1 and host.total_holds() == 2
        events.extend(engine.poll().events)
        return done

    wait_for(tail_collected, what="the tail's result collected")
    assert host.total_holds() == 2  # only the head's pages are still under I/O
    assert announced(events, "DISK") == []
    release.set()
    assert engine.wait_idle(timeout=30)
    events += engine.poll().events
    assert announced(events, "DISK") == [[1, 1], [2, 2], [3, 3], [4, 4]]
    assert host.total_holds() == 0 and engine.pending_groups() == 0
    engine.close()
    tiers.close()


def test_failed_head_stops_announcements_on_that_tier_only() -> None:
    disk, ext = switchboard("DISK"), switchboard("EXTERNAL")
    tiers = Tiers.from_backends(
        [("disk", disk), ("ext", ext), ("ro", switchboard("RO"), TierSettings(publish=False))]
    )
    tiers.open()
    host = HostPool(LAYOUT, 8, pin=False)
    host.alloc(4)
    engine = StorageEngine(tiers, host, page_size=2)
    disk.fail_keys([key(2)], PageStatus.FAILED, [FaultOp.PUT])
    group = engine.begin_publish()
    engine.publish(group, pages_for(host, [1, 2], 0))
    engine.publish(group, pages_for(host, [3, 4], 2))
    engine.end_publish(group)
    assert engine.wait_idle(timeout=30)
    events = engine.poll().events
    assert announced(events, "DISK") == [[1, 1]]
    assert announced(events, "EXTERNAL") == [[1, 1], [2, 2], [3, 3], [4, 4]]
    assert announced(events, "RO") == []
    assert engine.counters["unannounced_pages"] == 3
    # every page went to both publishing tiers exactly once, never to the read-only one
    assert tiers.stats()["disk"]["put_pages"] == 4 and tiers.stats()["ro"]["put_pages"] == 0
    assert host.total_holds() == 0
    engine.close()
    tiers.close()


def test_prefetch_result_and_backend_evictions() -> None:
    capped = memory_backend(PB, namespace="kv-test", tier_name="capped", capacity=2 * (PB + 4096))
    tiers = Tiers.from_backends([("capped", capped, TierSettings(medium="SHM"))])
    tiers.open()
    host = HostPool(LAYOUT, 8, pin=False)
    host.alloc(3)
    engine = StorageEngine(tiers, host, page_size=2)
    events: list[object] = []
    for ids, first in (([1, 2], 0), ([3], 2)):  # only two pages fit: the third evicts one
        group = engine.begin_publish()
        engine.publish(group, pages_for(host, ids, first))
        engine.end_publish(group)
        assert engine.wait_idle(timeout=30)
        events += engine.poll().events
    removed = [e for e in events if isinstance(e, BlockRemoved)]
    assert len(removed) == 1 and removed[0].medium == "SHM"
    assert len(removed[0].block_hashes) == 1
    dst = host.alloc(3)
    assert dst is not None
    ticket = engine.submit_prefetch([key(1), key(2), key(3)], dst)
    assert host.total_holds() == 3
    assert engine.wait_prefetch(ticket, timeout=30)
    result = engine.poll().prefetches
    assert [r.ticket for r in result] == [ticket]
    stored = [k for k in (key(1), key(2), key(3)) if capped.exists([k])[0]]
    assert result[0].ok_pages == (
        2 if stored == [key(1), key(2)] else 0 if key(1) not in stored else 1
    )
    assert host.total_holds() == 0
    engine.close()
    tiers.close()


def test_tiers_from_config_settings() -> None:
    config = HicacheConfig(
        storage={
            "tiers": {
                "shm": {"backend": "memory", "medium": "SHM"},
                "archive": {"backend": "memory", "read_only": True},
            }
        }
    )
    tiers = Tiers.from_config(config, "kv-abc", page_bytes=PB)
    assert [t.name for t in tiers] == ["shm", "archive"]
    assert [t.name for t in tiers.publishing] == ["shm"]
    assert tiers.tiers[0].medium == "SHM"
    assert tiers.tiers[1].backend.context.read_only
    assert tiers.tiers[1].backend.context.namespace == "kv-abc"


def test_a_tier_that_cannot_open_is_left_out() -> None:
    broken, good = switchboard(), switchboard()
    broken.fail_open(lambda: ConnectionError("bucket missing"))
    tiers = Tiers.from_backends([("broken", broken), ("good", good)])
    assert tiers.open() == ["broken"]
    assert [t.name for t in tiers.publishing] == ["good"]
    keys = [key(1)]
    fill(good, keys)
    assert [(r.tier.name, r.start, r.end) for r in tiers.lookup(keys)] == [("good", 0, 1)]
    assert tiers.stats()["broken"]["errors_by_kind"] == {"ConnectionError": 1}
    tiers.close()
