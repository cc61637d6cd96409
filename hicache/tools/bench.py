"""``hicache bench storage|eviction|radix|sglang``: figures next to the machine's own limits.

- ``storage``   a configured tier's put / cold get / hot get GB/s, exists and exists_prefix
                keys/s and latency percentiles, each with the raw limit measured in the same run
                (:mod:`hicache.tools.benchmark`)
- ``eviction``  capacity policy operations per second (:mod:`hicache.tools.eviction_bench`)
- ``radix``     radix tree throughput (:mod:`hicache.tools.radix_bench`, imported only when
                asked for)
- ``sglang``    SGLang's zero-copy storage calls through the adapter vs the raw tier and SGLang's
                ``HiCacheFile`` (:mod:`hicache.tools.sglang_bench`; needs SGLang installed)

``add_parser(subparsers)`` registers the ``bench`` command on the ``hicache`` command line; every
leaf parser sets ``func``, a handler taking the parsed namespace and returning the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from hicache.errors import HicacheError
from hicache.storage.backend import Backend
from hicache.storage.baseline import Benchmarkable, RawBaseline, ToolLimit
from hicache.storage.redact import redact_url
from hicache.tools.benchmark import (
    BenchReport,
    BenchRun,
    BenchSpec,
    Figure,
    MemcpyBaseline,
    planned_units,
    run_storage_bench,
)

__all__ = ["add_parser", "format_figures", "format_report", "main"]

logger = logging.getLogger(__name__)

MIB = 1 << 20
GIB = 1 << 30
#: Defaults: Llama-3-8B pages (64 tokens x 32 layers x 8 KV heads x 128 dims x bf16 x K,V = 8 MiB)
#: and a 2 MiB page, 2 GiB per pair, at 1 and 4 threads.
DEFAULT_PAGE_MIB = (8.0, 2.0)
DEFAULT_TOTAL_GIB = 2.0
DEFAULT_THREADS = (1, 4)
#: ``--quick``: tiny sizes, so the test suite can run the whole command.
QUICK_PAGE_MIB = (0.0625, 0.015625)  # 64 KiB and 16 KiB
QUICK_TOTAL_GIB = 2 / 1024  # 2 MiB
QUICK_THREADS = (1, 2)
#: Rounds per pair: shared machines are noisy, so a figure is the median of several.
DEFAULT_REPEAT = 3


class _BenchParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that, built with ``passthrough=True``, parses nothing itself and
    keeps every argument for a parser built later (``bench radix`` imports its module lazily)."""

    def __init__(self, *args: Any, passthrough: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.passthrough = passthrough

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if not self.passthrough:
            return super().parse_known_args(args, namespace)
        result = namespace if namespace is not None else argparse.Namespace()
        for name, value in self._defaults.items():
            setattr(result, name, value)
        result.passthrough_argv = list(args if args is not None else sys.argv[1:])
        return result, []


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _ints(text: str) -> tuple[int, ...]:
    values = _floats(text)
    if any(v != int(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return tuple(int(v) for v in values)


def _positive_float(text: str) -> float:
    return _floats(text)[0]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` and its subcommands on ``subparsers`` (from ``add_subparsers``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="measure storage, eviction or radix throughput against the machine's limits",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    sub = parser.add_subparsers(dest="bench_command", required=True, parser_class=_BenchParser)

    storage = sub.add_parser(
        "storage",
        help="put/get GB/s, exists keys/s and latencies of a configured tier vs raw limits",
    )
    storage.add_argument("--config", required=True, help="hicache YAML configuration file")
    storage.add_argument("--tier", help="tier name in storage.tiers (default: the first)")
    storage.add_argument("--json", action="store_true", help="print machine-readable JSON")
    storage.add_argument(
        "--page-mib", type=_floats, help="page sizes in MiB, comma-separated (default 8,2)"
    )
    storage.add_argument(
        "--total-gib", type=_positive_float, help="bytes written per page size and thread count"
    )
    storage.add_argument("--threads", type=_ints, help="thread counts (default 1,4)")
    storage.add_argument("--batch", type=int, default=1, help="pages per put/get call")
    storage.add_argument(
        "--exists-keys",
        type=int,
        default=20_000,
        help="keys asked per exists/exists_prefix figure (lower it for slow remote tiers)",
    )
    storage.add_argument(
        "--exists-batch",
        type=int,
        help="keys per exists/exists_prefix call, the chain length asked at once (default 64)",
    )
    storage.add_argument(
        "--repeat",
        type=int,
        help=f"rounds per page size and thread count, the side measured first alternating; "
        f"figures are medians (default {DEFAULT_REPEAT}, 1 with --quick)",
    )
    storage.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    storage.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    storage.set_defaults(func=_run_storage)

    eviction = sub.add_parser("eviction", help="capacity policy operations per second")
    eviction.add_argument("--keys", type=int, default=100_000, help="resident keys")
    eviction.add_argument("--rounds", type=int, default=2_000, help="64-key chains per figure")
    eviction.add_argument("--json", action="store_true", help="print machine-readable JSON")
    eviction.set_defaults(func=_run_eviction)

    radix = sub.add_parser(
        "radix",
        help="radix tree throughput (options: hicache bench radix --help)",
        add_help=False,
        passthrough=True,
    )
    radix.set_defaults(func=_run_radix)

    sglang = sub.add_parser(
        "sglang",
        help="SGLang batch_set_v1/batch_get_v1 GB/s through the adapter vs raw tier and "
        "HiCacheFile (options: hicache bench sglang --help)",
        add_help=False,
        passthrough=True,
    )
    sglang.set_defaults(func=_run_sglang)
    return parser


# ----------------------------------------------------------------------------- storage


def _spec_from_args(args: argparse.Namespace) -> BenchSpec:
    quick = bool(args.quick)
    page_mib = args.page_mib or (QUICK_PAGE_MIB if quick else DEFAULT_PAGE_MIB)
    total_gib = args.total_gib or (QUICK_TOTAL_GIB if quick else DEFAULT_TOTAL_GIB)
    threads = args.threads or (QUICK_THREADS if quick else DEFAULT_THREADS)
    repeat = args.repeat if args.repeat is not None else (1 if quick else DEFAULT_REPEAT)
    # Unset: the spec's own default.
    chain = {} if args.exists_batch is None else {"exists_batch": args.exists_batch}
    try:
        return BenchSpec(
            **chain,
            min_exists_keys=args.exists_keys,
            page_bytes=tuple(max(1, int(m * MIB)) for m in page_mib),
            total_bytes=max(1, int(total_gib * GIB)),
            threads=threads,
            batch=args.batch,
            repeat=repeat,
        )
    except ValueError as exc:  # the spec checks itself and names the field
        raise HicacheError(f"bad benchmark options: {exc}") from exc


def _build_tier(
    config_path: str, tier_name: str | None
) -> tuple[str, str, Callable[[int, str], Any]]:
    """Return (tier name, backend kind, make_backend) for a tier of a config file."""
    from hicache.errors import ConfigError
    from hicache.tools.ops import tier_handle

    handle = tier_handle(config_path, tier_name)
    if handle.read_only:
        raise ConfigError(f"tier {handle.name!r} is read_only: the benchmark must write pages")

    def make_backend(page_bytes: int, namespace: str) -> Any:
        return handle.make(page_bytes, namespace, False)

    return handle.name, handle.kind, make_backend


def _baseline_for(backend: Backend) -> RawBaseline:
    if not isinstance(backend, Benchmarkable):
        return MemcpyBaseline()
    baseline = type(backend).bench_baseline(backend.config, backend.context)
    if not isinstance(baseline, RawBaseline):
        raise TypeError(
            f"{type(backend).__name__}.bench_baseline returned {type(baseline).__name__}, "
            "expected a hicache.storage.RawBaseline"
        )
    return baseline


def _fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "ms":
        return f"{value:.3f} ms"
    if unit in ("GB/s", "GB/CPU-s"):
        return f"{value:.2f} {unit}"
    return f"{value / 1e6:.2f} M{unit}" if value >= 1e6 else f"{value / 1e3:.1f} k{unit}"


def format_figures(figures: Sequence[Figure], label: str = "figure") -> list[str]:
    """Aligned ``name  value  limit  ratio`` lines (plus the rounds' ratios when several)."""
    rounds = any(len(fig.round_ratios) > 1 for fig in figures)
    head = f"  {label:<16} {'value':>16} {'limit':>16} {'ratio':>7}"
    lines = [f"{head} {'best':>6}  rounds" if rounds else head]
    for fig in figures:
        ratio = "n/a" if fig.ratio is None else f"{fig.ratio:.2f}"
        line = (
            f"  {fig.name:<16} {_fmt_value(fig.value, fig.unit):>16} "
            f"{_fmt_value(fig.limit, fig.unit):>16} {ratio:>7}"
        )
        if rounds and fig.round_ratios:
            best = "n/a" if fig.best_ratio is None else f"{fig.best_ratio:.2f}"
            line += f" {best:>6}  " + " ".join(f"{r:.2f}" for r in fig.round_ratios)
        lines.append(line)
    return lines


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


def format_report(report: BenchReport) -> str:
    """The human-readable report: one block per (page size, threads) pair."""
    lines = [
        f"hicache bench storage: tier {report.tier!r} (backend {report.backend})",
        f"limit: {report.baseline}, same pages, threads and batches ({report.batch} page/call)",
        "ratio: throughput / limit, or limit latency / latency (1.00 = at the machine's limit)",
    ]
    rounds = max((run.rounds for run in report.runs), default=1)
    if rounds > 1:
        lines.append(
            f"{rounds} rounds per pair, the side measured first alternating: value and limit "
            "are medians, ratio the median of the rounds' ratios, best each side's best round "
            "against the other's"
        )
    for run in report.runs:
        size = run.page_bytes * run.num_pages
        lines.append("")
        lines.append(
            f"page {_size(run.page_bytes)} x {run.num_pages} pages ({_size(size)}), "
            f"{run.threads} thread{'s' if run.threads > 1 else ''}"
        )
        if run.pages_read < run.num_pages:
            lines.append(
                f"  note: only {run.pages_read} pages were still stored after the puts (tier "
                "capacity); reads and presence checks use those, on both sides"
            )
        lines.extend(format_figures(run.figures))
        for tool in run.tool_limits:
            lines.append(_format_tool(run, tool))
        for phase, counts in run.problems.items():
            lines.append(f"  warning: {phase}: {counts} (figures count these pages too)")
    return "\n".join(lines)


def _format_tool(run: BenchRun, tool: ToolLimit) -> str:
    """``  tool limit: NAME  x GB/s, FIGURE / it: r  (how)``."""
    if tool.gbps is None:
        return f"  tool limit: {tool.name} n/a ({tool.note})"
    value = run.figure(tool.figure).value
    ratio = "n/a" if value is None or tool.gbps <= 0 else f"{value / tool.gbps:.2f}"
    return (
        f"  tool limit: {tool.name} {tool.gbps:.2f} GB/s, {tool.figure} / it: {ratio}"
        f"  ({tool.note})"
    )


def _run_storage(args: argparse.Namespace) -> int:
    try:
        spec = _spec_from_args(args)
        tier, kind, make_backend = _build_tier(args.config, args.tier)
    except HicacheError as exc:
        print(f"error: {redact_url(str(exc))}", file=sys.stderr)
        return 2
    show_progress = not args.json and not args.no_progress and sys.stderr.isatty()

    def run(progress: Callable[[int], None] | None) -> BenchReport:
        return run_storage_bench(
            make_backend=make_backend,
            make_baseline=_baseline_for,
            spec=spec,
            tier=tier,
            backend_kind=kind,
            progress=progress,
        )

    try:
        if show_progress:
            from rich.progress import Progress

            with Progress(transient=True) as bar:
                task = bar.add_task(f"bench {tier}", total=planned_units(spec))
                report = run(lambda n: bar.advance(task, n))
        else:
            report = run(None)
    except HicacheError as exc:
        print(f"error: tier {tier!r}: {redact_url(str(exc))}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(format_report(report))
    return 0


# ----------------------------------------------------------------------------- eviction


def _run_eviction(args: argparse.Namespace) -> int:
    from hicache.tools.eviction_bench import run_eviction_bench

    if args.keys < 1000 or args.rounds < 1:
        print("error: --keys must be >= 1000 and --rounds >= 1", file=sys.stderr)
        return 2
    figures = run_eviction_bench(num_keys=args.keys, rounds=args.rounds)
    if args.json:
        print(json.dumps({"figures": {f.name: f.to_json() for f in figures}}, indent=2))
    else:
        print(f"hicache bench eviction: {args.keys} resident keys, single thread")
        print("limit: the same loop on the bare structure (no policy, no lock)")
        print("\n".join(format_figures(figures, "operation")))
    return 0


# ----------------------------------------------------------------------------- radix


def _run_radix(args: argparse.Namespace) -> int:
    try:
        radix_bench = importlib.import_module("hicache.tools.radix_bench")
    except ImportError as exc:
        print(
            f"error: hicache bench radix is not available ({exc}); it needs the cache side "
            "(`pip install hicache[cache]`) and hicache.tools.radix_bench",
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(
        prog="hicache bench radix", description="radix tree throughput"
    )
    radix_bench.add_arguments(parser)
    radix_args = parser.parse_args(getattr(args, "passthrough_argv", []))
    return int(radix_bench.run(radix_args))


def _run_sglang(args: argparse.Namespace) -> int:
    try:
        sglang_bench = importlib.import_module("hicache.tools.sglang_bench")
        importlib.import_module("sglang.srt.mem_cache.hicache_storage")
    except ImportError as exc:
        print(
            f"error: hicache bench sglang is not available ({exc}); it needs SGLang "
            "(`pip install sglang`) and the cache side (`pip install hicache[cache]`)",
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(
        prog="hicache bench sglang", description="SGLang storage calls through the adapter"
    )
    sglang_bench.add_arguments(parser)
    return int(sglang_bench.run(parser.parse_args(getattr(args, "passthrough_argv", []))))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bench ...`` on its own (``python -m hicache.tools.bench storage ...``)."""
    parser = argparse.ArgumentParser(prog="hicache")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
