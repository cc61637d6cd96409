"""HiRadixCache: the radix cache over device (L1), host (L2) and storage tiers (L3).

Read top to bottom, this is where a page goes:

- ``insert``             new device nodes (``BlockStored(GPU)``, in :class:`RadixCache`); the
                         insert hooks back them up as the write policy says
- ``write_backup``       L1 -> L2 copy submitted; the node is locked and counts as backed up,
                         but nothing is announced or published before the ack
- ``_split_node``        a node whose write is pending is replaced by its fragments (prefix
                         first) in that write's record; splits compose
- ``writing_check``      for each finished ack (agreed across ranks through ``RankSync``):
                         ``_finish_write_through_ack`` announces every fragment's pages as
                         ``BlockStored(CPU_PINNED)``, chained, publishes every fragment with
                         ``write_backup_storage`` in prefix order, and releases the lock once
- ``evict``              L1: a backed-up node keeps its host pages (L2-only,
                         ``BlockRemoved(GPU)``); others are deleted
- ``evict_host``         L2: least recently used host-only leaves (``BlockRemoved(CPU_PINNED)``)
- ``load_back``          L2 -> L1 for the host-only nodes of a match
- ``prefetch_from_storage`` / ``check_prefetch``   L3 -> L2 for the pages after a match; the
                         prefetch policy (``best_effort`` / ``wait_complete`` / ``timeout``)
                         decides how long a request waits, then it keeps the pages that landed
- ``take_events``        drain every event; ``publish_events`` hands them to the configured
                         publisher instead (``events.publisher: zmq``, see docs/events.md)

The cache is one class on the tree (the tree calls its hooks on insert, split and evict); the
tree-free bookkeeping is composed: the pending-writes table (:mod:`hicache.pending_writes`:
acks, fragments), the prefetch table (:mod:`hicache.prefetches`) and the storage engine
(:mod:`hicache.tiering.engine`: L3 I/O on worker threads, announcements, republishing).
The module stays over the ~500-line guideline on purpose: every method left here walks or
changes the tree on a page's way between L1, L2 and L3, and splitting them across files would
again make a reader chase one page through several (issue 16).

Typical use by a serving loop::

    cache = HiRadixCache.from_config(load_config("hicache.yaml"), device_pages=4096)
    r = cache.match_prefix(tokens)               # L1 pages + how many pages only L2 has
    h = cache.prefetch_from_storage(tokens)      # L3 -> L2 for what follows (or None)
    if h is not None:
        cache.check_prefetch(h, wait=True)       # or poll it on later steps
        r = cache.match_prefix(tokens)
    if r.host_hit_pages:
        cache.load_back(r.last_host_node)        # L2 -> L1
    ...                                          # compute the rest into new device pages
    dup = cache.insert(tokens, pages)            # the caller frees pages[: dup // page_size]
    cache.writing_check()                        # every step: acks -> events + publishes
    events = cache.take_events()

Invariants: what L2 holds is prefix-closed (a node is backed up only under the root or a
backed-up parent); device nodes are ancestor-closed (L1 eviction is leaf-first); host pages
under storage I/O are held per page by the storage engine, so an eviction meanwhile only
schedules their free (``HostPool.free_when_released``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from hicache.config import WritePolicy
from hicache.events import BlockRemoved, EventQueue, KVEvent, Medium, QueuedEvent
from hicache.keys import (
    ModelIdentity,
    block_id,
    block_ids,
    chain_hashes,
    seed_hash,
    storage_key,
)
from hicache.packed_tokens import TOKEN_BYTES
from hicache.pending_writes import PendingWrite, PendingWrites
from hicache.pools import DevicePool, HostPool
from hicache.prefetches import Prefetches, PrefetchHandle
from hicache.radix import LeafQueue, RadixCache, TreeNode
from hicache.rank_sync import NoRankSync, RankSync
from hicache.tiering.engine import EnginePoll, PublishGroup, PublishPage, StorageEngine
from hicache.tiering.prefetch import PrefetchOutcome, PrefetchPolicy, PrefetchRules
from hicache.tiering.tiers import Tier, Tiers
from hicache.transfer import Direction, TransferEngine

if TYPE_CHECKING:
    from hicache.config import HicacheConfig
    from hicache.event_publisher import EventPublisher

__all__ = [
    "HiRadixCache",
    "NoRankSync",
    "PendingWrite",
    "PrefetchHandle",
    "RankSync",
    "WritePolicy",
]

logger = logging.getLogger(__name__)

#: The cache's own counters (``stats``).
_COUNTERS = (
    *("backups", "backup_pages", "backup_skipped_no_host_pages", "acks", "loaded_back_pages"),
    "backup_waited_for_publishes",
    *("l1_evicted_pages", "l2_evicted_pages"),
    *("prefetches", "prefetched_pages", "prefetch_discarded_pages"),
)
#: Nodes remembered for a second offer to a refusing tier before stale entries are dropped.
_REOFFER_LIMIT = 100_000


class _DiscardEvents(EventQueue):
    """The event queue of a cache whose events are off: nothing is kept (nor built)."""

    def wants(self, medium: str) -> bool:
        return False

    def put(self, event: QueuedEvent) -> None:
        return

    def extend(self, events: Iterable[QueuedEvent]) -> None:
        return


class HiRadixCache(RadixCache):
    """Radix cache with host write-through, storage publishing and prefetch (module docstring).

    ``identity`` seeds the content hashes (pages of different identities never share keys);
    ``tiers`` may be None (no L3). ``gpu_events`` adds ``BlockStored``/``BlockRemoved(GPU)``;
    ``events=False`` drops every event (nobody calls ``take_events``); ``max_queued_events``
    bounds the backlog between two ``take_events`` (see ``EventQueue``); ``event_publisher``
    receives them from ``publish_events`` and is closed with the cache. The storage namespace
    is baked into the tiers' backends (``BackendContext.namespace``), see :meth:`from_config`.
    Not thread-safe: the serving loop owns it; only the storage engine's workers run elsewhere.
    """

    def __init__(
        self,
        device_pool: DevicePool,
        host_pool: HostPool,
        transfer: TransferEngine,
        *,
        identity: ModelIdentity | None = None,
        tiers: Tiers | None = None,
        write_policy: WritePolicy | str = WritePolicy.WRITE_THROUGH,
        selective_threshold: int = 2,
        prefetch_threshold_tokens: int = 256,
        prefetch_rules: PrefetchRules | None = None,
        rank_sync: RankSync | None = None,
        gpu_events: bool = True,
        events: bool = True,
        max_queued_events: int | None = None,
        lora_id: int | None = None,
        io_workers: int | None = None,
        event_publisher: EventPublisher | None = None,
    ) -> None:
        self.identity = identity or ModelIdentity("default")
        super().__init__(
            device_pool.layout.page_size,
            device_pool.free,
            seed=seed_hash(self.identity),
            gpu_events=gpu_events,
            lora_id=lora_id,
        )
        if not events:
            self.events = _DiscardEvents()
        elif max_queued_events is not None:
            self.events = EventQueue(max_queued_events)
        self.event_publisher = event_publisher
        self.device_pool = device_pool
        self.host_pool = host_pool
        self.transfer = transfer
        self.write_policy = WritePolicy(write_policy)
        self._backup_threshold = (
            selective_threshold if self.write_policy is WritePolicy.WRITE_THROUGH_SELECTIVE else 1
        )
        #: The prefetch policy; without one a request waits for its whole prefetch.
        self.prefetch_rules = prefetch_rules or PrefetchRules(
            PrefetchPolicy.WAIT_COMPLETE, threshold_tokens=prefetch_threshold_tokens
        )
        self.prefetch_threshold_tokens = self.prefetch_rules.threshold_tokens
        self.rank_sync = rank_sync or NoRankSync()
        #: Write-throughs between submit and ack: ``ack id -> PendingWrite``.
        self.ongoing_write_through = PendingWrites()
        self.tiers = tiers
        self.storage: StorageEngine | None = None
        #: Prefetches in flight (with tiers only).
        self.prefetches: Prefetches | None = None
        if tiers is not None and len(tiers):
            tiers.open()
            self.storage = StorageEngine(
                tiers, host_pool, page_size=self.page_size, lora_id=lora_id, workers=io_workers
            )
            self.prefetches = Prefetches(self.storage, self.prefetch_rules, self.rank_sync)
        #: Nodes whose pages a tier's admission refused, with those tiers (second_hit).
        self._reoffer: dict[int, tuple[TreeNode, list[Tier]]] = {}
        # (self._host_leaves, host eviction's candidates, is made by reset(), which the tree's
        # constructor calls)
        self.counters = dict.fromkeys(_COUNTERS, 0)

    @classmethod
    def from_config(
        cls,
        config: HicacheConfig,
        *,
        device_pages: int | None = None,
        device: str | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        rank_sync: RankSync | None = None,
        transfer: type[TransferEngine] | None = None,
    ) -> HiRadixCache:
        """Build pools, transfer engine, tiers and the cache from a validated configuration
        (see :func:`hicache.cache_parts.cache_parts`)."""
        from hicache.cache_parts import cache_parts

        parts = cache_parts(config, device_pages, device, tp_rank, tp_size, transfer)
        try:
            return cls(*parts.args, rank_sync=rank_sync, **parts.kwargs)
        except BaseException:
            if parts.publisher is not None:
                parts.publisher.close()
            raise

    def reset(self) -> None:
        super().reset()
        #: Every L2-only leaf, and maybe nodes that stopped being one since (dropped when
        #: ``evict_host`` meets them): host eviction's candidates, kept as nodes become L2-only
        #: leaves (:meth:`_offer_host_leaf`) so an eviction need not walk the whole tree.
        self._host_leaves = LeafQueue()

    # ------------------------------------------------------------------ insert hooks

    def _on_path(self, node: TreeNode) -> None:
        node.hit_count += 1
        self._maybe_backup(node)
        if self._reoffer:
            self._maybe_reoffer(node)

    def _on_new_leaf(self, node: TreeNode) -> None:
        node.hit_count = 1
        self._maybe_backup(node)

    def _maybe_backup(self, node: TreeNode) -> None:
        if (
            self.write_policy is not WritePolicy.MANUAL
            and node.host_value is None
            and node.hit_count >= self._backup_threshold
        ):
            self.write_backup(node)

    # ------------------------------------------------------------------ write-through (L1 -> L2)

    def write_backup(self, node: TreeNode) -> int | None:
        """Back ``node`` up to host memory; return the ack id, or None if not backed up now.

        Only a device node under the root or a backed-up parent is backed up (so L2 stays
        prefix-closed). From here on the node counts as backed up, but its pages are announced
        and published only after the ack (:meth:`writing_check`).
        """
        if node is self.root or node.value is None or node.host_value is not None:
            return None
        parent = node.parent
        if parent is None or (parent is not self.root and parent.host_value is None):
            return None
        n = len(node.value)
        # an array: the node keeps these pages, and an int object per page would cost 28 bytes
        # and the garbage collector's time
        alloc = self.host_pool.alloc_array
        host = alloc(n)
        if host is None:
            self.evict_host(n - self.host_pool.available)
            host = alloc(n)
            if host is None and self._wait_for_publishes():
                self.evict_host(n - self.host_pool.available)
                host = alloc(n)
            if host is None:
                self.counters["backup_skipped_no_host_pages"] += 1
                return None
        ack = self.transfer.submit(Direction.D2H, node.value, host)
        node.host_value = host
        self.ongoing_write_through.add(ack, node)
        self.inc_lock_ref(node)  # until the ack
        self.counters["backups"] += 1
        self.counters["backup_pages"] += n
        return ack

    def _wait_for_publishes(self) -> bool:
        """L2 is full of pages still being published: wait (at most one tier deadline) for
        the storage jobs in flight, whose pages then come free. The only wait on publishes on
        this thread, and only when the tiers write slower than the cache backs up: skipping
        the backup instead would cost the hits its pages would have served."""
        storage = self.storage
        if storage is None or storage.in_flight() == 0:
            return False  # nothing running: what is still held waits for a hung call
        self.counters["backup_waited_for_publishes"] += 1
        deadline = max(t.settings.deadline_s for t in storage.tiers.tiers)
        return storage.wait_idle(deadline)

    def _split_node(self, child: TreeNode, pages: int) -> TreeNode:
        prefix = super()._split_node(child, pages)
        if child.write_through_pending_id is not None:
            self.ongoing_write_through.replace(child, [prefix, child])
        entry = self._reoffer.get(child.id)
        if entry is not None:  # both fragments still wait for their second offer
            self._reoffer[prefix.id] = (prefix, entry[1])
        return prefix

    def writing_check(self) -> int:
        """Finish every acknowledged write-through that all ranks saw complete; return how many.

        Acks are finished in submission order: a child's write never announces before its
        parent's. The count is agreed through ``RankSync`` (always called, even for zero).
        """
        pending = self.ongoing_write_through
        done = self.transfer.poll()
        if done:
            pending.mark_acked(done)
        ready = self.rank_sync.all_reduce_min([pending.ready()])[0]
        if ready:
            for ack in pending.oldest(ready):
                self._finish_write_through_ack(ack)
            if self.storage is not None:
                # publishes queue behind a tier's threads up to a backlog of host pages; past
                # it a tier slower than the cache slows the cache rather than drift behind it
                self.counters["backup_waited_for_publishes"] += self.storage.throttle_publishes()
        self._poll_storage()
        return ready

    def _finish_write_through_ack(self, ack_id: int) -> None:
        """Announce and publish every fragment of ``ack_id`` in prefix order; unlock once."""
        record = self.ongoing_write_through.finish(ack_id)
        storage = self.storage
        # without publishing tiers there is nothing to hand the engine, nor a group to open
        publishing = storage is not None and storage.tiers.publishing
        group = storage.begin_publish() if storage is not None and publishing else None
        for frag in record.publish_nodes:
            self._emit_stored(frag, Medium.CPU_PINNED)
            if group is not None:
                self.write_backup_storage(frag, group)
        # prefetched pages inserted below the fragments meanwhile, now that their parents are
        if record.deferred:
            self.events.extend(record.deferred)
        if group is not None and storage is not None:
            storage.end_publish(group)
        self.dec_lock_ref(record.lock_node)
        self.counters["acks"] += 1

    # ------------------------------------------------------------------ publish (L2 -> L3)

    def write_backup_storage(self, node: TreeNode, group: PublishGroup | None = None) -> None:
        """Publish ``node``'s host pages to every publishing tier (asynchronously).

        ``group`` ties the fragments of one ack together so each tier announces them in order;
        without one the node is its own group. Tiers whose admission policy refused the pages
        (``second_hit``) are offered them again the next time an insert walks through ``node``.
        """
        self._publish_node(node, group, None)

    def _publish_node(
        self, node: TreeNode, group: PublishGroup | None, targets: list[Tier] | None
    ) -> None:
        storage = self.storage
        if storage is None or not storage.tiers.publishing:
            return
        pages = self._node_pages(node)
        own = group is None
        if group is None:
            group = storage.begin_publish()
        # the engine decides, per tier, which of the pages above it must be put back first
        refused = storage.publish_fragment(
            group, pages, self._ancestor_pages(node), targets=targets
        )
        if own:
            storage.end_publish(group)
        if refused:
            self._reoffer[node.id] = (node, refused)
            if len(self._reoffer) > _REOFFER_LIMIT:
                self._forget_stale_reoffers()

    def _node_pages(self, node: TreeNode) -> list[PublishPage]:
        """``node``'s host pages as the engine publishes them, chained, in prefix order."""
        assert node.host_value is not None
        step = self.page_size * TOKEN_BYTES
        tokens = node.tokens  # packed: an event decodes a page's tokens only when read
        parent = self.parent_block_hash(node)
        hashes = self.node_hashes(node)
        pages = []
        # the hashes' block ids decoded in one call, each page's key from its own hash
        for j, (h, bid, hp) in enumerate(
            zip(hashes, block_ids(hashes), node.host_value, strict=True)
        ):
            pages.append(
                PublishPage(storage_key(h), hp, bid, parent, tokens[j * step : (j + 1) * step])
            )
            parent = bid
        return pages

    def _ancestor_pages(self, node: TreeNode) -> Iterator[PublishPage]:
        """The pages above ``node``, nearest first, up to the root; stops at an ancestor whose
        pages cannot be published now (its write not acked yet)."""
        cur = node.parent
        while cur is not None and cur is not self.root:
            # L2 is prefix-closed, so ancestors have host pages; an unacked one is not published
            if cur.host_value is None or cur.write_through_pending_id is not None:
                return
            yield from reversed(self._node_pages(cur))
            cur = cur.parent

    def _maybe_reoffer(self, node: TreeNode) -> None:
        """The pages of ``node`` are used again: offer them to the tiers that refused them."""
        entry = self._reoffer.pop(node.id, None)
        if entry is None or node.host_value is None or node.write_through_pending_id is not None:
            return
        self._publish_node(node, None, [t for t in entry[1] if t.available])

    def _forget_stale_reoffers(self) -> None:
        for nid, (node, _) in list(self._reoffer.items()):
            if node.host_value is None or node.parent is None:
                del self._reoffer[nid]

    # ------------------------------------------------------------------ eviction (L1, L2)

    def _evict_node(self, node: TreeNode) -> int:
        if node.host_value is None or node.write_through_pending_id is not None:
            n = super()._evict_node(node)
            self._offer_host_leaf(node)  # a pending write's node keeps its host pages
            return n
        # backed up and acknowledged: the host copy stays, the node becomes L2-only
        assert node.value is not None
        n = len(node.value)
        self.device_pool.free(node.value)
        node.value = None
        self._evictable_pages -= n
        if self.gpu_events:
            self._emit_removed(node, Medium.GPU)
        self.counters["l1_evicted_pages"] += n
        self._offer_host_leaf(node)
        return n

    def _delete_leaf(self, node: TreeNode) -> None:
        parent = node.parent
        super()._delete_leaf(node)
        if parent is not None:
            self._offer_host_leaf(parent)  # it may have lost its last child

    def _offer_host_leaf(self, node: TreeNode) -> None:
        """Add ``node`` to host eviction's candidates if it is now an L2-only leaf. Called
        wherever a node can become one: its device pages go (:meth:`_evict_node`), its last
        child goes (:meth:`_delete_leaf`), or a prefetch attaches it with host pages only."""
        if _is_host_leaf(node):
            self._host_leaves.offer(node)

    def _evictable(self, node: TreeNode) -> bool:
        # Without a host copy, eviction deletes the node: never one a prefetch builds on, and
        # never one with (host-only) children, which would be left without a parent.
        if node.host_value is None and (node.host_lock_ref > 0 or node.children):
            return False
        return super()._evictable(node)

    def _host_evictable(self, node: TreeNode) -> bool:
        # the root has no parent: no L2-only leaf
        return _is_host_leaf(node) and node.host_lock_ref == 0

    def evict_host(self, num_pages: int) -> int:
        """Drop ``num_pages`` host pages of L2-only leaves, least recently used first (a longer
        leaf gives up only its tail pages, as in :meth:`evict`).

        Pages a storage worker still uses are freed when it lets go of them. Returns the number
        of host pages given up.
        """
        if num_pages <= 0:
            return 0
        # the candidates, not the whole tree: the same order as a heap of every L2-only leaf
        # (see LeafQueue). A node is offered again each time it becomes one: past twice as
        # many entries as L2 could hold leaves, start again from the tree.
        leaves = self._host_leaves
        if len(leaves) > 2 * self.host_pool.num_pages + 64:
            leaves.rebuild(n for n in self.iter_nodes() if _is_host_leaf(n))
        freed = self._evict_leaves(
            leaves,
            num_pages,
            _is_host_leaf,
            self._host_evictable,
            _host_pages,
            self._drop_host_leaf,
        )
        self.counters["l2_evicted_pages"] += freed
        return freed

    def _drop_host_leaf(self, node: TreeNode) -> int:
        """Give up an L2-only leaf's host pages (freed once no worker uses them); how many."""
        assert node.host_value is not None
        self._emit_removed(node, Medium.CPU_PINNED)
        self.host_pool.free_when_released(node.host_value)
        n = len(node.host_value)
        node.host_value = None
        self._delete_leaf(node)
        return n

    # ------------------------------------------------------------------ load back (L2 -> L1)

    def load_back(self, node: TreeNode) -> list[int] | None:
        """Copy the host-only nodes from ``node`` up to the first device node back to L1.

        Returns the device pages of the loaded nodes (prefix order; ``[]`` when ``node`` is
        already on the device), or None when L1 has no room. Blocks until the copy finished.
        """
        path: list[TreeNode] = []
        cur = node
        while cur is not self.root and cur.value is None:
            path.append(cur)
            assert cur.parent is not None
            cur = cur.parent
        if not path:
            return []
        path.reverse()
        host: list[int] = []
        for n in path:
            assert n.host_value is not None
            host += n.host_value
        # keep the device ancestor (and the path) out of the eviction that makes room
        self.inc_lock_ref(cur)
        for n in path:
            n.host_lock_ref += 1
        try:
            dev = self.device_pool.alloc(len(host))
            if dev is None:
                self.evict(len(host) - self.device_pool.available)
                dev = self.device_pool.alloc(len(host))
        finally:
            for n in path:
                n.host_lock_ref -= 1
            self.dec_lock_ref(cur)
        if dev is None:
            return None
        self.transfer.wait(self.transfer.submit(Direction.H2D, host, dev))
        off = 0
        for n in path:
            assert n.host_value is not None
            k = len(n.host_value)
            self._revive(n, dev[off : off + k])
            off += k
        self.counters["loaded_back_pages"] += len(dev)
        return dev

    # ------------------------------------------------------------------ prefetch (L3 -> L2)

    def prefetch_from_storage(self, tokens: Sequence[int]) -> PrefetchHandle | None:
        """Start reading the pages of ``tokens`` after the cached prefix from the tiers into L2.

        Returns None when there are no tiers or fewer than ``prefetch_threshold_tokens`` tokens
        would come from storage. Finish it with :meth:`check_prefetch`.
        """
        if self.storage is None or self.prefetches is None:
            return None
        key = self.page_aligned(tokens)
        ps = self.page_size
        r = self.match_prefix(key)
        start = (r.device_pages_count + r.host_hit_pages) * ps
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
        handle = self.prefetches.start(
            [storage_key(h) for h in hashes],
            [key[start + j * ps : start + (j + 1) * ps] for j in range(n)],
            None if base is self.root else block_id(parent_hash),
            tokens=key[: start + n * ps],
            start=start,
            hashes=hashes,
            base=base,
        )
        self.counters["prefetches"] += 1
        # a lookup answered on this thread (every tier answers from memory) has its result
        # waiting: the read starts now, not at the next poll (the request may be served later)
        self._poll_storage()
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
        assert self.prefetches is not None
        self._poll_storage()
        # a prefetch is a lookup, then (host pages allocated here) a read: wait for each step
        if wait:
            self.prefetches.wait(handle, self._poll_storage)
        ok = self.prefetches.decide(handle)
        if ok is None:
            return None
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
            present = (r.device_pages_count + r.host_hit_pages) * ps
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
                    self._offer_host_leaf(node)
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

    # ------------------------------------------------------------------ storage completions

    def _poll_storage(self) -> EnginePoll | None:
        """Collect finished storage work: tier events join the event queue; prefetches whose
        lookup finished start their read, finished reads record how many pages landed."""
        if self.storage is None or self.prefetches is None:
            return None
        result = self.storage.poll()
        if result.events:
            self.events.extend(result.events)
        for handle, lookup in self.prefetches.collect(result):
            if handle is None:
                self.storage.cancel_prefetch(lookup.ticket)
            else:
                self._start_read(handle, lookup.found)
        return result

    # ------------------------------------------------------------------ events, close, stats

    def _emit_stored(self, node: TreeNode, medium: str) -> None:
        if medium != Medium.CPU_PINNED:
            super()._emit_stored(node, medium)
            return
        if not self.events.wants(medium):
            return
        # On the host a block is announced only after its parent: below a node whose write is
        # pending (a prefetch inserted there), it waits for that write's ack.
        parent = self.parent_block_hash(node)
        run = self._stored_run(node, medium, parent)
        wait = self.ongoing_write_through.waits_for(node.parent, parent)
        if wait is None:
            self.events.put(run)
        else:
            self.ongoing_write_through.defer(wait, [run.build()])

    def _emit_removed(self, node: TreeNode, medium: str) -> None:
        if not self.events.wants(medium):
            return
        # a removal of blocks whose announcement still waits for an ack follows it
        ids = block_ids(self.node_hashes(node))
        wait = (
            self.ongoing_write_through.deferred_for(ids[0]) if medium == Medium.CPU_PINNED else None
        )
        if wait is None:
            self.events.put(BlockRemoved(ids, medium))
        else:
            self.ongoing_write_through.defer(wait, [BlockRemoved(ids, medium)])

    def publish_events(self) -> int:
        """Drain the queued events into the event publisher as one batch; returns how many.

        Without a publisher it raises, unless events are off (0: nothing to publish)."""
        if self.event_publisher is None:
            if isinstance(self.events, _DiscardEvents):
                return 0
            raise RuntimeError(
                "no event publisher (set events.publisher: zmq); drain events with take_events()"
            )
        events = self.take_events()
        self.event_publisher.publish(events)
        return len(events)

    def clear_storage_tier(self, name: str) -> int:
        """Delete every page of storage tier ``name`` in this cache's namespace; return how many.

        Routers learn it through ``BlockRemoved(<tier medium>)`` events in bounded batches,
        never ``AllBlocksCleared`` (which would wipe the other media too; see
        :mod:`hicache.tiering.clear`). An operator action: it first waits for the storage I/O
        in flight (and announces it), so call it between serving steps.
        """
        from hicache.tiering.clear import clear_tier

        if self.storage is None:
            raise KeyError(f"no storage tier named {name!r}: this cache has no storage tiers")
        self.storage.wait_idle(self.storage.drain_timeout_s(), holds=False)
        self._poll_storage()
        events: list[KVEvent] = []
        try:
            return clear_tier(self.storage, name, events)
        finally:
            self.events.extend(events)

    def close(self) -> None:
        """Finish storage I/O (announcing what completed), stop the workers, close the tiers,
        then publish the last events and close the event publisher, if there is one."""
        if self.storage is not None:
            # bounded: a call hung in a backend past its deadline is not waited for (its
            # pages stay held until it returns, then they are freed)
            self.storage.wait_idle(self.storage.drain_timeout_s(), holds=False)
            self._poll_storage()
            self.storage.close()
        if self.tiers is not None:
            self.tiers.close()
        if self.event_publisher is not None and not self.event_publisher.closed:
            self.publish_events()
            self.event_publisher.close()

    def stats(self) -> dict[str, object]:
        """Counters of the cache and its storage engine as plain data."""
        out: dict[str, object] = dict(self.counters)
        out.update(
            device_pages=self.total_device_pages(),
            host_pages_free=self.host_pool.available,
            host_holds=self.host_pool.total_holds(),
            pending_writes=len(self.ongoing_write_through),
            page_size=self.page_size,
            match_tokens=self.match_tokens,
            match_device_pages=self.match_device_pages,
            match_host_pages=self.match_host_pages,
            events_queued=len(self.events),
            events_dropped=self.events.dropped,
            events_overflows=self.events.overflows,
        )
        if self.storage is not None:
            out["storage"] = self.storage.stats()
        if self.event_publisher is not None:
            out["publisher"] = self.event_publisher.stats()
        return out


def _host_pages(node: TreeNode) -> int:
    assert node.host_value is not None
    return len(node.host_value)


def _is_host_leaf(node: TreeNode) -> bool:
    """Whether ``node`` is an L2-only leaf (pages on the host only, no children, in the tree):
    what host eviction takes."""
    return (
        node.value is None
        and node.host_value is not None
        and not node.children
        and node.parent is not None
    )
