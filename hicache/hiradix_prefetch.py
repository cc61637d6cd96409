"""Prefetch from storage (L3 -> L2) of :class:`~hicache.hiradix.HiRadixCache`.

- ``prefetch_from_storage``  look the pages after a match up in the tiers (on a worker)
- ``_poll_storage``          a finished lookup gets host pages for exactly what the tiers hold
                             (``_start_read``), a finished read records how many pages landed
- ``check_prefetch``         the prefetch policy (``best_effort`` / ``wait_complete`` /
                             ``timeout``) decides how long a request waits; the length agreed
                             across ranks becomes L2-only nodes (``_insert_prefetched``)

:class:`PrefetchLayer` is the last layer under :class:`~hicache.hiradix.HiRadixCache` and is not
used alone: ``HiRadixCache.__init__`` sets the state declared on it.
"""

from __future__ import annotations

from collections.abc import Sequence

from hicache.events import Medium
from hicache.hiradix_records import PrefetchHandle
from hicache.hiradix_writes import WriteThroughLayer
from hicache.keys import block_id, chain_hashes, storage_key
from hicache.radix import TreeNode
from hicache.tiering.engine import EnginePoll
from hicache.tiering.prefetch import PrefetchOutcome, PrefetchPolicy, PrefetchRules

__all__ = ["PrefetchLayer"]


class PrefetchLayer(WriteThroughLayer):
    """Prefetch from the tiers into L2 (module docstring)."""

    prefetch_rules: PrefetchRules
    prefetch_threshold_tokens: int
    _prefetches: dict[int, PrefetchHandle]

    # ------------------------------------------------------------------ prefetch

    def prefetch_from_storage(self, tokens: Sequence[int]) -> PrefetchHandle | None:
        """Start reading the pages of ``tokens`` after the cached prefix from the tiers into L2.

        Returns None when there are no tiers or fewer than ``prefetch_threshold_tokens`` tokens
        would come from storage. Finish it with :meth:`check_prefetch`.
        """
        if self.storage is None:
            return None
        key = self.page_aligned(tokens)
        ps = self.page_size
        r = self.match_prefix(key)
        start = (len(r.device_pages) + r.host_hit_pages) * ps
        n = (len(key) - start) // ps
        if n <= 0 or n * ps < self.prefetch_threshold_tokens:
            if n > 0:
                self.storage.count_prefetch(PrefetchOutcome.SKIPPED)
            return None
        base = r.last_host_node
        parent_hash = self.seed if base is self.root else self.node_hashes(base)[-1]
        hashes = chain_hashes(parent_hash, key[start:], ps)
        # the matched path must outlive the prefetch: its pages are the new pages' parents
        self._host_lock(base, 1)
        # Look the chain up first (on a worker); host pages are allocated in _poll_storage for
        # exactly the pages the tiers hold, so a miss costs no L2 page and no L2 eviction.
        ticket = self.storage.submit_prefetch(
            [storage_key(h) for h in hashes],
            None,
            token_ids=[key[start + j * ps : start + (j + 1) * ps] for j in range(n)],
            parent_block_id=None if base is self.root else block_id(parent_hash),
        )
        handle = PrefetchHandle(ticket, key[: start + n * ps], start, [], hashes, base)
        handle.wait = self.prefetch_rules.start(n * ps)
        self._prefetches[ticket] = handle
        self.counters["prefetches"] += 1
        return handle

    def _start_read(self, handle: PrefetchHandle, found: int) -> None:
        """The lookup of ``handle`` found ``found`` pages: allocate host pages for them (making
        room in L2 if needed) and start the read, or finish the prefetch empty."""
        assert self.storage is not None
        n = found
        host = self.host_pool.alloc(n) if n > 0 else None
        if host is None and n > 0:
            self.evict_host(n - self.host_pool.available)
            n = min(n, self.host_pool.available)
            host = self.host_pool.alloc(n) if n > 0 else None
        if host is None:
            self.storage.cancel_prefetch(handle.ticket)
            handle.result_pages = 0
            return
        handle.host_pages = host
        handle.hashes = handle.hashes[:n]
        handle.tokens = handle.tokens[: handle.start + n * self.page_size]
        self.storage.start_read(handle.ticket, host)

    def _host_lock(self, node: TreeNode, delta: int) -> None:
        """Pin ``node`` and its ancestors in the tree (L2 eviction skips them) by ``delta``."""
        cur: TreeNode | None = node
        while cur is not None and cur is not self.root:
            cur.host_lock_ref += delta
            if cur.host_lock_ref < 0:
                raise RuntimeError(f"host lock below zero on {cur!r}")
            cur = cur.parent

    def _evictable(self, node: TreeNode) -> bool:
        # Without a host copy, eviction deletes the node: never one a prefetch builds on, and
        # never one with (host-only) children, which would be left without a parent.
        if node.host_value is None and (node.host_lock_ref > 0 or node.children):
            return False
        return super()._evictable(node)

    def check_prefetch(self, handle: PrefetchHandle, *, wait: bool = False) -> int | None:
        """Finish ``handle`` if every rank's read completed or stopped; return the tokens it
        added to L2.

        Returns None while the request should keep waiting. The prefetch policy decides when it
        stops waiting: ``wait_complete`` never, ``best_effort`` at the first check that finds
        it unfinished, ``timeout`` once its budget passed; a stopped prefetch keeps the pages
        that already landed (contiguously from the first) and the rest are freed once the
        workers let go of them. With ``wait`` this blocks until the prefetch finished (under
        ``timeout``, at most until the budget passed). The decision and the length, agreed
        through ``RankSync`` (always called), become L2-only nodes.
        """
        if handle.done:
            return handle.inserted_tokens
        assert self.storage is not None
        self._poll_storage()
        # a prefetch is a lookup, then (host pages allocated here) a read: wait for each step
        while wait and handle.result_pages is None:
            limit = None
            if self.prefetch_rules.policy is PrefetchPolicy.TIMEOUT and handle.wait is not None:
                limit = handle.wait.remaining()
            finished = self.storage.wait_prefetch(handle.ticket, limit)
            self._poll_storage()
            if not finished:
                break
        arrived = handle.result_pages is not None
        stopped = not arrived and handle.wait is not None and handle.wait.expired()
        if arrived:
            local_len = handle.result_pages or 0
        elif stopped:
            local_len = self.storage.prefetch_progress(handle.ticket)
        else:
            local_len = 0
        done, ok = self.rank_sync.all_reduce_min([int(arrived or stopped), local_len])
        if not done:
            return None
        if not arrived:
            self.storage.abandon_prefetch(handle.ticket)
        self._prefetches.pop(handle.ticket, None)
        handle.done = True
        try:
            handle.inserted_tokens = self._insert_prefetched(handle, ok)
        finally:
            self._host_lock(handle.base, -1)
        return handle.inserted_tokens

    def _insert_prefetched(self, handle: PrefetchHandle, ok: int) -> int:
        """Insert the first ``ok`` prefetched pages as L2-only nodes; free the rest."""
        ps = self.page_size
        keep = handle.host_pages[:ok]
        drop = handle.host_pages[ok:]
        inserted = 0
        if ok:
            full = handle.tokens[: handle.start + ok * ps]
            r = self.match_prefix(full)
            present = (len(r.device_pages) + r.host_hit_pages) * ps
            base = r.last_host_node
            if present < handle.start or not self._backup_path(base):
                drop = handle.host_pages  # the tree changed under us: nothing attaches
                keep = []
            else:
                j = (present - handle.start) // ps
                drop = handle.host_pages[:j] + drop
                keep = handle.host_pages[j:ok]
                if keep:
                    node = TreeNode(full[present:], None, base)
                    node.host_value = keep
                    node.hashes = handle.hashes[j:ok]
                    node.last_access = self._tick
                    base.children[self.first_page(node)] = node
                    self._emit_stored(node, Medium.CPU_PINNED)
                    inserted = len(keep) * ps
        if drop:
            # a stopped prefetch's workers may still write into these: free at the last release
            self.host_pool.free_when_released(drop)
        self.counters["prefetched_pages"] += len(keep)
        self.counters["prefetch_discarded_pages"] += len(drop)
        return inserted

    def _backup_path(self, node: TreeNode) -> bool:
        """Make sure ``node`` and its ancestors are backed up (new host-only children may then
        hang below it); return False when that is not possible now (no host pages)."""
        path = []
        cur = node
        while cur is not self.root and cur.host_value is None:
            path.append(cur)
            assert cur.parent is not None
            cur = cur.parent
        return all(self.write_backup(n) is not None for n in reversed(path))

    def _poll_storage(self) -> EnginePoll | None:
        """Also continue the prefetches whose lookup finished and record finished reads."""
        result = super()._poll_storage()
        if result is None:
            return None
        assert self.storage is not None
        for lookup in result.lookups:
            handle = self._prefetches.get(lookup.ticket)
            if handle is None:
                self.storage.cancel_prefetch(lookup.ticket)
            else:
                self._start_read(handle, lookup.found)
        for r in result.prefetches:
            handle = self._prefetches.get(r.ticket)
            if handle is not None:
                handle.result_pages = r.ok_pages
        return result
