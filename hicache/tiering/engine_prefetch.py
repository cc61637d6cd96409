"""The prefetch jobs a :class:`~hicache.tiering.engine.StorageEngine` owns (no torch).

- ``submit_prefetch(keys, None, token_ids=...)``  look a chain up through the tier cascade on a
  worker; with host pages given at once, lookup and read run as one job
- ``start_read(ticket, host_pages)`` / ``cancel_prefetch(ticket)``   continue after the lookup
  with host pages for what the tiers hold, or forget it
- ``prefetch_progress(ticket)`` / ``abandon_prefetch(ticket)`` / ``wait_prefetch(ticket)``
  early termination and waiting
- ``count_prefetch(outcome)``   outcomes decided by the cache
- ``finish_lookup(report)`` / ``finish_read(report)``   the engine's ``poll`` hands each
  finished job here and gets the result to report (it announces and promotes what was read)
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures

from hicache.storage.backend import PageStatus
from hicache.tiering.engine_records import (
    LookupResult,
    PrefetchResult,
    _GetDone,
    _LookupDone,
    _PrefetchJob,
)
from hicache.tiering.engine_workers import EngineWorkers
from hicache.tiering.lanes import Lane
from hicache.tiering.prefetch import PrefetchOutcome, usable_prefix
from hicache.tiering.tiers import TierRange, Tiers

__all__ = ["PrefetchJobs"]

logger = logging.getLogger(__name__)


class PrefetchJobs:
    """Prefetch lookups and reads on the engine's workers (module docstring)."""

    def __init__(self, tiers: Tiers, workers: EngineWorkers) -> None:
        self.tiers = tiers
        self.workers = workers
        self._tickets = itertools.count(1)
        self._prefetch_jobs: dict[int, _PrefetchJob] = {}
        self._prefetch_futures: dict[int, Future[None]] = {}
        self.prefetch_outcomes: Counter[str] = Counter()

    # ------------------------------------------------------------------ prefetch

    def submit_prefetch(
        self,
        keys: Sequence[str],
        host_pages: Sequence[int] | None = None,
        *,
        token_ids: Sequence[Sequence[int]] | None = None,
        parent_block_id: int | None = None,
        after: Sequence[Future[None]] = (),
        here: bool = False,
        marks: dict[str, int],
    ) -> int:
        """Prefetch the chain ``keys`` through the cascade; return a ticket. The lookup starts
        once the jobs ``after`` finished (puts of these pages still on their way); ``here``
        (no host pages, nothing ``after``) runs it on this thread (every tier answers it from
        memory), reported at the next ``poll`` all the same.

        Without ``host_pages`` only the lookup runs now: ``poll`` reports a
        :class:`LookupResult` and the cache continues with :meth:`start_read` or
        :meth:`cancel_prefetch`, so host pages are spent only on pages a tier holds. With
        ``host_pages`` (one per key) lookup and read run as one job. Pages are held until every
        backend call reading them returned (possibly after the result was reported).
        ``token_ids`` (one list per page) and ``parent_block_id`` (of the page before
        ``keys[0]``) let pages found in a promoting tier be published, and announced, to the
        earlier tiers. ``marks`` are the tiers' eviction marks now (see
        :class:`~hicache.tiering.announce.EvictionLog`): what the read finds is announced unless
        it was evicted since.
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
            marks=marks,
        )
        self._prefetch_jobs[ticket] = job
        if here and host_pages is None and not after:
            done: Future[None] = Future()
            self._lookup_job(job, here=True)
            done.set_result(None)
            self._prefetch_futures[ticket] = done
        elif host_pages is None:
            self._prefetch_futures[ticket] = self.workers.submit_after(
                list(after), self._lookup_job, job, lane=Lane.READ
            )
        else:
            self._start(job, list(host_pages), list(after))
        return ticket

    def _lookup_job(self, job: _PrefetchJob, *, here: bool = False) -> None:
        try:
            ranges = self.tiers.lookup(job.keys, here=here)
        except Exception:  # the tiers never raise; this guards against bugs
            logger.exception("prefetch lookup failed")
            ranges = []
        self.workers.report(_LookupDone(job.ticket, ranges))

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

    def _start(
        self, job: _PrefetchJob, host: list[int], after: list[Future[None]] | None = None
    ) -> None:
        job.host = host
        job.holds = self.workers.hold(host)
        job.views = [self.workers.host_pool.page_view(h) for h in host]
        self._prefetch_futures[job.ticket] = self.workers.submit_after(
            after or [], self._get_job, job, lane=Lane.READ
        )

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
        self.workers.report(_GetDone(job.ticket, statuses, ranges))

    def count_prefetch(self, outcome: PrefetchOutcome) -> None:
        """Count a prefetch outcome decided by the cache (e.g. ``skipped`` below the threshold)."""
        self.prefetch_outcomes[outcome.value] += 1

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
        """Block until prefetch ``ticket`` finished (it is still reported by ``poll``).

        Without a ``timeout``, a job no worker took yet runs on this thread: the caller waits
        for it either way, and so saves the hand-off to a worker and back. Its backend calls
        keep their deadlines (they run on the tier's threads), so this returns within the time
        the worker would have taken. With a ``timeout`` (a budget shorter than a deadline,
        perhaps) the job stays with the workers."""
        fut = self._prefetch_futures.get(ticket)
        if fut is None or fut.done():
            return True
        if timeout is None and self.workers.run_here(fut):
            return True
        done, _ = wait_futures([fut], timeout=timeout)
        return bool(done)

    # ------------------------------------------------------------------ completion

    def finish_lookup(self, item: _LookupDone) -> LookupResult | None:
        """The lookup of ``item.ticket`` finished: what to report (None: nothing to read)."""
        job = self._prefetch_jobs.get(item.ticket)
        if job is None:
            return None
        job.ranges = item.ranges
        if job.abandoned:  # the request stopped waiting during the lookup: nothing to read
            self._prefetch_jobs.pop(item.ticket, None)
            self._prefetch_futures.pop(item.ticket, None)
            return None
        return LookupResult(item.ticket, item.ranges[-1].end if item.ranges else 0)

    def finish_read(self, item: _GetDone) -> tuple[_PrefetchJob, PrefetchResult] | None:
        """The read of ``item.ticket`` finished: its job and result (None: already forgotten).

        The per-tier outcome is counted here; an abandoned job's result is not reported."""
        self._prefetch_futures.pop(item.ticket, None)
        job = self._prefetch_jobs.pop(item.ticket, None)
        if job is None:
            return None
        ok = usable_prefix(item.statuses)
        sources: list[str | None] = [None] * len(item.statuses)
        for r in item.ranges:
            end = min(r.end, ok)
            sources[r.start : end] = [r.tier.name] * max(0, end - r.start)
        result = PrefetchResult(item.ticket, item.statuses, job.host, sources)
        for tier in {r.tier for r in item.ranges}:
            tier.stats.count_prefetch(result.outcome if not job.abandoned else "timed_out")
        if not job.abandoned:
            self.prefetch_outcomes[result.outcome.value] += 1
        return job, result
