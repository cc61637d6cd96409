"""What ``open()`` does with what it finds: temporaries, damaged files, other page sizes."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hicache_localdisk import LocalDiskBackend
from hicache_localdisk.layout import TEMP_PREFIX

from hicache.errors import BackendUnavailableError
from hicache.storage import HEADER_SIZE, PageStatus


@pytest.fixture
def make_backend(make_backend: Callable[..., LocalDiskBackend]) -> Callable[..., LocalDiskBackend]:
    """One file per page (``pack_below: 0``): these tests plant and damage page files."""
    return functools.partial(make_backend, pack_below=0)


PAGE = 16384


def _put(backend: LocalDiskBackend, keys: list[str], payload_of: Callable[..., bytes]) -> None:
    size = backend.context.page_bytes
    statuses = backend.put(keys, [memoryview(payload_of(k, size)) for k in keys])
    assert statuses == [PageStatus.OK] * len(keys)


def test_open_removes_dead_temporaries_and_keeps_live_ones(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
) -> None:
    backend = make_backend()
    backend.open()
    key = key_of(0)
    _put(backend, [key], payload_of)
    backend.close()
    fanout = Path(backend.layout.dir_of(key))
    # A temporary of this (live) process, one of a pid that cannot exist, one of another boot.
    live = Path(backend.layout.temp_path(key))
    live.write_bytes(b"partial")
    dead = fanout / f"{TEMP_PREFIX}{key}-{live.name.split('-')[2]}-{2**22 + 7}-1-0"
    dead.write_bytes(b"partial")
    reboot = fanout / f"{TEMP_PREFIX}{key}-00000000000000000000000000000000-{os.getpid()}-1-0"
    reboot.write_bytes(b"partial")
    backend = make_backend()
    backend.open()
    assert live.exists()
    assert not dead.exists() and not reboot.exists()
    assert backend.stats()["dead_temps_removed"] == 2
    assert backend.exists([key]) == [True]
    backend.close()


def test_open_removes_damaged_files_but_not_pages_of_another_size(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
) -> None:
    small, big = make_backend(page_bytes=PAGE), make_backend(page_bytes=2 * PAGE)
    small.open()
    big.open()
    small_keys, big_keys = [key_of(i, "s") for i in range(3)], [key_of(i, "b") for i in range(3)]
    _put(small, small_keys, payload_of)
    _put(big, big_keys, payload_of)
    small.close()
    big.close()
    truncated, zeroed, sound = small_keys
    os.truncate(small.page_path(truncated), HEADER_SIZE + 100)
    with open(small.page_path(zeroed), "r+b") as f:
        f.write(bytes(HEADER_SIZE))
        f.truncate(HEADER_SIZE + PAGE // 2)  # what a power loss can leave without fsync

    # A writable instance at the small size: damaged files go, big pages stay untouched.
    again = make_backend(page_bytes=PAGE)
    again.open()
    assert again.exists(small_keys) == [False, False, True]
    assert not os.path.exists(again.page_path(truncated))
    assert not os.path.exists(again.page_path(zeroed))
    assert all(os.path.exists(again.page_path(k)) for k in big_keys)
    stats = again.stats()
    assert stats["bad_size_removed"] == 2
    assert stats["other_size_pages"] == 3
    assert again.used_bytes == HEADER_SIZE + PAGE
    again.close()

    big = make_backend(page_bytes=2 * PAGE)
    big.open()
    bufs = [memoryview(bytearray(2 * PAGE)) for _ in big_keys]
    assert big.get_into(big_keys, bufs) == [PageStatus.OK] * 3
    assert bufs[0] == payload_of(big_keys[0], 2 * PAGE)
    assert big.exists([sound]) == [False]
    big.close()


def test_read_only_open_of_a_missing_root_is_empty(
    make_backend: Callable[..., LocalDiskBackend], key_of: Callable[..., str], tmp_path: Path
) -> None:
    backend = make_backend(root=str(tmp_path / "nowhere"), read_only=True)
    backend.open()
    assert backend.exists([key_of(1)]) == [False]
    assert list(backend.iter_pages()) == []
    assert not (tmp_path / "nowhere").exists()
    backend.close()


def test_listing_and_unusable_root(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
    tmp_path: Path,
) -> None:
    a, b = make_backend(namespace="alpha"), make_backend(namespace="beta")
    a.open()
    b.open()
    _put(a, [key_of(1), key_of(2)], payload_of)
    assert sorted(a.iter_namespaces()) == ["alpha", "beta"]
    assert sorted(p.key for p in a.iter_pages()) == sorted([key_of(1), key_of(2)])
    assert {p.stored_bytes for p in a.iter_pages()} == {HEADER_SIZE + PAGE}
    assert list(b.iter_pages()) == []
    a.close()
    b.close()

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    bad = make_backend(root=str(blocker / "root"))
    with pytest.raises(BackendUnavailableError, match="root"):
        bad.open()
