"""``hicache replay``: replay a trace through the whole hierarchy and report per-tier hit ratios,
references (same-policy simulation, LRU, Belady's MIN), throughput, events and storage outcomes.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hicache.config import HicacheConfig, ModelConfig, load_config
from hicache.replay.report import (
    InstanceReport,
    OverallReport,
    ReplayReport,
    ScalingReport,
    StorageReport,
    ThroughputReport,
    TierReport,
    VerificationReport,
    print_report,
)
from hicache.replay.simulate import (
    simulate_hierarchy,
    simulate_infinite,
    simulate_lru,
    simulate_min,
)
from hicache.replay.trace import TraceRequest, default_trace_path, load_trace

if TYPE_CHECKING:
    from hicache.hiradix import HiRadixCache

__all__ = ["ReplayHooks", "ReplaySettings", "default_config", "run_replay"]

logger = logging.getLogger(__name__)

TRACE_BLOCK_TOKENS = 512
_HEADER = 4096  # the page header every L3 page carries (hicache.storage.pageformat)


@dataclass(slots=True)
class ReplaySettings:
    """Every knob of one replay, with the defaults that finish in about a minute on 2 cores."""

    trace: Path | None = None
    config: Path | None = None
    limit: int | None = None
    #: Tokens one trace block expands to; 0 = one page.
    block_tokens: int = 0
    page_size: int = 16
    num_layers: int = 2
    num_kv_heads: int = 2
    head_dim: int = 32
    dtype: str = "float16"
    l1_fraction: float = 0.01
    l2_fraction: float = 0.025
    l3_fraction: float = 0.05
    instances: int = 1
    data_dir: Path = Path("hicache-data")
    keep_storage: bool = False
    progress: bool = True
    sync_publish: bool = False
    #: Serve Prometheus ``/metrics`` on this port while the replay runs (0: a free port).
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not self.block_tokens:
            self.block_tokens = self.page_size


@dataclass(frozen=True, slots=True)
class ReplayHooks:
    """Callbacks into a running replay (for tools and tests that watch it from outside)."""

    #: The caches are built, nothing replayed yet; the ``/metrics`` URL when metrics are served.
    started: Callable[[Sequence[HiRadixCache], str | None], None] | None = None
    #: Request ``i`` (0-based) is done and its events are taken (and published).
    request_done: Callable[[int], None] | None = None
    #: Everything is replayed and drained, the last events taken; the caches are still open.
    finished: Callable[[Sequence[HiRadixCache]], None] | None = None


def default_config(settings: ReplaySettings, root: Path, l3_pages: int) -> HicacheConfig:
    """The embedded default: one local-disk L3 tier under ``root``, sized to ``l3_pages``."""
    model: dict[str, Any] = {
        "name": "replay/tiny",
        "revision": "v1",
        "num_layers": settings.num_layers,
        "num_kv_heads": settings.num_kv_heads,
        "head_dim": settings.head_dim,
        "dtype": settings.dtype,
    }
    page_bytes = ModelConfig(**model).page_bytes(settings.page_size)
    data: dict[str, Any] = dict(
        cache={"page_size": settings.page_size, "device": "cpu", "host_pool": 1 << 30},
        model=model,
        storage={
            "prefetch": {"policy": "wait_complete", "threshold_tokens": settings.page_size},
            "tiers": {
                "disk": {
                    "backend": "localdisk",
                    "medium": "DISK",
                    "options": {
                        "root": str(root),
                        "max_bytes": max(1, l3_pages) * (page_bytes + _HEADER),
                        "durability": "none",
                        "shared": settings.instances > 1,
                    },
                }
            },
        },
    )
    return HicacheConfig(**data)


def _chains(requests: list[TraceRequest], pages_per_block: int) -> list[list[int]]:
    if pages_per_block == 1:
        return [list(r.block_ids) for r in requests]
    # a block spanning several pages: page j of block b is the pair (b, j), flattened
    return [
        [b * pages_per_block + j for b in r.block_ids for j in range(pages_per_block)]
        for r in requests
    ]


def run_replay(
    settings: ReplaySettings, hooks: ReplayHooks | None = None
) -> tuple[ReplayReport, list[tuple[int, int, int, int, int]]]:
    """Replay; return the report and a timeline of ``(timestamp_ms, pages, l1, l2, l3)`` per
    request (raises ``ReplayError`` on a verification failure).

    With ``events.publisher`` in the configuration, the (single) instance publishes its events
    after every request; with ``settings.metrics_port``, ``/metrics`` is served meanwhile.
    """
    import torch

    from hicache.event_publisher import publisher_from_config
    from hicache.hiradix import HiRadixCache
    from hicache.keys import ModelIdentity
    from hicache.pools import DevicePool, HostPool, KVLayout
    from hicache.replay.runner import TraceDriver
    from hicache.tiering.tiers import Tiers
    from hicache.transfer import CpuTransferEngine

    # A bad config file fails here, before the data directory is created.
    file_config = load_config(settings.config) if settings.config else None
    # Pages here are small: torch's intra-op threads only spin against each other (and against
    # the storage workers) on a small machine, making each copy ~100x slower.
    torch.set_num_threads(1)
    requests = load_trace(settings.trace, settings.limit)
    if not requests:
        raise ValueError("the trace has no requests")
    if settings.block_tokens % settings.page_size:
        raise ValueError(
            f"--block-tokens ({settings.block_tokens}) must be a multiple of --page-size "
            f"({settings.page_size})"
        )
    ppb = settings.block_tokens // settings.page_size
    chains = _chains(requests, ppb)
    unique = len({p for c in chains for p in c})
    # A request must fit on the device, as in a serving engine: L1 holds at least two of the
    # longest prompts (its locked prefix plus its computed pages, with room to spare).
    l1_pages = max(16, 2 * max(len(c) for c in chains), int(unique * settings.l1_fraction))
    l2_pages = max(l1_pages + 16, int(unique * settings.l2_fraction))
    l3_pages = max(l2_pages, int(unique * settings.l3_fraction))

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="replay-", dir=settings.data_dir))
    config = file_config or default_config(settings, root, l3_pages)
    m, ps = config.model, config.cache.page_size
    if ps != settings.page_size:
        settings.page_size = ps
        settings.block_tokens = ps * ppb
    layout = KVLayout(
        num_layers=m.num_layers,
        num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim,
        page_size=ps,
        dtype=getattr(torch, m.dtype),
        mla=m.mla,
    )
    namespace = layout.namespace_spec().namespace()
    if config.events.publisher is not None and settings.instances > 1:
        raise ValueError("events.publisher: the replay publishes events of one instance only")
    tiers = Tiers.from_config(config, namespace, page_bytes=layout.page_bytes)
    caches: list[HiRadixCache] = []
    metrics_server: Any = None
    try:
        for _ in range(settings.instances):
            dev = DevicePool(layout, l1_pages, "cpu")
            host = HostPool(layout, l2_pages, pin=False)
            caches.append(
                HiRadixCache(
                    dev,
                    host,
                    CpuTransferEngine(dev, host),
                    identity=ModelIdentity(m.name, m.revision, m.tenant_salt),
                    tiers=tiers,
                    prefetch_threshold_tokens=config.storage.prefetch.threshold_tokens,
                    event_publisher=publisher_from_config(config.events, model=m.name),
                )
            )
        url = None
        if settings.metrics_port is not None:
            url, metrics_server = _serve_metrics(caches, settings)
        if hooks is not None and hooks.started is not None:
            hooks.started(caches, url)
        started = time.perf_counter()
        with _progress(settings.progress, len(requests)) as advance:
            done = iter(range(len(requests)))

            def on_request() -> None:
                advance()
                if hooks is not None and hooks.request_done is not None:
                    hooks.request_done(next(done))

            driver = TraceDriver(
                caches,
                block_tokens=settings.block_tokens,
                on_request=on_request,
                sync_publish=settings.sync_publish,
            )
            driver.run(requests)
            driver.drain()
        wall = time.perf_counter() - started
        if hooks is not None and hooks.finished is not None:
            hooks.finished(caches)
        events: Counter[tuple[str, str]] = driver.events
        report = _build_report(
            settings,
            config,
            requests,
            chains,
            driver,
            caches,
            tiers,
            events,
            wall,
            l1_pages=l1_pages,
            l2_pages=l2_pages,
            l3_pages=l3_pages,
            page_bytes=layout.page_bytes,
        )
    finally:
        for cache in caches:
            cache.close()
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        if not settings.keep_storage:
            shutil.rmtree(root, ignore_errors=True)
    timeline = _timeline(requests, driver)
    return report, timeline


def _serve_metrics(caches: list[HiRadixCache], settings: ReplaySettings) -> tuple[str, Any]:
    from prometheus_client import CollectorRegistry

    from hicache.metrics import HicacheCollector, serve_metrics

    registry = CollectorRegistry(auto_describe=False)
    registry.register(HicacheCollector(caches))
    assert settings.metrics_port is not None
    return serve_metrics(registry, settings.metrics_port, settings.metrics_addr)


def _timeline(requests: list[TraceRequest], driver: Any) -> list[tuple[int, int, int, int, int]]:
    rows = []
    iters = [iter(c.per_request) for c in driver.counters]
    for i, req in enumerate(requests):
        pages, l1, l2, l3 = next(iters[i % len(iters)])
        rows.append((req.timestamp_ms, pages, l1, l2, l3))
    return rows


class _progress:
    """A rich progress bar when asked (and a no-op otherwise)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = total
        self._bar: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        self._bar = Progress(transient=True)
        self._bar.start()
        task = self._bar.add_task("replaying", total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def _build_report(
    settings: ReplaySettings,
    config: HicacheConfig,
    requests: list[TraceRequest],
    chains: list[list[int]],
    driver: Any,
    caches: list[Any],
    tiers: Any,
    events: Counter[tuple[str, str]],
    wall: float,
    *,
    l1_pages: int,
    l2_pages: int,
    l3_pages: int,
    page_bytes: int,
) -> ReplayReport:
    ps = settings.page_size
    counters = driver.counters
    total_pages = sum(c.pages for c in counters)
    hit = {lvl: sum(getattr(c, lvl) for c in counters) for lvl in ("l1", "l2", "l3")}

    def gbps(nbytes: int) -> float:
        return nbytes / wall / 1e9 if wall > 0 else 0.0

    cstats = [c.stats() for c in caches]
    backup_pages = sum(int(s.get("backup_pages", 0)) for s in cstats)
    loaded = sum(int(s.get("loaded_back_pages", 0)) for s in cstats)
    computed = sum(c.computed for c in counters)

    def row(
        name: str,
        level: str,
        medium: str,
        kind: str,
        capacity: int | None,
        hits: int,
        written_pages: int,
        read_pages: int,
    ) -> TierReport:
        return TierReport(
            name=name,
            level=level,
            medium=medium,
            kind=kind,
            capacity_pages=capacity,
            hit_pages=hits,
            hit_tokens=hits * ps,
            hit_ratio=hits / total_pages,
            bytes_written=written_pages * page_bytes,
            bytes_read=read_pages * page_bytes,
            write_gbps=gbps(written_pages * page_bytes),
            read_gbps=gbps(read_pages * page_bytes),
        )

    n = len(caches)
    tier_rows = [
        row("device", "L1", "GPU", "device pool", l1_pages * n, hit["l1"], computed, 0),
        row("host", "L2", "CPU_PINNED", "host pool", l2_pages * n, hit["l2"], backup_pages, loaded),
    ]
    tier_counters: dict[str, dict[str, int | float | str | bool]] = {}
    l3_hit_remaining = hit["l3"]
    for i, tier in enumerate(tiers):
        st = tier.stats.as_dict()
        tier_counters[tier.name] = {
            k: v for k, v in st.items() if isinstance(v, int | float | str | bool)
        }
        stored = int(st.get("put_stored", 0))
        read = int(st.get("get_ok", 0))
        tier_hits = int(st.get("hit_pages", 0)) if len(tiers) > 1 else l3_hit_remaining
        tier_hits = min(tier_hits, l3_hit_remaining) if i == len(tiers) - 1 else tier_hits
        capacity = l3_pages if settings.config is None else None
        kind = config.storage.tiers[tier.name].backend
        tier_rows.append(row(tier.name, "L3", tier.medium, kind, capacity, tier_hits, stored, read))
        l3_hit_remaining -= tier_hits

    sim = simulate_hierarchy(
        chains,
        l1_pages * len(caches),
        l2_pages * len(caches),
        l3_pages if settings.config is None else None,
        min_prefetch=max(1, -(-config.storage.prefetch.threshold_tokens // ps)),
    )
    largest = l3_pages
    overall_hits = hit["l1"] + hit["l2"] + hit["l3"]
    overall = OverallReport(
        prompt_pages=total_pages,
        prompt_tokens=total_pages * ps,
        hit_pages=overall_hits,
        hit_ratio=overall_hits / total_pages,
        same_policy_sim_ratio=sim.overall_ratio,
        same_policy_sim_levels={
            "L1": sim.ratio("l1"),
            "L2": sim.ratio("l2"),
            "L3": sim.ratio("l3"),
        },
        lru_ratio_largest_tier=simulate_lru(chains, largest).hit_ratio,
        min_ratio_largest_tier=simulate_min(chains, largest).hit_ratio,
        infinite_ratio=simulate_infinite(chains).hit_ratio,
        largest_tier_capacity_pages=largest,
    )
    ev: dict[str, dict[str, int]] = {}
    for (kind, medium), n in sorted(events.items()):
        ev.setdefault(kind, {})[medium] = n
    engine = [s.get("storage", {}) for s in cstats]
    drops = sum(int(e.get("publish_dropped_pages", e.get("dropped_pages", 0))) for e in engine)
    failures = sum(int(v.get("put_failed", 0)) for v in tier_counters.values())
    outcomes: Counter[str] = Counter()
    for s in cstats:
        outcomes["prefetches"] += int(s.get("prefetches", 0))
        outcomes["prefetched_pages"] += int(s.get("prefetched_pages", 0))
        outcomes["discarded_pages"] += int(s.get("prefetch_discarded_pages", 0))
    return ReplayReport(
        scaling=ScalingReport(
            trace=str(settings.trace or default_trace_path()),
            requests=len(requests),
            trace_block_tokens=TRACE_BLOCK_TOKENS,
            block_tokens=settings.block_tokens,
            page_size=ps,
            pages_per_block=settings.block_tokens // ps,
            partial_blocks="every block id expands to a full block (the partial tail of a "
            "prompt counts as a whole block, as in the trace's hash_ids)",
            model={
                "name": config.model.name,
                "num_layers": config.model.num_layers,
                "num_kv_heads": config.model.num_kv_heads,
                "head_dim": config.model.head_dim,
                "dtype": config.model.dtype,
            },
            page_bytes=page_bytes,
            device_pages=l1_pages,
            host_pages=l2_pages,
            instances=len(caches),
        ),
        tiers=tier_rows,
        overall=overall,
        throughput=ThroughputReport(
            wall_seconds=wall,
            requests_per_second=len(requests) / wall,
            tokens_per_second=total_pages * ps / wall,
        ),
        events=ev,
        storage=StorageReport(
            backup_failures=failures,
            publish_drops=drops,
            prefetch_outcomes=dict(outcomes),
            tier_counters=tier_counters,
        ),
        verification=VerificationReport(
            pages_verified=sum(c.verified for c in counters),
            mismatches=sum(c.mismatches for c in counters),
        ),
        instances=[
            InstanceReport(
                index=i,
                requests=c.requests,
                hit_pages=c.l1 + c.l2 + c.l3,
                pages_from_other_instances=c.from_other,
            )
            for i, c in enumerate(counters)
        ],
    )


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "replay",
        help="replay a production trace through the whole hierarchy",
        description=__doc__,
    )
    p.add_argument("trace", nargs="?", type=Path, help="JSONL trace (default: shipped Mooncake)")
    p.add_argument("--config", type=Path, help="YAML config (default: embedded local-disk L3)")
    p.add_argument("--limit", type=int, default=0, help="first N requests (default 0 = all)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--block-tokens", type=int, help="tokens per trace block (default: page size)")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument(
        "--l1-fraction",
        type=float,
        default=0.01,
        help="L1 pages as a fraction of the distinct pages replayed",
    )
    p.add_argument("--l2-fraction", type=float, default=0.025)
    p.add_argument("--l3-fraction", type=float, default=0.05)
    p.add_argument("--instances", type=int, default=1, choices=(1, 2))
    p.add_argument("--data-dir", type=Path, default=Path("hicache-data"))
    p.add_argument("--keep-storage", action="store_true")
    p.add_argument("--json", type=Path, help="write the report as JSON to this file")
    p.add_argument("--plot", type=Path, help="hit ratio per tier over trace time, as PNG")
    p.add_argument(
        "--sync-publish",
        action="store_true",
        help="finish each request's publishes before the next request (exactly the "
        "block simulation's order; slower)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus /metrics on this port while the replay runs (0: a free port; "
        "needs hicache[metrics])",
    )
    p.add_argument(
        "--metrics-addr", default="127.0.0.1", help="address /metrics binds (default 127.0.0.1)"
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--print-schema", action="store_true", help="print the JSON schema and exit")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.print_schema:
        print(json.dumps(ReplayReport.model_json_schema(), indent=2))
        return 0
    settings = ReplaySettings(
        trace=args.trace,
        config=args.config,
        limit=args.limit or None,
        page_size=args.page_size,
        block_tokens=args.block_tokens or 0,
        num_layers=args.num_layers,
        num_kv_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        l1_fraction=args.l1_fraction,
        l2_fraction=args.l2_fraction,
        l3_fraction=args.l3_fraction,
        instances=args.instances,
        data_dir=args.data_dir,
        keep_storage=args.keep_storage,
        progress=not args.no_progress,
        sync_publish=args.sync_publish,
        metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr,
    )

    def started(_caches: Sequence[HiRadixCache], url: str | None) -> None:
        if url is not None:
            print(f"serving Prometheus metrics at {url}", file=sys.stderr, flush=True)

    report, timeline = run_replay(settings, ReplayHooks(started=started))
    print_report(report)
    if args.json:
        args.json.write_text(report.model_dump_json(indent=2))
    if args.plot:
        from hicache.replay.plot import plot_hits

        plot_hits(timeline, args.plot)
        print(f"plot written to {args.plot}")
    return 0
