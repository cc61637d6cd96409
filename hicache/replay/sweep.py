"""``hicache replay sweep``: the token hit ratio as a function of L3 capacity, simulated on the
trace's block ids (fast: no bytes move), for hicache's policy, LRU and Belady's MIN at the same
capacity, under the infinite-cache ceiling; and the L3 needed for 50/80/90% of the achievable
hits (the ceiling).

- ``token_ratio(hits, unit_tokens, prompt_tokens)``  prefix hits in pages -> token hit ratio
- ``run_sweep(...)``  -> ``SweepResult`` (points and the L3 needed per target)
- ``plot_sweep(result, path)``  the curves as PNG (matplotlib, the ``plot`` extra)

Capacities are pages of the replay (one trace block each, see :mod:`hicache.replay.plan`),
shown in the model's real bytes. hicache's curve keeps L1 and L2 at the run's sizes; LRU and
MIN are one cache of the L3 size alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hicache.replay.simulate import (
    simulate_hierarchy,
    simulate_infinite,
    simulate_lru,
    simulate_min,
)
from hicache.storage.eviction import CapacityPolicy

__all__ = ["SweepPoint", "SweepResult", "hit_tokens", "plot_sweep", "run_sweep", "token_ratio"]

TARGETS = (0.5, 0.8, 0.9)


def hit_tokens(pages: int, unit_tokens: int, prompt_tokens: int) -> int:
    """Tokens a prefix hit of ``pages`` saves: the partial last block counts its real tokens."""
    return min(pages * unit_tokens, prompt_tokens)


def token_ratio(hits: Sequence[int], unit_tokens: int, prompt_tokens: Sequence[int]) -> float:
    total = sum(prompt_tokens)
    saved = sum(hit_tokens(h, unit_tokens, p) for h, p in zip(hits, prompt_tokens, strict=True))
    return saved / total if total else 0.0


@dataclass(frozen=True, slots=True)
class SweepPoint:
    l3_pages: int
    l3_bytes: int
    hicache: float
    lru: float
    min: float


@dataclass(frozen=True, slots=True)
class SweepResult:
    points: tuple[SweepPoint, ...]
    infinite: float
    #: target share of the ceiling -> the smallest L3 pages found reaching it (None: not reached)
    needed: dict[float, int | None]
    bytes_per_page: int


def run_sweep(
    chains: Sequence[Sequence[int]],
    prompt_tokens: Sequence[int],
    *,
    unit_tokens: int,
    bytes_per_page: int,
    l1_pages: int,
    l2_pages: int,
    min_prefetch: int,
    instances: int = 1,
    points: int = 10,
    refine: int = 5,
    l3_policy: Callable[[int], CapacityPolicy] | None = None,
    l3_batch: int | None = None,
) -> SweepResult:
    """Sweep L3 from L2's size to the trace's footprint on a geometric grid of ``points``, then
    bisect ``refine`` times between grid points for each target."""
    footprint = len({b for c in chains for b in c})
    lo = max(1, l2_pages)
    hi = max(lo + 1, footprint)
    grid = sorted({int(lo * (hi / lo) ** (i / max(1, points - 1))) for i in range(points)})

    def hicache_at(pages: int) -> float:
        sim = simulate_hierarchy(
            chains,
            l1_pages,
            l2_pages,
            pages,
            min_prefetch=min_prefetch,
            instances=instances,
            l3_policy=l3_policy,
            l3_batch=l3_batch,
        )
        return token_ratio(sim.hits, unit_tokens, prompt_tokens)

    def ratio(hits: Sequence[int]) -> float:
        return token_ratio(hits, unit_tokens, prompt_tokens)

    pts = []
    cache: dict[int, float] = {}
    for pages in grid:
        cache[pages] = hicache_at(pages)
        pts.append(
            SweepPoint(
                pages,
                pages * bytes_per_page,
                cache[pages],
                ratio(simulate_lru(chains, pages).hits),
                ratio(simulate_min(chains, pages).hits),
            )
        )
    ceiling = ratio(simulate_infinite(chains).hits)
    needed: dict[float, int | None] = {}
    for target in TARGETS:
        goal = target * ceiling
        first = next((p for p in grid if cache[p] >= goal), None)
        if first is None:
            needed[target] = None
            continue
        below = max((p for p in grid if p < first), default=None)
        if below is None or cache[below] >= goal:
            needed[target] = first
            continue
        a, b = below, first  # cache[a] < goal <= cache[b]
        for _ in range(refine):
            if b - a <= 1:
                break
            mid = (a + b) // 2
            if mid not in cache:
                cache[mid] = hicache_at(mid)
            if cache[mid] >= goal:
                b = mid
            else:
                a = mid
        needed[target] = b
    return SweepResult(tuple(pts), ceiling, needed, bytes_per_page)


def plot_sweep(result: SweepResult, path: Path, title: str) -> None:
    """Token hit ratio vs L3 capacity (GiB, log scale) for hicache, LRU and MIN."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("matplotlib is not installed: run `pip install hicache[plot]`") from exc
    gib = [p.l3_bytes / (1 << 30) for p in result.points]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(gib, [p.hicache for p in result.points], "o-", label="hicache (L1+L2+L3)")
    ax.plot(gib, [p.lru for p in result.points], "s--", label="LRU, one cache of the L3 size")
    ax.plot(gib, [p.min for p in result.points], "^--", label="Belady MIN, same size")
    ax.axhline(result.infinite, color="grey", linestyle=":", label="infinite cache")
    for target, pages in result.needed.items():
        if pages is not None:
            ax.axvline(pages * result.bytes_per_page / (1 << 30), color="grey", alpha=0.3)
            ax.annotate(
                f"{target:.0%}",
                (pages * result.bytes_per_page / (1 << 30), target * result.infinite),
                fontsize=8,
            )
    ax.set_xscale("log")
    ax.set_xlabel("L3 capacity (GiB of the model's KV)")
    ax.set_ylabel("prefix hit ratio (tokens)")
    ax.set_ylim(0, max(0.05, result.infinite * 1.1))
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
