"""Tooling on an S3 tier: the storage benchmark with its raw boto3 baseline (tiny sizes) and
the storage operations (du, verify, purge). No timing is asserted anywhere."""

from __future__ import annotations

import json
from typing import Any

from hicache_s3 import S3Backend
from hicache_s3.testing import make_s3_backend

from hicache.storage import Backend
from hicache.tools.benchmark import BenchSpec, run_storage_bench


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


def test_storage_operations_on_an_s3_tier(
    s3_options: dict[str, Any], s3: Any, tmp_path: Any
) -> None:
    """``hicache storage du|verify|purge`` through the contract: listing, planted corruption,
    delete-corrupt and purge, on the real endpoint."""
    from hicache_s3.testing import page_keys, page_payloads

    from hicache.tools.ops import (
        disk_usage,
        list_namespaces,
        purge_namespace,
        tier_handle,
        verify_namespace,
    )

    config = tmp_path / "ops.yaml"  # YAML is a superset of JSON
    config.write_text(
        json.dumps(
            {
                "cache": {"page_size": 4, "device": "cpu", "host_pool": "1MiB"},
                "model": {"name": "t/x", "num_layers": 2, "num_kv_heads": 2, "head_dim": 64},
                "storage": {"tiers": {"s3": {"backend": "s3", "options": s3_options}}},
            }
        )
    )
    keys = page_keys(5, "ops")
    with make_s3_backend(s3_options, namespace="alpha") as alpha:
        assert isinstance(alpha, S3Backend)
        alpha.put(keys, page_payloads(5))
        bad = alpha.object_key(keys[2])
        body = bytearray(s3.get_object(Bucket=alpha.options.bucket, Key=bad)["Body"].read())
        body[-1] ^= 0xFF
        s3.put_object(Bucket=alpha.options.bucket, Key=bad, Body=bytes(body))
    handle = tier_handle(str(config), "s3")
    assert list_namespaces(handle) == ["alpha"]
    [usage] = disk_usage(handle, ["alpha"])
    assert usage.pages == 5 and usage.stored_bytes == 5 * (4096 + 16384)
    report = verify_namespace(handle, "alpha", delete_corrupt=True)
    assert report.ok == 4 and report.corrupt == [keys[2]] and report.deleted == 1
    purge_namespace(handle, "alpha")
    assert disk_usage(handle, ["alpha"])[0].pages == 0


def test_perf_script_runs_on_the_sink_server(aws_env: dict[str, str]) -> None:
    """``python -m hicache_s3.perf`` end to end at tiny sizes (keeps the script from rotting)."""
    import subprocess
    import sys
    from pathlib import Path

    config = Path(__file__).resolve().parents[3] / "configs" / "s3.yaml"
    tiny = "0.0625"  # 64 KiB pages
    args = ["--config", str(config), "--server", "sink", "--page-mib", tiny, "--total-mib", "0.5"]
    args += ["--threads", "1", "--exists-keys", "16", "--exists-chain", "8", "--sweep-pages", "4"]
    args += ["--sweep-page-mib", tiny, "--concurrency", "1,2", "--latency-ms", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "hicache_s3.perf", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "raw boto3" in out and "exists_prefix" in out and "injected latency" in out
    assert "(no delay)" in out
