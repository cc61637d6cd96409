"""Backpressure gate, prefetch rules and outcomes, per-tier counters as plain data."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

import pytest

from hicache.config import PrefetchConfig
from hicache.storage.backend import PageStatus
from hicache.testing.clock import ManualClock
from hicache.tiering.admission import SecondHitAdmit
from hicache.tiering.breaker import CircuitBreaker
from hicache.tiering.calls import FailureCounts, FailureKind
from hicache.tiering.inflight import InflightGate
from hicache.tiering.prefetch import (
    PrefetchOutcome,
    PrefetchPolicy,
    PrefetchRules,
    PrefetchWait,
    prefetch_outcome,
    usable_prefix,
)
from hicache.tiering.stats import TierCounters, tier_snapshot

OK, NF, CORRUPT, FAILED = (
    PageStatus.OK,
    PageStatus.NOT_FOUND,
    PageStatus.CORRUPT,
    PageStatus.FAILED,
)

#: The ``run_python`` fixture of tests/conftest.py.
RunPython = Callable[..., "subprocess.CompletedProcess[str]"]


# ---------------------------------------------------------------------- backpressure


def test_gate_drops_past_the_bound_and_counts() -> None:
    gate = InflightGate(100)
    assert gate.try_acquire(60)
    assert gate.try_acquire(40)
    assert not gate.try_acquire(1)
    gate.release(60)
    assert gate.try_acquire(50)
    assert not gate.try_acquire(20)
    s = gate.stats()
    assert s["inflight_bytes"] == 90 and s["peak_bytes"] == 100
    assert s["dropped"] == 2 and s["dropped_bytes"] == 21 and s["admitted"] == 3


def test_gate_lets_one_oversized_publish_through_when_idle() -> None:
    gate = InflightGate(10)
    assert gate.try_acquire(50)
    assert not gate.try_acquire(1)
    gate.release(50)
    assert gate.inflight_bytes == 0
    with pytest.raises(ValueError, match="release"):
        gate.release(1)
    with pytest.raises(ValueError):
        InflightGate(0)


# ---------------------------------------------------------------------- prefetch


def test_usable_prefix_and_outcomes() -> None:
    assert usable_prefix([OK, OK, NF, OK]) == 2
    assert usable_prefix([]) == 0
    assert prefetch_outcome(3, [OK, OK, OK]) is PrefetchOutcome.COMPLETE
    # a page that vanished between exists and get: shorter, not an error
    assert prefetch_outcome(3, [OK, NF, OK]) is PrefetchOutcome.SHORT
    assert prefetch_outcome(3, [OK, CORRUPT, OK]) is PrefetchOutcome.FAILED
    assert prefetch_outcome(3, [FAILED, OK, OK]) is PrefetchOutcome.FAILED
    assert prefetch_outcome(3, [OK], timed_out=True) is PrefetchOutcome.TIMED_OUT
    assert prefetch_outcome(0, []) is PrefetchOutcome.MISS
    # fewer statuses than requested (the cascade found less): short
    assert prefetch_outcome(4, [OK, OK]) is PrefetchOutcome.SHORT


def test_wait_budget_per_policy() -> None:
    best = PrefetchRules(PrefetchPolicy.BEST_EFFORT)
    assert best.wait_budget(10_000) == 0.0
    assert PrefetchRules(PrefetchPolicy.WAIT_COMPLETE).wait_budget(10_000) is None
    timeout = PrefetchRules(
        PrefetchPolicy.TIMEOUT,
        timeout_base_s=1.0,
        timeout_per_1k_tokens_s=0.5,
        timeout_max_s=3.0,
    )
    assert timeout.wait_budget(0) == 1.0
    assert timeout.wait_budget(2000) == 2.0
    assert timeout.wait_budget(100_000) == 3.0  # capped


def test_threshold() -> None:
    rules = PrefetchRules(PrefetchPolicy.TIMEOUT, threshold_tokens=256)
    assert not rules.should_prefetch(255)
    assert rules.should_prefetch(256)
    assert not PrefetchRules(PrefetchPolicy.TIMEOUT, threshold_tokens=0).should_prefetch(0)


def test_rules_from_config() -> None:
    cfg = PrefetchConfig(policy="timeout", threshold_tokens=128, timeout_s=0.5)
    rules = PrefetchRules.from_config(cfg)
    assert rules.policy is PrefetchPolicy.TIMEOUT and rules.threshold_tokens == 128
    assert rules.timeout_base_s == 0.5 and rules.timeout_max_s == 2.0
    assert PrefetchRules.from_config(cfg, timeout_max_s=1.0).wait_budget(10**6) == 1.0
    with pytest.raises(ValueError, match="timeout_max_s"):
        PrefetchRules(PrefetchPolicy.TIMEOUT, timeout_base_s=2.0, timeout_max_s=1.0)


def test_prefetch_wait_with_fake_clock() -> None:
    clock = ManualClock(5.0)
    rules = PrefetchRules(PrefetchPolicy.TIMEOUT, timeout_base_s=1.0, timeout_per_1k_tokens_s=0)
    wait = rules.start(1000, clock=clock)
    assert wait.remaining() == 1.0 and not wait.expired()
    clock.advance(0.75)
    assert wait.remaining() == pytest.approx(0.25)
    clock.advance(1)
    assert wait.remaining() == 0.0 and wait.expired()
    forever = PrefetchWait(None, clock=clock)
    clock.advance(1e6)
    assert forever.remaining() is None and not forever.expired()
    assert PrefetchWait(0.0, clock=clock).expired()  # best effort: never waits


# ---------------------------------------------------------------------- stats


def test_counters_and_snapshot_are_plain_json() -> None:
    c = TierCounters()
    c.count_gets([OK, OK, NF, CORRUPT, FAILED], page_bytes=10)
    c.count_puts([OK, PageStatus.ALREADY_EXISTS, FAILED], page_bytes=10)
    c.add(lookups=1, hit_pages=2, dropped_backpressure=3)
    c.count_prefetch(PrefetchOutcome.SHORT)
    c.count_prefetch(PrefetchOutcome.SHORT)
    d = c.as_dict()
    assert d["get_ok"] == 2 and d["get_not_found"] == 1 and d["get_corrupt"] == 1
    assert d["get_failed"] == 1 and d["bytes_read"] == 20
    assert d["put_stored"] == 2 and d["put_failed"] == 1 and d["bytes_written"] == 10
    assert d["prefetch"] == {"short": 2}
    with pytest.raises(AttributeError):
        c.add(no_such_counter=1)
    c.error(KeyError("x"), "unexpected")
    c.error(None, "timeout")
    assert c.as_dict()["errors_by_kind"] == {"KeyError": 1, "timeout": 1}
    assert c.as_dict()["call_errors"] == 2

    failures = FailureCounts()
    failures.add(FailureKind.TIMEOUT, 2)
    breaker = CircuitBreaker(1, 5.0)
    breaker.record_failure()
    gate = InflightGate(100)
    snap = tier_snapshot(
        c, failures=failures, breaker=breaker, gate=gate, admission=SecondHitAdmit(10)
    )
    assert snap["failures"] == {"timeout": 2}
    assert snap["breaker"]["state"] == "open"
    assert snap["inflight"]["max_bytes"] == 100
    assert snap["admission"]["kind"] == "second_hit"
    assert json.loads(json.dumps(snap)) == snap


def test_hardening_modules_import_no_torch(run_python: RunPython) -> None:
    mods = [
        "hicache.tiering.breaker",
        "hicache.tiering.admission",
        "hicache.tiering.calls",
        "hicache.tiering.inflight",
        "hicache.tiering.prefetch",
        "hicache.tiering.stats",
        "hicache.tiering.announce",
        "hicache.tiering.tiers",
        "hicache.tiering.engine",
        "hicache.testing.faults",
    ]
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "sys.exit(1 if 'torch' in sys.modules else 0)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stdout + result.stderr
