"""hicache tiers inside a real vLLM 0.32 CPU engine (``make vllm-test``, in .venv-vllm).

Two engine processes in sequence, each running tests/vllm/driver.py with stock vLLM tiering
(``TieringOffloadingSpec``; only the device <-> primary copy is replaced, by the test-only
tests/vllm/cpu_spec.py) and hicache secondary tiers wrapped to be observed
(tests/vllm/observed_tier.py). A prompt of 200 tokens is 6 full chunks of 32.

Engine 1, one localdisk tier with checksums off:
  P1; P1 again (GPU prefix cache: the reference for a cached run); reset (GPU prefix cache and
  primary tier emptied, the secondary tier kept); P1 from the tier; damage on, reset, P1 from
  the damaged tier; damage off; P2.
Engine 2, three vLLM tiers asked in order: ``other`` (another model name, same localdisk root,
publishes nothing), ``shm`` (mmap) and ``same`` (engine 1's localdisk root, checksums on):
  P2 (only engine 1's pages can serve it); P3; reset; P3 from mmap; mmap tier hidden, damage
  on for ``same``, reset; P3 from the damaged localdisk tier (checksums turn it into misses).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is installed only in .venv-vllm: `make vllm-test` runs these tests"
)

from hicache.integrations.vllm_parts import page_key

HERE = Path(__file__).resolve().parent
#: ``HICACHE_VLLM_SPEC=stock`` (scripts/gpu_check.sh on a GPU machine) runs the same engines
#: with vLLM's own TieringOffloadingSpec and its GPU copy path instead of the test-only one.
SPEC = (
    {"spec_name": "TieringOffloadingSpec"}
    if os.environ.get("HICACHE_VLLM_SPEC") == "stock"
    else {"spec_name": "CpuSlicingTieringSpec", "spec_module_path": "cpu_spec"}
)
#: One engine process (imports, start, a few generations): about 2 minutes on 2 idle cores, 5
#: to 9 when many other jobs share them.
ENGINE_TIMEOUT_S = 900
#: Two engine processes run in the module's fixture: bounded per engine (``ENGINE_TIMEOUT_S``),
#: not by the suite's 300 s per test.
pytestmark = pytest.mark.timeout(2 * ENGINE_TIMEOUT_S + 300)
PROMPT_TOKENS = 200
CHUNK_TOKENS = 32


def _prompts(vocab: int) -> dict[str, list[int]]:
    rng = random.Random(23)
    return {
        name: [1] + [rng.randrange(3, vocab) for _ in range(PROMPT_TOKENS - 1)]
        for name in ("p1", "p2", "p3")
    }


def _observed(name: str, work: Path, tiers: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "type": "ObservedTierManager",
        "module_path": "observed_tier",
        "observe_log": str(work / f"{name}.log.json"),
        "observe_control": str(work / f"{name}.control.json"),
        "tiers": tiers,
        **extra,
    }


def _engine(scenario: dict[str, Any], work: Path, name: str) -> dict[str, Any]:
    path = work / f"{name}.scenario.json"
    scenario["out"] = str(work / f"{name}.out.json")
    scenario["spec"] = SPEC
    path.write_text(json.dumps(scenario))
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_NUM_OF_RESERVED_CPU="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]),
    )
    log = work / f"{name}.engine.log"
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, str(HERE / "driver.py"), str(path)],
            cwd=HERE,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=ENGINE_TIMEOUT_S,
            check=False,
        )
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise AssertionError(f"engine {name} exited {proc.returncode}:\n{tail}")
    return dict(json.loads(Path(scenario["out"]).read_text()))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tiny_model import make_tiny_llama

    work = tmp_path_factory.mktemp("vllm_e2e")
    model = make_tiny_llama(work / "model")
    vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
    p = _prompts(vocab)
    root = str(work / "disk")

    def disk(verify: bool, **settings: Any) -> dict[str, Any]:
        options = {"root": root, "shared": True, "verify_checksums": verify}
        return {"disk": {"backend": "localdisk", **settings, "options": options}}

    first = _engine(
        {
            "model": str(model),
            "secondary_tiers": [_observed("e1", work, disk(verify=False))],
            "steps": [
                {"op": "gen", "name": "p1", "prompt": p["p1"]},
                {"op": "gen", "name": "p1_gpu_cached", "prompt": p["p1"]},
                {"op": "reset"},
                {"op": "gen", "name": "p1_from_tier", "prompt": p["p1"]},
                {"op": "control", "path": str(work / "e1.control.json"), "damage": True},
                {"op": "reset"},
                {"op": "gen", "name": "p1_damaged", "prompt": p["p1"]},
                {"op": "control", "path": str(work / "e1.control.json"), "damage": False},
                {"op": "gen", "name": "p2", "prompt": p["p2"]},
            ],
        },
        work,
        "e1",
    )
    shm = {
        "shm": {
            "backend": "mmap",
            "options": {"path": str(work / "shm.slots"), "capacity": "64MiB", "prefault": False},
        }
    }
    second = _engine(
        {
            "model": str(model),
            "secondary_tiers": [
                _observed("other", work, disk(verify=True, publish=False), model_name="other"),
                _observed("shm", work, shm),
                _observed("same", work, disk(verify=True)),
            ],
            "steps": [
                {"op": "gen", "name": "p2_shared", "prompt": p["p2"]},
                {"op": "gen", "name": "p3", "prompt": p["p3"]},
                {"op": "reset"},
                {"op": "gen", "name": "p3_from_shm", "prompt": p["p3"]},
                {"op": "control", "path": str(work / "shm.control.json"), "lookup": False},
                {"op": "control", "path": str(work / "same.control.json"), "damage": True},
                {"op": "reset"},
                {"op": "gen", "name": "p3_damaged_verified", "prompt": p["p3"]},
            ],
        },
        work,
        "e2",
    )
    names = ("e1", "other", "shm", "same")
    logs = {n: json.loads((work / f"{n}.log.json").read_text()) for n in names}
    out = {"e1": first, "e2": second, "logs": logs}
    print("\nvLLM e2e results:", json.dumps({k: out[k] for k in ("e1", "e2")}, indent=1))
    return out


def _same_output(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return bool(a["tokens"] == b["tokens"] and a["logprobs"] == b["logprobs"])


def _disk(log: dict[str, Any]) -> dict[str, Any]:
    return dict(log["disk"])


def test_blocks_come_back_from_a_localdisk_tier_with_equal_tokens_and_logprobs(
    runs: dict[str, Any],
) -> None:
    gens = runs["e1"]["gens"]
    first, reference, again = gens["p1"], gens["p1_gpu_cached"], gens["p1_from_tier"]
    assert again["cached"] > 0
    assert again["cached"] == reference["cached"] == 6 * CHUNK_TOKENS
    assert _same_output(again, first)
    assert _same_output(again, reference)
    # hicache's get_into was called for exactly the chunks vLLM reported as cached, all of
    # them chunks this engine had stored
    disk = _disk(runs["logs"]["e1"])
    p1_reads = disk["get"][: again["cached"] // CHUNK_TOKENS]
    assert len(set(p1_reads)) == again["cached"] // CHUNK_TOKENS
    assert set(p1_reads) <= set(disk["put"])


def test_negative_control_damaged_bytes_reach_attention_when_checksums_are_off(
    runs: dict[str, Any],
) -> None:
    gens = runs["e1"]["gens"]
    damaged = gens["p1_damaged"]
    assert damaged["cached"] > 0  # served by the tier, damage and all
    assert runs["logs"]["e1"]["disk"]["injected"]["damaged"] > 0
    assert not _same_output(damaged, gens["p1"])


def test_a_second_engine_process_finds_the_first_ones_blocks(runs: dict[str, Any]) -> None:
    shared, original = runs["e2"]["gens"]["p2_shared"], runs["e1"]["gens"]["p2"]
    assert shared["cached"] == 6 * CHUNK_TOKENS
    assert _same_output(shared, original)
    same = _disk(runs["logs"]["same"])
    assert len(set(same["get"]) & set(runs["logs"]["e1"]["disk"]["put"])) == 6


def test_another_model_name_finds_nothing_on_the_same_disk(runs: dict[str, Any]) -> None:
    other, same = runs["logs"]["other"], runs["logs"]["same"]
    assert other["_adapter"]["namespace"] != same["_adapter"]["namespace"]
    assert same["_adapter"]["namespace"] == runs["logs"]["e1"]["_adapter"]["namespace"]
    assert other["disk"]["get"] == [] and other["disk"]["put"] == []
    counters = other["_adapter"]["tiers"]["disk"]
    assert counters["lookups"] > 0 and counters["hit_pages"] == 0


def test_blocks_come_back_from_an_mmap_tier(runs: dict[str, Any]) -> None:
    gens = runs["e2"]["gens"]
    assert gens["p3_from_shm"]["cached"] == 6 * CHUNK_TOKENS
    assert _same_output(gens["p3_from_shm"], gens["p3"])
    shm = runs["logs"]["shm"]["shm"]
    assert len(set(shm["get"])) == 6 and set(shm["get"]) <= set(shm["put"])


def test_checksums_turn_the_same_damage_into_misses_and_the_output_stays_right(
    runs: dict[str, Any],
) -> None:
    gens = runs["e2"]["gens"]
    same = runs["logs"]["same"]
    assert same["disk"]["injected"]["damaged"] > 0
    assert same["_adapter"]["tiers"]["disk"]["get_corrupt"] > 0
    assert _same_output(gens["p3_damaged_verified"], gens["p3"])


def test_page_keys_are_namespaced_hashes_of_vllm_keys() -> None:
    key = bytes(range(32)) + (0).to_bytes(4, "big")
    assert page_key(key) == page_key(bytes(key))
    assert page_key(key) != page_key(bytes(range(32)) + (1).to_bytes(4, "big"))
    assert len(page_key(key)) == 64
