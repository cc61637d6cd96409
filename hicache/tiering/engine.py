"""Storage I/O off the serving thread: publish batches and prefetch reads on worker threads.

- ``begin_publish()`` / ``publish(group, pages)`` / ``end_publish(group)``  hand the fragments of
  one write-through ack to every publishing tier, in prefix order: one put call per tier for
  the whole group, sent at ``end_publish`` (or ``poll``, ``wait_idle``, ``send_unsent``)
- ``publish_fragment(group, pages, ancestors)``  the same for a fragment of a tree node, given a
  lazy iterator of the pages above it: the engine decides per tier whether that tier lost some
  of them and puts those back ahead of the fragment (the tier's chain stays prefix-closed)
- ``submit_prefetch(keys, None, token_ids=...)``  look a chain up through the tier cascade;
  ``poll`` reports how many pages the tiers hold (:class:`LookupResult`), the cache allocates
  host pages for exactly those and calls ``start_read(ticket, host_pages)`` (or
  ``cancel_prefetch``); with host pages given at once, lookup and read run as one job. Pages a
  later tier served are promoted into earlier ones when enabled
- ``prefetch_progress(ticket)``  contiguous ``OK`` pages landed so far (for early termination)
- ``abandon_prefetch(ticket)``   the request stopped waiting: drop the result when it comes
- ``poll()``          collect finished work on the caller's thread: tier ``BlockStored`` /
                      ``BlockRemoved`` events and prefetch results; never blocks
- ``wait_idle()``     block until nothing is in flight and every hold is released (tests, shutdown)

Rules the cache relies on:

- **Reads first** (:mod:`hicache.tiering.lanes`): lookups and prefetch reads go ahead of queued
  puts on the engine's workers and on each tier's threads, and puts never take the last
  thread. A lookup waits for the puts still carrying its own pages (promoted ahead of the
  others), so what it finds does not depend on how busy the workers are; with every tier
  answering lookups from memory it runs on the caller's thread. A read the cache waits for
  without a budget (``wait_prefetch`` with no timeout) runs on the cache's thread when no
  worker took it yet: one hand-off (to the tier's thread and back), not two.

- **Holds per page**: every host page a worker reads or writes carries one hold per job from
  submit until the backend call really returned (:class:`~hicache.tiering.calls.TierCaller`'s
  ``on_return``), so evicting or splitting a node meanwhile cannot free the page under a
  worker, even when the engine stopped waiting for a hung call at its deadline. The cache frees
  pages with ``HostPool.free_when_released``.
- **Ordered acknowledgement per tier**: the pages of one group (one ack) are announced as
  ``BlockStored(<tier medium>)`` only along the contiguous prefix the tier stored (``OK`` or
  ``ALREADY_EXISTS``), in order; after the first page that failed, nothing later in the group
  is announced on that tier, even if it was stored. Across groups, a page is announced only
  when its parent is known to be on the tier (announced, or read from it); while the parent's
  own publish is still in flight the page waits. So no tail is ever announced without its head.
  A put that comes back after its deadline (counted failed then) still counts: the pages it
  stored are announced when it returns, and a stored page cut off from its head is announced
  right after the head is, so every page a tier acknowledged is announced once per residency.
  (The bookkeeping lives in :mod:`hicache.tiering.announce`.)
- **Never hurt the serving path**: a tier whose breaker is open, whose bytes in flight are at
  their bound, or whose admission policy refuses a page gets no put: the pages are dropped and
  counted (and the rest of that group is dropped for that tier, which must stay prefix-closed).
  Failures are counted, never raised.
- **Promotion** (opt-in, ``TierSettings.promote`` on the tier a page was found in): prefetched
  pages are published to the earlier publishing tiers only, never back to their source tier.

All methods except the worker bodies run on the cache's thread.

Where it lives: the engine composes what it owns. The publish side and ``poll`` (completion,
announcements, promotion, tier evictions) are here; it owns its worker pool and the holds on
host pages (:class:`~hicache.tiering.engine_workers.EngineWorkers`), its put calls
(:class:`~hicache.tiering.engine_puts.PutCalls`), its prefetch jobs
(:class:`~hicache.tiering.engine_prefetch.PrefetchJobs`, whose methods it offers as its own) and
its :class:`~hicache.tiering.announce.Announcer`; the records are in
:mod:`hicache.tiering.engine_records`. Import every public name from here.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any

from hicache.events import KVEvent, removed_in_batches
from hicache.keys import block_id
from hicache.storage.backend import PageStatus
from hicache.tiering.announce import (
    DEFAULT_KNOWN_CAPACITY,
    Announcer,
    PublishGroup,
    PublishPage,
    TierProgress,
)
from hicache.tiering.engine_prefetch import PrefetchJobs
from hicache.tiering.engine_puts import PutCalls
from hicache.tiering.engine_records import (
    EnginePoll,
    HostPages,
    LookupResult,
    PrefetchResult,
    _Evicted,
    _GetDone,
    _LookupDone,
    _PrefetchJob,
    _PutLate,
    _PutPart,
)
from hicache.tiering.engine_workers import EngineWorkers
from hicache.tiering.prefetch import PrefetchOutcome
from hicache.tiering.tiers import Tier, TierRange, Tiers

__all__ = [
    "EnginePoll",
    "HostPages",
    "LookupResult",
    "PrefetchResult",
    "PublishGroup",
    "PublishPage",
    "StorageEngine",
]

logger = logging.getLogger(__name__)

#: Upper bound of the default worker count (the workers mostly wait on tier calls).
_MAX_WORKERS = 32

#: Share of the host pool one tier's queued puts may hold before the cache waits for them: a
#: burst of write-throughs queues instead of stopping the serving thread, and a slow tier never
#: pins more than this share of L2 (held pages cannot be evicted).
PUT_BACKLOG_SHARE = 0.25


class StorageEngine:
    """A small worker pool between one cache and its tiers (see the module docstring)."""

    def __init__(
        self,
        tiers: Tiers,
        host_pool: HostPages,
        *,
        page_size: int,
        lora_id: int | None = None,
        workers: int | None = None,
        known_capacity: int = DEFAULT_KNOWN_CAPACITY,
        evict_poll_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        put_backlog_pages: int | None = None,
    ) -> None:
        self.tiers = tiers
        self.host_pool = host_pool
        if workers is None:
            # a job makes one tier call at a time: as many jobs as the tiers take calls at once
            workers = max(2, min(sum(t.caller.threads for t in tiers.tiers), _MAX_WORKERS))
        elif workers < 1:
            raise ValueError(f"storage engine workers must be >= 1, got {workers}")
        self.workers = EngineWorkers(host_pool, workers=workers)
        self.prefetch_jobs = PrefetchJobs(tiers, self.workers)
        self.page_size = page_size
        self.lora_id = lora_id
        self.evict_poll_interval_s = evict_poll_interval_s
        self._clock = clock
        self._tier_by_name = {t.name: t for t in tiers.tiers}
        self._evict_jobs: dict[str, Future[None]] = {}
        self._evict_polled: dict[str, float] = {}
        if put_backlog_pages is None:
            put_backlog_pages = int(host_pool.num_pages * PUT_BACKLOG_SHARE)
        self.puts = PutCalls(self.workers, backlog_pages=put_backlog_pages)
        self.counters: dict[str, int] = {
            "published_pages": 0,
            "announced_pages": 0,
            "unannounced_pages": 0,
            "dropped_pages": 0,
            "promoted_pages": 0,
            "republished_pages": 0,
            "late_acked_pages": 0,
        }
        #: Wall seconds the serving thread spent blocked in this engine, by reason: ``prefetch``
        #: (a read it waits for, done by a worker or on its own thread) and ``put_throttle``
        #: (queued puts draining). What an operator reads to tell "storage is slow" apart from
        #: "the cache's own work is slow"; two clock reads per wait, nothing when none blocks.
        self.serving_wait_s: dict[str, float] = {"prefetch": 0.0, "put_throttle": 0.0}
        self.announcer = Announcer(
            tiers.tiers,
            page_size=page_size,
            lora_id=lora_id,
            counters=self.counters,
            known_capacity=known_capacity,
        )

    # ------------------------------------------------------------------ publish

    def begin_publish(self) -> PublishGroup:
        """Start the group of one ack; pass it to :meth:`publish` for each fragment in order."""
        return self.announcer.begin()

    def publish(
        self,
        group: PublishGroup,
        pages: Sequence[PublishPage],
        *,
        targets: Sequence[Tier] | None = None,
        admit: bool = True,
    ) -> list[Tier]:
        """Publish one fragment's ``pages`` to every publishing tier (off this thread).

        ``targets`` restricts the tiers (promotion, re-offers); ``admit=False`` skips admission
        policies. Returns the tiers whose admission policy refused (some of) these pages: the
        cache may offer them again when the pages are used again (``second_hit``).
        """
        if group.closed:
            raise ValueError(f"publish group {group.id} is already closed")
        batch = len(group.batches)
        group.batches.append(list(pages))
        tiers = self.tiers.publishing if targets is None else list(targets)
        group.targets.append(frozenset(t.name for t in tiers))
        for tier in tiers:
            group.progress.setdefault(tier.name, TierProgress())
        if not pages:
            return []
        keys = [p.key for p in pages]
        for tier in tiers:
            prog = group.progress[tier.name]
            mark = self.announcer.expect(group, batch, tier.name, list(pages))
            n = self._sendable(tier, prog, keys, admit)
            if n == 0:
                group.results[(tier.name, batch)] = [PageStatus.FAILED] * len(pages)
                continue
            nbytes = n * tier.page_bytes
            if not tier.gate.try_acquire(nbytes):
                prog.drop_reason = "dropped_backpressure"
                self._count_drop(tier, "dropped_backpressure", n)
                group.results[(tier.name, batch)] = [PageStatus.FAILED] * len(pages)
                continue
            host = [p.host_page for p in pages[:n]]
            holds = self.workers.hold(host, tier.gate, nbytes)
            views = [self.host_pool.page_view(h) for h in host]
            group.outstanding += 1
            part = _PutPart(
                group.id, batch, list(pages[:n]), keys[:n], views, holds, len(keys), mark
            )
            self.puts.add(tier, part)
        if targets is None:
            self.counters["published_pages"] += len(pages)
        return [t for t in tiers if group.progress[t.name].drop_reason == "dropped_admission"]

    def publish_fragment(
        self,
        group: PublishGroup,
        pages: Sequence[PublishPage],
        ancestors: Iterable[PublishPage],
        *,
        targets: Sequence[Tier] | None = None,
    ) -> list[Tier]:
        """Publish a fragment as :meth:`publish` does, first putting back, per tier, the pages
        above it that the tier lost.

        ``ancestors`` yields the pages above the fragment, nearest first, up to the root or up
        to the first page that cannot be published now (it then just stops); it is read lazily,
        only as far as some tier needs: up to the nearest page that tier holds. A shared head
        that stays hot in L1/L2 is never touched on a tier, so the tier's own LRU ages it out
        while chains below it are still published: put back ahead of them (in prefix order, to
        that tier alone), the chain is prefix-closed again and can be announced and found by a
        cold instance. Admission, backpressure and the breaker apply as to any publish; a page
        still stored there is harmless (create-only puts answer ``ALREADY_EXISTS``).
        """
        parent = pages[0].parent_block_id if pages else None
        tiers = self.tiers.publishing if targets is None else list(targets)
        if parent is not None and tiers:
            for tier, above in zip(tiers, itertools.tee(ancestors, len(tiers)), strict=True):
                if self._lost_parent(group, tier, parent):
                    lost = self._lost_ancestors(tier, above)
                    if lost:
                        self.publish(group, lost, targets=[tier])
                        tier.stats.add(republished_pages=len(lost))
                        self.counters["republished_pages"] += len(lost)
        return self.publish(group, pages, targets=targets)

    def _lost_parent(self, group: PublishGroup, tier: Tier, parent_block_id: int) -> bool:
        """Whether page ``parent_block_id`` is missing on ``tier`` and the tier would take a put
        now (not while ``group``'s pages are dropped for it or its breaker refuses: the fragment
        itself is then dropped and counted, as always)."""
        prog = group.progress.get(tier.name)
        if prog is not None and prog.drop_reason is not None:
            return False
        return self.announcer.missing(tier.name, parent_block_id) and not (
            tier.breaker.would_refuse()
        )

    def _lost_ancestors(self, tier: Tier, ancestors: Iterable[PublishPage]) -> list[PublishPage]:
        """The pages of ``ancestors`` (nearest first) that ``tier`` lost, up to the nearest one
        it holds or the root, in prefix order; empty when the chain cannot be closed now."""
        lost: list[PublishPage] = []
        for page in ancestors:
            if not self.announcer.missing(tier.name, page.block_id):
                return lost[::-1]
            lost.append(page)
        if lost and lost[-1].parent_block_id is None:  # reached the root
            return lost[::-1]
        return []  # stopped below a page that cannot be published now

    def _sendable(self, tier: Tier, prog: TierProgress, keys: list[str], admit: bool) -> int:
        """How many leading pages of a fragment go to ``tier`` (drops are counted here)."""
        if prog.drop_reason is not None:
            if admit:
                tier.admission.admit(keys)  # still a sighting
            self._count_drop(tier, prog.drop_reason, len(keys))
            return 0
        n = tier.admission.admit_prefix(keys) if admit else len(keys)
        if n < len(keys):
            prog.drop_reason = "dropped_admission"
            self._count_drop(tier, "dropped_admission", len(keys) - n)
        if n and tier.breaker.would_refuse():
            prog.drop_reason = "dropped_breaker"
            self._count_drop(tier, "dropped_breaker", n)
            return 0
        return n

    def _count_drop(self, tier: Tier, counter: str, n: int) -> None:
        if n:
            tier.stats.add(**{counter: n})
            self.counters["dropped_pages"] += n

    def end_publish(self, group: PublishGroup) -> None:
        """No more fragments for ``group``; it is forgotten once every tier finished it.

        The group's pages go out now: all its fragments (and ancestors put back) in one put
        call per tier, so the small pages of one write-through cost one request (and, on a
        durable local tier, one round of directory syncs), not one per fragment.
        """
        group.closed = True
        self.announcer.finish(group)
        self.send_unsent()

    def send_unsent(self) -> None:
        """Hand every publish not sent yet to the workers (one put call per tier)."""
        self.puts.send_all()

    def throttle_publishes(self) -> int:
        """Send what waits, then wait while a tier's queued put calls hold more host pages
        than ``put_backlog_pages`` (see :meth:`PutCalls.throttle`); return how many calls were
        waited for."""
        self.puts.send_all()
        t0 = time.perf_counter()
        waited = self.puts.throttle()
        if waited:
            self.serving_wait_s["put_throttle"] += time.perf_counter() - t0
        return waited

    # ------------------------------------------------------------------ completion

    def poll(self) -> EnginePoll:
        """Collect finished jobs: announce, report evictions, return prefetch results."""
        out = EnginePoll()
        self.puts.send_all()
        self.puts.forget_finished()
        for item in self.workers.take_reports():
            if isinstance(item, _GetDone):
                self._finish_prefetch(item, out)
            elif isinstance(item, _LookupDone):
                self._finish_lookup(item, out)
            elif isinstance(item, _Evicted):
                # announce what was stored before this eviction first (then its removal): a
                # result polled after the eviction is checked against the announcer's eviction
                # log instead, so no page is announced after its removal (it would stay "known"
                # there, and its lost chain not be republished)
                self.announcer.announce_all(out.events)
                self._evicted(item, out.events)
            elif isinstance(item, _PutLate):
                self.announcer.acked_late(
                    item.tier, item.pages, item.statuses, out.events, item.mark
                )
            else:
                self.announcer.record(item.group, item.tier, item.batch, item.statuses)
        self.announcer.announce_all(out.events)
        self._poll_evictions()
        return out

    def _finish_lookup(self, item: _LookupDone, out: EnginePoll) -> None:
        lookup = self.prefetch_jobs.finish_lookup(item)
        if lookup is not None:
            out.lookups.append(lookup)

    def _finish_prefetch(self, item: _GetDone, out: EnginePoll) -> None:
        finished = self.prefetch_jobs.finish_read(item)
        if finished is None:
            return
        job, result = finished
        ok = result.ok_pages
        if job.token_ids is not None:
            for r in item.ranges:
                # what was read from a tier is on it: announced there (once per residency)
                pages = self._chain_pages(job, r.start, min(r.end, ok))
                mark = job.marks.get(r.tier.name, 0)
                self.announcer.read_back(r.tier.name, pages, out.events, mark)
        if job.abandoned:
            return
        self._promote(job, item.ranges, ok)
        out.prefetches.append(result)

    def _promote(self, job: _PrefetchJob, ranges: list[TierRange], ok: int) -> None:
        if job.token_ids is None:
            return
        for r in ranges:
            end = min(r.end, ok)
            if not r.tier.settings.promote or end <= r.start:
                continue
            targets = self.tiers.earlier_publishing(r.tier)
            if not targets:
                continue
            pages = self._chain_pages(job, r.start, end)
            group = self.begin_publish()
            self.publish(group, pages, targets=targets, admit=False)
            self.end_publish(group)
            for t in targets:
                t.stats.add(promoted_pages=len(pages))
            self.counters["promoted_pages"] += len(pages)

    @staticmethod
    def _chain_pages(job: _PrefetchJob, start: int, end: int) -> list[PublishPage]:
        """Pages ``start:end`` of a prefetch (with token ids), chained, prefix first."""
        assert job.token_ids is not None
        parent = job.parent_block_id if start == 0 else block_id(job.keys[start - 1])
        pages = []
        for i in range(start, end):
            bid = block_id(job.keys[i])
            pages.append(PublishPage(job.keys[i], job.host[i], bid, parent, job.token_ids[i]))
            parent = bid
        return pages

    def _evicted(self, item: _Evicted, events: list[KVEvent]) -> None:
        tier = self._tier_by_name[item.tier]
        ids = [block_id(k) for k in item.keys]
        self.announcer.removed(item.tier, ids)
        events.extend(removed_in_batches(ids, tier.medium))

    def _poll_evictions(self) -> None:
        """Ask each tier for its own evictions now and then, off this thread."""
        now = self._clock()
        for tier in self.tiers.tiers:
            if not tier.available:
                continue
            job = self._evict_jobs.get(tier.name)
            if job is not None and not job.done():
                continue
            last = self._evict_polled.get(tier.name)
            if last is not None and now - last < self.evict_poll_interval_s:
                continue
            self._evict_polled[tier.name] = now
            self._evict_jobs[tier.name] = self.workers.submit(self._evict_job, tier)

    def _evict_job(self, tier: Tier) -> None:
        evicted = tier.take_evicted()
        if evicted:
            self.workers.report(_Evicted(tier.name, evicted))

    # ------------------------------------------------------------------ prefetch (owned jobs)

    def submit_prefetch(
        self,
        keys: Sequence[str],
        host_pages: Sequence[int] | None = None,
        *,
        token_ids: Sequence[Sequence[int]] | None = None,
        parent_block_id: int | None = None,
    ) -> int:
        """See :meth:`PrefetchJobs.submit_prefetch`; the result comes through :meth:`poll`.

        When every tier answers lookups from memory (``Capabilities.memory_lookups``) and no
        put of these pages is on its way, the lookup runs right here: its result is in the
        next ``poll``. Otherwise lookups go ahead of queued publishes, except those of the
        pages looked up: a page
        whose put is still on its way would be a miss now and a hit a moment later, so the
        lookup waits for those puts (moved ahead of the other publishes), and the hits do not
        depend on how busy the workers are.
        """
        after = self.puts.before_lookup(keys)
        # a lookup every tier answers from memory costs less than the hand-off to a worker
        here = host_pages is None and not after and self.tiers.lookups_here()
        return self.prefetch_jobs.submit_prefetch(
            keys,
            host_pages,
            token_ids=token_ids,
            parent_block_id=parent_block_id,
            after=after,
            here=here,
            marks=self.announcer.marks(),
        )

    def start_read(self, ticket: int, host_pages: Sequence[int]) -> None:
        """See :meth:`PrefetchJobs.start_read`."""
        self.prefetch_jobs.start_read(ticket, host_pages)

    def cancel_prefetch(self, ticket: int) -> None:
        """See :meth:`PrefetchJobs.cancel_prefetch`."""
        self.prefetch_jobs.cancel_prefetch(ticket)

    def prefetch_progress(self, ticket: int) -> int:
        """See :meth:`PrefetchJobs.prefetch_progress`."""
        return self.prefetch_jobs.prefetch_progress(ticket)

    def abandon_prefetch(self, ticket: int) -> None:
        """See :meth:`PrefetchJobs.abandon_prefetch`."""
        self.prefetch_jobs.abandon_prefetch(ticket)

    def wait_prefetch(self, ticket: int, timeout: float | None = None) -> bool:
        """See :meth:`PrefetchJobs.wait_prefetch`."""
        t0 = time.perf_counter()
        try:
            return self.prefetch_jobs.wait_prefetch(ticket, timeout)
        finally:
            self.serving_wait_s["prefetch"] += time.perf_counter() - t0

    def count_prefetch(self, outcome: PrefetchOutcome) -> None:
        """See :meth:`PrefetchJobs.count_prefetch`."""
        self.prefetch_jobs.count_prefetch(outcome)

    @property
    def prefetch_outcomes(self) -> Counter[str]:
        """Prefetches counted per :class:`PrefetchOutcome` value."""
        return self.prefetch_jobs.prefetch_outcomes

    # ------------------------------------------------------------------ workers (owned)

    def in_flight(self) -> int:
        """See :meth:`EngineWorkers.in_flight`."""
        return self.workers.in_flight()

    def holds_outstanding(self) -> int:
        """See :meth:`EngineWorkers.holds_outstanding`."""
        return self.workers.holds_outstanding()

    def wait_idle(self, timeout: float | None = None, *, holds: bool = True) -> bool:
        """See :meth:`EngineWorkers.wait_idle` (results still wait for :meth:`poll`); publishes
        not sent yet are sent first."""
        self.send_unsent()
        return self.workers.wait_idle(timeout, holds=holds)

    def close(self) -> None:
        """See :meth:`EngineWorkers.close` (results not polled are dropped)."""
        self.send_unsent()
        self.workers.close()

    # ------------------------------------------------------------------ introspection

    def drain_timeout_s(self) -> float:
        """How long finishing the jobs in flight can take: the longest deadline of any tier,
        times the calls one job makes (a cascade asks every tier, then reads), plus slack."""
        deadlines = [t.settings.deadline_s for t in self.tiers.tiers] or [0.0]
        return 2 * len(deadlines) * max(deadlines) + 1.0

    def pending_groups(self) -> int:
        """Publish groups not fully announced yet."""
        return self.announcer.pending()

    def stats(self) -> dict[str, Any]:
        """Engine and per-tier counters as plain data."""
        return {
            **self.counters,
            "in_flight": self.in_flight(),
            "holds_outstanding": self.holds_outstanding(),
            "pending_groups": self.pending_groups(),
            "prefetch": dict(self.prefetch_outcomes),
            "serving_wait_s": dict(self.serving_wait_s),
            "tiers": self.tiers.stats(),
        }
