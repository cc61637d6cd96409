"""Write-through and storage publishing of :class:`~hicache.hiradix.HiRadixCache`.

- ``_on_path``           insert hooks (and ``_on_new_leaf``): back a node up as the write
                         policy says; re-offer pages a tier refused when they are used again
- ``write_backup``       L1 -> L2 copy submitted; the node is locked and counts as backed up,
                         but nothing is announced or published before the ack
- ``_split_node``        a node whose write is pending is replaced by its fragments (prefix
                         first) in that write's ``publish_nodes``; splits compose
- ``writing_check``      for each finished ack (agreed across ranks): announce every fragment
                         as ``BlockStored(CPU_PINNED)``, publish them in prefix order
                         (``write_backup_storage``), release the lock once
- ``_publish_node``      hand a node's pages to the storage engine, republishing the ancestors a
                         tier lost ahead of them (``_lost_ancestor_pages``)
- ``_poll_storage``      collect finished storage work (the prefetch layer extends it)

:class:`WriteThroughLayer` sits on :class:`~hicache.hiradix_host.HostLayer` and under
:class:`~hicache.hiradix_prefetch.PrefetchLayer`; it is not used alone:
``HiRadixCache.__init__`` sets the state declared on it.
"""

from __future__ import annotations

from itertools import islice

from hicache.events import Medium
from hicache.hiradix_host import HostLayer
from hicache.hiradix_records import PendingWrite, RankSync, WritePolicy
from hicache.keys import block_id, storage_key
from hicache.radix import TreeNode
from hicache.tiering.engine import EnginePoll, PublishGroup, PublishPage, StorageEngine
from hicache.tiering.tiers import Tier
from hicache.transfer import Direction

__all__ = ["WriteThroughLayer"]

#: Nodes remembered for a second offer to a refusing tier before stale entries are dropped.
_REOFFER_LIMIT = 100_000


class WriteThroughLayer(HostLayer):
    """Write-through, acks, L3 publishing and re-offers (module docstring)."""

    write_policy: WritePolicy
    _backup_threshold: int
    rank_sync: RankSync
    ongoing_write_through: dict[int, PendingWrite]
    _acked: set[int]
    storage: StorageEngine | None
    _reoffer: dict[int, tuple[TreeNode, list[Tier]]]

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

    # ------------------------------------------------------------------ write-through

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
        host = self.host_pool.alloc(n)
        if host is None:
            self.evict_host(n - self.host_pool.available)
            host = self.host_pool.alloc(n)
            if host is None:
                self.counters["backup_skipped_no_host_pages"] += 1
                return None
        ack = self.transfer.submit(Direction.D2H, node.value, host)
        node.host_value = host
        self._track_write_through_node(node, ack)
        self.counters["backups"] += 1
        self.counters["backup_pages"] += n
        return ack

    def _track_write_through_node(self, node: TreeNode, ack_id: int) -> None:
        """Record ``node`` as the only fragment of write ``ack_id`` and lock it until the ack."""
        node.write_through_pending_id = ack_id
        self.inc_lock_ref(node)
        self.ongoing_write_through[ack_id] = PendingWrite(ack_id, node, [node], node.num_tokens)

    def _split_node(self, child: TreeNode, pages: int) -> TreeNode:
        prefix = super()._split_node(child, pages)
        if child.write_through_pending_id is not None:
            self._replace_pending_write_through_node(child, [prefix, child])
        entry = self._reoffer.get(child.id)
        if entry is not None:  # both fragments still wait for their second offer
            self._reoffer[prefix.id] = (prefix, entry[1])
        return prefix

    def _replace_pending_write_through_node(self, old: TreeNode, new: list[TreeNode]) -> None:
        """Replace fragment ``old`` of its pending write by ``new`` (prefix first), in place."""
        ack = old.write_through_pending_id
        assert ack is not None
        record = self.ongoing_write_through[ack]
        for i, frag in enumerate(record.publish_nodes):
            if frag is old:
                record.publish_nodes[i : i + 1] = new
                break
        else:  # pragma: no cover - a broken invariant, never silently ignored
            raise RuntimeError(f"{old!r} is not a fragment of pending write {ack}")
        for frag in new:
            frag.write_through_pending_id = ack

    def writing_check(self) -> int:
        """Finish every acknowledged write-through that all ranks saw complete; return how many.

        Acks are finished in submission order: a child's write never announces before its
        parent's. The count is agreed through ``RankSync`` (always called, even for zero).
        """
        for ack_id in self.transfer.poll():
            if ack_id in self.ongoing_write_through:
                self._acked.add(ack_id)
        ready = 0
        for ack in self.ongoing_write_through:
            if ack not in self._acked:
                break
            ready += 1
        ready = self.rank_sync.all_reduce_min([ready])[0]
        for ack in list(islice(self.ongoing_write_through, ready)):
            self._finish_write_through_ack(ack)
        self._poll_storage()
        return ready

    def _finish_write_through_ack(self, ack_id: int) -> None:
        """Announce and publish every fragment of ``ack_id`` in prefix order; unlock once."""
        record = self.ongoing_write_through.pop(ack_id)
        self._acked.discard(ack_id)
        group = self.storage.begin_publish() if self.storage is not None else None
        for frag in record.publish_nodes:
            frag.write_through_pending_id = None
            self._emit_stored(frag, Medium.CPU_PINNED)
            self.write_backup_storage(frag, group)
        if group is not None and self.storage is not None:
            self.storage.end_publish(group)
        self.dec_lock_ref(record.lock_node)
        self.counters["acks"] += 1

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
        if self.storage is None or not self.storage.tiers.publishing:
            return
        assert node.host_value is not None
        hashes = self.node_hashes(node)
        parent = self.parent_block_hash(node)
        ps = self.page_size
        key = node.key
        pages = []
        for j, (h, hp) in enumerate(zip(hashes, node.host_value, strict=True)):
            bid = block_id(h)
            pages.append(PublishPage(storage_key(h), hp, bid, parent, key[j * ps : (j + 1) * ps]))
            parent = bid
        own = group is None
        if group is None:
            group = self.storage.begin_publish()
        first_parent = pages[0].parent_block_id if pages else None
        if first_parent is not None:
            for tier in self.storage.tiers.publishing if targets is None else targets:
                if self.storage.needs_republish(group, tier, first_parent):
                    self.storage.republish(group, self._lost_ancestor_pages(node, tier), tier)
        refused = self.storage.publish(group, pages, targets=targets)
        if own:
            self.storage.end_publish(group)
        if refused:
            self._reoffer[node.id] = (node, refused)
            if len(self._reoffer) > _REOFFER_LIMIT:
                self._forget_stale_reoffers()

    def _lost_ancestor_pages(self, node: TreeNode, tier: Tier) -> list[PublishPage]:
        """The pages above ``node`` that ``tier`` is known to have lost, up to the nearest page
        it holds (or the root), in prefix order; empty when the chain cannot be closed now.

        A shared head that stays hot in L1/L2 is never touched on the tier, so the tier's own
        LRU ages it out while chains below it are still published: put back ahead of them, the
        chain is prefix-closed again and can be announced and found by a cold instance.
        """
        assert self.storage is not None
        ps = self.page_size
        out: list[PublishPage] = []  # tail first
        cur = node.parent
        while cur is not None and cur is not self.root:
            # L2 is prefix-closed, so ancestors have host pages; an unacked one is not published
            if cur.host_value is None or cur.write_through_pending_id is not None:
                return []
            ids = [block_id(h) for h in self.node_hashes(cur)]
            parents = [self.parent_block_hash(cur), *ids[:-1]]
            hashes = self.node_hashes(cur)
            for j in reversed(range(len(ids))):
                if not self.storage.missing_on(tier, ids[j]):
                    return out[::-1]
                key = cur.key[j * ps : (j + 1) * ps]
                out.append(
                    PublishPage(storage_key(hashes[j]), cur.host_value[j], ids[j], parents[j], key)
                )
            cur = cur.parent
        return out[::-1]

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

    def _poll_storage(self) -> EnginePoll | None:
        """Collect finished storage work: tier events join the event queue; the rest of the
        poll is returned for the prefetch layer (None without storage)."""
        if self.storage is None:
            return None
        result = self.storage.poll()
        if result.events:
            self.events.extend(result.events)
        return result
