#!/usr/bin/env bash
# Stress test: run every concurrency-sensitive test file many times while busy processes load
# the cores, so a test that only passes when a thread runs "soon enough" shows up. Not part of
# `make test` (it takes long); `make stress-test` runs it.
#
#   bash scripts/stress_test.sh                      # every file of STRESS_FILES below
#   bash scripts/stress_test.sh tests/test_calls.py  # chosen files or test ids
#
# Environment:
#   STRESS_COUNT   runs of each test (pytest-repeat --count; default 200)
#   STRESS_BUSY    busy-looping processes started for the run and killed after (default 2)
#   PYTHON         interpreter of the venv (default .venv/bin/python)
#   STRESS_LOG     folder for one pytest log per file (default /tmp/hicache-stress)
# Prints one line per file (runs passed/failed) and exits non-zero if any run failed.
set -uo pipefail
cd "$(dirname "$0")/.."

# The concurrency-sensitive files: background threads, worker pools, sockets, subprocesses,
# bounded waits.
STRESS_FILES=(
    tests/test_event_publisher.py
    tests/test_event_overflow.py
    tests/test_calls.py
    tests/test_breaker.py
    tests/test_tier_reopen.py
    tests/test_storage_engine.py
    tests/test_storage_tiers_engine.py
    tests/test_hiradix_faults.py
    tests/test_hiradix_storage.py
    tests/test_faults.py
    backends/s3/tests/test_s3_backend.py
    backends/s3/tests/test_s3_faults.py
    backends/s3/tests/test_s3_shared.py
    backends/mmap/tests/test_mmap_shared.py
    backends/mmap/tests/test_mmap_crash.py
    backends/localdisk/tests/test_localdisk_shared.py
    backends/localdisk/tests/test_localdisk_crash.py
    plugins/fsspec/tests/test_fsspec_crash.py
    tests/test_hiradix_event_order.py
    tests/test_events_router.py
    tests/test_tier_clear.py
    tests/test_metrics.py
    tests/test_sglang_adapter.py
    backends/mmap/tests/test_mmap_close.py
    backends/s3/tests/test_s3_startup.py
    backends/valkey/tests/test_valkey_faults.py
    backends/valkey/tests/test_valkey_shared.py
    backends/localdisk/tests/test_localdisk_not_regular.py
)

COUNT=${STRESS_COUNT:-200}
BUSY=${STRESS_BUSY:-2}
PY=${PYTHON:-.venv/bin/python}
LOG=${STRESS_LOG:-/tmp/hicache-stress}
mkdir -p "$LOG"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${STRESS_FILES[@]}")

busy=()
stop_busy() {
    for pid in "${busy[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${busy[@]}"; do wait "$pid" 2>/dev/null; done
}
trap stop_busy EXIT
trap 'exit 130' INT TERM  # stop here (the EXIT trap kills the busy processes)
for _ in $(seq "$BUSY"); do
    "$PY" -c 'while True: pass' &
    busy+=($!)
done
echo "stress: ${#targets[@]} target(s), --count $COUNT, $BUSY busy process(es), logs in $LOG"

failed=0
for target in "${targets[@]}"; do
    name=$(echo "$target" | tr '/:' '__')
    start=$SECONDS
    "$PY" -m pytest -q -p no:cacheprovider --count "$COUNT" "$target" >"$LOG/$name.log" 2>&1
    rc=$?
    summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed)|no tests ran|error' "$LOG/$name.log" | tail -1)
    printf '%-70s rc=%d %4ds  %s\n' "$target" "$rc" $((SECONDS - start)) "$summary"
    [ "$rc" -eq 0 ] || failed=1
done
exit "$failed"
