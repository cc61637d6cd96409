"""Tooling on a valkey tier: the storage benchmark with its raw redis-py baseline (tiny sizes)
and the storage operations (du, verify, purge) per namespace through SCAN. No timing asserted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hicache_valkey import ValkeyBackend
from hicache_valkey.baseline import server_benchmark
from hicache_valkey.devserver import DevServer
from hicache_valkey.options import ValkeyOptions
from hicache_valkey.testing import PAGE_BYTES, make_backend

from hicache.storage import Backend, PageStatus
from hicache.testing import kit_key, page_pattern
from hicache.tools.benchmark import BenchSpec, run_storage_bench


def test_bench_measures_every_figure_against_raw_client(
    options: dict[str, Any], valkey_server: DevServer
) -> None:
    spec = BenchSpec(
        page_bytes=(PAGE_BYTES,),
        total_bytes=PAGE_BYTES * 8,
        threads=(2,),
        batch=2,
        exists_batch=8,
        min_exists_keys=16,
    )

    def make(page_bytes: int, namespace: str) -> Backend:
        return make_backend(options, namespace=namespace, page_bytes=page_bytes)

    def baseline(backend: Backend) -> Any:
        return ValkeyBackend.bench_baseline(backend.config, backend.context)

    report = run_storage_bench(
        make_backend=make, make_baseline=baseline, spec=spec, tier="valkey", backend_kind="valkey"
    )
    assert "redis-py" in report.baseline
    [run] = report.runs
    assert run.pages_read == run.num_pages == 8 and not run.problems
    for figure in run.figures:
        assert figure.value is not None and figure.value > 0, figure
        assert figure.limit is not None and figure.limit > 0, figure
    # redis-benchmark ran against the same server in the same round, beside put and hot get
    assert [(t.name, t.figure) for t in run.tool_limits] == [
        ("redis-benchmark SET", "put"),
        ("redis-benchmark GET", "get_hot"),
    ]
    for tool in run.tool_limits:
        assert tool.gbps is not None and tool.gbps > 0, tool
        assert f"-d {PAGE_BYTES} " in tool.note and "-c 2 -P 2" in tool.note, tool
    client = valkey_server.client()
    leftovers = list(client.scan_iter(match=b"hicache.bench-raw-*"))
    leftovers += list(client.scan_iter(match=b"key:*"))
    client.close()
    assert leftovers == [], "the baseline or the tool left keys behind"


def test_tool_limit_is_not_measured_with_a_password(options: dict[str, Any]) -> None:
    # A password would show on redis-benchmark's command line: no figure, a reason, no secret.
    guarded = ValkeyOptions.model_validate({**options, "password": "s3cret-pw"})
    limits = server_benchmark(guarded, PAGE_BYTES, 1, 4)
    assert [t.gbps for t in limits] == [None, None]
    assert all("password" in t.note and "s3cret" not in t.note for t in limits)


def test_storage_operations_on_a_valkey_tier(options: dict[str, Any], tmp_path: Path) -> None:
    from hicache.tools.ops import (
        disk_usage,
        list_namespaces,
        purge_namespace,
        tier_handle,
        verify_namespace,
    )

    tier_options = {**options, "key_prefix": "opsprefix"}
    config = tmp_path / "ops.yaml"  # YAML is a superset of JSON
    config.write_text(
        json.dumps(
            {
                "cache": {"page_size": 4, "device": "cpu", "host_pool": "1MiB"},
                "model": {"name": "t/x", "num_layers": 2, "num_kv_heads": 2, "head_dim": 64},
                "storage": {"tiers": {"fleet": {"backend": "valkey", "options": tier_options}}},
            }
        )
    )
    keys = [kit_key(i, "ops") for i in range(5)]
    chunked = {**tier_options, "max_value_bytes": 8192}
    alpha = make_backend(tier_options, namespace="alpha")
    with alpha:
        pages = [memoryview(page_pattern(k, PAGE_BYTES)) for k in keys]
        assert alpha.put(keys[:3], pages[:3]) == [PageStatus.OK] * 3
        client = DevServer.client_for(options["port"])
        bad = alpha.keyspace.page(keys[2])
        value = bytearray(client.get(bad))  # type: ignore[arg-type]
        value[-1] ^= 0xFF
        client.set(bad, bytes(value))
        client.close()
    with make_backend(chunked, namespace="alpha") as alpha_chunked:
        assert alpha_chunked.put(keys[3:], pages[3:]) == [PageStatus.OK] * 2
    with make_backend(tier_options, namespace="beta") as beta:
        assert beta.put(keys[:1], pages[:1]) == [PageStatus.OK]
    handle = tier_handle(str(config), "fleet")
    assert list_namespaces(handle) == ["alpha", "beta"]
    [usage] = disk_usage(handle, ["alpha"])
    assert usage.pages == 5 and usage.stored_bytes == 5 * (4096 + PAGE_BYTES)
    report = verify_namespace(handle, "alpha", delete_corrupt=True)
    assert report.ok == 4 and report.corrupt == [keys[2]] and report.deleted == 1
    purge_namespace(handle, "alpha")
    assert disk_usage(handle, ["alpha"])[0].pages == 0
    assert disk_usage(handle, ["beta"])[0].pages == 1
    client = DevServer.client_for(options["port"])
    left = list(client.scan_iter(match=b"opsprefix:alpha:*"))
    client.close()
    assert left == [], "purge left chunk keys behind"
