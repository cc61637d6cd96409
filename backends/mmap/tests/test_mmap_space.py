"""A slot file on a filesystem without room for it: an open-time error, never a SIGBUS.

Each test mounts its own small tmpfs (root only: CI runs as root; elsewhere the tests skip and
say why). Whatever could fault runs in a child process, so a SIGBUS shows as the child's exit
status instead of killing the test run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hicache_mmap import MmapBackend, MmapOptions

from hicache.errors import BackendCapacityError
from hicache.storage import BackendContext, PageStatus
from hicache.testing.kit import kit_key, page_pattern

PAGE = 64 * 1024
TMPFS_BYTES = 8 * 1024 * 1024
MiB = 1024 * 1024

# The child: open a slot file twice the tmpfs's size, then fill every slot. Before blocks were
# reserved at open, the open succeeded on a sparse file and the first store into a page the
# tmpfs could not back killed the process with SIGBUS.
_CHILD = """
import errno, json, os, sys
from hicache_mmap import MmapBackend, MmapOptions
from hicache.storage import BackendContext
from hicache.testing.kit import kit_key, page_pattern

path, capacity, page, no_fallocate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if no_fallocate == "1":
    # A filesystem without fallocate(2): the backend must reserve by writing instead.
    def _unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
    os.posix_fallocate = _unsupported
options = MmapOptions(path=path, capacity=capacity, associativity=4, prefault=True)
backend = MmapBackend(options, BackendContext(page, "space"))
try:
    backend.open()
except Exception as exc:
    print(json.dumps({"opened": False, "error": type(exc).__name__, "message": str(exc)}))
    sys.exit(0)
slots = backend.stats()["num_slots"]
keys = [kit_key(i, "space") for i in range(slots)]
statuses = [backend.put([k], [memoryview(page_pattern(k, page))])[0].value for k in keys]
backend.close()
print(json.dumps({"opened": True, "statuses": statuses}))
"""


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    """An 8 MiB tmpfs mounted for this test alone, unmounted afterwards."""
    where = Path(tempfile.mkdtemp(prefix="hicache-tmpfs-"))
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES},mode=0700", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        where.rmdir()
        pytest.skip("no mount(8) on this machine: cannot create a small tmpfs")
    if mounted.returncode != 0:
        where.rmdir()
        pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)
        where.rmdir()


def _free_bytes(where: Path) -> int:
    st = os.statvfs(where)
    return st.f_bavail * st.f_frsize


def _run_child(path: Path, capacity: int, *, no_fallocate: bool) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(capacity), str(PAGE), str(int(no_fallocate))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode < 0:
        pytest.fail(
            f"the child died of {signal.Signals(-done.returncode).name}; stderr: {done.stderr}"
        )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("no_fallocate", [False, True], ids=["fallocate", "write-fallback"])
def test_slot_file_larger_than_its_tmpfs_fails_open_instead_of_sigbus(
    small_tmpfs: Path, no_fallocate: bool
) -> None:
    path = small_tmpfs / "big.slots"
    capacity = 2 * TMPFS_BYTES
    free = _free_bytes(small_tmpfs)
    result = _run_child(path, capacity, no_fallocate=no_fallocate)
    assert result["opened"] is False, f"opened a slot file larger than the tmpfs: {result}"
    assert result["error"] == BackendCapacityError.__name__
    message = str(result["message"])
    assert str(path) in message
    assert f"capacity {capacity} bytes" in message
    assert f"{free} bytes free" in message
    # The failed reservation gave the space back: a slot file that fits opens afterwards.
    assert _free_bytes(small_tmpfs) == free
    fits = _run_child(small_tmpfs / "small.slots", 2 * MiB, no_fallocate=no_fallocate)
    assert fits["opened"] is True
    assert fits["statuses"] and set(fits["statuses"]) == {PageStatus.OK.value}  # type: ignore[arg-type]


def test_open_reserves_every_block_of_the_slot_file(small_tmpfs: Path) -> None:
    path = small_tmpfs / "reserved.slots"
    free_before = _free_bytes(small_tmpfs)
    options = MmapOptions(path=str(path), capacity=3 * MiB, associativity=4, prefault=False)
    backend = MmapBackend(options, BackendContext(PAGE, "space"))
    backend.open()
    try:
        size = path.stat().st_size
        # Reserved at open, before any page was written (prefault is off: nothing touched it).
        assert path.stat().st_blocks * 512 >= size
        assert free_before - _free_bytes(small_tmpfs) >= size
        # A second file that no longer fits is refused at open, naming what it wanted.
        second = MmapBackend(
            MmapOptions(path=str(small_tmpfs / "second.slots"), capacity=6 * MiB, prefault=False),
            BackendContext(PAGE, "space"),
        )
        with pytest.raises(BackendCapacityError, match=r"second\.slots"):
            second.open()
        key = kit_key(0, "reserved")
        assert backend.put([key], [memoryview(page_pattern(key, PAGE))]) == [PageStatus.OK]
    finally:
        backend.close()
