"""The raw limit the ``mmap`` backend is measured against: memcpy into and out of prefaulted
shared file mappings, with no headers, locks, index or checksums.

- **put** copies into a scratch file next to the slot file (the slot file is live: never written).
- **get** copies out of the slot file's own slot payloads, mapped read-only, when the file exists
  with slots of the page size for every page; else out of the scratch file. How fast memory
  copies out of a tmpfs file depends on the memory the file got, and drifts (2 MiB pages, the
  same process alternating: 117 us out of a slot file against 101 us out of a fresh scratch
  file; 107 us once the slot file was recreated, 128-135 us 16 minutes later against 103-106;
  slot order and file size made no difference), so the limit reads the memory the backend
  reads. The limit of the old kind, gets out of a file created for the round, is printed
  beside it as a tool limit.

The copies are the backend's own primitive (``hicache.storage.buffers.copy_bytes``, a
``memcpy`` with the GIL released), so threads copy in parallel on both sides alike."""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from hicache.errors import HicacheError
from hicache.storage import RawBaseline, ToolLimit, copy_bytes
from hicache_mmap.layout import SLOT_HEADER_SIZE, SUPERBLOCK_SIZE, decode_superblock

__all__ = ["MmapRawBaseline"]

logger = logging.getLogger(__name__)

_MAP_POPULATE: int = getattr(mmap, "MAP_POPULATE", 0)


class MmapRawBaseline(RawBaseline):
    """Puts to pages at fixed offsets of a scratch file mapped ``MAP_SHARED | MAP_POPULATE``;
    gets from slot payloads spread over the slot file (or the scratch file, see the module)."""

    name: ClassVar[str] = (
        "memcpy into a prefaulted MAP_SHARED mapping of a scratch file (put) and out of a "
        "read-only mapping of the slot file's own slots (get)"
    )

    def __init__(self, slot_path: str, prefault: bool = True) -> None:
        # Same directory, hence the same filesystem (tmpfs or disk) as the slot file.
        self._slot_path = slot_path
        self._path = Path(f"{slot_path}.bench-raw-{os.getpid()}")
        self._prefault = prefault
        self._mm: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._read_mm: mmap.mmap | None = None
        self._read_view: memoryview | None = None
        #: Offset of page i's bytes in the mapping gets read from.
        self._read_offsets: list[int] = []
        self._page_bytes = 0
        self._present = bytearray()
        #: Whether the last setup read gets from the slot file (kept past teardown).
        self._read_slot_file = False

    @property
    def reads_slot_file(self) -> bool:
        """Whether gets copy out of the slot file (set up by :meth:`setup`)."""
        return self._read_mm is not None

    def setup(self, page_bytes: int, num_pages: int) -> None:
        # docstring inherited
        self._page_bytes = page_bytes
        self._present = bytearray(num_pages)
        self._read_slot_file = False
        self._path.parent.mkdir(parents=True, exist_ok=True)
        flags = mmap.MAP_SHARED | (_MAP_POPULATE if self._prefault else 0)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, page_bytes * num_pages)
            self._mm = mmap.mmap(fd, page_bytes * num_pages, flags=flags)
        finally:
            os.close(fd)
        self._view = memoryview(self._mm)
        self._read_offsets = [i * page_bytes for i in range(num_pages)]
        self._map_slot_file(page_bytes, num_pages, flags)

    def _map_slot_file(self, page_bytes: int, num_pages: int, flags: int) -> None:
        """Read gets out of the slot file's payloads when it has a slot of ``page_bytes`` for
        each page (distinct slots: a slot read twice would be read from cache)."""
        try:
            fd = os.open(self._slot_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # not created yet: the scratch file it is
        try:
            size = os.fstat(fd).st_size
            geo = decode_superblock(os.pread(fd, SUPERBLOCK_SIZE, 0), size)
            if geo.page_bytes != page_bytes or geo.num_slots < num_pages:
                return
            mm = mmap.mmap(fd, geo.file_size, flags=flags, prot=mmap.PROT_READ)
        except (OSError, ValueError, HicacheError) as exc:
            logger.info("raw gets read the scratch file: slot file unusable (%s)", exc)
            return
        finally:
            os.close(fd)
        self._read_mm = mm
        self._read_view = memoryview(mm)
        self._read_slot_file = True
        # Spread over the whole file, as the backend's hashed slots are.
        self._read_offsets = [
            geo.slots_offset + (i * geo.num_slots // num_pages) * geo.slot_size + SLOT_HEADER_SIZE
            for i in range(num_pages)
        ]

    def _mapping(self) -> memoryview:
        if self._view is None:
            raise RuntimeError("MmapRawBaseline used before setup()")
        return self._view

    def put(self, indices: Sequence[int], srcs: Sequence[memoryview]) -> None:
        # docstring inherited
        view, size = self._mapping(), self._page_bytes
        for i, src in zip(indices, srcs, strict=True):
            copy_bytes(view[i * size : (i + 1) * size], src)
            self._present[i] = 1

    def get(self, indices: Sequence[int], dsts: Sequence[memoryview]) -> None:
        # docstring inherited
        view = self._read_view if self._read_view is not None else self._mapping()
        size, offsets = self._page_bytes, self._read_offsets
        for i, dst in zip(indices, dsts, strict=True):
            off = offsets[i]
            copy_bytes(dst, view[off : off + size])

    def exists(self, indices: Sequence[int]) -> list[bool]:
        # docstring inherited
        present = self._present
        return [bool(present[i]) for i in indices]

    def teardown(self) -> None:
        # docstring inherited
        for view in (self._view, self._read_view):
            if view is not None:
                view.release()
        self._view = self._read_view = None
        for mm in (self._mm, self._read_mm):
            if mm is not None:
                mm.close()
        self._mm = self._read_mm = None
        self._path.unlink(missing_ok=True)

    def tool_limits(
        self, page_bytes: int, threads: int, pages: int, batch: int
    ) -> Sequence[ToolLimit]:
        """When gets read the slot file: the same gets out of a file created now (the limit of
        the old kind), so both show in one run."""
        if not self._read_slot_file:
            return ()
        from hicache.tools.bench_phases import fill_page, run_parallel, split_slices

        path = Path(f"{self._slot_path}.bench-fresh-{os.getpid()}")
        size = page_bytes * pages
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            flags = mmap.MAP_SHARED | (_MAP_POPULATE if self._prefault else 0)
            mm = mmap.mmap(fd, size, flags=flags)
        finally:
            os.close(fd)
        view = memoryview(mm)
        try:
            page = bytearray(page_bytes)
            fill_page(page, 0)
            for i in range(pages):
                copy_bytes(view[i * page_bytes : (i + 1) * page_bytes], memoryview(page))
            dsts = [memoryview(bytearray(page_bytes)) for _ in range(threads)]

            def get(indices: Sequence[int], t: int) -> None:
                for i in indices:
                    copy_bytes(dsts[t], view[i * page_bytes : (i + 1) * page_bytes])

            phase = run_parallel(threads, split_slices(range(pages), threads), batch, get, None)
        finally:
            view.release()
            mm.close()
            path.unlink(missing_ok=True)
        gbps = size / phase.seconds / 1e9 if phase.seconds > 0 else None
        return (
            ToolLimit(
                "memcpy out of a fresh file",
                "get_hot",
                gbps,
                "gets from a file created after the round, the limit before 2026-12-07",
            ),
        )
