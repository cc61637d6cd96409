"""Late acks: a put that outlives its deadline is counted failed, and the tier may still store
its pages. Those pages are announced once their put comes back, exactly once per residency, each
after its parent; a later read back does not announce them again; a page the tier dropped
meanwhile never is.

Real parts: a real ``HostPool``, real ``MemoryBackend`` tiers behind ``FaultyBackend`` (which
holds the put past the deadline, then lets it store), the real engine and announcer.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch

from hicache.config import TierSettings
from hicache.events import BlockRemoved, BlockStored, KVEvent
from hicache.keys import block_id
from hicache.pools import HostPool, KVLayout
from hicache.storage.backend import PageStatus
from hicache.storage.pageformat import stored_size
from hicache.testing.backends import memory_backend
from hicache.testing.faults import FaultOp, FaultyBackend
from hicache.testing.wait import WAIT_S, wait_for
from hicache.tiering.announce import WithheldPages
from hicache.tiering.engine import PrefetchResult, PublishPage, StorageEngine
from hicache.tiering.tiers import Tier, Tiers

PS = 2
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, page_size=PS, dtype=torch.float32)
MEDIUM = "T"
#: Deadline of the tier whose puts the tests hold: long enough for every healthy call on a
#: loaded machine (the housekeeping calls share it), so only the held put reaches it.
DEADLINE_S = 2.0


def keys_for(n: int, salt: str) -> list[str]:
    out, h = [], salt.encode()
    for _ in range(n):
        h = hashlib.sha256(h).digest()
        out.append(h.hex())
    return out


class Rig:
    """One held-up tier, a host pool and the engine; collects every event polled.
    ``capacity_pages``: the tier evicts (LRU) to hold at most that many pages."""

    def __init__(
        self,
        *,
        io_threads: int = 4,
        capacity_pages: int | None = None,
        deadline_s: float = DEADLINE_S,
    ) -> None:
        capacity = None
        if capacity_pages is not None:  # a page is stored with its header
            capacity = capacity_pages * stored_size(LAYOUT.page_bytes)
        inner = memory_backend(LAYOUT.page_bytes, namespace="late", capacity=capacity)
        self.backend = FaultyBackend(inner)
        settings = TierSettings(
            medium=MEDIUM,
            deadline_s=deadline_s,
            retry_attempts=1,
            breaker_failures=100,
            io_threads=io_threads,
        )
        self.tier = Tier("t", self.backend, settings)
        self.tiers = Tiers([self.tier])
        self.tiers.open()
        self.host = HostPool(LAYOUT, 32, pin=False)
        self.engine = StorageEngine(self.tiers, self.host, page_size=PS, evict_poll_interval_s=0)
        self.events: list[KVEvent] = []

    def pages(self, keys: Sequence[str], parent: int | None = None) -> list[PublishPage]:
        host = self.host.alloc(len(keys))
        assert host is not None
        out = []
        for i, (k, h) in enumerate(zip(keys, host, strict=True)):
            self.host.page_view(h)[:] = bytes([i + 1]) * LAYOUT.page_bytes
            bid = block_id(k)
            out.append(PublishPage(k, h, bid, parent, [i, i + 1]))
            parent = bid
        return out

    def publish(self, pages: list[PublishPage]) -> None:
        group = self.engine.begin_publish()
        self.engine.publish(group, pages)
        self.engine.end_publish(group)

    def poll(self) -> None:
        self.events += self.engine.poll().events

    def wait_groups_settled(self) -> None:
        """Poll until every publish group is settled (a held put: at its deadline)."""

        def settled() -> bool:
            self.poll()
            return self.engine.pending_groups() == 0

        wait_for(settled, what="the publish groups settled")

    def settle(self) -> None:
        """Every job and hold finished (a late put's result is queued before its holds go),
        then everything polled."""
        assert self.engine.wait_idle(WAIT_S)
        self.poll()

    def announced(self) -> list[int]:
        return [
            e.block_hashes[0]
            for e in self.events
            if isinstance(e, BlockStored) and e.medium == MEDIUM
        ]

    def close(self) -> None:
        self.backend.heal()
        self.engine.close()
        self.tiers.close()


@pytest.fixture
def make_rig() -> Iterator[Callable[..., Rig]]:
    """Builds rigs (``Rig``'s arguments) and closes each at teardown, the test passed or not: a
    failed assert must not leave the engine's threads and a held put running into later tests."""
    rigs: list[Rig] = []

    def make(**kwargs: Any) -> Rig:
        rigs.append(Rig(**kwargs))
        return rigs[-1]

    yield make
    for rig in rigs:
        rig.close()


def assert_prefix_order_once_per_residency(events: Sequence[KVEvent]) -> None:
    """On the tier's medium: each block after its parent (announced, not removed since), and
    never twice while resident."""
    resident: set[int] = set()
    for e in events:
        if isinstance(e, BlockRemoved) and e.medium == MEDIUM:
            resident.difference_update(e.block_hashes)
        elif isinstance(e, BlockStored) and e.medium == MEDIUM:
            parent = e.parent_block_hash
            for bid in e.block_hashes:
                assert parent is None or parent in resident, ("tail before its head", bid)
                assert bid not in resident, ("announced twice", bid)
                resident.add(bid)
                parent = bid


def test_late_put_is_announced_once_after_its_parent_and_not_again_on_read_back(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    keys = keys_for(3, "late")
    ids = [block_id(k) for k in keys]
    head = rig.pages(keys[:1])
    rig.publish(head)
    rig.settle()
    assert rig.announced() == ids[:1]
    # the next ack's put is held past the deadline: the engine counts it failed
    release = rig.backend.hang(ops=[FaultOp.PUT], count=1)
    tail = rig.pages(keys[1:], parent=ids[0])
    rig.publish(tail)
    assert rig.backend.wait_hung(1)
    rig.wait_groups_settled()
    assert rig.announced() == ids[:1]
    assert rig.tier.snapshot()["failures"] == {"timeout": 1}
    assert rig.backend.inner.exists(keys[1:]) == [False, False]
    # ... then the tier stores the pages after all and answers OK
    release.set()
    assert rig.backend.wait_finished(FaultOp.PUT, 2)
    rig.settle()
    assert rig.backend.inner.exists(keys) == [True, True, True]
    assert rig.announced() == ids  # once each, the head first
    assert_prefix_order_once_per_residency(rig.events)
    stored = [e for e in rig.events if isinstance(e, BlockStored) and e.medium == MEDIUM]
    assert [e.parent_block_hash for e in stored] == [None, ids[0], ids[1]]
    assert rig.engine.counters["late_acked_pages"] == 2
    snap = rig.tier.snapshot()
    assert snap["late_acked_pages"] == 2 and snap["late_returns"] == 1
    assert snap["announced_pages"] == 3
    # a prefetch reads the chain back from the tier: on it, and announced already
    host = rig.host.alloc(3)
    assert host is not None
    ticket = rig.engine.submit_prefetch(
        keys, host, token_ids=[[0, 1], [0, 1], [1, 2]], parent_block_id=None
    )
    got: list[PrefetchResult] = []

    def prefetched() -> bool:
        got.extend(p for p in rig.engine.poll().prefetches if p.ticket == ticket)
        return bool(got)

    wait_for(prefetched, what="the read back")
    assert got[0].ok_pages == 3 and got[0].sources == ["t", "t", "t"]
    rig.settle()
    assert rig.announced() == ids  # not a second time
    assert Counter(rig.announced()) == Counter(ids)
    assert rig.host.total_holds() == 0


def test_children_acked_in_time_are_announced_after_their_late_parent(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    keys = keys_for(4, "parent-late")
    ids = [block_id(k) for k in keys]
    release = rig.backend.hang(ops=[FaultOp.PUT], count=1)  # the parent's put only
    rig.publish(rig.pages(keys[:2]))
    assert rig.backend.wait_hung(1)
    rig.publish(rig.pages(keys[2:], parent=ids[1]))  # a later ack: its put goes through
    assert rig.backend.wait_finished(FaultOp.PUT, 1)
    rig.wait_groups_settled()  # the parent failed at its deadline: the children are cut off
    assert rig.announced() == []
    assert rig.backend.inner.exists(keys) == [False, False, True, True]
    release.set()
    assert rig.backend.wait_finished(FaultOp.PUT, 2)
    rig.settle()
    assert rig.announced() == ids  # the late parent, then the children it held back
    assert_prefix_order_once_per_residency(rig.events)
    assert rig.engine.counters["late_acked_pages"] == 2
    assert rig.engine.counters["announced_pages"] == 4
    assert rig.host.total_holds() == 0


def test_late_acks_of_a_chain_in_reverse_order_announce_it_in_prefix_order(
    make_rig: Callable[..., Rig],
) -> None:
    # two acks of one chain, both puts held past the deadline; the child's returns first
    rig = make_rig()
    keys = keys_for(4, "reverse")
    ids = [block_id(k) for k in keys]
    release_parent = rig.backend.hang(ops=[FaultOp.PUT], keys=keys[:2])
    rig.publish(rig.pages(keys[:2]))
    assert rig.backend.wait_hung(1)
    release_child = rig.backend.hang(ops=[FaultOp.PUT], keys=keys[2:])
    rig.publish(rig.pages(keys[2:], parent=ids[1]))
    assert rig.backend.wait_hung(2)
    rig.wait_groups_settled()
    assert rig.announced() == []
    release_child.set()
    assert rig.backend.wait_finished(FaultOp.PUT, 1)
    wait_for(lambda: rig.engine.holds_outstanding() == 1, what="the child's late result")
    rig.poll()
    assert rig.announced() == []  # stored, but its head is not announced
    release_parent.set()
    rig.settle()
    assert rig.announced() == ids
    assert_prefix_order_once_per_residency(rig.events)
    assert rig.engine.counters["late_acked_pages"] == 4
    assert rig.tier.snapshot()["late_acked_pages"] == 4


def test_withheld_page_the_tier_dropped_is_never_announced(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    keys = keys_for(3, "dropped")
    ids = [block_id(k) for k in keys]
    # one put: the head fails, the rest is stored; the call comes back after its deadline
    rig.backend.fail_keys(keys[:1], PageStatus.FAILED, ops=[FaultOp.PUT])
    release = rig.backend.hang(ops=[FaultOp.PUT], count=1)
    rig.publish(rig.pages(keys))
    assert rig.backend.wait_hung(1)
    rig.wait_groups_settled()
    release.set()
    rig.settle()
    assert rig.backend.inner.exists(keys) == [False, True, True]
    assert rig.announced() == []  # no head: held back
    # the tier drops the last page; then the head is stored by a later publish
    rig.backend.evict(keys[2:])

    def removed() -> list[list[int]]:
        rig.poll()
        return [e.block_hashes for e in rig.events if isinstance(e, BlockRemoved)]

    wait_for(removed, what="the tier's eviction reported")
    assert removed() == [ids[2:]]
    rig.backend.clear_key_faults()
    rig.publish(rig.pages(keys[:1]))
    rig.settle()
    assert rig.announced() == ids[:2]  # the head and the page still there; not the dropped one
    assert_prefix_order_once_per_residency(rig.events)
    assert rig.engine.counters["late_acked_pages"] == 2


def test_withheld_pages_are_bounded_and_taken_by_parent() -> None:
    withheld = WithheldPages(2)
    pages = [PublishPage(f"k{i}", i, 10 + i, 1 if i < 2 else 2, [i, i]) for i in range(3)]
    for p in pages:
        withheld.add(p)
    assert len(withheld) == 2 and 10 not in withheld  # the oldest one went
    assert withheld.take_children(1) == [pages[1]]
    withheld.discard(12)
    assert withheld.take_children(2) == [] and len(withheld) == 0


def resident_by_events(events: Sequence[KVEvent]) -> set[int]:
    """The blocks the tier's medium holds by the events: stored and not removed since."""
    resident: set[int] = set()
    for e in events:
        if isinstance(e, BlockRemoved) and e.medium == MEDIUM:
            resident.difference_update(e.block_hashes)
        elif isinstance(e, BlockStored) and e.medium == MEDIUM:
            resident.update(e.block_hashes)
    return resident


def wait_removal_polled(rig: Rig, bid: int) -> None:
    """Poll until the tier's removal of ``bid`` came through as an event."""

    def removed() -> bool:
        rig.poll()
        return any(isinstance(e, BlockRemoved) and bid in e.block_hashes for e in rig.events)

    wait_for(removed, what="the tier's eviction polled")


def held_by_tier(rig: Rig, keys: list[str]) -> set[int]:
    there = rig.backend.inner.exists(keys)
    return {block_id(k) for k, held in zip(keys, there, strict=True) if held}


def test_a_page_evicted_before_its_put_was_polled_is_not_left_announced(
    make_rig: Callable[..., Rig],
) -> None:
    """A second put fills the tier and evicts pages of the first before the engine has polled
    either result: the first put's result and the eviction report reach one poll together. The
    events must end with exactly what the tier holds (stored, then removed), never a page
    announced after its removal."""
    rig = make_rig(capacity_pages=4, io_threads=1, deadline_s=60.0)
    keys = keys_for(3, "first") + keys_for(3, "second")
    for chain in (keys[:3], keys[3:]):
        rig.publish(rig.pages(chain))
        assert rig.engine.wait_idle(WAIT_S)
    rig.poll()
    rig.poll()
    held = held_by_tier(rig, keys)
    assert 0 < len(held) <= 4, held
    assert resident_by_events(rig.events) == held, (
        sorted(resident_by_events(rig.events)),
        sorted(held),
    )


@pytest.mark.parametrize("when", ["in_time", "late", "read_back"])
def test_a_result_polled_after_its_pages_eviction_does_not_announce_them(
    when: str, make_rig: Callable[..., Rig]
) -> None:
    """Reports come from several worker threads: the tier stores (or reads) a page, evicts it,
    and the eviction is polled before the result of the call that stored (read) it. That
    result must not announce the page: events would say the tier holds a page it does not, and
    the engine would not put its chain back. The hang after the call's work holds its result
    while the eviction is polled; ``late`` holds it past the deadline (a late ack)."""
    rig = make_rig(deadline_s=DEADLINE_S if when == "late" else 60.0)
    keys = keys_for(3, f"evicted-{when}")
    ids = [block_id(k) for k in keys]
    if when == "read_back":
        rig.publish(rig.pages(keys))
        rig.settle()
        assert rig.announced() == ids
        rig.backend.evict(keys)  # gone and announced so, then published again
        wait_removal_polled(rig, ids[0])
        rig.events.clear()
        rig.publish(rig.pages(keys))
        rig.settle()
        assert resident_by_events(rig.events) == set(ids)
        release = rig.backend.hang(ops=[FaultOp.GET], count=1, after=True)
        host = rig.host.alloc(3)
        assert host is not None
        rig.engine.submit_prefetch(keys, host, token_ids=[[0, 1], [1, 2], [2, 3]])
    else:
        release = rig.backend.hang(ops=[FaultOp.PUT], count=1, after=True)
        rig.publish(rig.pages(keys))
    assert rig.backend.wait_hung(1)  # the call did its work (stored or read); result held
    if when == "late":
        rig.wait_groups_settled()  # its deadline passed: counted failed, nothing announced
    # the tier drops the last two pages; the eviction is polled before the held result
    rig.backend.evict(keys[1:])
    wait_removal_polled(rig, ids[1])
    release.set()
    rig.settle()
    held = held_by_tier(rig, keys)
    assert held == {ids[0]}
    assert resident_by_events(rig.events) == held, (sorted(resident_by_events(rig.events)), ids)
    assert_prefix_order_once_per_residency(rig.events)
    if when != "read_back":
        assert rig.announced() == ids[:1]
    assert rig.host.total_holds() == 0
