"""The records and small protocols of :class:`~hicache.hiradix.HiRadixCache` (no tree logic).

- ``WritePolicy``          when device nodes are backed up to host memory (defined in
  :mod:`hicache.config`, re-exported here for the cache's callers)
- :class:`RankSync`        agreement between tensor-parallel ranks (:class:`NoRankSync`: one rank)
- :class:`PendingWrite`    one write-through in flight and its fragments
  (:mod:`hicache.hiradix_writes`)
- :class:`PrefetchHandle`  one prefetch in flight (:mod:`hicache.hiradix_prefetch`)

All of them are re-exported by :mod:`hicache.hiradix`; import them from there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from hicache.config import WritePolicy
from hicache.events import EventQueue, KVEvent
from hicache.radix import TreeNode
from hicache.tiering.prefetch import PrefetchWait

__all__ = [
    "NoRankSync",
    "PendingWrite",
    "PrefetchHandle",
    "RankSync",
    "WritePolicy",
]


class RankSync(Protocol):
    """Agreement between the tensor-parallel ranks of one model.

    ``all_reduce_min`` is called at the same points on every rank, unconditionally; it returns
    the element-wise minimum over ranks (a MIN all-reduce).
    """

    def all_reduce_min(self, values: list[int]) -> list[int]: ...


class NoRankSync:
    """A single rank: the minimum over one rank is its own value."""

    def all_reduce_min(self, values: list[int]) -> list[int]:
        return list(values)


@dataclass(slots=True)
class PendingWrite:
    """One write-through in flight: the node locked for it and its fragments, prefix first."""

    ack_id: int
    lock_node: TreeNode
    publish_nodes: list[TreeNode]
    pages: int


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


class _DiscardEvents(EventQueue):
    """The event queue of a cache whose events are off: nothing is kept."""

    def put(self, event: KVEvent) -> None:
        return

    def extend(self, events: Iterable[KVEvent]) -> None:
        return
