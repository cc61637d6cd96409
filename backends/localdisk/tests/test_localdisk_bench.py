"""The bench hooks: the raw file baseline and the page-cache drop work through the harness."""

from __future__ import annotations

from pathlib import Path

from hicache_localdisk import LocalDiskBackend, LocalDiskConfig
from hicache_localdisk.raw import FileBaseline

from hicache.storage import BackendContext
from hicache.tools.benchmark import BenchSpec, run_storage_bench


def test_bench_quick_run_measures_every_figure_against_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    config = LocalDiskConfig(root=root, max_bytes="64MiB", durability="fsync")

    def make_backend(page_bytes: int, namespace: str) -> LocalDiskBackend:
        return LocalDiskBackend(config, BackendContext(page_bytes=page_bytes, namespace=namespace))

    def make_baseline(backend: object) -> FileBaseline:
        assert isinstance(backend, LocalDiskBackend)
        baseline = LocalDiskBackend.bench_baseline(backend.config, backend.context)
        assert isinstance(baseline, FileBaseline)
        return baseline

    spec = BenchSpec(
        page_bytes=(64 << 10,),
        total_bytes=1 << 20,
        threads=(1, 2),
        min_exists_keys=64,
        repeat=2,  # round 1 measures the raw side first, in the same directories
    )
    report = run_storage_bench(
        make_backend=make_backend,
        make_baseline=make_baseline,
        spec=spec,
        tier="disk",
        backend_kind="localdisk",
    )
    assert "rename" in report.baseline
    assert len(report.runs) == 2
    for run in report.runs:
        assert run.problems == {}
        figures = {f.name: f for f in run.figures}
        for name in ("put", "get_cold", "get_hot", "exists", "exists_prefix"):
            assert figures[name].value is not None and figures[name].value > 0, name
            assert figures[name].ratio is not None and figures[name].ratio > 0, name
    # Both sides cleaned up after every round: no page, no raw file, no namespace directory.
    assert list(root.iterdir()) == []
