"""``hicache bench storage|eviction``: quick mode produces every figure and every ratio."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import pytest

from hicache.storage.backend import BackendConfig, BackendContext
from hicache.storage.baseline import RawBaseline
from hicache.storage.memory import MemoryBackend, MemoryConfig
from hicache.tools.benchmark import (
    FIGURES,
    BenchReport,
    BenchSpec,
    Figure,
    MemcpyBaseline,
    percentile,
    planned_units,
    run_storage_bench,
)

ROOT = Path(__file__).resolve().parents[1]
MEMORY_YAML = ROOT / "configs" / "memory.yaml"
FIGURE_NAMES = [name for name, _, _ in FIGURES]


def test_percentile_nearest_rank() -> None:
    samples = [float(x) for x in range(1, 101)]
    assert percentile(samples, 50) == 50.0
    assert percentile(samples, 99) == 99.0
    assert percentile(samples, 100) == 100.0
    assert percentile([3.0], 99) == 3.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_figure_ratio_direction() -> None:
    assert Figure("put", "GB/s", 2.0, 4.0).ratio == 0.5
    assert Figure("put_p50", "ms", 4.0, 1.0, higher_is_better=False).ratio == 0.25
    assert Figure("get_cold", "GB/s", None, None).ratio is None


class CountingBaseline(MemcpyBaseline):
    """A pluggable baseline that can drop its 'cache' and counts what the harness did."""

    name: ClassVar[str] = "counting memcpy"
    calls: ClassVar[dict[str, int]] = {}

    def put(self, indices: Sequence[int], srcs: Sequence[memoryview]) -> None:
        self.calls["put"] = self.calls.get("put", 0) + len(indices)
        super().put(indices, srcs)

    def get(self, indices: Sequence[int], dsts: Sequence[memoryview]) -> None:
        self.calls["get"] = self.calls.get("get", 0) + len(indices)
        super().get(indices, dsts)

    def drop_cache(self) -> bool:
        return True


class DroppingMemoryBackend(MemoryBackend):
    """MemoryBackend with both bench hooks, as a disk backend would have them."""

    dropped: ClassVar[int] = 0

    @classmethod
    def bench_baseline(cls, config: BackendConfig, context: BackendContext) -> RawBaseline:
        assert isinstance(config, MemoryConfig)
        return CountingBaseline()

    def drop_page_cache(self) -> bool:
        type(self).dropped += 1
        return True


def _bench(kind: type[MemoryBackend], spec: BenchSpec) -> tuple[BenchReport, list[int]]:
    """Run the harness over memory backends of class ``kind``; return the report and the
    progress units it reported."""
    from hicache.tools.bench import _baseline_for

    done: list[int] = []
    report = run_storage_bench(
        make_backend=lambda pb, ns: kind(
            MemoryConfig(), BackendContext(page_bytes=pb, namespace=ns)
        ),
        make_baseline=_baseline_for,
        spec=spec,
        tier="t",
        backend_kind="memory",
        progress=done.append,
    )
    return report, done


def test_harness_uses_hooks_and_measures_cold_reads() -> None:

    CountingBaseline.calls = {}
    DroppingMemoryBackend.dropped = 0
    spec = BenchSpec(page_bytes=(16384,), total_bytes=16384 * 12, threads=(1, 3), batch=2)
    report, done = _bench(DroppingMemoryBackend, spec)
    assert report.baseline == "counting memcpy"
    assert [(r.threads, r.num_pages) for r in report.runs] == [(1, 12), (3, 12)]
    assert DroppingMemoryBackend.dropped == 2
    # Per pair the baseline wrote 12 pages and read them twice (cold and hot).
    assert CountingBaseline.calls == {"put": 24, "get": 48}
    assert sum(done) == planned_units(spec)
    for run in report.runs:
        assert [f.name for f in run.figures] == FIGURE_NAMES
        for fig in run.figures:
            assert fig.value is not None and fig.value > 0, fig
            assert fig.limit is not None and fig.limit > 0, fig
            assert fig.ratio is not None and fig.ratio > 0, fig
        assert run.problems == {}


class OrderBaseline(MemcpyBaseline):
    """Records when each side of a round starts (see OrderBackend)."""

    log: ClassVar[list[str]] = []

    def setup(self, page_bytes: int, num_pages: int) -> None:
        self.log.append("raw")
        super().setup(page_bytes, num_pages)


class OrderBackend(MemoryBackend):
    @classmethod
    def bench_baseline(cls, config: BackendConfig, context: BackendContext) -> RawBaseline:
        return OrderBaseline()

    def drop_page_cache(self) -> bool:
        return False  # memcpy has no page cache to drop

    def _open(self) -> None:
        OrderBaseline.log.append("ours")
        super()._open()


def test_repeat_alternates_sides_and_reports_median_ratios() -> None:

    OrderBaseline.log = []
    spec = BenchSpec(page_bytes=(16384,), total_bytes=16384 * 8, threads=(2,), repeat=3)
    report, done = _bench(OrderBackend, spec)
    # Round 0 measures the backend first, round 1 the raw side first, round 2 the backend.
    assert OrderBaseline.log == ["ours", "raw", "raw", "ours", "ours", "raw"]
    assert sum(done) == planned_units(spec)
    (run,) = report.runs
    assert run.rounds == 3 and run.pages_read == 8
    for fig in run.figures:
        if fig.name.startswith("get_cold"):  # memcpy has no page cache to drop
            assert fig.ratio is None and fig.round_ratios == ()
            continue
        assert len(fig.round_ratios) == 3, fig
        assert fig.ratio == sorted(fig.round_ratios)[1], fig
        assert fig.best_ratio is not None and fig.best_ratio > 0, fig
    doc = report.to_json()["runs"][0]
    assert doc["rounds"] == 3 and len(doc["figures"]["put"]["round_ratios"]) == 3


class SettleBaseline(OrderBaseline):
    """Also records the settle hook (a server returning freed memory, for valkey)."""

    def settle(self) -> None:
        self.log.append("settle")


class SettleBackend(OrderBackend):
    @classmethod
    def bench_baseline(cls, config: BackendConfig, context: BackendContext) -> RawBaseline:
        return SettleBaseline()


def test_baseline_settles_the_service_before_either_side() -> None:
    OrderBaseline.log = []
    spec = BenchSpec(page_bytes=(16384,), total_bytes=16384 * 4, threads=(1,), repeat=2)
    _bench(SettleBackend, spec)
    # Both sides alike: the backend opens right after a settle, and the raw side settles right
    # after its (untimed) setup, before its first timed call.
    assert OrderBaseline.log == [
        *("settle", "ours", "raw", "settle"),  # round 0: the backend first
        *("raw", "settle", "settle", "ours"),  # round 1: the raw side first
    ]


def test_repeat_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    from hicache.tools.bench import main

    assert main(["storage", "--config", str(MEMORY_YAML), "--repeat", "0"]) == 2
    assert "bad benchmark options: repeat must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch must be >= 1, got 0"):
        BenchSpec(batch=0)


def _check_report(doc: dict[str, object], *, cold: bool) -> None:
    runs = doc["runs"]
    assert isinstance(runs, list)
    # Quick mode: two page sizes x two thread counts.
    assert sorted((r["page_bytes"], r["threads"]) for r in runs) == [
        (16384, 1),
        (16384, 2),
        (65536, 1),
        (65536, 2),
    ]
    for run in runs:
        figures = run["figures"]
        assert list(figures) == FIGURE_NAMES
        for name, fig in figures.items():
            if name.startswith("get_cold") and not cold:
                assert fig["value"] is None and fig["ratio"] is None
                continue
            assert fig["value"] > 0 and fig["limit"] > 0 and fig["ratio"] > 0, (name, fig)
        assert run["problems"] == {}


def test_cli_quick_json_on_memory_config() -> None:
    pytest.importorskip("hicache.config")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hicache.tools.bench",
            "storage",
            "--config",
            str(MEMORY_YAML),
            "--quick",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["backend"] == "memory"
    assert doc["baseline"] == MemcpyBaseline.name
    _check_report(doc, cold=False)


def test_cli_quick_text_on_memory_config(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("hicache.config")
    from hicache.tools.bench import main

    assert main(["storage", "--config", str(MEMORY_YAML), "--quick", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "limit: memcpy" in out
    assert out.count("\npage ") == 2  # two page sizes, one thread count
    for name in FIGURE_NAMES:
        assert out.count(f"\n  {name} ") == 2, name
    assert "get_cold" in out and "n/a" in out  # memory cannot drop a page cache


def test_cli_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("hicache.config")
    from hicache.tools.bench import main

    assert main(["storage", "--config", str(MEMORY_YAML), "--quick", "--tier", "nope"]) == 2
    assert "'nope'" in capsys.readouterr().err


def test_eviction_bench_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from hicache.tools.bench import main

    assert main(["eviction", "--keys", "2000", "--rounds", "20", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)["figures"]
    assert set(figures) == {
        "lru_touch_chain",
        "lru_touch_single",
        "lru_churn",
        "reuse_touch_chain",
        "reuse_touch_single",
        "reuse_churn",
        "reuse_vs_lru_touch_chain",
        "reuse_vs_lru_touch_single",
        "clock_touch",
        "clock_claim",
    }
    for fig in figures.values():
        assert fig["value"] > 0 and fig["limit"] > 0 and fig["ratio"] > 0


def test_radix_subcommand_delegates_or_explains(capsys: pytest.CaptureFixture[str]) -> None:
    from hicache.tools.bench import main

    with pytest.raises(SystemExit) as info:
        main(["radix", "--help"])
    assert info.value.code == 0
    assert "hicache bench radix" in capsys.readouterr().out


def test_radix_subcommand_without_its_module_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hicache.tools.bench import main

    # A None entry in sys.modules makes the import fail, as on an install without the module.
    monkeypatch.setitem(sys.modules, "hicache.tools.radix_bench", None)
    assert main(["radix"]) == 2
    assert "hicache bench radix is not available" in capsys.readouterr().err


def test_tier_smaller_than_the_run_reads_what_it_kept() -> None:
    from hicache.tools.bench import _baseline_for, format_report

    page = 16384
    spec = BenchSpec(page_bytes=(page,), total_bytes=page * 40, threads=(2,))
    report = run_storage_bench(
        make_backend=lambda pb, ns: MemoryBackend(
            # Room for 10 pages with their 4 KiB headers: the other 30 are evicted by the puts.
            MemoryConfig(capacity=10 * (page + 4096)),
            BackendContext(page_bytes=pb, namespace=ns),
        ),
        make_baseline=_baseline_for,
        spec=spec,
        tier="small",
        backend_kind="memory",
    )
    (run,) = report.runs
    assert (run.num_pages, run.pages_read) == (40, 10)
    assert run.problems == {}  # no reads of evicted pages were attempted
    for fig in run.figures:
        if not fig.name.startswith("get_cold"):
            assert fig.ratio is not None and fig.ratio > 0, fig
    assert "only 10 pages were still stored" in format_report(report)
