"""The raw limit the ``mmap`` backend is measured against: memcpy into and out of a prefaulted
shared file mapping next to the slot file, with no headers, locks, index or checksums.

The copies are the backend's own primitive (``hicache.storage.buffers.copy_bytes``, a
``memcpy`` with the GIL released), so threads copy in parallel on both sides alike."""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from hicache.storage import RawBaseline, copy_bytes

__all__ = ["MmapRawBaseline"]

_MAP_POPULATE: int = getattr(mmap, "MAP_POPULATE", 0)


class MmapRawBaseline(RawBaseline):
    """Pages at fixed offsets of a scratch file mapped ``MAP_SHARED | MAP_POPULATE``."""

    name: ClassVar[str] = "memcpy into/out of a prefaulted MAP_SHARED file mapping"

    def __init__(self, slot_path: str, prefault: bool = True) -> None:
        # Same directory, hence the same filesystem (tmpfs or disk) as the slot file.
        self._path = Path(f"{slot_path}.bench-raw-{os.getpid()}")
        self._prefault = prefault
        self._mm: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._page_bytes = 0
        self._present = bytearray()

    def setup(self, page_bytes: int, num_pages: int) -> None:
        # docstring inherited
        self._page_bytes = page_bytes
        self._present = bytearray(num_pages)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, page_bytes * num_pages)
            flags = mmap.MAP_SHARED | (_MAP_POPULATE if self._prefault else 0)
            self._mm = mmap.mmap(fd, page_bytes * num_pages, flags=flags)
        finally:
            os.close(fd)
        self._view = memoryview(self._mm)

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
        view, size = self._mapping(), self._page_bytes
        for i, dst in zip(indices, dsts, strict=True):
            copy_bytes(dst, view[i * size : (i + 1) * size])

    def exists(self, indices: Sequence[int]) -> list[bool]:
        # docstring inherited
        present = self._present
        return [bool(present[i]) for i in indices]

    def teardown(self) -> None:
        # docstring inherited
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        self._path.unlink(missing_ok=True)
