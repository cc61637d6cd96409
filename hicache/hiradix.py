"""HiRadixCache: the radix cache over device (L1), host (L2) and storage tiers (L3).

Read top to bottom, this is where a page goes:

- ``insert``             new device nodes (``BlockStored(GPU)``); with ``write_through`` every
                         new node is backed up at once, with ``write_through_selective`` on its
                         second hit
- ``write_backup``       L1 -> L2 copy submitted; the node is locked and counts as backed up,
                         but nothing is announced or published before the ack
- ``_split_node``        a node whose write is pending is replaced by its fragments (prefix
                         first) in that write's ``publish_nodes``; splits compose
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

The cache is built in layers, one module each, every one on top of the previous:
:mod:`hicache.hiradix_host` (L1 eviction that keeps host copies, ``evict_host``, ``load_back``),
:mod:`hicache.hiradix_writes` (insert hooks, write-through, splits, acks, L3 publishing and
re-offers), :mod:`hicache.hiradix_prefetch` (L3 -> L2 prefetch); the records and protocols
(``WritePolicy``, ``RankSync``, ``PendingWrite``, ``PrefetchHandle``) are in
:mod:`hicache.hiradix_records`. This module builds the cache (``__init__``, ``from_config``),
closes it and reports its ``stats``; import every name from here.

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
from typing import TYPE_CHECKING

from hicache.events import EventQueue, KVEvent
from hicache.hiradix_prefetch import PrefetchLayer
from hicache.hiradix_records import (
    NoRankSync,
    PendingWrite,
    PrefetchHandle,
    RankSync,
    WritePolicy,
    _DiscardEvents,
)
from hicache.keys import ModelIdentity, seed_hash
from hicache.pools import DevicePool, HostPool
from hicache.tiering.engine import StorageEngine
from hicache.tiering.prefetch import PrefetchPolicy, PrefetchRules
from hicache.tiering.tiers import Tiers
from hicache.transfer import TransferEngine

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


class HiRadixCache(PrefetchLayer):
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
        io_workers: int = 4,
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
        self.ongoing_write_through = {}
        self._acked = set()
        self.tiers = tiers
        self.storage = None
        if tiers is not None and len(tiers):
            tiers.open()
            self.storage = StorageEngine(
                tiers, host_pool, page_size=self.page_size, lora_id=lora_id, workers=io_workers
            )
        self._prefetches = {}
        #: Nodes whose pages a tier's admission refused, with those tiers (second_hit).
        self._reoffer = {}
        self.counters = {
            "backups": 0,
            "backup_pages": 0,
            "backup_skipped_no_host_pages": 0,
            "acks": 0,
            "l1_evicted_pages": 0,
            "l2_evicted_pages": 0,
            "loaded_back_pages": 0,
            "prefetches": 0,
            "prefetched_pages": 0,
            "prefetch_discarded_pages": 0,
        }

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
        """Build pools, transfer engine, tiers and the cache from a validated configuration.

        ``device_pages`` sizes L1 (the serving engine decides it; default
        ``config.cache.device_pool`` bytes); L2 is ``config.cache.host_pool`` bytes.
        ``transfer`` defaults to the CUDA engine on a CUDA device pool, else the CPU engine.
        The storage namespace comes from the model shape, page size and TP rank/size.
        ``events.publisher: zmq`` binds an event publisher (needs ``hicache[zmq]``) on TP rank 0
        only: ranks agree on every event, so the other ranks discard theirs.
        """
        import torch

        from hicache.event_publisher import publisher_from_config
        from hicache.pools import KVLayout
        from hicache.transfer import CpuTransferEngine, CudaTransferEngine

        m, c = config.model, config.cache
        layout = KVLayout(
            num_layers=m.num_layers,
            num_kv_heads=m.num_kv_heads,
            head_dim=m.head_dim,
            page_size=c.page_size,
            dtype=getattr(torch, m.dtype),
            mla=m.mla,
        )
        if device_pages is None:
            if c.device_pool is None:
                raise ValueError("give device_pages or set cache.device_pool in the config")
            device_pages = c.device_pool // layout.page_bytes
        dev = device or c.device
        dev_pool = DevicePool(layout, device_pages, None if dev == "auto" else dev)
        host_pages = c.host_pool // layout.page_bytes
        if host_pages <= 0:
            raise ValueError(
                f"cache.host_pool ({c.host_pool} bytes) holds no page of {layout.page_bytes} bytes"
            )
        host_pool = HostPool(layout, host_pages)
        if transfer is None:
            transfer = CudaTransferEngine if dev_pool.kv.is_cuda else CpuTransferEngine
        namespace = layout.namespace_spec(tp_rank=tp_rank, tp_size=tp_size).namespace()
        tiers = Tiers.from_config(
            config, namespace, page_bytes=layout.page_bytes, rank=tp_rank, world_size=tp_size
        )
        publisher = publisher_from_config(config.events, model=m.name) if tp_rank == 0 else None
        events = config.events.enabled and (tp_rank == 0 or config.events.publisher is None)
        try:
            return cls(
                dev_pool,
                host_pool,
                transfer(dev_pool, host_pool),
                identity=ModelIdentity(m.name, m.revision, m.tenant_salt),
                tiers=tiers,
                write_policy=str(c.write_policy),
                prefetch_rules=PrefetchRules.from_config(config.storage.prefetch),
                rank_sync=rank_sync,
                gpu_events=events,
                events=events,
                max_queued_events=config.events.max_queue,
                event_publisher=publisher,
            )
        except BaseException:
            if publisher is not None:
                publisher.close()
            raise

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

    # ------------------------------------------------------------------ introspection

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
