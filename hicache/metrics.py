"""Prometheus metrics of hicache caches and their storage tiers, read at scrape time.

- ``HicacheCollector(caches)``   a ``prometheus_client`` collector; register it on the host
                                 application's registry: ``registry.register(collector)``
- ``serve_metrics(registry, port, addr)``  serve ``/metrics`` of ``registry`` on a background
                                 HTTP server (what ``hicache replay --metrics-port`` uses)
- ``METRICS``                    every family this module exports: name, type, labels, meaning
                                 (``docs/metrics.md`` is this table)

The serving path pays nothing for metrics: the caches, tiers and backends keep the counters they
always keep (``stats()`` dicts), and the collector reads them when Prometheus scrapes. Importing
hicache registers nothing anywhere (no default-registry side effects); this module needs
``prometheus-client`` (``pip install 'hicache[metrics]'``) and imports no torch.

Names follow Prometheus conventions: a ``hicache_`` prefix, base units (``_bytes``,
``_seconds``), counters ending in ``_total``. Per-tier families carry the labels ``tier`` (the
configured name), ``backend`` (the plugin kind) and ``namespace`` (the storage namespace, so two
models sharing a process stay apart); per-cache families carry ``cache`` (the name the host
application gave, by default the position in ``caches``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

try:
    from prometheus_client import start_http_server
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector, CollectorRegistry
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "prometheus-client is not installed, run `pip install 'hicache[metrics]'`"
    ) from exc

from hicache.tiering.breaker import BreakerState
from hicache.tiering.calls import FailureKind
from hicache.tiering.prefetch import PrefetchOutcome
from hicache.tiering.stats import LatencyHistogram

if TYPE_CHECKING:
    from hicache.tiering.tiers import Tier, Tiers

__all__ = ["METRICS", "HicacheCollector", "MetricSpec", "StatsSource", "serve_metrics"]

logger = logging.getLogger(__name__)

_TIER = ("tier", "backend", "namespace")
_CACHE = ("cache",)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One exported family: its full name (with ``_total`` for counters), type, labels, help."""

    name: str
    type: str
    labels: tuple[str, ...]
    help: str


def _c(name: str, labels: tuple[str, ...], help: str) -> MetricSpec:
    return MetricSpec(f"hicache_{name}_total", "counter", labels, help)


def _g(name: str, labels: tuple[str, ...], help: str) -> MetricSpec:
    return MetricSpec(f"hicache_{name}", "gauge", labels, help)


def _h(name: str, labels: tuple[str, ...], help: str) -> MetricSpec:
    return MetricSpec(f"hicache_{name}", "histogram", labels, help)


#: Every family, in the order of ``docs/metrics.md``; the key is how the collector names it.
METRICS: dict[str, MetricSpec] = {
    s.name: s
    for s in (
        # ---- per cache
        _c(
            "match_tokens",
            _CACHE,
            "Tokens (whole pages) asked for by match_prefix (an engine that matches a request "
            "twice counts it twice)",
        ),
        _c(
            "hit_tokens",
            (*_CACHE, "level"),
            "Matched tokens found on the device (level=l1) or in host memory only (level=l2)",
        ),
        _c(
            "evicted_pages",
            (*_CACHE, "level"),
            "Pages evicted from the device (l1, host copy kept if backed up) or host memory (l2)",
        ),
        _c("loaded_back_pages", _CACHE, "Pages copied host -> device (load back)"),
        _c("backups", _CACHE, "Write-throughs started (device -> host copies submitted)"),
        _c("backup_pages", _CACHE, "Pages of the write-throughs started"),
        _c("write_through_acks", _CACHE, "Write-throughs acknowledged (copy finished, announced)"),
        _c(
            "backup_failures",
            (*_CACHE, "reason"),
            "Backups that did not happen: no_host_pages (write-through skipped, host pool full), "
            "storage_unannounced (pages handed to an L3 tier and not announced: failed, dropped "
            "or cut off after a failure in their chain)",
        ),
        _g("write_through_pending", _CACHE, "Write-throughs submitted and not acknowledged yet"),
        _g("storage_publish_pending_groups", _CACHE, "Acked writes not fully announced on L3"),
        _g("storage_jobs_in_flight", _CACHE, "Storage jobs (publishes, prefetches) in flight"),
        _c("storage_published_pages", _CACHE, "Pages handed to the publishing L3 tiers"),
        _c("storage_promoted_pages", _CACHE, "Prefetched pages copied into earlier tiers"),
        _c("prefetches", _CACHE, "Prefetches started (L3 -> host)"),
        _c(
            "prefetch_outcomes",
            (*_CACHE, "outcome"),
            "Prefetches by outcome: complete (hit), short (partial: the chain stopped), "
            "failed, timed_out (terminated: the request stopped waiting), miss, skipped",
        ),
        _c(
            "storage_serving_wait_seconds",
            (*_CACHE, "reason"),
            "Wall time the serving thread spent blocked on storage: reason=prefetch (an L3 read "
            "it waited for, done by a worker or on its own thread), put_throttle (waiting for "
            "a tier's oldest queued puts, past the put backlog)",
        ),
        _c("prefetched_pages", _CACHE, "Prefetched pages inserted into the tree"),
        _c("prefetch_discarded_pages", _CACHE, "Prefetched pages read but not inserted"),
        _g("device_pages", _CACHE, "Device (L1) pages held by the tree"),
        _g("host_free_pages", _CACHE, "Free host (L2) pages"),
        _g("host_held_pages", _CACHE, "Host page holds of storage I/O in flight"),
        _g("event_queue_events", _CACHE, "KV events queued, not yet taken or published"),
        _c("event_queue_overflows", _CACHE, "Event queue overflows (each sent AllBlocksCleared)"),
        _c("event_queue_dropped_events", _CACHE, "Events discarded by event queue overflows"),
        _c("events_published_batches", _CACHE, "Event batches sent by the publisher"),
        _c("events_published", _CACHE, "Events sent by the publisher"),
        _c("events_publisher_dropped_batches", _CACHE, "Batches the publisher dropped (full)"),
        _c("events_publisher_dropped_events", _CACHE, "Events in the batches it dropped"),
        _c("events_replays", _CACHE, "Replay requests the publisher answered"),
        _g("events_publisher_pending_batches", _CACHE, "Batches waiting for the publisher"),
        # ---- per tier
        _g("tier_info", (*_TIER, "medium"), "Always 1; the medium the tier announces in events"),
        _g("tier_available", _TIER, "1 while the tier is in the cascade (it could be opened)"),
        _c("tier_lookups", _TIER, "exists_prefix lookups asked of the tier"),
        _c("tier_hit_pages", _TIER, "Pages the tier's lookups found"),
        _c("tier_hit_tokens", _TIER, "Tokens of the pages the tier's lookups found"),
        _c("tier_miss_pages", _TIER, "Pages asked of the tier's lookups and not found"),
        _c(
            "tier_get_pages",
            (*_TIER, "status"),
            "Pages read, by status: ok, not_found, corrupt, failed",
        ),
        _c("tier_read_bytes", _TIER, "Payload bytes read (pages read OK)"),
        _c("tier_put_pages", (*_TIER, "status"), "Pages written, by status: stored, failed"),
        _c("tier_written_bytes", _TIER, "Payload bytes written (new pages, not already there)"),
        _h(
            "tier_operation_duration_seconds",
            (*_TIER, "op"),
            "Tier call latency as the cache saw it (op: exists, get, put): queueing on the "
            "tier's threads and retries included; a call past its deadline counts then",
        ),
        _c(
            "tier_failures",
            (*_TIER, "kind"),
            "Failed calls by kind: timeout, unavailable, capacity, read_only, closed, "
            "backend_error, unexpected, breaker_open (refused, not sent)",
        ),
        _c("tier_retries", _TIER, "Retries of retryable failures"),
        _c("tier_late_returns", _TIER, "Calls that returned after the cache stopped waiting"),
        _g(
            "tier_breaker_state",
            (*_TIER, "state"),
            "Circuit breaker state: 1 for the current state (closed, open, half_open), else 0",
        ),
        _c(
            "tier_breaker_transitions",
            (*_TIER, "to"),
            "Breaker transitions: to=open (tripped or probe failed), to=closed (probe passed)",
        ),
        _c("tier_breaker_rejected_calls", _TIER, "Calls refused by an open breaker"),
        _c(
            "tier_publish_dropped_pages",
            (*_TIER, "reason"),
            "Pages not published to the tier: backpressure (bytes in flight at the bound), "
            "breaker (open), admission (refused by the admission policy)",
        ),
        _g("tier_inflight_bytes", _TIER, "Publish bytes in flight to the tier"),
        _g("tier_inflight_limit_bytes", _TIER, "Bound on publish bytes in flight"),
        _c("tier_announced_pages", _TIER, "Pages announced BlockStored(<tier medium>)"),
        _c(
            "tier_unannounced_pages",
            _TIER,
            "Pages handed to the tier and not announced with their put's result",
        ),
        _c(
            "tier_late_acked_pages",
            _TIER,
            "Pages the tier stored after their put's deadline (counted failed, announced then)",
        ),
        _c("tier_evicted_pages", _TIER, "Pages the backend dropped on its own (take_evicted)"),
        _c("tier_promoted_pages", _TIER, "Pages copied into the tier from a later tier"),
        _c("tier_republished_pages", _TIER, "Ancestors published again to keep chains whole"),
        _c("tier_corrupt_pages", _TIER, "Pages read back CORRUPT (checksum or header mismatch)"),
        _c(
            "tier_unknown_version_pages",
            _TIER,
            "Pages of an unknown (newer) page format seen by the backend: misses, left in place",
        ),
        _g(
            "tier_foreign_pages",
            _TIER,
            "Pages of another geometry found by the backend (another page size): never served",
        ),
        _g("tier_stored_pages", _TIER, "Pages the backend holds in this namespace"),
        _g("tier_used_bytes", _TIER, "Bytes the backend uses (headers included)"),
        _g("tier_capacity_bytes", _TIER, "Bytes the backend may use (its capacity bound)"),
    )
}

#: Backend ``stats()`` keys read for the backend-level families, first present wins. Backends
#: report free-form stats; these are the names the first-party ones use.
_BACKEND_KEYS: dict[str, tuple[str, ...]] = {
    "hicache_tier_stored_pages": ("pages",),
    "hicache_tier_used_bytes": ("used_bytes", "stored_bytes"),
    "hicache_tier_capacity_bytes": ("capacity_bytes", "max_bytes", "capacity"),
    "hicache_tier_unknown_version_pages_total": ("unknown_version",),
    "hicache_tier_foreign_pages": ("other_size_pages", "foreign_pages"),
}


#: The tier calls timed (``TierCounters.observe``), exported from zero.
_OPS = ("exists", "get", "put")
_EMPTY_HISTOGRAM = LatencyHistogram().as_dict()


class StatsSource(Protocol):
    """What the collector reads from a cache: ``stats()`` and its tiers (a ``HiRadixCache``)."""

    @property
    def tiers(self) -> Tiers | None: ...

    def stats(self) -> Mapping[str, object]: ...


_Family = CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily


class _Families:
    """The families of one scrape, created on first use, in ``METRICS`` order."""

    def __init__(self) -> None:
        self._fams: dict[str, _Family] = {}

    def add(self, name: str, labels: Sequence[str], value: Any) -> None:
        number = _num(value)
        if number is not None:  # a key a backend or an older cache does not report is skipped
            fam = self._family(name)
            assert not isinstance(fam, HistogramMetricFamily), name
            fam.add_metric(list(labels), number)

    def histogram(self, name: str, labels: Sequence[str], hist: Mapping[str, Any]) -> None:
        """One histogram from :meth:`LatencyHistogram.as_dict` data."""
        fam = self._family(name)
        assert isinstance(fam, HistogramMetricFamily)
        pairs = zip(hist["le_s"], hist["cumulative"], strict=True)
        buckets = [(repr(float(le)), float(n)) for le, n in pairs]
        buckets.append(("+Inf", float(hist["count"])))
        fam.add_metric(list(labels), buckets, sum_value=float(hist["sum_s"]))

    def _family(self, name: str) -> _Family:
        fam = self._fams.get(name)
        if fam is None:
            spec = METRICS[name]
            base = spec.name.removesuffix("_total")
            cls = {
                "counter": CounterMetricFamily,
                "gauge": GaugeMetricFamily,
                "histogram": HistogramMetricFamily,
            }[spec.type]
            fam = cls(base, spec.help, labels=list(spec.labels))
            self._fams[name] = fam
        return fam

    def __iter__(self) -> Iterator[Metric]:
        for name in METRICS:
            if name in self._fams:
                yield self._fams[name]


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class HicacheCollector(Collector):
    """Reads the live stats of ``caches`` (and of their tiers and backends) at every scrape.

    ``caches`` is one cache, a sequence (named ``"0"``, ``"1"``, ...) or a mapping name ->
    cache. Tiers shared by several caches are exported once. A backend whose ``stats()`` raises
    only loses its backend-level families for that scrape (logged at debug level).
    """

    def __init__(
        self, caches: StatsSource | Sequence[StatsSource] | Mapping[str, StatsSource]
    ) -> None:
        self._caches: dict[str, StatsSource]
        if isinstance(caches, Mapping):
            self._caches = dict(caches)
        elif isinstance(caches, Sequence):
            self._caches = {str(i): c for i, c in enumerate(caches)}
        else:
            self._caches = {"0": caches}

    def describe(self) -> Iterable[Metric]:
        # Nothing up front: registering must not read stats (the host may register before the
        # caches are open), and the families present depend on the configuration.
        return []

    def collect(self) -> Iterable[Metric]:
        fams = _Families()
        tiers: dict[int, tuple[Tier, int]] = {}
        for name, cache in self._caches.items():
            stats = cache.stats()
            _cache_metrics(fams, name, stats)
            page_size = stats.get("page_size")
            for tier in cache.tiers or ():
                tiers.setdefault(id(tier), (tier, page_size if isinstance(page_size, int) else 0))
        seen: set[tuple[str, str, str]] = set()
        for tier, page_size in tiers.values():
            labels = _tier_labels(tier)
            if labels in seen:
                logger.debug("tier %s exported twice under one label set; skipped", labels)
                continue
            seen.add(labels)
            _tier_metrics(fams, labels, tier, page_size)
        return fams


def _cache_metrics(fams: _Families, name: str, s: Mapping[str, object]) -> None:
    lab = (name,)
    ps = _num(s.get("page_size")) or 0.0
    fams.add("hicache_match_tokens_total", lab, s.get("match_tokens"))
    for level, key in (("l1", "match_device_pages"), ("l2", "match_host_pages")):
        pages = _num(s.get(key))
        if pages is not None:  # a source without a tree (the SGLang adapter) reports none
            fams.add("hicache_hit_tokens_total", (name, level), pages * ps)
    fams.add("hicache_evicted_pages_total", (name, "l1"), s.get("l1_evicted_pages"))
    fams.add("hicache_evicted_pages_total", (name, "l2"), s.get("l2_evicted_pages"))
    fams.add("hicache_loaded_back_pages_total", lab, s.get("loaded_back_pages"))
    fams.add("hicache_backups_total", lab, s.get("backups"))
    fams.add("hicache_backup_pages_total", lab, s.get("backup_pages"))
    fams.add("hicache_write_through_acks_total", lab, s.get("acks"))
    fams.add(
        "hicache_backup_failures_total",
        (name, "no_host_pages"),
        s.get("backup_skipped_no_host_pages"),
    )
    fams.add("hicache_write_through_pending", lab, s.get("pending_writes"))
    fams.add("hicache_prefetches_total", lab, s.get("prefetches"))
    fams.add("hicache_prefetched_pages_total", lab, s.get("prefetched_pages"))
    fams.add("hicache_prefetch_discarded_pages_total", lab, s.get("prefetch_discarded_pages"))
    fams.add("hicache_device_pages", lab, s.get("device_pages"))
    fams.add("hicache_host_free_pages", lab, s.get("host_pages_free"))
    fams.add("hicache_host_held_pages", lab, s.get("host_holds"))
    fams.add("hicache_event_queue_events", lab, s.get("events_queued"))
    fams.add("hicache_event_queue_overflows_total", lab, s.get("events_overflows"))
    fams.add("hicache_event_queue_dropped_events_total", lab, s.get("events_dropped"))
    storage = s.get("storage")
    if isinstance(storage, Mapping):
        fams.add(
            "hicache_backup_failures_total",
            (name, "storage_unannounced"),
            storage.get("unannounced_pages"),
        )
        fams.add("hicache_storage_publish_pending_groups", lab, storage.get("pending_groups"))
        fams.add("hicache_storage_jobs_in_flight", lab, storage.get("in_flight"))
        fams.add("hicache_storage_published_pages_total", lab, storage.get("published_pages"))
        fams.add("hicache_storage_promoted_pages_total", lab, storage.get("promoted_pages"))
        outcomes = storage.get("prefetch")
        if isinstance(outcomes, Mapping):
            # every outcome from zero, so rate() sees the first one
            for outcome in PrefetchOutcome:
                n = outcomes.get(outcome.value, 0)
                fams.add("hicache_prefetch_outcomes_total", (name, outcome.value), n)
        waits = storage.get("serving_wait_s")
        if isinstance(waits, Mapping):
            for reason, seconds in waits.items():
                fams.add("hicache_storage_serving_wait_seconds_total", (name, reason), seconds)
    pub = s.get("publisher")
    if isinstance(pub, Mapping):
        fams.add("hicache_events_published_batches_total", lab, pub.get("batches"))
        fams.add("hicache_events_published_total", lab, pub.get("events"))
        fams.add("hicache_events_publisher_dropped_batches_total", lab, pub.get("dropped"))
        fams.add("hicache_events_publisher_dropped_events_total", lab, pub.get("dropped_events"))
        fams.add("hicache_events_replays_total", lab, pub.get("replays"))
        fams.add("hicache_events_publisher_pending_batches", lab, pub.get("pending"))


def _tier_labels(tier: Tier) -> tuple[str, str, str]:
    kind = getattr(tier.settings, "backend", None) or type(tier.backend).__name__
    return (tier.name, str(kind), tier.backend.context.namespace)


def _tier_metrics(fams: _Families, lab: tuple[str, str, str], tier: Tier, page_size: int) -> None:
    snap = tier.snapshot()
    fams.add("hicache_tier_info", (*lab, str(tier.medium)), 1)
    fams.add("hicache_tier_available", lab, int(tier.available))
    fams.add("hicache_tier_lookups_total", lab, snap["lookups"])
    fams.add("hicache_tier_hit_pages_total", lab, snap["hit_pages"])
    fams.add("hicache_tier_hit_tokens_total", lab, snap["hit_pages"] * page_size)
    fams.add("hicache_tier_miss_pages_total", lab, snap["miss_pages"])
    for status in ("ok", "not_found", "corrupt", "failed"):
        fams.add("hicache_tier_get_pages_total", (*lab, status), snap[f"get_{status}"])
    fams.add("hicache_tier_read_bytes_total", lab, snap["bytes_read"])
    fams.add("hicache_tier_put_pages_total", (*lab, "stored"), snap["put_stored"])
    fams.add("hicache_tier_put_pages_total", (*lab, "failed"), snap["put_failed"])
    fams.add("hicache_tier_written_bytes_total", lab, snap["bytes_written"])
    for op in _OPS:
        hist = snap["latency"].get(op) or _EMPTY_HISTOGRAM
        fams.histogram("hicache_tier_operation_duration_seconds", (*lab, op), hist)
    failures = snap.get("failures", {})
    for kind in FailureKind:
        fams.add("hicache_tier_failures_total", (*lab, kind.value), failures.get(kind.value, 0))
    fams.add("hicache_tier_retries_total", lab, snap.get("retries"))
    fams.add("hicache_tier_late_returns_total", lab, snap.get("late_returns"))
    breaker = snap.get("breaker")
    if breaker is not None:
        for state in BreakerState:
            current = int(breaker["state"] == state.value)
            fams.add("hicache_tier_breaker_state", (*lab, state.value), current)
        fams.add("hicache_tier_breaker_transitions_total", (*lab, "open"), breaker["opened"])
        closed = breaker["closed_after_probe"]
        fams.add("hicache_tier_breaker_transitions_total", (*lab, "closed"), closed)
        fams.add("hicache_tier_breaker_rejected_calls_total", lab, breaker["rejected"])
    for reason in ("backpressure", "breaker", "admission"):
        n = snap[f"dropped_{reason}"]
        fams.add("hicache_tier_publish_dropped_pages_total", (*lab, reason), n)
    gate = snap.get("inflight")
    if gate is not None:
        fams.add("hicache_tier_inflight_bytes", lab, gate["inflight_bytes"])
        fams.add("hicache_tier_inflight_limit_bytes", lab, gate["max_bytes"])
    fams.add("hicache_tier_announced_pages_total", lab, snap["announced_pages"])
    fams.add("hicache_tier_unannounced_pages_total", lab, snap["unannounced_pages"])
    fams.add("hicache_tier_late_acked_pages_total", lab, snap["late_acked_pages"])
    fams.add("hicache_tier_evicted_pages_total", lab, snap["evicted_pages"])
    fams.add("hicache_tier_promoted_pages_total", lab, snap["promoted_pages"])
    fams.add("hicache_tier_republished_pages_total", lab, snap["republished_pages"])
    fams.add("hicache_tier_corrupt_pages_total", lab, snap["get_corrupt"])
    try:
        backend = tier.backend.stats()
    except Exception as exc:
        logger.debug("tier %s: backend stats() failed: %r", tier.name, exc)
        return
    for name, keys in _BACKEND_KEYS.items():
        for key in keys:
            value = _num(backend.get(key))
            if value is not None:
                fams.add(name, lab, value)
                break


def serve_metrics(
    registry: CollectorRegistry, port: int, addr: str = "127.0.0.1"
) -> tuple[str, Any]:
    """Serve ``registry`` at ``http://addr:port/metrics`` from a daemon thread.

    ``port`` 0 picks a free port. Returns the URL (with the real port) and the server; call
    ``server.shutdown()`` and ``server.server_close()`` to stop it.
    """
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    host, real_port = server.server_address[:2]
    if isinstance(host, bytes):
        host = host.decode()
    return f"http://{host}:{real_port}/metrics", server
