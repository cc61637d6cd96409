"""Ordered per-tier announcements of published pages (no torch).

One write-through ack becomes one :class:`PublishGroup`: its fragments' pages, in prefix order,
and per tier how far the announcements got (:class:`TierProgress`). :class:`Announcer` turns
the tiers' put results into ``BlockStored(<tier medium>)`` events:

- along one group, a tier is announced only for the contiguous prefix it stored (``OK`` or
  ``ALREADY_EXISTS``); after the first page that failed (or was dropped) nothing later in the
  group is announced on that tier, even if it was stored
- across groups, a page is announced only when its parent is announced on the tier (and not
  removed since); while the parent's own publish is still open the page waits, and once the
  parent is known missing the page is not announced. So no tail is ever announced without its
  head
- a page read back from a tier is on it: it is announced there at once
  (:meth:`Announcer.read_back`), under the same rule, whether or not a put of it is still on its
  way (that put's result then finds it announced)
- a put that comes back after its deadline (counted failed then) is not lost: the pages it
  stored are announced when its result comes (:meth:`Announcer.acked_late`), under the same
  rule, unless they were announced meanwhile (read back, or published again)
- a page a tier stored but that could not be announced because its parent is not announced
  there (cut off after a failure, or acknowledged before its parent) is remembered
  (:class:`WithheldPages`) and announced right after its parent is, if the tier did not drop it
  meanwhile (it was counted in ``unannounced_pages`` when its result came): every page a tier
  acknowledged is announced once its whole prefix is
- a page already announced on a tier (and not removed since) is not announced again: on every
  tier a page is announced exactly once per residency, so ``known`` (what children may chain
  to) is exactly what was announced
- a batch may go to some tiers only (ancestors republished to a tier that lost them,
  :meth:`Announcer.missing`); the other tiers skip it
- a page the tier reported evicted after its put (or read) was handed out is not announced by
  that put's result (or read): reports come from several worker threads, so an eviction can be
  polled before the result of a put that stored the page it removed, and announcing that put
  would leave the page announced on a tier that no longer holds it (and ``known``, so its chain
  would never be put back). :class:`EvictionLog` remembers the evictions by report number;
  each put and read carries the number it was handed out at. A put handed out before the
  eviction may also have stored a new residency after it: that page stays unannounced (read
  back or published again, it is announced then), the safe side of the race

The announcer runs on the cache's thread only (the engine's ``poll``).
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from hicache.events import BlockStored, KVEvent
from hicache.storage.backend import PageStatus

if TYPE_CHECKING:
    from hicache.tiering.tiers import Tier

__all__ = [
    "Announcer",
    "EvictionLog",
    "KnownBlocks",
    "PublishGroup",
    "PublishPage",
    "TierProgress",
    "WithheldPages",
]

_OK = PageStatus.OK
_EXISTS = PageStatus.ALREADY_EXISTS

#: Block ids remembered per tier as "stored there" (for parent checks), ~100 bytes each.
DEFAULT_KNOWN_CAPACITY = 1 << 20
#: Evictions remembered per tier by report number (see :class:`EvictionLog`), at most.
EVICTION_LOG_CAPACITY = 1 << 16
#: Pages remembered per tier as stored but not announced (their head is not), at most: each
#: keeps its token ids, and a tier that keeps failing heads would otherwise pile them up.
WITHHELD_CAPACITY = 1 << 14


class PublishPage(NamedTuple):
    """One page to publish and what its ``BlockStored`` event says.

    ``token_ids`` is the page's tokens: a list, or packed as ``keys.tokens_to_bytes`` packs
    them (what the cache hands over: its nodes keep their tokens packed, and an event decodes
    them only when a consumer reads its ``token_ids``). A named tuple, not a frozen dataclass:
    as immutable, built in a fraction of the time (one per page published, on the serving
    thread; a frozen dataclass sets each field through ``object.__setattr__``).
    """

    key: str
    host_page: int
    block_id: int
    parent_block_id: int | None
    token_ids: Sequence[int] | bytes


@dataclass(slots=True)
class TierProgress:
    """How far one tier got along one group, and whether the rest is cut off."""

    next_batch: int = 0
    next_page: int = 0
    #: A page of this group failed on the tier: nothing later in the group is announced.
    broken: bool = False
    #: Why a publish of this group was not sent to the tier (the stats counter): the rest of
    #: the group is not sent either.
    drop_reason: str | None = None


@dataclass(slots=True)
class PublishGroup:
    """The batches of one write-through ack, in prefix order, and how far each tier got."""

    id: int
    batches: list[list[PublishPage]] = field(default_factory=list)
    #: Per batch, the tiers it was handed to (or dropped for): the others skip it.
    targets: list[frozenset[str]] = field(default_factory=list)
    #: Per (tier, batch), the tier's eviction mark when the batch was handed to it: a page
    #: evicted after it is not announced by that put's result.
    marks: dict[tuple[str, int], int] = field(default_factory=dict)
    results: dict[tuple[str, int], list[PageStatus]] = field(default_factory=dict)
    progress: dict[str, TierProgress] = field(default_factory=dict)
    closed: bool = False
    outstanding: int = 0

    def settled(self) -> bool:
        """Closed, nothing in flight, and every tier walked every batch."""
        return (
            self.closed
            and self.outstanding == 0
            and all(p.next_batch >= len(self.batches) for p in self.progress.values())
        )


class KnownBlocks:
    """A bounded LRU set of block ids (forgetting one only ever withholds announcements)."""

    __slots__ = ("_ids", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[int, None] = OrderedDict()

    def add(self, block_id: int) -> None:
        self._ids[block_id] = None
        self._ids.move_to_end(block_id)
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def discard(self, block_id: int) -> None:
        self._ids.pop(block_id, None)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._ids


class WithheldPages:
    """Pages one tier stored whose parent is not announced there yet, by parent; bounded, oldest
    first out (forgetting one only ever withholds an announcement)."""

    __slots__ = ("_by_parent", "_parent_of", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._by_parent: dict[int, dict[int, PublishPage]] = {}
        #: block id -> its parent's, oldest first
        self._parent_of: OrderedDict[int, int] = OrderedDict()

    def add(self, page: PublishPage) -> None:
        """Remember ``page`` (it has a parent) until its parent is announced."""
        parent = page.parent_block_id
        assert parent is not None, "a root page is never withheld"
        self.discard(page.block_id)
        self._by_parent.setdefault(parent, {})[page.block_id] = page
        self._parent_of[page.block_id] = parent
        if len(self._parent_of) > self.capacity:
            self.discard(next(iter(self._parent_of)))

    def discard(self, block_id: int) -> None:
        """Forget ``block_id`` (the tier dropped it, or it is announced)."""
        parent = self._parent_of.pop(block_id, None)
        if parent is None:
            return
        children = self._by_parent[parent]
        del children[block_id]
        if not children:
            del self._by_parent[parent]

    def take_children(self, parent: int) -> list[PublishPage]:
        """Remove and return the pages withheld for ``parent``."""
        children = self._by_parent.pop(parent, None)
        if not children:
            return []
        for bid in children:
            del self._parent_of[bid]
        return list(children.values())

    def __len__(self) -> int:
        return len(self._parent_of)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._parent_of


class EvictionLog:
    """One tier's evictions as the cache's thread polled them, numbered per report, so a put or
    read result can tell whether its page was evicted after the work was handed out (its
    ``mark``). Bounded, oldest first out; a forgotten eviction raises ``floor``, and a mark below
    the floor counts as evicted: forgetting only ever withholds an announcement."""

    __slots__ = ("_at", "capacity", "floor", "seq")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        #: Reports logged so far: the mark of work handed out now.
        self.seq = 0
        #: The newest report number forgotten.
        self.floor = 0
        self._at: OrderedDict[int, int] = OrderedDict()

    def add(self, block_ids: list[int]) -> None:
        """Log one report of ``block_ids`` leaving the tier."""
        self.seq += 1
        seq = self.seq
        at = self._at
        if at.keys().isdisjoint(block_ids):
            # the usual report: none logged before, so each goes to the end as it is added
            # (two passes in C instead of two method calls per id)
            at.update(zip(block_ids, itertools.repeat(seq)))
        else:
            for bid in block_ids:
                at[bid] = seq
                at.move_to_end(bid)
        while len(at) > self.capacity:
            _, seq = at.popitem(last=False)
            self.floor = max(self.floor, seq)

    def evicted_since(self, block_id: int, mark: int) -> bool:
        """Whether ``block_id`` may have left the tier after ``mark`` (work handed out then)."""
        return self._at.get(block_id, 0) > mark or self.floor > mark

    def __len__(self) -> int:
        return len(self._at)


class Announcer:
    """Open publish groups and what each tier is known to hold (see the module docstring)."""

    def __init__(
        self,
        tiers: list[Tier],
        *,
        page_size: int,
        lora_id: int | None,
        counters: dict[str, int],
        known_capacity: int = DEFAULT_KNOWN_CAPACITY,
    ) -> None:
        self._tiers = {t.name: t for t in tiers}
        self.page_size = page_size
        self.lora_id = lora_id
        #: The engine's counters: ``announced_pages``, ``unannounced_pages`` and
        #: ``late_acked_pages`` move here.
        self.counters = counters
        self.groups: dict[int, PublishGroup] = {}
        self._next_id = 1
        self.known = {t.name: KnownBlocks(known_capacity) for t in tiers}
        withheld = min(known_capacity, WITHHELD_CAPACITY)
        self.withheld = {t.name: WithheldPages(withheld) for t in tiers}
        log = min(known_capacity, EVICTION_LOG_CAPACITY)
        self.evictions = {t.name: EvictionLog(log) for t in tiers}
        # pages published to a tier whose announcement is not decided yet (parent checks wait
        # for these instead of giving up)
        self.unresolved: dict[str, Counter[int]] = {t.name: Counter() for t in tiers}
        #: Pages announced per tier since the tiers' counters were last told (:meth:`_count`):
        #: counted once per call, not per page (each tier's ``stats.add`` takes a lock).
        self._announced: Counter[str] = Counter()

    def begin(self) -> PublishGroup:
        """A new open group."""
        group = PublishGroup(self._next_id)
        self._next_id += 1
        self.groups[group.id] = group
        return group

    def expect(self, group: PublishGroup, batch: int, tier: str, pages: list[PublishPage]) -> int:
        """``group``'s ``batch`` of ``pages`` was handed to (or dropped for) ``tier``: their
        announcement is pending. Returns the tier's eviction mark the put carries."""
        unresolved = self.unresolved[tier]
        for p in pages:
            unresolved[p.block_id] += 1
        mark = group.marks[(tier, batch)] = self.evictions[tier].seq
        return mark

    def marks(self) -> dict[str, int]:
        """Every tier's eviction mark now (for a read handed out now)."""
        return {name: log.seq for name, log in self.evictions.items()}

    def record(self, group: int, tier: str, batch: int, statuses: list[PageStatus]) -> None:
        """A put of ``group``'s ``batch`` on ``tier`` finished with ``statuses``."""
        g = self.groups[group]
        g.results[(tier, batch)] = statuses
        g.outstanding -= 1

    def read_back(
        self, tier: str, pages: list[PublishPage], events: list[KVEvent], mark: int
    ) -> None:
        """``pages`` (a chain, prefix first) were read from ``tier`` by a read handed out at
        eviction ``mark``, so they were on it: announce those not announced yet, as far as their
        parent is announced there and none was evicted since."""
        known = self.known[tier]
        log = self.evictions[tier]
        for page in pages:
            if page.block_id in known:
                continue
            parent = page.parent_block_id
            if parent is not None and parent not in known:
                break  # the head is not announced there: a child may not be either
            if log.evicted_since(page.block_id, mark):
                break  # read before an eviction polled first: no longer there
            self._stored(tier, page, events)
        self._count()

    def acked_late(
        self,
        tier: str,
        pages: list[PublishPage],
        statuses: list[PageStatus],
        events: list[KVEvent],
        mark: int,
    ) -> None:
        """A put of ``pages`` (prefix order) on ``tier``, handed out at eviction ``mark``, came
        back after its deadline, when its result had already been recorded as failed, with
        ``statuses``: the pages it stored are on the tier after all. Announce them as far as
        their parents are announced there (the rest waits for its parent, as any withheld page
        does); a page announced meanwhile is not announced again, nor one evicted since."""
        stored = [p for p, s in zip(pages, statuses, strict=False) if s.stored]
        if not stored:
            return
        self.counters["late_acked_pages"] += len(stored)
        self._tiers[tier].stats.add(late_acked_pages=len(stored))
        log = self.evictions[tier]
        for page in stored:
            if log.evicted_since(page.block_id, mark):
                self._unannounced(tier)
                continue
            self._announce_or_withhold(tier, page, events)
        self._count()

    def removed(self, tier: str, block_ids: list[int]) -> None:
        """These pages left ``tier`` (its own eviction, or a wipe)."""
        withheld = self.withheld[tier]
        self.evictions[tier].add(block_ids)
        forget = self.known[tier]._ids.pop  # KnownBlocks.discard, without a call per id
        for bid in block_ids:
            forget(bid, None)
        if withheld:
            waiting = withheld._parent_of
            for bid in block_ids:
                if bid in waiting:
                    withheld.discard(bid)

    def missing(self, tier: str, block_id: int) -> bool:
        """Whether ``block_id`` is not known on ``tier`` (never announced there, read from it,
        or removed since) and no publish of it to ``tier`` is still undecided."""
        return block_id not in self.known[tier] and self.unresolved[tier][block_id] <= 0

    def pending(self) -> int:
        """Groups not fully announced yet."""
        return len(self.groups)

    def announce_all(self, events: list[KVEvent]) -> None:
        """Advance every open group as far as results and parents allow; append the events."""
        # Groups wait for parents published in other groups, so walk them until nothing moves
        # (in id order, parents usually settle in the same pass).
        moved = True
        while moved:
            moved = False
            for group in list(self.groups.values()):
                if self._announce(group, events):
                    moved = True
                self.finish(group)
        self._count()

    def _announce(self, group: PublishGroup, events: list[KVEvent]) -> bool:
        """Advance every tier along ``group``'s batches, in order; return whether any moved."""
        moved = False
        batches = group.batches
        for name, prog in group.progress.items():
            if prog.next_batch >= len(batches):
                continue  # this tier walked the whole group already
            # The per-page checks read these tables directly and keep the cursor in locals: a
            # method call or attribute write per page (known's ``__contains__`` and ``add``,
            # the log's ``evicted_since``, the Counter's ``__missing__``, ``_stored`` and the
            # tier's ``medium`` property) was most of this loop, which runs once per page
            # every tier stored.
            known_blocks = self.known[name]
            known = known_blocks._ids
            capacity = known_blocks.capacity
            unresolved = self.unresolved[name]
            withheld = self.withheld[name]
            log = self.evictions[name]
            evicted_at = log._at
            medium = self._tiers[name].medium
            page_size = self.page_size
            lora_id = self.lora_id
            announced = 0
            broken = prog.broken
            while prog.next_batch < len(batches):
                b = prog.next_batch
                if name not in group.targets[b]:
                    prog.next_batch += 1  # a batch for other tiers only (a republish)
                    prog.next_page = 0
                    moved = True
                    continue
                pages = batches[b]
                statuses = group.results.get((name, b))
                if statuses is None and pages:
                    break  # this tier's result for the next batch is still in flight
                mark = group.marks.get((name, b), 0)
                # a page evicted after its put was handed out: that eviction may have removed
                # what this put stored (its report came first); see EvictionLog.evicted_since.
                # With no report logged since the mark (the usual case) none was: the log's
                # numbers and floor never pass its ``seq``.
                evicted_since = log.seq > mark
                any_evicted = log.floor > mark
                i = prog.next_page
                waiting = False
                while i < len(pages):
                    page = pages[i]
                    bid = page.block_id
                    assert statuses is not None
                    status = statuses[i]
                    stored = (status is _OK or status is _EXISTS) and not (
                        evicted_since and (any_evicted or evicted_at.get(bid, 0) > mark)
                    )
                    parent = page.parent_block_id
                    if stored and not broken and parent is not None and parent not in known:
                        if unresolved.get(parent, 0) > 0:
                            waiting = True  # the parent's own publish is still open
                            break
                        broken = True  # the head is not on this tier
                    left = unresolved.get(bid, 0) - 1
                    if left > 0:
                        unresolved[bid] = left
                    else:
                        unresolved.pop(bid, None)
                    i += 1
                    moved = True
                    if broken or not stored:
                        broken = True
                        self._unannounced(name)
                        if stored and parent is not None and parent not in known:
                            # on the tier, its head not (yet): announced right after the head
                            withheld.add(page)
                        continue
                    if bid in known:
                        # announced before and still there (published again after an L2
                        # eviction, or read back from the tier): once per residency (the
                        # page is as recent in ``known`` as ``KnownBlocks.add`` makes it)
                        known.move_to_end(bid)
                        continue
                    if bid in withheld._by_parent or bid in withheld._parent_of:
                        # pages wait for this one, or it waited itself: _stored sorts them out
                        self._stored(name, page, events, medium)
                        continue
                    # ``_stored`` of a page nothing waits for, inline
                    events.append(_page_event(page, page_size, lora_id, medium))
                    known[bid] = None  # not in ``known``: added last, as ``add`` would
                    if len(known) > capacity:
                        known.popitem(last=False)
                    announced += 1
                prog.next_page = i
                if waiting:
                    break
                prog.next_batch += 1
                prog.next_page = 0
            prog.broken = broken
            if announced:
                self._announced[name] += announced
        return moved

    def _unannounced(self, name: str) -> None:
        self.counters["unannounced_pages"] += 1
        self._tiers[name].stats.add(unannounced_pages=1)

    def _announce_or_withhold(self, name: str, page: PublishPage, events: list[KVEvent]) -> None:
        """``page`` is stored on tier ``name``: announce it if its parent is announced there,
        else keep it for when the parent is."""
        known = self.known[name]
        if page.block_id in known:
            return  # once per residency
        parent = page.parent_block_id
        if parent is None or parent in known:
            self._stored(name, page, events)
        else:
            self.withheld[name].add(page)

    def _stored(
        self, name: str, page: PublishPage, events: list[KVEvent], medium: str | None = None
    ) -> None:
        """Announce ``page`` on tier ``name`` (whose ``medium`` the caller may have read
        already), then the pages withheld below it (each after its parent). The counters learn
        it at the caller's :meth:`_count`."""
        if medium is None:
            medium = self._tiers[name].medium
        known = self.known[name]
        withheld = self.withheld[name]
        todo = [page]
        announced = 0
        while todo:
            p = todo.pop()
            if p.block_id in known:
                # announced meanwhile (a withheld page read back, or published again)
                todo += withheld.take_children(p.block_id)
                continue
            events.append(_page_event(p, self.page_size, self.lora_id, medium))
            known.add(p.block_id)
            announced += 1
            if withheld:
                withheld.discard(p.block_id)
                todo += withheld.take_children(p.block_id)
        self._announced[name] += announced

    def _count(self) -> None:
        """Tell the engine's and the tiers' counters the pages announced since last time."""
        if not self._announced:
            return
        for name, n in self._announced.items():
            self.counters["announced_pages"] += n
            self._tiers[name].stats.add(announced_pages=n)
        self._announced.clear()

    def finish(self, group: PublishGroup) -> None:
        """Forget ``group`` once it is settled."""
        if group.settled():
            self.groups.pop(group.id, None)


def _page_event(page: PublishPage, page_size: int, lora_id: int | None, medium: str) -> BlockStored:
    """The ``BlockStored`` of one page a tier holds; packed tokens stay packed until read."""
    tokens = page.token_ids
    if type(tokens) is bytes:
        return BlockStored.packed(
            [page.block_id], page.parent_block_id, tokens, page_size, lora_id, medium
        )
    return BlockStored(
        [page.block_id], page.parent_block_id, list(tokens), page_size, lora_id, medium
    )
