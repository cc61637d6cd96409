"""O_DIRECT with page-aligned buffers (as host-pool pages are), and its fallbacks."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import pytest
from hicache_localdisk import LocalDiskBackend, pageio
from hicache_localdisk.fsio import SPLIT_CHUNK, aligned_buffer
from hicache_localdisk.pageio import PARALLEL_HASH_MIN_BYTES

from hicache.storage import HEADER_SIZE, PageStatus, buffer_address

PAGE = 64 * 1024


@pytest.mark.parametrize("durability", ["none", "fsync"])
def test_direct_io_round_trip_with_aligned_buffers(
    durability: str,
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
) -> None:
    backend = make_backend(page_bytes=PAGE, direct_io=True, durability=durability)
    backend.open()
    if not backend.stats()["direct_io"]:
        pytest.skip("the test filesystem refuses O_DIRECT")
    assert backend.capabilities.alignment == 4096
    keys = [key_of(i, "direct") for i in range(6)]
    srcs = []
    for key in keys:
        buf = aligned_buffer(PAGE)
        buf[:] = payload_of(key, PAGE)
        srcs.append(buf)
    assert all(buffer_address(s) % 4096 == 0 for s in srcs)
    # An O_DIRECT write with a misaligned iovec fails with EINVAL: OK proves the aligned path.
    assert backend.put(keys, srcs) == [PageStatus.OK] * len(keys)
    dsts = [aligned_buffer(PAGE) for _ in keys]
    assert backend.get_into(keys, dsts) == [PageStatus.OK] * len(keys)
    assert all(d == payload_of(k, PAGE) for k, d in zip(keys, dsts, strict=True))
    # Mixed: an unaligned destination takes the buffered path in the same batch.
    odd = memoryview(bytearray(PAGE + 1))[1:]
    assert backend.get_into(keys[:2], [odd, dsts[1]]) == [PageStatus.OK] * 2
    assert odd == payload_of(keys[0], PAGE)
    # Corruption is still caught on the direct path (whole read, then checksum).
    with open(backend.page_path(keys[2]), "r+b") as f:
        f.seek(HEADER_SIZE + 12345)
        f.write(b"\x00\xff")
    assert backend.get_into([keys[2]], [dsts[2]]) == [PageStatus.CORRUPT]
    backend.close()


def test_direct_io_falls_back_for_unaligned_page_sizes(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    size = 10_000  # not a multiple of 4 KiB: O_DIRECT cannot write the file's tail
    backend = make_backend(page_bytes=size, direct_io=True)
    with caplog.at_level(logging.WARNING, logger="hicache_localdisk"):
        backend.open()
    assert "buffered I/O" in caplog.text
    assert backend.stats()["direct_io"] is False
    key = key_of(1)
    assert backend.put([key], [memoryview(payload_of(key, size))]) == [PageStatus.OK]
    dst = memoryview(bytearray(size))
    assert backend.get_into([key], [dst]) == [PageStatus.OK]
    assert dst == payload_of(key, size)
    backend.close()


@pytest.mark.parametrize("cores", [1, 64], ids=["hash-inline", "hash-on-helper"])
@pytest.mark.parametrize("direct_io", [False, True])
def test_large_pages_written_payload_first(
    cores: int,
    direct_io: bool,
    monkeypatch: pytest.MonkeyPatch,
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
) -> None:
    # Pages this large are hashed chunk by chunk as they are written, or on a helper thread
    # when cores are idle; either way the header goes last. Both paths, forced.
    monkeypatch.setattr(pageio, "_CORES", cores)
    size = 2 * PARALLEL_HASH_MIN_BYTES
    backend = make_backend(page_bytes=size, direct_io=direct_io, io_threads=2)
    backend.open()
    keys = [key_of(i, "large") for i in range(3)]
    srcs = []
    for key in keys:
        buf = aligned_buffer(size)
        buf[:] = payload_of(key, size)
        srcs.append(buf)
    assert backend.put(keys, srcs) == [PageStatus.OK] * 3
    backend.close()
    backend = make_backend(page_bytes=size, direct_io=direct_io)
    backend.open()
    dsts = [aligned_buffer(size) for _ in keys]
    assert backend.get_into(keys, dsts) == [PageStatus.OK] * 3
    assert all(d == payload_of(k, size) for k, d in zip(keys, dsts, strict=True))
    with open(backend.page_path(keys[0]), "r+b") as f:
        f.seek(HEADER_SIZE + size - 1)
        f.write(b"\x01" if payload_of(keys[0], size)[-1] != 1 else b"\x02")
    assert backend.get_into(keys[:1], dsts[:1]) == [PageStatus.CORRUPT]
    backend.close()


@pytest.mark.parametrize("verify", [True, False])
def test_large_page_read_alone_is_split_over_helpers(
    verify: bool,
    monkeypatch: pytest.MonkeyPatch,
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
) -> None:
    helpers_seen: list[object] = []
    real_read_page = pageio.read_page

    def read_page(*args: Any, **kwargs: Any) -> tuple[int, int]:
        helpers_seen.append(kwargs.get("helpers"))
        return real_read_page(*args, **kwargs)

    monkeypatch.setattr(pageio, "read_page", read_page)
    # A large page read alone goes in pieces over the helper threads, hashed in order: its bytes
    # land whole, and damage in any piece (here the last, read by a helper) is still found.
    size = 3 * SPLIT_CHUNK + 4096  # a short last piece
    backend = make_backend(page_bytes=size, io_threads=2, verify_checksums=verify)
    backend.open()
    keys = [key_of(i, "split") for i in range(2)]
    srcs = [memoryview(payload_of(k, size)) for k in keys]
    assert backend.put(keys, srcs) == [PageStatus.OK] * 2
    dst = bytearray(size)
    assert backend.get_into(keys[:1], [memoryview(dst)]) == [PageStatus.OK]
    assert dst == payload_of(keys[0], size)
    assert len(helpers_seen) == 1 and helpers_seen[0] is not None
    # A batch spreads its pages over the I/O threads instead: no page of it is split.
    helpers_seen.clear()
    both = [memoryview(bytearray(size)) for _ in keys]
    assert backend.get_into(keys, both) == [PageStatus.OK] * 2
    assert helpers_seen == [None, None]
    helpers_seen.clear()
    with open(backend.page_path(keys[0]), "r+b") as f:
        f.seek(HEADER_SIZE + size - 10)
        f.write(b"\x01" if payload_of(keys[0], size)[-10] != 1 else b"\x02")
    expected = PageStatus.CORRUPT if verify else PageStatus.OK
    assert backend.get_into(keys[:1], [memoryview(bytearray(size))]) == [expected]
    # A file cut short inside a helper's piece is corrupt whatever the verify setting.
    os.truncate(backend.page_path(keys[1]), HEADER_SIZE + 2 * SPLIT_CHUNK + 100)
    assert backend.get_into(keys[1:], [memoryview(bytearray(size))]) == [PageStatus.CORRUPT]
    assert len(helpers_seen) == 2 and all(h is not None for h in helpers_seen)
    backend.close()
