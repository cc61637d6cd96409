"""The pending-writes table of :class:`~hicache.hiradix.HiRadixCache` (no tree logic).

A write-through is pending from its submit (``write_backup``) to its ack. Its record keeps the
node locked for it and its **fragments**, prefix first: a split of a fragment replaces it by
both halves in place, so fragments always concatenate to the original range.

- ``add(ack_id, node)``      ``node`` is the only fragment of a new write; it is stamped with the
                             ack id (``TreeNode.write_through_pending_id``)
- ``replace(old, new)``      a split: fragment ``old`` becomes ``new`` (prefix first), stamped
- ``mark_acked(ack_ids)``    the copy engine reported these copies finished
- ``ready()``                how many writes, oldest first, are acked without a gap: a child's
                             write never finishes before its parent's
- ``finish(ack_id)``         take the oldest write's record to announce and publish it; its
                             fragments lose their stamp
- ``waits_for(parent, parent_block)`` / ``defer(ack_id, events)``   host events that must wait
                             for an ack: pages a prefetch inserts below a node whose write is
                             pending (or below such pages) are announced ``CPU_PINNED`` only
                             after that node, so they wait in the write's record
                             (``PendingWrite.deferred``) and follow its fragments' events

It is a read-only mapping ``ack id -> PendingWrite`` in submission order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice

from hicache.events import BlockStored, KVEvent
from hicache.radix_node import TreeNode

__all__ = ["PendingWrite", "PendingWrites"]


@dataclass(slots=True)
class PendingWrite:
    """One write-through in flight: the node locked for it and its fragments, prefix first."""

    ack_id: int
    lock_node: TreeNode
    publish_nodes: list[TreeNode]
    #: Tokens of the whole write (the fragments' tokens add up to it).
    pages: int
    #: Host events of pages below the fragments, announced after them (``defer``).
    deferred: list[KVEvent] = field(default_factory=list)


class PendingWrites(Mapping[int, PendingWrite]):
    """Write-throughs between submit and ack, in submission order (module docstring)."""

    def __init__(self) -> None:
        self._writes: dict[int, PendingWrite] = {}
        self._acked: set[int] = set()
        #: Block id -> the write its deferred ``BlockStored(CPU_PINNED)`` waits for.
        self._deferred_blocks: dict[int, int] = {}

    def __getitem__(self, ack_id: int) -> PendingWrite:
        return self._writes[ack_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._writes)

    def __len__(self) -> int:
        return len(self._writes)

    def add(self, ack_id: int, node: TreeNode) -> PendingWrite:
        """Record ``node`` as the only fragment of write ``ack_id``."""
        record = PendingWrite(ack_id, node, [node], node.num_tokens)
        self._writes[ack_id] = record
        node.write_through_pending_id = ack_id
        return record

    def replace(self, old: TreeNode, new: list[TreeNode]) -> None:
        """Replace fragment ``old`` of its pending write by ``new`` (prefix first), in place."""
        ack = old.write_through_pending_id
        assert ack is not None
        record = self._writes[ack]
        for i, frag in enumerate(record.publish_nodes):
            if frag is old:
                record.publish_nodes[i : i + 1] = new
                break
        else:  # pragma: no cover - a broken invariant, never silently ignored
            raise RuntimeError(f"{old!r} is not a fragment of pending write {ack}")
        for frag in new:
            frag.write_through_pending_id = ack

    def mark_acked(self, ack_ids: Iterable[int]) -> None:
        """The copies of ``ack_ids`` finished (ids of no pending write are ignored)."""
        self._acked |= self._writes.keys() & ack_ids  # one C-level intersection

    def ready(self) -> int:
        """How many of the oldest writes are acked, without a gap."""
        n = 0
        for ack in self._writes:
            if ack not in self._acked:
                break
            n += 1
        return n

    def oldest(self, n: int) -> list[int]:
        """The ack ids of the ``n`` oldest writes."""
        return list(islice(self._writes, n))

    def finish(self, ack_id: int) -> PendingWrite:
        """Forget write ``ack_id`` and unstamp its fragments; return its record."""
        record = self._writes.pop(ack_id)
        self._acked.discard(ack_id)
        for frag in record.publish_nodes:
            frag.write_through_pending_id = None
        for e in record.deferred:
            for bid in e.block_hashes if isinstance(e, BlockStored) else ():
                if self._deferred_blocks.get(bid) == ack_id:
                    del self._deferred_blocks[bid]
        return record

    def waits_for(self, parent: TreeNode | None, parent_block: int | None) -> int | None:
        """The write a host announcement below ``parent`` (whose last page is
        ``parent_block``) must wait for: the parent's pending write, or the one its own
        deferred announcement waits for; None when it may be announced now."""
        if parent is not None and parent.write_through_pending_id is not None:
            return parent.write_through_pending_id
        return None if parent_block is None else self._deferred_blocks.get(parent_block)

    def defer(self, ack_id: int, events: list[KVEvent]) -> None:
        """Hold ``events`` until write ``ack_id`` finished (then ``finish`` returns them after
        its fragments). A ``BlockStored`` makes its blocks wait too; a removal of blocks whose
        announcement still waits is held behind it."""
        self._writes[ack_id].deferred += events
        for e in events:
            for bid in e.block_hashes if isinstance(e, BlockStored) else ():
                self._deferred_blocks[bid] = ack_id

    def deferred_for(self, block: int) -> int | None:
        """The write whose finish announces ``block`` on the host, if it still waits."""
        return self._deferred_blocks.get(block)

    def deferred_events(self) -> Iterator[KVEvent]:
        """Every event held back, oldest write first."""
        for record in self._writes.values():
            yield from record.deferred
