"""Storage I/O off the serving thread: publish batches and prefetch reads on worker threads.

- ``begin_publish()`` / ``publish(group, pages)`` / ``end_publish(group)``  hand the fragments of
  one write-through ack to every publishing tier, in prefix order
- ``submit_prefetch(keys, host_pages)``  read a chain through the tier cascade into host pages
- ``poll()``          collect finished work on the caller's thread: tier ``BlockStored`` /
                      ``BlockRemoved`` events and prefetch results; never blocks
- ``wait_idle()``     block until nothing is in flight (tests, shutdown)

Rules the cache relies on:

- **Holds per page**: every host page a worker reads or writes carries one hold per job
  (``HostPool.hold``) from submit until ``poll`` sees the job finish, so evicting or splitting a
  node meanwhile cannot free the page under the worker.
- **Ordered acknowledgement per tier**: the pages of one group (one ack) are announced as
  ``BlockStored(<tier medium>)`` only along the contiguous prefix the tier stored (``OK`` or
  ``ALREADY_EXISTS``), in order; after the first page that failed, nothing later in the group
  is announced on that tier, even if it was stored.
- **Failures are counted, never raised**: a backend exception fails its pages (see
  :class:`~hicache.storage.tiers.Tier`), and a worker crash is logged and treated the same.

All methods except the worker bodies run on the cache's thread. This first version has no
deadlines, retries, circuit breaker or backpressure (the next issue adds them).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Protocol

from hicache.events import BlockRemoved, BlockStored, KVEvent
from hicache.storage.backend import PageStatus
from hicache.storage.tiers import Tier, Tiers

__all__ = [
    "EnginePoll",
    "HostPages",
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


def key_block_id(key: str) -> int:
    """Event block id of a page key: the hash's first 8 bytes as a signed int64."""
    return int.from_bytes(bytes.fromhex(key[:16]), "big", signed=True)


@dataclass(frozen=True, slots=True)
class PublishPage:
    """One page to publish and what its ``BlockStored`` event says."""

    key: str
    host_page: int
    block_id: int
    parent_block_id: int | None
    token_ids: list[int]


@dataclass(frozen=True, slots=True)
class PrefetchResult:
    """A finished prefetch: one status per requested page, and the tier each OK page came from."""

    ticket: int
    statuses: list[PageStatus]
    host_pages: list[int]

    @property
    def ok_pages(self) -> int:
        """Length of the contiguous ``OK`` prefix: the only pages the cache may use."""
        n = 0
        for s in self.statuses:
            if s is not PageStatus.OK:
                break
            n += 1
        return n


@dataclass(slots=True)
class EnginePoll:
    """What one :meth:`StorageEngine.poll` collected."""

    events: list[KVEvent] = field(default_factory=list)
    prefetches: list[PrefetchResult] = field(default_factory=list)


@dataclass(slots=True)
class _TierProgress:
    next_batch: int = 0
    broken: bool = False


@dataclass(slots=True)
class PublishGroup:
    """The batches of one write-through ack, in prefix order, and how far each tier got."""

    id: int
    batches: list[list[PublishPage]] = field(default_factory=list)
    results: dict[tuple[str, int], list[PageStatus]] = field(default_factory=dict)
    progress: dict[str, _TierProgress] = field(default_factory=dict)
    closed: bool = False
    outstanding: int = 0


@dataclass(frozen=True, slots=True)
class _PutDone:
    group: int
    tier: str
    batch: int
    statuses: list[PageStatus]
    host_pages: list[int]


@dataclass(frozen=True, slots=True)
class _GetDone:
    ticket: int
    statuses: list[PageStatus]
    host_pages: list[int]


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
    ) -> None:
        self.tiers = tiers
        self.host_pool = host_pool
        self.page_size = page_size
        self.lora_id = lora_id
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hicache-io")
        self._done: queue.SimpleQueue[_PutDone | _GetDone] = queue.SimpleQueue()
        self._futures: set[Future[None]] = set()
        self._futures_lock = threading.Lock()
        self._groups: dict[int, PublishGroup] = {}
        self._group_ids = itertools.count(1)
        self._tickets = itertools.count(1)
        self._prefetch_futures: dict[int, Future[None]] = {}
        self._tier_by_name = {t.name: t for t in tiers.tiers}
        self.counters = {"published_pages": 0, "announced_pages": 0, "unannounced_pages": 0}
        self._closed = False

    # ------------------------------------------------------------------ publish

    def begin_publish(self) -> PublishGroup:
        """Start the group of one ack; pass it to :meth:`publish` for each fragment in order."""
        group = PublishGroup(next(self._group_ids))
        group.progress = {t.name: _TierProgress() for t in self.tiers.publishing}
        self._groups[group.id] = group
        return group

    def publish(self, group: PublishGroup, pages: Sequence[PublishPage]) -> None:
        """Publish one fragment's ``pages`` to every publishing tier (off this thread)."""
        if group.closed:
            raise ValueError(f"publish group {group.id} is already closed")
        batch = len(group.batches)
        group.batches.append(list(pages))
        if not pages:
            return
        host = [p.host_page for p in pages]
        keys = [p.key for p in pages]
        for tier in self.tiers.publishing:
            self.host_pool.hold(host)
            views = [self.host_pool.page_view(h) for h in host]
            group.outstanding += 1
            self._submit(self._put_job, group.id, tier, batch, keys, views, host)
        self.counters["published_pages"] += len(pages)

    def end_publish(self, group: PublishGroup) -> None:
        """No more fragments for ``group``; it is forgotten once every tier finished it."""
        group.closed = True
        self._maybe_finish(group)

    def _put_job(
        self,
        group: int,
        tier: Tier,
        batch: int,
        keys: list[str],
        views: list[memoryview],
        host: list[int],
    ) -> None:
        try:
            statuses = tier.put(keys, views)
        except Exception as exc:  # Tier.put counts backend errors; this is a bug guard
            logger.exception("tier %s: publish worker failed", tier.name)
            tier.stats.error(exc)
            statuses = [PageStatus.FAILED] * len(keys)
        self._done.put(_PutDone(group, tier.name, batch, statuses, host))

    # ------------------------------------------------------------------ prefetch

    def submit_prefetch(self, keys: Sequence[str], host_pages: Sequence[int]) -> int:
        """Read the chain ``keys`` into ``host_pages`` through the cascade; return a ticket.

        The pages are held until :meth:`poll` reports the result; the caller owns them again
        (and frees or keeps them) after that.
        """
        if len(keys) != len(host_pages):
            raise ValueError(f"{len(keys)} keys but {len(host_pages)} host pages")
        ticket = next(self._tickets)
        host = list(host_pages)
        self.host_pool.hold(host)
        views = [self.host_pool.page_view(h) for h in host]
        fut = self._submit(self._get_job, ticket, list(keys), views, host)
        self._prefetch_futures[ticket] = fut
        return ticket

    def _get_job(
        self, ticket: int, keys: list[str], views: list[memoryview], host: list[int]
    ) -> None:
        try:
            statuses = self.tiers.get_into(keys, views)
        except Exception:
            logger.exception("prefetch worker failed")
            statuses = [PageStatus.FAILED] * len(keys)
        self._done.put(_GetDone(ticket, statuses, host))

    def wait_prefetch(self, ticket: int, timeout: float | None = None) -> bool:
        """Block until prefetch ``ticket`` finished (it is still reported by ``poll``)."""
        fut = self._prefetch_futures.get(ticket)
        if fut is None:
            return True
        done, _ = wait_futures([fut], timeout=timeout)
        return bool(done)

    # ------------------------------------------------------------------ completion

    def poll(self) -> EnginePoll:
        """Collect finished jobs: release their holds, announce, return prefetch results."""
        out = EnginePoll()
        touched: dict[int, PublishGroup] = {}
        while True:
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                break
            self.host_pool.release(item.host_pages)
            if isinstance(item, _GetDone):
                self._prefetch_futures.pop(item.ticket, None)
                out.prefetches.append(PrefetchResult(item.ticket, item.statuses, item.host_pages))
                continue
            group = self._groups[item.group]
            group.results[(item.tier, item.batch)] = item.statuses
            group.outstanding -= 1
            touched[group.id] = group
        for group in touched.values():
            self._announce(group, out.events)
            self._maybe_finish(group)
        for tier in self.tiers.tiers:
            if not tier.available:
                continue
            try:
                evicted = tier.backend.take_evicted()
            except Exception as exc:
                tier.stats.error(exc)
                continue
            if evicted:
                out.events.append(BlockRemoved([key_block_id(k) for k in evicted], tier.medium))
        return out

    def _announce(self, group: PublishGroup, events: list[KVEvent]) -> None:
        """Advance every tier along ``group``'s batches, in order, up to the first failure."""
        for name, prog in group.progress.items():
            medium = self._tier_by_name[name].medium
            while prog.next_batch < len(group.batches):
                statuses = group.results.get((name, prog.next_batch))
                if statuses is None and group.batches[prog.next_batch]:
                    break  # this tier's result for the next batch is still in flight
                pages = group.batches[prog.next_batch]
                for page, status in zip(pages, statuses or [], strict=True):
                    if prog.broken or not status.stored:
                        prog.broken = True
                        self.counters["unannounced_pages"] += 1
                        continue
                    events.append(
                        BlockStored(
                            [page.block_id],
                            page.parent_block_id,
                            page.token_ids,
                            self.page_size,
                            self.lora_id,
                            medium,
                        )
                    )
                    self.counters["announced_pages"] += 1
                prog.next_batch += 1

    def _maybe_finish(self, group: PublishGroup) -> None:
        if group.closed and group.outstanding == 0:
            self._groups.pop(group.id, None)

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

    def in_flight(self) -> int:
        """Jobs submitted and not finished by their worker yet."""
        with self._futures_lock:
            return len(self._futures)

    def pending_groups(self) -> int:
        """Publish groups not fully announced yet."""
        return len(self._groups)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every submitted job finished (results still wait for ``poll``)."""
        with self._futures_lock:
            futures = list(self._futures)
        _, not_done = wait_futures(futures, timeout=timeout)
        return not not_done

    def stats(self) -> dict[str, object]:
        """Engine and per-tier counters as plain data."""
        return {**self.counters, "in_flight": self.in_flight(), "tiers": self.tiers.stats()}

    def close(self) -> None:
        """Wait for the workers and stop them (results not polled are dropped)."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
