"""``file://`` tiers: what is not a page file is a bounded miss, and files are private."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hicache_fsspec import FsspecBackend, FsspecConfig

from hicache.storage import MASK, BackendContext, PageStatus
from hicache.testing.planted import NOT_REGULAR_KINDS, PlantRefused, plant, release, run_bounded
from hicache.tools.ops import TierHandle, disk_usage, verify_namespace

PAGE = 16384
#: Generous: a loaded CI machine may stall a thread for seconds; a hang never ends.
BOUND_S = 30.0


def _key(i: int) -> str:
    return f"{i:064x}"


def _page(i: int) -> memoryview:
    return memoryview(bytearray((i * 7 + j) % 251 for j in range(PAGE)))


def _backend(root: Path, namespace: str = "ns", **options: Any) -> FsspecBackend:
    config = FsspecConfig(url=root.as_uri(), io_threads=1, **options)
    return FsspecBackend(config, BackendContext(page_bytes=PAGE, namespace=namespace))


@pytest.fixture
def planted_paths() -> Iterator[list[str]]:
    paths: list[str] = []
    yield paths
    for path in paths:  # a reader still blocked on a FIFO (the bug) is let go
        release(path)


@pytest.mark.parametrize("kind", NOT_REGULAR_KINDS)
def test_a_non_regular_file_under_a_page_name_is_a_bounded_counted_miss(
    kind: str, tmp_path: Path, planted_paths: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    backend = _backend(tmp_path / "root")
    backend.open()
    key, good = _key(1), _key(2)
    assert backend.put([key, good], [_page(1), _page(2)]) == [PageStatus.OK] * 2
    path = backend.page_path(key)
    outside = tmp_path / "outside-page"  # the valid page, now outside the root
    shutil.move(path, outside)
    try:
        plant(kind, path, str(outside))
    except PlantRefused as exc:
        pytest.skip(str(exc))
    planted_paths.append(path)
    planted_type = stat.S_IFMT(os.lstat(path).st_mode)

    dst = bytearray(PAGE)
    finished, statuses = run_bounded(lambda: backend.get_into([key], [memoryview(dst)]), BOUND_S)
    assert finished, f"get_into of a {kind} under a page's name did not return in {BOUND_S}s"
    assert statuses == [PageStatus.NOT_FOUND]
    assert dst == bytearray(PAGE), "a miss must leave the destination untouched"
    assert backend.stats()["not_regular"] == 1
    assert "get_corrupt" not in backend.stats()
    assert stat.S_IFMT(os.lstat(path).st_mode) == planted_type, "left in place"
    assert any("not a regular file" in r.getMessage() for r in caplog.records)
    caplog.clear()
    finished, statuses = run_bounded(lambda: backend.get_into([key], [memoryview(dst)]), BOUND_S)
    assert finished and statuses == [PageStatus.NOT_FOUND]
    assert not any(r.levelname == "WARNING" for r in caplog.records), "logged once"

    finished, found = run_bounded(lambda: backend.exists([key, good]), BOUND_S)
    assert finished and found == [False, True]
    finished, pages = run_bounded(lambda: sorted(p.key for p in backend.iter_pages()), BOUND_S)
    assert finished and pages == [good]
    backend.close()

    handle = TierHandle(
        "files", "fsspec", False, lambda n, ns, ro: _backend(tmp_path / "root", ns), PAGE
    )
    finished, usage = run_bounded(lambda: disk_usage(handle, ["ns"]), BOUND_S)
    assert finished and [(u.namespace, u.pages) for u in usage] == [("ns", 1)]
    finished, report = run_bounded(lambda: verify_namespace(handle, "ns"), BOUND_S)
    assert finished, f"verify with a {kind} in the tier did not return in {BOUND_S}s"
    assert (report.ok, report.corrupt, report.failed) == (1, [], [])
    assert outside.read_bytes()[-PAGE:] == bytes(_page(1))


def test_files_and_dirs_are_owner_only_even_with_umask_zero(tmp_path: Path) -> None:
    old = os.umask(0)  # the code, not the umask, must restrict
    try:
        for options, file_mode, dir_mode in [
            ({}, 0o600, 0o700),
            ({"file_mode": "0644", "dir_mode": "0755"}, 0o644, 0o755),
        ]:
            root = tmp_path / f"root-{file_mode:o}" / "deeper"
            backend = _backend(root, **options)
            backend.open()
            assert backend.put([_key(3)], [_page(3)]) == [PageStatus.OK]
            page = Path(backend.page_path(_key(3)))
            assert page.stat().st_mode & 0o777 == file_mode
            for directory in (page.parent, page.parent.parent, root, root.parent):
                assert directory.stat().st_mode & 0o777 == dir_mode, directory
            backend.close()
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    ("value", "problem"),
    [("0400", "owner needs"), ("rw-r--r--", "octal"), (0o1777, "0000-0777"), (True, "octal")],
)
def test_bad_modes_are_refused(value: object, problem: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=problem):
        FsspecConfig(url=tmp_path.as_uri(), file_mode=value)


def test_secret_storage_options_are_masked_and_reach_the_filesystem() -> None:
    marker = "MARKER-5be1"
    options = {"password": marker, "client_kwargs": {"aws_secret_access_key": marker}, "n": 1}
    config = FsspecConfig(url="memory://secret-test", storage_options=options)
    assert marker not in repr(config) and marker not in str(config.storage_options)
    dumped = config.model_dump(mode="json")["storage_options"]
    assert dumped == {"password": MASK, "client_kwargs": {"aws_secret_access_key": MASK}, "n": 1}
    backend = FsspecBackend(config, BackendContext(page_bytes=PAGE, namespace="ns"))
    backend.open()
    # The filesystem got the real values (fsspec keeps its constructor's keyword arguments).
    assert backend.filesystem.storage_options["password"] == marker
    assert backend.filesystem.storage_options["client_kwargs"]["aws_secret_access_key"] == marker
    backend.close()
