"""Batched publishes survive a SIGKILL: every page the engine announced on a durable localdisk
tier (one put call carries all fragments of a write-through) is there, intact, after the
publishing process is killed mid-stream (process-crash safety: the page cache survives).

The publisher is a real subprocess: it publishes groups of several small fragments and appends
the key of every page announced ``BlockStored(DISK)`` to a file, until it is killed.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

from hicache_localdisk import LocalDiskBackend, LocalDiskConfig

from hicache.storage import BackendContext, PageStatus
from hicache.testing.wait import wait_for

PAGE = 8 * 1024
NAMESPACE = "crashpub"
KILLS = int(os.environ.get("HICACHE_CRASH_ITERATIONS", "3"))


def _payload(key: str) -> bytes:
    seed = hashlib.sha256(key.encode()).digest()
    return (seed * (PAGE // len(seed) + 1))[:PAGE]


def _backend(root: Path) -> LocalDiskBackend:
    config = LocalDiskConfig(root=root, durability="fsync", max_bytes=1 << 30)
    return LocalDiskBackend(config, BackendContext(page_bytes=PAGE, namespace=NAMESPACE))


def _publisher(root: Path, acked: Path, seed: int) -> None:  # pragma: no cover - subprocess
    import torch

    from hicache.events import BlockStored
    from hicache.keys import block_id
    from hicache.pools import HostPool, KVLayout
    from hicache.tiering.engine import PublishPage, StorageEngine
    from hicache.tiering.tiers import Tier, Tiers

    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=1024, page_size=2, dtype=torch.int16)
    assert layout.page_bytes == PAGE
    host = HostPool(layout, 256, pin=False)
    tiers = Tiers([Tier("disk", _backend(root))])
    tiers.open()
    engine = StorageEngine(tiers, host, page_size=2)
    rng = random.Random(seed)
    key_of: dict[int, str] = {}
    out = os.open(acked, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    n = 0
    while True:
        group = engine.begin_publish()
        parent: int | None = None
        for _ in range(rng.randint(1, 4)):  # fragments of one write-through
            pages = []
            for _ in range(rng.randint(1, 3)):
                key = hashlib.sha256(f"{seed}-{n}".encode()).hexdigest()
                n += 1
                got = host.alloc(1)
                while got is None:  # pages come back when their puts returned
                    engine.wait_idle(30)
                    _announce(engine.poll().events, key_of, out, BlockStored)
                    got = host.alloc(1)
                host.page_view(got[0])[:] = _payload(key)
                bid = block_id(key)
                key_of[bid] = key
                pages.append(PublishPage(key, got[0], bid, parent, [0, 0]))
                parent = bid
            engine.publish(group, pages)  # holds its pages until their put returned
            host.free_when_released([p.host_page for p in pages])
        engine.end_publish(group)
        _announce(engine.poll().events, key_of, out, BlockStored)


def _announce(events: list[object], key_of: dict[int, str], out: int, stored: type) -> None:
    for e in events:
        if isinstance(e, stored) and e.medium == "DISK":  # type: ignore[attr-defined]
            lines = "".join(key_of[b] + "\n" for b in e.block_hashes)  # type: ignore[attr-defined]
            os.write(out, lines.encode())


def _acked(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if len(line) == 64]


def test_announced_pages_of_batched_publishes_survive_sigkill(tmp_path: Path) -> None:
    root = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    checked = 0
    for it in range(KILLS):
        acked = tmp_path / f"acked-{it}"
        log = tmp_path / f"publisher-{it}.log"
        with log.open("wb") as err:
            child = subprocess.Popen(
                [sys.executable, __file__, str(root), str(acked), str(it)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

        def publishing(child: subprocess.Popen[bytes] = child, acked: Path = acked) -> bool:
            return len(_acked(acked)) >= 20 or child.poll() is not None

        try:
            # kill it while it is publishing: once some pages were announced
            wait_for(publishing, timeout=120, what="pages announced")
            assert child.poll() is None, log.read_text()[-2000:]
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        keys = _acked(acked)
        backend = _backend(root)
        backend.open()
        try:
            bufs = [memoryview(bytearray(PAGE)) for _ in keys]
            statuses = backend.get_into(keys, bufs)
            for key, status, buf in zip(keys, statuses, bufs, strict=True):
                assert status is PageStatus.OK, f"kill {it}: announced {key} is {status}"
                assert buf == _payload(key), f"kill {it}: announced {key} read back altered"
            assert backend.stats()["corrupt"] == 0
        finally:
            backend.close()
        checked += len(keys)
    assert checked >= 20 * KILLS


if __name__ == "__main__":  # pragma: no cover - the publisher subprocess
    _publisher(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
