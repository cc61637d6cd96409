"""hicache tiers as a secondary tier of vLLM's native KV offloading (``TieringOffloadingSpec``).

Serve with (``vllm serve MODEL ...``)::

    --kv-transfer-config '{"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"spec_name": "TieringOffloadingSpec",
            "cpu_bytes_to_use": 8589934592,
            "secondary_tiers": [{"type": "HicacheTierManager",
                "module_path": "hicache.integrations.vllm",
                "hicache_config": "/etc/hicache.yaml"}]}}'

vLLM stores KV GPU -> its CPU primary tier -> every secondary tier, and loads the reverse way.
This class is one secondary tier that drives hicache :class:`~hicache.tiering.tiers.Tiers`
(cascade, admission, breakers, deadlines) over any hicache backend. Tier kwargs
(:class:`~hicache.integrations.vllm_parts.TierOptions`): ``hicache_config`` (a YAML file) or
``tiers`` (inline), ``model_name``, ``model_revision``, worker counts and lookup caching.

- **Keys**: vLLM's ``OffloadKey`` (block hash + group index) has no model identity, so each
  page key lives in a namespace of model, revision, KV layout, chunk bytes, dtype and parallel
  layout (:func:`~hicache.integrations.vllm_parts.chunk_namespace`). Keys agree across
  processes only with SHA-256 hashing or a fixed ``PYTHONHASHSEED``: under a per-process seed
  a persistent or shared tier is refused (at start-up when vLLM's configuration says so, else
  at the first request: every lookup a miss), with a message saying what to set.
- **Never blocks the scheduler**: ``lookup`` answers from what is known (stored or found
  here, or found absent within ``absent_ttl_s``); an unknown key answers ``RETRY`` and is
  checked on an I/O worker, batched per request at the end of the step.
- **Zero-copy I/O on hicache's workers**: stores read and loads write the rows of the primary
  view as memoryviews, on separate worker pools so loads never wait behind stores. A job is
  reported only when every backend call touching its rows has returned, even one that
  outlived its deadline; ``drain_jobs`` waits for that.
- **Failures are misses**: results are per key (``successful_keys``); a failed read or write
  is counted and logged (rate-limited), never raised into vLLM.
- **Observability**: ``get_stats`` (vLLM's offloading metrics, labelled by hicache tier),
  ``metrics_collector()`` (hicache's Prometheus families) and ``take_events`` (stored and
  removed keys with the tier's medium and locality, when vLLM publishes KV events).

Pinned to vLLM :data:`VLLM_VERSION` (the Makefile installs exactly it). vLLM 0.33 adds to the
tier API without removing from it: ``tolerates_off_thread_polling`` (this tier polls only its
own queue, so it would answer true) and ``config_info`` (describing the tier for logs).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from vllm.v1.kv_offload.base import (
    Locality,
    LookupResult,
    Medium,
    OffloadingCounterMetadata,
    OffloadingEvent,
    OffloadingMetricMetadata,
    OffloadKey,
    ReqContext,
    RequestOffloadingContext,
)
from vllm.v1.kv_offload.tiering.base import JobResult, SecondaryTierManager, TransferJob

from hicache.errors import ConfigError
from hicache.integrations.common import AdapterStats, LogLimiter, load_tiers_config
from hicache.integrations.vllm_parts import (
    METRICS,
    UNSTABLE_HASH_HELP,
    CallsLeft,
    Checked,
    ChunkLayout,
    HashStability,
    JobDone,
    PrimaryRows,
    TierOptions,
    chunk_namespace,
    hash_stability,
    page_key,
)
from hicache.storage.backend import PageStatus
from hicache.tiering.engine_workers import EngineWorkers
from hicache.tiering.tiers import Tier, Tiers

if TYPE_CHECKING:
    from hicache.metrics import HicacheCollector

__all__ = ["VLLM_VERSION", "HicacheTierManager"]

logger = logging.getLogger(__name__)

#: The vLLM release this tier is written and tested against (the Makefile's pin).
VLLM_VERSION = "0.32.0"

_ALL_TIERS = "*"


class HicacheTierManager(SecondaryTierManager):  # type: ignore[misc]  # vLLM is untyped here
    """A vLLM secondary tier over hicache tiers (see the module docstring)."""

    medium = Medium.STORAGE

    def __init__(
        self,
        offloading_spec: Any,
        primary_kv_view: memoryview,
        tier_type: str,
        backpressure_detector: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        origin = f"secondary_tiers[{tier_type}]"
        self.options = TierOptions.from_kwargs(kwargs, origin=origin)
        config = load_tiers_config(self.options.hicache_config, self.options.tiers, origin=origin)
        self.rows = PrimaryRows(primary_kv_view)
        cfg = offloading_spec.config
        self.tokens_per_chunk = int(cfg.groups[0].tokens_per_block) * int(
            offloading_spec.blocks_per_chunk
        )
        self.layout = ChunkLayout(
            model=self.options.model_name or str(cfg.model.name),
            revision=self.options.model_revision,
            dtype=str(cfg.model.dtype),
            num_layers=sum(len(g.layer_names) for g in cfg.groups),
            tokens_per_chunk=self.tokens_per_chunk,
            chunk_bytes=self.rows.chunk_bytes,
            worker_bytes_per_block=int(cfg.worker_kv_bytes_per_block),
            kv_cache_layout=str(cfg.kv_cache_layout or ""),
            canonical=bool(cfg.canonical_layout),
            world_size=int(cfg.parallel.world_size),
            tp_size=int(cfg.parallel.tp_size),
            pp_size=int(cfg.parallel.pp_size),
            parallelism_agnostic=bool(cfg.parallel.is_parallelism_agnostic),
        )
        self.namespace = chunk_namespace(self.layout)
        self.tiers = self._build_tiers(config)
        self._check_hashing_at_start()
        failed = self.tiers.open()
        if failed:
            logger.error("hicache vLLM tier: tiers left out (cannot open): %s", failed)
        if self.options.locality is not None:
            self.locality = Locality(self.options.locality)
        elif self.tiers.tiers:
            self.locality = _locality(self.tiers.tiers[0])
        self.events_enabled = bool(offloading_spec.kv_events_config.enable_kv_cache_events)
        self.failures = LogLimiter("hicache vLLM tier")
        self._loads = EngineWorkers(self.rows, workers=self.options.load_workers)
        self._stores = EngineWorkers(self.rows, workers=self.options.store_workers)
        self._checks = EngineWorkers(self.rows, workers=1)
        # what the workers finished, taken on the scheduler's thread by _poll
        self._reports: queue.SimpleQueue[Checked | JobDone] = queue.SimpleQueue()
        # keys known present, oldest first, with their page keys (a backend reports evictions
        # by page key)
        self._known: OrderedDict[OffloadKey, str] = OrderedDict()
        self._by_page: dict[str, OffloadKey] = {}
        self._absent: dict[OffloadKey, float] = {}
        self._checking: set[OffloadKey] = set()
        self._to_check: dict[str, list[OffloadKey]] = {}
        self._finished: list[JobResult] = []
        self._events: list[OffloadingEvent] = []
        self._stats: Counter[tuple[str, str]] = Counter()
        self._jobs_cv = threading.Condition()
        self._jobs_out = 0
        self._refused = False
        self._hash_checked = False
        self._closed = False
        logger.info(
            "hicache vLLM tier %s: namespace %s, %d-byte chunks of %d tokens, tiers %s",
            tier_type,
            self.namespace,
            self.rows.chunk_bytes,
            self.tokens_per_chunk,
            [t.name for t in self.tiers],
        )

    def _build_tiers(self, config: Any) -> Tiers:
        """The tiers of ``config`` for this namespace (not opened); tests wrap the backends."""
        return Tiers.from_config(config, self.namespace, page_bytes=self.rows.chunk_bytes)

    # ------------------------------------------------------------------ hashing

    def _sharing_tiers(self) -> list[str]:
        return [
            t.name
            for t in self.tiers
            if t.backend.capabilities.persistent or t.backend.capabilities.shared
        ]

    def _check_hashing_at_start(self) -> None:
        """Refuse a persistent or shared tier when vLLM's configuration already says its
        block hashes use a per-process seed."""
        from vllm.config import get_current_vllm_config_or_none

        vllm_config = get_current_vllm_config_or_none()
        algo = None
        if vllm_config is not None:
            algo = str(vllm_config.cache_config.prefix_caching_hash_algo)
        verdict = hash_stability(algo, os.environ.get("PYTHONHASHSEED"))
        sharing = self._sharing_tiers()
        if verdict is HashStability.PER_PROCESS and sharing:
            self.tiers.close()
            raise ConfigError(
                f"hicache vLLM tier: tiers {sharing} are persistent or shared, but "
                + UNSTABLE_HASH_HELP.format(algo=algo)
            )

    def _check_hashing_now(self) -> None:
        """Once vLLM has seeded its block hashes (before the first request), check the seed it
        chose; a per-process seed turns every persistent or shared tier off (all misses)."""
        if self._hash_checked:
            return
        from vllm.v1.core import kv_cache_utils as kcu

        seed = getattr(kcu, "_NONE_HASH_SEED", None)
        if seed is None:
            return  # not seeded yet
        self._hash_checked = True
        default = str(getattr(kcu, "DEFAULT_NONE_HASH_SEED", ""))
        verdict = hash_stability(None, os.environ.get("PYTHONHASHSEED"), str(seed), default)
        sharing = self._sharing_tiers()
        if verdict is HashStability.PER_PROCESS and sharing:
            self._refused = True
            logger.error(
                "hicache vLLM tier: not using tiers %s (every lookup a miss): %s",
                sharing,
                UNSTABLE_HASH_HELP.format(algo="xxhash"),
            )

    # ------------------------------------------------------------------ lookup

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        self._check_hashing_now()
        return RequestOffloadingContext()

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        """HIT / MISS from what is known; RETRY while the key is checked off this thread."""
        self._check_hashing_now()
        if self._refused or self._closed:
            return LookupResult.MISS
        self._poll()
        if key in self._known:
            self._known.move_to_end(key)
            self._stats[("lookup_hits", _ALL_TIERS)] += 1
            return LookupResult.HIT
        if key in self._checking:
            return LookupResult.RETRY
        until = self._absent.get(key)
        if until is not None:
            if time.monotonic() < until:
                self._stats[("lookup_misses", _ALL_TIERS)] += 1
                return LookupResult.MISS
            del self._absent[key]
        self._checking.add(key)
        self._to_check.setdefault(req_context.req_id, []).append(key)
        return LookupResult.RETRY

    def _flush_checks(self) -> None:
        """Check the keys asked this step: one job per request (its keys are a chain, asked in
        order, so the cascade's longest-prefix answer is the answer for each)."""
        batches, self._to_check = self._to_check, {}
        for keys in batches.values():
            self._checks.submit(self._check_job, keys)

    def _check_job(self, keys: list[OffloadKey]) -> None:
        found = 0
        try:
            ranges = self.tiers.lookup([page_key(k) for k in keys])
            found = ranges[-1].end if ranges else 0
        except Exception as exc:  # the tiers never raise; this guards against bugs
            self.failures.failed("lookup", exc)
        self._reports.put(Checked(keys, found))

    def _remember(self, keys: Iterable[OffloadKey]) -> None:
        for key in keys:
            if key not in self._known:
                pkey = page_key(key)
                self._known[key] = pkey
                self._by_page[pkey] = key
            self._known.move_to_end(key)
            self._absent.pop(key, None)
        while len(self._known) > self.options.known_keys:
            _, pkey = self._known.popitem(last=False)
            self._by_page.pop(pkey, None)

    def _forget(self, keys: Iterable[OffloadKey]) -> None:
        for key in keys:
            pkey = self._known.pop(key, None)
            if pkey is not None:
                self._by_page.pop(pkey, None)

    # ------------------------------------------------------------------ jobs

    def submit_store(self, job_metadata: TransferJob) -> None:
        """Publish the job's chunks from their primary rows to every publishing tier."""
        keys = list(job_metadata.keys)
        chunks = [int(c) for c in job_metadata.chunk_ids]
        self._job_started()
        if self._refused or self._closed or len(chunks) != len(keys):
            self._job_done(JobDone(job_metadata.job_id, False, keys, [False] * len(keys)))
            return
        views = [self.rows.page_view(c) for c in chunks]
        self._stores.submit(self._store_job, job_metadata.job_id, keys, views)

    def submit_load(self, job_metadata: TransferJob) -> None:
        """Read the job's chunks through the tier cascade into their primary rows."""
        keys = list(job_metadata.keys)
        chunks = [int(c) for c in job_metadata.chunk_ids]
        self._job_started()
        if self._refused or self._closed or len(chunks) != len(keys):
            self._job_done(JobDone(job_metadata.job_id, True, keys, [False] * len(keys)))
            return
        views = [self.rows.page_view(c) for c in chunks]
        self._loads.submit(self._load_job, job_metadata.job_id, keys, views)

    def _store_job(self, job_id: int, keys: list[OffloadKey], views: list[memoryview]) -> None:
        done = JobDone(job_id, False, keys, [False] * len(keys))
        calls = CallsLeft(lambda: self._job_done(done))
        started = time.perf_counter()
        try:
            pkeys = [page_key(k) for k in keys]
            for tier in self.tiers.publishing:
                # admission keeps what a tier stores prefix-closed: a chain's head first
                n = tier.admission.admit_prefix(pkeys)
                if not n:
                    continue
                # the put call asks the backend what it evicted too: one hand-off per tier
                statuses = tier.put(pkeys[:n], views[:n], on_return=calls.add(), take_evicted=True)
                new = [keys[i] for i, s in enumerate(statuses) if s is PageStatus.OK]
                if new:
                    done.stored[tier.name] = new
                    done.nbytes += len(new) * tier.page_bytes
                for i, status in enumerate(statuses):
                    done.ok[i] = done.ok[i] or status.stored
                done.counts[("stored", tier.name)] += sum(s.stored for s in statuses)
                done.counts[("store_failed", tier.name)] += n - sum(s.stored for s in statuses)
                evicted = tier.take_evicted(call=False)
                if evicted:
                    done.evicted[tier.name] = evicted
        except Exception as exc:  # the tiers never raise; this guards against bugs
            self.failures.failed("store", exc)
            done.ok = [False] * len(keys)
        done.seconds = time.perf_counter() - started
        if not all(done.ok):
            missed = done.ok.count(False)
            self.failures.failed("store", f"{missed} of {len(keys)} chunks not stored", missed)
        calls.done()

    def _load_job(self, job_id: int, keys: list[OffloadKey], views: list[memoryview]) -> None:
        done = JobDone(job_id, True, keys, [False] * len(keys))
        calls = CallsLeft(lambda: self._job_done(done))
        started = time.perf_counter()
        try:
            pkeys = [page_key(k) for k in keys]
            for r in self.tiers.lookup(pkeys):
                got = r.tier.get_into(
                    pkeys[r.start : r.end], views[r.start : r.end], on_return=calls.add()
                )
                ok = [s is PageStatus.OK for s in got]
                done.ok[r.start : r.end] = ok
                done.nbytes += sum(ok) * r.tier.page_bytes
                done.counts[("loaded", r.tier.name)] += sum(ok)
                if not all(ok):
                    break  # the rest of the chain is useless to vLLM's prefix
        except Exception as exc:  # the tiers never raise; this guards against bugs
            self.failures.failed("load", exc)
            done.ok = [False] * len(keys)
        done.seconds = time.perf_counter() - started
        failed = done.ok.count(False)
        if failed:
            done.counts[("load_failed", _ALL_TIERS)] += failed
            self.failures.failed("load", f"{failed} of {len(keys)} chunks not read", failed)
        calls.done()

    def _job_started(self) -> None:
        with self._jobs_cv:
            self._jobs_out += 1

    def _job_done(self, done: JobDone) -> None:
        # the report goes first: once drain_jobs sees no job out, every result is queued
        self._reports.put(done)
        with self._jobs_cv:
            self._jobs_out -= 1
            self._jobs_cv.notify_all()

    # ------------------------------------------------------------------ completion

    def _poll(self) -> None:
        """Take what the workers finished (never blocks)."""
        while True:
            try:
                item = self._reports.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Checked):
                self._checked(item)
            else:
                self._finish(item)

    def _checked(self, item: Checked) -> None:
        now = time.monotonic()
        until = now + self.options.absent_ttl_s
        if len(self._absent) > self.options.known_keys:  # keys never asked again: let them go
            self._absent = {k: t for k, t in self._absent.items() if t > now}
        self._remember(item.keys[: item.found])
        for key in item.keys[item.found :]:
            self._absent[key] = until
        self._checking.difference_update(item.keys)

    def _finish(self, done: JobDone) -> None:
        self._stats.update(done.counts)
        ok_keys = [k for k, ok in zip(done.keys, done.ok, strict=True) if ok]
        if done.load:
            self._forget(k for k, ok in zip(done.keys, done.ok, strict=True) if not ok)
        else:
            self._remember(ok_keys)
        for name, keys in done.stored.items():
            self._event(name, keys, removed=False)
        for name, pkeys in done.evicted.items():
            gone = [self._by_page[p] for p in pkeys if p in self._by_page]
            self._forget(gone)
            self._event(name, gone, removed=True)
        success = all(done.ok)
        self._finished.append(
            JobResult(
                job_id=done.job_id,
                success=success,
                successful_keys=None if success or not done.load else ok_keys,
                transfer_time=done.seconds,
                transfer_bytes=done.nbytes,
            )
        )

    def _event(self, tier_name: str, keys: list[OffloadKey], *, removed: bool) -> None:
        if not self.events_enabled or not keys:
            return
        tier = self.tiers[tier_name]
        self._events.append(
            OffloadingEvent(
                keys=list(keys),
                medium=_medium(tier),
                removed=removed,
                locality=_locality(tier),
                ownership=f"{self.tier_type}/{tier.name}/{tier.medium}",
            )
        )

    def get_finished_jobs(self) -> Iterable[JobResult]:
        self._flush_checks()
        self._poll()
        out, self._finished = self._finished, []
        return out

    def on_schedule_end(self, context: Any) -> None:
        self._flush_checks()

    def has_pending_work(self) -> bool:
        with self._jobs_cv:
            jobs = self._jobs_out
        return bool(jobs or self._checking or self._to_check or self._finished)

    def drain_jobs(self) -> None:
        """Block until every submitted job's backend calls returned; never cuts one short."""
        with self._jobs_cv:
            while self._jobs_out:
                if not self._jobs_cv.wait(timeout=30.0):
                    logger.warning(
                        "hicache vLLM tier: drain still waiting for %d jobs", self._jobs_out
                    )

    def take_events(self) -> Iterable[OffloadingEvent]:
        out, self._events = self._events, []
        return out

    # ------------------------------------------------------------------ metrics

    @classmethod
    def build_metric_definitions(
        cls, extra_config: dict[str, Any]
    ) -> dict[str, OffloadingMetricMetadata]:
        return {
            name: OffloadingCounterMetadata(documentation=doc, labelnames=("tier",))
            for name, doc in METRICS.values()
        }

    def get_stats(self) -> Any:
        """Counters since the last call (vLLM's ``OffloadingConnectorStats``), or None."""
        counts = {k: v for k, v in self._stats.items() if v and k[0] in METRICS}
        self._stats.clear()
        if not counts:
            return None
        from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import (
            OffloadingConnectorStats,
        )

        stats = OffloadingConnectorStats()
        for (what, tier), value in counts.items():
            stats.increase_counter(METRICS[what][0], value, (tier,))
        return stats

    def metrics_collector(self, name: str = "vllm") -> HicacheCollector:
        """hicache's Prometheus families of these tiers (labelled by tier, backend kind and
        namespace) for the host's own registry; nothing is registered globally. Needs
        ``prometheus-client`` (``pip install 'hicache[metrics]'``)."""
        from hicache.metrics import HicacheCollector

        return HicacheCollector(
            {name: AdapterStats(lambda: self.tiers, lambda: self.tokens_per_chunk)}
        )

    def hicache_stats(self) -> dict[str, Any]:
        """hicache's own view: namespace, per-tier counters and the failure counts."""
        return {
            "namespace": self.namespace,
            "tiers": self.tiers.stats(),
            "failures": dict(self.failures.counts),
            "known_keys": len(self._known),
        }

    # ------------------------------------------------------------------ lifecycle

    def shutdown(self) -> None:
        """Finish the jobs in flight, stop the workers and close the tiers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.drain_jobs()
        for workers in (self._checks, self._loads, self._stores):
            workers.close()
        self.tiers.close()
        self.rows.release_view()


def _medium(tier: Tier) -> Medium:
    return Medium.CPU if tier.medium.upper().startswith("CPU") else Medium.STORAGE


def _locality(tier: Tier) -> Locality:
    return Locality.REMOTE if tier.medium.upper() == "EXTERNAL" else Locality.LOCAL
