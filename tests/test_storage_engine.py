"""Storage engine under injected faults: ordered announcements, deadlines, retries, breaker,
backpressure, admission, cascade, promotion, evictions, holds back to zero.

Real parts: a real ``HostPool`` (its holds are what is checked), real ``MemoryBackend`` tiers,
wrapped in ``FaultyBackend`` to inject the faults.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import replace

import pytest
import torch

from hicache.config import TierSettings
from hicache.events import BlockRemoved, BlockStored, KVEvent
from hicache.keys import block_id
from hicache.pools import HostPool, KVLayout
from hicache.storage.backend import BackendContext, PageBuffers, PageStatus
from hicache.storage.memory import MemoryBackend, MemoryConfig
from hicache.testing.backends import memory_backend
from hicache.testing.clock import ManualClock
from hicache.testing.faults import FaultOp, FaultyBackend
from hicache.testing.wait import wait_for
from hicache.tiering.admission import Admission
from hicache.tiering.breaker import BreakerState
from hicache.tiering.engine import PublishPage, StorageEngine
from hicache.tiering.prefetch import PrefetchOutcome
from hicache.tiering.tiers import Tier, Tiers

PS = 2
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, page_size=PS, dtype=torch.float32)
WAIT = 30.0  # generous bound for waits that only guard against a hung test
# Deadline of tiers whose calls the test makes hang. It bounds every call of that tier (the
# housekeeping take_evicted too), so it is long enough for a healthy call on a loaded machine:
# only the hung call may reach it.
SHORT = 2.0


def keys_for(n: int, salt: str = "") -> list[str]:
    out, h = [], b"seed" + salt.encode()
    for _ in range(n):
        h = hashlib.sha256(h).digest()
        out.append(h.hex())
    return out


def mem(medium_name: str = "mem") -> MemoryBackend:
    return memory_backend(LAYOUT.page_bytes, namespace="eng", tier_name=medium_name)


def settings(**kw: object) -> TierSettings:
    base: dict[str, object] = {"retry_attempts": 1, "deadline_s": WAIT}
    base.update(kw)
    return TierSettings(**base)  # type: ignore[arg-type]


class Rig:
    """Host pool + tiers + engine, with helpers to publish chains and collect events."""

    def __init__(
        self,
        tiers: Sequence[Tier],
        host_pages: int = 32,
        workers: int | None = None,
        put_backlog_pages: int | None = None,
    ) -> None:
        self.host = HostPool(LAYOUT, host_pages, pin=False)
        self.tiers = Tiers(tiers)
        self.tiers.open()
        self.engine = StorageEngine(
            self.tiers,
            self.host,
            page_size=PS,
            evict_poll_interval_s=0.0,
            workers=workers,
            put_backlog_pages=put_backlog_pages,
        )
        self.events: list[KVEvent] = []

    def pages(self, keys: Sequence[str], parent: int | None = None) -> list[PublishPage]:
        host = self.host.alloc(len(keys))
        assert host is not None
        out = []
        for i, (k, h) in enumerate(zip(keys, host, strict=True)):
            self.host.page_view(h)[:] = bytes([i % 251 + 1]) * LAYOUT.page_bytes
            bid = block_id(k)
            out.append(PublishPage(k, h, bid, parent, [i, i]))
            parent = bid
        return out

    def publish(self, *fragments: list[PublishPage]) -> None:
        group = self.engine.begin_publish()
        for frag in fragments:
            self.engine.publish(group, frag)
        self.engine.end_publish(group)

    def settle(self) -> None:
        assert self.engine.wait_idle(WAIT)
        self.events += self.engine.poll().events
        assert self.engine.wait_idle(WAIT)
        self.events += self.engine.poll().events

    def stored(self, medium: str) -> list[int]:
        return [
            e.block_hashes[0]
            for e in self.events
            if isinstance(e, BlockStored) and e.medium == medium
        ]

    def close(self) -> None:
        self.engine.close()
        self.tiers.close()


def assert_no_tail_without_head(
    events: Sequence[KVEvent], stored_before: dict[str, set[int]] | None = None
) -> None:
    """Every BlockStored on a medium names a parent already announced there (and not removed),
    or one ``stored_before`` (put there by someone else, and read from there)."""
    present: dict[str, set[int]] = {m: set(ids) for m, ids in (stored_before or {}).items()}
    for e in events:
        if isinstance(e, BlockStored):
            have = present.setdefault(e.medium, set())
            if e.parent_block_hash is not None:
                assert e.parent_block_hash in have, f"tail {e.block_hashes} without its head"
            have.update(e.block_hashes)
        elif isinstance(e, BlockRemoved):
            present.setdefault(e.medium, set()).difference_update(e.block_hashes)


# ---------------------------------------------------------------------- publish + announcements


def test_announces_per_tier_only_the_acknowledged_prefix() -> None:
    good = FaultyBackend(mem())
    bad = FaultyBackend(mem())
    rig = Rig([Tier("good", good, settings(medium="A")), Tier("bad", bad, settings(medium="B"))])
    keys = keys_for(5)
    frag1, frag2 = rig.pages(keys[:3]), []
    frag2 = rig.pages(keys[3:], parent=block_id(keys[2]))
    bad.fail_keys([keys[1]], PageStatus.FAILED, ops=[FaultOp.PUT])
    rig.publish(frag1, frag2)
    rig.settle()
    ids = [block_id(k) for k in keys]
    assert rig.stored("A") == ids
    assert rig.stored("B") == ids[:1]  # the failed page stops the tier's announcements
    assert bad.inner.exists(keys) == [True, False, True, True, True]  # stored, not announced
    assert rig.engine.counters["unannounced_pages"] == 4  # the failed page and its tail
    assert rig.tiers["bad"].stats.as_dict()["put_failed"] == 1
    assert rig.host.total_holds() == 0
    assert_no_tail_without_head(rig.events)
    rig.close()


def test_child_of_a_failed_head_in_another_group_is_not_announced() -> None:
    fb = FaultyBackend(mem())
    rig = Rig([Tier("t", fb, settings(medium="T"))])
    keys = keys_for(4)
    fb.fail_keys([keys[1]], PageStatus.FAILED, ops=[FaultOp.PUT])
    rig.publish(rig.pages(keys[:2]))
    rig.settle()
    rig.publish(rig.pages(keys[2:], parent=block_id(keys[1])))  # a later ack, the child
    rig.settle()
    assert rig.stored("T") == [block_id(keys[0])]
    assert fb.inner.exists(keys[2:]) == [True, True]
    assert_no_tail_without_head(rig.events)
    rig.close()


def test_child_waits_for_its_parents_publish_in_flight() -> None:
    fb = FaultyBackend(mem())
    rig = Rig([Tier("t", fb, settings(medium="T", io_threads=4))])
    keys = keys_for(4)
    release = fb.hang(ops=[FaultOp.PUT], count=1)  # the parent's put hangs, not the child's
    rig.publish(rig.pages(keys[:2]))
    assert fb.wait_hung(1)
    rig.publish(rig.pages(keys[2:], parent=block_id(keys[1])))
    assert fb.wait_finished(FaultOp.PUT, 1)  # the child's put is done first
    assert fb.inner.exists(keys[2:]) == [True, True]
    # its job has reported back (a job leaves in_flight after queueing its result): only the
    # parent's hung put is still out, so this poll sees the child's ack
    wait_for(lambda: rig.engine.in_flight() == 1, what="the child's put job reported")
    rig.events += rig.engine.poll().events
    assert rig.stored("T") == []
    release.set()
    rig.settle()
    assert rig.stored("T") == [block_id(k) for k in keys]
    assert_no_tail_without_head(rig.events)
    rig.close()


# ---------------------------------------------------------------------- whole-call failures


def test_retryable_errors_are_retried_and_recover() -> None:
    fb = FaultyBackend(mem())
    rig = Rig([Tier("t", fb, settings(medium="T", retry_attempts=3, retry_backoff_s=0))])
    fb.fail_calls(2, ops=[FaultOp.PUT])
    keys = keys_for(2)
    rig.publish(rig.pages(keys))
    rig.settle()
    assert rig.stored("T") == [block_id(k) for k in keys]
    snap = rig.tiers["t"].snapshot()
    assert snap["retries"] == 2 and snap["failures"] == {}
    assert fb.calls["put"] == 3
    rig.close()


def test_breaker_opens_drops_publishes_and_closes_after_cooldown() -> None:
    clock = ManualClock(1000.0)
    fb = FaultyBackend(mem())
    tier = Tier(
        "t",
        fb,
        settings(medium="T", breaker_failures=2, breaker_cooldown_s=10.0),
        clock=clock,
    )
    rig = Rig([tier])
    fb.fail_calls(None, ops=[FaultOp.PUT])
    for i in range(2):
        rig.publish(rig.pages(keys_for(1, f"a{i}")))
        rig.settle()
    assert tier.breaker.state is BreakerState.OPEN
    calls_before = fb.calls["put"]
    rig.publish(rig.pages(keys_for(3, "b")))
    rig.settle()
    assert fb.calls["put"] == calls_before  # not even called
    snap = tier.snapshot()
    assert snap["dropped_breaker"] == 3 and snap["breaker"]["state"] == "open"
    assert snap["failures"]["unavailable"] == 2
    assert rig.stored("T") == []
    fb.heal()
    clock.now += 10
    keys = keys_for(2, "c")
    rig.publish(rig.pages(keys))  # the half-open probe
    rig.settle()
    assert tier.breaker.state is BreakerState.CLOSED
    assert rig.stored("T") == [block_id(k) for k in keys]
    assert tier.snapshot()["breaker"]["closed_after_probe"] == 1
    assert rig.host.total_holds() == 0
    rig.close()


def test_hung_put_keeps_holds_until_it_returns_and_backpressure_drops() -> None:
    fb = FaultyBackend(mem())
    page = LAYOUT.page_bytes
    tier = Tier(
        "t",
        fb,
        settings(medium="T", deadline_s=SHORT, max_inflight_bytes=3 * page, breaker_failures=100),
    )
    rig = Rig([tier])
    release = fb.hang(ops=[FaultOp.PUT])
    first = rig.pages(keys_for(3, "x"))
    rig.publish(first)
    assert rig.engine.wait_prefetch(0)  # no-op; the put is what we wait for
    assert fb.wait_hung(1)
    # the engine stops waiting at the deadline, but the pages stay held: the call still runs

    def group_done() -> bool:
        rig.events += rig.engine.poll().events
        return rig.engine.pending_groups() == 0

    wait_for(group_done, WAIT, what="the publish group finished at the deadline")
    assert rig.host.total_holds() == 3
    assert tier.gate.inflight_bytes == 3 * page
    # the bound is reached: the next publish is dropped, never queued
    rig.publish(rig.pages(keys_for(2, "y")))
    snap = tier.snapshot()
    assert snap["dropped_backpressure"] == 2 and snap["failures"]["timeout"] == 1
    assert rig.stored("T") == []
    release.set()
    rig.settle()
    assert rig.host.total_holds() == 0 and tier.gate.inflight_bytes == 0
    assert tier.snapshot()["late_returns"] == 1
    # the late success stored the first three pages after all: announced then, in order (the
    # dropped publish never reached the tier)
    assert rig.stored("T") == [block_id(k) for k in keys_for(3, "x")]
    assert tier.snapshot()["late_acked_pages"] == 3
    rig.close()


# ---------------------------------------------------------------------- admission, evictions


def test_second_hit_admission_publishes_on_the_second_offer() -> None:
    fb = FaultyBackend(mem())
    rig = Rig([Tier("t", fb, settings(medium="T", admission=Admission.SECOND_HIT))])
    keys = keys_for(3)
    rig.publish(rig.pages(keys))
    rig.settle()
    assert fb.calls["put"] == 0 and rig.stored("T") == []
    assert rig.tiers["t"].snapshot()["dropped_admission"] == 3
    rig.publish(rig.pages(keys))
    rig.settle()
    assert rig.stored("T") == [block_id(k) for k in keys]
    rig.close()


def test_backend_evictions_become_block_removed() -> None:
    fb = FaultyBackend(mem())
    rig = Rig([Tier("t", fb, settings(medium="T"))])
    keys = keys_for(3)
    rig.publish(rig.pages(keys))
    rig.settle()
    fb.evict(keys[1:])
    rig.engine.poll()  # schedules the eviction check
    rig.settle()
    removed = [e for e in rig.events if isinstance(e, BlockRemoved)]
    assert removed == [BlockRemoved([block_id(k) for k in keys[1:]], "T")]
    assert rig.tiers["t"].snapshot()["evicted_pages"] == 2
    # a child of an evicted page is not announced: its head is gone
    rig.publish(rig.pages(keys_for(1, "child"), parent=block_id(keys[2])))
    rig.settle()
    assert len(rig.stored("T")) == 3
    assert_no_tail_without_head(rig.events)
    rig.close()


# ---------------------------------------------------------------------- prefetch


def fill_tier(backend: MemoryBackend, keys: Sequence[str], tag: int) -> list[bytes]:
    pages = [bytes([tag, i % 251]) * (LAYOUT.page_bytes // 2) for i in range(len(keys))]
    backend.open()  # idempotent; a private memory store lives until close()
    backend.put(list(keys), [memoryview(p) for p in pages])
    return pages


def test_cascade_reads_each_page_from_the_tier_that_has_it_and_promotes() -> None:
    keys = keys_for(6)
    fast_mem = MemoryBackend(
        MemoryConfig(shared_name="eng-fast"),
        BackendContext(page_bytes=LAYOUT.page_bytes, namespace="eng"),
    )
    slow_mem = MemoryBackend(
        MemoryConfig(shared_name="eng-slow"),
        BackendContext(page_bytes=LAYOUT.page_bytes, namespace="eng"),
    )
    fast, slow = FaultyBackend(fast_mem), FaultyBackend(slow_mem, latency_s=0.001)
    fast.open(), slow.open()
    head = fill_tier(fast_mem, keys[:2], 1)
    tail = fill_tier(slow_mem, keys, 2)[2:]
    rig = Rig(
        [
            Tier("fast", fast, settings(medium="F")),
            Tier("slow", slow, settings(medium="S", promote=True)),
        ]
    )
    host = rig.host.alloc(6)
    assert host is not None
    tokens = [[i, i] for i in range(6)]
    ticket = rig.engine.submit_prefetch(keys, host, token_ids=tokens, parent_block_id=None)
    assert rig.engine.wait_prefetch(ticket, WAIT)
    assert rig.engine.wait_idle(WAIT)
    polled = rig.engine.poll()
    rig.events += polled.events
    [result] = polled.prefetches
    assert result.ok_pages == 6 and result.outcome is PrefetchOutcome.COMPLETE
    assert result.sources == ["fast", "fast", "slow", "slow", "slow", "slow"]
    assert [bytes(rig.host.page_view(h)) for h in host] == head + tail
    assert fast.get_log == keys[:2] and slow.get_log == keys[2:]  # each page read once, right tier
    rig.settle()
    # promotion: the slow tier's pages went to the fast tier, never back to the slow one
    assert slow.put_log == [] and fast.put_log == keys[2:]
    assert fast_mem.exists(keys) == [True] * 6
    # the pages read from the fast tier are on it (announced when read), then the promoted ones
    assert rig.stored("F") == [block_id(k) for k in keys]
    assert rig.tiers["fast"].snapshot()["promoted_pages"] == 4
    assert rig.host.total_holds() == 0
    assert_no_tail_without_head(rig.events)
    rig.close()
    for name in ("eng-fast", "eng-slow"):
        MemoryBackend.drop_shared_store(name)


def test_without_promotion_nothing_is_written_anywhere() -> None:
    keys = keys_for(3)
    a, b = FaultyBackend(mem()), FaultyBackend(mem())
    rig = Rig([Tier("a", a, settings()), Tier("b", b, settings())])
    fill_tier(b.inner, keys, 3)  # type: ignore[arg-type]
    host = rig.host.alloc(3)
    assert host is not None
    ticket = rig.engine.submit_prefetch(keys, host, token_ids=[[1, 1]] * 3)
    assert rig.engine.wait_prefetch(ticket, WAIT)
    rig.settle()
    assert a.put_log == [] and b.put_log == []
    rig.close()


def test_vanished_page_shortens_the_prefetch_without_error() -> None:
    fb = FaultyBackend(mem())
    rig = Rig([Tier("t", fb, settings())])
    keys = keys_for(4)
    fill_tier(fb.inner, keys, 4)  # type: ignore[arg-type]
    fb.vanish_on_get([keys[2]])
    host = rig.host.alloc(4)
    assert host is not None
    ticket = rig.engine.submit_prefetch(keys, host)
    assert rig.engine.wait_prefetch(ticket, WAIT)
    [result] = rig.engine.poll().prefetches
    assert result.ok_pages == 2 and result.outcome is PrefetchOutcome.SHORT
    assert rig.tiers["t"].snapshot()["call_errors"] == 0
    assert rig.engine.stats()["prefetch"] == {"short": 1}
    rig.settle()
    assert rig.host.total_holds() == 0
    rig.close()


def test_corrupt_page_ends_the_usable_prefix() -> None:
    fb = FaultyBackend(mem())
    rig = Rig([Tier("t", fb, settings())])
    keys = keys_for(3)
    fill_tier(fb.inner, keys, 5)  # type: ignore[arg-type]
    fb.fail_keys([keys[1]], PageStatus.CORRUPT, ops=[FaultOp.GET])
    host = rig.host.alloc(3)
    assert host is not None
    ticket = rig.engine.submit_prefetch(keys, host)
    assert rig.engine.wait_prefetch(ticket, WAIT)
    [result] = rig.engine.poll().prefetches
    assert result.ok_pages == 1 and result.outcome is PrefetchOutcome.FAILED
    assert rig.tiers["t"].snapshot()["get_corrupt"] == 1
    rig.close()


def test_hung_prefetch_reports_failure_but_holds_pages_until_the_read_returns() -> None:
    fb = FaultyBackend(mem())
    rig = Rig([Tier("t", fb, settings(deadline_s=SHORT, breaker_failures=100))])
    keys = keys_for(3)
    fill_tier(fb.inner, keys, 6)  # type: ignore[arg-type]
    release = fb.hang(ops=[FaultOp.GET])
    host = rig.host.alloc(3)
    assert host is not None
    ticket = rig.engine.submit_prefetch(keys, host)
    assert fb.wait_hung(1)
    assert rig.engine.wait_prefetch(ticket, WAIT)  # the engine gave up at the deadline
    [result] = rig.engine.poll().prefetches
    assert result.ok_pages == 0 and result.statuses == [PageStatus.FAILED] * 3
    assert rig.host.total_holds() == 3  # the read still runs into these pages
    rig.host.free_when_released(host)  # what the cache does with pages it will not use
    assert rig.host.pending_frees() == 3
    release.set()
    rig.settle()
    assert rig.host.total_holds() == 0 and rig.host.pending_frees() == 0
    assert rig.host.available == 32
    rig.close()


def test_a_read_waited_for_without_a_budget_runs_on_the_waiting_thread() -> None:
    """The one engine worker is stuck in a hung put, so the read queues behind it; the thread
    that waits for the read without a budget runs it itself: it does not wait for the put's
    deadline. With a budget it leaves the read queued (the read may take up to a deadline)."""
    fb = FaultyBackend(mem())
    tier = Tier("t", fb, settings(io_threads=2))  # a tier thread for the read beside the put
    rig = Rig([tier], workers=1)
    hung = keys_for(2, "hung")
    release = fb.hang(ops=[FaultOp.PUT])
    try:
        rig.publish(rig.pages(hung))
        assert fb.wait_hung(1)
        keys = keys_for(3)
        stored = fill_tier(fb.inner, keys, 9)  # type: ignore[arg-type]
        host = rig.host.alloc(3)
        assert host is not None
        ticket = rig.engine.submit_prefetch(keys, host)
        assert not rig.engine.wait_prefetch(ticket, 0.0)  # a budget: it stays queued
        assert rig.engine.wait_prefetch(ticket)
        # the put is still hung and was never given up on: the read did not wait for its
        # deadline
        assert fb.hung_now == 1 and rig.engine.in_flight() == 1
        assert tier.caller.failures.as_dict()["by_kind"] == {}
        [result] = rig.engine.poll().prefetches
        assert result.ok_pages == 3 and result.outcome is PrefetchOutcome.COMPLETE
        assert [bytes(rig.host.page_view(h)) for h in host] == stored
        release.set()
        rig.settle()
        assert rig.stored(tier.medium) == [block_id(k) for k in hung]
        assert rig.host.total_holds() == 0
    finally:
        release.set()
        rig.close()


def test_open_breaker_on_first_tier_cascades_to_the_next() -> None:
    clock = ManualClock(1000.0)
    keys = keys_for(2)
    a, b = FaultyBackend(mem()), FaultyBackend(mem())
    fill_tier(a.inner, keys, 7)  # type: ignore[arg-type]
    fill_tier(b.inner, keys, 8)  # type: ignore[arg-type]
    ta = Tier("a", a, settings(breaker_failures=1, breaker_cooldown_s=60), clock=clock)
    rig = Rig([ta, Tier("b", b, settings())])
    a.fail_calls(1, ops=[FaultOp.EXISTS])
    host = rig.host.alloc(2)
    assert host is not None
    ticket = rig.engine.submit_prefetch(keys, host)
    assert rig.engine.wait_prefetch(ticket, WAIT)
    [result] = rig.engine.poll().prefetches
    assert result.sources == ["b", "b"]  # tier a failed: a miss, and the cascade went on
    assert ta.breaker.state is BreakerState.OPEN
    rig.close()


def test_a_page_published_again_is_not_announced_twice() -> None:
    fb = FaultyBackend(mem())
    rig = Rig([Tier("t", fb, settings(medium="T"))])
    keys = keys_for(2)
    rig.publish(rig.pages(keys))
    rig.settle()
    rig.publish(rig.pages(keys))  # e.g. recomputed after an L2 eviction: ALREADY_EXISTS
    rig.settle()
    assert rig.stored("T") == [block_id(k) for k in keys]
    assert fb.put_log == keys + keys
    fb.evict(keys[1:])
    rig.engine.poll()
    rig.settle()
    rig.publish(rig.pages(keys))  # the tail came back after its eviction: announced again
    rig.settle()
    assert rig.stored("T") == [block_id(k) for k in [*keys, keys[1]]]
    assert_no_tail_without_head(rig.events)
    rig.close()


# ---------------------------------------------------------------------- lanes and batches


def test_lookup_and_read_complete_while_puts_are_blocked() -> None:
    fb = FaultyBackend(mem())
    rig = Rig([Tier("t", fb, settings(medium="T", io_threads=2))], host_pages=64)
    stored = keys_for(3, "stored")
    # pages the lookup will find, put before any put hangs
    rig.publish(rig.pages(stored))
    rig.settle()
    release = fb.hang(ops=[FaultOp.PUT])
    for i in range(6):  # more publishes than every thread of the engine and the tier together
        rig.publish(rig.pages(keys_for(2, f"blocked{i}")))
    assert fb.wait_hung(1)
    lookup = rig.engine.submit_prefetch(stored)
    assert rig.engine.wait_prefetch(lookup, WAIT)
    found = rig.engine.poll().lookups
    assert [(r.ticket, r.found) for r in found] == [(lookup, 3)]
    host = rig.host.alloc(3)
    assert host is not None
    rig.engine.start_read(lookup, host)
    assert rig.engine.wait_prefetch(lookup, WAIT)
    results = rig.engine.poll().prefetches
    assert [r.ok_pages for r in results] == [3]
    assert fb.hung_now >= 1  # every put is still blocked: the reads went ahead of them
    assert fb.finished["put"] == 1  # only the first publish's put came back
    release.set()
    rig.settle()
    assert len(rig.stored("T")) == 3 + 6 * 2
    rig.host.free(host)
    assert rig.host.total_holds() == 0
    rig.close()


def test_fragments_of_one_group_are_one_put_call() -> None:
    fb = FaultyBackend(mem())
    rig = Rig([Tier("t", fb, settings(medium="T"))])
    keys = keys_for(6)
    frags = [rig.pages(keys[:2])]
    frags.append(rig.pages(keys[2:4], parent=block_id(keys[1])))
    frags.append(rig.pages(keys[4:], parent=block_id(keys[3])))
    rig.publish(*frags)
    rig.settle()
    assert fb.calls["put"] == 1
    assert rig.stored("T") == [block_id(k) for k in keys]
    assert rig.host.total_holds() == 0
    rig.close()


def test_lookup_waits_only_for_the_put_of_its_own_pages() -> None:
    fb = FaultyBackend(mem())
    rig = Rig([Tier("t", fb, settings(medium="T", io_threads=2))], host_pages=64)
    blocker = keys_for(2, "blocker")
    wanted = keys_for(3, "wanted")
    release = fb.hang(ops=[FaultOp.PUT], keys=blocker)
    rig.publish(rig.pages(blocker))
    assert fb.wait_hung(1)  # holds the only thread the tier gives writes
    rig.publish(rig.pages(wanted))  # queued behind it
    ticket = rig.engine.submit_prefetch(wanted)
    # the put of the looked-up pages went ahead of the hung one, then the lookup found them
    assert rig.engine.wait_prefetch(ticket, WAIT)
    polled = rig.engine.poll()
    rig.events += polled.events
    assert [(r.ticket, r.found) for r in polled.lookups] == [(ticket, 3)]
    assert fb.hung_now == 1
    assert rig.stored("T") == [block_id(k) for k in wanted]
    rig.engine.cancel_prefetch(ticket)
    release.set()
    rig.settle()
    assert sorted(rig.stored("T")) == sorted(block_id(k) for k in blocker + wanted)
    assert rig.host.total_holds() == 0
    rig.close()


def test_memory_lookups_run_on_the_calling_thread_while_puts_block() -> None:
    inner = mem()
    fb = FaultyBackend(inner, capabilities=replace(inner.capabilities, memory_lookups=True))
    rig = Rig([Tier("t", fb, settings(medium="T"))], host_pages=64)
    stored = keys_for(3, "stored")
    rig.publish(rig.pages(stored))
    rig.settle()
    release = fb.hang(ops=[FaultOp.PUT])
    for i in range(6):  # every write thread of the tier blocked, more queued
        rig.publish(rig.pages(keys_for(2, f"blocked{i}")))
    assert fb.wait_hung(1)
    seen = fb.calls["exists"]
    hit = rig.engine.submit_prefetch(stored)
    miss = rig.engine.submit_prefetch(keys_for(2, "never"))
    assert fb.calls["exists"] == seen + 2  # asked before submit_prefetch returned
    # no worker was involved: the very next poll has both answers
    found = {r.ticket: r.found for r in rig.engine.poll().lookups}
    assert found == {hit: 3, miss: 0}
    assert fb.hung_now >= 1
    rig.engine.cancel_prefetch(hit)
    rig.engine.cancel_prefetch(miss)
    release.set()
    rig.settle()
    assert rig.host.total_holds() == 0
    rig.close()


def test_a_lookup_whose_puts_are_on_their_way_still_waits_for_them() -> None:
    inner = mem()
    fb = FaultyBackend(inner, capabilities=replace(inner.capabilities, memory_lookups=True))
    rig = Rig([Tier("t", fb, settings(medium="T"))], host_pages=64)
    wanted = keys_for(2, "wanted")
    release = fb.hang(ops=[FaultOp.PUT], keys=wanted)
    rig.publish(rig.pages(wanted))
    assert fb.wait_hung(1)
    ticket = rig.engine.submit_prefetch(wanted)  # not answered here: it would be a miss
    assert rig.engine.poll().lookups == []
    release.set()
    assert rig.engine.wait_prefetch(ticket, WAIT)
    assert [(r.ticket, r.found) for r in rig.engine.poll().lookups] == [(ticket, 2)]
    rig.engine.cancel_prefetch(ticket)
    rig.settle()
    rig.close()


# ---------------------------------------------------------------------- serving-thread waits


def test_serving_waits_count_the_time_blocked_on_queued_puts_and_nothing_else() -> None:
    fb = FaultyBackend(mem())
    tier = Tier("t", fb, settings(medium="T", deadline_s=SHORT, io_threads=2, breaker_failures=100))
    rig = Rig([tier], put_backlog_pages=0)
    # nothing queued: a throttle waits for nothing and counts nothing
    assert rig.engine.throttle_publishes() == 0
    assert rig.engine.stats()["serving_wait_s"] == {"prefetch": 0.0, "put_throttle": 0.0}
    release = fb.hang(ops=[FaultOp.PUT])
    try:
        rig.publish(rig.pages(keys_for(2, "a")))
        rig.publish(rig.pages(keys_for(2, "b")))
        assert fb.wait_hung(1)
        # no backlog allowed, two put calls in flight on a tier running one put at a time: the
        # serving thread waits for the oldest (here until its deadline, since it hangs) and
        # that wait is what is counted
        assert rig.engine.throttle_publishes() >= 1
        waits = rig.engine.stats()["serving_wait_s"]
        assert waits["put_throttle"] > 0.0 and waits["prefetch"] == 0.0
        release.set()
        rig.settle()
        assert rig.host.total_holds() == 0
    finally:
        release.set()
        rig.close()


def test_puts_queue_up_to_the_backlog_of_host_pages_then_the_oldest_are_waited_for() -> None:
    """The serving thread goes on while a tier's queued puts hold at most the backlog; past
    it, it waits for the oldest calls until they are back within it, never for newer ones. A
    wait ends at the tier's deadline here (the puts hang); the late puts store everything."""
    fb = FaultyBackend(mem())
    tier = Tier("t", fb, settings(medium="T", deadline_s=SHORT, io_threads=2, breaker_failures=100))
    rig = Rig([tier], host_pages=64, put_backlog_pages=6)
    release = fb.hang(ops=[FaultOp.PUT])
    try:
        chains = [keys_for(2, salt) for salt in "abcd"]
        for keys in chains[:3]:
            rig.publish(rig.pages(keys))
        assert fb.wait_hung(1)
        # three calls of two pages hang: 6 pages held, within the backlog: no wait at all
        assert rig.engine.throttle_publishes() == 0
        assert rig.engine.stats()["serving_wait_s"]["put_throttle"] == 0.0
        assert rig.host.total_holds() == 6
        # a fourth: 8 pages held. The serving thread waits for exactly the oldest call (its
        # deadline passes, since it hangs), then 6 pages are held: within the backlog again
        rig.publish(rig.pages(chains[3]))
        assert rig.engine.throttle_publishes() == 1
        assert rig.engine.stats()["serving_wait_s"]["put_throttle"] > 0.0
        release.set()
        rig.settle()
        assert rig.host.total_holds() == 0
        # nothing was dropped to keep within the backlog: every page of every call is stored
        for keys in chains:
            assert tier.backend.exists(keys) == [True, True], keys
    finally:
        release.set()
        rig.close()


def test_the_put_backlog_is_a_quarter_of_the_host_pool_unless_given() -> None:
    tier = Tier("t", mem(), settings(medium="T"))
    rig = Rig([tier], host_pages=64)
    try:
        assert rig.engine.puts.backlog_pages == 16
    finally:
        rig.close()
    tiers = Tiers([Tier("u", mem(), settings(medium="T"))])
    tiers.open()
    try:
        with pytest.raises(ValueError, match="put backlog must be >= 0 pages, got -1"):
            StorageEngine(tiers, HostPool(LAYOUT, 8, pin=False), page_size=PS, put_backlog_pages=-1)
    finally:
        tiers.close()


# ---------------------------------------------------------------------- merged put calls


class _Recording(FaultyBackend):
    """Records each put call as the backend receives it: ``("put", keys)`` or
    ``("batches", [keys, ...])``."""

    def __init__(self, inner: MemoryBackend) -> None:
        super().__init__(inner)
        self.received: list[tuple[str, list[str] | list[list[str]]]] = []

    def put(self, keys: Sequence[str], srcs: Sequence[PageBuffers]) -> list[PageStatus]:
        self.received.append(("put", list(keys)))
        return super().put(keys, srcs)

    def put_batches(
        self, batches: Sequence[tuple[Sequence[str], Sequence[PageBuffers]]]
    ) -> list[list[PageStatus]]:
        self.received.append(("batches", [list(keys) for keys, _ in batches]))
        return super().put_batches(batches)


def _queued_behind_a_hung_put(rig: Rig, fb: _Recording, chains: Sequence[list[str]]) -> list[str]:
    """Publish a first chain whose put hangs on the engine's only worker, then ``chains`` (one
    publish each, queued meanwhile), then let the first return and everything settle."""
    first = keys_for(2, "first")
    release = fb.hang(ops=[FaultOp.PUT], keys=first)
    try:
        rig.publish(rig.pages(first))
        assert fb.wait_hung(1)  # the engine's one worker waits for it: the rest must queue
        for keys in chains:
            rig.publish(rig.pages(keys))
        release.set()
        rig.settle()
    finally:
        release.set()
    return first


def test_put_calls_queued_behind_a_busy_tier_reach_it_as_one_call() -> None:
    fb = _Recording(mem())
    rig = Rig([Tier("t", fb, settings(medium="T"))], host_pages=64, workers=1)
    chains = [keys_for(2, salt) for salt in "abc"]
    first = _queued_behind_a_hung_put(rig, fb, chains)
    # the three queued calls went as one, in order, each a batch of its own
    assert fb.received == [("put", first), ("batches", chains)]
    stored = [block_id(k) for k in first + chains[0] + chains[1] + chains[2]]
    assert sorted(rig.stored("T")) == sorted(stored)
    assert_no_tail_without_head(rig.events)
    for keys in [first, *chains]:
        assert fb.inner.exists(keys) == [True, True]
    assert rig.host.total_holds() == 0
    rig.close()


def test_a_page_in_two_merged_calls_is_stored_by_the_first() -> None:
    fb = _Recording(mem())
    rig = Rig([Tier("t", fb, settings(medium="T"))], host_pages=64, workers=1)
    a, b = keys_for(2, "a"), keys_for(2, "b")
    first = _queued_behind_a_hung_put(rig, fb, [a, b, a])
    assert fb.received == [("put", first), ("batches", [a, b, a])]
    # the second copy met the first (ALREADY_EXISTS, stored): nothing failed, nothing lost
    assert sorted(set(rig.stored("T"))) == sorted(block_id(k) for k in first + a + b)
    assert_no_tail_without_head(rig.events)
    assert rig.engine.stats()["tiers"]["t"]["put_failed"] == 0
    assert rig.host.total_holds() == 0
    rig.close()


def test_a_merged_call_past_its_deadline_fails_each_batch_then_announces_them_late() -> None:
    fb = _Recording(mem())
    tier = Tier("t", fb, settings(medium="T", deadline_s=SHORT, breaker_failures=100))
    rig = Rig([tier], host_pages=64, workers=1)
    gate = threading.Event()

    def busy() -> None:
        gate.wait()

    rig.engine.workers.submit(busy)  # the engine's one worker is busy: the puts queue
    chains = [keys_for(2, salt) for salt in "abc"]
    release = fb.hang(ops=[FaultOp.PUT])
    try:
        for keys in chains:
            rig.publish(rig.pages(keys))
        gate.set()
        assert fb.wait_hung(1)
        assert fb.received == [("batches", chains)]
        # the deadline passes: every batch of the merged call is reported failed, none stored
        wait_for(
            lambda: rig.engine.stats()["tiers"]["t"]["put_failed"] == 6,
            WAIT,
            what="the merged call's deadline",
        )
        rig.events += rig.engine.poll().events
        assert rig.stored("T") == []
        assert rig.host.total_holds() == 6  # the hung call still reads them
        release.set()
        rig.settle()
    finally:
        release.set()
    # the call stored everything after all: each batch announced late, in chain order
    assert rig.engine.stats()["tiers"]["t"]["late_acked_pages"] == 6
    assert sorted(rig.stored("T")) == sorted(block_id(k) for c in chains for k in c)
    assert_no_tail_without_head(rig.events)
    assert rig.host.total_holds() == 0
    rig.close()
