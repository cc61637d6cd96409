"""The replay report: a pydantic model (its JSON schema is the documented ``--json`` format) and
its rendering as a rich table.

Schema, top level (``ReplayReport.model_json_schema()`` gives the full JSON Schema, and
``hicache replay --print-schema`` prints it):

Schema version 2: hits in tokens, capacities in real bytes, the time section.

- ``scaling``: every scaling choice the replay made (trace, requests, bytes mode and scale, tokens
  per replay page, the real model shape, real and moved page bytes, sizing notes).
- ``tiers``: one entry per level, L1 and L2 first, then each L3 tier in lookup order: capacity in
  pages and real bytes, hit pages and tokens, token and page hit ratios, bytes moved.
- ``overall``: prefix hit ratio in tokens of the whole hierarchy (tokens saved and computed) and
  the references computed over the same requests: the same policy simulated on block ids, LRU,
  Belady's MIN and an infinite cache.
- ``time``: what is measured (tier calibration) and what is modeled (prefill, fetch, queueing);
  TTFT percentiles with and without L3.
- ``throughput``, ``events`` (counts by type and medium), ``storage`` (backup failures, drops,
  prefetch outcomes), ``verification`` (pages compared, mismatches), ``instances``.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hicache.storage.sizes import format_size

__all__ = [
    "CalibrationReport",
    "InstanceReport",
    "OverallReport",
    "ReplayReport",
    "ScalingReport",
    "StorageReport",
    "ThroughputReport",
    "TierReport",
    "TimeReport",
    "TtftReport",
    "VerificationReport",
    "print_report",
]

SCHEMA_VERSION = 2


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScalingReport(_Model):
    trace: str
    requests: int = Field(description="requests replayed (the first N of the trace)")
    trace_block_tokens: int = Field(description="tokens one trace block stands for (512)")
    bytes_mode: str = Field(description="real: pages carry the model's KV bytes; scaled: not")
    scale: float = Field(description="bytes moved per real byte of the model (1.0 when real)")
    block_tokens: int = Field(description="token ids each block id expands to in this replay")
    page_size: int = Field(description="tokens per page of the replay's cache")
    pages_per_block: int
    unit_tokens: int = Field(description="trace tokens one replay page stands for")
    partial_blocks: str = Field(description="how the partial last block of a prompt is handled")
    model: dict[str, int | str] = Field(description="the real model shape (per TP rank)")
    real_page_size: int = Field(description="the model's tokens per page")
    real_page_bytes: int = Field(description="bytes of one real page of the model")
    moved_page_bytes: int = Field(description="bytes of one replay page as moved")
    device_pages: int
    host_pages: int
    instances: int
    notes: list[str] = Field(description="adjustments the sizing made")


class TierReport(_Model):
    name: str
    level: str = Field(description="L1, L2 or L3")
    medium: str
    kind: str
    capacity_pages: int | None = Field(description="replay pages (per instance for L1/L2)")
    capacity_bytes: int | None = Field(description="the real model bytes those pages stand for")
    capacity_source: str
    hit_pages: int
    hit_tokens: int = Field(description="prompt tokens served from this level (saved prefill)")
    hit_ratio: float = Field(description="hit tokens / all prompt tokens replayed")
    hit_ratio_pages: float = Field(description="hit pages / all prompt pages replayed")
    bytes_written: int = Field(description="bytes moved into this level (scaled if scale < 1)")
    bytes_read: int
    real_bytes_read: int = Field(description="bytes the model would read at its real size")
    write_gbps: float = Field(description="moved bytes / replay wall time (not a bandwidth)")
    read_gbps: float


class OverallReport(_Model):
    prompt_pages: int
    prompt_tokens: int
    hit_pages: int
    hit_tokens: int = Field(description="prefill tokens saved")
    computed_tokens: int = Field(description="prefill tokens computed")
    hit_ratio: float = Field(description="in tokens")
    hit_ratio_pages: float
    same_policy_sim_ratio: float = Field(
        description="the hierarchy's policy simulated on block ids alone, same requests (tokens)"
    )
    same_policy_sim_levels: dict[str, float] = Field(
        description="the simulation's token hit ratio per level (L1, L2, L3)"
    )
    lru_ratio_largest_tier: float
    min_ratio_largest_tier: float = Field(description="Belady's MIN at the largest capacity")
    infinite_ratio: float
    largest_tier_capacity_pages: int | None


class CalibrationReport(_Model):
    tier: str
    page_bytes: int
    pages: int
    write_gbps: float
    read_gbps: float
    read_latency_ms: float
    cold_reads: bool = Field(description="the backend dropped its page cache before reading")


class TtftReport(_Model):
    p50_s: float
    p90_s: float
    p99_s: float
    mean_queueing_s: float
    mean_fetch_s: float
    mean_prefill_s: float


class TimeReport(_Model):
    measured: list[str] = Field(description="the figures of this section that were measured")
    modeled: list[str] = Field(description="the figures that are estimates of a model")
    gpu: str
    prefill_tokens_per_s: float
    prefill_source: str
    speed: float | None = Field(description="arrival speed-up; null = no queueing modeled")
    breakeven_read_gbps: float = Field(
        description="L3 read GB/s above which fetching a token's KV beats recomputing it "
        "(KV bytes per token x prefill tokens/s)"
    )
    calibration: list[CalibrationReport]
    with_l3: TtftReport | None = Field(description="null when no tier could be calibrated")
    without_l3: TtftReport


class ThroughputReport(_Model):
    wall_seconds: float
    requests_per_second: float
    tokens_per_second: float = Field(description="prompt tokens through the cache bookkeeping")


class StorageReport(_Model):
    backup_failures: int
    publish_drops: int
    prefetch_outcomes: dict[str, int]
    tier_counters: dict[str, dict[str, int | float | str | bool]]
    serving_wait_seconds: dict[str, float] = Field(
        default_factory=dict,
        description="wall seconds the serving thread spent blocked on storage, by reason "
        "(prefetch: L3 reads it waited for; put_throttle: the oldest queued puts, past the "
        "backlog), all instances",
    )
    prefetch_ahead: int = Field(
        default=0,
        description="requests whose prefetch was running while one was served (their waiting "
        "queue); 0: each prefetch started at its request's own turn",
    )


class VerificationReport(_Model):
    pages_verified: int
    mismatches: int


class InstanceReport(_Model):
    index: int
    requests: int
    hit_pages: int
    pages_from_other_instances: int


class ReplayReport(_Model):
    schema_version: int = SCHEMA_VERSION
    scaling: ScalingReport
    tiers: list[TierReport]
    overall: OverallReport
    time: TimeReport | None = Field(description="null when no prefill estimate is available")
    throughput: ThroughputReport
    events: dict[str, dict[str, int]] = Field(description="event type -> medium -> count")
    storage: StorageReport
    verification: VerificationReport
    instances: list[InstanceReport]


def print_report(report: ReplayReport) -> None:
    """Render the report as rich tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if Console().is_terminal else 130)
    s = report.scaling
    m = s.model
    bytes_line = (
        f"real bytes: every page moved is a real {_size(s.moved_page_bytes)} page"
        if s.bytes_mode == "real"
        else f"SCALED bytes: each page moved is a {_size(s.moved_page_bytes)} stand-in for "
        f"{_size(s.real_page_bytes * s.unit_tokens // s.real_page_size)} of real KV "
        f"(scale 1:{1 / s.scale:,.0f}); byte counts below are moved bytes, not the model's"
    )
    console.print(
        f"[bold]hicache replay[/bold]: {s.requests} requests of {s.trace}\n"
        f"model: {m['name']} ({m['num_layers']} layers, {m['num_kv_heads']} KV heads x "
        f"{m['head_dim']} per rank, {m['dtype']}{', MLA' if m.get('mla') else ''}): "
        f"{_size(int(m['bytes_per_token']))}/token, {_size(s.real_page_bytes)} per "
        f"{s.real_page_size}-token page; a replay page stands for {s.unit_tokens} trace tokens\n"
        f"{bytes_line}; {s.instances} instance(s)"
    )
    for note in s.notes:
        console.print(f"note: {note}")
    table = Table(title="hits by tier (tokens = prefill saved; partial blocks count real tokens)")
    for col in (
        "tier",
        "level",
        "kind",
        "capacity",
        "from",
        "hit tokens",
        "token hit ratio",
        "page hit ratio",
        "moved in",
        "moved out",
    ):
        left = col in ("tier", "level", "kind", "from")
        table.add_column(col, justify="left" if left else "right")
    for t in report.tiers:
        cap = (
            "-"
            if t.capacity_bytes is None
            else f"{_size(t.capacity_bytes)} ({t.capacity_pages:,} p)"
        )
        table.add_row(
            t.name,
            t.level,
            t.kind,
            cap,
            t.capacity_source,
            f"{t.hit_tokens:,}",
            f"{t.hit_ratio:.1%}",
            f"{t.hit_ratio_pages:.1%}",
            _size(t.bytes_written),
            _size(t.bytes_read),
        )
    console.print(table)
    o = report.overall
    ref = Table(title="prefix hit ratio in tokens vs references (same requests)")
    ref.add_column("measure")
    ref.add_column("token hit ratio", justify="right")
    ref.add_row("hicache, all tiers", f"{o.hit_ratio:.2%}")
    levels = ", ".join(f"{k} {v:.2%}" for k, v in o.same_policy_sim_levels.items())
    ref.add_row("same policy simulated on block ids", f"{o.same_policy_sim_ratio:.2%} ({levels})")
    if o.largest_tier_capacity_pages is not None:
        ref.add_row(
            f"LRU at {o.largest_tier_capacity_pages:,} pages (largest tier)",
            f"{o.lru_ratio_largest_tier:.2%}",
        )
        ref.add_row(
            f"Belady MIN at {o.largest_tier_capacity_pages:,} pages",
            f"{o.min_ratio_largest_tier:.2%}",
        )
    ref.add_row("infinite cache", f"{o.infinite_ratio:.2%}")
    console.print(ref)
    console.print(
        f"prefill: {o.prompt_tokens:,} prompt tokens, {o.hit_tokens:,} saved, "
        f"{o.computed_tokens:,} computed"
    )
    if report.time is not None:
        _print_time(console, report.time)
    th = report.throughput
    console.print(
        f"replay: {th.wall_seconds:.1f} s wall, {th.requests_per_second:,.0f} req/s through the "
        "cache bookkeeping (measured here, not a serving rate)"
    )
    console.print(f"events: {json.dumps(report.events)}")
    st = report.storage
    console.print(
        f"storage: backup failures {st.backup_failures}, publish drops {st.publish_drops}, "
        f"prefetch {json.dumps(st.prefetch_outcomes)}"
    )
    if st.serving_wait_seconds and th.wall_seconds > 0:
        waited = sum(st.serving_wait_seconds.values())
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in st.serving_wait_seconds.items())
        console.print(
            f"serving thread blocked on storage: {waited:.1f} s of {th.wall_seconds:.1f} s wall "
            f"({100 * waited / th.wall_seconds:.1f}%): {parts}; prefetches started "
            + (f"{st.prefetch_ahead} requests ahead" if st.prefetch_ahead else "at each turn")
        )
    v = report.verification
    console.print(f"verification: {v.pages_verified:,} pages compared, {v.mismatches} mismatches")
    if len(report.instances) > 1:
        for inst in report.instances:
            console.print(
                f"instance {inst.index}: {inst.requests} requests, {inst.hit_pages:,} hit pages, "
                f"{inst.pages_from_other_instances:,} pages computed by the other instance(s)"
            )


def _print_time(console: Any, tm: TimeReport) -> None:
    from rich.table import Table

    for c in tm.calibration:
        console.print(
            f"measured: tier {c.tier} at {_size(c.page_bytes)} pages: read {c.read_gbps:.2f} GB/s"
            f" ({'cold' if c.cold_reads else 'page cache'}), write {c.write_gbps:.2f} GB/s, "
            f"one-page read {c.read_latency_ms:.2f} ms"
        )
    speed = "no queueing (as fast as possible)" if tm.speed is None else f"speed {tm.speed}x"
    table = Table(
        title=f"TTFT, modeled: {tm.prefill_tokens_per_s:,.0f} prefill tokens/s "
        f"({tm.prefill_source}); {speed}"
    )
    for col in ("", "p50", "p90", "p99", "mean queue", "mean L3 fetch", "mean prefill"):
        table.add_column(col, justify="left" if not col else "right")
    for name, t in (("with L3", tm.with_l3), ("without L3", tm.without_l3)):
        if t is None:
            continue
        table.add_row(
            name,
            f"{t.p50_s * 1e3:,.0f} ms",
            f"{t.p90_s * 1e3:,.0f} ms",
            f"{t.p99_s * 1e3:,.0f} ms",
            f"{t.mean_queueing_s * 1e3:,.0f} ms",
            f"{t.mean_fetch_s * 1e3:,.1f} ms",
            f"{t.mean_prefill_s * 1e3:,.0f} ms",
        )
    console.print(table)
    console.print(
        f"break-even: an L3 hit saves time only when the tier reads faster than "
        f"{tm.breakeven_read_gbps:.2f} GB/s (KV bytes per token x prefill tokens/s)"
    )
    console.print(f"measured: {'; '.join(tm.measured)}\nmodeled: {'; '.join(tm.modeled)}")


def _size(n: int) -> str:
    return format_size(n)
