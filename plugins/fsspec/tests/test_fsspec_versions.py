"""Mixed-version tiers on ``file://``: a page a newer hicache wrote is a miss that stays in place,
counted apart from corruption; only a proven-corrupt page of this version is dropped."""

from __future__ import annotations

from pathlib import Path

from hicache_fsspec import FsspecBackend, FsspecConfig

from hicache.storage import HEADER_SIZE, BackendContext, PageStatus
from hicache.testing.kit import kit_key, page_pattern
from hicache.testing.peer import as_newer_version, read_in_other_process

PAGE = 16384


def test_newer_page_survives_a_reader_in_another_process(tmp_path: Path) -> None:
    options = {"url": (tmp_path / "cache").as_uri()}
    writer = FsspecBackend(FsspecConfig.model_validate(options), BackendContext(PAGE, "ns"))
    writer.open()
    try:
        newer, shorter, corrupt, _intact = keys = [kit_key(i, "versions") for i in range(4)]
        assert (
            writer.put(keys, [memoryview(page_pattern(k, PAGE)) for k in keys])
            == [PageStatus.OK] * 4
        )
        paths = {k: Path(writer.page_path(k)) for k in keys}
        paths[newer].write_bytes(as_newer_version(paths[newer].read_bytes()))
        paths[shorter].write_bytes(as_newer_version(paths[shorter].read_bytes())[:-100])
        damaged = bytearray(paths[corrupt].read_bytes())
        damaged[HEADER_SIZE + 7] ^= 0xFF  # a payload byte of a version-1 page: proven damage
        paths[corrupt].write_bytes(damaged)
        planted = {k: paths[k].read_bytes() for k in (newer, shorter)}

        seen = read_in_other_process(
            FsspecBackend, options, page_bytes=PAGE, namespace="ns", keys=keys
        )
        assert seen.statuses == [
            PageStatus.NOT_FOUND,
            PageStatus.NOT_FOUND,
            PageStatus.CORRUPT,
            PageStatus.OK,
        ]
        assert seen.stats["unknown_version"] == 2
        assert {k: paths[k].read_bytes() for k in planted} == planted
        assert not paths[corrupt].exists()
        # A reader that knows the format still reads it (here: the version put back).
        paths[newer].write_bytes(as_newer_version(planted[newer], version=1))
        dst = bytearray(PAGE)
        assert writer.get_into([newer], [memoryview(dst)]) == [PageStatus.OK]
        assert dst == page_pattern(newer, PAGE)
    finally:
        writer.close()
