"""The slot file and the directories the backend creates are owner-only unless configured."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hicache_mmap import MmapBackend, MmapOptions

from hicache.storage import BackendContext, PageStatus
from hicache.testing.kit import kit_key, page_pattern

PAGE = 16 * 1024


@pytest.mark.parametrize(
    ("options", "file_mode", "dir_mode"),
    [({}, 0o600, 0o700), ({"file_mode": "0660", "dir_mode": "0770"}, 0o660, 0o770)],
    ids=["default", "group"],
)
def test_slot_file_and_parents_get_exactly_the_configured_mode(
    options: dict[str, str], file_mode: int, dir_mode: int, tmp_path: Path
) -> None:
    path = tmp_path / "a" / "b" / "mmap.slots"
    old = os.umask(0)  # the code, not the umask, must restrict
    try:
        config = MmapOptions(path=str(path), capacity=16 * (4096 + PAGE), prefault=False, **options)
        backend = MmapBackend(config, BackendContext(PAGE, "modes"))
        backend.open()
    finally:
        os.umask(old)
    key = kit_key(0, "modes")
    assert backend.put([key], [memoryview(page_pattern(key, PAGE))]) == [PageStatus.OK]
    backend.close()
    assert path.stat().st_mode & 0o777 == file_mode
    assert path.parent.stat().st_mode & 0o777 == dir_mode
    assert path.parent.parent.stat().st_mode & 0o777 == dir_mode


def test_an_existing_slot_file_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "mmap.slots"
    config = MmapOptions(path=str(path), capacity=16 * (4096 + PAGE), prefault=False)
    first = MmapBackend(config, BackendContext(PAGE, "modes"))
    first.open()
    first.close()
    os.chmod(path, 0o640)  # an operator widened it by hand
    again = MmapBackend(config, BackendContext(PAGE, "modes"))
    again.open()
    again.close()
    assert path.stat().st_mode & 0o777 == 0o640
