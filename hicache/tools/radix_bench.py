"""``hicache bench radix``: hicache's radix trees beside SGLang's own ``RadixCache``, same run.

Workloads: one shared prefix (``--prefix-tokens``, default 1k and 32k) followed by a unique
suffix per request, at every ``--page-sizes`` (default 1, 16, 64). Phases, in requests per
second of this process's CPU time (other tenants of a shared machine do not count):

- ``insert``         every request inserted into an empty tree
- ``match_full``     the same sequences matched again (every page hits)
- ``match_prefix``   the shared prefix followed by a new suffix (only the prefix hits)
- ``served_insert``  hicache: ``HiRadixCache`` as it is served (write-through, GPU and CPU_PINNED
                     events on, a transfer engine that acks at once, ``writing_check`` and
                     ``take_events`` after each insert); SGLang: ``RadixCache`` with events on,
                     ``take_events`` after each insert

The peer is SGLang's real ``RadixCache`` (:mod:`hicache.tools._sglang_radix`), run in this
process; without SGLang the bench says so and prints hicache's figures alone. Inputs are fresh
objects per request, each side's in the form it takes, built outside the timer
(:mod:`hicache.tools._radix_baseline`): SGLang a ``RadixKey`` of an ``array('q')``, hicache the
same ``array('q')`` (``--hicache-input list`` hands it the tokenizer's ``list[int]`` instead).
Each round builds fresh trees, the sides alternating; figures are medians over ``--rounds``.
Every match result is checked against the workload.

Also printed: the garbage collector's share of each side's insert time (the collector runs as in
a server, only the harness's inputs are frozen out of it), and the Python memory per cached page
(``tracemalloc``: tree and bookkeeping, no KV bytes; torch tensor storage is invisible to it, so
SGLang's per-token slot tensors count only as objects).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

from hicache.tools._radix_baseline import (
    INPUT_FORMS,
    Side,
    Workload,
    hicache_sides,
    prepared,
    sglang_sides,
)
from hicache.tools._sglang_radix import PeerMissing, SglangPeer, load_peer

__all__ = ["add_arguments", "run"]

#: hicache side -> the SGLang side it is compared with, per phase.
_PAIRS = {
    "insert": ("hicache", "sglang"),
    "match_full": ("hicache", "sglang"),
    "match_prefix": ("hicache", "sglang"),
    "served_insert": ("hicache_served", "sglang_events"),
}


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"need positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench radix`` options to ``parser``."""
    parser.add_argument("--page-sizes", type=_ints, default=[1, 16, 64], help="e.g. 1,16,64")
    parser.add_argument(
        "--prefix-tokens", type=_ints, default=[1024, 32768], help="shared prefix lengths"
    )
    parser.add_argument("--unique-tokens", type=int, default=1024, help="suffix per request")
    parser.add_argument(
        "--requests", type=int, default=1000, help="requests per workload (default 1000)"
    )
    parser.add_argument(
        "--long-requests",
        type=int,
        default=100,
        help="requests of workloads with a prefix over 4k tokens (default 100)",
    )
    parser.add_argument("--memory-requests", type=int, default=200, help="requests traced")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median counts")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--hicache-input",
        choices=INPUT_FORMS,
        default="array",
        help="request form handed to hicache (default: array, the array('q') SGLang takes)",
    )
    parser.add_argument("--no-peer", action="store_true", help="do not import SGLang")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


class _GcClock:
    """CPU seconds spent in the cyclic garbage collector, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.total = 0.0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.process_time()
        else:
            self.total += time.process_time() - self._start


def _timed(
    step: Callable[[Any], object], inputs: Sequence[Any], clock: _GcClock
) -> tuple[float, float, list[Any]]:
    """(seconds, GC seconds, results) of calling ``step`` on every input."""
    gc.collect()
    gc.freeze()  # the prepared inputs are the harness's, not the tree's
    try:
        in_gc = clock.total
        out = []
        t0 = time.process_time()
        for a in inputs:
            out.append(step(a))
        elapsed = time.process_time() - t0
        return elapsed, clock.total - in_gc, out
    finally:
        gc.unfreeze()


def _check(side: Side, results: list[Any], want: int, what: str) -> None:
    got = {side.matched(r) for r in results}
    if got != {want}:
        raise RuntimeError(f"{side.name} {what}: matched {sorted(got)[:5]} tokens, not {want}")


def _round(
    w: Workload, sides: dict[str, Side], order: list[str], clock: _GcClock
) -> dict[str, dict[str, tuple[float, float]]]:
    """One round on fresh trees: ``{side: {phase: (req/s, gc share)}}``."""
    out: dict[str, dict[str, tuple[float, float]]] = {name: {} for name in sides}
    arrays = w.arrays("requests")
    for name in order:
        side = sides[name]
        inputs = prepared(side, arrays, insert=True)
        elapsed, in_gc, _ = _timed(side.insert, inputs, clock)
        phase = "served_insert" if name in ("hicache_served", "sglang_events") else "insert"
        out[name][phase] = (w.requests / elapsed, in_gc / elapsed)
        del inputs
    hits = w.arrays("prefix_hits")
    for name in order:
        side = sides[name]
        if name not in ("hicache", "sglang"):
            continue
        for phase, source, want in (
            ("match_full", arrays, w.tokens - w.tokens % w.page_size),
            ("match_prefix", hits, w.prefix_tokens - w.prefix_tokens % w.page_size),
        ):
            inputs = prepared(side, source, insert=False)
            elapsed, in_gc, results = _timed(side.match, inputs, clock)
            _check(side, results, want, phase)
            out[name][phase] = (w.requests / elapsed, in_gc / elapsed)
            del inputs, results
    return out


def _memory(
    w: Workload, build: Callable[[], dict[str, Side]], names: list[str]
) -> dict[str, float]:
    """Python bytes per cached page of each side once ``w.requests`` requests are inserted."""
    out: dict[str, float] = {}
    arrays = w.arrays("requests")
    for name in names:
        side = build()[name]
        inputs = prepared(side, arrays, insert=True)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for a in inputs:
                side.insert(a)
            del inputs
            gc.collect()
            out[name] = round((tracemalloc.get_traced_memory()[0] - before) / w.cached_pages, 1)
        finally:
            tracemalloc.stop()
    return out


def _workload_figures(
    w: Workload, peer: SglangPeer | None, rounds: int, memory_requests: int, form: str
) -> dict[str, Any]:
    clock = _GcClock()
    per_round: list[dict[str, dict[str, tuple[float, float]]]] = []
    gc.callbacks.append(clock)
    try:
        for r in range(rounds):
            sides = hicache_sides(w, form)
            if peer is not None:
                sides.update(sglang_sides(w, peer))
            order = list(sides)
            per_round.append(_round(w, sides, order if r % 2 == 0 else order[::-1], clock))
            del sides
    finally:
        gc.callbacks.remove(clock)
    rates: dict[str, dict[str, float]] = {}
    gc_share: dict[str, dict[str, float]] = {}
    for name in per_round[0]:
        for phase in per_round[0][name]:
            vals = [rd[name][phase] for rd in per_round]
            rates.setdefault(name, {})[phase] = round(statistics.median(v[0] for v in vals), 1)
            gc_share.setdefault(name, {})[phase] = round(statistics.median(v[1] for v in vals), 3)
    ratios = {
        phase: round(rates[ours][phase] / rates[theirs][phase], 2)
        for phase, (ours, theirs) in _PAIRS.items()
        if theirs in rates and phase in rates.get(ours, {})
    }
    mw = Workload(w.page_size, w.prefix_tokens, w.unique_tokens, min(w.requests, memory_requests))
    names = ["hicache", "hicache_served"]
    memory = _memory(mw, lambda: hicache_sides(mw, form), names)
    if peer is not None:
        memory.update(_memory(mw, lambda: sglang_sides(mw, peer), ["sglang", "sglang_events"]))
    return {
        "page_size": w.page_size,
        "prefix_tokens": w.prefix_tokens,
        "unique_tokens": w.unique_tokens,
        "requests": w.requests,
        "req_per_s": rates,
        "vs_sglang_same_run": ratios,
        "gc_share": gc_share,
        "bytes_per_cached_page": memory,
        "memory_requests": mw.requests,
    }


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print figures (one JSON object with ``--json``); return 0."""
    loaded: SglangPeer | PeerMissing = (
        PeerMissing("not imported (--no-peer)") if args.no_peer else load_peer()
    )
    peer = loaded if isinstance(loaded, SglangPeer) else None
    result: dict[str, Any] = {
        "timer": "process CPU time; medians of rounds",
        "rounds": args.rounds,
        "inputs": {
            "hicache": "array('q')" if args.hicache_input == "array" else "list[int]",
            "sglang": "RadixKey(array('q'))",
            "built": "per request from fresh ints, outside the timer",
        },
        "peer": (
            {"name": "sglang.srt.mem_cache.radix_cache.RadixCache", "version": peer.version}
            | {"stand_ins": peer.stand_ins}
            if peer is not None
            else {"missing": loaded.reason if isinstance(loaded, PeerMissing) else ""}
        ),
        "workloads": [],
    }
    for ps in args.page_sizes:
        for prefix in args.prefix_tokens:
            n = args.long_requests if prefix > 4096 else args.requests
            w = Workload(ps, prefix, args.unique_tokens, n, args.seed)
            figures = _workload_figures(
                w, peer, args.rounds, args.memory_requests, args.hicache_input
            )
            result["workloads"].append(figures)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return 0


def _print_table(result: dict[str, Any]) -> None:
    peer = result["peer"]
    if "missing" in peer:
        print(f"SGLang peer not installed: {peer['missing']}; hicache's figures alone")
    else:
        print(f"peer: SGLang {peer['version']} RadixCache, same process")
        for name, why in peer["stand_ins"].items():
            print(f"  import-only stand-in for {name} (raises if called): {why}")
    inputs = result["inputs"]
    print(
        f"inputs {inputs['built']}: hicache {inputs['hicache']}"
        + ("" if "missing" in peer else f", SGLang {inputs['sglang']}")
    )
    print(f"requests/s, {result['timer']} ({result['rounds']} rounds)")
    head = f"{'ps':>3s} {'prefix':>6s} {'phase':14s} {'hicache':>10s} {'sglang':>10s} {'ratio':>6s}"
    print(head)
    for wl in result["workloads"]:
        rates = wl["req_per_s"]
        for phase, (ours, theirs) in _PAIRS.items():
            mine = rates.get(ours, {}).get(phase)
            peer_rate = rates.get(theirs, {}).get(phase)
            ratio = wl["vs_sglang_same_run"].get(phase)
            print(
                f"{wl['page_size']:3d} {wl['prefix_tokens']:6d} {phase:14s} "
                f"{mine:10,.0f} {'-' if peer_rate is None else f'{peer_rate:,.0f}':>10s} "
                f"{'-' if ratio is None else f'{ratio:.2f}x':>6s}"
            )
        shares = ", ".join(
            f"{name} {phases.get('insert', phases.get('served_insert', 0.0)):.0%}"
            for name, phases in wl["gc_share"].items()
        )
        print(f"          GC share of insert: {shares}")
        mem = ", ".join(f"{k} {v:,.0f}" for k, v in wl["bytes_per_cached_page"].items())
        print(f"          Python bytes per cached page: {mem}")


def main() -> int:
    """Run standalone: ``python -m hicache.tools.radix_bench``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
