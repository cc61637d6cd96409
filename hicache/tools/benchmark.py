"""The generic storage benchmark: a backend's figures next to the machine's own limits.

- :class:`MemcpyBaseline`   the default: memcpy into / out of preallocated bytearrays
- :class:`BenchSpec`        page sizes, total bytes, thread counts, batch size
- :func:`run_storage_bench` run every (page size, thread count) pair; return a :class:`BenchReport`

For each pair the harness writes ``N`` fresh pages, drops the page cache (when the backend can),
reads them back cold, reads them again hot, then asks ``exists`` and ``exists_prefix`` about all
of them, timing every call. A tier whose capacity is smaller than the run keeps only some pages:
the reads and presence checks then cover the pages still stored after the puts (on both
sides). It then does the same through the raw baseline, with the same split of pages over the
same number of threads and the same batches, so each figure has a limit
measured in the same run, and reports ``ratio``: throughput / limit, or limit latency / latency
(1.0 = as fast as the machine allows with those system calls). Hot gets are also given per CPU
second of the process (``get_hot_cpu``): what each side costs, which a loaded machine's
scheduler does not move the way it moves the wall clock.

With ``repeat`` > 1 every pair is measured that many times, the side measured first
alternating from round to round (a disk's writeback, a neighbour's burst, a cold filesystem
structure otherwise favour whichever side runs second). A figure then reports the median value,
the median limit and the median of the per-round ratios (the paired ratios cancel the drift
between rounds that a ratio of medians would keep), and ``best_ratio``: each side's best round
against the other's best, the figure least touched by interference from outside.

A backend plugs its raw baseline in and makes cold reads possible by implementing
:class:`~hicache.storage.baseline.Benchmarkable` (``bench_baseline`` and ``drop_page_cache``);
it is optional. Nothing here imports torch.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hicache.storage.backend import Backend, PageStatus
from hicache.storage.baseline import Benchmarkable, RawBaseline, ToolLimit
from hicache.tools.bench_phases import (
    Phase,
    Side,
    fill_page,
    measure_side,
    settle,
    side_phases,
)

__all__ = [
    "FIGURES",
    "BenchReport",
    "BenchRun",
    "BenchSpec",
    "Figure",
    "MemcpyBaseline",
    "percentile",
    "planned_units",
    "run_storage_bench",
]

GB = 1e9


class MemcpyBaseline(RawBaseline):
    """memcpy into and out of preallocated bytearrays: the limit of any in-memory tier."""

    name: ClassVar[str] = "memcpy into/out of preallocated bytearrays"

    def __init__(self) -> None:
        self._pages: list[bytearray] = []
        self._present = bytearray()

    def setup(self, page_bytes: int, num_pages: int) -> None:
        # Touch every page now so the timed run does not pay first-touch page faults.
        self._pages = [bytearray(b"\x01" * page_bytes) for _ in range(num_pages)]
        self._present = bytearray(num_pages)

    def put(self, indices: Sequence[int], srcs: Sequence[memoryview]) -> None:
        for i, src in zip(indices, srcs, strict=True):
            self._pages[i][:] = src
            self._present[i] = 1

    def get(self, indices: Sequence[int], dsts: Sequence[memoryview]) -> None:
        for i, dst in zip(indices, dsts, strict=True):
            dst[:] = self._pages[i]

    def exists(self, indices: Sequence[int]) -> list[bool]:
        present = self._present
        return [bool(present[i]) for i in indices]

    def teardown(self) -> None:
        self._pages = []
        self._present = bytearray()


@dataclass(frozen=True, slots=True)
class BenchSpec:
    """What to measure."""

    page_bytes: Sequence[int] = (8 << 20, 2 << 20)
    total_bytes: int = 2 << 30
    threads: Sequence[int] = (1, 4)
    #: Pages per put/get call (latencies are per call).
    batch: int = 1
    #: Keys per exists call, and the chain length of each exists_prefix call.
    exists_batch: int = 64
    #: Keys asked about per presence figure (the pages, repeated as needed).
    min_exists_keys: int = 20_000
    #: Rounds per (page size, threads) pair, the side measured first alternating.
    repeat: int = 1

    def __post_init__(self) -> None:
        for name in ("batch", "exists_batch", "min_exists_keys", "repeat"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def num_pages(self, page_bytes: int, threads: int) -> int:
        """Pages written for one (page size, threads) pair: ``total_bytes`` worth, at least one
        batch per thread."""
        return max(threads * self.batch, self.total_bytes // page_bytes)

    def exists_repeats(self, num_pages: int) -> int:
        """Passes of ``exists``/``exists_prefix`` over the pages: at least ``min_exists_keys``."""
        return max(1, -(-self.min_exists_keys // num_pages))


def planned_units(spec: BenchSpec) -> int:
    """Progress units a run reports: pages moved by every timed put/get phase (both sides)."""
    per_pair = 2 * 3 * spec.repeat  # backend + baseline, x (put, cold get, hot get), x rounds
    return sum(per_pair * spec.num_pages(p, t) for p in spec.page_bytes for t in spec.threads)


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured figure and its limit; ``None`` means not measurable here (n/a)."""

    name: str
    unit: str
    value: float | None
    limit: float | None
    #: True for throughputs (ratio = value / limit), False for latencies (ratio = limit / value).
    higher_is_better: bool = True
    #: The ratio of each round when the pair was measured several times (see ``BenchSpec.repeat``).
    round_ratios: tuple[float, ...] = ()
    #: Over several rounds: each side's best round against the other's (what ``timeit`` reports:
    #: interference only ever slows a round down, so the best round is the least disturbed).
    best_ratio: float | None = None

    @property
    def ratio(self) -> float | None:
        """Fraction of the machine's limit achieved (1.0 = at the limit); over several rounds,
        the median of the rounds' ratios."""
        if self.round_ratios:
            return statistics.median(self.round_ratios)
        if self.value is None or self.limit is None or self.value <= 0 or self.limit <= 0:
            return None
        return self.value / self.limit if self.higher_is_better else self.limit / self.value

    def to_json(self) -> dict[str, Any]:
        """Plain data, ratio included."""
        return {
            "name": self.name,
            "unit": self.unit,
            "value": self.value,
            "limit": self.limit,
            "ratio": self.ratio,
            "round_ratios": list(self.round_ratios),
            "best_ratio": self.best_ratio,
        }


#: Every figure a run reports, in display order.
FIGURES: tuple[tuple[str, str, bool], ...] = (
    ("put", "GB/s", True),
    ("get_cold", "GB/s", True),
    ("get_hot", "GB/s", True),
    # Hot get GB per CPU second of the process: what a side costs, whatever share of the cores
    # other work left it (on a loaded machine the wall-clock ratio swings with the scheduler).
    ("get_hot_cpu", "GB/CPU-s", True),
    ("exists", "keys/s", True),
    ("exists_prefix", "keys/s", True),
    ("put_p50", "ms", False),
    ("put_p99", "ms", False),
    ("get_cold_p50", "ms", False),
    ("get_cold_p99", "ms", False),
    ("get_hot_p50", "ms", False),
    ("get_hot_p99", "ms", False),
)


@dataclass(slots=True)
class BenchRun:
    """Figures for one (page size, thread count) pair."""

    page_bytes: int
    threads: int
    num_pages: int
    figures: list[Figure]
    #: Non-OK statuses the backend returned, per phase (e.g. ``{"get_hot": {"not_found": 3}}``).
    problems: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Pages still stored after the puts, which the read and presence phases used (fewer than
    #: ``num_pages`` when the tier's capacity is smaller than the run).
    pages_read: int = 0
    #: Rounds the figures are medians of.
    rounds: int = 1
    #: What the service's own benchmark tool reached in the same rounds (medians).
    tool_limits: list[ToolLimit] = field(default_factory=list)

    def figure(self, name: str) -> Figure:
        """The figure called ``name``."""
        for fig in self.figures:
            if fig.name == name:
                return fig
        raise KeyError(name)


@dataclass(slots=True)
class BenchReport:
    """Everything one ``hicache bench storage`` run measured."""

    tier: str
    backend: str
    baseline: str
    batch: int
    runs: list[BenchRun] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able data."""
        return {
            "tier": self.tier,
            "backend": self.backend,
            "baseline": self.baseline,
            "batch": self.batch,
            "runs": [
                {
                    "page_bytes": run.page_bytes,
                    "threads": run.threads,
                    "num_pages": run.num_pages,
                    "pages_read": run.pages_read,
                    "rounds": run.rounds,
                    "figures": {fig.name: fig.to_json() for fig in run.figures},
                    "problems": run.problems,
                    "tool_limits": [
                        {"name": t.name, "figure": t.figure, "gbps": t.gbps, "note": t.note}
                        for t in run.tool_limits
                    ],
                }
                for run in self.runs
            ],
        }


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``samples`` by the nearest-rank method."""
    if not samples:
        raise ValueError("percentile of no samples")
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _figures(page_bytes: int, ours: Side, raw: Side) -> list[Figure]:
    def gbps(phase: Phase | None) -> float | None:
        if phase is None or not phase.units:
            return None
        return phase.units * page_bytes / phase.seconds / GB

    def cpu_gbps(phase: Phase | None) -> float | None:
        if phase is None or not phase.units:
            return None
        return phase.units * page_bytes / max(phase.cpu_seconds, 1e-9) / GB

    def keys_s(phase: Phase | None) -> float | None:
        return None if phase is None or not phase.units else phase.units / phase.seconds

    def ms(phase: Phase | None, q: float) -> float | None:
        return (
            None if phase is None or not phase.latencies else percentile(phase.latencies, q) * 1e3
        )

    values: dict[str, tuple[float | None, float | None]] = {
        "put": (gbps(ours.put), gbps(raw.put)),
        "get_cold": (gbps(ours.get_cold), gbps(raw.get_cold)),
        "get_hot": (gbps(ours.get_hot), gbps(raw.get_hot)),
        "get_hot_cpu": (cpu_gbps(ours.get_hot), cpu_gbps(raw.get_hot)),
        "exists": (keys_s(ours.exists), keys_s(raw.exists)),
        "exists_prefix": (keys_s(ours.exists_prefix), keys_s(raw.exists_prefix)),
    }
    for phase in ("put", "get_cold", "get_hot"):
        for q in (50, 99):
            values[f"{phase}_p{q}"] = (ms(getattr(ours, phase), q), ms(getattr(raw, phase), q))
    figures = []
    for name, unit, higher in FIGURES:
        value, limit = values[name]
        if value is None or limit is None:  # measured on one side only: not comparable
            value = limit = None
        figures.append(Figure(name, unit, value, limit, higher))
    return figures


def _page_key(namespace: str, index: int) -> str:
    return hashlib.sha256(f"{namespace}/{index}".encode()).hexdigest()


def run_storage_bench(
    *,
    make_backend: Callable[[int, str], Backend],
    make_baseline: Callable[[Backend], RawBaseline],
    spec: BenchSpec,
    tier: str,
    backend_kind: str,
    progress: Callable[[int], None] | None = None,
) -> BenchReport:
    """Measure a backend against its raw baseline for every (page size, threads) pair of ``spec``.

    ``make_backend(page_bytes, namespace)`` returns a fresh, unopened backend for that page size
    and namespace; ``make_baseline(backend)`` its raw baseline. The backend's pages are deleted
    and the baseline torn down after each round.
    """
    report: BenchReport | None = None
    for page_bytes in spec.page_bytes:
        for threads in spec.threads:
            rounds: list[BenchRun] = []
            read: list[int] | None = None
            for r in range(spec.repeat):
                namespace = f"bench-{os.getpid()}-{page_bytes}-{threads}-{r}"
                backend = make_backend(page_bytes, namespace)
                baseline = make_baseline(backend)
                if report is None:
                    report = BenchReport(tier, backend_kind, baseline.name, spec.batch)
                # Odd rounds measure the raw side first, reading the pages the backend kept in
                # the round before (round 0 always measures the backend first to learn them).
                run, read = _run_pair(
                    backend,
                    baseline,
                    page_bytes,
                    threads,
                    namespace,
                    spec,
                    progress,
                    raw_first_reading=read if r % 2 else None,
                )
                rounds.append(run)
            assert report is not None  # set in the first round
            report.runs.append(_combine(rounds))
    if report is None:
        raise ValueError("the bench spec names no page size or thread count")
    return report


def _combine(rounds: list[BenchRun]) -> BenchRun:
    """One run from several rounds of a pair: median value, limit and per-round ratio."""
    if len(rounds) == 1:
        return rounds[0]
    figures: list[Figure] = []
    for i, (name, unit, higher) in enumerate(FIGURES):
        measured = [run.figures[i] for run in rounds]
        ratios = tuple(r for fig in measured if (r := fig.ratio) is not None)
        values = [f.value for f in measured if f.value is not None and f.limit is not None]
        limits = [f.limit for f in measured if f.value is not None and f.limit is not None]
        if not ratios or not values:
            figures.append(Figure(name, unit, None, None, higher))
            continue
        best = max if higher else min
        best_ratio = Figure(name, unit, best(values), best(limits), higher).ratio
        figures.append(
            Figure(
                name,
                unit,
                statistics.median(values),
                statistics.median(limits),
                higher,
                ratios,
                best_ratio,
            )
        )
    problems: dict[str, dict[str, int]] = {}
    for run in rounds:
        for phase, counts in run.problems.items():
            merged = problems.setdefault(phase, {})
            for status, n in counts.items():
                merged[status] = merged.get(status, 0) + n
    tools: list[ToolLimit] = []
    for i, tool in enumerate(rounds[0].tool_limits):
        same = [run.tool_limits[i] for run in rounds if len(run.tool_limits) > i]
        speeds = [t.gbps for t in same if t.gbps is not None]
        gbps = statistics.median(speeds) if speeds else None
        tools.append(ToolLimit(tool.name, tool.figure, gbps, tool.note))
    first = rounds[0]
    return BenchRun(
        first.page_bytes,
        first.threads,
        first.num_pages,
        figures,
        problems,
        min(run.pages_read for run in rounds),
        len(rounds),
        tools,
    )


def _run_pair(
    backend: Backend,
    baseline: RawBaseline,
    page_bytes: int,
    threads: int,
    namespace: str,
    spec: BenchSpec,
    progress: Callable[[int], None] | None,
    *,
    raw_first_reading: list[int] | None = None,
) -> tuple[BenchRun, list[int]]:
    """One round of one pair: both sides, the backend first unless ``raw_first_reading`` (the
    pages the raw side reads back, learnt from an earlier round) is given. Returns the run and
    the pages the backend kept."""
    num_pages = spec.num_pages(page_bytes, threads)
    keys = [_page_key(namespace, i) for i in range(num_pages)]
    srcs: list[list[memoryview]] = []
    dsts: list[list[memoryview]] = []
    for t in range(threads):
        own_src, own_dst = [], []
        for b in range(spec.batch):
            src = bytearray(page_bytes)
            fill_page(src, t * spec.batch + b)
            own_src.append(memoryview(src))
            own_dst.append(memoryview(bytearray(page_bytes)))
        srcs.append(own_src)
        dsts.append(own_dst)

    def our_put(idx: Sequence[int], t: int) -> list[PageStatus]:
        return backend.put([keys[i] for i in idx], srcs[t][: len(idx)])

    def our_get(idx: Sequence[int], t: int) -> list[PageStatus]:
        return backend.get_into([keys[i] for i in idx], dsts[t][: len(idx)])

    def our_exists(idx: Sequence[int], t: int) -> list[PageStatus]:
        found = backend.exists([keys[i] for i in idx])
        return [PageStatus.OK if f else PageStatus.NOT_FOUND for f in found]

    def our_exists_prefix(idx: Sequence[int], t: int) -> list[PageStatus]:
        n = backend.exists_prefix([keys[i] for i in idx])
        return [PageStatus.OK] * n + [PageStatus.NOT_FOUND] * (len(idx) - n)

    def resident() -> list[int]:
        # Untimed: which pages the tier still holds after the puts (capacity may have evicted).
        out: list[int] = []
        for start in range(0, num_pages, 1024):
            flags = backend.exists(keys[start : start + 1024])
            out.extend(start + j for j, present in enumerate(flags) if present)
        return out

    def drop() -> bool:
        return isinstance(backend, Benchmarkable) and backend.drop_page_cache()

    # Both sides run the same phases over the same pages, threads and batches.
    measure = functools.partial(
        measure_side, num_pages=num_pages, threads=threads, spec=spec, progress=progress
    )

    def measure_ours() -> tuple[Side, list[int]]:
        settle()
        baseline.settle()
        backend.open()
        try:
            return measure(
                put=our_put,
                get=our_get,
                exists=our_exists,
                exists_prefix=our_exists_prefix,
                drop_cache=drop,
                readable=resident,
            )
        finally:
            try:
                for start in range(0, num_pages, 256):
                    backend.delete(keys[start : start + 256])
            finally:
                backend.close()

    def raw_put(idx: Sequence[int], t: int) -> None:
        baseline.put(idx, srcs[t][: len(idx)])

    def raw_get(idx: Sequence[int], t: int) -> None:
        baseline.get(idx, dsts[t][: len(idx)])

    def raw_exists(idx: Sequence[int], t: int) -> None:
        baseline.exists(idx)

    def measure_raw(read: list[int]) -> Side:
        baseline.setup(page_bytes, num_pages)
        settle()
        baseline.settle()
        try:
            side, _ = measure(
                put=raw_put,
                get=raw_get,
                exists=raw_exists,
                # The raw limit of a prefix check is a presence check of the same chain.
                exists_prefix=raw_exists,
                drop_cache=baseline.drop_cache,
                readable=lambda: read,  # the same pages the backend read back
            )
        finally:
            baseline.teardown()
        return side

    try:
        if raw_first_reading is not None:
            raw = measure_raw(raw_first_reading)
            ours, read = measure_ours()
        else:
            ours, read = measure_ours()
            raw = measure_raw(read)
        tools = list(baseline.tool_limits(page_bytes, threads, num_pages, spec.batch))
    finally:
        baseline.cleanup()
    problems = {
        name: phase.problems
        for name, phase in side_phases(ours).items()
        if phase is not None and phase.problems
    }
    run = BenchRun(
        page_bytes,
        threads,
        num_pages,
        _figures(page_bytes, ours, raw),
        problems,
        len(read),
        tool_limits=tools,
    )
    return run, read
