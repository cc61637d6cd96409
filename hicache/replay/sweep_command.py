"""``hicache replay sweep``: size the run as a replay would (model, GPU, L1, L2), then sweep L3
in the simulator (:mod:`hicache.replay.sweep`), print the table and the L3 needed for 50/80/90%
of the achievable hits, and plot the curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from hicache.replay.build import prompt_tokens
from hicache.replay.plan import ByteMode, SizeRequest, plan_replay
from hicache.replay.policies import l3_batch_of, l3_policy_of
from hicache.replay.sweep import SweepResult, plot_sweep, run_sweep
from hicache.storage.sizes import format_size

if TYPE_CHECKING:
    from hicache.replay.app import ReplaySettings

__all__ = ["print_sweep", "run_sweep_command", "sweep_for"]


def sweep_for(settings: ReplaySettings, points: int = 10) -> tuple[SweepResult, str]:
    """The sweep for a replay's settings (L1/L2 as the replay would size them); its title."""
    from hicache.replay.app import replay_inputs

    requests, base, model, gpu = replay_inputs(settings)
    chains = [list(r.block_ids) for r in requests]
    # the sweep moves no bytes: the scaled plan gives the sizes in trace blocks
    plan = plan_replay(
        model=model,
        gpu=gpu,
        config=base,
        config_given=settings.config is not None,
        sizes=SizeRequest(settings.l1, settings.l2, {}, settings.l1_fraction, settings.l2_fraction),
        mode=ByteMode.SCALED,
        real_page_size=base.cache.page_size,
        scaled_page_bytes=settings.scaled_page_bytes,
        distinct_blocks=len({b for c in chains for b in c}),
        longest_blocks=max(len(c) for c in chains),
        instances=settings.instances,
        memory_available=1 << 62,
    )
    threshold = base.storage.prefetch.threshold_tokens
    batch = l3_batch_of(base.storage.tiers)
    result = run_sweep(
        chains,
        prompt_tokens(requests),
        unit_tokens=plan.unit_tokens,
        bytes_per_page=plan.real_bytes_per_page,
        l1_pages=plan.l1.pages,
        l2_pages=plan.l2.pages,
        min_prefetch=max(1, -(-threshold // plan.page_size)),
        instances=settings.instances,
        points=points,
        l3_policy=l3_policy_of(base.storage.tiers, batch),
        l3_batch=batch,
    )
    title = (
        f"{model.name}: L3 sweep, L1 {format_size(plan.l1.real_bytes)} + L2 "
        f"{format_size(plan.l2.real_bytes)} x {settings.instances}, {len(requests)} requests"
    )
    return result, title


def print_sweep(result: SweepResult, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if Console().is_terminal else 130)
    table = Table(title=f"{title} (simulated; token hit ratio)")
    for col in ("L3", "pages", "hicache", "LRU", "Belady MIN"):
        table.add_column(col, justify="right")
    for p in result.points:
        table.add_row(
            format_size(p.l3_bytes),
            f"{p.l3_pages:,}",
            f"{p.hicache:.2%}",
            f"{p.lru:.2%}",
            f"{p.min:.2%}",
        )
    console.print(table)
    console.print(f"infinite cache (the achievable hits): {result.infinite:.2%}")
    for target, pages in result.needed.items():
        share = f"{target:.0%} of the achievable hits ({target * result.infinite:.2%})"
        if pages is None:
            console.print(f"L3 needed for {share}: not reached in the sweep")
        else:
            console.print(
                f"L3 needed for {share}: {format_size(pages * result.bytes_per_page)} "
                f"({pages:,} pages)"
            )


def run_sweep_command(
    settings: ReplaySettings, *, points: int, plot: Path | None, out: Path | None
) -> int:
    result, title = sweep_for(settings, points)
    print_sweep(result, title)
    if out is not None:
        out.write_text(
            json.dumps(
                {
                    "title": title,
                    "infinite": result.infinite,
                    "bytes_per_page": result.bytes_per_page,
                    "points": [
                        {
                            "l3_pages": p.l3_pages,
                            "l3_bytes": p.l3_bytes,
                            "hicache": p.hicache,
                            "lru": p.lru,
                            "min": p.min,
                        }
                        for p in result.points
                    ],
                    "needed_pages": {str(k): v for k, v in result.needed.items()},
                },
                indent=2,
            )
        )
    if plot is not None:
        plot_sweep(result, plot, title)
        print(f"plot written to {plot}")
    return 0
