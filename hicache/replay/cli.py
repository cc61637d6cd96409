"""The ``hicache replay`` command line: its options, their conversion to :class:`ReplaySettings`
and ``main`` (the run itself is :func:`hicache.replay.app.run_replay`; ``replay sweep`` is
:mod:`hicache.replay.sweep_command`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hicache.replay import app
from hicache.replay.app import (
    DEFAULT_PREFETCH_AHEAD,
    ReplayHooks,
    ReplaySettings,
    _chains,
    run_replay,
)
from hicache.replay.build import prompt_tokens
from hicache.replay.models import DEFAULT_MFU, MODEL_PRESETS
from hicache.replay.plan import ByteMode, DoesNotFit
from hicache.replay.report import ReplayReport, print_report
from hicache.replay.trace import load_trace
from hicache.storage.eviction import EvictionPolicy
from hicache.storage.sizes import parse_size

if TYPE_CHECKING:
    from hicache.hiradix import HiRadixCache

__all__ = ["add_parser", "main", "settings_from_args"]


def _l3_sizes(value: str) -> dict[str, int]:
    """``1TiB`` (every tier) or ``nvme=500GiB,s3=4TiB`` (per tier name)."""
    out: dict[str, int] = {}
    for part in value.split(","):
        name, _, size = part.rpartition("=")
        try:
            out[name.strip()] = parse_size(size.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"--l3 {value!r}: {exc}") from exc
    return out


def _non_negative_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value!r}")
    return n


def _size(value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "replay",
        help="replay a production trace through the whole hierarchy (`replay sweep`: L3 sizing)",
        description=app.__doc__,
    )
    p.add_argument(
        "words",
        nargs="*",
        metavar="[sweep] [TRACE]",
        help="`sweep` for the simulated L3 capacity sweep; a JSONL trace (default: shipped "
        "Mooncake)",
    )
    p.add_argument("--config", type=Path, help="YAML config (default: embedded local-disk L3)")
    p.add_argument("--limit", type=int, default=0, help="first N requests (default 0 = all)")
    p.add_argument(
        "--model",
        help=f"a preset ({', '.join(MODEL_PRESETS)}) or a Hugging Face config.json (default: "
        "the config's model, else llama-3-8b)",
    )
    p.add_argument("--gpu", default="h100", help="GPU class for default L1 and prefill estimate")
    p.add_argument("--page-size", type=int, default=16, help="the model's tokens per page")
    p.add_argument("--l1", type=_size, help="L1 (device) bytes per instance, e.g. 40GiB")
    p.add_argument("--l2", type=_size, help="L2 (host) bytes per instance (default 2x L1)")
    p.add_argument(
        "--l3", type=_l3_sizes, default={}, help="L3 bytes: 1TiB, or per tier nvme=500GiB,s3=4TiB"
    )
    p.add_argument("--l1-fraction", type=float, help="L1 pages as a fraction of distinct pages")
    p.add_argument("--l2-fraction", type=float)
    p.add_argument("--l3-fraction", type=float)
    p.add_argument(
        "--bytes",
        dest="bytes_mode",
        type=ByteMode,
        choices=list(ByteMode),
        default=ByteMode.AUTO,
        help="real: move the model's real page bytes; scaled: small stand-in pages; auto: real "
        "when it fits and writes at most 2 GiB",
    )
    p.add_argument("--num-layers", type=int, default=2, help="stand-in page shape (scaled)")
    p.add_argument("--num-kv-heads", type=int, default=2, help="stand-in page shape (scaled)")
    p.add_argument("--head-dim", type=int, default=32, help="stand-in page shape (scaled)")
    p.add_argument("--prefill-tokens-per-s", type=float, help="replaces the prefill estimate")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="MFU of the prefill estimate")
    p.add_argument(
        "--speed", type=float, help="arrivals at trace time / X: model queueing (default: none)"
    )
    p.add_argument("--no-calibrate", action="store_true", help="skip measuring the tiers")
    p.add_argument("--instances", type=int, default=1, choices=(1, 2))
    p.add_argument("--data-dir", type=Path, default=Path("hicache-data"))
    p.add_argument("--keep-storage", action="store_true")
    p.add_argument("--json", type=Path, help="write the report as JSON to this file")
    p.add_argument(
        "--plot", type=Path, help="PNG: hit ratio per tier over trace time (sweep: the curves)"
    )
    p.add_argument("--points", type=int, default=10, help="sweep: L3 capacities on the grid")
    p.add_argument(
        "--sync-publish",
        action="store_true",
        help="finish each request's publishes before the next request (exactly the "
        "block simulation's order; slower)",
    )
    p.add_argument(
        "--prefetch-ahead",
        type=_non_negative_int,
        default=DEFAULT_PREFETCH_AHEAD,
        metavar="N",
        help="start the prefetch of the next N requests while one is served, as a scheduler "
        "does for the requests waiting in its queue (0: one request at a time; ignored with "
        f"--sync-publish; default {DEFAULT_PREFETCH_AHEAD})",
    )
    p.add_argument(
        "--eviction",
        choices=[e.value for e in EvictionPolicy],
        help="the embedded L3 tier's eviction policy (default: predicted_reuse)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus /metrics on this port while the replay runs (0: a free port; "
        "needs hicache[metrics])",
    )
    p.add_argument(
        "--metrics-addr", default="127.0.0.1", help="address /metrics binds (default 127.0.0.1)"
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--print-schema", action="store_true", help="print the JSON schema and exit")
    p.set_defaults(func=main)


def settings_from_args(args: argparse.Namespace, trace: Path | None) -> ReplaySettings:
    return ReplaySettings(
        trace=trace,
        config=args.config,
        limit=args.limit or None,
        model=args.model,
        gpu=args.gpu,
        page_size=args.page_size,
        num_layers=args.num_layers,
        num_kv_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        l1=args.l1,
        l2=args.l2,
        l3=args.l3,
        l1_fraction=args.l1_fraction,
        l2_fraction=args.l2_fraction,
        l3_fraction=args.l3_fraction,
        bytes_mode=args.bytes_mode,
        prefill_tokens_per_s=args.prefill_tokens_per_s,
        mfu=args.mfu,
        speed=args.speed,
        calibrate=not args.no_calibrate,
        instances=args.instances,
        data_dir=args.data_dir,
        keep_storage=args.keep_storage,
        progress=not args.no_progress,
        sync_publish=args.sync_publish,
        prefetch_ahead=args.prefetch_ahead,
        eviction=args.eviction,
        metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr,
    )


def main(args: argparse.Namespace) -> int:
    if args.print_schema:
        print(json.dumps(ReplayReport.model_json_schema(), indent=2))
        return 0
    words = list(args.words)
    sweep = bool(words) and words[0] == "sweep"
    if sweep:
        words.pop(0)
    if len(words) > 1:
        print(f"hicache replay: one trace expected, got {words}", file=sys.stderr)
        return 2
    settings = settings_from_args(args, Path(words[0]) if words else None)
    try:
        if sweep:
            from hicache.replay.sweep_command import run_sweep_command

            return run_sweep_command(settings, points=args.points, plot=args.plot, out=args.json)
        report, timeline = run_replay(settings, ReplayHooks(started=_announce_metrics))
    except DoesNotFit as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print_report(report)
    if args.json:
        args.json.write_text(report.model_dump_json(indent=2))
    if args.plot:
        from hicache.replay.plot import plot_hits

        plot_hits(timeline, args.plot, lru_min=_lru_min_series(report, settings))
        print(f"plot written to {args.plot}")
    return 0


def _announce_metrics(_caches: Sequence[HiRadixCache], url: str | None) -> None:
    if url is not None:
        print(f"serving Prometheus metrics at {url}", file=sys.stderr, flush=True)


def _lru_min_series(
    report: ReplayReport, settings: ReplaySettings
) -> tuple[int, list[int], dict[str, list[int]]]:
    """Per-request prefix hits of LRU and MIN at the largest tier's capacity, for the plot."""
    from hicache.replay.simulate import simulate_lru, simulate_min

    requests = load_trace(settings.trace, settings.limit)
    chains = _chains(requests, report.scaling.pages_per_block)
    cap = report.overall.largest_tier_capacity_pages
    refs: dict[str, list[int]] = {}
    if cap:
        refs[f"LRU at {cap:,} pages"] = list(simulate_lru(chains, cap).hits)
        refs[f"Belady MIN at {cap:,} pages"] = list(simulate_min(chains, cap).hits)
    return report.scaling.unit_tokens, prompt_tokens(requests), refs
