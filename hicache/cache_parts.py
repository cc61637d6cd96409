"""The parts of a :class:`~hicache.hiradix.HiRadixCache` built from a configuration.

``HiRadixCache.from_config`` calls :func:`cache_parts` and passes the parts to the constructor:
pools sized from ``cache.*``, the transfer engine, the tiers (opened by the cache), the storage
namespace from the model shape and TP rank, and the event publisher on TP rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hicache.keys import ModelIdentity
from hicache.pools import DevicePool, HostPool, KVLayout
from hicache.tiering.prefetch import PrefetchRules
from hicache.tiering.tiers import Tiers

if TYPE_CHECKING:
    from hicache.config import HicacheConfig
    from hicache.event_publisher import EventPublisher
    from hicache.transfer import TransferEngine

__all__ = ["CacheParts", "cache_parts"]


@dataclass(frozen=True, slots=True)
class CacheParts:
    """Constructor arguments of the cache; ``publisher`` is also in ``kwargs`` (to close it
    when the constructor fails)."""

    args: tuple[DevicePool, HostPool, TransferEngine]
    kwargs: dict[str, Any]
    publisher: EventPublisher | None


def cache_parts(
    config: HicacheConfig,
    device_pages: int | None = None,
    device: str | None = None,
    tp_rank: int = 0,
    tp_size: int = 1,
    transfer: type[TransferEngine] | None = None,
) -> CacheParts:
    """Build pools, transfer engine, tiers and event publisher from a validated configuration.

    ``device_pages`` sizes L1 (the serving engine decides it; default
    ``config.cache.device_pool`` bytes); L2 is ``config.cache.host_pool`` bytes.
    ``transfer`` defaults to the CUDA engine on a CUDA device pool, else the CPU engine.
    The storage namespace comes from the model shape, page size and TP rank/size.
    ``events.publisher: zmq`` binds an event publisher (needs ``hicache[zmq]``) on TP rank 0
    only: ranks agree on every event, so the other ranks discard theirs.
    """
    import torch

    from hicache.event_publisher import publisher_from_config
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
    kwargs: dict[str, Any] = {
        "identity": ModelIdentity(m.name, m.revision, m.tenant_salt),
        "tiers": tiers,
        "write_policy": str(c.write_policy),
        "prefetch_rules": PrefetchRules.from_config(config.storage.prefetch),
        "gpu_events": events,
        "events": events,
        "max_queued_events": config.events.max_queue,
        "event_publisher": publisher,
    }
    return CacheParts((dev_pool, host_pool, transfer(dev_pool, host_pool)), kwargs, publisher)
