"""The storage benchmark harness on the S3 tier with its raw boto3 baseline (tiny sizes).

``hicache bench storage`` runs the same harness; this keeps the S3 hooks from rotting. No timing
is asserted: only that every figure and its limit were measured and nothing is left behind.
"""

from __future__ import annotations

from typing import Any

from hicache_s3 import S3Backend
from hicache_s3.testing import make_s3_backend

from hicache.storage.backend import Backend
from hicache.storage.benchmark import BenchSpec, run_storage_bench


def test_bench_measures_every_figure_against_raw_boto3(s3_options: dict[str, Any], s3: Any) -> None:
    spec = BenchSpec(
        page_bytes=(16384,),
        total_bytes=16384 * 8,
        threads=(2,),
        batch=2,
        exists_batch=8,
        min_exists_keys=16,
    )

    def make_backend(page_bytes: int, namespace: str) -> Backend:
        return make_s3_backend(s3_options, namespace=namespace, page_bytes=page_bytes)

    def make_baseline(backend: Backend) -> Any:
        return S3Backend.bench_baseline(backend.config, backend.context)

    report = run_storage_bench(
        make_backend=make_backend,
        make_baseline=make_baseline,
        spec=spec,
        tier="s3",
        backend_kind="s3",
    )
    assert "boto3" in report.baseline
    [run] = report.runs
    assert run.pages_read == run.num_pages == 8 and not run.problems
    for figure in run.figures:
        assert figure.value is not None and figure.value > 0, figure
        assert figure.limit is not None and figure.limit > 0, figure
    # the backend deleted its pages and the baseline removed its scratch objects
    assert s3.list_objects_v2(Bucket=s3_options["bucket"]).get("KeyCount") == 0
