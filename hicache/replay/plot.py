"""``hicache replay --plot``: hit ratio per tier over trace time (matplotlib, an optional extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_hits"]


def plot_hits(timeline: Sequence[tuple[int, int, int, int, int]], path: Path) -> None:
    """Plot the cumulative prefix hit ratio of L1, L1+L2 and L1+L2+L3 against trace time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("matplotlib is not installed: run `pip install hicache[plot]`") from exc
    t, r1, r2, r3 = [], [], [], []
    pages = l1 = l2 = l3 = 0
    for ts, n, a, b, c in timeline:
        pages += n
        l1 += a
        l2 += b
        l3 += c
        t.append(ts / 60_000)
        r1.append(l1 / pages if pages else 0.0)
        r2.append((l1 + l2) / pages if pages else 0.0)
        r3.append((l1 + l2 + l3) / pages if pages else 0.0)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.fill_between(t, 0, r1, label="L1 (device)", alpha=0.8)
    ax.fill_between(t, r1, r2, label="L2 (host)", alpha=0.8)
    ax.fill_between(t, r2, r3, label="L3 (storage)", alpha=0.8)
    ax.set_xlabel("trace time (minutes)")
    ax.set_ylabel("cumulative prefix hit ratio")
    ax.set_ylim(0, max(0.05, max(r3, default=0.0) * 1.15))
    ax.legend(loc="upper left")
    ax.set_title("hicache replay: hit ratio per tier over trace time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
