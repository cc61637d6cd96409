"""The prefetch table of :class:`~hicache.hiradix.HiRadixCache` (no tree logic).

A prefetch (L3 -> L2) is a lookup through the tier cascade, then, with host pages for exactly
what the tiers hold, a read; the storage engine runs both on its workers and reports them by
ticket. This table keeps each request's :class:`PrefetchHandle` from start to insert:

- ``start(...)``       submit the lookup of a chain to the engine; returns the handle
- ``collect(poll)``    the engine's poll: finished reads record how many pages landed
                       (``PrefetchHandle.result_pages``); finished lookups are returned with
                       their handle (None: forgotten meanwhile) so the cache can start the read
- ``wait(handle, poll)``   block for the lookup, then the read (at most the policy's budget)
- ``decide(handle)``   whether every rank is done with it and how many pages all of them hold
                       (agreed through ``RankSync``, always called); a stopped prefetch is
                       abandoned, and a decided one leaves the table
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hicache.radix_node import TreeNode
from hicache.rank_sync import RankSync
from hicache.tiering.engine import EnginePoll, LookupResult, StorageEngine
from hicache.tiering.prefetch import PrefetchPolicy, PrefetchRules, PrefetchWait

__all__ = ["PrefetchHandle", "Prefetches"]


@dataclass(slots=True)
class PrefetchHandle:
    """A prefetch in flight; pass it to :meth:`HiRadixCache.check_prefetch`."""

    ticket: int
    tokens: list[int]
    start: int
    host_pages: list[int]
    hashes: list[bytes]
    base: TreeNode
    result_pages: int | None = field(default=None)
    done: bool = False
    inserted_tokens: int = 0
    #: The request's wait under the prefetch policy (None: no limit).
    wait: PrefetchWait | None = None


class Prefetches:
    """The prefetches in flight, by ticket (module docstring)."""

    def __init__(self, storage: StorageEngine, rules: PrefetchRules, rank_sync: RankSync) -> None:
        self.storage = storage
        self.rules = rules
        self.rank_sync = rank_sync
        self._handles: dict[int, PrefetchHandle] = {}

    def __len__(self) -> int:
        return len(self._handles)

    def start(
        self,
        keys: Sequence[str],
        token_ids: list[list[int]],
        parent_block_id: int | None,
        *,
        tokens: list[int],
        start: int,
        hashes: list[bytes],
        base: TreeNode,
    ) -> PrefetchHandle:
        """Look the chain ``keys`` up (on a worker); host pages come once the lookup says how
        many pages the tiers hold, so a miss costs no L2 page and no L2 eviction."""
        ticket = self.storage.submit_prefetch(
            keys, None, token_ids=token_ids, parent_block_id=parent_block_id
        )
        handle = PrefetchHandle(ticket, tokens, start, [], hashes, base)
        handle.wait = self.rules.start(len(tokens) - start)
        self._handles[ticket] = handle
        return handle

    def collect(self, poll: EnginePoll) -> list[tuple[PrefetchHandle | None, LookupResult]]:
        """Record the reads ``poll`` finished; return its finished lookups with their handle."""
        for r in poll.prefetches:
            handle = self._handles.get(r.ticket)
            if handle is not None:
                handle.result_pages = r.ok_pages
        return [(self._handles.get(lk.ticket), lk) for lk in poll.lookups]

    def wait(self, handle: PrefetchHandle, poll: Callable[[], object]) -> None:
        """Block until ``handle``'s read arrived, each step followed by ``poll`` (which starts
        the read after the lookup); under ``timeout``, at most until its budget passed."""
        while handle.result_pages is None:
            limit = None
            if self.rules.policy is PrefetchPolicy.TIMEOUT and handle.wait is not None:
                limit = handle.wait.remaining()
            finished = self.storage.wait_prefetch(handle.ticket, limit)
            poll()
            if not finished:
                return

    def decide(self, handle: PrefetchHandle) -> int | None:
        """The pages every rank holds once every rank's read arrived or stopped (None: keep
        waiting). This rank's read arrived, or stopped when the request's wait expired (what
        landed by then, contiguously from the first, counts)."""
        arrived = handle.result_pages is not None
        stopped = not arrived and handle.wait is not None and handle.wait.expired()
        if arrived:
            pages = handle.result_pages or 0
        elif stopped:
            pages = self.storage.prefetch_progress(handle.ticket)
        else:
            pages = 0
        done, ok = self.rank_sync.all_reduce_min([int(arrived or stopped), pages])
        if not done:
            return None
        if not arrived:
            self.storage.abandon_prefetch(handle.ticket)
        self._handles.pop(handle.ticket, None)
        handle.done = True
        return ok
