"""Time for the replay: each L3 tier's bandwidth and latency measured in the same run, and a
time-to-first-token model fed with them.

- ``calibrate_tier(tier_config, ...)``  puts and reads back real-size pages through the tier's
  real backend (a throw-away namespace, deleted afterwards): read/write GB/s and one-page read
  latency, with cold reads when the backend can drop its page cache (``Benchmarkable``)
- ``ttft_model(...)``  per request, TTFT = queueing + L3 fetch + prefill, with and without L3

Measured: the tiers' bandwidth and latency (calibration). Modeled: the prefill time (tokens
computed x a per-token cost, see :mod:`hicache.replay.models`), the L3 fetch time (the request's
L3 hit bytes at the model's real size, one latency plus bytes over the measured read bandwidth)
and the queueing (with ``--speed``: one FIFO prefill server per instance, requests arriving at
the trace's timestamps divided by the speed). Not modeled: L2 -> L1 loads (layer-wise, they
overlap the prefill in SGLang), decode, batching of several prefills, attention's quadratic cost.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from hicache.config import HicacheConfig
from hicache.storage.backend import BackendContext, PageStatus

__all__ = ["Calibration", "TtftSeries", "calibrate_tier", "percentile", "ttft_model"]

logger = logging.getLogger(__name__)

#: bytes written and read per tier during calibration (at least 4 pages)
_CALIBRATION_BYTES = 96 << 20


@dataclass(frozen=True, slots=True)
class Calibration:
    tier: str
    page_bytes: int
    pages: int
    write_gbps: float
    read_gbps: float
    read_latency_s: float
    cold_reads: bool


def calibrate_tier(
    config: HicacheConfig, name: str, page_bytes: int, namespace: str
) -> Calibration | None:
    """Measure tier ``name``'s backend at ``page_bytes``; ``None`` when it cannot be measured
    (read-only, or the backend refuses): the report then has no L3 time."""
    from hicache.storage.baseline import Benchmarkable
    from hicache.storage.registry import create_backend

    tier = config.storage.tiers[name]
    if tier.read_only:
        return None
    pages = max(4, _CALIBRATION_BYTES // page_bytes)
    options = dict(tier.options)
    for opt in ("max_bytes", "capacity"):
        if options.get(opt) is not None:
            options[opt] = 4 * pages * (page_bytes + 4096)
    context = BackendContext(page_bytes=page_bytes, namespace=namespace, tier_name=name)
    backend = create_backend(tier.backend, options, context, path=f"storage.tiers.{name}.options")
    keys = [os.urandom(32).hex() for _ in range(pages)]
    src = bytearray(os.urandom(page_bytes))
    dsts = [bytearray(page_bytes) for _ in range(pages)]
    try:
        backend.open()
        t0 = time.perf_counter()
        put = backend.put(keys, [memoryview(src)] * pages)
        t_put = time.perf_counter() - t0
        cold = isinstance(backend, Benchmarkable)
        if cold:
            backend.drop_page_cache()  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        got = backend.get_into(keys, [memoryview(d) for d in dsts])
        t_get = time.perf_counter() - t0
        if cold:
            backend.drop_page_cache()  # type: ignore[attr-defined]
        latencies = []
        for key, dst in zip(keys[:3], dsts, strict=False):
            t0 = time.perf_counter()
            backend.get_into([key], [memoryview(dst)])
            latencies.append(time.perf_counter() - t0)
        ok = sum(1 for s in got if s is PageStatus.OK)
        if ok < pages or any(s not in (PageStatus.OK, PageStatus.ALREADY_EXISTS) for s in put):
            logger.warning("calibration of tier %s: %d of %d pages read back", name, ok, pages)
            return None
        backend.delete(keys)
    except Exception as exc:  # a tier that cannot be measured leaves the time model out
        logger.warning("calibration of tier %s failed: %s", name, exc)
        return None
    finally:
        backend.close()
    total = pages * page_bytes
    return Calibration(
        name, page_bytes, pages, total / t_put / 1e9, total / t_get / 1e9, min(latencies), cold
    )


@dataclass(frozen=True, slots=True)
class TtftSeries:
    """Per-request TTFT (seconds) and what it is made of."""

    ttft: tuple[float, ...]
    queueing: tuple[float, ...]
    fetch: tuple[float, ...]
    prefill: tuple[float, ...]


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ttft_model(
    *,
    prompt_tokens: Sequence[int],
    hit_tokens: Sequence[int],
    l3_bytes: Sequence[int],
    prefill_tokens_per_s: float,
    read_gbps: float,
    read_latency_s: float,
    arrivals_s: Sequence[float] | None,
    instance_of: Sequence[int],
) -> TtftSeries:
    """TTFT per request: queueing (``arrivals_s`` given) + L3 fetch + prefill of the rest.

    A fully cached prompt still computes its last token (the engine needs its logits)."""
    fetch = [
        (read_latency_s + b / (read_gbps * 1e9)) if b and read_gbps > 0 else 0.0 for b in l3_bytes
    ]
    prefill = [
        max(1, p - h) / prefill_tokens_per_s for p, h in zip(prompt_tokens, hit_tokens, strict=True)
    ]
    service = [f + p for f, p in zip(fetch, prefill, strict=True)]
    queue = [0.0] * len(service)
    if arrivals_s is not None:
        free: dict[int, float] = {}
        for i, (arrive, who) in enumerate(zip(arrivals_s, instance_of, strict=True)):
            start = max(arrive, free.get(who, 0.0))
            queue[i] = start - arrive
            free[who] = start + service[i]
    ttft = tuple(q + s for q, s in zip(queue, service, strict=True))
    return TtftSeries(ttft, tuple(queue), tuple(fetch), tuple(prefill))
