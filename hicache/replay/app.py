"""``hicache replay``: replay a trace through the whole hierarchy and report per-tier hit ratios,
references (same-policy simulation, LRU, Belady's MIN), throughput, events and storage outcomes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hicache.config import HicacheConfig, load_config
from hicache.replay.build import ReplayRun, build_report
from hicache.replay.models import (
    DEFAULT_MFU,
    MODEL_PRESETS,
    GpuClass,
    ModelShape,
    resolve_gpu,
    resolve_model,
)
from hicache.replay.plan import (
    CAPACITY_OPTIONS,
    SCALED_PAGE_TOKENS,
    ByteMode,
    ReplayPlan,
    SizeRequest,
    plan_replay,
)
from hicache.replay.report import ReplayReport
from hicache.replay.timing import calibrate_tier
from hicache.replay.trace import TraceRequest, load_trace

if TYPE_CHECKING:
    from hicache.hiradix import HiRadixCache

__all__ = [
    "DEFAULT_PREFETCH_AHEAD",
    "ReplayHooks",
    "ReplaySettings",
    "default_config",
    "run_replay",
]

logger = logging.getLogger(__name__)

#: Requests waiting (their prefetch running) while one is served, as in a busy scheduler's
#: waiting queue. With one, the read of the next request often had not finished when its turn
#: came (a request is served in ~2 ms of Python, and the read's threads get the GIL only when
#: the serving thread lets go of it); with four, about 1 in 70 (session 10, --limit 6000).
DEFAULT_PREFETCH_AHEAD = 4


@dataclass(slots=True)
class ReplaySettings:
    """Every knob of one replay. Sizes in bytes of the real model; ``None`` = not given (then
    the fractions, the config, or the defaults of :mod:`hicache.replay.plan` decide)."""

    trace: Path | None = None
    config: Path | None = None
    limit: int | None = None
    #: a preset of :mod:`hicache.replay.models` or a Hugging Face config.json; None = the
    #: config's model (with --config) or llama-3-8b
    model: str | None = None
    gpu: str = "h100"
    #: the model's tokens per page (a config's cache.page_size wins)
    page_size: int = 16
    #: the stand-in page of scaled mode
    num_layers: int = 2
    num_kv_heads: int = 2
    head_dim: int = 32
    l1: int | None = None
    l2: int | None = None
    l3: dict[str, int] = field(default_factory=dict)
    l1_fraction: float | None = None
    l2_fraction: float | None = None
    l3_fraction: float | None = None
    bytes_mode: ByteMode = ByteMode.AUTO
    prefill_tokens_per_s: float | None = None
    mfu: float = DEFAULT_MFU
    speed: float | None = None
    calibrate: bool = True
    instances: int = 1
    data_dir: Path = Path("hicache-data")
    keep_storage: bool = False
    progress: bool = True
    sync_publish: bool = False
    #: Requests whose prefetch starts while an earlier one is served (0: one at a time).
    prefetch_ahead: int = DEFAULT_PREFETCH_AHEAD
    #: The embedded L3 tier's ``options.eviction`` (None: the backend's default)
    eviction: str | None = None
    #: Serve Prometheus ``/metrics`` on this port while the replay runs (0: a free port).
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"

    @property
    def scaled_page_bytes(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * SCALED_PAGE_TOKENS * 2


@dataclass(frozen=True, slots=True)
class ReplayHooks:
    """Callbacks into a running replay (for tools and tests that watch it from outside)."""

    #: The caches are built, nothing replayed yet; the ``/metrics`` URL when metrics are served.
    started: Callable[[Sequence[HiRadixCache], str | None], None] | None = None
    #: Request ``i`` (0-based) is done and its events are taken (and published).
    request_done: Callable[[int], None] | None = None
    #: Everything is replayed and drained, the last events taken; the caches are still open.
    finished: Callable[[Sequence[HiRadixCache]], None] | None = None


def default_config(settings: ReplaySettings, root: Path) -> HicacheConfig:
    """The embedded default: one local-disk L3 tier under ``root`` (sized by the plan)."""
    data: dict[str, Any] = dict(
        cache={"page_size": settings.page_size, "device": "cpu"},
        model={"name": "replay/model", "revision": "v1"},
        storage={
            "prefetch": {"policy": "wait_complete", "threshold_tokens": settings.page_size},
            "tiers": {
                "disk": {
                    "backend": "localdisk",
                    "medium": "DISK",
                    "options": {
                        "root": str(root),
                        "durability": "none",
                        "shared": settings.instances > 1,
                        **({"eviction": settings.eviction} if settings.eviction else {}),
                    },
                }
            },
        },
    )
    return HicacheConfig(**data)


def _model_of(settings: ReplaySettings, config: HicacheConfig) -> ModelShape:
    if settings.model is not None:
        return resolve_model(settings.model)
    if settings.config is None:
        return MODEL_PRESETS["llama-3-8b"]
    m = config.model
    for preset in MODEL_PRESETS.values():
        same = (preset.num_layers, preset.num_kv_heads, preset.head_dim, preset.mla)
        if preset.hf_id == m.name and same == (m.num_layers, m.num_kv_heads, m.head_dim, m.mla):
            return preset
    # a shape without a preset: no parameter count, so no prefill estimate unless given
    return ModelShape(
        m.name, m.name, m.num_layers, m.num_kv_heads, m.head_dim, m.dtype, m.mla, 0.0, 0.0
    )


def _sized_config(config: HicacheConfig, plan: ReplayPlan, root: Path | None) -> HicacheConfig:
    """The config with every bounded tier holding exactly its planned pages as moved."""
    data = config.model_dump(mode="json")
    for name, cap in plan.l3.items():
        options = data["storage"]["tiers"][name]["options"]
        if root is not None and "root" in options:
            options["root"] = str(root)
        if cap is None:
            continue
        opt = next((o for o in CAPACITY_OPTIONS if options.get(o) is not None), None)
        if opt is None:
            kind = data["storage"]["tiers"][name]["backend"]
            opt = "max_bytes" if kind == "localdisk" else "capacity"
        options[opt] = plan.tier_option_bytes(cap.pages)
    return HicacheConfig(**data)


def replay_inputs(
    settings: ReplaySettings,
) -> tuple[list[TraceRequest], HicacheConfig, ModelShape, GpuClass]:
    """What a replay and its sweep start from: the trace's requests, the configuration (the
    given file, or the default one), the model shape and the GPU class."""
    requests = load_trace(settings.trace, settings.limit)
    if not requests:
        raise ValueError("the trace has no requests")
    base = (
        load_config(settings.config)
        if settings.config
        else default_config(settings, settings.data_dir)
    )
    return requests, base, _model_of(settings, base), resolve_gpu(settings.gpu)


def run_replay(
    settings: ReplaySettings, hooks: ReplayHooks | None = None
) -> tuple[ReplayReport, list[tuple[int, int, int, int, int]]]:
    """Replay; return the report and a timeline of ``(timestamp_ms, pages, l1, l2, l3)`` per
    request. Raises ``DoesNotFit`` before allocating anything when the run cannot fit this
    machine, and ``ReplayError`` on a verification failure.

    With ``events.publisher`` in the configuration, the (single) instance publishes its events
    after every request; with ``settings.metrics_port``, ``/metrics`` is served meanwhile.
    """
    requests, base, model, gpu = replay_inputs(settings)
    plan = plan_replay(
        model=model,
        gpu=gpu,
        config=base,
        config_given=settings.config is not None,
        sizes=SizeRequest(
            settings.l1,
            settings.l2,
            settings.l3,
            settings.l1_fraction,
            settings.l2_fraction,
            settings.l3_fraction,
        ),
        mode=settings.bytes_mode,
        real_page_size=base.cache.page_size,
        scaled_page_bytes=settings.scaled_page_bytes,
        distinct_blocks=len({b for r in requests for b in r.block_ids}),
        longest_blocks=max(len(r.block_ids) for r in requests),
        instances=settings.instances,
    )
    return _run_planned(settings, requests, base, plan, gpu, hooks)


def _run_planned(
    settings: ReplaySettings,
    requests: list[TraceRequest],
    base: HicacheConfig,
    plan: ReplayPlan,
    gpu: GpuClass,
    hooks: ReplayHooks | None,
) -> tuple[ReplayReport, list[tuple[int, int, int, int, int]]]:
    import torch

    from hicache.event_publisher import publisher_from_config
    from hicache.hiradix import HiRadixCache
    from hicache.keys import ModelIdentity, NamespaceSpec
    from hicache.pools import DevicePool, HostPool, KVLayout
    from hicache.replay.runner import TraceDriver
    from hicache.tiering.tiers import Tiers
    from hicache.transfer import CpuTransferEngine

    # Pages here are small: torch's intra-op threads only spin against each other (and against
    # the storage workers) on a small machine, making each copy ~100x slower.
    torch.set_num_threads(1)
    ppb = plan.pages_per_block
    chains = _chains(requests, ppb)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="replay-", dir=settings.data_dir))
    config = _sized_config(base, plan, None if settings.config else root)
    model = plan.model
    if plan.mode is ByteMode.REAL:
        layout = KVLayout(
            model.num_layers,
            model.num_kv_heads,
            model.head_dim,
            plan.page_size,
            getattr(torch, model.dtype),
            mla=model.mla,
        )
    else:
        layout = KVLayout(
            settings.num_layers,
            settings.num_kv_heads,
            settings.head_dim,
            plan.page_size,
            torch.float16,
        )
    namespace = layout.namespace_spec().namespace()
    m = config.model
    if config.events.publisher is not None and settings.instances > 1:
        raise ValueError("events.publisher: the replay publishes events of one instance only")
    caches: list[HiRadixCache] = []
    tiers = None
    metrics_server: Any = None
    try:
        calibrations = []
        if settings.calibrate:
            spec = NamespaceSpec(
                model.dtype,
                model.num_layers,
                model.num_kv_heads,
                model.head_dim,
                plan.real_page_size,
                layout="calibration",
            )
            for name in config.storage.tiers:
                cal = calibrate_tier(
                    config, name, model.page_bytes(plan.real_page_size), spec.namespace()
                )
                if cal is not None:
                    calibrations.append(cal)
        tiers = Tiers.from_config(config, namespace, page_bytes=layout.page_bytes)
        for _ in range(settings.instances):
            dev = DevicePool(layout, plan.l1.pages, "cpu")
            host = HostPool(layout, plan.l2.pages, pin=False)
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
                block_tokens=plan.block_tokens,
                on_request=on_request,
                sync_publish=settings.sync_publish,
                prefetch_ahead=settings.prefetch_ahead,
            )
            driver.run(requests)
            driver.drain()
        wall = time.perf_counter() - started
        if hooks is not None and hooks.finished is not None:
            hooks.finished(caches)
        events: Counter[tuple[str, str]] = driver.events
        report = build_report(
            ReplayRun(
                settings=settings,
                config=config,
                plan=plan,
                gpu=gpu,
                requests=requests,
                chains=chains,
                counters=driver.counters,
                cache_stats=[c.stats() for c in caches],
                tier_stats=[(t.name, t.medium, t.stats.as_dict()) for t in tiers],
                l3_batch=min((t.max_batch for t in tiers), default=None),
                events=events,
                wall=wall,
                calibrations=calibrations,
            )
        )
    finally:
        for cache in caches:
            cache.close()
        if tiers is not None and not caches:
            tiers.close()
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        if not settings.keep_storage:
            remove_storage(root, settings.progress)
    timeline = _timeline(requests, driver)
    return report, timeline


def _serve_metrics(caches: list[HiRadixCache], settings: ReplaySettings) -> tuple[str, Any]:
    from prometheus_client import CollectorRegistry

    from hicache.metrics import HicacheCollector, serve_metrics

    registry = CollectorRegistry(auto_describe=False)
    registry.register(HicacheCollector(caches))
    assert settings.metrics_port is not None
    return serve_metrics(registry, settings.metrics_port, settings.metrics_addr)


def _chains(requests: list[TraceRequest], pages_per_block: int) -> list[list[int]]:
    if pages_per_block == 1:
        return [list(r.block_ids) for r in requests]
    # a block spanning several pages: page j of block b is the pair (b, j), flattened
    return [
        [b * pages_per_block + j for b in r.block_ids for j in range(pages_per_block)]
        for r in requests
    ]


def _timeline(requests: list[TraceRequest], driver: Any) -> list[tuple[int, int, int, int, int]]:
    rows = []
    iters = [iter(c.per_request) for c in driver.counters]
    for i, req in enumerate(requests):
        pages, l1, l2, l3 = next(iters[i % len(iters)])
        rows.append((req.timestamp_ms, pages, l1, l2, l3))
    return rows


#: Threads that unlink the replay's storage files: each unlink waits on the filesystem (journal,
#: discard), not on a core, so they overlap even on a 2-core machine.
_REMOVERS = 8


def remove_storage(root: Path, progress: bool = False) -> None:
    """Delete a replay's storage directory, one thread per directory at a time (of
    ``_REMOVERS``), with a progress bar when asked. ``shutil.rmtree`` alone took ~20 s for the
    default replay's ~16k files, part of the wall time of ``make run``."""
    dirs = [d for d, _, _ in os.walk(root)]
    with (
        ThreadPoolExecutor(_REMOVERS, thread_name_prefix="replay-rm") as pool,
        _progress(progress, len(dirs), "removing the replay's storage") as advance,
    ):
        for _ in pool.map(_remove_files, dirs):
            advance()
    shutil.rmtree(root, ignore_errors=True)  # the directories, empty by now


def _remove_files(directory: str) -> None:
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            # what stays, rmtree below tries again (and ignores, as it always did here)
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


class _progress:
    """A rich progress bar when asked (and a no-op otherwise)."""

    def __init__(self, enabled: bool, total: int, what: str = "replaying") -> None:
        self.enabled = enabled
        self.total = total
        self.what = what
        self._bar: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        self._bar = Progress(transient=True)
        self._bar.start()
        task = self._bar.add_task(self.what, total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
