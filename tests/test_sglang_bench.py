"""``hicache bench sglang --quick`` runs end to end through SGLang's factory and HiCacheFile,
and reports every side and ratio (figures are printed, never asserted against a speed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "sglang_stubs", Path(__file__).with_name("sglang_stubs.py")
)
assert _spec is not None and _spec.loader is not None
sglang_stubs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sglang_stubs)
sglang_stubs.install()

from hicache.cli import main  # noqa: E402


def test_bench_sglang_quick_reports_every_side(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "bench"
    assert main(["bench", "sglang", "--quick", "--json", "--root", str(root)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["sides"]) == {"adapter", "raw tier", "HiCacheFile"}
    for side in report["sides"].values():
        assert side["put_gbps"] > 0 and side["cold_get_gbps"] > 0 and side["hot_get_gbps"] > 0
        assert side["hot_get_cpu_gbps"] > 0  # what a hot get costs per CPU second
        assert len(side["rounds_put"]) == len(side["rounds_hot_get"]) == 1
        assert len(side["rounds_hot_get_cpu"]) == 1
        assert report["shape"]["rounds"] == 1
    # the machine's own limit over the same bytes, measured in the same round
    limit = report["limit"]
    for name in ("put_gbps", "cold_get_gbps", "hot_get_gbps"):
        assert isinstance(limit[name], float) and limit[name] > 0, (name, limit[name])
    assert len(limit["rounds_put"]) == len(limit["rounds_cold_get"]) == 1
    assert "preadv" in limit["method"] and "pwritev" in limit["method"]
    assert report["shape"]["io_threads"] >= 1
    limit_ratios = {
        f"{side}/limit {what}"
        for side in ("adapter", "raw tier", "HiCacheFile")
        for what in ("put", "cold get")
    } | {"limit/HiCacheFile put", "limit/HiCacheFile cold get"}
    assert set(report["ratios"]) == {
        "adapter/raw put",
        "adapter/raw cold get",
        "adapter/HiCacheFile put",
        "adapter/HiCacheFile cold get",
        "adapter/HiCacheFile hot get",
        "raw tier/HiCacheFile hot get",
        "adapter/HiCacheFile hot get CPU",
        "raw tier/HiCacheFile hot get CPU",
        *limit_ratios,
    }
    for name, value in report["ratios"].items():
        assert isinstance(value, float) and value > 0, (name, value)
    assert list(root.iterdir()) == [], "a round left its files behind"
