"""Prometheus metrics: every exported name parses with prometheus_client's own parser and follows
the conventions; counters move during a real replay; ``/metrics`` is served while one runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from hicache.config import TierSettings
from hicache.replay.app import ReplayHooks, ReplaySettings, run_replay
from hicache.storage.backend import BackendContext
from hicache.storage.memory import MemoryBackend, MemoryConfig
from hicache.testing.faults import FaultyBackend
from hicache.tiering.stats import LATENCY_BUCKETS_S, LatencyHistogram, TierCounters
from hicache.tiering.tiers import Tiers

prometheus_client = pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from hicache.metrics import METRICS, HicacheCollector  # noqa: E402

#: The ``run_python`` fixture of tests/conftest.py.
RunPython = Callable[..., "subprocess.CompletedProcess[str]"]

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 120.0
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _settings(tmp_path: Path, trace: Path, **kw: object) -> ReplaySettings:
    # fractions under which L1, L2 and L3 all serve hits on the reuse trace
    base: dict[str, object] = {
        "trace": trace,
        "data_dir": tmp_path,
        "progress": False,
        "l1_fraction": 0.02,
        "l2_fraction": 0.3,
        "l3_fraction": 0.6,
    }
    base.update(kw)
    return ReplaySettings(**base)  # type: ignore[arg-type]


def scrape(registry: CollectorRegistry) -> tuple[list[Any], Samples]:
    """Families parsed back by prometheus_client's parser, and every sample by name + labels."""
    text = generate_latest(registry).decode()
    return _parse(text)


def _parse(text: str) -> tuple[list[Any], Samples]:
    families = list(text_string_to_metric_families(text))
    samples: Samples = {}
    for fam in families:
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels`` (sum if several match)."""
    found = [
        v
        for (n, lab), v in samples.items()
        if n == name and all((k, x) in lab for k, x in labels.items())
    ]
    assert found, f"no sample {name} {labels}"
    return sum(found)


class _Watch:
    """Replay hooks that scrape the collector before the first request and after the last."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.before: Samples = {}
        self.after: Samples = {}
        self.families: list[Any] = []

    def started(self, caches: Sequence[Any], _url: str | None) -> None:
        self.registry.register(HicacheCollector(caches))
        _, self.before = scrape(self.registry)

    def finished(self, _caches: Sequence[Any]) -> None:
        self.families, self.after = scrape(self.registry)

    def hooks(self) -> ReplayHooks:
        return ReplayHooks(started=self.started, finished=self.finished)


def _write_config(tmp_path: Path, *, publisher: bool) -> Path:
    # the replay's own shape (16-token pages of 8 KiB), one local-disk tier, events over ZMQ
    events = (
        "events: {publisher: zmq, endpoint: 'tcp://127.0.0.1:*', "
        "replay_endpoint: 'tcp://127.0.0.1:*', topic: 'kv@{instance}@{model}', "
        "instance: pod-a}\n"
        if publisher
        else ""
    )
    path = tmp_path / "hicache.yaml"
    path.write_text(
        "cache: {page_size: 16, device: cpu, host_pool: 64MiB}\n"
        "model: {name: replay/tiny, revision: v1, num_layers: 2, num_kv_heads: 2, head_dim: 32,"
        " dtype: float16}\n"
        "storage:\n"
        "  prefetch: {policy: wait_complete, threshold_tokens: 16}\n"
        "  tiers:\n"
        # a put past its deadline is a counted failure whose page may still land unannounced
        # (tests/test_faults.py covers deadlines): generous here, so a loaded machine's slow
        # put is not one
        f"    disk: {{backend: localdisk, options: {{root: '{tmp_path / 'l3'}', "
        "max_bytes: 48MiB, durability: none}, deadline_s: 600}\n" + events
    )
    return path


# ---------------------------------------------------------------------- names and movement


def test_every_family_parses_follows_the_conventions_and_moves_in_a_replay(
    tmp_path: Path, reuse_trace: Path
) -> None:
    pytest.importorskip("zmq")
    watch = _Watch()
    config = _write_config(tmp_path, publisher=True)
    # the config's max_bytes sizes L3 (an explicit --l3-fraction would override it)
    # each prefetch started at its request's turn, so the serving thread waits for every read
    # (started earlier, a read may be done before its turn and nothing is waited for)
    report, _ = run_replay(
        _settings(tmp_path, reuse_trace, config=config, l3_fraction=None, prefetch_ahead=0),
        watch.hooks(),
    )
    assert report.verification.mismatches == 0

    exported = {f.name for f in watch.families}
    # the parser names a counter family without its _total
    expected = {s.name.removesuffix("_total") for s in METRICS.values()}
    assert exported == expected, (sorted(expected - exported), sorted(exported - expected))
    for fam in watch.families:
        spec = next(s for s in METRICS.values() if s.name.removesuffix("_total") == fam.name)
        assert fam.type == spec.type, fam.name
        assert fam.documentation, fam.name
        for s in fam.samples:
            extra = {"le"} if spec.type == "histogram" and s.name.endswith("_bucket") else set()
            assert set(s.labels) == set(spec.labels) | extra, (s.name, s.labels)
            if spec.type == "counter":
                assert s.name == spec.name, s.name
                assert s.value >= 0

    # counters of every layer moved, from the first scrape (before any request) to the last
    b, a = watch.before, watch.after
    for name, labels in [
        ("hicache_match_tokens_total", {}),
        ("hicache_hit_tokens_total", {"level": "l1"}),
        ("hicache_hit_tokens_total", {"level": "l2"}),
        ("hicache_backups_total", {}),
        ("hicache_write_through_acks_total", {}),
        ("hicache_storage_published_pages_total", {}),
        ("hicache_prefetch_outcomes_total", {"outcome": "complete"}),
        ("hicache_prefetched_pages_total", {}),
        ("hicache_storage_serving_wait_seconds_total", {"reason": "prefetch"}),
        ("hicache_tier_lookups_total", {"tier": "disk"}),
        ("hicache_tier_hit_tokens_total", {"tier": "disk"}),
        ("hicache_tier_put_pages_total", {"tier": "disk", "status": "stored"}),
        ("hicache_tier_written_bytes_total", {"tier": "disk"}),
        ("hicache_tier_read_bytes_total", {"tier": "disk"}),
        ("hicache_tier_announced_pages_total", {"tier": "disk"}),
        ("hicache_tier_operation_duration_seconds_count", {"tier": "disk", "op": "put"}),
        ("hicache_tier_operation_duration_seconds_count", {"tier": "disk", "op": "exists"}),
        ("hicache_events_published_total", {}),
        ("hicache_events_published_batches_total", {}),
    ]:
        before = value(b, name, **labels) if any(k[0] == name for k in b) else 0.0
        assert value(a, name, **labels) > before, (name, labels)
    # read and written bytes are whole pages of this shape (8 KiB payloads)
    assert value(a, "hicache_tier_written_bytes_total") % 8192 == 0
    assert value(a, "hicache_tier_used_bytes", tier="disk") > 0
    # the replay sizes the tier to hold 48 MiB of payload; the tier counts each page's 4 KiB
    # header too
    assert (
        value(a, "hicache_tier_capacity_bytes", tier="disk") == 48 * 2**20 * (8192 + 4096) // 8192
    )
    assert value(a, "hicache_tier_info", tier="disk", backend="localdisk", medium="DISK") == 1
    assert value(a, "hicache_tier_breaker_state", tier="disk", state="closed") == 1
    assert value(a, "hicache_tier_breaker_state", tier="disk", state="open") == 0
    assert value(a, "hicache_tier_failures_total", tier="disk") == 0
    # the histogram is cumulative and its +Inf bucket is its count
    put = {"tier": "disk", "op": "put"}
    buckets = sorted(
        (float(dict(lab)["le"]), v)
        for (n, lab), v in a.items()
        if n == "hicache_tier_operation_duration_seconds_bucket" and ("op", "put") in lab
    )
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and len(buckets) == len(LATENCY_BUCKETS_S) + 1
    assert buckets[-1][1] == value(a, "hicache_tier_operation_duration_seconds_count", **put)
    assert value(a, "hicache_tier_operation_duration_seconds_sum", **put) > 0


def test_metric_names_follow_prometheus_conventions() -> None:
    for key, spec in METRICS.items():
        assert key == spec.name
        assert re.fullmatch(r"hicache_[a-z][a-z0-9_]*[a-z0-9]", spec.name), spec.name
        assert (spec.type == "counter") == spec.name.endswith("_total"), spec.name
        base = spec.name.removesuffix("_total")
        # base units only, and the unit last
        assert not re.search(r"_(milli|micro|kilo|mega|giga)|_(ms|us|kb|mb|gb|kib|mib)\b", base)
        for unit in ("bytes", "seconds"):
            if unit in base.split("_"):
                assert base.endswith("_" + unit), spec.name
        assert "tier" in spec.labels or "cache" in spec.labels, spec.name
        assert all(re.fullmatch(r"[a-z_]+", lab) for lab in spec.labels)


def test_docs_list_every_metric_and_nothing_else() -> None:
    text = (ROOT / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"`(hicache_[a-z0-9_]+)`", text))
    assert documented == set(METRICS), (
        sorted(set(METRICS) - documented),
        sorted(documented - set(METRICS)),
    )
    for spec in METRICS.values():
        row = next(line for line in text.splitlines() if f"`{spec.name}`" in line)
        assert f"| {spec.type} |" in row, row
        for label in spec.labels:
            assert f"`{label}`" in row, (spec.name, label)


# ---------------------------------------------------------------------- failures and breaker


def test_failures_retries_and_breaker_transitions_are_exported() -> None:
    ctx = BackendContext(page_bytes=64, namespace="kv-test", tier_name="flaky")
    inner = MemoryBackend(MemoryConfig(), ctx)
    faulty = FaultyBackend(inner)
    settings = TierSettings(
        breaker_failures=2, breaker_cooldown_s=3600, retry_attempts=2, retry_backoff_s=0
    )
    tiers = Tiers.from_backends([("flaky", faulty, settings)])
    tiers.open()

    class Source:
        def __init__(self) -> None:
            self.tiers = tiers

        def stats(self) -> dict[str, object]:
            return {"page_size": 4}

    registry = CollectorRegistry()
    registry.register(HicacheCollector({"main": Source()}))
    tier = tiers["flaky"]
    key = "ab" * 32
    assert tier.exists_prefix([key]) == 0  # a plain miss: the breaker stays closed
    faulty.fail_calls(None)  # every call raises BackendUnavailableError from now on
    for _ in range(3):
        assert tier.exists_prefix([key]) == 0
    _, s = scrape(registry)
    lab = {"tier": "flaky", "backend": "FaultyBackend", "namespace": "kv-test"}
    # two failed calls (each retried once) opened the breaker; the third was refused
    assert value(s, "hicache_tier_failures_total", kind="unavailable", **lab) == 2
    assert value(s, "hicache_tier_retries_total", **lab) == 2
    assert value(s, "hicache_tier_failures_total", kind="breaker_open", **lab) == 1
    assert value(s, "hicache_tier_breaker_rejected_calls_total", **lab) == 1
    assert value(s, "hicache_tier_breaker_transitions_total", to="open", **lab) == 1
    assert value(s, "hicache_tier_breaker_state", state="open", **lab) == 1
    assert value(s, "hicache_tier_breaker_state", state="closed", **lab) == 0
    assert value(s, "hicache_tier_lookups_total", **lab) == 4
    assert value(s, "hicache_tier_miss_pages_total", **lab) == 4
    # the refused call never reached the backend: it is not in the latency histogram
    assert value(s, "hicache_tier_operation_duration_seconds_count", op="exists", **lab) == 3
    tiers.close()


def test_latency_histogram_buckets_are_cumulative_and_bounded() -> None:
    h = LatencyHistogram()
    for seconds in (0.0, 0.0001, 0.0003, 0.02, 99.0):
        h.observe(seconds)
    d = h.as_dict()
    by_le = dict(zip(d["le_s"], d["cumulative"], strict=True))
    assert by_le[0.0001] == 2  # bounds are inclusive
    assert by_le[0.0005] == 3
    assert by_le[0.025] == 4
    assert by_le[10.0] == 4
    assert d["count"] == 5  # the +Inf bucket
    assert d["sum_s"] == pytest.approx(99.0204)
    assert json.loads(json.dumps(d)) == d  # plain JSON data, like every stats() value
    c = TierCounters()
    c.observe("get", 0.003)
    assert c.as_dict()["latency"]["get"]["count"] == 1


# ---------------------------------------------------------------------- no side effects


def test_importing_hicache_registers_nothing(run_python: RunPython) -> None:
    out = run_python(
        "import sys\n"
        "import hicache, hicache.hiradix, hicache.replay\n"
        "assert 'prometheus_client' not in sys.modules, 'the core imported prometheus_client'\n"
        "import hicache.metrics\n"
        "from prometheus_client import REGISTRY, generate_latest\n"
        "text = generate_latest(REGISTRY).decode()\n"
        "assert 'hicache_' not in text, text\n"
        "print('ok')\n"
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---------------------------------------------------------------------- /metrics while replaying


def test_replay_serves_metrics_while_it_runs(tmp_path: Path, reuse_trace: Path) -> None:
    pause_at = 40
    url_ready = threading.Event()
    paused = threading.Event()
    resume = threading.Event()
    urls: list[str] = []
    errors: list[BaseException] = []

    def started(_caches: Sequence[Any], url: str | None) -> None:
        assert url is not None
        urls.append(url)
        url_ready.set()

    def request_done(i: int) -> None:
        if i == pause_at:
            paused.set()
            # the replay waits here (generously bounded) while the test scrapes
            assert resume.wait(WAIT_S), "the test never resumed the replay"

    def run() -> None:
        try:
            run_replay(
                _settings(tmp_path, reuse_trace, metrics_port=0),
                ReplayHooks(started=started, request_done=request_done),
            )
        except BaseException as exc:
            errors.append(exc)
        finally:
            url_ready.set()
            paused.set()

    worker = threading.Thread(target=run, name="replay", daemon=True)
    worker.start()
    try:
        assert url_ready.wait(WAIT_S) and urls, errors
        url = urls[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        assert paused.wait(WAIT_S) and not errors, errors
        with urllib.request.urlopen(url, timeout=WAIT_S) as resp:
            assert resp.status == 200
            text = resp.read().decode()
        _, s = _parse(text)
        # the replay is paused after request pause_at: every counter so far is in the scrape
        # every request so far asked for its 8 pages of 16 tokens at least once
        assert value(s, "hicache_match_tokens_total", cache="0") >= (pause_at + 1) * 8 * 16
        assert value(s, "hicache_backups_total", cache="0") > 0
        assert value(s, "hicache_tier_lookups_total", tier="disk", backend="localdisk") > 0
    finally:
        resume.set()
        worker.join(WAIT_S)
    assert not worker.is_alive() and not errors, errors
    # the server is gone with the replay
    with pytest.raises(OSError):
        urllib.request.urlopen(urls[0], timeout=5)


def test_cli_metrics_port_flag_reaches_the_replay(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "hicache"),
            "replay",
            "--limit",
            "20",
            "--no-progress",
            "--metrics-port",
            "0",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert re.search(r"serving Prometheus metrics at http://127\.0\.0\.1:\d+/metrics", out.stderr)


def test_grafana_example_uses_only_exported_metrics() -> None:
    dash = json.loads((ROOT / "docs" / "grafana-hicache.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"hicache_[a-z0-9_]+", e)}
    known = set(METRICS)
    for spec in METRICS.values():
        if spec.type == "histogram":
            known |= {spec.name + s for s in ("_bucket", "_count", "_sum")}
    assert names and names <= known, sorted(names - known)
