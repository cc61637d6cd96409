"""Measure how fast ``open()`` rebuilds the index: ``python -m hicache_localdisk.indexbench``.

Plants N page files (sparse, right size, tail-first mtimes) in a scratch root, then times a
fresh backend's ``open()`` (scan, stat, sort by mtime, fill the index and the LRU) and a round of
``exists`` over every key. The files are removed afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

from hicache.storage import BackendContext, stored_size
from hicache_localdisk.backend import LocalDiskBackend
from hicache_localdisk.options import LocalDiskConfig

__all__ = ["main", "measure"]


def measure(root: str, pages: int, page_bytes: int) -> dict[str, float]:
    """Plant ``pages`` files under ``root`` and time the rebuild; return the figures."""
    ctx = BackendContext(page_bytes=page_bytes, namespace="indexbench")
    config = LocalDiskConfig.model_validate(
        {"root": root, "max_bytes": (pages + 1) * stored_size(page_bytes)}
    )
    backend = LocalDiskBackend(config, ctx)
    backend.open()  # creates the directories
    backend.close()
    keys = [hashlib.sha256(i.to_bytes(8, "little")).hexdigest() for i in range(pages)]
    size = stored_size(page_bytes)
    now = time.time_ns()
    for i, key in enumerate(keys):
        path = backend.page_path(key)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.ftruncate(fd, size)  # sparse: the scan reads metadata only
        os.utime(fd, ns=(now - i, now - i))
        os.close(fd)
    os.sync()
    fresh = LocalDiskBackend(config, ctx)
    began, cpu = time.perf_counter(), time.process_time()
    fresh.open()
    open_s, open_cpu = time.perf_counter() - began, time.process_time() - cpu
    batches = [keys[i : i + 64] for i in range(0, pages, 64)]
    found = 0
    began, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        found += fresh.exists(batch).count(True)
    exists_s, exists_cpu = time.perf_counter() - began, time.process_time() - cpu
    fresh.close()
    if found != pages:
        raise RuntimeError(f"index lost pages: {found} of {pages}")
    # CPU-time rates say what the code costs on a machine shared with other work.
    return {
        "pages": pages,
        "open_seconds": open_s,
        "open_pages_per_second": pages / open_s,
        "open_pages_per_cpu_second": pages / open_cpu,
        "exists_keys_per_second": pages / exists_s,
        "exists_keys_per_cpu_second": pages / exists_cpu,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=100_000)
    parser.add_argument("--page-bytes", type=int, default=8 << 20)
    parser.add_argument("--dir", default=None, help="scratch parent directory (default: TMPDIR)")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="hicache-indexbench-", dir=args.dir)
    try:
        print(json.dumps(measure(root, args.pages, args.page_bytes), indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
