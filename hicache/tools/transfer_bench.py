"""Device <-> host transfer benchmark: the engine against a plain ``copy_`` of the same bytes.

Run ``python -m hicache.tools.transfer_bench [--json PATH]``. For each direction it measures:

- ``raw``: one ``copy_`` of a contiguous device buffer to (from) a page-locked host buffer of
  the same size as a batch: what the link gives, the limit the engine is compared with;
- ``engine``: ``submit`` of one batch of scattered device pages to consecutive host pages (one
  gather + one copy), then ``wait``, one batch at a time;
- ``engine_pipelined``: every batch submitted before waiting for the last one;
- ``engine_scattered`` (D2H): host destinations in random order (one copy per page);
- ``gather`` (CUDA): the device-side ``index_select`` alone, in bytes read.

Without a GPU it measures the CPU engine against a CPU ``copy_`` (a smoke run, not a figure to
quote). Prints one line per figure and, with ``--json``, writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Sequence

import torch

from hicache.pools import DevicePool, HostPool, KVLayout
from hicache.transfer import Direction, TransferEngine, default_engine

__all__ = ["main", "run_bench"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return time.perf_counter() - start


def run_bench(
    layout: KVLayout,
    batch_pages: int,
    iters: int,
    warmup: int,
    device: torch.device,
) -> dict[str, object]:
    """Measure every figure for one layout; return them as a JSON-ready dict."""
    n = batch_pages
    dev = DevicePool(layout, num_pages=2 * n, device=device)
    host = HostPool(layout, num_pages=2 * n, pin=device.type == "cuda")
    engine: TransferEngine = default_engine(dev, host)
    nbytes = n * layout.page_bytes
    dev.kv.view(torch.uint8).random_(0, 256)

    # Every other device page: a real gather, not one contiguous block in disguise.
    dev_pages = [2 * i for i in range(n)]
    host_pages = list(range(n))
    rng = random.Random(0)
    scattered = rng.sample(range(2 * n), n)

    raw_dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    raw_host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    results: dict[str, float] = {}

    def gbps(name: str, seconds: float, bytes_per_iter: int = nbytes) -> None:
        results[name] = bytes_per_iter * iters / seconds / 1e9

    def raw_d2h() -> None:
        raw_host.copy_(raw_dev, non_blocking=True)

    def raw_h2d() -> None:
        raw_dev.copy_(raw_host, non_blocking=True)

    gbps("d2h_raw", _timed(raw_d2h, device, iters, warmup))
    gbps("h2d_raw", _timed(raw_h2d, device, iters, warmup))

    def one(direction: Direction, src: Sequence[int], dst: Sequence[int]) -> Callable[[], None]:
        def fn() -> None:
            engine.wait(engine.submit(direction, src, dst))

        return fn

    def pipelined(direction: Direction, src: Sequence[int], dst: Sequence[int]) -> float:
        engine.wait(engine.submit(direction, src, dst))
        _sync(device)
        start = time.perf_counter()
        tickets = [engine.submit(direction, src, dst) for _ in range(iters)]
        engine.wait(tickets[-1])
        engine.close()
        _sync(device)
        return time.perf_counter() - start

    gbps("d2h_engine", _timed(one(Direction.D2H, dev_pages, host_pages), device, iters, warmup))
    gbps("d2h_engine_pipelined", pipelined(Direction.D2H, dev_pages, host_pages))
    gbps(
        "d2h_engine_scattered",
        _timed(one(Direction.D2H, dev_pages, scattered), device, iters, warmup),
    )
    gbps("h2d_engine", _timed(one(Direction.H2D, host_pages, dev_pages), device, iters, warmup))
    gbps("h2d_engine_pipelined", pipelined(Direction.H2D, host_pages, dev_pages))
    if device.type == "cuda":
        idx = torch.tensor(dev_pages, device=device)
        major = dev.kv.movedim(dev.page_dim, 0)

        def gather() -> None:
            major.index_select(0, idx)

        gbps("gather", _timed(gather, device, iters, warmup))
    engine.poll()

    # The figures mean nothing if the bytes are wrong: check one round trip.
    engine.wait(engine.submit(Direction.D2H, dev_pages[:2], [0, 1]))
    # Compared as bytes: the random bit patterns include NaNs.
    got = host.page_tensor(1).reshape(-1).view(torch.uint8)
    ok = bool(torch.equal(got, dev.read_page(dev_pages[1]).cpu().reshape(-1).view(torch.uint8)))
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "engine": type(engine).__name__,
        "layout": {
            "num_layers": layout.num_layers,
            "num_kv_heads": layout.num_kv_heads,
            "head_dim": layout.head_dim,
            "page_size": layout.page_size,
            "dtype": str(layout.dtype).removeprefix("torch."),
            "mla": layout.mla,
        },
        "page_bytes": layout.page_bytes,
        "batch_pages": n,
        "batch_bytes": nbytes,
        "iters": iters,
        "gb_per_s": dict(results),
        "engine_vs_raw": {
            "d2h": round(results["d2h_engine"] / results["d2h_raw"], 3),
            "d2h_pipelined": round(results["d2h_engine_pipelined"] / results["d2h_raw"], 3),
            "h2d": round(results["h2d_engine"] / results["h2d_raw"], 3),
            "h2d_pipelined": round(results["h2d_engine_pipelined"] / results["h2d_raw"], 3),
        },
        "bytes_verified": ok,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the benchmark, print the figures; exit 1 if the bytes were wrong."""
    ap = argparse.ArgumentParser(prog="python -m hicache.tools.transfer_bench", description=__doc__)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--mla", action="store_true")
    ap.add_argument("--batch-pages", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ap.add_argument("--json", dest="json_path", help="also write the figures to this file")
    args = ap.parse_args(argv)

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    layout = KVLayout(
        args.layers,
        args.kv_heads,
        args.head_dim,
        args.page_size,
        getattr(torch, args.dtype),
        mla=args.mla,
    )
    report = run_bench(layout, args.batch_pages, args.iters, args.warmup, device)
    print(
        f"transfer bench on {report['device']} (torch {report['torch']}, {report['engine']}): "
        f"{args.batch_pages} pages x {layout.page_bytes / 2**20:.2f} MiB per batch"
    )
    gb: dict[str, float] = report["gb_per_s"]  # type: ignore[assignment]
    for name, value in gb.items():
        print(f"  {name:24s} {value:10.2f} GB/s")
    ratios: dict[str, float] = report["engine_vs_raw"]  # type: ignore[assignment]
    print("  engine / raw copy_: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print(f"  bytes verified: {report['bytes_verified']}")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0 if report["bytes_verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
