"""``MmapRawBaseline``: the bench's limit reads the slot file's own memory, and never writes it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from hicache_mmap import MmapBackend, MmapOptions
from hicache_mmap.layout import SLOT_HEADER_SIZE
from hicache_mmap.raw import slot_file
from hicache_mmap.rawbench import MmapRawBaseline

from hicache.storage import BackendContext, PageStatus
from hicache.testing.kit import kit_key, page_pattern

PAGE = 16 * 1024


def _slot_file(path: Path, page_bytes: int = PAGE, slots: int = 32) -> MmapBackend:
    options = MmapOptions(
        path=str(path), capacity=slots * (4096 + page_bytes), associativity=8, prefault=False
    )
    backend = MmapBackend(options, BackendContext(page_bytes, "rawbench"))
    backend.open()
    return backend


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_gets_copy_out_of_slot_payloads_spread_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "limit.slots"
    backend = _slot_file(path)
    keys = [kit_key(i, "raw") for i in range(4)]
    assert (
        backend.put(keys, [memoryview(page_pattern(k, PAGE)) for k in keys]) == [PageStatus.OK] * 4
    )
    geo = slot_file(backend).geo
    # Every payload distinct, so a read of the wrong slot (or of the scratch file) shows.
    with open(path, "r+b") as f:
        for slot in range(geo.num_slots):
            f.seek(geo.slots_offset + slot * geo.slot_size + SLOT_HEADER_SIZE)
            f.write(slot.to_bytes(4, "little") * (PAGE // 4))
    before = _file_digest(path)
    num_pages = geo.num_slots // 2
    raw = MmapRawBaseline(str(path), prefault=False)
    raw.setup(PAGE, num_pages)
    try:
        assert raw.reads_slot_file
        for i in range(num_pages):
            dst = memoryview(bytearray(PAGE))
            raw.get([i], [dst])
            slot = i * geo.num_slots // num_pages
            assert bytes(dst) == slot.to_bytes(4, "little") * (PAGE // 4)
        # Puts land in the scratch file: the slot file is untouched.
        raw.put([0], [memoryview(bytes(PAGE))])
        assert _file_digest(path) == before
    finally:
        raw.teardown()
        backend.close()
    # The old kind of limit, out of a file made for it, is measured beside it and cleaned up.
    [fresh] = raw.tool_limits(PAGE, 2, num_pages, 1)
    assert fresh.figure == "get_hot"
    assert fresh.gbps is not None and fresh.gbps > 0
    assert not list(tmp_path.glob("*.bench-*"))


def test_without_a_usable_slot_file_gets_read_the_scratch_file(tmp_path: Path) -> None:
    path = tmp_path / "other.slots"
    cases = {
        "no file": None,
        "another page size": 2 * PAGE,
        "fewer slots than pages": PAGE,
    }
    for case, page_bytes in cases.items():
        if path.exists():
            os.unlink(path)
        if page_bytes is not None:
            _slot_file(path, page_bytes, slots=8).close()
        raw = MmapRawBaseline(str(path), prefault=False)
        raw.setup(PAGE, 16)
        try:
            assert not raw.reads_slot_file, case
            src = memoryview(page_pattern(kit_key(3, "raw"), PAGE))
            raw.put([3], [src])
            dst = memoryview(bytearray(PAGE))
            raw.get([3], [dst])
            assert bytes(dst) == bytes(src), case
        finally:
            raw.teardown()
        assert raw.tool_limits(PAGE, 1, 16, 1) == (), case
