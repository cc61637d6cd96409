"""Measure how fast ``open()`` rescans a slot file: ``python -m hicache_mmap.scanbench``.

Fills a scratch slot file (every slot offered a page, a few lose their set's CLOCK race and stay
free), then reopens it several times and reports ``stats()["scan_slots_per_s"]`` of each fresh
backend: the header scan that rebuilds the local view after a restart. The file is removed
afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
from collections.abc import Sequence
from typing import Any

from hicache.storage import BackendContext
from hicache_mmap.backend import MmapBackend
from hicache_mmap.options import MmapOptions

__all__ = ["main", "measure"]


def measure(path: str, capacity: int, page_bytes: int, reopens: int) -> dict[str, Any]:
    """Fill a slot file at ``path`` and time ``reopens`` fresh opens; return the figures."""
    options = MmapOptions(path=path, capacity=capacity, create=True)
    ctx = BackendContext(page_bytes=page_bytes, namespace="scanbench")
    backend = MmapBackend(options, ctx)
    backend.open()
    try:
        slots = int(backend.stats()["num_slots"])
        page = memoryview(os.urandom(page_bytes))
        keys = [hashlib.sha256(i.to_bytes(8, "little")).hexdigest() for i in range(slots)]
        for start in range(0, slots, 64):
            batch = keys[start : start + 64]
            backend.put(batch, [page] * len(batch))
        used = int(backend.stats()["used_slots"])
    finally:
        backend.close()
    rates: list[float] = []
    for _ in range(reopens):
        fresh = MmapBackend(options, ctx)
        fresh.open()
        try:
            rates.append(float(fresh.stats()["scan_slots_per_s"]))
        finally:
            fresh.close()
    return {
        "slots": slots,
        "used_slots": used,
        "scan_slots_per_second": statistics.median(rates),
        "scan_slots_per_second_each": rates,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--capacity", type=int, default=3 << 30, help="slot file bytes")
    parser.add_argument("--page-bytes", type=int, default=32 << 10)
    parser.add_argument("--reopens", type=int, default=5)
    parser.add_argument("--dir", default="/dev/shm", help="scratch directory (default /dev/shm)")
    args = parser.parse_args(argv)
    fd, path = tempfile.mkstemp(prefix="hicache-scanbench-", suffix=".slots", dir=args.dir)
    os.close(fd)
    os.unlink(path)  # the backend creates it with its own geometry
    try:
        print(json.dumps(measure(path, args.capacity, args.page_bytes, args.reopens), indent=2))
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
