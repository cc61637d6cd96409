"""Storage I/O off the serving thread: publish batches and prefetch reads on worker threads.

- ``begin_publish()`` / ``publish(group, pages)`` / ``end_publish(group)``  hand the fragments of
  one write-through ack to every publishing tier, in prefix order
- ``needs_republish(group, tier, parent)`` / ``republish(group, pages, tier)``  put the ancestors
  a tier lost back ahead of a fragment of the group (the tier's chain stays prefix-closed)
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

- **Holds per page**: every host page a worker reads or writes carries one hold per job from
  submit until the backend call really returned (:class:`~hicache.storage.calls.TierCaller`'s
  ``on_return``), so evicting or splitting a node meanwhile cannot free the page under a
  worker, even when the engine stopped waiting for a hung call at its deadline. The cache frees
  pages with ``HostPool.free_when_released``.
- **Ordered acknowledgement per tier**: the pages of one group (one ack) are announced as
  ``BlockStored(<tier medium>)`` only along the contiguous prefix the tier stored (``OK`` or
  ``ALREADY_EXISTS``), in order; after the first page that failed, nothing later in the group
  is announced on that tier, even if it was stored. Across groups, a page is announced only
  when its parent is known to be on the tier (announced, or read from it); while the parent's
  own publish is still in flight the page waits. So no tail is ever announced without its head.
  (The bookkeeping lives in :mod:`hicache.storage.announce`.)
- **Never hurt the serving path**: a tier whose breaker is open, whose bytes in flight are at
  their bound, or whose admission policy refuses a page gets no put: the pages are dropped and
  counted (and the rest of that group is dropped for that tier, which must stay prefix-closed).
  Failures are counted, never raised.
- **Promotion** (opt-in, ``TierSettings.promote`` on the tier a page was found in): prefetched
  pages are published to the earlier publishing tiers only, never back to their source tier.

All methods except the worker bodies run on the cache's thread.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, Protocol

from hicache.events import BlockRemoved, KVEvent
from hicache.storage.announce import (
    DEFAULT_KNOWN_CAPACITY,
    Announcer,
    PublishGroup,
    PublishPage,
    TierProgress,
    key_block_id,
)
from hicache.storage.backend import PageStatus
from hicache.storage.inflight import InflightGate
from hicache.storage.prefetch import PrefetchOutcome, classify, usable_prefix
from hicache.storage.tiers import Tier, TierRange, Tiers

__all__ = [
    "EnginePoll",
    "HostPages",
    "LookupResult",
    "PrefetchResult",
    "PublishGroup",
    "PublishPage",
    "StorageEngine",
    "key_block_id",
]

logger = logging.getLogger(__name__)


class HostPages(Protocol):
    """What the engine needs from the host pool (``hicache.pools.HostPool``)."""

    def hold(self, pages: Iterable[int]) -> None: ...
    def release(self, pages: Iterable[int]) -> None: ...
    def page_view(self, page: int) -> memoryview: ...


@dataclass(frozen=True, slots=True)
class PrefetchResult:
    """A finished prefetch: one status per requested page, and the tier each page came from."""

    ticket: int
    statuses: list[PageStatus]
    host_pages: list[int]
    #: Name of the tier each page was read from (None: not found in any tier).
    sources: list[str | None] = field(default_factory=list)

    @property
    def ok_pages(self) -> int:
        """Length of the contiguous ``OK`` prefix: the only pages the cache may use."""
        return usable_prefix(self.statuses)

    @property
    def outcome(self) -> PrefetchOutcome:
        """How the prefetch ended (complete, short, failed, miss)."""
        return classify(len(self.statuses), self.statuses)


@dataclass(frozen=True, slots=True)
class LookupResult:
    """The cascade lookup of a prefetch submitted without host pages finished."""

    ticket: int
    #: Leading pages the tiers hold together: allocate this many host pages (or fewer).
    found: int


@dataclass(slots=True)
class EnginePoll:
    """What one :meth:`StorageEngine.poll` collected."""

    events: list[KVEvent] = field(default_factory=list)
    prefetches: list[PrefetchResult] = field(default_factory=list)
    lookups: list[LookupResult] = field(default_factory=list)


class _Holds:
    """Holds on host pages (and bytes of an in-flight gate) released at the last ``drop``."""

    __slots__ = ("_count", "_engine", "_gate", "_lock", "_nbytes", "pages")

    def __init__(
        self,
        engine: StorageEngine,
        pages: list[int],
        gate: InflightGate | None = None,
        nbytes: int = 0,
    ) -> None:
        self._engine = engine
        self.pages = pages
        self._gate = gate
        self._nbytes = nbytes
        self._lock = threading.Lock()
        self._count = 1
        engine.host_pool.hold(pages)
        engine._holds_changed(+1)

    def add(self) -> None:
        with self._lock:
            if self._count <= 0:
                raise RuntimeError("holds already released")
            self._count += 1

    def drop(self) -> None:
        with self._lock:
            self._count -= 1
            last = self._count == 0
        if last:
            try:
                self._engine.host_pool.release(self.pages)
                if self._gate is not None:
                    self._gate.release(self._nbytes)
            finally:
                self._engine._holds_changed(-1)


@dataclass(slots=True)
class _PrefetchJob:
    ticket: int
    keys: list[str]
    token_ids: list[list[int]] | None
    parent_block_id: int | None
    host: list[int] = field(default_factory=list)
    views: list[memoryview] = field(default_factory=list)
    holds: _Holds | None = None
    #: The cascade's answer, once looked up (None: look up in the read job).
    ranges: list[TierRange] | None = None
    progress: int = 0
    abandoned: bool = False


@dataclass(frozen=True, slots=True)
class _PutDone:
    group: int
    tier: str
    batch: int
    statuses: list[PageStatus]


@dataclass(frozen=True, slots=True)
class _GetDone:
    ticket: int
    statuses: list[PageStatus]
    ranges: list[TierRange]


@dataclass(frozen=True, slots=True)
class _LookupDone:
    ticket: int
    ranges: list[TierRange]


@dataclass(frozen=True, slots=True)
class _Evicted:
    tier: str
    keys: list[str]


class StorageEngine:
    """A small worker pool between one cache and its tiers (see the module docstring)."""

    def __init__(
        self,
        tiers: Tiers,
        host_pool: HostPages,
        *,
        page_size: int,
        lora_id: int | None = None,
        workers: int = 4,
        known_capacity: int = DEFAULT_KNOWN_CAPACITY,
        evict_poll_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tiers = tiers
        self.host_pool = host_pool
        self.page_size = page_size
        self.lora_id = lora_id
        self.evict_poll_interval_s = evict_poll_interval_s
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hicache-io")
        self._done: queue.SimpleQueue[_PutDone | _GetDone | _LookupDone | _Evicted] = (
            queue.SimpleQueue()
        )
        self._futures: set[Future[None]] = set()
        self._futures_lock = threading.Lock()
        self._holds_cv = threading.Condition()
        self._holds_out = 0
        self._tickets = itertools.count(1)
        self._prefetch_jobs: dict[int, _PrefetchJob] = {}
        self._prefetch_futures: dict[int, Future[None]] = {}
        self._tier_by_name = {t.name: t for t in tiers.tiers}
        self._evict_jobs: dict[str, Future[None]] = {}
        self._evict_polled: dict[str, float] = {}
        self.counters: dict[str, int] = {
            "published_pages": 0,
            "announced_pages": 0,
            "unannounced_pages": 0,
            "dropped_pages": 0,
            "promoted_pages": 0,
            "republished_pages": 0,
        }
        self.prefetch_outcomes: Counter[str] = Counter()
        self.announcer = Announcer(
            tiers.tiers,
            page_size=page_size,
            lora_id=lora_id,
            counters=self.counters,
            known_capacity=known_capacity,
        )
        self._closed = False

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
            self.announcer.expect(tier.name, list(pages))
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
            holds = _Holds(self, host, tier.gate, nbytes)
            views = [self.host_pool.page_view(h) for h in host]
            group.outstanding += 1
            self._submit(self._put_job, group.id, tier, batch, keys[:n], views, holds, len(keys))
        if targets is None:
            self.counters["published_pages"] += len(pages)
        return [t for t in tiers if group.progress[t.name].drop_reason == "dropped_admission"]

    def missing_on(self, tier: Tier, block_id: int) -> bool:
        """Whether page ``block_id`` is known not to be on ``tier``: not announced there (or
        removed since), not read from it, and no publish of it to ``tier`` still undecided."""
        return self.announcer.missing(tier.name, block_id)

    def needs_republish(self, group: PublishGroup, tier: Tier, parent_block_id: int) -> bool:
        """Whether a fragment of ``group`` below page ``parent_block_id`` should have the
        ancestors ``tier`` lost republished ahead of it: the parent is missing there and the
        tier would take a put now (not while the group's pages are dropped for it or its
        breaker refuses: the fragment itself is then dropped and counted, as always)."""
        prog = group.progress.get(tier.name)
        if prog is not None and prog.drop_reason is not None:
            return False
        return self.missing_on(tier, parent_block_id) and not tier.breaker.would_refuse()

    def republish(self, group: PublishGroup, pages: Sequence[PublishPage], tier: Tier) -> None:
        """Publish ``pages`` (ancestors ``tier`` lost, in prefix order) to ``tier`` alone, ahead
        of the fragment below them in ``group``, so the tier's chain is prefix-closed again and
        can be announced. Admission, backpressure and the breaker apply as to any publish; a
        page still stored there is harmless (create-only puts answer ``ALREADY_EXISTS``)."""
        if not pages:
            return
        self.publish(group, pages, targets=[tier])
        tier.stats.add(republished_pages=len(pages))
        self.counters["republished_pages"] += len(pages)

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
        """No more fragments for ``group``; it is forgotten once every tier finished it."""
        group.closed = True
        self.announcer.finish(group)

    def _put_job(
        self,
        group: int,
        tier: Tier,
        batch: int,
        keys: list[str],
        views: list[memoryview],
        holds: _Holds,
        total: int,
    ) -> None:
        try:
            statuses = tier.put(keys, views, on_return=holds.drop)
        except Exception as exc:  # Tier.put never raises; this guards against bugs
            logger.exception("tier %s: publish worker failed", tier.name)
            tier.stats.error(exc, "unexpected")
            statuses = [PageStatus.FAILED] * len(keys)
        statuses = statuses + [PageStatus.FAILED] * (total - len(keys))  # refused by admission
        evicted = tier.take_evicted()
        self._done.put(_PutDone(group, tier.name, batch, statuses))
        if evicted:
            self._done.put(_Evicted(tier.name, evicted))

    # ------------------------------------------------------------------ prefetch

    def submit_prefetch(
        self,
        keys: Sequence[str],
        host_pages: Sequence[int] | None = None,
        *,
        token_ids: Sequence[Sequence[int]] | None = None,
        parent_block_id: int | None = None,
    ) -> int:
        """Prefetch the chain ``keys`` through the cascade; return a ticket.

        Without ``host_pages`` only the lookup runs now: ``poll`` reports a
        :class:`LookupResult` and the cache continues with :meth:`start_read` or
        :meth:`cancel_prefetch`, so host pages are spent only on pages a tier holds. With
        ``host_pages`` (one per key) lookup and read run as one job. Pages are held until every
        backend call reading them returned (possibly after the result was reported).
        ``token_ids`` (one list per page) and ``parent_block_id`` (of the page before
        ``keys[0]``) let pages found in a promoting tier be published, and announced, to the
        earlier tiers.
        """
        if host_pages is not None and len(keys) != len(host_pages):
            raise ValueError(f"{len(keys)} keys but {len(host_pages)} host pages")
        if token_ids is not None and len(token_ids) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(token_ids)} token lists")
        ticket = next(self._tickets)
        job = _PrefetchJob(
            ticket,
            list(keys),
            [list(t) for t in token_ids] if token_ids is not None else None,
            parent_block_id,
        )
        self._prefetch_jobs[ticket] = job
        if host_pages is None:
            self._prefetch_futures[ticket] = self._submit(self._lookup_job, job)
        else:
            self._start(job, list(host_pages))
        return ticket

    def _lookup_job(self, job: _PrefetchJob) -> None:
        try:
            ranges = self.tiers.lookup(job.keys)
        except Exception:  # the tiers never raise; this guards against bugs
            logger.exception("prefetch lookup failed")
            ranges = []
        self._done.put(_LookupDone(job.ticket, ranges))

    def start_read(self, ticket: int, host_pages: Sequence[int]) -> None:
        """Read the first ``len(host_pages)`` pages the lookup of ``ticket`` found into
        ``host_pages`` (after its :class:`LookupResult`); the result comes through ``poll``."""
        job = self._prefetch_jobs.get(ticket)
        if job is None or job.ranges is None:
            raise ValueError(f"prefetch {ticket} has no finished lookup to read after")
        found = job.ranges[-1].end if job.ranges else 0
        if not 0 < len(host_pages) <= found:
            raise ValueError(f"{len(host_pages)} host pages for {found} pages found")
        n = len(host_pages)
        job.keys = job.keys[:n]
        if job.token_ids is not None:
            job.token_ids = job.token_ids[:n]
        job.ranges = [TierRange(r.tier, r.start, min(r.end, n)) for r in job.ranges if r.start < n]
        self._start(job, list(host_pages))

    def cancel_prefetch(self, ticket: int) -> None:
        """Forget ``ticket`` after its lookup (nothing to read, or no host pages for it)."""
        job = self._prefetch_jobs.pop(ticket, None)
        self._prefetch_futures.pop(ticket, None)
        if job is not None and not job.abandoned:
            found = job.ranges[-1].end if job.ranges else 0
            self.count_prefetch(PrefetchOutcome.MISS if found == 0 else PrefetchOutcome.SKIPPED)

    def _start(self, job: _PrefetchJob, host: list[int]) -> None:
        job.host = host
        job.holds = _Holds(self, host)
        job.views = [self.host_pool.page_view(h) for h in host]
        self._prefetch_futures[job.ticket] = self._submit(self._get_job, job)

    def _get_job(self, job: _PrefetchJob) -> None:
        statuses: list[PageStatus] = []
        ranges: list[TierRange] = []
        assert job.holds is not None
        try:
            ranges = job.ranges if job.ranges is not None else self.tiers.lookup(job.keys)
            for r in ranges:
                job.holds.add()
                got = r.tier.get_into(
                    job.keys[r.start : r.end], job.views[r.start : r.end], on_return=job.holds.drop
                )
                statuses += got
                ok = usable_prefix(got)
                job.progress = r.start + ok
                if ok < len(got):
                    break
        except Exception:  # the tiers never raise; this guards against bugs
            logger.exception("prefetch worker failed")
            statuses = [PageStatus.FAILED] * len(job.keys)
        statuses += [PageStatus.NOT_FOUND] * (len(job.keys) - len(statuses))
        # the job's own hold goes first: without a late call, the pages are free of holds by
        # the time the cache sees the result
        job.holds.drop()
        self._done.put(_GetDone(job.ticket, statuses, ranges))

    def count_prefetch(self, outcome: PrefetchOutcome) -> None:
        """Count a prefetch outcome decided by the cache (e.g. ``skipped`` below the threshold)."""
        self.prefetch_outcomes[outcome.value] += 1

    def drain_timeout_s(self) -> float:
        """How long finishing the jobs in flight can take: the longest deadline of any tier,
        times the calls one job makes (a cascade asks every tier, then reads), plus slack."""
        deadlines = [t.settings.deadline_s for t in self.tiers.tiers] or [0.0]
        return 2 * len(deadlines) * max(deadlines) + 1.0

    def prefetch_progress(self, ticket: int) -> int:
        """Pages of prefetch ``ticket`` that landed ``OK``, contiguously from the first."""
        job = self._prefetch_jobs.get(ticket)
        return job.progress if job is not None else 0

    def abandon_prefetch(self, ticket: int) -> None:
        """The cache stopped waiting for ``ticket``: its result will be dropped (no promotion);
        its pages stay held until the workers return (free them with ``free_when_released``)."""
        job = self._prefetch_jobs.get(ticket)
        if job is not None:
            job.abandoned = True
            self.prefetch_outcomes[PrefetchOutcome.TIMED_OUT.value] += 1

    def wait_prefetch(self, ticket: int, timeout: float | None = None) -> bool:
        """Block until prefetch ``ticket`` finished (it is still reported by ``poll``)."""
        fut = self._prefetch_futures.get(ticket)
        if fut is None:
            return True
        done, _ = wait_futures([fut], timeout=timeout)
        return bool(done)

    # ------------------------------------------------------------------ completion

    def poll(self) -> EnginePoll:
        """Collect finished jobs: announce, report evictions, return prefetch results."""
        out = EnginePoll()
        while True:
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _GetDone):
                self._finish_prefetch(item, out)
            elif isinstance(item, _LookupDone):
                self._finish_lookup(item, out)
            elif isinstance(item, _Evicted):
                self._evicted(item, out.events)
            else:
                self.announcer.record(item.group, item.tier, item.batch, item.statuses)
        self.announcer.announce_all(out.events)
        self._poll_evictions()
        return out

    def _finish_lookup(self, item: _LookupDone, out: EnginePoll) -> None:
        job = self._prefetch_jobs.get(item.ticket)
        if job is None:
            return
        job.ranges = item.ranges
        if job.abandoned:  # the request stopped waiting during the lookup: nothing to read
            self._prefetch_jobs.pop(item.ticket, None)
            self._prefetch_futures.pop(item.ticket, None)
            return
        out.lookups.append(LookupResult(item.ticket, item.ranges[-1].end if item.ranges else 0))

    def _finish_prefetch(self, item: _GetDone, out: EnginePoll) -> None:
        self._prefetch_futures.pop(item.ticket, None)
        job = self._prefetch_jobs.pop(item.ticket, None)
        if job is None:
            return
        ok = usable_prefix(item.statuses)
        sources: list[str | None] = [None] * len(item.statuses)
        for r in item.ranges:
            end = min(r.end, ok)
            sources[r.start : end] = [r.tier.name] * max(0, end - r.start)
            self.announcer.mark_present(
                r.tier.name, [key_block_id(k) for k in job.keys[r.start : end]]
            )
        result = PrefetchResult(item.ticket, item.statuses, job.host, sources)
        for tier in {r.tier for r in item.ranges}:
            tier.stats.count_prefetch(result.outcome if not job.abandoned else "timed_out")
        if job.abandoned:
            return
        self.prefetch_outcomes[result.outcome.value] += 1
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
            parent = job.parent_block_id if r.start == 0 else key_block_id(job.keys[r.start - 1])
            pages = []
            for i in range(r.start, end):
                bid = key_block_id(job.keys[i])
                pages.append(PublishPage(job.keys[i], job.host[i], bid, parent, job.token_ids[i]))
                parent = bid
            group = self.begin_publish()
            self.publish(group, pages, targets=targets, admit=False)
            self.end_publish(group)
            for t in targets:
                t.stats.add(promoted_pages=len(pages))
            self.counters["promoted_pages"] += len(pages)

    def _evicted(self, item: _Evicted, events: list[KVEvent]) -> None:
        tier = self._tier_by_name[item.tier]
        ids = [key_block_id(k) for k in item.keys]
        self.announcer.removed(item.tier, ids)
        events.append(BlockRemoved(ids, tier.medium))

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
            self._evict_jobs[tier.name] = self._submit(self._evict_job, tier)

    def _evict_job(self, tier: Tier) -> None:
        evicted = tier.take_evicted()
        if evicted:
            self._done.put(_Evicted(tier.name, evicted))

    # ------------------------------------------------------------------ plumbing

    def _submit(self, fn: Callable[..., None], *args: object) -> Future[None]:
        fut: Future[None] = self._executor.submit(fn, *args)
        with self._futures_lock:
            self._futures.add(fut)
        fut.add_done_callback(self._forget)
        return fut

    def _forget(self, fut: Future[None]) -> None:
        with self._futures_lock:
            self._futures.discard(fut)

    def _holds_changed(self, delta: int) -> None:
        with self._holds_cv:
            self._holds_out += delta
            if self._holds_out == 0:
                self._holds_cv.notify_all()

    def in_flight(self) -> int:
        """Jobs submitted and not finished by their worker yet."""
        with self._futures_lock:
            return len(self._futures)

    def holds_outstanding(self) -> int:
        """Sets of host-page holds not released yet (late backend calls included)."""
        with self._holds_cv:
            return self._holds_out

    def pending_groups(self) -> int:
        """Publish groups not fully announced yet."""
        return self.announcer.pending()

    def wait_idle(self, timeout: float | None = None, *, holds: bool = True) -> bool:
        """Block until every submitted job finished and (with ``holds``) every hold was released
        (results still wait for ``poll``); ``False`` if that did not happen within ``timeout``.

        Jobs finish within their calls' deadlines; holds of a call hung in a backend last until
        it returns, so pass ``holds=False`` (or a timeout) when a backend may hang.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._futures_lock:
            futures = list(self._futures)
        _, not_done = wait_futures(futures, timeout=timeout)
        if not_done:
            return False
        if not holds:
            return True
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        with self._holds_cv:
            return self._holds_cv.wait_for(lambda: self._holds_out == 0, left)

    def stats(self) -> dict[str, Any]:
        """Engine and per-tier counters as plain data."""
        return {
            **self.counters,
            "in_flight": self.in_flight(),
            "holds_outstanding": self.holds_outstanding(),
            "pending_groups": self.pending_groups(),
            "prefetch": dict(self.prefetch_outcomes),
            "tiers": self.tiers.stats(),
        }

    def close(self) -> None:
        """Wait for the workers and stop them (results not polled are dropped). A backend call
        hung past its deadline is not waited for; its holds go when it returns."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
