#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU, run the CUDA-marked tests of the cache side and the
# device<->host transfer benchmark (engine vs a plain copy_ of the same bytes), and, with
# SGLANG_MODEL set on a machine with SGLang, an SGLang server using hicache tiers as its L3, and,
# where vLLM is installed, vLLM's stock tiering with hicache secondary tiers (step 6).
#
#   bash scripts/gpu_check.sh            # figures on stdout; JSON in $GPU_CHECK_OUT (default /tmp)
#
# Environment:
#   PYTHON           interpreter to start from (default: python3). A torch that already sees the
#                    GPU is reused through a --system-site-packages venv; nothing is downloaded.
#   GPU_VENV         venv path (default: /tmp/hicache-gpu-venv)
#   GPU_CHECK_OUT    folder for bench JSON and logs (default: /tmp/hicache-gpu-check)
#   GPU_TEST_PATHS   test files to run with -m cuda (default: the torch-only cache-side tests;
#                    pydantic/stevedore may be missing on a GPU image, so storage tests are not
#                    collected here)
#   BENCH_ARGS       extra arguments for python -m hicache.tools.transfer_bench
#   SGLANG_MODEL     a local model path (or cached name) for the SGLang serving run: SGLang with
#                    hicache tiers as its L3 (step 5); skipped when unset or SGLang is missing
#   VLLM_PYTHON      an interpreter with a CUDA build of vLLM 0.32 (default: the one above): runs
#                    tests/vllm/test_vllm_e2e.py with vLLM's stock TieringOffloadingSpec and its
#                    GPU copy path (step 6); skipped when it has no vLLM or sees no GPU
#   ALLOW_CPU=1      run anyway without a GPU (a smoke test of this script; CUDA tests skip)
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
PY0=${PYTHON:-python3}
VENV=${GPU_VENV:-/tmp/hicache-gpu-venv}
OUTDIR=${GPU_CHECK_OUT:-/tmp/hicache-gpu-check}
mkdir -p "$OUTDIR"
say() { printf '[gpu_check %3ds] %s\n' "$((SECONDS - START))" "$*"; }

if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L || true; else say "no nvidia-smi"; fi

# 1. An interpreter with a CUDA torch: reuse one that is installed; install only if missing.
has_torch() {  # $1: python; true if its torch sees a GPU (or imports at all, with ALLOW_CPU=1)
    "$1" -c 'import sys, torch
sys.exit(0 if torch.cuda.is_available() or sys.argv[1] == "1" else 1)' "${ALLOW_CPU:-0}" 2>/dev/null
}
if has_torch "$PY0"; then
    PY="$PY0"
    if [ -x "$VENV/bin/python" ] || "$PY0" -m venv --system-site-packages "$VENV" >/dev/null 2>&1
    then
        if ! has_torch "$VENV/bin/python"; then
            # $PY0 may itself live in a venv (GPU images often do): --system-site-packages then
            # misses its packages, so link them in with a .pth file.
            site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
            "$PY0" -c 'import site; print("\n".join(site.getsitepackages()))' \
                >"$site/_base_env.pth" || true
        fi
        if has_torch "$VENV/bin/python"; then PY="$VENV/bin/python"; fi
    fi
    say "reusing the installed torch of $PY0 (running $PY)"
else
    say "no torch that sees a GPU in $PY0: creating $VENV and installing torch"
    [ -x "$VENV/bin/python" ] || "$PY0" -m venv "$VENV"
    PY="$VENV/bin/python"
    "$PY" -m pip install -q torch numpy pytest pytest-timeout hypothesis
    has_torch "$PY" || { say "torch installed but sees no GPU: nothing to check"; exit 2; }
fi
for mod in numpy pytest hypothesis; do
    "$PY" -c "import $mod" 2>/dev/null || "$PY" -m pip install -q "$mod" \
        || { say "missing $mod and could not install it"; exit 2; }
done

# 2. The repo itself: an editable install without dependencies (works offline); the cache side
#    needs only torch. If pip cannot do it, the source tree on PYTHONPATH does the same.
if [ "$PY" != "$PY0" ] && "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
        >"$OUTDIR/pip.log" 2>&1; then
    say "installed hicache editable into $VENV"
else
    say "using the source tree on PYTHONPATH (see $OUTDIR/pip.log if pip was tried)"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available={torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device: {torch.cuda.get_device_name(0)}")
PYEOF

# From here on every step runs even if an earlier one failed; the exit status sums them up.
set +e
# 3. CUDA-marked tests (never faked: they skip where torch sees no GPU).
PATHS=${GPU_TEST_PATHS:-tests/test_pools.py tests/test_transfer.py}
say "pytest -m cuda $PATHS"
# shellcheck disable=SC2086
timeout 150 "$PY" -m pytest -m cuda -q -p no:cacheprovider -o addopts="--import-mode=importlib -ra" \
    $PATHS 2>&1 | tee "$OUTDIR/pytest.log"
TEST_RC=${PIPESTATUS[0]}

# 4. Transfer benchmark: a Llama-3-8B-shaped page (32 layers, 8 KV heads, dim 128, 64 tokens,
#    bf16: 8 MiB), then an MLA-shaped one (DeepSeek-V3: 61 layers, latent 576, 64 tokens).
say "transfer benchmark"
# shellcheck disable=SC2086
timeout 90 "$PY" -m hicache.tools.transfer_bench --json "$OUTDIR/transfer_bench.json" ${BENCH_ARGS:-} \
    | tee "$OUTDIR/transfer_bench.txt"
BENCH_RC=${PIPESTATUS[0]}
# shellcheck disable=SC2086
timeout 60 "$PY" -m hicache.tools.transfer_bench --mla --layers 61 --kv-heads 1 --head-dim 576 \
    --json "$OUTDIR/transfer_bench_mla.json" ${BENCH_ARGS:-} | tee "$OUTDIR/transfer_bench_mla.txt"
MLA_RC=${PIPESTATUS[0]}

# 5. SGLang serving with hicache tiers as its L3 (hicache.integrations.sglang): the same long
#    prompt twice with the GPU and host caches flushed in between, so the second request can only
#    reuse KV through the localdisk tier. Needs a full SGLang install and a local model.
SGLANG_RC=0
if [ -n "${SGLANG_MODEL:-}" ] && "$PY" -c 'import sglang' 2>/dev/null; then
    say "SGLang serving run with the hicache adapter ($SGLANG_MODEL)"
    L3="$OUTDIR/sglang-l3"; rm -rf "$L3"; mkdir -p "$L3"
    PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    EXTRA=$(printf '{"backend_name": "hicache", "module_path": "hicache.integrations.sglang", "class_name": "HicacheStorage", "interface_v1": 1, "tiers": {"nvme": {"backend": "localdisk", "options": {"root": "%s", "shared": true, "max_bytes": "8GiB"}}}}' "$L3")
    "$PY" -m sglang.launch_server --model-path "$SGLANG_MODEL" --host 127.0.0.1 --port "$PORT" \
        --page-size 64 --enable-hierarchical-cache --hicache-mem-layout page_first \
        --hicache-storage-backend dynamic --hicache-storage-backend-extra-config "$EXTRA" \
        >"$OUTDIR/sglang_server.log" 2>&1 &
    SERVER=$!
    up=0
    for _ in $(seq 1 240); do
        if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then up=1; break; fi
        kill -0 "$SERVER" 2>/dev/null || break
        sleep 1
    done
    if [ "$up" = 1 ]; then
        PROMPT=$("$PY" -c 'print(" ".join(f"word{i}" for i in range(3000)))')
        BODY=$("$PY" -c 'import json, sys; print(json.dumps({"text": sys.argv[1],
            "sampling_params": {"max_new_tokens": 16, "temperature": 0}}))' "$PROMPT")
        first=$(curl -sf -H 'Content-Type: application/json' -d "$BODY" "http://127.0.0.1:$PORT/generate")
        sleep 5  # write-through to L3 is asynchronous
        curl -sf -X POST "http://127.0.0.1:$PORT/flush_cache" >/dev/null || true
        second=$(curl -sf -H 'Content-Type: application/json' -d "$BODY" "http://127.0.0.1:$PORT/generate")
        pages=$(find "$L3" -type f | wc -l)
        say "L3 page files: $pages; same output twice: $([ "$first" = "$second" ] && echo yes || echo no)"
        grep -i "hicache adapter" "$OUTDIR/sglang_server.log" | tail -5
        if [ "$pages" -eq 0 ] || [ -z "$first" ] || [ "$first" != "$second" ] \
            || grep -q "hicache adapter: .* failed" "$OUTDIR/sglang_server.log"; then
            SGLANG_RC=1
        fi
    else
        say "SGLang server did not come up: see $OUTDIR/sglang_server.log"; SGLANG_RC=1
    fi
    kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null
else
    say "SGLang serving run skipped (set SGLANG_MODEL and install sglang to run it)"
fi

# 6. vLLM with hicache secondary tiers through its stock TieringOffloadingSpec: the end-to-end
#    tests of `make vllm-test` (two engines, localdisk and mmap tiers, sharing, damage with and
#    without checksums) with vLLM's own GPU <-> CPU copy instead of the test-only CPU spec.
#    hicache and the two backends go in editable without dependencies (offline).
VLLM_RC=0
VPY=${VLLM_PYTHON:-$PY}
if "$VPY" -c 'import sys, torch, vllm; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
then
    say "vLLM end-to-end, stock TieringOffloadingSpec (vLLM $("$VPY" -c 'import vllm; print(vllm.__version__)'))"
    "$VPY" -m pip install -q --no-deps --no-build-isolation -e . -e ./backends/localdisk \
        -e ./backends/mmap >"$OUTDIR/vllm_pip.log" 2>&1 || say "pip failed: see $OUTDIR/vllm_pip.log"
    HICACHE_VLLM_SPEC=stock timeout 600 "$VPY" -m pytest -q -s -p no:cacheprovider \
        -o addopts="--import-mode=importlib -ra" tests/vllm/test_vllm_e2e.py 2>&1 \
        | tee "$OUTDIR/vllm_e2e.log"
    VLLM_RC=${PIPESTATUS[0]}
else
    say "vLLM end-to-end skipped (no vLLM seeing a GPU in $VPY; set VLLM_PYTHON)"
fi

say "done: pytest rc=$TEST_RC, bench rc=$BENCH_RC, mla bench rc=$MLA_RC, sglang rc=$SGLANG_RC, vllm rc=$VLLM_RC; outputs in $OUTDIR"
[ "$TEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ] && [ "$MLA_RC" = 0 ] && [ "$SGLANG_RC" = 0 ] \
    && [ "$VLLM_RC" = 0 ]
