"""``hicache bench radix``: radix tree throughput on a shared-system-prompt workload.

Workload (issue 5): 10,000 requests of 2,048 tokens = one of 100 shared 1,024-token system
prompts + a random 1,024-token suffix, page size 64. Measured, in requests per second:

- ``insert``       every request inserted into an empty tree
- ``match_full``   the same requests matched again (every page hits)
- ``match_prefix`` the system prompt followed by a new suffix (half the pages hit)
- ``match_miss``   entirely new tokens (the first page misses)

Every match returns the device page indices the engine puts in its page table (a ``list[int]``;
``match_full_tensor`` also converts them to an int64 tensor). Token lists are built outside the
timed region. As in the reference measurement, a full hit matches the very lists that were
inserted (and prompts are shared lists), so equal tokens are often the same int objects, which a
list compare (the baseline's) skips; ``match_full_fresh_ints`` repeats the full hit with fresh
int objects, as a tokenizer would hand them over, where every token comparison costs a real
integer compare. hicache's tree packs tokens (``hicache.radix``), which costs the same either way.

Times are CPU time of this process (``time.process_time``), so other tenants of a shared
machine do not count; each phase is the best of ``--repeat`` runs, the two trees alternating.
The garbage collector runs as it would in a server (only the harness's own lists are frozen out
of it, before timing) and its time is inside the figures; ``gc_share`` says how much of each
best run it took.

Separately, per page: the cost of the content hash (``keys.chain_hashes``) and of the
write-through bookkeeping in ``HiRadixCache`` (backup submit, ack, CPU_PINNED events), measured
with a transfer engine that completes instantly without copying.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hicache.keys import ModelIdentity, chain_hashes, seed_hash
from hicache.radix import RadixCache

__all__ = ["add_arguments", "run"]

#: SGLang's pure-Python RadixCache on the same workload and machine class (issue 5).
SGLANG_REFERENCE = {
    "insert": 16_800.0,
    "match_full": 24_800.0,
    "match_prefix": 33_700.0,
    "match_miss": 125_000.0,
}

_VOCAB = 128_000
Fn = Callable[[list[int], int], object]
_CHUNK = 500  # fresh-int requests converted per timed chunk (bounds memory)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench radix`` options to ``parser``."""
    parser.add_argument("--requests", type=int, default=10_000, help="requests (default 10000)")
    parser.add_argument("--prompts", type=int, default=100, help="shared system prompts")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="system prompt length")
    parser.add_argument("--suffix-tokens", type=int, default=1024, help="random suffix length")
    parser.add_argument("--page-size", type=int, default=64, help="tokens per page")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; the best counts")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _timed(lists: Sequence[list[int]], fn: Callable[[list[int], int], object]) -> float:
    """Seconds spent calling ``fn(tokens, i)`` for every list."""
    t0 = time.process_time()
    for i, toks in enumerate(lists):
        fn(toks, i)
    return time.process_time() - t0


def _timed_fresh(
    arrays: Sequence[np.ndarray[Any, Any]], fn: Callable[[list[int], int], object]
) -> float:
    """Like :func:`_timed` on fresh int objects (as a tokenizer hands them over), in chunks;
    the list conversion is not timed."""
    total = 0.0
    for start in range(0, len(arrays), _CHUNK):
        lists = [a.tolist() for a in arrays[start : start + _CHUNK]]
        total += _timed(lists, lambda toks, j, s=start: fn(toks, s + j))  # type: ignore[misc]
    return total


@dataclass(slots=True)
class _Trees:
    ours: RadixCache
    base: Any


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


def _bench_tree(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Requests per second of each phase, for hicache's tree and the same-run baseline, and the
    share of each best run the garbage collector took."""
    import torch

    from hicache.tools._radix_baseline import BaselineRadix

    rng = np.random.default_rng(args.seed)
    ps = args.page_size
    n = args.requests
    prompt_arrays = rng.integers(0, _VOCAB, size=(args.prompts, args.prompt_tokens))
    prompts = [p.tolist() for p in prompt_arrays]
    which = rng.integers(0, args.prompts, size=n).tolist()
    suffix_arrays = rng.integers(0, _VOCAB, size=(n, args.suffix_tokens))
    suffixes = [a.tolist() for a in suffix_arrays]
    reqs = [prompts[which[i]] + suffixes[i] for i in range(n)]
    # new lists over existing int objects (memory stays bounded): a reversed suffix is a new
    # random suffix (prefix hit); two suffixes back to back start with no cached page (miss)
    prefix_hits = [prompts[which[i]] + suffixes[i][::-1] for i in range(n)]
    misses = [suffixes[i] + suffixes[(i + 1) % n] for i in range(n)]
    per_req = len(reqs[0]) // ps
    tokens = len(reqs[0])
    trees = _Trees(RadixCache(ps), BaselineRadix(ps))
    base_values = torch.arange(n * tokens, dtype=torch.int64)
    base_slices = [base_values[i * tokens : (i + 1) * tokens] for i in range(n)]
    # the harness's own lists are not the trees' business: keep them out of GC scans
    gc.collect()
    gc.freeze()
    got: list[int] = []

    def match(toks: list[int], i: int) -> None:
        got.append(len(trees.ours.match_prefix(toks).device_pages))

    def match_base(toks: list[int], i: int) -> None:
        got.append(len(trees.base.match_prefix(toks)) // ps)

    def expect(pages: int, what: str) -> None:
        if set(got) != {pages}:
            raise RuntimeError(f"{what} match returned {sorted(set(got))} pages, not {pages}")
        got.clear()

    r: dict[str, float] = {}
    b: dict[str, float] = {}
    gc_r: dict[str, float] = {}
    gc_b: dict[str, float] = {}
    clock = _GcClock()

    def best(into: dict[str, float], phase: str, lists: Sequence[list[int]], fn: Fn) -> None:
        in_gc = clock.total
        elapsed = _timed(lists, fn)
        if n / elapsed > into.get(phase, 0.0):
            into[phase] = n / elapsed
            (gc_r if into is r else gc_b)[phase] = (clock.total - in_gc) / elapsed

    gc.callbacks.append(clock)
    try:
        # fresh trees per repetition, the two implementations alternating; the best of the
        # repetitions counts (the machine is shared: the best run is the least disturbed one)
        # warm both code paths (and the allocator) before anything is timed
        warm = reqs[: min(n, 200)]
        _timed(warm, lambda t, i: RadixCache(ps).insert(t, range(per_req)))
        _timed(warm, lambda t, i: BaselineRadix(ps).insert(t, base_slices[i]))
        for rep in range(args.repeat):
            trees.ours, trees.base = RadixCache(ps), BaselineRadix(ps)
            inserts = [
                (r, lambda t, i: trees.ours.insert(t, range(i * per_req, (i + 1) * per_req))),
                (b, lambda t, i: trees.base.insert(t, base_slices[i])),
            ]
            for into, fn in inserts if rep % 2 == 0 else inserts[::-1]:
                best(into, "insert", reqs, fn)
            for name, lists, want in (
                ("match_full", reqs, per_req),
                ("match_prefix", prefix_hits, args.prompt_tokens // ps),
                ("match_miss", misses, 0),
            ):
                best(r, name, lists, match)
                expect(want, name)
                best(b, name, lists, match_base)
                expect(want, f"{name} (baseline)")
            best(
                r,
                "match_full_tensor",
                reqs,
                lambda t, i: torch.tensor(
                    trees.ours.match_prefix(t).device_pages, dtype=torch.int64
                ),
            )
            if rep == 0:
                full_arrays = [
                    np.concatenate((prompt_arrays[which[i]], suffix_arrays[i])) for i in range(n)
                ]
                r["match_full_fresh_ints"] = n / _timed_fresh(full_arrays, match)
                expect(per_req, "full-hit (fresh ints)")
                b["match_full_fresh_ints"] = n / _timed_fresh(full_arrays, match_base)
                expect(per_req, "full-hit (fresh ints, baseline)")
                del full_arrays
            gc.collect()
    finally:
        gc.callbacks.remove(clock)
        gc.unfreeze()
    return {"hicache": r, "baseline": b, "hicache_gc": gc_r, "baseline_gc": gc_b}


def _bench_hashing(page_size: int, pages: int = 20_000) -> float:
    """Microseconds per page of ``chain_hashes`` over 32-page requests."""
    rng = np.random.default_rng(1)
    per_req = 32
    seqs = [
        rng.integers(0, _VOCAB, size=per_req * page_size).tolist() for _ in range(pages // per_req)
    ]
    seed = seed_hash(ModelIdentity("bench"))
    t0 = time.process_time()
    for s in seqs:
        chain_hashes(seed, s, page_size)
    return (time.process_time() - t0) / (len(seqs) * per_req) * 1e6


def _bench_writethrough(page_size: int, requests: int = 1000, pages_per_req: int = 32) -> float:
    """Microseconds per page of write-through bookkeeping: ``write_backup`` (host allocation,
    submit, lock, tracking) + ``writing_check`` (ack, one ``BlockStored(CPU_PINNED)`` per page,
    unlock) + ``take_events``. Copies cost nothing here (a transfer engine that only acks) and
    the content hashes are computed before timing (they are :func:`_bench_hashing`'s part).
    """
    import torch

    from hicache.hiradix import HiRadixCache, WritePolicy
    from hicache.pools import DevicePool, HostPool, KVLayout
    from hicache.transfer import Direction, TransferEngine

    class _AckOnly(TransferEngine):
        def __init__(self, dev: DevicePool, host: HostPool) -> None:
            super().__init__(dev, host)
            self._done: list[int] = []

        def _start(self, ticket: int, direction: Direction, src: list[int], dst: list[int]) -> None:
            self._done.append(ticket)

        def _collect(self) -> list[int]:
            done, self._done = self._done, []
            return done

        def _wait(self, ticket: int) -> None:
            return

    layout = KVLayout(1, 1, 1, page_size, torch.float32)  # tiny pages: bookkeeping only
    total = requests * pages_per_req
    dev = DevicePool(layout, total, "cpu")
    host = HostPool(layout, total, pin=False)
    cache = HiRadixCache(
        dev, host, _AckOnly(dev, host), write_policy=WritePolicy.MANUAL, gpu_events=False
    )
    rng = np.random.default_rng(2)
    nodes = []
    for _ in range(requests):
        toks = rng.integers(0, _VOCAB, size=pages_per_req * page_size).tolist()
        pages = dev.alloc(pages_per_req)
        assert pages is not None
        cache.insert(toks, pages)
        node = cache.match_prefix(toks).last_node
        cache.node_hashes(node)
        nodes.append(node)
    events = 0
    t0 = time.process_time()
    for node in nodes:
        cache.write_backup(node)
        cache.writing_check()
        events += len(cache.take_events())
    elapsed = time.process_time() - t0
    if events != total or cache.protected_pages:
        raise RuntimeError(f"write-through bench: {events} events for {total} pages")
    return elapsed / total * 1e6


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print figures (one JSON object with ``--json``); return 0."""
    rates = _bench_tree(args)
    ours, base = rates["hicache"], rates["baseline"]
    result: dict[str, Any] = {
        "workload": {
            "requests": args.requests,
            "prompts": args.prompts,
            "prompt_tokens": args.prompt_tokens,
            "suffix_tokens": args.suffix_tokens,
            "page_size": args.page_size,
            "device_indices": "list[int] of device page indices per match",
        },
        "req_per_s": {k: round(v, 1) for k, v in ours.items()},
        "baseline_req_per_s": {k: round(v, 1) for k, v in base.items()},
        "vs_baseline_same_run": {k: round(ours[k] / v, 2) for k, v in base.items()},
        "vs_sglang_reference": {
            k: round(ours[k] / ref, 2) for k, ref in SGLANG_REFERENCE.items() if k in ours
        },
        "sglang_reference_req_per_s": SGLANG_REFERENCE,
        "gc_share": {
            "hicache": {k: round(v, 3) for k, v in rates["hicache_gc"].items()},
            "baseline": {k: round(v, 3) for k, v in rates["baseline_gc"].items()},
        },
        "hash_us_per_page": round(_bench_hashing(args.page_size), 3),
        "writethrough_us_per_page": round(_bench_writethrough(args.page_size), 3),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"radix bench: {args.requests} requests, page size {args.page_size}")
        print(f"  {'phase':22s} {'hicache':>10s} {'baseline':>10s} {'ratio':>6s} {'vs ref':>6s}")
        for k, v in result["req_per_s"].items():
            bv = result["baseline_req_per_s"].get(k)
            ratio = result["vs_baseline_same_run"].get(k)
            ref = result["vs_sglang_reference"].get(k)
            print(
                f"  {k:22s} {v:10,.0f} {'' if bv is None else f'{bv:10,.0f}':>10s} "
                f"{'' if ratio is None else f'{ratio:.2f}x':>6s} "
                f"{'' if ref is None else f'{ref:.2f}x':>6s}"
            )
        gc_ours, gc_base = result["gc_share"]["hicache"], result["gc_share"]["baseline"]
        print(
            f"  garbage collector  {gc_ours.get('insert', 0):.0%} of hicache's insert time, "
            f"{gc_base.get('insert', 0):.0%} of the baseline's"
        )
        print(f"  hashing            {result['hash_us_per_page']:.3f} us/page")
        if "writethrough_us_per_page" in result:
            wt = result["writethrough_us_per_page"]
            print(f"  write-through      {wt} us/page (ack + events)")
    return 0


def main() -> int:
    """Run standalone: ``python -m hicache.tools.radix_bench``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
