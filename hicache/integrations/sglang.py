"""hicache tiers as SGLang's HiCache L3 storage, loaded by SGLang's dynamic backend factory.

Serve with::

    python -m sglang.launch_server ... --enable-hierarchical-cache \\
        --hicache-mem-layout page_first --hicache-storage-backend dynamic \\
        --hicache-storage-backend-extra-config '{"backend_name": "hicache",
            "module_path": "hicache.integrations.sglang", "class_name": "HicacheStorage",
            "interface_v1": 1, "hicache_config": "/etc/hicache.yaml"}'

Extra-config keys read here (SGLang's own keys pass through; any other key is logged once):

- ``hicache_config``  a hicache YAML file; its ``storage.tiers`` are the tiers
- ``tiers``           the same mapping inline (``{"nvme": {"backend": "localdisk", ...}}``)
- ``model_revision``  a revision or weights digest: pages of another revision are never read

SGLang's page keys hash tokens alone, so the namespace of every tier holds what makes pages
incompatible: the served model, its revision, the pipeline stage, the host pool's dtype, shape,
layout and page size, and the tensor-parallel rank and size (not for MLA, whose ranks hold the
same KV: there only SGLang's storage writer rank writes). The radix tree stays SGLang's; this
class drives :class:`~hicache.tiering.tiers.Tiers` directly: lookup cascade, admission,
breakers and deadlines. With ``interface_v1: 1`` SGLang calls ``batch_exists`` and
``batch_get_v1``/``batch_set_v1``, which move each page's K and V regions straight between the
host pool and the tiers as one scatter-gather page: no copy in Python.

Prometheus: ``metrics_collector()`` returns a :class:`~hicache.metrics.HicacheCollector` of the
adapter's tiers for the host to register on its own registry (nothing is registered globally).

No data method raises into SGLang: a storage failure is a miss or ``False``, counted and logged
at most once per ``LOG_EVERY_S`` (:mod:`hicache.integrations.common`) per kind. A read that
outlives its tier's deadline is reported as missed while its backend call may still finish
writing into the host slots SGLang was given; SGLang frees those slots for reuse, so keep tier
deadlines above the backend's own timeouts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)

from hicache.config import HicacheConfig
from hicache.errors import ConfigError
from hicache.integrations.common import (
    AdapterStats,
    LogLimiter,
    address_view,
    check_one_source,
    load_tiers_config,
)
from hicache.keys import NamespaceSpec, engine_namespace
from hicache.storage.backend import PageStatus, check_keys
from hicache.tiering.tiers import Tiers

if TYPE_CHECKING:
    from hicache.metrics import HicacheCollector

__all__ = [
    "SGLANG_VERSION",
    "SUPPORTED_LAYOUTS",
    "AdapterOptions",
    "HicacheStorage",
    "StorageStats",
    "address_view",
]

logger = logging.getLogger(__name__)

#: The SGLang release this adapter is written and tested against (its HiCacheStorage API).
SGLANG_VERSION = "0.5.23"
#: Host layouts whose pages are whole K and V regions (one region for MLA): served zero-copy.
SUPPORTED_LAYOUTS = ("page_first", "page_first_direct", "page_head")
_MLA_LAYOUTS = ("page_first", "page_first_direct")
#: Extra-config keys SGLang itself reads for a dynamic backend.
_SGLANG_KEYS = frozenset({"backend_name", "module_path", "class_name", "interface_v1"})

_T = TypeVar("_T")


class AdapterOptions(BaseModel):
    """The adapter's keys of ``--hicache-storage-backend-extra-config``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hicache_config: str | None = Field(default=None, min_length=1)
    tiers: dict[str, Any] | None = None
    model_revision: str = ""

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> AdapterOptions:
        """Our keys of SGLang's extra-config; the others are SGLang's or unknown (logged)."""
        extra = dict(extra or {})
        ours = {k: extra[k] for k in cls.model_fields if k in extra}
        unknown = sorted(set(extra) - set(ours) - _SGLANG_KEYS)
        if unknown:
            logger.info("hicache adapter: extra-config keys not used by hicache: %s", unknown)
        try:
            options = cls.model_validate(ours)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"extra_config.{where}: {first['msg']}") from None
        check_one_source(options.hicache_config, options.tiers, origin="extra_config")
        return options

    def load(self) -> HicacheConfig:
        """The hicache configuration these options name, with every tier's options validated."""
        return load_tiers_config(self.hicache_config, self.tiers, origin="extra_config")


@dataclass(frozen=True, slots=True)
class StorageStats:
    """The fields of SGLang's ``StorageMetrics``, for when its metrics module cannot be imported
    (SGLang reads them by name)."""

    prefetch_pgs: list[int] = field(default_factory=list)
    backup_pgs: list[int] = field(default_factory=list)
    prefetch_bandwidth: list[float] = field(default_factory=list)
    backup_bandwidth: list[float] = field(default_factory=list)


def _regions(ptrs: Sequence[int], sizes: Sequence[int], start: int, count: int) -> tuple[Any, ...]:
    return tuple(address_view(ptrs[i], sizes[i]) for i in range(start, start + count))


def _tensor_view(tensor: torch.Tensor) -> memoryview:
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(f"expected a contiguous CPU tensor, got {tensor.device} {tensor.shape}")
    return address_view(tensor.data_ptr(), tensor.numel() * tensor.element_size())


class HicacheStorage(HiCacheStorage):  # type: ignore[misc]  # SGLang ships no type hints
    """SGLang ``HiCacheStorage`` over hicache tiers (see the module docstring)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any]) -> None:
        # SGLang's factory calls cls(storage_config, kwargs) with the dict positionally; nothing
        # in it is ours. Bad configuration raises here, so the server refuses to start.
        self.storage_config = storage_config
        self.options = AdapterOptions.from_extra_config(storage_config.extra_config)
        if not storage_config.is_page_first_layout:
            raise ConfigError(
                "hicache adapter: the host layout is not page-first (e.g. layer_first), so a "
                "page is not whole K and V regions; supported layouts: "
                f"{', '.join(SUPPORTED_LAYOUTS)} (--hicache-mem-layout page_first)"
            )
        self.config = self.options.load()
        self.mla = storage_config.is_mla_model
        self.writer = storage_config.is_storage_writer
        self.tiers: Tiers | None = None
        self.namespace: str | None = None
        self.page_bytes = 0
        self.regions_per_page = 0
        self.failures = LogLimiter()
        self._metrics_lock = threading.Lock()
        self._metrics: dict[str, list[float]] = {
            "prefetch_pgs": [],
            "backup_pgs": [],
            "prefetch_bandwidth": [],
            "backup_bandwidth": [],
        }

    # ------------------------------------------------------------------ set-up

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Derive the namespace and page geometry from SGLang's host pool; build and open the
        tiers. Raises (the attach fails, clearly) for a layout that is not served zero-copy."""
        pool = mem_pool_host
        layout = str(getattr(pool, "layout", ""))
        supported = _MLA_LAYOUTS if self.mla else SUPPORTED_LAYOUTS
        if layout not in supported:
            raise ConfigError(
                f"hicache adapter: host layout {layout!r} is not supported; supported layouts "
                f"for {'MLA' if self.mla else 'MHA'} models: {', '.join(supported)}"
            )
        super().register_mem_pool_host(pool)
        itemsize = pool.dtype.itemsize
        if self.mla:
            heads, dim, self.regions_per_page = 1, int(pool.kv_cache_dim), 1
        else:
            heads, dim, self.regions_per_page = int(pool.head_num), int(pool.head_dim), 2
        self.page_size = int(pool.page_size)
        region = int(pool.layer_num) * self.page_size * heads * dim * itemsize
        self.page_bytes = region * self.regions_per_page
        cfg = self.storage_config
        spec = NamespaceSpec(
            dtype=str(pool.dtype),
            num_layers=int(pool.layer_num),
            num_kv_heads=heads,
            head_dim=dim,
            page_size=self.page_size,
            layout=layout,
            tp_rank=cfg.tp_rank,
            tp_size=cfg.tp_size,
            mla=self.mla,
        )
        self.namespace = engine_namespace(
            spec,
            engine="sglang",
            model_id=cfg.model_name or "",
            revision=self.options.model_revision,
            pp_rank=cfg.pp_rank,
            pp_size=cfg.pp_size,
        )
        tiers = Tiers.from_config(
            self.config,
            self.namespace,
            page_bytes=self.page_bytes,
            rank=cfg.tp_rank,
            world_size=cfg.tp_size,
        )
        failed = tiers.open()
        if failed:
            logger.error("hicache adapter: tiers left out (cannot open): %s", failed)
        self.tiers = tiers
        logger.info(
            "hicache adapter: namespace %s, %d-byte pages, tiers %s",
            self.namespace,
            self.page_bytes,
            [t.name for t in tiers],
        )

    def close(self) -> None:
        """Stop the tiers' threads and close their backends (SGLang calls it on detach)."""
        if self.tiers is not None:
            self.tiers.close()

    def _guard(self, kind: str, keys: Sequence[str], default: _T, fn: Callable[[], _T]) -> _T:
        try:
            if self.tiers is None:
                raise RuntimeError("no host pool registered yet")
            # A malformed key is the caller's bug: caught here, it never counts against a
            # tier's breaker.
            check_keys(keys)
            return fn()
        except Exception as exc:  # storage is an accelerator: never fail SGLang's request
            self.failures.failed(kind, exc)
            return default

    # ------------------------------------------------------------------ zero-copy (v1)

    def _pages(self, keys: Sequence[str], host_indices: torch.Tensor) -> list[tuple[Any, ...]]:
        ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices)
        n = self.regions_per_page
        if len(ptrs) != n * len(keys) or len(sizes) != len(ptrs):
            raise ValueError(f"{len(keys)} keys but {len(ptrs)} host regions ({n} per page)")
        return [_regions(ptrs, sizes, i * n, n) for i in range(len(keys))]

    def batch_exists(
        self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None
    ) -> int:
        """How many leading pages the tiers hold together (the lookup cascade)."""

        def run() -> int:
            assert self.tiers is not None
            ranges = self.tiers.lookup(keys)
            return ranges[-1].end if ranges else 0

        return self._guard("exists", keys, 0, run)

    def batch_get_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        """Read each page's regions straight into its host slots; ``True`` per page read."""
        started = time.perf_counter()

        def run() -> list[bool]:
            assert self.tiers is not None
            statuses = self.tiers.get_into(keys, self._pages(keys, host_indices))
            return [s is PageStatus.OK for s in statuses]

        got = self._guard("get", keys, [False] * len(keys), run)
        self._record("prefetch", sum(got), started)
        return got

    def batch_set_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        """Publish each page from its host slots to every publishing tier; ``True`` per page
        stored in at least one. An MLA rank that is not SGLang's writer only reports which
        pages the writer has stored."""
        started = time.perf_counter()
        if not self.writer:
            present = self.batch_exists(keys, extra_info)
            return [i < present for i in range(len(keys))]

        def run() -> list[bool]:
            return self._publish(keys, self._pages(keys, host_indices))

        done = self._guard("set", keys, [False] * len(keys), run)
        self._record("backup", sum(done), started)
        return done

    def _publish(self, keys: Sequence[str], pages: Sequence[Any]) -> list[bool]:
        assert self.tiers is not None
        stored = [False] * len(keys)
        for tier in self.tiers.publishing:
            # Admission keeps what a tier stores prefix-closed: a chain's head before its tail.
            n = tier.admission.admit_prefix(keys)
            if not n:
                continue
            for i, status in enumerate(tier.put(keys[:n], pages[:n])):
                stored[i] = stored[i] or status.stored
        return stored

    def _record(self, what: str, pages: int, started: float) -> None:
        if not pages or not self.storage_config.enable_storage_metrics:
            return
        seconds = max(time.perf_counter() - started, 1e-9)
        with self._metrics_lock:
            self._metrics[f"{what}_pgs"].append(pages)
            self._metrics[f"{what}_bandwidth"].append(pages * self.page_bytes / seconds / 1e9)

    # ------------------------------------------------------------------ copying calls

    def get(
        self,
        key: str,
        target_location: Any | None = None,
        target_sizes: Any | None = None,
    ) -> torch.Tensor | None:
        """Read one page into ``target_location`` (a CPU tensor of the page's size)."""
        return self.batch_get([key], [target_location])[0]

    def batch_get(
        self,
        keys: list[str],
        target_locations: Any | None = None,
        target_sizes: Any | None = None,
    ) -> list[torch.Tensor | None]:
        """Read pages into the given tensors; each is returned when read, else ``None``."""
        targets = list(target_locations or [None] * len(keys))

        def run() -> list[torch.Tensor | None]:
            assert self.tiers is not None
            views = [_tensor_view(t) for t in targets]
            statuses = self.tiers.get_into(keys, views)
            return [
                t if s is PageStatus.OK else None for t, s in zip(targets, statuses, strict=True)
            ]

        return self._guard("get", keys, [None] * len(keys), run)

    def set(
        self,
        key: str,
        value: Any | None = None,
        target_location: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        """Store one page from ``value`` (a CPU tensor of the page's size)."""
        return self.batch_set([key], [value])

    def batch_set(
        self,
        keys: list[str],
        values: Any | None = None,
        target_locations: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        """Store pages from tensors; ``True`` when every page is stored."""
        if not self.writer:
            return self.batch_exists(keys) == len(keys)
        tensors = list(values or [])

        def run() -> bool:
            if len(tensors) != len(keys):
                raise ValueError(f"{len(keys)} keys but {len(tensors)} values")
            return all(self._publish(keys, [_tensor_view(t) for t in tensors]))

        return self._guard("set", keys, False, run)

    def exists(self, key: str) -> bool:
        """Whether some tier holds the page of ``key``."""
        return self.batch_exists([key]) == 1

    # ------------------------------------------------------------------ housekeeping

    def clear(self) -> None:
        """Delete this namespace's pages from every writable tier that can list them."""

        def run() -> None:
            assert self.tiers is not None
            for tier in self.tiers:
                backend = tier.backend
                if not tier.available or backend.context.read_only:
                    continue
                if not backend.capabilities.listable:
                    logger.info("hicache adapter: tier %s cannot list; not cleared", tier.name)
                    continue
                keys = [page.key for page in backend.iter_pages()]
                for start in range(0, len(keys), tier.max_batch):
                    backend.delete(keys[start : start + tier.max_batch])

        self._guard("clear", [], None, run)

    def get_stats(self) -> Any:
        """SGLang's ``StorageMetrics`` since the last call: pages and GB/s of every prefetch and
        backup call (recorded when SGLang enables storage metrics)."""
        with self._metrics_lock:
            taken = {k: list(v) for k, v in self._metrics.items()}
            for values in self._metrics.values():
                values.clear()
        record = StorageStats(
            prefetch_pgs=[int(v) for v in taken["prefetch_pgs"]],
            backup_pgs=[int(v) for v in taken["backup_pgs"]],
            prefetch_bandwidth=taken["prefetch_bandwidth"],
            backup_bandwidth=taken["backup_bandwidth"],
        )
        try:
            from sglang.srt.observability.metrics_collector import StorageMetrics
        except Exception:  # its module imports the model configs (transformers extras)
            return record
        return StorageMetrics(
            prefetch_pgs=record.prefetch_pgs,
            backup_pgs=record.backup_pgs,
            prefetch_bandwidth=record.prefetch_bandwidth,
            backup_bandwidth=record.backup_bandwidth,
        )

    def metrics_collector(self, name: str = "sglang") -> HicacheCollector:
        """A Prometheus collector of this adapter's tiers (``hicache_tier_*`` families, labelled
        by tier, backend kind and namespace), for the host to register on its own registry::

            registry.register(storage.metrics_collector())

        Nothing is registered anywhere by this call or by importing this module. The collector
        reads the tiers' counters at scrape time, so it may be created before SGLang attaches
        the host pool (until then a scrape has no tier families). ``name`` is the ``cache``
        label of the cache-level families, of which the adapter reports none: SGLang's radix
        tree keeps its own. Needs ``prometheus-client`` (``pip install 'hicache[metrics]'``).
        """
        from hicache.metrics import HicacheCollector  # prometheus-client is an optional extra

        return HicacheCollector(
            {name: AdapterStats(lambda: self.tiers, lambda: int(getattr(self, "page_size", 0)))}
        )

    def hicache_stats(self) -> dict[str, Any]:
        """hicache's own view: namespace, per-tier counters and the adapter's failure counts."""
        tiers = self.tiers.stats() if self.tiers is not None else {}
        return {
            "namespace": self.namespace,
            "tiers": tiers,
            "failures": dict(self.failures.counts),
        }
