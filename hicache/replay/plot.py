"""``hicache replay --plot``: hit ratio per tier over trace time, in tokens, with LRU and MIN at
the largest tier's capacity for comparison (matplotlib, an optional extra)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from hicache.replay.sweep import hit_tokens

__all__ = ["plot_hits"]


def _cumulative(hits: Sequence[int], unit: int, prompts: Sequence[int]) -> list[float]:
    out, saved, total = [], 0, 0
    for h, p in zip(hits, prompts, strict=True):
        saved += hit_tokens(h, unit, p)
        total += p
        out.append(saved / total if total else 0.0)
    return out


def plot_hits(
    timeline: Sequence[tuple[int, int, int, int, int]],
    path: Path,
    *,
    lru_min: tuple[int, Sequence[int], Mapping[str, Sequence[int]]],
) -> None:
    """Cumulative token hit ratio of L1, L1+L2 and L1+L2+L3 against trace time, and the
    reference lines of ``lru_min = (unit_tokens, prompt_tokens, {label: hits per request})``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("matplotlib is not installed: run `pip install hicache[plot]`") from exc
    unit, prompts, refs = lru_min
    t = [row[0] / 60_000 for row in timeline]
    r1 = _cumulative([row[2] for row in timeline], unit, prompts)
    r2 = _cumulative([row[2] + row[3] for row in timeline], unit, prompts)
    r3 = _cumulative([row[2] + row[3] + row[4] for row in timeline], unit, prompts)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.fill_between(t, 0, r1, label="L1 (device)", alpha=0.8)
    ax.fill_between(t, r1, r2, label="L2 (host)", alpha=0.8)
    ax.fill_between(t, r2, r3, label="L3 (storage)", alpha=0.8)
    top = max(r3, default=0.0)
    for style, (label, hits) in zip(("--", ":"), refs.items(), strict=False):
        line = _cumulative(hits, unit, prompts)
        top = max(top, max(line, default=0.0))
        ax.plot(t, line, style, color="black", label=label)
    ax.set_xlabel("trace time (minutes)")
    ax.set_ylabel("cumulative prefix hit ratio (tokens)")
    ax.set_ylim(0, max(0.05, top * 1.15))
    ax.legend(loc="upper left")
    ax.set_title("hicache replay: token hit ratio per tier over trace time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
