"""hicache tiers as SGLang's L3 storage, driven through SGLang 0.5.23's own code.

The adapter is built by SGLang's real ``StorageBackendFactory.create_backend("dynamic", ...)``
from a user-like extra-config, then given a page-first host pool and run through SGLang's call
sequence (``batch_exists``, ``batch_set_v1``, ``batch_exists``, ``batch_get_v1`` into other host
slots, compare bytes) against memory, localdisk, mmap and s3 (moto on 127.0.0.1) tiers, for MHA
and MLA, and TP ranks 0 and 1 sharing one tier.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

_stubs_spec = importlib.util.spec_from_file_location(
    "sglang_stubs", Path(__file__).with_name("sglang_stubs.py")
)
assert _stubs_spec is not None and _stubs_spec.loader is not None
sglang_stubs = importlib.util.module_from_spec(_stubs_spec)
_stubs_spec.loader.exec_module(sglang_stubs)
sglang_stubs.install()

import sglang  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig  # noqa: E402
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402

from hicache.errors import ConfigError  # noqa: E402
from hicache.integrations import sglang as adapter  # noqa: E402
from hicache.keys import NamespaceSpec, engine_namespace  # noqa: E402
from hicache.testing.sglang_pool import PageFirstHostPool, host_indices, page_keys  # noqa: E402

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SITE = Path(sglang.__file__).parent
PAGES = 6  # pages written per sequence


def _sglang_method(relpath: str, cls: str, method: str) -> Callable[..., Any]:
    """SGLang's own method, compiled from its source file (its module cannot be imported here:
    it pulls in Triton kernels), to run against our pool object."""
    tree = ast.parse((SITE / relpath).read_text("utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    module = ast.Module(body=[item], type_ignores=[])
                    scope: dict[str, Any] = {}
                    exec(compile(module, str(SITE / relpath), "exec"), scope)
                    fn: Callable[..., Any] = scope[method]
                    return fn
    raise AssertionError(f"{cls}.{method} not found in {relpath}")


def make_pool(mla: bool, *, page_size: int = 4, layout: str = "page_first") -> PageFirstHostPool:
    if mla:
        return PageFirstHostPool(
            pages=16, page_size=page_size, layer_num=3, kv_cache_dim=96, mla=True, layout=layout
        )
    return PageFirstHostPool(
        pages=16, page_size=page_size, layer_num=3, head_num=2, head_dim=32, layout=layout
    )


def storage_config(
    extra: dict[str, Any], *, mla: bool = False, tp_rank: int = 0, tp_size: int = 1, **kw: Any
) -> HiCacheStorageConfig:
    fields: dict[str, Any] = {
        "tp_rank": tp_rank,
        "tp_size": tp_size,
        "pp_rank": 0,
        "pp_size": 1,
        "attn_cp_rank": 0,
        "attn_cp_size": 1,
        "is_mla_model": mla,
        "enable_storage_metrics": True,
        "is_page_first_layout": True,
        "model_name": MODEL,
        "extra_config": extra,
    }
    fields.update(kw)
    return HiCacheStorageConfig(**fields)


def user_extra(tiers: dict[str, Any], **more: Any) -> dict[str, Any]:
    """What a user passes as --hicache-storage-backend-extra-config (after SGLang's json.loads)."""
    text = json.dumps(
        {
            "backend_name": "hicache",
            "module_path": "hicache.integrations.sglang",
            "class_name": "HicacheStorage",
            "interface_v1": 1,
            "tiers": tiers,
            **more,
        }
    )
    extra: dict[str, Any] = json.loads(text)
    return extra


def attach(
    extra: dict[str, Any], pool: PageFirstHostPool, *, mla: bool = False, **kw: Any
) -> adapter.HicacheStorage:
    """SGLang's attach sequence: factory (dynamic), then register_mem_pool_host."""
    config = storage_config(extra, mla=mla, **kw)
    backend = StorageBackendFactory.create_backend("dynamic", config, pool)
    assert isinstance(backend, adapter.HicacheStorage)
    backend.register_mem_pool_host(pool)
    return backend


@pytest.fixture
def close_after() -> Iterator[Callable[[adapter.HicacheStorage], adapter.HicacheStorage]]:
    opened: list[adapter.HicacheStorage] = []

    def track(instance: adapter.HicacheStorage) -> adapter.HicacheStorage:
        opened.append(instance)
        return instance

    yield track
    for instance in opened:
        instance.close()


# ---------------------------------------------------------------------- tiers under test

_store_ids = iter(range(1_000_000))


def memory_tiers(tmp_path: Path) -> dict[str, Any]:
    return {"mem": {"backend": "memory", "options": {"shared_name": f"sg-{next(_store_ids)}"}}}


def localdisk_tiers(tmp_path: Path) -> dict[str, Any]:
    # shared: TP ranks are processes of their own, each with a backend instance on the root.
    options = {"root": str(tmp_path / "ld"), "shared": True, "max_bytes": "64MiB"}
    return {"nvme": {"backend": "localdisk", "options": options}}


def mmap_tiers(tmp_path: Path) -> dict[str, Any]:
    path = str(tmp_path / "slots")
    return {"shm": {"backend": "mmap", "options": {"path": path, "capacity": "8MiB"}}}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from hicache_s3.devserver import DevServer, dummy_aws_env

    env = dummy_aws_env(tmp_path_factory.mktemp("aws"))
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    os.environ.update(env)
    try:
        with DevServer(log_path=tmp_path_factory.mktemp("moto") / "log") as server:
            yield server.endpoint_url
    finally:
        for name in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[name]
        os.environ.update(saved)


@pytest.fixture(params=["memory", "localdisk", "mmap", "s3"])
def tiers_of(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """The tiers mapping of one backend kind (one shared store per test)."""
    if request.param == "s3":
        from hicache_s3.testing import fast_options, new_bucket

        endpoint = request.getfixturevalue("s3_endpoint")
        # budgets far past what a loaded machine needs (these tests are about the bytes, not
        # the speed): a 5 s tier deadline failed a get of 6 pages under `make stress-test`
        options = fast_options(endpoint, new_bucket(endpoint), read_timeout=30.0)
        return {"objects": {"backend": "s3", "deadline_s": 60.0, "options": options}}
    makers = {"memory": memory_tiers, "localdisk": localdisk_tiers, "mmap": mmap_tiers}
    tiers: dict[str, Any] = makers[request.param](tmp_path)
    return tiers


# ---------------------------------------------------------------------- SGLang's sequence


def run_sequence(
    backend: adapter.HicacheStorage, pool: PageFirstHostPool, keys: list[str], seed: int
) -> None:
    """exists -> set_v1 -> exists -> get_v1 into other host slots -> same bytes."""
    src, dst = list(range(len(keys))), list(range(8, 8 + len(keys)))
    for page in src:
        pool.fill(page, seed + page)
    assert backend.batch_exists(keys) == 0
    assert backend.batch_set_v1(keys, host_indices(pool, src)) == [True] * len(keys)
    assert backend.batch_exists(keys) == len(keys)
    assert backend.batch_get_v1(keys, host_indices(pool, dst)) == [True] * len(keys)
    for s, d in zip(src, dst, strict=True):
        assert pool.page_bytes_of(d) == pool.page_bytes_of(s), f"host page {d} differs"


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
def test_sglang_sequence_round_trips_pages(
    tiers_of: dict[str, Any], mla: bool, close_after: Any
) -> None:
    pool = make_pool(mla)
    backend = close_after(attach(user_extra(tiers_of), pool, mla=mla))
    run_sequence(backend, pool, page_keys(PAGES, "seq"), seed=1)
    assert backend.hicache_stats()["failures"] == {}


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
def test_tp_ranks_share_one_tier(tiers_of: dict[str, Any], mla: bool, close_after: Any) -> None:
    extra = user_extra(tiers_of)
    pools = [make_pool(mla), make_pool(mla)]
    ranks = [close_after(attach(extra, pools[r], mla=mla, tp_rank=r, tp_size=2)) for r in range(2)]
    keys = page_keys(PAGES, "tp")
    if not mla:
        # Each rank holds its own heads: same keys, different bytes, separate namespaces.
        assert ranks[0].namespace != ranks[1].namespace
        run_sequence(ranks[0], pools[0], keys, seed=10)
        run_sequence(ranks[1], pools[1], keys, seed=20)
        assert pools[0].page_bytes_of(8) != pools[1].page_bytes_of(8)
        return
    # MLA: one namespace, only SGLang's writer rank (0) writes; rank 1 reads rank 0's pages.
    assert ranks[0].namespace == ranks[1].namespace
    for page in range(PAGES):
        pools[0].fill(page, 30 + page)
    src, dst = list(range(PAGES)), list(range(8, 8 + PAGES))
    assert ranks[1].batch_set_v1(keys, host_indices(pools[1], src)) == [False] * PAGES
    assert ranks[1].batch_exists(keys) == 0, "a non-writer MLA rank wrote pages"
    assert ranks[0].batch_set_v1(keys, host_indices(pools[0], src)) == [True] * PAGES
    assert ranks[1].batch_exists(keys) == PAGES
    assert ranks[1].batch_get_v1(keys, host_indices(pools[1], dst)) == [True] * PAGES
    for s, d in zip(src, dst, strict=True):
        assert pools[1].page_bytes_of(d) == pools[0].page_bytes_of(s)


# ---------------------------------------------------------------------- the pool arithmetic


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
@pytest.mark.parametrize("layout", ["page_first", "page_first_direct"])
def test_pool_meta_matches_sglangs_own_method(mla: bool, layout: str) -> None:
    relpath, cls = (
        ("srt/mem_cache/pool_host/mla.py", "MLATokenToKVPoolHost")
        if mla
        else ("srt/mem_cache/pool_host/mha.py", "MHATokenToKVPoolHost")
    )
    real = _sglang_method(relpath, cls, "get_page_buffer_meta")
    pool = make_pool(mla, layout=layout)
    indices = host_indices(pool, [5, 0, 15, 7])
    assert pool.get_page_buffer_meta(indices) == real(pool, indices)


# ---------------------------------------------------------------------- misses, never raises


def test_corrupt_page_is_a_miss(tmp_path: Path, close_after: Any) -> None:
    pool = make_pool(False)
    backend = close_after(attach(user_extra(localdisk_tiers(tmp_path)), pool))
    keys = page_keys(3, "corrupt")
    for page in range(3):
        pool.fill(page, page)
    assert backend.batch_set_v1(keys, host_indices(pool, [0, 1, 2])) == [True] * 3
    assert backend.tiers is not None
    path = backend.tiers["nvme"].backend.page_path(keys[1])  # type: ignore[attr-defined]
    with open(path, "r+b") as f:
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    # Results are per page; SGLang uses the prefix before the first False.
    assert backend.batch_get_v1(keys, host_indices(pool, [8, 9, 10])) == [True, False, True]
    assert pool.page_bytes_of(8) == pool.page_bytes_of(0)
    assert backend.batch_exists(keys) == 1, "the corrupt page was not dropped"


def test_tier_down_is_a_miss(tmp_path: Path, close_after: Any) -> None:
    from hicache_s3.devserver import free_port

    # Nothing listens on the port: the endpoint is down for every call.
    options = {
        "bucket": "gone",
        "endpoint_url": f"http://127.0.0.1:{free_port()}",
        "connect_timeout": 0.5,
        "read_timeout": 0.5,
        "max_attempts": 1,
    }
    tiers = {"objects": {"backend": "s3", "deadline_s": 2.0, "options": options}}
    pool = make_pool(False)
    backend = close_after(attach(user_extra(tiers), pool))
    keys = page_keys(2, "down")
    assert backend.batch_exists(keys) == 0
    assert backend.batch_set_v1(keys, host_indices(pool, [0, 1])) == [False, False]
    assert backend.batch_get_v1(keys, host_indices(pool, [8, 9])) == [False, False]
    assert backend.exists(keys[0]) is False


def test_wrong_page_size_is_a_miss(tiers_of: dict[str, Any], close_after: Any) -> None:
    extra = user_extra(tiers_of)
    writer_pool = make_pool(False, page_size=4)
    writer = close_after(attach(extra, writer_pool))
    keys = page_keys(2, "page-size")
    assert writer.batch_set_v1(keys, host_indices(writer_pool, [0, 1])) == [True, True]
    other_pool = make_pool(False, page_size=8)
    other = close_after(attach(extra, other_pool))
    assert other.batch_exists(keys) == 0
    assert other.batch_get_v1(keys, host_indices(other_pool, [2, 3])) == [False, False]
    # A host pool whose regions no longer match the registered geometry: misses, not a crash.
    writer.regions_per_page = 1
    assert writer.batch_get_v1(keys, host_indices(writer_pool, [8, 9])) == [False, False]
    assert writer.hicache_stats()["failures"] == {"get": 1}


def test_bad_calls_are_misses_and_counted(tmp_path: Path, close_after: Any) -> None:
    pool = make_pool(False)
    backend = close_after(attach(user_extra(memory_tiers(tmp_path)), pool))
    bad = ["not-a-sha256-key"]
    assert backend.batch_get_v1(bad, host_indices(pool, [0])) == [False]
    assert backend.batch_set_v1(bad, host_indices(pool, [0])) == [False]
    assert backend.batch_get(bad, [torch.zeros(3)]) == [None]
    assert backend.set(bad[0], torch.zeros(3)) is False
    counts = backend.hicache_stats()["failures"]
    assert counts == {"get": 2, "set": 2}


# ---------------------------------------------------------------------- namespaces


def test_second_instance_of_same_model_finds_pages(tmp_path: Path, close_after: Any) -> None:
    tiers = localdisk_tiers(tmp_path)
    pool = make_pool(False)
    first = close_after(attach(user_extra(tiers, model_revision="abc123"), pool))
    keys = page_keys(3, "reuse")
    for page in range(3):
        pool.fill(page, 40 + page)
    assert first.batch_set_v1(keys, host_indices(pool, [0, 1, 2])) == [True] * 3
    first.close()

    again_pool = make_pool(False)
    again = close_after(attach(user_extra(tiers, model_revision="abc123"), again_pool))
    assert again.batch_exists(keys) == 3
    assert again.batch_get_v1(keys, host_indices(again_pool, [5, 6, 7])) == [True] * 3
    assert again_pool.page_bytes_of(5) == pool.page_bytes_of(0)

    other_revision = close_after(
        attach(user_extra(tiers, model_revision="def456"), make_pool(False))
    )
    assert other_revision.batch_exists(keys) == 0
    other_model = close_after(
        attach(user_extra(tiers, model_revision="abc123"), make_pool(False), model_name="other/m")
    )
    assert other_model.batch_exists(keys) == 0


def test_namespace_is_the_documented_derivation(tmp_path: Path, close_after: Any) -> None:
    pool = make_pool(True)
    backend = close_after(attach(user_extra(memory_tiers(tmp_path)), pool, mla=True, tp_size=4))
    spec = NamespaceSpec(
        dtype="bfloat16", num_layers=3, num_kv_heads=1, head_dim=96, page_size=4, mla=True
    )
    assert backend.namespace == engine_namespace(spec, engine="sglang", model_id=MODEL)
    # golden: changing the derivation strands every stored page
    assert engine_namespace(spec, engine="sglang", model_id=MODEL) == "kv-39cb3db05eba878c"


# ---------------------------------------------------------------------- configuration


def test_yaml_file_config(tmp_path: Path, close_after: Any) -> None:
    yaml_path = tmp_path / "hicache.yaml"
    yaml_path.write_text(
        textwrap.dedent(
            f"""\
            storage:
              tiers:
                shm: {{backend: mmap, options: {{path: {tmp_path / "slots"}, capacity: 8MiB}}}}
                nvme: {{backend: localdisk, options: {{root: {tmp_path / "ld"}}}}}
            """
        )
    )
    extra = user_extra({}, hicache_config=str(yaml_path))
    del extra["tiers"]
    pool = make_pool(False)
    backend = close_after(attach(extra, pool))
    assert backend.tiers is not None and [t.name for t in backend.tiers] == ["shm", "nvme"]
    run_sequence(backend, pool, page_keys(PAGES, "yaml"), seed=50)


def test_bad_extra_config_is_a_clear_error(tmp_path: Path) -> None:
    pool = make_pool(False)
    with pytest.raises(ConfigError, match="exactly one of 'hicache_config'"):
        attach({"backend_name": "hicache", "module_path": adapter.__name__,
                "class_name": "HicacheStorage"}, pool)  # fmt: skip
    bad = {"nvme": {"backend": "localdisk", "options": {"root": str(tmp_path), "bogus": 1}}}
    with pytest.raises(ConfigError, match=r"storage\.tiers\.nvme\.options\.bogus"):
        attach(user_extra(bad), pool)


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
def test_layer_first_layout_is_refused(tmp_path: Path, mla: bool) -> None:
    extra = user_extra(memory_tiers(tmp_path))
    config = storage_config(extra, mla=mla, is_page_first_layout=False)
    with pytest.raises(ConfigError, match=r"layer_first.*supported layouts: page_first"):
        StorageBackendFactory.create_backend("dynamic", config, make_pool(mla))
    backend = StorageBackendFactory.create_backend(
        "dynamic", storage_config(extra, mla=mla), make_pool(mla)
    )
    with pytest.raises(ConfigError, match=r"'layer_first' is not supported.*page_first"):
        backend.register_mem_pool_host(make_pool(mla, layout="layer_first"))


# ---------------------------------------------------------------------- copying calls, stats


def test_copying_calls_and_clear(tmp_path: Path, close_after: Any) -> None:
    pool = make_pool(False)
    backend = close_after(attach(user_extra(memory_tiers(tmp_path)), pool))
    keys = page_keys(2, "copy")
    page_elems = backend.page_bytes // pool.dtype.itemsize
    values = [torch.randn(page_elems).to(pool.dtype) for _ in keys]
    assert backend.set(keys[0], values[0]) is True
    assert backend.batch_set(keys, values) is True
    assert backend.exists(keys[1]) is True
    out = [torch.zeros(page_elems, dtype=pool.dtype) for _ in keys]
    got = backend.batch_get(keys, out)
    assert got[0] is out[0] and got[1] is out[1]
    assert all(torch.equal(a, b) for a, b in zip(out, values, strict=True))
    single = torch.zeros(page_elems, dtype=pool.dtype)
    assert backend.get(keys[1], single) is single and torch.equal(single, values[1])
    backend.clear()
    assert backend.batch_exists(keys) == 0
    assert backend.get(keys[0], single) is None


def test_get_stats_has_sglangs_metrics_shape(tmp_path: Path, close_after: Any) -> None:
    source = (SITE / "srt/observability/metrics_collector.py").read_text("utf-8")
    tree = ast.parse(source)
    [metrics] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "StorageMetrics"]
    fields = [s.target.id for s in metrics.body if isinstance(s, ast.AnnAssign)]  # type: ignore[union-attr]
    pool = make_pool(False)
    backend = close_after(attach(user_extra(memory_tiers(tmp_path)), pool))
    keys = page_keys(3, "stats")
    assert backend.batch_set_v1(keys, host_indices(pool, [0, 1, 2])) == [True] * 3
    assert backend.batch_get_v1(keys[:2], host_indices(pool, [8, 9])) == [True] * 2
    stats = backend.get_stats()
    assert sorted(vars(stats) if hasattr(stats, "__dict__") else stats.__slots__) == sorted(fields)
    assert stats.backup_pgs == [3] and stats.prefetch_pgs == [2]
    assert len(stats.backup_bandwidth) == 1 and stats.backup_bandwidth[0] > 0
    assert backend.get_stats().backup_pgs == [], "stats are per interval"


def test_adapter_targets_the_installed_sglang() -> None:
    assert sglang.__version__ == adapter.SGLANG_VERSION


def _scrape(registry: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``registry`` as prometheus_client's own parser reads it back."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_collector_exports_the_tiers(tmp_path: Path, close_after: Any) -> None:
    from prometheus_client import CollectorRegistry

    pool = make_pool(False)
    config = storage_config(user_extra(localdisk_tiers(tmp_path)))
    backend = StorageBackendFactory.create_backend("dynamic", config, pool)
    assert isinstance(backend, adapter.HicacheStorage)
    close_after(backend)
    registry = CollectorRegistry()  # the host's own registry
    registry.register(backend.metrics_collector())  # before the host pool is attached
    assert not any(name.startswith("hicache_tier") for name, _ in _scrape(registry))
    backend.register_mem_pool_host(pool)
    assert backend.namespace is not None
    lab = (("backend", "localdisk"), ("namespace", backend.namespace), ("tier", "nvme"))

    def value(name: str, **extra: str) -> float:
        return samples.get((name, tuple(sorted((*lab, *extra.items())))), -1.0)

    samples = _scrape(registry)
    assert value("hicache_tier_available") == 1.0
    assert value("hicache_tier_lookups_total") == 0.0
    assert value("hicache_tier_put_pages_total", status="stored") == 0.0
    keys = page_keys(PAGES, "metrics")
    run_sequence(backend, pool, keys, seed=5)
    assert backend.batch_exists(keys + page_keys(2, "metrics-missing")) == PAGES
    samples = _scrape(registry)
    page_bytes = float(backend.page_bytes)
    assert value("hicache_tier_put_pages_total", status="stored") == PAGES
    assert value("hicache_tier_written_bytes_total") == PAGES * page_bytes
    assert value("hicache_tier_get_pages_total", status="ok") == PAGES
    assert value("hicache_tier_read_bytes_total") == PAGES * page_bytes
    # three batch_exists calls (none, all, all but the 2 unknown) and batch_get_v1's cascade
    assert value("hicache_tier_lookups_total") == 4.0
    assert value("hicache_tier_hit_pages_total") == 3 * PAGES
    assert value("hicache_tier_miss_pages_total") == PAGES + 2
    assert value("hicache_tier_hit_tokens_total") == 3 * PAGES * pool.page_size
    assert value("hicache_tier_operation_duration_seconds_count", op="put") >= 1.0
    assert value("hicache_tier_stored_pages") == PAGES
    # the adapter has no tree: no cache-level hit families with made-up zeros
    assert not any(name.startswith("hicache_hit_tokens") for name, _ in samples)
