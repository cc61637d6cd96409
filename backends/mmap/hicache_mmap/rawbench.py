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
import threading
import time
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
        flags = self._map_flags()
        self._mm = _map_scratch(self._path, page_bytes * num_pages, flags)
        self._view = memoryview(self._mm)
        self._read_offsets = [i * page_bytes for i in range(num_pages)]
        self._map_slot_file(page_bytes, num_pages, flags)

    def _map_flags(self) -> int:
        return mmap.MAP_SHARED | (_MAP_POPULATE if self._prefault else 0)

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
        path = Path(f"{self._slot_path}.bench-fresh-{os.getpid()}")
        size = page_bytes * pages
        mm = _map_scratch(path, size, self._map_flags())
        view = memoryview(mm)
        try:
            page = memoryview(bytes(range(256)) * (page_bytes // 256) + bytes(page_bytes % 256))
            for i in range(pages):
                copy_bytes(view[i * page_bytes : (i + 1) * page_bytes], page)
            seconds = _timed_gets(view, page_bytes, pages, threads)
        finally:
            view.release()
            mm.close()
            path.unlink(missing_ok=True)
        return (
            ToolLimit(
                "memcpy out of a fresh file",
                "get_hot",
                size / seconds / 1e9 if seconds > 0 else None,
                "gets from a file created after the round, the limit before 2026-12-07",
            ),
        )


def _map_scratch(path: Path, size: int, flags: int) -> mmap.mmap:
    """A new owner-only file of ``size`` bytes at ``path``, mapped shared with ``flags``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size, flags=flags)
    finally:
        os.close(fd)


def _timed_gets(view: memoryview, page_bytes: int, pages: int, threads: int) -> float:
    """Seconds for ``threads`` threads, released together, to copy ``pages`` pages of ``view``
    (contiguous runs, one page per copy) into a buffer of their own: the bench's get phase,
    which a backend package may not import (backends import only hicache.storage and
    hicache.errors)."""
    bounds = [pages * t // threads for t in range(threads + 1)]
    dsts = [memoryview(bytearray(page_bytes)) for _ in range(threads)]
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def body(t: int) -> None:
        barrier.wait()
        try:
            for i in range(bounds[t], bounds[t + 1]):
                copy_bytes(dsts[t], view[i * page_bytes : (i + 1) * page_bytes])
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=body, args=(t,), daemon=True) for t in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - began
    if errors:
        raise errors[0]
    return seconds
