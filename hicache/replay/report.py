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
