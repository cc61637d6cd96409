"""Crash safety: writers killed with SIGKILL at random moments never leave a wrong page visible.

SIGKILL proves process-crash safety only: the page cache (or tmpfs) keeps what the dead writer
stored, so a slot can be left half written with an odd generation. Every page a later opener
reports present must be byte-identical to what was put. ``HICACHE_CRASH_ITERATIONS`` raises the
number of kills (25 by default).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from hicache_mmap import MmapBackend, MmapOptions
from hicache_mmap.layout import GEN
from hicache_mmap.raw import leave_generation_odd, slot_file

from hicache.storage import BackendContext, PageStatus
from hicache.testing.kit import kit_key, page_pattern

PAGE = 256 * 1024
ITERATIONS = int(os.environ.get("HICACHE_CRASH_ITERATIONS", "25"))
_FORK = multiprocessing.get_context("fork")


def _options(path: Path, **extra: Any) -> MmapOptions:
    # 4 sets of 4 slots: the writer evicts constantly, so kills land in overwrites too.
    return MmapOptions(
        path=str(path), capacity=16 * (4096 + PAGE), associativity=4, prefault=False, **extra
    )


def _backend(path: Path, *, namespace: str = "crash", **extra: Any) -> MmapBackend:
    backend = MmapBackend(_options(path, **extra), BackendContext(PAGE, namespace))
    backend.open()
    return backend


def _writer(path: Path, salt: str, ready: Any) -> None:
    """Put page after page until killed (runs in a forked child)."""
    backend = _backend(path)
    ready.set()
    i = 0
    while True:
        key = kit_key(i, salt)
        backend.put([key], [memoryview(page_pattern(key, PAGE))])
        i += 1


def _check_every_present_page(path: Path, *, verify: bool) -> int:
    """Open a fresh instance; every listed page must read back exactly. Return their number."""
    backend = _backend(path, verify_checksum=verify)
    try:
        keys = [page.key for page in backend.iter_pages()]
        assert backend.exists(keys) == [True] * len(keys)
        dst = memoryview(bytearray(PAGE))
        for key in keys:
            status = backend.get_into([key], [dst])
            assert status == [PageStatus.OK], f"{key} listed but read {status}"
            # tobytes(): a memoryview compares byte by byte in a loop, 25x slower than bytes
            assert dst.tobytes() == page_pattern(key, PAGE), f"{key} came back with wrong bytes"
        return len(keys)
    finally:
        backend.close()


def _odd_slots(path: Path) -> int:
    backend = _backend(path, namespace="inspect")
    try:
        file = slot_file(backend)
        return sum(
            GEN.unpack_from(file.mm, file.slot_offset(s))[0] & 1 for s in range(file.geo.num_slots)
        )
    finally:
        backend.close()


def test_sigkill_writer_at_random_moments(tmp_path: Path) -> None:
    path = tmp_path / "crash.slots"
    rng = random.Random(1234)
    torn_seen = 0
    for iteration in range(ITERATIONS):
        ready = _FORK.Event()
        child = _FORK.Process(target=_writer, args=(path, f"crash-{iteration}", ready))
        child.start()
        assert ready.wait(30), "writer did not start"
        time.sleep(rng.uniform(0.002, 0.05))
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert child.exitcode == -signal.SIGKILL
        torn_seen += _odd_slots(path)
        # The protocol alone (no checksum) must hide a half-written slot, and so must the
        # checksum path.
        _check_every_present_page(path, verify=False)
        present = _check_every_present_page(path, verify=True)
        assert present <= 16
    # After all the kills the file is fully usable: a put in every set succeeds (a dead
    # writer's odd slot is reclaimed, its set lock died with it).
    backend = _backend(path, lock_timeout_s=2.0)
    try:
        keys = [kit_key(i, "after-crash") for i in range(64)]
        statuses = backend.put(keys, [memoryview(page_pattern(k, PAGE)) for k in keys])
        assert all(s is PageStatus.OK for s in statuses), statuses
    finally:
        backend.close()
    _check_every_present_page(path, verify=True)
    print(f"{ITERATIONS} kills, {torn_seen} odd-generation slots found after them")


def test_odd_generation_slot_is_free_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "odd.slots"
    backend = _backend(path)
    key = kit_key(0, "odd")
    page = page_pattern(key, PAGE)
    assert backend.put([key], [memoryview(page)]) == [PageStatus.OK]
    leave_generation_odd(backend, key)
    dst = bytearray(b"\xa5") * PAGE
    assert backend.exists([key]) == [False]
    assert backend.get_into([key], [memoryview(dst)]) == [PageStatus.NOT_FOUND]
    assert dst == bytearray(b"\xa5") * PAGE
    backend.close()
    backend = _backend(path)
    try:
        assert backend.exists([key]) == [False]
        assert list(backend.iter_pages()) == []
        assert backend.put([key], [memoryview(page)]) == [PageStatus.OK]
        assert backend.get_into([key], [memoryview(dst)]) == [PageStatus.OK]
        assert dst == page
    finally:
        backend.close()


@pytest.mark.parametrize("msync", ["none", "on_put"])
def test_roundtrip_in_each_msync_mode(tmp_path: Path, msync: str) -> None:
    path = tmp_path / f"{msync}.slots"
    backend = _backend(path, msync=msync)
    keys = [kit_key(i, msync) for i in range(6)]
    try:
        statuses = backend.put(keys, [memoryview(page_pattern(k, PAGE)) for k in keys])
        assert statuses == [PageStatus.OK] * len(keys)
        evicted = backend.take_evicted()  # 6 keys in 4 sets of 4 slots: normally none
    finally:
        backend.close()
    assert _check_every_present_page(path, verify=True) == len(keys) - len(evicted)
