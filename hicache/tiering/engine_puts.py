"""The put calls a :class:`~hicache.tiering.engine.StorageEngine` owns (no torch).

- ``add(tier, part)``      a batch bound for ``tier`` waits for that tier's next put call (sent
                           at once when it reaches the tier's ``max_batch`` pages)
- ``send_all()``           one put call per tier for everything waiting: the fragments of one
                           write-through become one request per tier
- ``before_lookup(keys)``  the put calls still carrying any of ``keys``, promoted to the read
                           lane; a lookup waits for exactly these
- ``forget_finished()``    drop finished calls from the page -> call map (``poll``)
- ``throttle()``           wait for a tier's oldest calls while those in flight hold more host
                           pages than the backlog allows (and more calls than the tier runs)

Queued put calls of a tier are merged: the worker that starts one takes along every call of
that tier still queued behind it (up to the tier's ``max_batch`` pages) and makes them one
``put_batches`` call, which a backend makes as if the calls came one after another (each its own
capacity decision) but may write together (one pack file, one request). Each call costs its
thread a dozen hand-offs of the interpreter lock (wake-ups, futures, system calls) that, while
the serving thread runs Python, each wait up to the switch interval: a tier that falls behind
catches up in fewer, larger calls instead of a queue of small ones.

The worker body reports one ``_PutDone`` per batch (and the tier's evictions, taken by the put
call itself: one hand-off to the tier per put, not a second call), as the engine's ``poll``
expects. A put call that returns after its deadline (its ``_PutDone`` said ``FAILED``)
reports its real statuses as one ``_PutLate`` per batch, always after that ``_PutDone``: the
pages the tier stored after all are announced then. Everything but the worker body and the
late report runs on the cache's thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures

from hicache.storage.backend import PageStatus
from hicache.tiering.engine_records import _Evicted, _PutDone, _PutJob, _PutLate, _PutPart
from hicache.tiering.engine_workers import EngineWorkers
from hicache.tiering.lanes import Lane
from hicache.tiering.tiers import Tier

__all__ = ["PutCalls"]

logger = logging.getLogger(__name__)


class PutCalls:
    """Batches waiting per tier, put calls on their way, and which call carries each page."""

    def __init__(self, workers: EngineWorkers, *, backlog_pages: int) -> None:
        if backlog_pages < 0:
            raise ValueError(f"put backlog must be >= 0 pages, got {backlog_pages}")
        self.workers = workers
        #: Host pages one tier's put calls in flight may hold before the cache waits for them.
        self.backlog_pages = backlog_pages
        self._tiers: dict[str, Tier] = {}
        #: Batches not handed to a worker yet, per tier, in order (sent as one put call).
        self._unsent: dict[str, list[_PutPart]] = {}
        #: Put calls sent and not seen finished yet; the latest one of each page.
        self._sent: list[_PutJob] = []
        self._putting: dict[str, _PutJob] = {}
        #: Put calls handed to the workers and not taken by one yet, per tier, oldest first.
        self._queued: dict[str, deque[_PutJob]] = {}
        self._queued_lock = threading.Lock()

    def add(self, tier: Tier, part: _PutPart) -> None:
        """Queue ``part`` for ``tier``'s next put call."""
        self._tiers[tier.name] = tier
        parts = self._unsent.setdefault(tier.name, [])
        parts.append(part)
        if sum(len(p.keys) for p in parts) >= tier.max_batch:
            self._send(tier)

    def send_all(self) -> None:
        """Hand every batch waiting to the workers (one put call per tier)."""
        for name in list(self._unsent):
            self._send(self._tiers[name])

    def _send(self, tier: Tier) -> None:
        parts = self._unsent.pop(tier.name, None)
        if not parts:
            return
        job = _PutJob(tier, parts, pages=sum(len(p.keys) for p in parts), future=Future())
        with self._queued_lock:
            self._queued.setdefault(tier.name, deque()).append(job)
        self.workers.submit(self._put_job, job, ticket=job.ticket)
        self._sent.append(job)
        putting = self._putting
        for p in parts:
            for k in p.keys:
                putting[k] = job

    def before_lookup(self, keys: Sequence[str]) -> list[Future[None]]:
        """The put calls still carrying any of ``keys``, promoted to the read lane: a lookup
        waits for exactly these (its pages are on their way), never for other publishes."""
        self.send_all()
        jobs: dict[int, _PutJob] = {}
        putting = self._putting
        for k in keys:
            job = putting.get(k)
            if job is not None and job.future is not None and not job.future.done():
                jobs[id(job)] = job
        for job in jobs.values():
            with self._queued_lock:  # a worker merging it reads the lane under this lock
                job.ticket.lane = Lane.READ  # first: a submit after this reads it
                carrier = job.carrier
                if carrier is not None:
                    carrier.ticket.lane = Lane.READ
            self.workers.promote(job.ticket)
            job.tier.caller.promote(job.ticket if carrier is None else carrier.ticket)
        return [job.future for job in jobs.values() if job.future is not None]

    def forget_finished(self) -> None:
        """Drop finished put calls from the page -> call map (on the cache's thread)."""
        if not self._sent:
            return
        still: list[_PutJob] = []
        putting = self._putting
        for job in self._sent:
            if job.future is not None and not job.future.done():
                still.append(job)
                continue
            for p in job.parts:
                for k in p.keys:
                    if putting.get(k) is job:
                        del putting[k]
        self._sent = still

    def throttle(self) -> int:
        """Wait for a tier's oldest put calls while its calls in flight hold more than
        ``backlog_pages`` host pages and outnumber the calls it runs at once (each wait at most
        the tier's deadline); return how many calls were waited for.

        Up to that bound puts queue behind the tier's threads and the serving thread goes on:
        a tier that keeps up on average never stops it. Past it, a tier slower than the cache
        slows the cache instead of drifting ever further behind: every queued page stays held
        in host memory (L2 cannot evict it) until its put returns, and the tier's state (what
        a lookup finds, what it evicts) stays within the backlog of what the cache published.
        A lookup never depends on the backlog: it waits for the puts carrying its own pages."""
        running: dict[str, list[_PutJob]] = {}
        for job in self._sent:
            if job.future is not None and not job.future.done():
                running.setdefault(job.tier.name, []).append(job)
        waited = 0
        for jobs in running.values():
            tier = jobs[0].tier
            at_once = max(1, tier.caller.threads - 1)
            held = sum(job.pages for job in jobs)
            for n, job in enumerate(jobs):  # oldest first
                if held <= self.backlog_pages or len(jobs) - n <= at_once:
                    break
                assert job.future is not None
                wait_futures([job.future], timeout=tier.settings.deadline_s)
                held -= job.pages
                waited += 1
        return waited

    def _put_job(self, job: _PutJob) -> None:
        """A worker's task for ``job``: run the tier's queued calls, merged, until one carried
        ``job`` (nothing when another worker's call already did)."""
        while True:
            with self._queued_lock:
                if job.carrier is not None:
                    return
                taken, call = self._take_queued(job.tier)
            try:
                self._put_call(call)
            finally:
                for member in taken:
                    assert member.future is not None
                    member.future.set_result(None)

    def _take_queued(self, tier: Tier) -> tuple[list[_PutJob], _PutJob]:
        """The oldest queued calls of ``tier`` (up to its ``max_batch`` pages, at least one),
        and the call that carries them: the one itself, or a new one merging them."""
        queued = self._queued[tier.name]
        taken = [queued.popleft()]
        pages, limit = taken[0].pages, tier.max_batch
        while queued and pages + queued[0].pages <= limit:
            taken.append(queued.popleft())
            pages += taken[-1].pages
        if len(taken) == 1:
            call = taken[0]
        else:
            call = _PutJob(tier, [p for t in taken for p in t.parts], pages=pages)
            call.batches = list(itertools.accumulate(t.pages for t in taken))
            if any(t.ticket.lane is Lane.READ for t in taken):
                call.ticket.lane = Lane.READ
        for t in taken:
            t.carrier = call
        return taken, call

    def _put_call(self, job: _PutJob) -> None:
        """One put call to the job's tier for all its batches; report each batch's result."""
        tier, parts = job.tier, job.parts
        keys = [k for p in parts for k in p.keys]
        views = [v for p in parts for v in p.views]

        def returned() -> None:
            for p in parts:
                p.holds.drop()

        def late(statuses: list[PageStatus]) -> None:
            with job.lock:
                if not job.reported:  # the deadline's FAILED is not queued yet: it goes first
                    job.late = statuses
                    return
            self._report_late(job, statuses)

        try:
            statuses = tier.put(
                keys,
                views,
                on_return=returned,
                ticket=job.ticket,
                on_late=late,
                take_evicted=True,
                batches=job.batches,
            )
        except Exception as exc:  # Tier.put never raises; this guards against bugs
            logger.exception("tier %s: publish worker failed", tier.name)
            tier.stats.error(exc, "unexpected")
            statuses = [PageStatus.FAILED] * len(keys)
        evicted = tier.take_evicted(call=False)  # what the put call took: no second call
        start = 0
        for p in parts:
            got = statuses[start : start + len(p.keys)]
            start += len(p.keys)
            got += [PageStatus.FAILED] * (p.total - len(got))  # refused by admission
            self.workers.report(_PutDone(p.group, tier.name, p.batch, got))
        with job.lock:
            job.reported = True
            came, job.late = job.late, None
        if came is not None:
            self._report_late(job, came)
        if evicted:
            self.workers.report(_Evicted(tier.name, evicted))

    def _report_late(self, job: _PutJob, statuses: list[PageStatus]) -> None:
        """Report what a put call that outlived its deadline really stored, per batch."""
        start = 0
        for p in job.parts:
            got = statuses[start : start + len(p.keys)]
            start += len(p.keys)
            self.workers.report(_PutLate(job.tier.name, p.pages, got, p.mark))
