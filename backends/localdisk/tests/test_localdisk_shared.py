"""Two processes on one root with ``shared: true``: no torn pages, mutual visibility, bounded."""

from __future__ import annotations

import json
import multiprocessing
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hicache_localdisk import LocalDiskBackend, LocalDiskConfig

from hicache.storage import HEADER_SIZE, BackendContext, PageStatus

PAGE = 32 * 1024
STORED = PAGE + HEADER_SIZE
CAP_PAGES = 120
ROUNDS = 60
BATCH = 4


def _backend(root: Path) -> LocalDiskBackend:
    config = LocalDiskConfig(root=root, max_bytes=CAP_PAGES * STORED, shared=True, io_threads=2)
    return LocalDiskBackend(config, BackendContext(page_bytes=PAGE, namespace="shared"))


def _disk_bytes(root: Path) -> int:
    total = 0
    for path in (root / "shared").glob("*/[0-9a-f]*"):
        try:
            total += path.stat().st_size
        except FileNotFoundError:  # evicted by the other process since the listing
            continue
    return total


def _worker(
    root: Path,
    me: str,
    peer: str,
    out: Path,
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
    barrier: Any,
) -> None:
    backend = _backend(root)
    backend.open()
    report = {"torn": 0, "peer_seen": 0, "peer_read_ok": 0, "over": 0, "puts_ok": 0}
    buf = memoryview(bytearray(PAGE))
    for r in range(ROUNDS):
        # Lockstep rounds: both processes write and read at the same time, whatever the load.
        barrier.wait(timeout=60)
        keys = [key_of(r * BATCH + i, me) for i in range(BATCH)]
        statuses = backend.put(keys, [memoryview(payload_of(k, PAGE)) for k in keys])
        report["puts_ok"] += statuses.count(PageStatus.OK)
        # Peek at recent pages of the other process (its index never told us about them).
        peer_keys = [
            key_of(max(0, r - d) * BATCH + i, peer) for d in range(3) for i in range(BATCH)
        ]
        for key, present in zip(peer_keys, backend.exists(peer_keys), strict=True):
            if not present:
                continue
            report["peer_seen"] += 1
            status = backend.get_into([key], [buf])[0]
            if status is PageStatus.OK:
                report["peer_read_ok"] += 1
                # tobytes(): a memoryview compares byte by byte in a loop, 25x slower
                report["torn"] += buf.tobytes() != payload_of(key, PAGE)
            elif status is not PageStatus.NOT_FOUND:  # evicted in between is fine
                report["torn"] += 1
        disk = _disk_bytes(root)
        # Reservations make the bound hold at every step, up to writes in flight in the peer.
        report["over"] += disk > (CAP_PAGES + 2 * BATCH) * STORED
    backend.close()
    out.write_text(json.dumps(report))


def test_two_processes_share_a_root(
    tmp_path: Path, key_of: Callable[..., str], payload_of: Callable[..., bytes]
) -> None:
    root = tmp_path / "root"
    barrier = multiprocessing.get_context("fork").Barrier(2)
    pids = []
    for me, peer in (("a", "b"), ("b", "a")):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                _worker(root, me, peer, tmp_path / f"{me}.json", key_of, payload_of, barrier)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    reports = {me: json.loads((tmp_path / f"{me}.json").read_text()) for me in "ab"}
    for me, rep in reports.items():
        assert rep["torn"] == 0, f"{me} read a torn or foreign page: {rep}"
        assert rep["puts_ok"] == ROUNDS * BATCH
        assert rep["over"] == 0, f"{me} saw usage beyond the bound: {rep}"
    # Each writes 240 pages into room for 120: both must have read some of the other's pages.
    assert reports["a"]["peer_read_ok"] + reports["b"]["peer_read_ok"] > 0
    assert reports["a"]["peer_seen"] > 0 and reports["b"]["peer_seen"] > 0

    backend = _backend(root)
    backend.open()
    pages = list((root / "shared").glob("*/[0-9a-f]*"))
    on_disk = sum(p.stat().st_size for p in pages)
    assert on_disk <= CAP_PAGES * STORED
    # Alone on the root, a fresh opener re-anchors the shared counter on what is there.
    assert backend.used_bytes == on_disk
    bufs = [memoryview(bytearray(PAGE)) for _ in pages]
    keys = [p.name for p in pages]
    assert backend.get_into(keys, bufs) == [PageStatus.OK] * len(keys)
    backend.close()
