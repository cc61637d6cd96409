"""Pack files: the small pages of one put in one file, punched page by page, found on restart."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from hicache_localdisk import LocalDiskBackend
from hicache_localdisk.packs import Record

from hicache.storage import HEADER_SIZE, EvictionPolicy, PageParts, PageStatus
from hicache.storage import PAGE_MAGIC as MAGIC
from hicache.testing.planted import release, run_bounded
from hicache.testing.wait import WAIT_S

PAGE = 16384
STORED = PAGE + HEADER_SIZE
DiskBytes = Callable[[Path, int], tuple[int, int]]


def _packs(backend: LocalDiskBackend) -> list[Path]:
    return sorted(Path(backend.layout.ns_dir).glob("*/*.pack"))


def _page_files(backend: LocalDiskBackend) -> list[Path]:
    return [p for p in Path(backend.layout.ns_dir).glob("*/*") if len(p.name) == 64]


def _temporaries(backend: LocalDiskBackend) -> list[Path]:
    return list(Path(backend.layout.ns_dir).glob("*/.tmp-*"))


def _record_live(backend: LocalDiskBackend, path: str, offset: int) -> bool:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(len(MAGIC)) == MAGIC


def _put(
    backend: LocalDiskBackend, keys: list[str], payload_of: Callable[..., bytes]
) -> list[PageStatus]:
    return backend.put(keys, [memoryview(payload_of(k, PAGE)) for k in keys])


def _read(backend: LocalDiskBackend, keys: list[str]) -> tuple[list[PageStatus], list[bytearray]]:
    bufs = [bytearray(PAGE) for _ in keys]
    return backend.get_into(keys, [memoryview(b) for b in bufs]), bufs


def test_a_put_batch_is_one_pack_file_and_reads_back(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
    disk_bytes: DiskBytes,
) -> None:
    b = make_backend(page_bytes=PAGE, max_bytes=64 * STORED)
    b.open()
    assert b.packing
    keys = [key_of(i, "one") for i in range(8)]
    assert _put(b, keys, payload_of) == [PageStatus.OK] * 8
    packs = _packs(b)
    assert len(packs) == 1 and _page_files(b) == []
    assert packs[0].stat().st_size == 8 * STORED
    # records in batch order, each a whole page file's bytes
    assert [b.record_of(k) for k in keys] == [(str(packs[0]), j * STORED) for j in range(8)]
    statuses, bufs = _read(b, keys[::-1])
    assert statuses == [PageStatus.OK] * 8
    assert [bytes(x) for x in bufs] == [payload_of(k, PAGE) for k in keys[::-1]]
    assert {p.key for p in b.iter_pages()} == set(keys)  # what `hicache storage du` lists
    assert disk_bytes(Path(b.layout.ns_dir), PAGE) == (8 * STORED, 8) == (b.used_bytes, 8)
    # a batch that repeats a key and holds an existing one: only the new key is written
    again = [keys[0], key_of(100, "one"), key_of(100, "one")]
    assert _put(b, again, payload_of) == [
        PageStatus.ALREADY_EXISTS,
        PageStatus.OK,
        PageStatus.ALREADY_EXISTS,
    ]
    assert len(_packs(b)) == 2
    assert b.used_bytes == 9 * STORED == disk_bytes(Path(b.layout.ns_dir), PAGE)[0]
    b.close()


def test_eviction_punches_records_and_the_last_one_unlinks_the_pack(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
    disk_bytes: DiskBytes,
) -> None:
    b = make_backend(page_bytes=PAGE, max_bytes=8 * STORED, eviction=EvictionPolicy.LRU)
    b.open()
    first = [key_of(i, "first") for i in range(8)]
    assert _put(b, first, payload_of) == [PageStatus.OK] * 8
    (pack,) = _packs(b)
    os.sync()  # delayed allocation: blocks are counted once allocated
    full_blocks = pack.stat().st_blocks
    # 3 new pages evict the 3 least recent: the tail of the first batch (tail first)
    second = [key_of(i, "second") for i in range(3)]
    assert _put(b, second, payload_of) == [PageStatus.OK] * 3
    gone = [k for k, ok in zip(first, b.exists(first), strict=True) if not ok]
    assert len(gone) == 3 and b.exists(first[:5]) == [True] * 5
    assert sorted(b.take_evicted()) == sorted(gone)
    for j, key in enumerate(first):
        assert _record_live(b, str(pack), j * STORED) == (key not in gone)
    assert pack.stat().st_size == 8 * STORED  # punched: the size stays, the blocks go
    assert pack.stat().st_blocks <= full_blocks - 3 * STORED // 512 + 8  # + an extent block
    assert disk_bytes(Path(b.layout.ns_dir), PAGE) == (8 * STORED, 8) == (b.used_bytes, 8)
    statuses, bufs = _read(b, first[:5])
    assert statuses == [PageStatus.OK] * 5
    assert [bytes(x) for x in bufs] == [payload_of(k, PAGE) for k in first[:5]]
    # a delete punches too; the pack's last record takes the pack with it
    assert (
        b.get_into(second, [memoryview(bytearray(PAGE)) for _ in second]) == [PageStatus.OK] * 3
    )  # first[4] is now the least recent page
    b.delete(first[:4])
    assert pack.exists()
    # held open, the pack's inode cannot be freed and its number handed to a new file, so the
    # same inode below means the emptied pack was written over, not a file created
    held = os.open(pack, os.O_RDONLY)
    try:
        third = [key_of(i, "third") for i in range(5)]
        assert _put(b, third, payload_of) == [PageStatus.OK] * 5  # evicts first[4], the last
        assert not pack.exists()
        new = b.record_of(third[0])
        assert new is not None and os.path.samestat(os.fstat(held), os.stat(new[0]))
        assert os.stat(new[0]).st_size == 5 * STORED  # the old pack's tail cut off
    finally:
        os.close(held)
    assert _temporaries(b) == []
    assert b.used_bytes == 8 * STORED == disk_bytes(Path(b.layout.ns_dir), PAGE)[0]
    statuses, bufs = _read(b, third)
    assert statuses == [PageStatus.OK] * 5
    assert [bytes(x) for x in bufs] == [payload_of(k, PAGE) for k in third]
    # a pack emptied by a delete waits for the next put; close removes it
    b.delete(second + third)
    assert len(_temporaries(b)) == 2 and _packs(b) == []
    assert all(t.stat().st_size == 0 for t in _temporaries(b))  # kept, but holding nothing
    b.close()
    assert _temporaries(b) == []


def test_restart_finds_exactly_the_live_packed_pages_in_their_order(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
    disk_bytes: DiskBytes,
) -> None:
    b = make_backend(page_bytes=PAGE, max_bytes=12 * STORED, eviction=EvictionPolicy.LRU)
    b.open()
    chains = [[key_of(i, f"chain{c}") for i in range(5)] for c in range(3)]
    for chain in chains:
        assert _put(b, chain, payload_of) == [PageStatus.OK] * 5  # the third evicts 3
    b.delete([chains[1][0]])  # a punched head: not found on restart
    live = [k for chain in chains for k, ok in zip(chain, b.exists(chain), strict=True) if ok]
    assert len(live) == 11
    b.close()

    again = make_backend(page_bytes=PAGE, max_bytes=12 * STORED, eviction=EvictionPolicy.LRU)
    again.open()
    assert {p.key for p in again.iter_pages()} == set(live)
    everything = [k for chain in chains for k in chain]
    assert [k for k, ok in zip(everything, again.exists(everything), strict=True) if ok] == live
    assert again.used_bytes == 11 * STORED == disk_bytes(Path(again.layout.ns_dir), PAGE)[0]
    # recency came back from the packs: the oldest chain's tail goes first, tail first
    assert _put(again, [key_of(0, "new"), key_of(1, "new")], payload_of) == [PageStatus.OK] * 2
    assert again.exists(chains[0]) == [True, False, False, False, False]
    live.remove(chains[0][1])
    statuses, bufs = _read(again, live)
    assert statuses == [PageStatus.OK] * 10
    assert [bytes(x) for x in bufs] == [payload_of(k, PAGE) for k in live]
    again.close()


def test_a_key_in_two_packs_is_kept_once_on_restart(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
    disk_bytes: DiskBytes,
) -> None:
    # what a crash between a pack's publish and the punch of a record it duplicated leaves
    b = make_backend(page_bytes=PAGE, max_bytes=64 * STORED)
    b.open()
    keys = [key_of(i, "dup") for i in range(4)]
    _put(b, keys, payload_of)
    b.close()
    (pack,) = _packs(b)
    shutil.copy(pack, pack.with_name(pack.name.replace(".pack", "0.pack")))
    again = make_backend(page_bytes=PAGE, max_bytes=64 * STORED)
    again.open()
    assert again.used_bytes == 4 * STORED == disk_bytes(Path(again.layout.ns_dir), PAGE)[0]
    assert len(_packs(again)) == 1  # the copy's records all punched: it went
    statuses, bufs = _read(again, keys)
    assert statuses == [PageStatus.OK] * 4
    assert [bytes(x) for x in bufs] == [payload_of(k, PAGE) for k in keys]
    again.close()


@pytest.mark.parametrize("verify", [True, False])
def test_punched_and_torn_records_never_return_their_bytes(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
    verify: bool,
) -> None:
    b = make_backend(page_bytes=PAGE, max_bytes=64 * STORED, verify_checksums=verify)
    b.open()
    keys = [key_of(i, "torn") for i in range(4)]
    _put(b, keys, payload_of)
    punched, torn = b.record_of(keys[1]), b.record_of(keys[2])
    assert punched is not None and torn is not None
    with open(punched[0], "r+b") as f:  # a record zeroed under the backend (a power loss)
        f.seek(punched[1])
        f.write(bytes(STORED))
        f.seek(torn[1] + HEADER_SIZE + PAGE // 2)  # the back half of a payload lost
        f.write(bytes(PAGE // 2))
    statuses, bufs = _read(b, keys)
    assert statuses[1] is PageStatus.NOT_FOUND  # zeros are a miss, never a page of zeros
    if verify:
        assert statuses[2] is PageStatus.CORRUPT
    assert [statuses[0], statuses[3]] == [PageStatus.OK] * 2
    assert bytes(bufs[0]) == payload_of(keys[0], PAGE)
    assert b.exists(keys[1:2]) == [False]
    b.close()
    # on restart a zeroed record is skipped, and the torn one too when its header is gone
    again = make_backend(page_bytes=PAGE, max_bytes=64 * STORED)
    again.open()
    assert again.exists(keys) == [True, False, not verify, True]
    again.close()


def test_a_record_a_read_holds_is_punched_only_after_that_read(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    b = make_backend(page_bytes=PAGE, max_bytes=64 * STORED, verify_checksums=False)
    b.open()
    keys = [key_of(i, "race") for i in range(3)]
    _put(b, keys, payload_of)
    where = b.record_of(keys[1])
    assert where is not None
    packs = b._packs
    assert packs is not None
    read = packs.read
    located = threading.Event()  # the read named its key and knows its record
    deleted = threading.Event()  # the page was deleted meanwhile
    errors: list[str] = []

    def held_read(
        keys_: list[str], dsts: list[PageParts], at: dict[str, Record], touch: int | None
    ) -> object:
        located.set()
        if not deleted.wait(WAIT_S):
            errors.append("the delete never ran")
        return read(keys_, dsts, at, touch)

    monkeypatch.setattr(packs, "read", held_read)
    got: list[tuple[list[PageStatus], list[bytearray]]] = []
    reader = threading.Thread(target=lambda: got.append(_read(b, [keys[1]])))
    reader.start()
    assert located.wait(WAIT_S)
    b.delete([keys[1]])
    # the read in flight still owns its record: not punched (nor its pack unlinked)
    assert _record_live(b, *where)
    assert b.exists([keys[1]]) == [False]
    deleted.set()
    reader.join(WAIT_S)
    assert not reader.is_alive() and errors == []
    # with checksums off only the header guards a read: zeros read as OK would be the bug
    (statuses, bufs) = got[0]
    assert statuses == [PageStatus.OK]
    assert bytes(bufs[0]) == payload_of(keys[1], PAGE)
    assert not _record_live(b, *where)  # punched once the read ended
    b.close()


def test_packs_are_off_where_they_do_not_apply(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
) -> None:
    for options in ({"pack_below": 0}, {"shared": True}, {"pack_below": STORED}):
        b = make_backend(page_bytes=PAGE, max_bytes=64 * STORED, **options)
        b.open()
        assert not b.packing, options
        keys = [key_of(i, str(options)) for i in range(3)]
        assert _put(b, keys, payload_of) == [PageStatus.OK] * 3
        assert _packs(b) == []
        b.close()


@pytest.mark.parametrize("verify", [True, False])
def test_reads_racing_puts_that_punch_their_records_never_see_a_wrong_byte(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
    disk_bytes: DiskBytes,
    verify: bool,
) -> None:
    # a tiny tier: every put evicts (punches), often the very pages being read
    b = make_backend(
        page_bytes=PAGE, max_bytes=6 * STORED, eviction=EvictionPolicy.LRU, verify_checksums=verify
    )
    b.open()
    keys = [key_of(i, "punch-race") for i in range(24)]
    stop = threading.Event()
    errors: list[str] = []

    def writer(t: int) -> None:
        for r in range(60):
            batch = [keys[(t * 5 + r * 3 + i) % len(keys)] for i in range(3)]
            statuses = _put(b, batch, payload_of)
            if not all(s.stored for s in statuses):
                errors.append(f"put {statuses}")

    def reader(t: int) -> None:
        n = 0
        while not stop.is_set():
            batch = [keys[(t * 11 + n + i) % len(keys)] for i in range(2)]
            n += 1
            statuses, bufs = _read(b, batch)
            for key, status, buf in zip(batch, statuses, bufs, strict=True):
                if status is PageStatus.OK and bytes(buf) != payload_of(key, PAGE):
                    errors.append(f"{key}: wrong bytes")
                elif status not in (PageStatus.OK, PageStatus.NOT_FOUND):
                    errors.append(f"{key}: {status}")

    writers = [threading.Thread(target=writer, args=(t,)) for t in range(3)]
    readers = [threading.Thread(target=reader, args=(t,)) for t in range(3)]
    for th in readers + writers:
        th.start()
    for th in writers:
        th.join(WAIT_S)
    stop.set()
    for th in readers:
        th.join(WAIT_S)
    assert not any(th.is_alive() for th in writers + readers), "a put or a read hung"
    assert errors == []
    assert b.stats()["corrupt"] == 0
    present = b.exists(keys)
    on_disk = disk_bytes(Path(b.layout.ns_dir), PAGE)
    assert b.used_bytes == sum(present) * STORED == on_disk[0] <= b.max_bytes
    # what survived the race reads back whole, the rest is a miss
    statuses, bufs = _read(b, keys)
    assert statuses == [PageStatus.OK if p else PageStatus.NOT_FOUND for p in present]
    assert all(
        bytes(buf) == payload_of(k, PAGE)
        for k, p, buf in zip(keys, present, bufs, strict=True)
        if p
    )
    b.close()


def test_a_symlink_under_a_pack_name_is_a_miss_and_neither_it_nor_its_target_is_touched(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
    tmp_path: Path,
) -> None:
    # The file-per-page rule (test_localdisk_not_regular) holds for packs too: whatever sits
    # under a pack's name that is not a regular file is a miss, left in place; an emptied pack
    # is not renamed, truncated nor unlinked through it.
    target = tmp_path / "precious"
    target.write_bytes(b"x" * 8192)
    b = make_backend(page_bytes=PAGE, max_bytes=64 * STORED)
    b.open()
    keys = [key_of(i, "link") for i in range(2)]
    assert _put(b, keys, payload_of) == [PageStatus.OK] * 2
    (pack,) = _packs(b)
    pack.unlink()
    pack.symlink_to(target)
    statuses, _bufs = _read(b, keys)
    assert statuses == [PageStatus.NOT_FOUND] * 2
    assert b.exists(keys) == [False, False]
    assert target.read_bytes() == b"x" * 8192
    assert pack.is_symlink() and _temporaries(b) == []
    b.close()
    assert target.read_bytes() == b"x" * 8192


def test_a_read_only_instance_that_finds_punched_records_writes_nothing(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
) -> None:
    w = make_backend(page_bytes=PAGE, max_bytes=64 * STORED)
    w.open()
    keys = [key_of(i, "ro") for i in range(2)]
    assert _put(w, keys, payload_of) == [PageStatus.OK] * 2
    w.close()
    (pack,) = _packs(w)
    r = make_backend(page_bytes=PAGE, max_bytes=64 * STORED, read_only=True)
    r.open()
    # zeros where the records were (punched by a writer since, or lost to a power loss)
    with open(pack, "r+b") as f:
        f.write(bytes(2 * STORED))
    before = pack.stat()
    statuses, _bufs = _read(r, keys)
    assert statuses == [PageStatus.NOT_FOUND] * 2
    after = pack.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    assert _packs(r) == [pack] and _temporaries(r) == []
    r.close()
    assert _packs(r) == [pack]


def test_a_fifo_under_a_pack_name_never_blocks_a_delete(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
) -> None:
    # The punch of a deleted page's record opens its pack for writing: a FIFO planted under
    # the name would block that open until some reader came (forever).
    b = make_backend(page_bytes=PAGE, max_bytes=64 * STORED)
    b.open()
    keys = [key_of(i, "fifo") for i in range(3)]
    assert _put(b, keys, payload_of) == [PageStatus.OK] * 3
    (pack,) = _packs(b)
    pack.unlink()
    os.mkfifo(pack, 0o600)
    try:
        finished, _ = run_bounded(lambda: b.delete(keys[:1]), WAIT_S)
        assert finished, "a delete blocked on a FIFO under a pack's name"
        assert b.exists(keys[:1]) == [False]
        finished, _ = run_bounded(lambda: b.delete(keys[1:]), WAIT_S)
        assert finished
        # the name of an emptied pack is unlinked (as an evicted page file's is), not reused
        assert not os.path.lexists(pack) and _temporaries(b) == []
    finally:
        release(str(pack))
    b.close()


def test_the_blocks_of_packs_stay_within_max_bytes_when_records_go_one_by_one(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
) -> None:
    # A punch frees only the whole filesystem blocks inside its range: with records not a
    # multiple of 4 KiB, records punched one at a time each leave the blocks they share with
    # their neighbours allocated, and the disk holds more than the accounting admits.
    page = 6000  # stored: 10096 bytes, not a multiple of 4096
    stored = page + HEADER_SIZE
    b = make_backend(page_bytes=page, max_bytes=8 * stored)
    b.open()
    first = [key_of(i, "blocks") for i in range(8)]
    assert b.put(first, [memoryview(payload_of(k, page)) for k in first]) == [PageStatus.OK] * 8
    for i in range(8, 15):  # each put evicts one page of the first batch
        key = key_of(i, "blocks")
        assert b.put([key], [memoryview(payload_of(key, page))]) == [PageStatus.OK]
    assert b.used_bytes <= 8 * stored
    files = [p for p in Path(b.layout.ns_dir).glob("*/*") if not p.name.startswith(".")]
    allocated = sum(p.stat().st_blocks * 512 for p in files)
    # as one file per page: each live page rounded up to whole blocks (plus one extent block)
    rounded = -(-stored // 4096) * 4096
    assert allocated <= 8 * rounded + 4096, (allocated, len(files))
    b.close()


@pytest.mark.parametrize("eviction", [EvictionPolicy.LRU, EvictionPolicy.PREDICTED_REUSE])
def test_put_batches_are_one_pack_with_the_room_made_batch_by_batch(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
    eviction: EvictionPolicy,
) -> None:
    """Puts handed over together (``put_batches``) are written as one pack, and each batch makes
    room as its own put would: the second batch may evict the first's pages, which this very
    call then drops and reports evicted. The same puts one by one leave the same pages."""

    def views(keys: list[str]) -> list[memoryview]:
        return [memoryview(payload_of(k, PAGE)) for k in keys]

    first = [key_of(i, "first") for i in range(4)]
    second = [key_of(i, "second") for i in range(2)]
    together = make_backend(
        namespace="together", page_bytes=PAGE, max_bytes=4 * STORED, eviction=eviction
    )
    one_by_one = make_backend(
        namespace="apart", page_bytes=PAGE, max_bytes=4 * STORED, eviction=eviction
    )
    together.open()
    one_by_one.open()
    try:
        ok = PageStatus.OK
        assert together.put_batches([(first, views(first)), (second, views(second))]) == [
            [ok] * 4,
            [ok] * 2,
        ]
        assert len(_packs(together)) == 1
        assert _put(one_by_one, first, payload_of) == [ok] * 4
        assert _put(one_by_one, second, payload_of) == [ok] * 2
        assert len(_packs(one_by_one)) == 2
        kept = one_by_one.exists(first + second)
        # a 4-page tier: the second batch evicted two of the first's pages (its tail first)
        assert kept == [True, True, False, False, True, True]
        assert together.exists(first + second) == kept
        gone = [k for k, there in zip(first + second, kept, strict=True) if not there]
        assert sorted(together.take_evicted()) == sorted(gone)
        assert together.used_bytes == one_by_one.used_bytes == 4 * STORED
        live = [k for k in first + second if k not in gone]
        statuses, bufs = _read(together, live)
        assert statuses == [ok] * 4
        assert [bytes(x) for x in bufs] == [payload_of(k, PAGE) for k in live]
    finally:
        together.close()
        one_by_one.close()
