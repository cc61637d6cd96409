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
        assert len(side["rounds_put"]) == len(side["rounds_hot_get"]) == 1
        assert report["shape"]["rounds"] == 1
    assert set(report["ratios"]) == {
        "adapter/raw put",
        "adapter/raw cold get",
        "adapter/HiCacheFile put",
        "adapter/HiCacheFile cold get",
        "adapter/HiCacheFile hot get",
        "raw tier/HiCacheFile hot get",
    }
    assert list(root.iterdir()) == [], "a round left its files behind"
