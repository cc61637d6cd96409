"""``hicache.storage.buffers``: GIL-free copies are exact, checked, and hash what they copied."""

from __future__ import annotations

import mmap
import threading

import numpy as np
import pytest
import xxhash

from hicache.storage.buffers import COPY_CHUNK, buffer_address, copy_and_hash, copy_bytes
from hicache.storage.pageformat import payload_checksum


def _pattern(nbytes: int, seed: int) -> memoryview:
    rng = np.random.default_rng(seed)
    return memoryview(rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("nbytes", [0, 1, 4095, COPY_CHUNK, 3 * COPY_CHUNK + 17])
@pytest.mark.parametrize("hash_dst", [False, True])
def test_copy_and_hash_copies_exactly_and_returns_the_page_checksum(
    nbytes: int, hash_dst: bool
) -> None:
    src = _pattern(nbytes, nbytes)
    dst = memoryview(bytearray(nbytes))
    checksum = copy_and_hash(dst, src, hash_dst=hash_dst)
    assert bytes(dst) == bytes(src)
    assert checksum == payload_checksum(src) == xxhash.xxh3_64_intdigest(bytes(src))


def test_copy_bytes_into_and_out_of_a_mapping_slice() -> None:
    mm = mmap.mmap(-1, 1 << 20)
    view = memoryview(mm)
    try:
        src = _pattern(4096, 1)
        copy_bytes(view[8192 : 8192 + 4096], src)
        assert mm[8192 : 8192 + 4096] == bytes(src)
        back = memoryview(bytearray(4096))
        copy_bytes(back, view[8192 : 8192 + 4096])
        assert bytes(back) == bytes(src)
    finally:
        view.release()
        mm.close()


def test_non_byte_formats_are_copied_and_hashed_as_bytes() -> None:
    src = memoryview(np.arange(10_000, dtype=np.float32))
    dst = memoryview(np.zeros(10_000, dtype=np.float32))
    assert copy_and_hash(dst, src, hash_dst=True) == xxhash.xxh3_64_intdigest(src.tobytes())
    assert np.array_equal(np.asarray(dst), np.asarray(src))


def test_size_mismatch_is_refused_before_any_byte_moves() -> None:
    dst = memoryview(bytearray(b"\x07" * 100))
    with pytest.raises(ValueError, match="copy of 101 bytes into a buffer of 100 bytes"):
        copy_bytes(dst, memoryview(bytes(101)))
    # One-region pages take the single-memmove path: refused the same way.
    with pytest.raises(ValueError, match="copy of 101 bytes into a buffer of 100 bytes"):
        copy_bytes([dst], (memoryview(bytes(101)),))
    # A short slice of a mapping (an offset past its end) is refused the same way.
    with pytest.raises(ValueError, match="copy of 100 bytes into a buffer of 50 bytes"):
        copy_and_hash(memoryview(bytearray(150))[100:], dst, hash_dst=False)
    assert bytes(dst) == b"\x07" * 100


def test_read_only_destination_and_strided_buffers_are_refused() -> None:
    with pytest.raises(BufferError):
        copy_bytes(memoryview(bytes(8)), memoryview(bytearray(8)))
    with pytest.raises(BufferError):
        copy_bytes([memoryview(bytes(8))], [memoryview(bytearray(8))])
    one = memoryview(bytearray(8))
    copy_bytes([one], (memoryview(b"abcdefgh"),))  # one region each side: copied exactly
    assert bytes(one) == b"abcdefgh"
    strided = memoryview(np.zeros(16, dtype=np.uint8)[::2])
    with pytest.raises(BufferError):
        buffer_address(strided)


def test_copies_from_threads_run_concurrently_and_stay_exact() -> None:
    pages = [_pattern(COPY_CHUNK * 4, seed) for seed in range(8)]
    outs = [memoryview(bytearray(COPY_CHUNK * 4)) for _ in pages]
    sums: list[int] = [0] * len(pages)

    def work(i: int) -> None:
        for _ in range(20):
            sums[i] = copy_and_hash(outs[i], pages[i], hash_dst=True)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(pages))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for page, out, checksum in zip(pages, outs, sums, strict=True):
        assert bytes(out) == bytes(page)
        assert checksum == payload_checksum(page)
