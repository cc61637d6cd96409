"""``fsio.read_page``: without hashing, a page the page cache holds is read in one
``RWF_NOWAIT`` call, the rest of a partly cached one in pieces; hashed, every piece lands and is
hashed; short files stay short."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hicache_localdisk import fsio

from hicache.storage import HEADER_SIZE, payload_checksum

PAYLOAD = 3 * fsio.READ_CHUNK + 4096  # several pieces and a short last one


def _page_file(path: Path, payload: bytes) -> None:
    path.write_bytes(b"\x5a" * HEADER_SIZE + payload)


def _read(path: Path, header: memoryview, regions: list[memoryview]) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        got, checksum = fsio.read_page(fd, header, regions, hash_payload=False)
    finally:
        os.close(fd)
    assert checksum == 0  # nothing hashed
    return got


def _drop(path: Path, offset: int = 0) -> None:
    """Write back and drop ``path``'s cached pages from ``offset`` on."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, offset, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _cached(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fsio.read_cached(fd, [memoryview(bytearray(HEADER_SIZE + PAYLOAD))])
    finally:
        os.close(fd)


@pytest.fixture
def page(tmp_path: Path) -> tuple[Path, bytes]:
    payload = os.urandom(PAYLOAD)
    path = tmp_path / "page"
    _page_file(path, payload)
    return path, payload


def test_hot_partly_cached_and_cold_reads_land_whole(page: tuple[Path, bytes]) -> None:
    path, payload = page
    header = memoryview(bytearray(HEADER_SIZE))
    half = PAYLOAD // 2
    for state in ("hot", "partly cached", "cold"):
        if state == "partly cached":
            _drop(path, HEADER_SIZE + half)
        elif state == "cold":
            _drop(path)
        if state != "hot" and _cached(path) == HEADER_SIZE + PAYLOAD:
            pytest.skip("this filesystem keeps its pages cached (tmpfs): only the hot read ran")
        # Two regions (a page's K and V), the split inside a piece.
        regions = [memoryview(bytearray(half)), memoryview(bytearray(PAYLOAD - half))]
        assert _read(path, header, regions) == HEADER_SIZE + PAYLOAD, state
        assert bytes(header) == b"\x5a" * HEADER_SIZE, state
        assert bytes(regions[0]) + bytes(regions[1]) == payload, state


def test_read_cached_takes_only_what_the_page_cache_holds(page: tuple[Path, bytes]) -> None:
    path, _ = page
    assert _cached(path) == HEADER_SIZE + PAYLOAD  # just written: all of it cached
    _drop(path)
    if _cached(path) == HEADER_SIZE + PAYLOAD:
        pytest.skip("this filesystem keeps its pages cached (tmpfs) or ignores RWF_NOWAIT")
    assert _cached(path) == 0  # nothing cached at offset 0: EAGAIN, no bytes
    _read(path, memoryview(bytearray(HEADER_SIZE)), [memoryview(bytearray(PAYLOAD))])
    _drop(path, HEADER_SIZE + fsio.READ_CHUNK)
    assert HEADER_SIZE <= _cached(path) < HEADER_SIZE + PAYLOAD


def test_short_file_reads_short(tmp_path: Path) -> None:
    path = tmp_path / "short"
    cut = HEADER_SIZE + fsio.READ_CHUNK + 100
    _page_file(path, os.urandom(PAYLOAD)[: cut - HEADER_SIZE])
    regions = [memoryview(bytearray(PAYLOAD))]
    header = memoryview(bytearray(HEADER_SIZE))
    assert _read(path, header, regions) == cut  # hot: one call stops at the end
    _drop(path, HEADER_SIZE)
    if _cached(path) >= cut:
        pytest.skip("this filesystem keeps its pages cached (tmpfs): only the hot read ran")
    assert _read(path, header, regions) == cut  # the rest in pieces stops there too


@pytest.mark.parametrize("state", ["hot", "cold"])
def test_hashed_read_lands_whole_and_hashes_every_byte(tmp_path: Path, state: str) -> None:
    # Several hash pieces, a short last one, and K/V regions split inside a piece: every byte
    # lands where it belongs and the checksum is the payload's (what verification compares).
    size = 5 * fsio.READ_CHUNK + 4096
    payload = os.urandom(size)
    path = tmp_path / "page"
    _page_file(path, payload)
    if state == "cold":
        _drop(path)
    split = 2 * fsio.READ_CHUNK + 12345
    regions = [memoryview(bytearray(split)), memoryview(bytearray(size - split))]
    header = memoryview(bytearray(HEADER_SIZE))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        got, checksum = fsio.read_page(fd, header, regions, hash_payload=True)
    finally:
        os.close(fd)
    assert got == HEADER_SIZE + size
    assert bytes(regions[0]) + bytes(regions[1]) == payload
    assert checksum == payload_checksum(memoryview(payload))
    # Cut inside the second piece: the read reports where the file ended, not a full page.
    cut = HEADER_SIZE + 3 * fsio.READ_CHUNK + 100
    os.truncate(path, cut)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        got, _ = fsio.read_page(fd, header, regions, hash_payload=True)
    finally:
        os.close(fd)
    assert got == cut
