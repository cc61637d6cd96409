"""Damaged files and hostile headers: every access stays inside the mapping, every failure is a
status or a clear ``BackendError``; plus locking, fork and geometry rules."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import random
import struct
from pathlib import Path
from typing import Any

import pytest
import xxhash
from hicache_mmap import MmapBackend, MmapOptions
from hicache_mmap.layout import BODY_OFFSET, HEADER_USED, HSUM_OFFSET, SUPERBLOCK_SIZE
from hicache_mmap.locks import F_OFD_SETLK, LOCK_BASE
from hicache_mmap.raw import find_slot, slot_file
from hypothesis import given, settings
from hypothesis import strategies as st

from hicache.errors import BackendError
from hicache.storage import BackendContext, PageStatus
from hicache.testing.kit import kit_key, page_pattern
from hicache.tools.benchmark import BenchSpec, run_storage_bench

PAGE = 16 * 1024
_U64 = struct.Struct("<Q")


def _options(path: Path, **extra: Any) -> MmapOptions:
    base: dict[str, Any] = {
        "path": str(path),
        "capacity": 32 * (4096 + PAGE),
        "associativity": 8,
        "prefault": False,
    }
    base.update(extra)
    return MmapOptions(**base)


def _backend(path: Path, namespace: str = "robust", **extra: Any) -> MmapBackend:
    backend = MmapBackend(_options(path, **extra), BackendContext(PAGE, namespace))
    backend.open()
    return backend


def _fill(backend: MmapBackend, count: int, salt: str) -> list[str]:
    keys = [kit_key(i, salt) for i in range(count)]
    backend.put(keys, [memoryview(page_pattern(k, PAGE)) for k in keys])
    return [k for k, present in zip(keys, backend.exists(keys), strict=True) if present]


def _write_header(backend: MmapBackend, slot: int, body: bytes, *, valid_sum: bool) -> None:
    """Overwrite slot ``slot``'s header body, optionally with a checksum that matches it."""
    file = slot_file(backend)
    off = file.slot_offset(slot)
    (gen,) = _U64.unpack_from(file.mm, off)
    file.mm[off + BODY_OFFSET : off + HSUM_OFFSET] = body
    hsum = xxhash.xxh3_64_intdigest(body, gen) if valid_sum else random.getrandbits(64)
    _U64.pack_into(file.mm, off + HSUM_OFFSET, hsum)


@settings(max_examples=40, deadline=None)
@given(
    payload_len=st.one_of(
        st.sampled_from([0, 1, PAGE - 1, PAGE + 1, 2**31, 2**63, 2**64 - 1]),
        st.integers(0, 2**64 - 1),
    ),
    ns_len=st.integers(0, 255),
    valid_sum=st.booleans(),
    junk=st.binary(min_size=HSUM_OFFSET - BODY_OFFSET, max_size=HSUM_OFFSET - BODY_OFFSET),
)
def test_hostile_headers_stay_in_bounds(
    tmp_path_factory: pytest.TempPathFactory,
    payload_len: int,
    ns_len: int,
    valid_sum: bool,
    junk: bytes,
) -> None:
    path = tmp_path_factory.mktemp("hostile") / "h.slots"
    backend = _backend(path)
    try:
        keys = _fill(backend, 8, "hostile")
        victim, intact = keys[0], keys[1]
        slot = find_slot(backend, victim)
        # Keep magic, key and namespace (so the header still names the victim), then plant
        # the hostile length and namespace length; or, half the time, pure junk.
        file = slot_file(backend)
        off = file.slot_offset(slot)
        body = bytearray(file.mm[off + BODY_OFFSET : off + HSUM_OFFSET])
        if payload_len % 2:
            body[:] = junk
        _U64.pack_into(body, 8, payload_len)
        body[56] = ns_len
        _write_header(backend, slot, bytes(body), valid_sum=valid_sum)
        canary = bytearray(b"\xa5") * (PAGE + 128)
        dst = memoryview(canary)[64 : 64 + PAGE]
        [status] = backend.get_into([victim], [dst])
        assert status in (PageStatus.CORRUPT, PageStatus.NOT_FOUND)
        assert canary[:64] == b"\xa5" * 64 and canary[-64:] == b"\xa5" * 64
        assert backend.get_into([intact], [dst]) == [PageStatus.OK]
        assert dst == page_pattern(intact, PAGE)
        listed = list(backend.iter_pages())  # never raises, never lists a bad slot as ours
        assert intact in {p.key for p in listed}
        # A consistent header may claim another length (verify reports it); never an
        # impossible one.
        limit = slot_file(backend).geo.slot_payload
        assert all(p.payload_bytes is not None and p.payload_bytes <= limit for p in listed)
        backend.close()
        # A fresh scan treats the slot as free (or as the victim, if the header is still
        # consistent), and the set stays writable.
        backend = _backend(path)
        assert backend.get_into([intact], [dst]) == [PageStatus.OK]
        [status] = backend.get_into([victim], [dst])
        assert status in (PageStatus.CORRUPT, PageStatus.NOT_FOUND)
        more = [kit_key(i, "after-hostile") for i in range(40)]
        statuses = backend.put(more, [memoryview(page_pattern(k, PAGE)) for k in more])
        assert all(s.stored for s in statuses)
    finally:
        backend.close()


def test_random_garbage_in_every_header(tmp_path: Path) -> None:
    path = tmp_path / "garbage.slots"
    backend = _backend(path)
    _fill(backend, 24, "garbage")
    file = slot_file(backend)
    rng = random.Random(5)
    for slot in range(file.geo.num_slots):
        off = file.slot_offset(slot)
        file.mm[off : off + HEADER_USED] = rng.randbytes(HEADER_USED)
    backend.close()
    backend = _backend(path)
    try:
        assert list(backend.iter_pages()) == []
        keys = [kit_key(i, "garbage") for i in range(24)]
        dst = memoryview(bytearray(PAGE))
        for key in keys:
            assert backend.get_into([key], [dst]) in ([PageStatus.NOT_FOUND], [PageStatus.CORRUPT])
        assert all(
            s.stored for s in backend.put(keys, [memoryview(page_pattern(k, PAGE)) for k in keys])
        )
    finally:
        backend.close()


def test_damaged_superblock_or_size_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "super.slots"
    _backend(path).close()
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(40)
        byte = f.read(1)
        f.seek(40)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BackendError, match="not a usable slot file"):
        _backend(path)
    path.unlink()
    _backend(path).close()
    os.truncate(path, size - 4096)  # a file cut short must never be mapped past its end
    with pytest.raises(BackendError, match="not a usable slot file"):
        _backend(path)
    other = tmp_path / "not-ours.bin"
    other.write_bytes(b"some other file" + bytes(SUPERBLOCK_SIZE))
    with pytest.raises(BackendError, match="refusing to overwrite"):
        _backend(other)
    assert other.read_bytes().startswith(b"some other file")


def test_set_locked_by_another_process_times_out_as_failed(tmp_path: Path) -> None:
    path = tmp_path / "locked.slots"
    backend = _backend(path, lock_timeout_s=0.2)
    try:
        key = kit_key(0, "locked")
        s = int(key[:16], 16) % slot_file(backend).geo.num_sets
        # Another open file description conflicts exactly like another process would.
        fd = os.open(path, os.O_RDWR)
        try:
            lock = struct.pack("@hh4xqqi4x", fcntl.F_WRLCK, 0, LOCK_BASE + 1 + s, 1, 0)
            fcntl.fcntl(fd, F_OFD_SETLK, lock)
            assert backend.put([key], [memoryview(page_pattern(key, PAGE))]) == [PageStatus.FAILED]
            assert backend.exists([key]) == [False]
        finally:
            os.close(fd)  # the lock goes with the file description
        assert backend.put([key], [memoryview(page_pattern(key, PAGE))]) == [PageStatus.OK]
        assert backend.stats()["lock_timeouts"] == 1
    finally:
        backend.close()


def _put_in_child(backend: MmapBackend, out: Any) -> None:
    key = kit_key(0, "forked")
    try:
        backend.put([key], [memoryview(page_pattern(key, PAGE))])
        out.put("no error")
    except BackendError as exc:
        out.put(str(exc))


def test_use_after_fork_is_refused(tmp_path: Path) -> None:
    backend = _backend(tmp_path / "fork.slots")
    try:
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        child = ctx.Process(target=_put_in_child, args=(backend, out))
        child.start()
        message = out.get(timeout=30)
        child.join(30)
        assert "forked child" in message
    finally:
        backend.close()


def test_geometry_rebuilt_only_when_idle_and_empty(tmp_path: Path) -> None:
    path = tmp_path / "geometry.slots"
    first = _backend(path)
    slots = first.stats()["num_slots"]
    bigger = {"capacity": 64 * (4096 + PAGE)}
    with pytest.raises(BackendError, match=r"has geometry .* sets x 8 slots .* asks for"):
        _backend(path, **bigger)  # the first still has it open: refused, not rebuilt
    assert first.stats()["num_slots"] == slots
    first.close()
    third = _backend(path, **bigger)  # idle and empty: rebuilt as asked
    assert third.stats()["num_slots"] == 64
    keys = _fill(third, 4, "geometry")
    third.close()
    with pytest.raises(BackendError, match="never rebuilt"):
        _backend(path)  # idle but holding pages: refused, and the pages kept
    with pytest.raises(BackendError, match="never rebuilt"):
        _backend(path, **bigger, associativity=4)
    fourth = _backend(path, **bigger)
    try:
        assert fourth.stats()["num_slots"] == 64
        assert fourth.exists(keys) == [True] * len(keys)
    finally:
        fourth.close()


def test_slot_file_of_another_version_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "version.slots"
    _backend(path).close()
    for version, who in ((1, "an older"), (3, "a newer")):
        with open(path, "r+b") as f:
            f.seek(8)
            f.write(struct.pack("<I", version))
        before = path.read_bytes()
        with pytest.raises(
            BackendError, match=f"written by {who} hicache .*file version {version}"
        ):
            _backend(path)
        assert path.read_bytes() == before


def test_read_only_instance_over_missing_file_reads_empty(tmp_path: Path) -> None:
    options = _options(tmp_path / "missing.slots")
    backend = MmapBackend(options, BackendContext(PAGE, "robust", read_only=True))
    backend.open()
    try:
        key = kit_key(0, "missing")
        assert backend.exists([key]) == [False]
        assert list(backend.iter_namespaces()) == []
    finally:
        backend.close()
    assert not (tmp_path / "missing.slots").exists()


def test_create_false_on_missing_file_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="does not exist and create is false"):
        _backend(tmp_path / "absent.slots", create=False)


def test_listing_and_namespaces(tmp_path: Path) -> None:
    path = tmp_path / "list.slots"
    a = _backend(path, namespace="ns-a")
    b = _backend(path, namespace="ns-b")
    try:
        keys_a = _fill(a, 3, "a")
        keys_b = _fill(b, 2, "b")
        assert {p.key for p in a.iter_pages()} == set(keys_a)
        assert {p.key for p in b.iter_pages()} == set(keys_b)
        assert set(a.iter_namespaces()) == {"ns-a", "ns-b"}
        assert b.exists(keys_a) == [False] * len(keys_a)
    finally:
        a.close()
        b.close()


def test_bench_quick_run_against_raw_mapping(tmp_path: Path) -> None:
    options = _options(tmp_path / "bench.slots", capacity="8MiB")

    def make_backend(page_bytes: int, namespace: str) -> MmapBackend:
        return MmapBackend(options, BackendContext(page_bytes, namespace))

    report = run_storage_bench(
        make_backend=make_backend,
        make_baseline=lambda b: MmapBackend.bench_baseline(b.config, b.context),
        spec=BenchSpec(page_bytes=(64 * 1024,), total_bytes=2 << 20, threads=(1, 2)),
        tier="shm",
        backend_kind="mmap",
    )
    assert "mapping" in report.baseline
    for run in report.runs:
        assert not run.problems, run.problems
        for name in ("put", "get_hot", "exists"):
            figure = run.figure(name)
            assert figure.value is not None and figure.value > 0
            assert figure.ratio is not None and figure.ratio > 0
    assert not list(tmp_path.glob("*.bench-raw-*")), "the raw baseline left its file behind"


def test_stored_checksum_is_the_page_format_checksum(tmp_path: Path) -> None:
    from hicache_mmap.layout import SlotState, decode_slot_header
    from hicache_mmap.raw import flip_payload_byte

    from hicache.storage import COPY_CHUNK, payload_checksum

    # A page larger than one copy chunk and not a multiple of it: the fused copy+hash must
    # still produce the one-shot xxh3 of the whole page, and check its last, short piece too.
    page_bytes = 2 * COPY_CHUNK + 4096 + 7
    options = _options(tmp_path / "sum.slots", capacity=8 * (4096 + 2 * page_bytes))
    backend = MmapBackend(options, BackendContext(page_bytes, "robust"))
    backend.open()
    try:
        key = kit_key(0, "sum")
        page = random.Random(3).randbytes(page_bytes)
        assert backend.put([key], [memoryview(page)]) == [PageStatus.OK]
        file = slot_file(backend)
        header = decode_slot_header(file.header(find_slot(backend, key)), file.geo.slot_payload)
        assert header.state is SlotState.USED
        assert header.payload_len == page_bytes
        assert header.checksum == payload_checksum(page)
        dst = bytearray(page_bytes)
        assert backend.get_into([key], [memoryview(dst)]) == [PageStatus.OK]
        assert dst == page
        flip_payload_byte(backend, key, page_bytes - 1)
        assert backend.get_into([key], [memoryview(dst)]) == [PageStatus.CORRUPT]
    finally:
        backend.close()


def test_corrupt_page_is_freed_and_can_be_stored_again(tmp_path: Path) -> None:
    from hicache_mmap.raw import flip_payload_byte

    backend = _backend(tmp_path / "heal.slots")
    try:
        [key] = _fill(backend, 1, "heal")
        flip_payload_byte(backend, key)
        dst = bytearray(PAGE)
        assert backend.get_into([key], [memoryview(dst)]) == [PageStatus.CORRUPT]
        assert backend.exists([key]) == [False]
        assert backend.put([key], [memoryview(page_pattern(key, PAGE))]) == [PageStatus.OK]
        assert backend.get_into([key], [memoryview(dst)]) == [PageStatus.OK]
        assert dst == page_pattern(key, PAGE)
        assert backend.stats()["corrupt"] == 1
    finally:
        backend.close()


def test_scanbench_reopens_a_filled_file_and_reports_its_scan_rate(tmp_path: Path) -> None:
    from hicache_mmap.scanbench import main, measure

    figures = measure(str(tmp_path / "scan.slots"), 64 * 8192, 4096, reopens=2)
    assert figures["slots"] > 0
    assert 0 < figures["used_slots"] <= figures["slots"]
    assert len(figures["scan_slots_per_second_each"]) == 2
    assert figures["scan_slots_per_second"] > 0
    # The command prints the same figures and leaves no scratch file behind.
    scratch = tmp_path / "cli"
    scratch.mkdir()
    argv = ["--capacity", str(64 * 8192), "--page-bytes", "4096", "--reopens", "1"]
    assert main([*argv, "--dir", str(scratch)]) == 0
    assert list(scratch.iterdir()) == []
