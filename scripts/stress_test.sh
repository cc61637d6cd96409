#!/usr/bin/env bash
# Stress test: run every concurrency-sensitive test file many times while busy processes load
# the cores, so a test that only passes when a thread runs "soon enough" shows up. Not part of
# `make test` (it takes long); `make stress-test` runs it.
#
#   bash scripts/stress_test.sh                      # every target of STRESS_FILES below
#   bash scripts/stress_test.sh tests/test_calls.py  # chosen targets
#
# A target is one of
#   path/test_x.py                  the whole file
#   path/test_x.py::test_name       one test (a pytest node id; parametrised ids work too)
#   'path/test_x.py::-k EXPR'       the tests of the file that `pytest -k EXPR` selects
# What a target names is exactly what runs: a target that selects nothing, or whose tests skip,
# fails (a skipped test was not stressed).
#
# Environment:
#   STRESS_COUNT   runs of each test (pytest-repeat --count; default 200)
#   STRESS_BUSY    busy-looping processes started for the run and killed after (default 2)
#   PYTHON         interpreter of the venv (default .venv/bin/python)
#   STRESS_LOG     folder for one pytest log per target (default /tmp/hicache-stress); each
#                  pytest gets its own --basetemp under STRESS_LOG/tmp, so the run never sweeps a
#                  /tmp/pytest-of-* folder shared with other pytest runs. Passed tests' tmp_path
#                  folders are removed as they finish, the target's folder once it passed; a
#                  failed target's log and failed tests' folders are kept under STRESS_LOG/failed
#                  (a later run of the target does not overwrite them)
# Prints one line per target (runs passed/failed, seconds, 1-minute load average at start and
# end) and exits non-zero if any run failed.
set -uo pipefail
cd "$(dirname "$0")/.."

# The concurrency-sensitive files: background threads, worker pools, sockets, subprocesses,
# bounded waits. A slow file is narrowed to its concurrency-sensitive tests; what the rest of it
# checks (codecs, config, arithmetic, single-threaded logic) cannot depend on timing.
STRESS_FILES=(
    # the PUB socket, the replay server and subscriber threads, an overflow under a gated
    # publisher, a cache publishing its own events; left out: codec and config checks, the
    # bind error, the torch-free import in a subprocess
    'tests/test_event_publisher.py::-k subscriber or overflow or publishes'
    # left out: the 20-seed property test of the queue (single-threaded, no timing)
    'tests/test_event_overflow.py::-k not consumer_view'
    # worker threads against deadlines, a hung call with one queued behind it, the breaker fed
    # by deadline misses, close, threads started on demand; left out: retry/classify logic run
    # on the caller's thread and the subprocess exit test
    'tests/test_calls.py::-k deadline or hung_one or breaker or on_demand or closed_caller'
    tests/test_breaker.py
    # the laned pool: reads ahead of writes, one wake-up per submit, run_here, shutdown
    tests/test_lanes.py
    tests/test_tier_reopen.py
    tests/test_storage_engine.py
    # left out: the settings read from a config (no tier runs)
    'tests/test_storage_tiers_engine.py::-k not from_config_settings'
    # a hung tier (publish, prefetch, backpressure), a slow tier, the breaker through the cache;
    # left out: failures that need no timing (failed keys, errors, corruption, vanished pages)
    'tests/test_hiradix_faults.py::-k hang or latency or breaker or backpressure or hung'
    # two instances sharing a tier, ranks agreeing on acks; left out: one-cache prefetch rules
    'tests/test_hiradix_storage.py::-k second_instance or rank_sync or serving_loop'
    tests/test_faults.py
    # the refresh race of issue 15, the shared worker pool, racing conditional puts, close
    # during calls; left out: object layout, listing and option checks against the server
    'backends/s3/tests/test_s3_backend.py::-k refresh or concurrent or racing or close_during'
    # the server killed mid-batch, a frozen server, the bucket deleted under calls; left out:
    # open-time errors and addressing styles
    'backends/s3/tests/test_s3_faults.py::-k killed or frozen or bucket_deleted'
    backends/s3/tests/test_s3_shared.py
    # processes writing, evicting and reading one slot file; left out: the geometry checks at open
    'backends/mmap/tests/test_mmap_shared.py::-k two_processes or racing or three_times'
    # left out: the single-process reopen and msync round trips
    'backends/mmap/tests/test_mmap_crash.py::-k sigkill'
    backends/localdisk/tests/test_localdisk_shared.py
    backends/localdisk/tests/test_localdisk_crash.py
    plugins/fsspec/tests/test_fsspec_crash.py
    tests/test_hiradix_event_order.py
    tests/test_events_router.py
    tests/test_tier_clear.py
    # the scrape of a live replay's metrics server; the rest parses and formats offline
    tests/test_metrics.py::test_replay_serves_metrics_while_it_runs
    # SGLang's call sequence and two TP ranks on one store, over the S3 server's worker pool and
    # a shared mmap file, and a tier that is down; left out: the in-process memory and localdisk
    # variants, pool arithmetic, config and stats shape
    'tests/test_sglang_adapter.py::-k (round_trips or tp_ranks) and (s3 or mmap) or tier_down'
    backends/mmap/tests/test_mmap_close.py
    backends/s3/tests/test_s3_startup.py
    backends/valkey/tests/test_valkey_faults.py
    backends/valkey/tests/test_valkey_shared.py
    backends/localdisk/tests/test_localdisk_not_regular.py
    # added after the first sessions: the I/O lanes' gated writes, reads ahead of them and
    # shutdown with jobs queued (threads, condition waits)
    tests/test_lanes.py
    # a publishing process SIGKILLed once it announced pages; left out: nothing (one test)
    tests/test_publish_crash.py
    # puts held past their deadline and released by the test, results polled while they land
    tests/test_late_acks.py
    # evictions and expiries reported by the server's notifications on a listener thread;
    # left out: the server-less event decoding
    'backends/valkey/tests/test_valkey_eviction.py::-k maxmemory_evictions or ttl_expiry'
    backends/valkey/tests/test_valkey_cluster.py::test_pages_spread_and_expiry_reported_from_every_node
    # threads racing on one object; left out in each file: the single-threaded checks
    backends/localdisk/tests/test_localdisk_capacity.py::test_concurrent_writers_keep_accounting_exact
    # reads racing the evictions whose files puts reuse (a reused file must never be read)
    'backends/localdisk/tests/test_localdisk_spares.py::-k racing'
    # a read in flight holding its pack record while the page is deleted (events, no sleeps),
    # and readers racing puts that punch the records they read
    'backends/localdisk/tests/test_localdisk_packs.py::-k read_holds or racing'
    plugins/fsspec/tests/test_fsspec_backend.py::test_racing_puts_of_one_key_store_exactly_one_page
    tests/test_events.py::test_queue_is_thread_safe
    tests/test_buffers.py::test_copies_from_threads_run_concurrently_and_stay_exact
    tests/test_eviction.py::test_lru_concurrent_use_keeps_accounting_exact
    tests/test_pools.py::test_holds_are_thread_safe
    tests/test_reuse_policy.py::test_concurrent_use_keeps_accounting_exact
)

COUNT=${STRESS_COUNT:-200}
BUSY=${STRESS_BUSY:-2}
PY=${PYTHON:-.venv/bin/python}
LOG=${STRESS_LOG:-/tmp/hicache-stress}
mkdir -p "$LOG/tmp"  # pytest makes --basetemp itself but not its parent
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

# "N passed, M failed, ..." of a pytest summary line -> the count of one outcome (0 if absent)
outcome() { grep -oE "[0-9]+ $1" <<<"$2" | grep -oE '^[0-9]+' || echo 0; }
load1() { cut -d' ' -f1 /proc/loadavg; }

failed=0
for target in "${targets[@]}"; do
    if [[ "$target" == *"::-k "* ]]; then
        args=("${target%%::-k *}" -k "${target#*::-k }")
    else
        args=("$target")
    fi
    name=$(printf '%s' "$target" | tr -c 'A-Za-z0-9_.=-' '_' | cut -c1-150)
    tmp="$LOG/tmp/$name"
    start=$SECONDS load_start=$(load1)
    "$PY" -m pytest -q -p no:cacheprovider --count "$COUNT" --basetemp "$tmp" \
        -o tmp_path_retention_policy=failed "${args[@]}" >"$LOG/$name.log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then
        rm -rf "$tmp"
    else
        kept="$LOG/failed/$name.$(date +%Y%m%dT%H%M%S)"
        mkdir -p "$kept" && cp "$LOG/$name.log" "$kept/pytest.log"
        [ ! -d "$tmp" ] || mv "$tmp" "$kept/tmp"
    fi
    summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|deselected)|no tests ran|error' \
        "$LOG/$name.log" | tail -1)
    passed=$(outcome passed "$summary")
    # every selected test ran COUNT times and passed: nothing failed, skipped or errored
    if [ "$rc" -eq 0 ] && { [ "$passed" -eq 0 ] || [ $((passed % COUNT)) -ne 0 ] ||
        [ "$(outcome skipped "$summary")" -ne 0 ] || [ "$(outcome xfailed "$summary")" -ne 0 ]; }; then
        rc=1
        summary="$summary (NOT every selected test ran $COUNT times)"
    fi
    printf '%-70s rc=%d %4ds load %s-%s  %s\n' "$target" "$rc" $((SECONDS - start)) \
        "$load_start" "$(load1)" "$summary"
    [ "$rc" -eq 0 ] || failed=1
done
exit "$failed"
