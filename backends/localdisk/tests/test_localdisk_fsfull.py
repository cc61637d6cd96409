"""A full filesystem and a read-only one: puts fail with a status, nothing lingers, reads work.

Uses a real tiny tmpfs when this process may mount one (root in a container); otherwise ENOSPC is
injected at the write system call and the read-only test is skipped.
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hicache_localdisk import LocalDiskBackend, fsio, packs, pageio
from hicache_localdisk.layout import TEMP_PREFIX

from hicache.errors import BackendError
from hicache.storage import HEADER_SIZE, PageStatus

PAGE = 64 * 1024


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10, check=False)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path | None]:
    """A 1 MiB tmpfs, or ``None`` when mounting is not allowed here."""
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, "1m"):
        yield None
        return
    try:
        yield mnt
    finally:
        _umount(mnt)


def _temps(backend: LocalDiskBackend) -> list[Path]:
    return [p for p in Path(backend.layout.ns_dir).glob("*/*") if p.name.startswith(TEMP_PREFIX)]


@pytest.mark.parametrize("packed", [True, False])
def test_full_filesystem_fails_puts_cleanly(
    packed: bool,
    tiny_fs: Path | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
) -> None:
    root = tiny_fs if tiny_fs is not None else tmp_path / "root"
    # max_bytes far above the filesystem's size: the disk, not the policy, must say no.
    backend = make_backend(
        root=str(root),
        page_bytes=PAGE,
        max_bytes="1GiB",
        io_threads=1,
        pack_below="256KiB" if packed else 0,
    )
    backend.open()
    assert backend.packing is packed
    if tiny_fs is None:
        real = fsio.write_fully
        calls = {"n": 0}

        def filling_up(fd: int, bufs: list[memoryview], offset: int = 0) -> None:
            calls["n"] += 1
            if calls["n"] > 10:  # a partial temporary, then the disk is full
                real(fd, bufs[:1], offset)
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            real(fd, bufs, offset)

        # Every write of a page goes through fsio.write_fully (pageio imports it by name too).
        monkeypatch.setattr(fsio, "write_fully", filling_up)
        monkeypatch.setattr(pageio, "write_fully", filling_up)
        monkeypatch.setattr(packs, "write_fully", filling_up)
    stored: list[str] = []
    failed: list[str] = []
    for i in range(40):
        keys = [key_of(4 * i + j, "full") for j in range(4)]
        statuses = backend.put(keys, [memoryview(payload_of(k, PAGE)) for k in keys])
        assert set(statuses) <= {PageStatus.OK, PageStatus.FAILED}
        stored += [k for k, s in zip(keys, statuses, strict=True) if s is PageStatus.OK]
        failed += [k for k, s in zip(keys, statuses, strict=True) if s is PageStatus.FAILED]
        if failed:
            if packed:  # one pack: all of its pages fail together
                assert statuses == [PageStatus.FAILED] * len(keys)
            break
    assert failed, "the filesystem never filled up"
    assert stored
    assert _temps(backend) == [], "a failed put left its temporary behind"
    assert backend.exists(failed) == [False] * len(failed)
    assert backend.stats()["puts_failed"] == len(failed)
    assert backend.used_bytes == len(stored) * (PAGE + HEADER_SIZE)  # nothing failed is counted
    bufs = [memoryview(bytearray(PAGE)) for _ in stored]
    assert backend.get_into(stored, bufs) == [PageStatus.OK] * len(stored)
    assert all(b == payload_of(k, PAGE) for k, b in zip(stored, bufs, strict=True))
    if tiny_fs is not None:
        # Making room makes puts work again.
        backend.delete(stored[:3])
        assert backend.put(failed[:1], [memoryview(payload_of(failed[0], PAGE))]) == [PageStatus.OK]
    backend.close()


def test_read_only_filesystem_serves_reads_and_fails_puts(
    tmp_path: Path,
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
) -> None:
    mnt = tmp_path / "ro"
    if not _mount_tmpfs(mnt, "4m"):
        pytest.skip("cannot mount a tmpfs here to make a read-only filesystem")
    try:
        keys = [key_of(i, "ro") for i in range(4)]
        backend = make_backend(root=str(mnt), page_bytes=PAGE)
        backend.open()
        assert (
            backend.put(keys, [memoryview(payload_of(k, PAGE)) for k in keys])
            == [PageStatus.OK] * 4
        )
        backend.close()
        remount = ["mount", "-o", "remount,ro", str(mnt)]
        assert subprocess.run(remount, capture_output=True, timeout=10).returncode == 0

        backend = make_backend(root=str(mnt), page_bytes=PAGE)
        backend.open()  # a writable tier on a read-only filesystem still opens
        assert backend.exists(keys) == [True] * 4
        bufs = [memoryview(bytearray(PAGE)) for _ in keys]
        assert backend.get_into(keys, bufs) == [PageStatus.OK] * 4
        assert all(b == payload_of(k, PAGE) for k, b in zip(keys, bufs, strict=True))
        new = key_of(99, "ro")
        assert backend.put([new], [memoryview(payload_of(new, PAGE))]) == [PageStatus.FAILED]
        assert backend.exists([new]) == [False]
        with pytest.raises(BackendError):
            backend.delete(keys[:1])
        assert backend.get_into(keys[:1], bufs[:1]) == [PageStatus.OK]
        backend.close()
    finally:
        _umount(mnt)
