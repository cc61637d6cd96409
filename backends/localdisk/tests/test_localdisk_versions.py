"""Mixed-version tiers: a page a newer hicache wrote is a miss that stays in place, counted apart
from corruption; only a proven-corrupt page of this version is deleted. Another process reads."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hicache_localdisk import LocalDiskBackend

from hicache.storage import HEADER_SIZE, PageStatus
from hicache.testing.peer import as_newer_version, read_in_other_process


@pytest.fixture
def make_backend(make_backend: Callable[..., LocalDiskBackend]) -> Callable[..., LocalDiskBackend]:
    """One file per page (``pack_below: 0``): these tests plant and damage page files."""
    return functools.partial(make_backend, pack_below=0)


PAGE_BYTES = 16384
MakeBackend = Callable[..., LocalDiskBackend]


def key_of(i: int, salt: str) -> str:
    return hashlib.sha256(f"{salt}:{i}".encode()).hexdigest()


def payload_of(key: str) -> bytes:
    return (hashlib.sha256(key.encode()).digest() * (PAGE_BYTES // 32))[:PAGE_BYTES]


def test_newer_page_survives_a_reader_in_another_process(
    tmp_path: Path, make_backend: MakeBackend
) -> None:
    writer = make_backend()
    writer.open()
    try:
        newer, shorter, corrupt, _intact = keys = [key_of(i, "versions") for i in range(4)]
        assert writer.put(keys, [memoryview(payload_of(k)) for k in keys]) == [PageStatus.OK] * 4
        paths = {k: Path(writer.layout.page_path(k)) for k in keys}
        paths[newer].write_bytes(as_newer_version(paths[newer].read_bytes()))
        # A newer format may also change the page's size: still a newer writer's page.
        paths[shorter].write_bytes(as_newer_version(paths[shorter].read_bytes())[:-100])
        damaged = bytearray(paths[corrupt].read_bytes())
        damaged[HEADER_SIZE + 7] ^= 0xFF  # a payload byte of a version-1 page: proven damage
        paths[corrupt].write_bytes(damaged)
        planted = {k: paths[k].read_bytes() for k in (newer, shorter)}

        seen = read_in_other_process(
            LocalDiskBackend,
            {"root": str(tmp_path / "root")},
            page_bytes=PAGE_BYTES,
            namespace="ns",
            keys=keys,
        )
        assert seen.statuses == [
            PageStatus.NOT_FOUND,
            PageStatus.NOT_FOUND,
            PageStatus.CORRUPT,
            PageStatus.OK,
        ]
        assert seen.stats["unknown_version"] == 1  # read, and found to be a newer writer's
        assert seen.stats["other_size_pages"] == 1  # the open scan left the other size alone
        assert seen.stats["corrupt"] == 1
        # The newer pages are where they were, byte for byte; only the corrupt one is gone.
        assert {k: paths[k].read_bytes() for k in planted} == planted
        assert not paths[corrupt].exists()
        # A reader that knows the format still reads them (here: the version put back).
        paths[newer].write_bytes(as_newer_version(planted[newer], version=1))
        dst = bytearray(PAGE_BYTES)
        assert writer.get_into([newer], [memoryview(dst)]) == [PageStatus.OK]
        assert dst == payload_of(newer)
    finally:
        writer.close()


def test_newer_page_of_another_size_survives_the_open_scan(make_backend: MakeBackend) -> None:
    backend = make_backend()
    backend.open()
    key = key_of(0, "scan")
    backend.put([key], [memoryview(payload_of(key))])
    path = Path(backend.layout.page_path(key))
    backend.close()
    planted = as_newer_version(path.read_bytes())[:-100]
    path.write_bytes(planted)
    reopened = make_backend()
    reopened.open()  # the open scan sweeps damaged files of the wrong size, not this one
    try:
        assert path.read_bytes() == planted
        assert reopened.get_into([key], [memoryview(bytearray(PAGE_BYTES))]) == [
            PageStatus.NOT_FOUND
        ]
    finally:
        reopened.close()
