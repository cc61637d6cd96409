"""The replay report: a pydantic model (its JSON schema is the documented ``--json`` format) and
its rendering as a rich table.

Schema, top level (``ReplayReport.model_json_schema()`` gives the full JSON Schema, and
``hicache replay --print-schema`` prints it):

- ``scaling``: every scaling choice the replay made (trace, requests, tokens per block, page size,
  model shape, tier capacities).
- ``tiers``: one entry per level, L1 and L2 first, then each L3 tier in lookup order: hit pages
  and tokens, hit ratio over all prompt pages, bytes written and read, GB/s.
- ``overall``: prefix hit ratio of the whole hierarchy and the references computed over the same
  requests: the same policy simulated on block ids, Belady's MIN and an infinite cache.
- ``throughput``, ``events`` (counts by type and medium), ``storage`` (backup failures, drops,
  prefetch outcomes), ``verification`` (pages compared, mismatches), ``instances``.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "InstanceReport",
    "OverallReport",
    "ReplayReport",
    "ScalingReport",
    "StorageReport",
    "ThroughputReport",
    "TierReport",
    "VerificationReport",
    "print_report",
]

SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScalingReport(_Model):
    trace: str
    requests: int = Field(description="requests replayed (the first N of the trace)")
    trace_block_tokens: int = Field(description="tokens one trace block stands for (512)")
    block_tokens: int = Field(description="tokens each block id expands to in this replay")
    page_size: int
    pages_per_block: int
    partial_blocks: str = Field(description="how the partial last block of a prompt is handled")
    model: dict[str, int | str]
    page_bytes: int
    device_pages: int
    host_pages: int
    instances: int


class TierReport(_Model):
    name: str
    level: str = Field(description="L1, L2 or L3")
    medium: str
    kind: str
    capacity_pages: int | None
    hit_pages: int
    hit_tokens: int
    hit_ratio: float = Field(description="hit pages / all prompt pages replayed")
    bytes_written: int
    bytes_read: int
    write_gbps: float
    read_gbps: float


class OverallReport(_Model):
    prompt_pages: int
    prompt_tokens: int
    hit_pages: int
    hit_ratio: float
    same_policy_sim_ratio: float = Field(
        description="the hierarchy's policy simulated on block ids alone, same requests"
    )
    same_policy_sim_levels: dict[str, float] = Field(
        description="the simulation's hit ratio per level (L1, L2, L3)"
    )
    lru_ratio_largest_tier: float
    min_ratio_largest_tier: float = Field(description="Belady's MIN at the largest capacity")
    infinite_ratio: float
    largest_tier_capacity_pages: int


class ThroughputReport(_Model):
    wall_seconds: float
    requests_per_second: float
    tokens_per_second: float = Field(description="prompt tokens through the cache bookkeeping")


class StorageReport(_Model):
    backup_failures: int
    publish_drops: int
    prefetch_outcomes: dict[str, int]
    tier_counters: dict[str, dict[str, int | float | str | bool]]


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
    console.print(
        f"[bold]hicache replay[/bold]: {s.requests} requests of {s.trace}\n"
        f"scaling: each {s.trace_block_tokens}-token trace block -> {s.block_tokens} tokens "
        f"({s.pages_per_block} page(s) of {s.page_size}); model {s.model}; "
        f"{s.page_bytes} B pages; L1 {s.device_pages} pages, L2 {s.host_pages} pages per "
        f"instance; {s.instances} instance(s)"
    )
    table = Table(title="hits by tier")
    for col in (
        "tier",
        "level",
        "medium",
        "capacity (pages)",
        "hit pages",
        "hit ratio",
        "written",
        "read",
        "write GB/s",
        "read GB/s",
    ):
        table.add_column(col, justify="right" if col not in ("tier", "level", "medium") else "left")
    for t in report.tiers:
        table.add_row(
            t.name,
            t.level,
            t.medium,
            str(t.capacity_pages or "-"),
            f"{t.hit_pages:,}",
            f"{t.hit_ratio:.1%}",
            _mib(t.bytes_written),
            _mib(t.bytes_read),
            f"{t.write_gbps:.3f}",
            f"{t.read_gbps:.3f}",
        )
    console.print(table)
    o = report.overall
    ref = Table(title="prefix hit ratio vs references (same requests)")
    ref.add_column("measure")
    ref.add_column("ratio", justify="right")
    ref.add_row("hicache, all tiers", f"{o.hit_ratio:.2%}")
    levels = ", ".join(f"{k} {v:.2%}" for k, v in o.same_policy_sim_levels.items())
    ref.add_row("same policy simulated on block ids", f"{o.same_policy_sim_ratio:.2%} ({levels})")
    ref.add_row(f"LRU at {o.largest_tier_capacity_pages} pages", f"{o.lru_ratio_largest_tier:.2%}")
    ref.add_row(
        f"Belady MIN at {o.largest_tier_capacity_pages} pages", f"{o.min_ratio_largest_tier:.2%}"
    )
    ref.add_row("infinite cache", f"{o.infinite_ratio:.2%}")
    console.print(ref)
    th = report.throughput
    console.print(
        f"throughput: {th.wall_seconds:.1f} s, {th.requests_per_second:,.0f} req/s, "
        f"{th.tokens_per_second:,.0f} prompt tokens/s through the cache bookkeeping"
    )
    console.print(f"events: {json.dumps(report.events)}")
    st = report.storage
    console.print(
        f"storage: backup failures {st.backup_failures}, publish drops {st.publish_drops}, "
        f"prefetch {json.dumps(st.prefetch_outcomes)}"
    )
    v = report.verification
    console.print(f"verification: {v.pages_verified:,} pages compared, {v.mismatches} mismatches")
    if len(report.instances) > 1:
        for inst in report.instances:
            console.print(
                f"instance {inst.index}: {inst.requests} requests, {inst.hit_pages:,} hit pages, "
                f"{inst.pages_from_other_instances:,} pages computed by the other instance(s)"
            )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"
