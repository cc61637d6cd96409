"""One vLLM CPU engine with hicache secondary tiers, driven through a list of steps; run as a
subprocess by tests/vllm/test_vllm_e2e.py (vLLM spawns processes: hence the ``__main__`` guard).

    python driver.py SCENARIO.json

The scenario names the model folder, the offloading spec (``spec_name`` and, for the test-only
CPU spec, ``spec_module_path``), the ``secondary_tiers`` entries, the output file and the steps,
each one of:

- ``{"op": "gen", "name": N, "prompt": [token ids]}``  greedy generation; the output records
  the tokens, each token's logprob and ``num_cached_tokens`` under ``N``
- ``{"op": "reset"}``  ``LLM.reset_prefix_cache(reset_connector=True)``: the GPU prefix cache
  and the primary tier are emptied, the secondary tiers keep their pages
- ``{"op": "control", "path": P, **knobs}``  write the knobs (``damage``, ``lookup``) into the
  control file of a tier of tests/vllm/observed_tier.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

MAX_TOKENS = 8
#: The test-only spec of tests/vllm/cpu_spec.py (vLLM refuses offloading on CPU otherwise).
CPU_SPEC = {"spec_name": "CpuSlicingTieringSpec", "spec_module_path": "cpu_spec"}


def run(scenario: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    started = time.monotonic()
    llm = LLM(
        model=scenario["model"],
        enforce_eager=True,
        block_size=32,
        enable_prefix_caching=True,
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=4,
        seed=0,
        kv_transfer_config=KVTransferConfig(
            kv_connector="OffloadingConnector",
            kv_role="kv_both",
            kv_connector_extra_config={
                **scenario.get("spec", CPU_SPEC),
                "cpu_bytes_to_use": 64 << 20,
                "secondary_tiers": scenario["secondary_tiers"],
            },
        ),
    )
    out: dict[str, Any] = {"engine_start_s": round(time.monotonic() - started, 1), "gens": {}}
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1, seed=0)
    for step in scenario["steps"]:
        op = step["op"]
        if op == "gen":
            result = llm.generate([TokensPrompt(prompt_token_ids=step["prompt"])], params)[0]
            completion = result.outputs[0]
            assert completion.logprobs is not None
            tokens = list(completion.token_ids)
            logprobs = [lp[t].logprob for t, lp in zip(tokens, completion.logprobs, strict=True)]
            out["gens"][step["name"]] = {
                "tokens": tokens,
                "logprobs": logprobs,
                "cached": int(result.num_cached_tokens or 0),
            }
        elif op == "reset":
            if not llm.reset_prefix_cache(reset_connector=True):
                raise RuntimeError("reset_prefix_cache refused")
        elif op == "control":
            knobs = {k: v for k, v in step.items() if k not in ("op", "path")}
            Path(step["path"]).write_text(json.dumps(knobs))
        else:
            raise ValueError(f"unknown step {op!r}")
    out["total_s"] = round(time.monotonic() - started, 1)
    return out


if __name__ == "__main__":
    scenario = json.loads(Path(sys.argv[1]).read_text())
    result = run(scenario)
    Path(scenario["out"]).write_text(json.dumps(result))
