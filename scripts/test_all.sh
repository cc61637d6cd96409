#!/usr/bin/env bash
# `make test`: every step of the suite, overlapped so it fits 15 minutes on 2 cores.
#
#   1. hicache into .venv-vllm (seconds), then .venv: one editable install at a time, before any
#      test runs, because each rewrites this checkout's *.egg-info, which a `python -c` started
#      here reads (its sys.path starts with the working folder).
#   2. vLLM and its dependencies into .venv-vllm in the background from the start (mostly a
#      ~700 MB download and unpacking; waits on the network, not the cores).
#   3. The main pytest suite in the background (its output live), while this shell runs lint,
#      typecheck and, once step 2 is done, tests/vllm (its own --basetemp) on the other core.
#
# Every step runs whatever another one did; the run fails if any step failed. The side steps'
# output is printed after the main suite (a failed vLLM build prints its pip log), then one
# line per step: its wall time and the CPU time of its processes. Logs stay in TEST_LOGS.
#
# Environment: MAKE (the make that called this), TEST_LOGS (default .test-logs), VLLM_VENV.
set -uo pipefail
cd "$(dirname "$0")/.."

make_=("${MAKE:-make}" --no-print-directory)
vllm_venv=${VLLM_VENV:-.venv-vllm}
logs=${TEST_LOGS:-.test-logs}
rm -rf "$logs"
mkdir -p "$logs"
: >"$logs/summary"

# Background steps run in sessions of their own so that an interrupted or failed run stops
# their whole process trees (pip, engine processes), not only the first process.
groups=()
stop_groups() {
    local g
    for g in "${groups[@]}"; do
        kill -KILL -- "-$g" 2>/dev/null
    done
}
trap stop_groups EXIT
trap 'exit 130' INT TERM

# timed NAME CMD...: run CMD and add its wall time and CPU time (user + system, of every
# process it waited for) to the summary; returns CMD's exit status.
timed() {
    local name=$1 rc wall user sys
    shift
    local TIMEFORMAT="%R %U %S"
    { time "$@" 2>&4; } 4>&2 2>"$logs/$name.time"
    rc=$?
    read -r wall user sys <"$logs/$name.time"
    awk -v n="$name" -v w="$wall" -v c="$(awk -v u="$user" -v s="$sys" 'BEGIN{print u+s}')" \
        -v rc="$rc" 'BEGIN{printf "%-16s %5.0f s wall %5.0f s CPU  %s\n", n, w, c,
        rc == 0 ? "ok" : "FAILED (exit " rc ")"}' >>"$logs/summary"
    return "$rc"
}

start=$SECONDS
timed vllm-hicache "${make_[@]}" "$vllm_venv/.hicache" || exit 1
setsid bash -c "$(declare -f timed); logs='$logs'; timed vllm-venv \"\$@\"" _ \
    "${make_[@]}" "$vllm_venv/.installed" >"$logs/vllm-venv.log" 2>&1 &
vllm_build=$!
groups+=("$vllm_build")
timed venv "${make_[@]}" venv || exit 1

setsid bash -c "$(declare -f timed); logs='$logs'; timed pytest \"\$@\"" _ \
    "${make_[@]}" pytest &
main_suite=$!
groups+=("$main_suite")

failed=0
timed lint "${make_[@]}" lint >"$logs/lint.log" 2>&1 || failed=1
timed typecheck "${make_[@]}" typecheck >"$logs/typecheck.log" 2>&1 || failed=1
shown=(lint typecheck)
if wait "$vllm_build"; then
    timed vllm-test "${make_[@]}" vllm-test >"$logs/vllm-test.log" 2>&1 || failed=1
    shown+=(vllm-test)
else
    failed=1
    shown+=(vllm-venv)
    echo "vllm-test not run: building $vllm_venv failed" >>"$logs/summary"
fi
wait "$main_suite" || failed=1
groups=()

for step in "${shown[@]}"; do
    echo "===== $step ($logs/$step.log)"
    cat "$logs/$step.log"
done
echo "===== make test: $((SECONDS - start)) s; per step (steps overlap):"
cat "$logs/summary"
exit "$failed"
