"""``hicache bench radix`` on a tiny workload: it runs end to end, checks its own matches and
reports every figure it promises (speed itself is the bench's business, not a test's)."""

from __future__ import annotations

import argparse
import gc
import json

import pytest

from hicache.tools import radix_bench


def test_radix_bench_reports_every_phase_and_gc_share(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    radix_bench.add_arguments(parser)
    args = parser.parse_args(
        [
            "--requests=40",
            "--prompts=4",
            "--prompt-tokens=64",
            "--suffix-tokens=64",
            "--page-size=16",
            "--repeat=2",
            "--json",
        ]
    )
    callbacks = list(gc.callbacks)
    assert radix_bench.run(args) == 0
    assert gc.callbacks == callbacks  # its GC clock is gone again
    out = json.loads(capsys.readouterr().out)
    phases = {"insert", "match_full", "match_prefix", "match_miss", "match_full_fresh_ints"}
    assert set(out["req_per_s"]) == phases | {"match_full_tensor"}
    assert set(out["baseline_req_per_s"]) == phases
    assert all(v > 0 for v in out["req_per_s"].values())
    assert set(out["vs_sglang_reference"]) == set(radix_bench.SGLANG_REFERENCE)
    for tree in ("hicache", "baseline"):
        shares = out["gc_share"][tree]
        assert "insert" in shares and all(0.0 <= v <= 1.0 for v in shares.values())
    assert out["hash_us_per_page"] > 0 and out["writethrough_us_per_page"] > 0
