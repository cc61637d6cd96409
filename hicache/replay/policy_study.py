"""The cache-efficiency study: token hit ratio of each policy across capacities, on a trace.

``python -m hicache.replay.policy_study [TRACE] --plot docs/cache-efficiency.png`` prints the
table (Markdown, as in ``docs/cache-efficiency.md``) and draws hit ratio against capacity;
``--workload NAME`` runs a synthetic workload of :mod:`hicache.replay.workloads` instead.

Capacities are shares of the trace's distinct blocks (one block = one replay page of 512
tokens). Single-cache policies hold that many blocks; "hicache today" is the replay's hierarchy
(L1 ⊆ L2 tail-first LRUs at the replay's default sizes for Llama-3-8B on an H100, the L3 at
the capacity); "exclusive" designs give the same L1 + L2 + L3 pages to one cache (each tier
keeps what the tier above evicts, so the capacity adds up; see the doc for what that costs
write-through).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hicache.replay.policies import (
    simulate_arc,
    simulate_capacity_policy,
    simulate_exclusive_hierarchy,
    simulate_second_hit,
)
from hicache.replay.simulate import simulate_hierarchy, simulate_infinite, simulate_min
from hicache.replay.sweep import token_ratio
from hicache.replay.trace import load_trace
from hicache.replay.workloads import WORKLOADS
from hicache.storage.eviction import EvictionPolicy, TailFirstLRU, make_capacity_policy
from hicache.storage.reuse_policy import PredictedReuse

__all__ = ["FRACTIONS", "POLICIES", "StudyRow", "markdown_table", "plot_study", "run_study"]

FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
#: The replay's default L1 / L2 pages on the shipped trace (Llama-3-8B, H100; docs/replay.md).
DEFAULT_L1 = 833
DEFAULT_L2 = 1667
BLOCK_TOKENS = 512

Chains = Sequence[Sequence[int]]
Runner = Callable[[Chains, int, int, int], Sequence[int]]


def _single(make: Callable[[int], object]) -> Runner:
    def run(chains: Chains, cap: int, l1: int, l2: int) -> Sequence[int]:
        return simulate_capacity_policy(chains, make(cap))  # type: ignore[arg-type]

    return run


def _hicache_today(chains: Chains, cap: int, l1: int, l2: int) -> Sequence[int]:
    return simulate_hierarchy(chains, l1, max(l1 + 1, l2), cap).hits


def _tiered_reuse(chains: Chains, cap: int, l1: int, l2: int) -> Sequence[int]:
    # what a localdisk L3 runs, fed as it is (puts and reads cut into its 64-page calls)
    return simulate_hierarchy(
        chains,
        l1,
        max(l1 + 1, l2),
        cap,
        l3_policy=lambda c: make_capacity_policy(EvictionPolicy.PREDICTED_REUSE, c, batch=64),
        l3_batch=64,
    ).hits


def _reuse_l2(all_uses: bool) -> Runner:
    # the tiers' L3 (64-page calls) under an L2 (the host pool) that evicts by predicted reuse
    def run(chains: Chains, cap: int, l1: int, l2: int) -> Sequence[int]:
        return simulate_hierarchy(
            chains,
            l1,
            max(l1 + 1, l2),
            cap,
            l3_policy=lambda c: make_capacity_policy(EvictionPolicy.PREDICTED_REUSE, c, batch=64),
            l3_batch=64,
            l2_policy=PredictedReuse,
            all_uses_in_l3=all_uses,
        ).hits

    return run


def _exclusive_l2_l3(chains: Chains, cap: int, l1: int, l2: int) -> Sequence[int]:
    # the most L2 and L3 can reach together: one predicted-reuse cache of their pages (L1
    # stays a copy of part of L2, as in the radix cache)
    return simulate_capacity_policy(chains, PredictedReuse(cap + l2))


def _exclusive_tiers(chains: Chains, cap: int, l1: int, l2: int) -> Sequence[int]:
    policy = PredictedReuse(cap, tail_class=False)
    return simulate_exclusive_hierarchy(chains, l1, max(l1 + 1, l2), policy)


def _exclusive(make: Callable[[int], object]) -> Runner:
    def run(chains: Chains, cap: int, l1: int, l2: int) -> Sequence[int]:
        return simulate_capacity_policy(chains, make(cap + l1 + l2))  # type: ignore[arg-type]

    return run


def _no_tail_class(capacity: int) -> PredictedReuse:
    return PredictedReuse(capacity, tail_class=False)


#: name -> (description, runner)
POLICIES: dict[str, tuple[str, Runner]] = {
    "LRU": ("tail-first LRU of the capacity (what every tier runs today)", _single(TailFirstLRU)),
    "hicache today": ("inclusive L1 ⊆ L2 + tail-first LRU L3 at the capacity", _hicache_today),
    "MIN": (
        "Belady's offline optimum at the capacity",
        lambda ch, cap, l1, l2: simulate_min(ch, cap).hits,
    ),
    "second hit": (
        "admit a block at its second reference",
        lambda ch, cap, l1, l2: simulate_second_hit(ch, cap),
    ),
    "ARC": ("adaptive recency/frequency split", lambda ch, cap, l1, l2: simulate_arc(ch, cap)),
    "reuse (uses only)": ("predicted reuse, classes by uses only", _single(_no_tail_class)),
    "predicted reuse": ("predicted reuse by uses x tail class", _single(PredictedReuse)),
    "hicache + predicted reuse": (
        "inclusive L1 ⊆ L2 + the tiers' predicted-reuse L3 (64-page calls)",
        _tiered_reuse,
    ),
    "L2 predicted reuse": (
        "as hicache + predicted reuse, with L2 evicting by predicted reuse too",
        _reuse_l2(False),
    ),
    "L2 reuse, all uses in L3": (
        "as L2 predicted reuse, and every L1/L2 hit touched in L3 (uses counted across tiers)",
        _reuse_l2(True),
    ),
    "exclusive L2 + L3": (
        "one predicted-reuse cache of L2 + L3 pages: the bound of any L2/L3 design",
        _exclusive_l2_l3,
    ),
    "exclusive tiers": (
        "L1 ⊆ L2 LRUs + a predicted-reuse L3 that gets only L2's victims (write-back)",
        _exclusive_tiers,
    ),
    "exclusive LRU": ("one LRU of L1 + L2 + L3 pages (write-back)", _exclusive(TailFirstLRU)),
    "exclusive predicted reuse": (
        "one predicted-reuse cache of L1 + L2 + L3",
        _exclusive(PredictedReuse),
    ),
}


@dataclass(frozen=True, slots=True)
class StudyRow:
    fraction: float
    pages: int
    ratios: dict[str, float]


def run_study(
    chains: Chains,
    prompt_tokens: Sequence[int],
    *,
    fractions: Sequence[float] = FRACTIONS,
    policies: Sequence[str] | None = None,
    l1: int = DEFAULT_L1,
    l2: int = DEFAULT_L2,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[StudyRow], float]:
    """Token hit ratio of each policy at each capacity; and the infinite cache's ratio."""
    names = list(policies) if policies is not None else list(POLICIES)
    distinct = len({b for c in chains for b in c})
    rows = []
    for f in fractions:
        cap = max(1, int(distinct * f))
        ratios = {}
        for name in names:
            began = time.perf_counter()
            hits = POLICIES[name][1](chains, cap, l1, l2)
            ratios[name] = token_ratio(hits, BLOCK_TOKENS, prompt_tokens)
            if progress is not None:
                progress(
                    f"{f:.1%} {name}: {ratios[name]:.2%} ({time.perf_counter() - began:.1f} s)"
                )
        rows.append(StudyRow(f, cap, ratios))
    infinite = token_ratio(simulate_infinite(chains).hits, BLOCK_TOKENS, prompt_tokens)
    return rows, infinite


def markdown_table(rows: Sequence[StudyRow], infinite: float) -> str:
    names = list(rows[0].ratios)
    out = ["| capacity | pages | " + " | ".join(names) + " |"]
    out.append("|---:|---:|" + "---:|" * len(names))
    for row in rows:
        cells = " | ".join(f"{row.ratios[n]:.2%}" for n in names)
        out.append(f"| {row.fraction:.1%} | {row.pages:,} | {cells} |")
    out.append(f"\ninfinite cache (the achievable hits): {infinite:.2%}")
    return "\n".join(out)


def plot_study(rows: Sequence[StudyRow], infinite: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    xs = [r.fraction * 100 for r in rows]
    # more policies than the default cycle's 10 colours: one colour and marker each
    colors = plt.get_cmap("tab20").colors  # type: ignore[attr-defined]
    markers = "os^vDP*Xhd<>p8"
    for i, name in enumerate(rows[0].ratios):
        style = "--" if name in ("MIN", "LRU") else "-"
        ax.plot(
            xs,
            [r.ratios[name] * 100 for r in rows],
            style,
            marker=markers[i % len(markers)],
            color=colors[i % len(colors)],
            label=name,
        )
    ax.axhline(infinite * 100, color="grey", linestyle=":", label="infinite cache")
    ax.set_xscale("log")
    ax.set_xlabel("capacity (% of distinct pages, log scale)")
    ax.set_ylabel("token hit ratio (%)")
    ax.set_title("Policy study: shipped Mooncake conversation trace")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hicache.replay.policy_study", description=__doc__)
    p.add_argument("trace", nargs="?", help="JSONL trace (default: the shipped Mooncake trace)")
    p.add_argument("--limit", type=int, help="first N requests only")
    p.add_argument(
        "--workload", choices=list(WORKLOADS), help="a synthetic workload instead of a trace"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --workload")
    p.add_argument("--plot", type=Path, help="PNG of hit ratio against capacity")
    p.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    p.add_argument("--policies", nargs="+", choices=list(POLICIES), help="default: all")
    args = p.parse_args(argv)
    if args.workload is not None:
        chains, prompts = WORKLOADS[args.workload](args.seed)
    else:
        trace = load_trace(args.trace, args.limit)
        chains = [r.block_ids for r in trace]
        prompts = [r.input_length for r in trace]
    rows, infinite = run_study(
        chains,
        prompts,
        fractions=args.fractions,
        policies=args.policies,
        progress=lambda line: print(line, flush=True),
    )
    print(markdown_table(rows, infinite))
    if args.plot is not None:
        plot_study(rows, infinite, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
