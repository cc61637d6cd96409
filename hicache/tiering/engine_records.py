"""The records of :class:`~hicache.tiering.engine.StorageEngine` (no torch).

- :class:`HostPages`       what the engine needs from the host pool
- :class:`PrefetchResult`  a finished prefetch: a status and a source tier per page
- :class:`LookupResult`    the cascade lookup of a prefetch without host pages finished
- :class:`EnginePoll`      what one ``poll`` collected
- ``_PrefetchJob``         one prefetch in flight (:mod:`hicache.tiering.engine_prefetch`)
- ``_PutPart`` / ``_PutJob``  a batch waiting for its tier's next put call / one put call
- ``_PutDone`` / ``_PutLate`` / ``_GetDone`` / ``_LookupDone`` / ``_Evicted``   what a worker
  finished, on the engine's completion queue (``_Done``), taken by ``poll`` on the cache's thread

The public ones are re-exported by :mod:`hicache.tiering.engine`; import them from there.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from hicache.events import KVEvent
from hicache.storage.backend import PageStatus
from hicache.tiering.lanes import LaneTicket
from hicache.tiering.prefetch import PrefetchOutcome, prefetch_outcome, usable_prefix
from hicache.tiering.tiers import Tier, TierRange

if TYPE_CHECKING:
    from hicache.tiering.announce import PublishPage
    from hicache.tiering.engine_workers import _Holds

__all__ = ["EnginePoll", "HostPages", "LookupResult", "PrefetchResult"]


class HostPages(Protocol):
    """What the engine needs from the host pool (``hicache.pools.HostPool``)."""

    @property
    def num_pages(self) -> int: ...
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
        return prefetch_outcome(len(self.statuses), self.statuses)


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
    #: The tiers' eviction marks at submit: a page evicted since is not announced as read.
    marks: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _PutDone:
    group: int
    tier: str
    batch: int
    statuses: list[PageStatus]


@dataclass(frozen=True, slots=True)
class _PutLate:
    """A put call came back after its deadline (its ``_PutDone`` said ``FAILED``, and came
    first): the statuses the tier really gave ``pages``, one batch's sent pages in order."""

    tier: str
    pages: list[PublishPage]
    statuses: list[PageStatus]
    #: The tier's eviction mark when the batch was handed out (``_PutPart.mark``).
    mark: int


@dataclass(frozen=True, slots=True)
class _PutPart:
    """One batch of a group, bound for one tier, waiting to join that tier's next put call."""

    group: int
    batch: int
    #: The pages sent (``keys`` are theirs), for a result that comes after the deadline.
    pages: list[PublishPage]
    keys: list[str]
    views: list[memoryview]
    holds: _Holds
    #: Pages of the batch, those admission refused (not in ``keys``) included.
    total: int
    #: The tier's eviction mark when the batch was handed out: its late result does not
    #: announce a page evicted after it.
    mark: int


@dataclass(slots=True)
class _PutJob:
    """One put call on its way to a tier: the batches it carries and its lane, which a lookup
    of one of its pages promotes (the lookup waits for it, nothing else)."""

    tier: Tier
    parts: list[_PutPart]
    #: Host pages the call carries (held until it returns).
    pages: int = 0
    ticket: LaneTicket = field(default_factory=LaneTicket)
    future: Future[None] | None = None
    #: The call that carries this one's batches to the tier (``PutCalls`` merges the queued
    #: calls of a tier): itself or a merged call; None while it waits.
    carrier: _PutJob | None = None
    #: A merged call: where each merged call's pages end (``Tier.put``'s ``batches``).
    batches: list[int] = field(default_factory=list)
    #: Guards the two below: a late result waits until the deadline's ``_PutDone`` is queued.
    lock: threading.Lock = field(default_factory=threading.Lock)
    reported: bool = False
    late: list[PageStatus] | None = None


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


#: What a worker puts on the engine's completion queue.
_Done = _PutDone | _PutLate | _GetDone | _LookupDone | _Evicted
