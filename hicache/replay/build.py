"""Assemble the replay report: per-tier hits in tokens and pages, capacities in bytes, the
references simulated over the same requests, and the TTFT model fed with the calibration.

Tokens: a hit of ``h`` replay pages saves ``min(h * unit_tokens, input_length)`` prefill tokens,
so the partial last block of a prompt counts the tokens it really has (see
:func:`hicache.replay.sweep.hit_tokens`); per level, the tokens between the previous levels'
prefix and its own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hicache.config import HicacheConfig
from hicache.replay.models import GpuClass, prefill_tokens_per_s
from hicache.replay.plan import TRACE_BLOCK_TOKENS, ReplayPlan
from hicache.replay.policies import l3_policy_of
from hicache.replay.report import (
    CalibrationReport,
    InstanceReport,
    OverallReport,
    ReplayReport,
    ScalingReport,
    StorageReport,
    ThroughputReport,
    TierReport,
    TimeReport,
    TtftReport,
    VerificationReport,
)
from hicache.replay.simulate import (
    simulate_hierarchy,
    simulate_infinite,
    simulate_lru,
    simulate_min,
)
from hicache.replay.sweep import hit_tokens, token_ratio
from hicache.replay.timing import Calibration, TtftSeries, percentile, ttft_model
from hicache.replay.trace import TraceRequest

__all__ = ["ReplayRun", "build_report", "prompt_tokens"]


@dataclass(frozen=True, slots=True)
class ReplayRun:
    """Everything a finished replay hands to the report."""

    settings: Any
    config: HicacheConfig
    plan: ReplayPlan
    gpu: GpuClass
    requests: list[TraceRequest]
    chains: list[list[int]]
    counters: list[Any]
    cache_stats: list[dict[str, Any]]
    tier_stats: list[tuple[str, str, dict[str, Any]]]
    events: Counter[tuple[str, str]]
    wall: float
    calibrations: list[Calibration]
    #: pages per backend call of the L3 tiers (their smallest ``max_batch``), for the simulation
    l3_batch: int | None = None


def prompt_tokens(requests: Sequence[TraceRequest]) -> list[int]:
    """Each prompt's tokens: its ``input_length``, or whole blocks when the trace lacks it."""
    return [r.input_length or len(r.block_ids) * TRACE_BLOCK_TOKENS for r in requests]


def _per_request(run: ReplayRun) -> list[tuple[int, int, int, int]]:
    """``(pages, l1, l2, l3)`` per request in trace order."""
    iters = [iter(c.per_request) for c in run.counters]
    return [next(iters[i % len(iters)]) for i in range(len(run.requests))]


def _ttft(series: TtftSeries) -> TtftReport:
    n = max(1, len(series.ttft))
    return TtftReport(
        p50_s=percentile(series.ttft, 0.5),
        p90_s=percentile(series.ttft, 0.9),
        p99_s=percentile(series.ttft, 0.99),
        mean_queueing_s=sum(series.queueing) / n,
        mean_fetch_s=sum(series.fetch) / n,
        mean_prefill_s=sum(series.prefill) / n,
    )


def _time_report(
    run: ReplayRun,
    prompts: list[int],
    rows: list[tuple[int, int, int, int]],
    l3_pages_by_tier: dict[str, int],
) -> TimeReport | None:
    s, plan = run.settings, run.plan
    if s.prefill_tokens_per_s:
        tps, source = float(s.prefill_tokens_per_s), "given with --prefill-tokens-per-s"
    elif plan.model.active_params > 0:
        tps = prefill_tokens_per_s(plan.model, run.gpu, s.mfu)
        source = (
            f"estimate: {run.gpu.name} dense bf16 peak x {s.mfu:.0%} MFU / "
            f"(2 x {plan.model.active_params / 1e9:.1f}B active params / TP {plan.model.tp})"
        )
    else:
        return None
    unit = plan.unit_tokens
    real = plan.real_bytes_per_page
    with_hits = [
        hit_tokens(a + b + c, unit, p) for (_, a, b, c), p in zip(rows, prompts, strict=True)
    ]
    no_l3 = [hit_tokens(a + b, unit, p) for (_, a, b, _c), p in zip(rows, prompts, strict=True)]
    arrivals = None
    if s.speed:
        t0 = run.requests[0].timestamp_ms
        arrivals = [(r.timestamp_ms - t0) / 1000 / s.speed for r in run.requests]
    who = [i % len(run.counters) for i in range(len(rows))]
    cals = {c.tier: c for c in run.calibrations}
    # several tiers: the fetch of a page costs its tier's time, weighted by each tier's hits
    hit_bytes = {n: p * real for n, p in l3_pages_by_tier.items() if n in cals and p}
    if hit_bytes:
        total = sum(hit_bytes.values())
        gbps = total / sum(b / (cals[n].read_gbps * 1e9) for n, b in hit_bytes.items()) / 1e9
        latency = sum(cals[n].read_latency_s * b for n, b in hit_bytes.items()) / total
    elif cals:
        first = next(iter(cals.values()))
        gbps, latency = first.read_gbps, first.read_latency_s
    else:
        gbps, latency = 0.0, 0.0
    common = dict(prefill_tokens_per_s=tps, arrivals_s=arrivals, instance_of=who)
    with_l3 = None
    if cals:
        with_l3 = _ttft(
            ttft_model(
                prompt_tokens=prompts,
                hit_tokens=with_hits,
                l3_bytes=[c * real for (_, _a, _b, c) in rows],
                read_gbps=gbps,
                read_latency_s=latency,
                **common,  # type: ignore[arg-type]
            )
        )
    without = _ttft(
        ttft_model(
            prompt_tokens=prompts,
            hit_tokens=no_l3,
            l3_bytes=[0] * len(rows),
            read_gbps=0.0,
            read_latency_s=0.0,
            **common,  # type: ignore[arg-type]
        )
    )
    page = plan.model.page_bytes(plan.real_page_size)
    measured = [
        "each tier's read/write GB/s and one-page read latency (calibrated in this run, "
        f"real {plan.real_page_size}-token pages of {page:,} B)",
        "hits per request per level (this replay)",
    ]
    modeled = [
        f"prefill time = tokens computed / {tps:,.0f} tokens/s ({source})",
        "L3 fetch = one read latency + the request's L3 hit bytes at the model's real size / "
        "the measured read GB/s, before the prefill (no overlap)",
        "queueing: one FIFO prefill server per instance at the trace's arrival times / speed"
        if arrivals is not None
        else "queueing: none (requests as fast as possible; --speed X models it)",
        "not modeled: L2->L1 loads (they overlap the prefill), decode, batching, attention's "
        "quadratic cost; 'without L3' keeps this run's L1/L2 hits",
    ]
    return TimeReport(
        measured=measured,
        modeled=modeled,
        gpu=run.gpu.name,
        prefill_tokens_per_s=tps,
        prefill_source=source,
        speed=s.speed,
        breakeven_read_gbps=plan.model.bytes_per_token * tps / 1e9,
        calibration=[
            CalibrationReport(
                tier=c.tier,
                page_bytes=c.page_bytes,
                pages=c.pages,
                write_gbps=c.write_gbps,
                read_gbps=c.read_gbps,
                read_latency_ms=c.read_latency_s * 1e3,
                cold_reads=c.cold_reads,
            )
            for c in run.calibrations
        ],
        with_l3=with_l3,
        without_l3=without,
    )


def build_report(run: ReplayRun) -> ReplayReport:
    s, plan, config = run.settings, run.plan, run.config
    counters = run.counters
    n = len(counters)
    unit = plan.unit_tokens
    rows = _per_request(run)
    prompts = prompt_tokens(run.requests)
    total_pages = sum(r[0] for r in rows)
    total_tokens = sum(prompts)
    # tokens per level: each level's share of the prefix, partial last blocks counted exactly
    lvl_tokens = {"l1": 0, "l2": 0, "l3": 0}
    for (_, a, b, c), p in zip(rows, prompts, strict=True):
        t1, t2, t3 = (
            hit_tokens(a, unit, p),
            hit_tokens(a + b, unit, p),
            hit_tokens(a + b + c, unit, p),
        )
        lvl_tokens["l1"] += t1
        lvl_tokens["l2"] += t2 - t1
        lvl_tokens["l3"] += t3 - t2
    hit = {lvl: sum(getattr(c, lvl) for c in counters) for lvl in ("l1", "l2", "l3")}
    moved = plan.moved_page_bytes

    def gbps(nbytes: int) -> float:
        return nbytes / run.wall / 1e9 if run.wall > 0 else 0.0

    backup_pages = sum(int(st.get("backup_pages", 0)) for st in run.cache_stats)
    loaded = sum(int(st.get("loaded_back_pages", 0)) for st in run.cache_stats)
    computed = sum(c.computed for c in counters)

    def row(
        name: str,
        level: str,
        medium: str,
        kind: str,
        cap: Any,
        hits: int,
        tokens: int,
        written: int,
        read: int,
    ) -> TierReport:
        return TierReport(
            name=name,
            level=level,
            medium=medium,
            kind=kind,
            capacity_pages=None if cap is None else cap.pages,
            capacity_bytes=None if cap is None else cap.real_bytes,
            capacity_source="unbounded here" if cap is None else cap.source,
            hit_pages=hits,
            hit_tokens=tokens,
            hit_ratio=tokens / total_tokens,
            hit_ratio_pages=hits / total_pages,
            bytes_written=written * moved,
            bytes_read=read * moved,
            real_bytes_read=read * plan.real_bytes_per_page,
            write_gbps=gbps(written * moved),
            read_gbps=gbps(read * moved),
        )

    tier_rows = [
        row(
            "device", "L1", "GPU", "device pool", plan.l1, hit["l1"], lvl_tokens["l1"], computed, 0
        ),
        row(
            "host",
            "L2",
            "CPU_PINNED",
            "host pool",
            plan.l2,
            hit["l2"],
            lvl_tokens["l2"],
            backup_pages,
            loaded,
        ),
    ]
    tier_counters: dict[str, dict[str, int | float | str | bool]] = {}
    l3_remaining, tok_remaining = hit["l3"], lvl_tokens["l3"]
    l3_by_tier: dict[str, int] = {}
    for i, (name, medium, st) in enumerate(run.tier_stats):
        tier_counters[name] = {
            k: v for k, v in st.items() if isinstance(v, int | float | str | bool)
        }
        last = i == len(run.tier_stats) - 1
        pages = l3_remaining if last else min(int(st.get("hit_pages", 0)), l3_remaining)
        # tokens of a tier: its share of the L3 pages (the partial block falls in the last one)
        tokens = tok_remaining if last else min(pages * unit, tok_remaining)
        kind = config.storage.tiers[name].backend
        tier_rows.append(
            row(
                name,
                "L3",
                medium,
                kind,
                plan.l3.get(name),
                pages,
                tokens,
                int(st.get("put_stored", 0)),
                int(st.get("get_ok", 0)),
            )
        )
        l3_by_tier[name] = pages
        l3_remaining -= pages
        tok_remaining -= tokens

    bounded = [c.pages for c in plan.l3.values() if c is not None]
    l3_cap = None if len(bounded) < len(plan.l3) else sum(bounded)
    chains = run.chains
    sim = simulate_hierarchy(
        chains,
        plan.l1.pages,
        plan.l2.pages,
        l3_cap,
        min_prefetch=max(1, -(-config.storage.prefetch.threshold_tokens // plan.page_size)),
        instances=n,
        l3_policy=l3_policy_of(config.storage.tiers, run.l3_batch),
        l3_batch=run.l3_batch,
    )
    sim_rows = list(zip(sim.l1, sim.l2, sim.l3, strict=True))
    s1 = token_ratio([a for a, _, _ in sim_rows], unit, prompts)
    s2 = token_ratio([a + b for a, b, _ in sim_rows], unit, prompts)
    s3 = token_ratio(sim.hits, unit, prompts)
    largest = l3_cap if l3_cap is not None else None
    hit_total = sum(lvl_tokens.values())
    overall = OverallReport(
        prompt_pages=total_pages,
        prompt_tokens=total_tokens,
        hit_pages=hit["l1"] + hit["l2"] + hit["l3"],
        hit_tokens=hit_total,
        computed_tokens=total_tokens - hit_total,
        hit_ratio=hit_total / total_tokens,
        hit_ratio_pages=(hit["l1"] + hit["l2"] + hit["l3"]) / total_pages,
        same_policy_sim_ratio=s3,
        same_policy_sim_levels={"L1": s1, "L2": s2 - s1, "L3": s3 - s2},
        lru_ratio_largest_tier=token_ratio(simulate_lru(chains, largest).hits, unit, prompts)
        if largest
        else 0.0,
        min_ratio_largest_tier=token_ratio(simulate_min(chains, largest).hits, unit, prompts)
        if largest
        else 0.0,
        infinite_ratio=token_ratio(simulate_infinite(chains).hits, unit, prompts),
        largest_tier_capacity_pages=largest,
    )
    ev: dict[str, dict[str, int]] = {}
    for (kind, medium), count in sorted(run.events.items()):
        ev.setdefault(kind, {})[medium] = count
    engine = [st.get("storage", {}) for st in run.cache_stats]
    drops = sum(int(e.get("publish_dropped_pages", e.get("dropped_pages", 0))) for e in engine)
    failures = sum(int(v.get("put_failed", 0)) for v in tier_counters.values())
    waits: Counter[str] = Counter()
    for e in engine:
        waits.update(e.get("serving_wait_s", {}))
    outcomes: Counter[str] = Counter()
    for st in run.cache_stats:
        outcomes["prefetches"] += int(st.get("prefetches", 0))
        outcomes["prefetched_pages"] += int(st.get("prefetched_pages", 0))
        outcomes["discarded_pages"] += int(st.get("prefetch_discarded_pages", 0))
    return ReplayReport(
        scaling=ScalingReport(
            trace=str(s.trace or "hicache/data/mooncake_conversation_trace.jsonl"),
            requests=len(run.requests),
            trace_block_tokens=TRACE_BLOCK_TOKENS,
            bytes_mode=plan.mode.value,
            scale=plan.scale,
            block_tokens=plan.block_tokens,
            page_size=plan.page_size,
            pages_per_block=plan.pages_per_block,
            unit_tokens=unit,
            partial_blocks="a hit on a prompt's partial last block counts the tokens the "
            "prompt has there (input_length), not a whole block",
            model=plan.model.describe(),
            real_page_size=plan.real_page_size,
            real_page_bytes=plan.model.page_bytes(plan.real_page_size),
            moved_page_bytes=moved,
            device_pages=plan.l1.pages,
            host_pages=plan.l2.pages,
            instances=n,
            notes=list(plan.notes),
        ),
        tiers=tier_rows,
        overall=overall,
        time=_time_report(run, prompts, rows, l3_by_tier),
        throughput=ThroughputReport(
            wall_seconds=run.wall,
            requests_per_second=len(run.requests) / run.wall,
            tokens_per_second=total_tokens / run.wall,
        ),
        events=ev,
        storage=StorageReport(
            backup_failures=failures,
            publish_drops=drops,
            prefetch_outcomes=dict(outcomes),
            tier_counters=tier_counters,
            serving_wait_seconds=dict(waits),
            prefetch_ahead=0 if s.sync_publish else s.prefetch_ahead,
        ),
        verification=VerificationReport(
            pages_verified=sum(c.verified for c in counters),
            mismatches=sum(c.mismatches for c in counters),
        ),
        instances=[
            InstanceReport(
                index=i,
                requests=c.requests,
                hit_pages=c.l1 + c.l2 + c.l3,
                pages_from_other_instances=c.from_other,
            )
            for i, c in enumerate(counters)
        ],
    )
