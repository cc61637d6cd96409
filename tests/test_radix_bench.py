"""``hicache bench radix`` on tiny workloads: it runs end to end against SGLang's real
``RadixCache``, checks its own match results, and reports every figure it promises, with the
same-run ratios consistent with the rates (speed itself is the bench's business, not a test's).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from typing import Any

import pytest

from hicache.tools import radix_bench
from hicache.tools._radix_baseline import Workload, hicache_sides, prepared
from hicache.tools._sglang_radix import PeerMissing, SglangPeer, load_peer

_PHASES = {"insert", "match_full", "match_prefix"}
_SMALL = [
    "--page-sizes=1,16",
    "--prefix-tokens=64,4160",
    "--unique-tokens=32",
    "--requests=12",
    "--long-requests=3",
    "--memory-requests=5",
    "--rounds=3",
    "--json",
]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    radix_bench.add_arguments(parser)
    callbacks = list(gc.callbacks)
    assert radix_bench.run(parser.parse_args(argv)) == 0
    assert gc.callbacks == callbacks  # its GC clock is gone again
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    return out


def _check_workloads(out: dict[str, Any], sides: set[str]) -> None:
    got = [(w["page_size"], w["prefix_tokens"], w["requests"]) for w in out["workloads"]]
    assert got == [(1, 64, 12), (1, 4160, 3), (16, 64, 12), (16, 4160, 3)]
    for w in out["workloads"]:
        rates = w["req_per_s"]
        assert set(rates) == sides
        assert set(rates["hicache"]) == _PHASES
        assert set(rates["hicache_served"]) == {"served_insert"}
        assert all(v > 0 for phases in rates.values() for v in phases.values())
        for name, shares in w["gc_share"].items():
            assert set(shares) == set(rates[name])
            assert all(0.0 <= v <= 1.0 for v in shares.values())
        memory = w["bytes_per_cached_page"]
        assert set(memory) == sides and all(v > 0 for v in memory.values())
        # the served cache holds the plain tree's nodes plus host pages and hashes
        assert memory["hicache_served"] > memory["hicache"]


@pytest.fixture(scope="module")
def peer() -> SglangPeer:
    loaded = load_peer()
    if isinstance(loaded, PeerMissing):  # make venv installs SGLang: a plain pip install may not
        pytest.skip(f"SGLang's RadixCache is not importable here: {loaded.reason}")
    return loaded


def test_without_peer_says_so_and_reports_hicache_alone(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = _run([*_SMALL, "--no-peer"], capsys)
    assert out["peer"] == {"missing": "not imported (--no-peer)"}
    _check_workloads(out, {"hicache", "hicache_served"})
    assert all(w["vs_sglang_same_run"] == {} for w in out["workloads"])


@pytest.mark.parametrize(("form", "named"), [("array", "array('q')"), ("list", "list[int]")])
def test_hicache_input_form_is_chosen_and_stated(
    form: str, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """hicache gets the ``array('q')`` SGLang takes unless told otherwise; the output says which
    form each side got, and both forms give verified results."""
    out = _run([*_SMALL, "--no-peer", "--rounds=1", f"--hicache-input={form}"], capsys)
    assert out["inputs"]["hicache"] == named
    assert out["inputs"]["sglang"] == "RadixKey(array('q'))"
    assert "outside the timer" in out["inputs"]["built"]
    _check_workloads(out, {"hicache", "hicache_served"})


def test_text_output_names_a_missing_peer(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    radix_bench.add_arguments(parser)
    args = parser.parse_args([a for a in _SMALL if a != "--json"] + ["--no-peer", "--rounds=1"])
    assert radix_bench.run(args) == 0
    text = capsys.readouterr().out
    assert text.startswith("SGLang peer not installed: not imported (--no-peer)")
    assert "served_insert" in text and "GC share of insert" in text
    assert "reference" not in text  # no figure from another run


def test_against_sglang_reports_same_run_ratios(
    peer: SglangPeer, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _run(_SMALL, capsys)
    assert out["peer"]["name"] == "sglang.srt.mem_cache.radix_cache.RadixCache"
    assert out["peer"]["version"] == peer.version
    # only packages SGLang's radix path never calls may be stood in
    assert set(out["peer"]["stand_ins"]) <= {"torchvision"}
    _check_workloads(out, {"hicache", "hicache_served", "sglang", "sglang_events"})
    for w in out["workloads"]:
        rates, ratios = w["req_per_s"], w["vs_sglang_same_run"]
        assert set(rates["sglang"]) == _PHASES
        assert set(rates["sglang_events"]) == {"served_insert"}
        assert set(ratios) == _PHASES | {"served_insert"}
        for phase in _PHASES:
            want = rates["hicache"][phase] / rates["sglang"][phase]
            assert ratios[phase] == pytest.approx(want, rel=0.01, abs=0.006)
        want = rates["hicache_served"]["served_insert"] / rates["sglang_events"]["served_insert"]
        assert ratios["served_insert"] == pytest.approx(want, rel=0.01, abs=0.006)


def test_peer_import_leaves_no_stand_in_behind(peer: SglangPeer) -> None:
    # transformers and torch keep seeing the real environment after the import
    assert "torchvision" not in sys.modules or peer.stand_ins == {}
    tree = peer.radix_cache.create_simulated(page_size=4, enable_kv_cache_events=True)
    assert type(tree).__module__ == "sglang.srt.mem_cache.radix_cache"


def test_a_wrong_match_fails_the_bench() -> None:
    w = Workload(page_size=4, prefix_tokens=8, unique_tokens=8, requests=3)
    side = hicache_sides(w)["hicache"]
    for a in prepared(side, w.arrays("requests"), insert=True):
        side.insert(a)
    results = [side.match(a) for a in prepared(side, w.arrays("prefix_hits"), insert=False)]
    radix_bench._check(side, results, 8, "match_prefix")  # what the workload promises
    with pytest.raises(RuntimeError, match=r"hicache match_full: matched \[8\] tokens, not 16"):
        radix_bench._check(side, results, 16, "match_full")


@pytest.mark.parametrize("bad", ["0,16", "x", ""])
def test_bad_page_sizes_are_refused(bad: str) -> None:
    parser = argparse.ArgumentParser()
    radix_bench.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args([f"--page-sizes={bad}"])
