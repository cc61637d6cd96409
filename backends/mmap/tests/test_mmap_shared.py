"""Several writers on one slot file: processes (OFD locks) and threads (thread locks), with
eviction racing reads. A reader gets the whole page it asked for or ``NOT_FOUND``: never a torn
page, another key's page, or a mix of two writers' versions."""

from __future__ import annotations

import json
import multiprocessing
import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hicache_mmap import MmapBackend, MmapOptions

from hicache.errors import BackendError
from hicache.storage import BackendContext, PageStatus
from hicache.testing.kit import kit_key, page_pattern
from hicache.testing.wait import wait_for

PAGE = 64 * 1024
_FORK = multiprocessing.get_context("fork")


def _backend(path: Path, slots: int, *, assoc: int = 8, namespace: str = "shared") -> MmapBackend:
    options = MmapOptions(
        path=str(path), capacity=slots * (4096 + PAGE), associativity=assoc, prefault=False
    )
    backend = MmapBackend(options, BackendContext(PAGE, namespace))
    backend.open()
    return backend


def _variant_of(key: str, buf: bytes | bytearray, variants: range) -> int | None:
    for v in variants:
        if buf == page_pattern(key, PAGE, v):
            return v
    return None


def _peer(path: Path, me: int, seconds: float, out: Path, start: Any, seen: list[Any]) -> None:
    """One of two processes: put own keys and shared keys, read the other's (forked child).
    ``seen[p]`` is set once peer ``p`` has read a page the other wrote."""
    report: dict[str, Any] = {"errors": [], "seen_other": 0, "puts": 0, "reads": 0}
    try:
        backend = _backend(path, 96)
        rng = random.Random(me)
        other = 1 - me
        start.wait(30)
        began = time.monotonic()
        deadline = began + seconds
        # On a loaded machine one peer may get the CPU late: go on (bounded) until both have
        # read at least one page the other wrote, which is what the test is about. A peer that
        # stopped at its own deadline would leave the other nothing to read: the other's own
        # puts soon evict the stopped peer's pages from the small file.
        hard_deadline = began + max(10 * seconds, 60.0)
        i = 0
        dst = memoryview(bytearray(PAGE))
        while time.monotonic() < deadline or (
            not all(s.is_set() for s in seen) and time.monotonic() < hard_deadline
        ):
            # Own key, and a key both processes race to create (each with its own variant).
            own = kit_key(i, f"peer-{me}")
            both = kit_key(i % 50, "both")
            backend.put([own], [memoryview(page_pattern(own, PAGE, me))])
            backend.put([both], [memoryview(page_pattern(both, PAGE, me))])
            report["puts"] += 2
            for _ in range(3):
                j = rng.randrange(max(1, i))
                key = rng.choice([kit_key(j, f"peer-{other}"), kit_key(j % 50, "both")])
                [status] = backend.get_into([key], [dst])
                report["reads"] += 1
                if status is PageStatus.NOT_FOUND:
                    continue
                variant = _variant_of(key, dst, range(2))
                if status is not PageStatus.OK or variant is None:
                    report["errors"].append(f"{key}: {status}, variant {variant}")
                elif key == kit_key(j, f"peer-{other}"):
                    report["seen_other"] += 1
                    seen[me].set()
                    if variant != other:
                        report["errors"].append(f"{key}: written by {other}, read variant {me}")
            i += 1
        backend.close()
    except BaseException as exc:
        report["errors"].append(repr(exc))
    out.write_text(json.dumps(report))


def test_two_processes_write_and_read_one_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.slots"
    _backend(path, 96).close()  # create it once so both peers map the same geometry
    start = _FORK.Event()
    seen = [_FORK.Event(), _FORK.Event()]
    outs = [tmp_path / f"peer{me}.json" for me in (0, 1)]
    peers = [
        _FORK.Process(target=_peer, args=(path, me, 2.0, outs[me], start, seen)) for me in (0, 1)
    ]
    for peer in peers:
        peer.start()
    start.set()
    for peer in peers:
        peer.join(120)
    hung = [me for me, peer in enumerate(peers) if peer.exitcode is None]
    for me in hung:  # never leave a stuck child behind; say which one stuck
        peers[me].kill()
        peers[me].join(10)
    assert not hung, f"peers {hung} still running after 120 s (forked from a threaded pytest?)"
    assert [peer.exitcode for peer in peers] == [0, 0]
    reports = [json.loads(out.read_text()) for out in outs]
    print({k: [r[k] for r in reports] for k in ("puts", "reads", "seen_other")})
    for me, report in enumerate(reports):
        assert report["errors"] == [], f"peer {me}: {report['errors'][:5]}"
        assert report["seen_other"] > 0, f"peer {me} never read a page of the other: {report}"
    # Afterwards a third opener finds every resident page intact, and each shared key holds
    # exactly one of the two versions (create-only across processes).
    backend = _backend(path, 96)
    try:
        dst = bytearray(PAGE)
        pages = list(backend.iter_pages())
        assert pages
        for page in pages:
            assert backend.get_into([page.key], [memoryview(dst)]) == [PageStatus.OK]
            assert _variant_of(page.key, dst, range(2)) is not None, page.key
    finally:
        backend.close()


def test_writes_of_three_times_capacity_stay_bounded(tmp_path: Path) -> None:
    path = tmp_path / "bounded.slots"
    backend = _backend(path, 64)
    try:
        file_size = path.stat().st_size
        num_slots = backend.stats()["num_slots"]
        keys = [kit_key(i, "bounded") for i in range(3 * num_slots)]
        for start in range(0, len(keys), 16):
            batch = keys[start : start + 16]
            statuses = backend.put(batch, [memoryview(page_pattern(k, PAGE)) for k in batch])
            assert statuses == [PageStatus.OK] * len(batch)
        stats = backend.stats()
        assert stats["used_slots"] <= num_slots
        assert stats["used_bytes"] <= stats["capacity_bytes"]
        assert path.stat().st_size == file_size
        evicted = backend.take_evicted()
        assert len(set(evicted)) == len(evicted)
        resident = [k for k, present in zip(keys, backend.exists(keys), strict=True) if present]
        assert len(resident) == len(keys) - len(evicted) <= num_slots
        assert set(resident).isdisjoint(evicted)
        dst = bytearray(b"\xa5") * PAGE
        for key in evicted[:20]:
            assert backend.get_into([key], [memoryview(dst)]) == [PageStatus.NOT_FOUND]
        assert dst == bytearray(b"\xa5") * PAGE
        for key in resident:
            assert backend.get_into([key], [memoryview(dst)]) == [PageStatus.OK]
            assert dst == page_pattern(key, PAGE)
    finally:
        backend.close()


@pytest.fixture
def fast_switches() -> Iterator[None]:
    # Switch threads often, so readers get interrupted between their generation reads.
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


@pytest.mark.usefixtures("fast_switches")
def test_reads_racing_eviction_never_return_wrong_bytes(tmp_path: Path) -> None:
    path = tmp_path / "race.slots"
    backend = _backend(path, 16, assoc=4)
    stop = threading.Event()
    written: list[str] = []
    errors: list[str] = []
    outcomes = {"ok": 0, "not_found": 0}

    def writer(tid: int) -> None:
        i = 0
        while not stop.is_set():
            key = kit_key(i, f"race-w{tid}")
            backend.put([key], [memoryview(page_pattern(key, PAGE))])
            written.append(key)
            i += 1

    def reader(tid: int) -> None:
        rng = random.Random(tid)
        dst = memoryview(bytearray(PAGE))
        while not stop.is_set():
            if not written:
                continue
            key = written[-rng.randrange(1, min(len(written), 40) + 1)]
            [status] = backend.get_into([key], [dst])
            if status is PageStatus.OK:
                outcomes["ok"] += 1
                if dst != page_pattern(key, PAGE):
                    errors.append(f"wrong bytes for {key}")
            elif status is PageStatus.NOT_FOUND:
                outcomes["not_found"] += 1
            else:
                errors.append(f"{key}: {status}")

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(2)]
    threads += [threading.Thread(target=reader, args=(t,)) for t in range(3)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        # Race for at least two seconds and until reads have met both outcomes and evictions
        # happened (a loaded machine may starve some thread for a while); stop at an error.
        wait_for(
            lambda: (
                bool(errors)
                or (
                    time.monotonic() - began >= 2.0
                    and outcomes["ok"] >= 100
                    and outcomes["not_found"] >= 20
                    and backend.stats()["evictions"] > 0
                )
            ),
            timeout=120,
            what=f"both read outcomes under eviction (so far {outcomes})",
        )
    finally:
        stop.set()
    for thread in threads:
        thread.join()
    stats = backend.stats()
    backend.close()
    assert not errors, errors[:5]
    assert outcomes["ok"] > 0 and outcomes["not_found"] > 0, outcomes
    assert stats["evictions"] > 0
    print(f"race outcomes {outcomes}, detected races {stats['races']}")


def _reader_with_page_size(path: Path, page_bytes: int, keys: list[str], out: Path) -> None:
    """Another process opens the file with another page size and reads the keys (forked)."""
    report: dict[str, Any] = {}
    try:
        options = MmapOptions(path=str(path), capacity=96 * (4096 + PAGE), prefault=False)
        backend = MmapBackend(options, BackendContext(page_bytes, "shared"))
        try:
            backend.open()
        except Exception as exc:
            report["open_error"] = f"{type(exc).__name__}: {exc}"
        else:
            dst = memoryview(bytearray(page_bytes))
            report["statuses"] = [backend.get_into([k], [dst])[0].value for k in keys]
            backend.close()
        # With the file's own page size this process reads every page.
        right = _backend(path, 96)
        whole = bytearray(PAGE)
        report["intact"] = [
            right.get_into([k], [memoryview(whole)]) == [PageStatus.OK]
            and whole == page_pattern(k, PAGE)
            for k in keys
        ]
        right.close()
    except BaseException as exc:
        report["crash"] = repr(exc)
    out.write_text(json.dumps(report))


@pytest.mark.parametrize("page_bytes", [PAGE - 100, PAGE // 2], ids=["same-slot", "smaller"])
def test_reader_with_another_page_size_is_refused_and_destroys_nothing(
    tmp_path: Path, page_bytes: int
) -> None:
    path = tmp_path / "geometry.slots"
    writer = _backend(path, 96)
    try:
        keys = [kit_key(i, "geometry") for i in range(16)]
        assert writer.put(keys, [memoryview(page_pattern(k, PAGE)) for k in keys]) == [
            PageStatus.OK
        ] * len(keys)
        out = tmp_path / "reader.json"
        reader = _FORK.Process(target=_reader_with_page_size, args=(path, page_bytes, keys, out))
        reader.start()
        reader.join(60)
        if reader.exitcode is None:
            reader.kill()
            reader.join(10)
        assert reader.exitcode == 0
        report = json.loads(out.read_text())
        assert "open_error" in report, f"opened with page_bytes={page_bytes}: {report}"
        message = report["open_error"]
        assert message.startswith("BackendError: ")
        assert f"page_bytes={PAGE}" in message and f"page_bytes={page_bytes}" in message
        assert report["intact"] == [True] * len(keys)
        # Every page of the writer is still there and reads back intact, in both processes.
        dst = bytearray(PAGE)
        for key in keys:
            assert writer.get_into([key], [memoryview(dst)]) == [PageStatus.OK]
            assert dst == page_pattern(key, PAGE)
        assert writer.stats()["corrupt"] == 0
    finally:
        writer.close()
    again = _backend(path, 96)
    try:
        assert again.exists(keys) == [True] * len(keys)
    finally:
        again.close()


def _read_only_with_page_size(path: Path, page_bytes: int, keys: list[str], out: Path) -> None:
    """Another process opens the file read-only with another page size, as ``hicache storage
    du|verify`` do: it lists and verifies the pages, and its own gets miss (forked)."""
    from hicache.tools.ops import TierHandle, disk_usage, list_namespaces, verify_namespace

    report: dict[str, Any] = {}
    try:
        # capacity and associativity differ from the writer's too: the file's own are adopted
        options = MmapOptions(path=str(path), capacity=32 * (4096 + page_bytes), associativity=4)

        def make(size: int, namespace: str, read_only: bool) -> MmapBackend:
            return MmapBackend(options, BackendContext(size, namespace, read_only=read_only))

        reader = make(page_bytes, "shared", True)
        reader.open()
        try:
            dst = bytearray([0xA5]) * page_bytes
            report["exists"] = reader.exists(keys)
            scratch = [memoryview(bytearray(page_bytes)) for _ in keys]
            report["statuses"] = [s.value for s in reader.get_into(keys, scratch)]
            report["single"] = reader.get_into(keys[:1], [memoryview(dst)])[0].value
            report["dst_untouched"] = dst == bytearray([0xA5]) * page_bytes
            report["listed"] = sorted((p.key, p.payload_bytes) for p in reader.iter_pages())
            stats = reader.stats()
            report["other_size"] = [stats["other_size_reads"], stats["other_size_pages"]]
            report["pages"] = stats["pages"]
            report["corrupt"] = stats["corrupt"]
            report["num_slots"] = stats["num_slots"]
        finally:
            reader.close()
        handle = TierHandle("shm", "mmap", True, make, page_bytes)
        report["namespaces"] = list_namespaces(handle)
        usage = disk_usage(handle, ["shared"])
        report["du"] = [usage[0].pages, usage[0].stored_bytes]
        verified = verify_namespace(handle, "shared")
        report["verify"] = [verified.ok, len(verified.corrupt), verified.vanished]
    except BaseException as exc:
        report["crash"] = repr(exc)
    out.write_text(json.dumps(report))


def test_read_only_open_of_another_page_size_adopts_the_file(tmp_path: Path) -> None:
    path = tmp_path / "geometry.slots"
    writer = _backend(path, 96)
    try:
        slots = writer.stats()["num_slots"]
        keys = [kit_key(i, "adopt") for i in range(16)]
        pages = [page_pattern(k, PAGE) for k in keys]
        assert writer.put(keys, [memoryview(p) for p in pages]) == [PageStatus.OK] * len(keys)
        out = tmp_path / "reader.json"
        reader = _FORK.Process(target=_read_only_with_page_size, args=(path, PAGE // 2, keys, out))
        reader.start()
        reader.join(120)
        if reader.exitcode is None:
            reader.kill()
            reader.join(10)
        assert reader.exitcode == 0
        report = json.loads(out.read_text())
        assert "crash" not in report, report
        assert report["num_slots"] == slots, "the file's geometry was not adopted"
        assert report["exists"] == [False] * len(keys)
        assert report["statuses"] == [PageStatus.NOT_FOUND.value] * len(keys)
        assert report["single"] == PageStatus.NOT_FOUND.value and report["dst_untouched"]
        assert report["other_size"] == [len(keys) + 1, len(keys)] and report["pages"] == 0
        assert report["corrupt"] == 0
        assert report["listed"] == sorted([k, PAGE] for k in keys)
        assert report["namespaces"] == ["shared"]
        assert report["du"] == [len(keys), len(keys) * writer.stats()["slot_bytes"]]
        assert report["verify"] == [len(keys), 0, 0]  # read back at the pages' own size
        # The writer's pages are all still there and intact.
        dst = bytearray(PAGE)
        for key, page in zip(keys, pages, strict=True):
            assert writer.get_into([key], [memoryview(dst)]) == [PageStatus.OK]
            assert dst == page
        assert writer.stats()["corrupt"] == 0
    finally:
        writer.close()
    # A writable open with another page size is still refused, naming both geometries.
    options = MmapOptions(path=str(path), capacity=96 * (4096 + PAGE), prefault=False)
    other = MmapBackend(options, BackendContext(PAGE // 2, "shared"))
    with pytest.raises(
        BackendError, match=rf"page_bytes={PAGE}, .* asks for page_bytes={PAGE // 2}"
    ):
        other.open()
    again = _backend(path, 96)
    try:
        assert again.exists(keys) == [True] * len(keys)
    finally:
        again.close()
