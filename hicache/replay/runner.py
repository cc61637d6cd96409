"""Drive real HiRadixCache instances with a trace: match, prefetch, load back, compute, insert,
write-through, publish, evict — verifying every page that comes back from a lower tier.

One request, as a serving engine would run it:

1. ``match_prefix``: L1 hit pages (device) and L2 hit pages (host-only nodes)
2. ``prefetch_from_storage`` + ``check_prefetch(wait=True)``: L3 -> L2 for the pages after that
3. ``load_back``: L2 -> L1 for every host-only node of the prefix; the loaded pages are compared
   with the content their tokens determine (``PageContent``): a mismatch is a loud failure
4. the engine "computes" the rest: fresh device pages filled with their expected content
5. ``insert`` (write-through backs the new nodes up), ``writing_check`` (acks -> publish)
6. the request's events are taken (and handed to the cache's event publisher, if it has one),
   as a serving loop does every step
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hicache.events import KVEvent
from hicache.hiradix import HiRadixCache
from hicache.packed_tokens import chain_hashes_packed, unpack
from hicache.prefetches import PrefetchHandle
from hicache.replay.content import PageContent
from hicache.replay.trace import TraceRequest, expand_blocks_packed

__all__ = ["InstanceCounters", "ReplayError", "RequestOutcome", "TraceDriver"]

logger = logging.getLogger(__name__)

#: Blocks expanded per numpy pass ahead of a run: large enough that the calls cost nothing
#: next to the tokens, small enough that the temporaries stay a few MB at 512-token blocks.
_EXPAND_CHUNK = 1 << 12


class ReplayError(RuntimeError):
    """A page came back from a lower tier with the wrong content (or the replay cannot go on)."""


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """Pages of one request by where they came from."""

    pages: int
    l1: int
    l2: int
    l3: int
    from_other: int


@dataclass(slots=True)
class InstanceCounters:
    requests: int = 0
    pages: int = 0
    l1: int = 0
    l2: int = 0
    l3: int = 0
    from_other: int = 0
    verified: int = 0
    mismatches: int = 0
    computed: int = 0
    l1_full: int = 0
    per_request: list[tuple[int, int, int, int]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Early:
    """A request's prefetch started before the request is served, and the tokens it used."""

    tokens: list[int]
    handle: PrefetchHandle | None


class TraceDriver:
    """Replays requests through one or more caches that share their L3 tiers."""

    def __init__(
        self,
        caches: Sequence[HiRadixCache],
        *,
        block_tokens: int,
        on_request: Callable[[], None] | None = None,
        sync_publish: bool = False,
        prefetch_ahead: int = 0,
    ) -> None:
        if not caches:
            raise ValueError("at least one cache is needed")
        self.caches = list(caches)
        self.page_size = caches[0].page_size
        if block_tokens % self.page_size:
            raise ValueError(
                f"block_tokens ({block_tokens}) must be a multiple of page_size ({self.page_size})"
            )
        self.block_tokens = block_tokens
        self.content = PageContent(caches[0].device_pool.layout)
        self.counters = [InstanceCounters() for _ in caches]
        self._on_request = on_request
        self.sync_publish = sync_publish
        if prefetch_ahead < 0:
            raise ValueError(f"prefetch_ahead must be >= 0, got {prefetch_ahead}")
        #: requests whose prefetch starts while an earlier one is served (0 under sync_publish)
        self.prefetch_ahead = prefetch_ahead
        #: each block's tokens, packed (``bytes`` hold no int objects for the GC to walk)
        self._block_cache: dict[int, bytes] = {}
        #: which instance first computed (and so published) each page, by content hash
        self._origin: dict[bytes, int] = {}
        #: events taken from the caches, by (event class, medium as it is): named at the end
        self._events: Counter[tuple[type, object]] = Counter()

    def packed_tokens_of(self, block_ids: Sequence[int]) -> bytes:
        """The prompt of ``block_ids`` packed as ``keys.tokens_to_bytes`` packs tokens."""
        cache = self._block_cache
        missing = [b for b in block_ids if b not in cache]
        if missing:  # expanded together: one numpy pass
            cache.update(
                zip(missing, expand_blocks_packed(missing, self.block_tokens), strict=True)
            )
        return b"".join([cache[b] for b in block_ids])

    def expand_ahead(self, requests: Sequence[TraceRequest]) -> None:
        """Expand every block of ``requests`` not expanded yet, in a few large numpy passes:
        what a tokenizer would hand over is then ready when a request comes, instead of being
        made a few blocks at a time on the serving thread (per request, the numpy calls cost
        more than the tokens)."""
        cache = self._block_cache
        missing = list(dict.fromkeys(b for r in requests for b in r.block_ids if b not in cache))
        for i in range(0, len(missing), _EXPAND_CHUNK):
            chunk = missing[i : i + _EXPAND_CHUNK]
            cache.update(zip(chunk, expand_blocks_packed(chunk, self.block_tokens), strict=True))

    def run(self, requests: Sequence[TraceRequest]) -> None:
        self.expand_ahead(requests)
        n = len(self.caches)
        # requests 0..ahead are waiting when the replay starts, request i + ahead arrives as
        # request i is served: each one's prefetch starts when it arrives and runs meanwhile,
        # as a scheduler starts the prefetch of a request entering its waiting queue
        ahead = 0 if self.sync_publish else self.prefetch_ahead
        early: dict[int, _Early] = {}
        for i, req in enumerate(requests):
            if ahead:
                first = 0 if i == 0 else i + ahead
                for j in range(first, min(i + ahead, len(requests) - 1) + 1):
                    early[j] = self._start_early(j % n, requests[j].block_ids)
            who = i % n
            self.replay_one(who, req.block_ids, early.pop(i, None))
            self.take_events(self.caches[who])
            if self._on_request is not None:
                self._on_request()

    def _start_early(self, who: int, block_ids: Sequence[int]) -> _Early:
        tokens = unpack(self.packed_tokens_of(block_ids))
        return _Early(tokens, self.caches[who].prefetch_from_storage(tokens))

    def replay_one(
        self, who: int, block_ids: Sequence[int], early: _Early | None = None
    ) -> RequestOutcome:
        """Serve one request; ``early``: its prefetch, started while an earlier one was served."""
        cache = self.caches[who]
        c = self.counters[who]
        ps = self.page_size
        packed = self.packed_tokens_of(block_ids)
        # the cache gets a list of fresh ints, as from a tokenizer; hashes read the packed bytes
        tokens = early.tokens if early is not None else unpack(packed)
        n_pages = len(tokens) // ps
        hashes = chain_hashes_packed(cache.seed, packed, ps)

        # one prefetch per request, as a scheduler starts it: when the request arrived (early),
        # else now. Pages of its prefix evicted from L1/L2 in between are computed again, as
        # they would be in a server (in the default replay a second lookup found none).
        handle = early.handle if early is not None else cache.prefetch_from_storage(tokens)
        added = (cache.check_prefetch(handle, wait=True) or 0) if handle is not None else 0
        l3 = added // ps
        first = cache.match_prefix(tokens)
        l1 = first.device_pages_count
        # prefetched pages are host-only nodes right after the L1/L2 prefix they extend
        l2 = first.host_hit_pages - l3
        from_other = sum(1 for h in hashes[l1 + l2 : l1 + l2 + l3] if self._origin.get(h) != who)

        # L2 -> L1 for the whole host-only part of the prefix, then verify what came back
        r = first
        if r.host_hit_pages:
            loaded = cache.load_back(r.last_host_node)
            if loaded is None:
                c.l1_full += 1
            r = cache.match_prefix(tokens)
        have = len(r.device_pages)
        lower = r.device_pages[l1:have]
        if lower:
            bad = self.content.mismatches(cache.device_pool, lower, hashes[l1:have])
            c.verified += len(lower)
            if bad:
                c.mismatches += bad
                raise ReplayError(
                    f"instance {who}: {bad} of {len(lower)} pages loaded from L2/L3 differ from "
                    f"the content their tokens determine (pages {l1}..{have} of a {n_pages}-page "
                    "prompt)"
                )

        # compute the rest on fresh device pages; lock the prefix so making room cannot evict it
        cache.inc_lock_ref(r.last_node)
        try:
            need = n_pages - have
            new = cache.device_pool.alloc(need) if need else []
            if new is None:
                cache.evict(need - cache.device_pool.available)
                new = cache.device_pool.alloc(need)
            if new is None:
                # L1 cannot hold this prompt: serve it without caching the remainder
                c.l1_full += 1
                new = []
            else:
                self.content.fill(cache.device_pool, new, hashes[have:])
                for h in hashes[have:]:
                    self._origin.setdefault(h, who)
                dup = cache.insert(tokens[: (have + len(new)) * ps], [*r.device_pages, *new])
                if dup != have * ps:
                    raise ReplayError(f"insert found {dup} tokens cached, expected {have * ps}")
        finally:
            cache.dec_lock_ref(r.last_node)
        cache.writing_check()
        if self.sync_publish and cache.storage is not None:
            # finish this request's publishes (and the evictions they cause) before the next
            # request looks the tiers up, as the block-level simulation assumes
            cache.storage.wait_idle()
            cache.writing_check()
        c.computed += len(new)

        c.requests += 1
        c.pages += n_pages
        c.l1 += l1
        c.l2 += l2
        c.l3 += l3
        c.from_other += from_other
        c.per_request.append((n_pages, l1, l2, l3))
        return RequestOutcome(n_pages, l1, l2, l3, from_other)

    @property
    def events(self) -> Counter[tuple[str, str]]:
        """Events taken from the caches, by (event type, medium)."""
        out: Counter[tuple[str, str]] = Counter()
        for (kind, medium), n in self._events.items():
            out[(kind.__name__, str(medium))] += n
        return out

    def take_events(self, cache: HiRadixCache) -> None:
        """Count the cache's queued events and hand them to its publisher, if it has one."""
        events = cache.take_events()
        # counted by class and medium as they are (one Counter pass in C); named when read
        self._events.update(map(_event_kind, events))
        if events and cache.event_publisher is not None:
            cache.event_publisher.publish(events)

    def drain(self) -> None:
        """Let every pending write and publish finish, and collect its events."""
        deadline = time.monotonic() + 60
        for cache in self.caches:
            while cache.ongoing_write_through and time.monotonic() < deadline:
                cache.writing_check()
            if cache.storage is not None:
                cache.storage.wait_idle()
            cache.writing_check()
            self.take_events(cache)


def _event_kind(event: KVEvent) -> tuple[type, object]:
    return type(event), getattr(event, "medium", "-")
