"""A put that evicts reuses the victims' files (inodes), except files a read may still hold."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from hicache_localdisk import LocalDiskBackend

from hicache.storage import HEADER_SIZE, EvictionPolicy, PageParts, PageStatus
from hicache.testing.wait import WAIT_S


@pytest.fixture
def make_backend(make_backend: Callable[..., LocalDiskBackend]) -> Callable[..., LocalDiskBackend]:
    """One file per page (``pack_below: 0``): these tests plant and damage page files."""
    return functools.partial(make_backend, pack_below=0)


PAGE = 16384
STORED = PAGE + HEADER_SIZE


def _inode(backend: LocalDiskBackend, key: str) -> int:
    return os.stat(backend.page_path(key)).st_ino


def _temporaries(backend: LocalDiskBackend) -> list[Path]:
    return list(Path(backend.layout.ns_dir).glob("*/.tmp-*"))


def _full(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
) -> tuple[LocalDiskBackend, list[str]]:
    """An open backend holding 4 pages, its capacity (LRU: the first key goes first)."""
    b = make_backend(page_bytes=PAGE, max_bytes=4 * STORED, eviction=EvictionPolicy.LRU)
    b.open()
    keys = [key_of(i) for i in range(4)]
    for k in keys:  # one call each: k0 is the least recent
        assert b.put([k], [memoryview(payload_of(k, PAGE))]) == [PageStatus.OK]
    return b, keys


def test_an_evicted_file_becomes_the_new_page_and_reads_back_exactly(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
) -> None:
    b, keys = _full(make_backend, key_of, payload_of)
    # held open, the victim's inode cannot be freed and its number handed to a new file, so
    # the same inode below means the file was reused (no read is registered: it may be)
    victim = os.open(b.page_path(keys[0]), os.O_RDONLY)
    new = key_of(100)
    try:
        assert b.put([new], [memoryview(payload_of(new, PAGE))]) == [PageStatus.OK]
        assert b.exists([keys[0], new]) == [False, True]
        assert not os.path.exists(b.page_path(keys[0]))
        # no file created: the victim's was reused
        assert os.path.samestat(os.fstat(victim), os.stat(b.page_path(new)))
    finally:
        os.close(victim)
    dst = bytearray(PAGE)
    assert b.get_into([new], [memoryview(dst)]) == [PageStatus.OK]
    assert bytes(dst) == payload_of(new, PAGE)
    assert os.stat(b.page_path(new)).st_size == STORED
    assert _temporaries(b) == []
    assert b.used_bytes == 4 * STORED
    b.close()


def test_a_file_a_read_may_hold_is_unlinked_not_reused(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
) -> None:
    b, keys = _full(make_backend, key_of, payload_of)
    victim = _inode(b, keys[0])
    spares = b._spares
    assert spares is not None
    # a read of the victim in flight may have opened its file: overwriting it would tear the
    # read, so the put creates a file and the victim's is unlinked (the read keeps its copy)
    with open(b.page_path(keys[0]), "rb") as reader, spares.reading([keys[0]]):
        new = key_of(100)
        assert b.put([new], [memoryview(payload_of(new, PAGE))]) == [PageStatus.OK]
        assert _inode(b, new) != victim
        assert os.fstat(reader.fileno()).st_nlink == 0
        assert reader.read()[HEADER_SIZE:] == payload_of(keys[0], PAGE)
    assert _temporaries(b) == []
    dst = bytearray(PAGE)
    assert b.get_into([new], [memoryview(dst)]) == [PageStatus.OK]
    assert bytes(dst) == payload_of(new, PAGE)
    b.close()


@pytest.mark.parametrize("options", [{"shared": True}, {"durability": "fsync"}])
def test_shared_and_fsync_modes_never_reuse_files(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
    options: dict[str, object],
) -> None:
    # shared: other processes may read the root, and nothing here knows of their reads;
    # fsync: a power loss could keep the overwrite and lose the victim's rename
    b = make_backend(page_bytes=PAGE, max_bytes=4 * STORED, **options)
    b.open()
    assert b._spares is None
    keys = [key_of(i) for i in range(8)]
    for k in keys:
        assert b.put([k], [memoryview(payload_of(k, PAGE))]) == [PageStatus.OK]
    assert _temporaries(b) == []
    b.close()


def test_reads_racing_evictions_never_see_a_reused_file(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a tiny tier: every put evicts, and its victims are often the pages being read
    b = make_backend(page_bytes=PAGE, max_bytes=6 * STORED, eviction=EvictionPolicy.LRU)
    b.open()
    keys = [key_of(i, "race") for i in range(24)]
    stop = threading.Event()
    errors: list[str] = []
    # The first write that reuses a victim's file (its put in progress: the victim retired,
    # the new page not written) waits until a read has run from start to end meanwhile, so
    # readers and a reusing put overlap at least once whatever the scheduling.
    io = b._require_io()
    write = io.write
    claim = threading.Lock()
    held = threading.Event()  # a reusing put is held
    read_in_put = threading.Event()  # a read ran, start to end, while it was held
    overlaps: list[list[str]] = []

    def held_write(key: str, src: PageParts, mtime_ns: int, reuse: str | None = None) -> PageStatus:
        if reuse is not None:
            with claim:
                first = not held.is_set()
                held.set()
            if first and not read_in_put.wait(WAIT_S):
                errors.append("no read ran while a put reusing a file was held")
        return write(key, src, mtime_ns, reuse)

    monkeypatch.setattr(io, "write", held_write)

    def writer(t: int) -> None:
        for r in range(60):
            batch = [keys[(t * 5 + r * 3 + i) % len(keys)] for i in range(3)]
            statuses = b.put(batch, [memoryview(payload_of(k, PAGE)) for k in batch])
            if not all(s.stored for s in statuses):
                errors.append(f"put {statuses}")

    def reader(t: int) -> None:
        bufs = [bytearray(PAGE) for _ in range(2)]
        n = 0
        while not stop.is_set():
            batch = [keys[(t * 11 + n + i) % len(keys)] for i in range(2)]
            n += 1
            # the held put resumes only once read_in_put is set: a read begun while it is held
            # and not yet set ran entirely inside the put
            during = held.is_set() and not read_in_put.is_set()
            got = b.get_into(batch, [memoryview(x) for x in bufs])
            if during:
                with claim:
                    if not read_in_put.is_set():
                        overlaps.append(batch)
                        read_in_put.set()
            for key, status, buf in zip(batch, got, bufs, strict=True):
                if status is PageStatus.OK and bytes(buf) != payload_of(key, PAGE):
                    errors.append(f"{key}: wrong bytes")
                elif status not in (PageStatus.OK, PageStatus.NOT_FOUND):
                    errors.append(f"{key}: {status}")

    writers = [threading.Thread(target=writer, args=(t,)) for t in range(3)]
    readers = [threading.Thread(target=reader, args=(t,)) for t in range(3)]
    for th in readers + writers:
        th.start()
    for th in writers:
        th.join()
    stop.set()
    for th in readers:
        th.join()
    assert errors == []
    assert len(overlaps) == 1  # a read ran inside a put that reused a victim's file
    assert b.stats()["corrupt"] == 0
    assert _temporaries(b) == []
    assert b.used_bytes == sum(b.exists(keys)) * STORED <= b.max_bytes
    b.close()
