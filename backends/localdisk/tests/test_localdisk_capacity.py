"""Capacity: usage stays under max_bytes, chains are evicted tail first, restarts keep both."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from hicache_localdisk import LocalDiskBackend

from hicache.storage import HEADER_SIZE, EvictionPolicy, PageStatus

PAGE = 16384
STORED = PAGE + HEADER_SIZE
CHAIN = 8
#: the conftest fixture ``disk_bytes``: (bytes, pages) on disk under a namespace directory
DiskBytes = Callable[[Path, int], tuple[int, int]]


def _file_of(backend: LocalDiskBackend, key: str) -> Path:
    """The file holding ``key``: its pack, or its page file."""
    record = backend.record_of(key)
    return Path(record[0] if record is not None else backend.page_path(key))


def _assert_prefix_closed(backend: LocalDiskBackend, chain: list[str]) -> int:
    n = backend.exists_prefix(chain)
    assert backend.exists(chain) == [True] * n + [False] * (len(chain) - n), "a chain lost its head"
    return n


@pytest.mark.parametrize("eviction", list(EvictionPolicy))
def test_three_times_capacity_stays_bounded_and_chains_keep_their_heads(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
    eviction: EvictionPolicy,
    disk_bytes: DiskBytes,
) -> None:
    cap_pages = 5 * CHAIN + 3  # not a whole number of chains: some chain is always cut
    backend = make_backend(max_bytes=cap_pages * STORED, eviction=eviction.value)
    backend.open()
    chains = [[key_of(i, f"chain{c}") for i in range(CHAIN)] for c in range(17)]
    assert len(chains) * CHAIN >= 3 * cap_pages
    hot = chains[0]
    bufs = [memoryview(bytearray(PAGE)) for _ in range(CHAIN)]
    partial_seen = 0
    evicted: list[str] = []
    for c, chain in enumerate(chains):
        statuses = backend.put(chain, [memoryview(payload_of(k)) for k in chain])
        assert statuses == [PageStatus.OK] * CHAIN
        # The hot chain is requested again after every write (a prefix prefetch touches it).
        assert backend.get_into(hot, bufs) == [PageStatus.OK] * CHAIN
        assert backend.used_bytes <= backend.max_bytes
        assert disk_bytes(Path(backend.layout.ns_dir), PAGE)[0] <= backend.max_bytes
        for older in chains[: c + 1]:
            n = _assert_prefix_closed(backend, older)
            partial_seen += 0 < n < CHAIN
        evicted += backend.take_evicted()
    assert partial_seen > 0, "eviction never cut a chain: the test did not exercise tail-first"
    assert backend.exists(hot) == [True] * CHAIN
    stored = {
        k for chain in chains for k, ok in zip(chain, backend.exists(chain), strict=True) if ok
    }
    assert len(stored) == cap_pages
    assert set(evicted) == {k for chain in chains for k in chain} - stored
    backend.close()

    # After a restart the recency rebuilt from mtimes still knows the hot chain was used last.
    backend = make_backend(max_bytes=cap_pages * STORED)
    backend.open()
    assert backend.used_bytes == cap_pages * STORED
    last_written = chains[-1]
    fresh = [[key_of(i, f"fresh{c}") for i in range(CHAIN)] for c in range(4)]
    for chain in fresh:  # 32 new pages: only 11 older ones can stay
        backend.put(chain, [memoryview(payload_of(k)) for k in chain])
    assert backend.exists(hot) == [True] * CHAIN
    # Written just before the hot chain's last use: only its head fits in what is left.
    assert _assert_prefix_closed(backend, last_written) == cap_pages - 4 * CHAIN - CHAIN
    assert disk_bytes(Path(backend.layout.ns_dir), PAGE)[0] <= backend.max_bytes
    backend.close()


def test_reopen_with_smaller_capacity_evicts_tails_first(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
    disk_bytes: DiskBytes,
) -> None:
    backend = make_backend(max_bytes=4 * CHAIN * STORED)
    backend.open()
    chains = [[key_of(i, f"c{c}") for i in range(CHAIN)] for c in range(4)]
    for chain in chains:
        backend.put(chain, [memoryview(payload_of(k)) for k in chain])
    backend.close()
    small = make_backend(max_bytes=(2 * CHAIN + 3) * STORED)
    small.open()
    assert disk_bytes(Path(small.layout.ns_dir), PAGE)[0] <= small.max_bytes
    # The two newest chains survive whole; the next one keeps its head three pages.
    assert [_assert_prefix_closed(small, chain) for chain in chains] == [0, 3, CHAIN, CHAIN]
    assert len(small.take_evicted()) == 2 * CHAIN - 3
    small.close()


def test_default_max_bytes_is_a_fraction_of_free_space(
    make_backend: Callable[..., LocalDiskBackend], tmp_path: Path
) -> None:
    backend = make_backend()
    backend.open()
    free = shutil.disk_usage(tmp_path).free
    assert 0 < backend.max_bytes <= free
    backend.close()


def test_pages_and_dirs_are_owner_only_unless_configured(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
) -> None:
    key = key_of(0)
    backend = make_backend()
    backend.open()
    backend.put([key], [memoryview(payload_of(key))])
    path = _file_of(backend, key)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert Path(backend.layout.ns_dir).stat().st_mode & 0o777 == 0o700
    assert Path(backend.layout.root).stat().st_mode & 0o777 == 0o700
    backend.close()

    shared = make_backend(namespace="grp", file_mode="0640", dir_mode="0750")
    shared.open()
    shared.put([key], [memoryview(payload_of(key))])
    path = _file_of(shared, key)
    assert path.stat().st_mode & 0o777 == 0o640
    assert path.parent.stat().st_mode & 0o777 == 0o750
    shared.close()


def test_foreign_files_and_symlinks_are_never_served(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
    tmp_path: Path,
) -> None:
    key, other = key_of(1), key_of(2)
    backend = make_backend(pack_below=0)  # page files named by their keys
    backend.open()
    backend.put([key], [memoryview(payload_of(key))])
    backend.close()
    # A page copied under another key's name and a symlink pointing outside the root.
    os.link(backend.page_path(key), backend.page_path(other))
    outside = tmp_path / "outside"
    outside.write_bytes(b"x" * STORED)
    planted = key_of(3)
    os.symlink(outside, backend.page_path(planted))
    backend = make_backend(pack_below=0)
    backend.open()
    assert backend.exists([key, other, planted]) == [True, True, False]
    statuses = backend.get_into([other], [memoryview(bytearray(PAGE))])
    assert statuses == [PageStatus.CORRUPT]
    assert not os.path.exists(backend.page_path(other))
    assert backend.stats()["corrupt"] == 1
    assert outside.read_bytes() == b"x" * STORED
    backend.close()


@pytest.mark.parametrize("pack_below", ["256KiB", 0])
def test_concurrent_writers_keep_accounting_exact(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
    disk_bytes: DiskBytes,
    pack_below: str | int,
) -> None:
    backend = make_backend(max_bytes=24 * STORED, io_threads=3, pack_below=pack_below)
    backend.open()
    keys = [key_of(i, "cc") for i in range(60)]
    errors: list[BaseException] = []
    mismatches: list[str] = []
    rounds = 15

    def check(where: str) -> None:
        """No call in flight: accounting, the files and exists() must all agree."""
        on_disk = disk_bytes(Path(backend.layout.ns_dir), PAGE)[0]
        present = sum(backend.exists(keys))
        if not (backend.used_bytes == on_disk == present * STORED <= backend.max_bytes):
            mismatches.append(
                f"{where}: used {backend.used_bytes}, on disk {on_disk}, "
                f"{present} pages present, max {backend.max_bytes}"
            )

    # Every writer finishes a round before any starts the next: a check between rounds sees
    # no put in flight, and a page miscounted late in any round cannot be evicted unnoticed.
    between = threading.Barrier(4, action=lambda: check("between rounds"))

    def writer(t: int) -> None:
        try:
            for r in range(rounds):
                # Overlapping key ranges: the same page is often written by two threads at once.
                batch = [keys[(t * 7 + r * 3 + i) % 60] for i in range(4)]
                statuses = backend.put(batch, [memoryview(payload_of(k)) for k in batch])
                assert all(s.stored for s in statuses), statuses
                assert (
                    disk_bytes(Path(backend.layout.ns_dir), PAGE)[0]
                    <= backend.max_bytes + 4 * 4 * STORED
                )
                between.wait()
        except BaseException as exc:
            errors.append(exc)
            between.abort()

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    assert not mismatches, mismatches
    check("at the end")
    assert not mismatches, mismatches
    backend.close()
