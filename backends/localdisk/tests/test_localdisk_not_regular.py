"""Whatever sits under a page's name that is not a regular file is a miss: never a hang, never
a read outside the root, never removed. And files are owner-only whatever the umask."""

from __future__ import annotations

import functools
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hicache_localdisk import LocalDiskBackend

from hicache.storage import PageStatus
from hicache.testing.planted import NOT_REGULAR_KINDS, PlantRefused, plant, release, run_bounded
from hicache.tools.ops import TierHandle, disk_usage, verify_namespace


@pytest.fixture
def make_backend(make_backend: Callable[..., LocalDiskBackend]) -> Callable[..., LocalDiskBackend]:
    """One file per page (``pack_below: 0``): these tests plant and damage page files."""
    return functools.partial(make_backend, pack_below=0)


PAGE = 16384
#: Generous: a loaded CI machine may stall a thread for seconds; a hang never ends.
BOUND_S = 30.0


@pytest.fixture
def planted_paths() -> Iterator[list[str]]:
    paths: list[str] = []
    yield paths
    for path in paths:  # a reader still blocked on a FIFO (the bug) is let go
        release(path)


def _plant_or_skip(kind: str, path: str, target: str | None = None) -> None:
    try:
        plant(kind, path, target)
    except PlantRefused as exc:
        pytest.skip(str(exc))


def _type_of(path: str) -> int:
    return stat.S_IFMT(os.lstat(path).st_mode)


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
@pytest.mark.parametrize("kind", NOT_REGULAR_KINDS)
def test_a_non_regular_file_under_a_page_name_is_a_bounded_counted_miss(
    kind: str,
    shared: bool,
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
    tmp_path: Path,
    planted_paths: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = key_of(7, kind)
    backend = make_backend(shared=shared)
    backend.open()
    assert backend.put([key], [memoryview(payload_of(key))]) == [PageStatus.OK]
    path = backend.page_path(key)
    # The valid page moves outside the root; the symlink case points at it there.
    outside = tmp_path / "outside-page"
    shutil.move(path, outside)
    _plant_or_skip(kind, path, str(outside))
    planted_paths.append(path)
    planted_type = _type_of(path)

    dst = bytearray(PAGE)
    finished, statuses = run_bounded(lambda: backend.get_into([key], [memoryview(dst)]), BOUND_S)
    assert finished, f"get_into of a {kind} under a page's name did not return in {BOUND_S}s"
    assert statuses == [PageStatus.NOT_FOUND]
    assert dst == bytearray(PAGE), "a miss must leave the destination untouched"
    stats = backend.stats()
    assert stats["not_regular"] == 1
    assert stats["corrupt"] == 0
    assert _type_of(path) == planted_type, "what the backend cannot read stays in place"
    assert outside.read_bytes()[-PAGE:] == payload_of(key)
    assert any("not a regular file" in r.getMessage() for r in caplog.records)

    # Asked again: still a miss, still bounded, and the warning is not repeated.
    caplog.clear()
    finished, statuses = run_bounded(lambda: backend.get_into([key], [memoryview(dst)]), BOUND_S)
    assert finished and statuses == [PageStatus.NOT_FOUND]
    assert not any(r.levelname == "WARNING" for r in caplog.records)
    assert backend.exists([key]) == [False]
    backend.close()


@pytest.mark.parametrize("kind", NOT_REGULAR_KINDS)
def test_tools_and_reopen_skip_a_non_regular_file(
    kind: str,
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
    tmp_path: Path,
    planted_paths: list[str],
) -> None:
    good, bad = key_of(1, kind), key_of(2, kind)
    backend = make_backend()
    backend.open()
    backend.put([good, bad], [memoryview(payload_of(good)), memoryview(payload_of(bad))])
    path = backend.page_path(bad)
    outside = tmp_path / "outside-page"
    shutil.move(path, outside)
    backend.close()
    _plant_or_skip(kind, path, str(outside))
    planted_paths.append(path)

    def handle_make(page_bytes: int, namespace: str, read_only: bool) -> LocalDiskBackend:
        return make_backend(namespace=namespace, page_bytes=page_bytes, read_only=read_only)

    handle = TierHandle("disk", "localdisk", False, handle_make, PAGE)
    finished, usage = run_bounded(lambda: disk_usage(handle, ["ns"]), BOUND_S)
    assert finished, f"du with a {kind} in the tier did not return in {BOUND_S}s"
    assert [(u.namespace, u.pages) for u in usage] == [("ns", 1)]
    finished, report = run_bounded(lambda: verify_namespace(handle, "ns"), BOUND_S)
    assert finished, f"verify with a {kind} in the tier did not return in {BOUND_S}s"
    assert (report.pages, report.ok, report.corrupt, report.failed) == (1, 1, [], [])

    reopened = make_backend(shared=True)
    finished, _ = run_bounded(reopened.open, BOUND_S)
    assert finished, f"open() with a {kind} in the tier did not return in {BOUND_S}s"
    assert reopened.exists([good, bad]) == [True, False]
    reopened.close()
    assert stat.S_ISREG(os.lstat(outside).st_mode)


def test_files_and_dirs_are_owner_only_even_with_umask_zero(
    make_backend: Callable[..., LocalDiskBackend],
    key_of: Callable[..., str],
    payload_of: Callable[..., bytes],
    tmp_path: Path,
) -> None:
    key = key_of(3)
    old = os.umask(0)  # the code, not the umask, must restrict
    try:
        backend = make_backend(shared=True)
        backend.open()
        backend.put([key], [memoryview(payload_of(key))])
        ns_dir = Path(backend.layout.ns_dir)
        files = [Path(backend.page_path(key)), *ns_dir.glob(".hicache-*")]
        assert len(files) >= 4  # the page and the shared-mode state files
        for path in files:
            assert path.stat().st_mode & 0o777 == 0o600, path
        for path in (ns_dir, ns_dir.parent, Path(backend.page_path(key)).parent):
            assert path.stat().st_mode & 0o777 == 0o700, path
        backend.close()

        group = make_backend(namespace="grp", shared=True, file_mode="0640", dir_mode="0750")
        group.open()
        group.put([key], [memoryview(payload_of(key))])
        ns_dir = Path(group.layout.ns_dir)
        for path in [Path(group.page_path(key)), *ns_dir.glob(".hicache-*")]:
            assert path.stat().st_mode & 0o777 == 0o640, path
        assert ns_dir.stat().st_mode & 0o777 == 0o750
        group.close()
    finally:
        os.umask(old)
