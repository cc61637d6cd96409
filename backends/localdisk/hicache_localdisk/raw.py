"""The raw baseline ``hicache bench storage`` measures localdisk against.

The same system calls outside hicache, one file per page in the same fan-out, the same bytes
(a 4 KiB header and the payload) written and read in the same pieces
(``fsio.write_page``/``read_page``): ``open(O_CREAT|O_EXCL)`` + ``pwritev`` + (``fsync``) +
``close`` + ``rename`` for a put, ``open`` + ``preadv`` + ``close`` for a get, ``stat`` for a
presence check; no index, no checksum, no mtime, no accounting. Its files live in
the backend's own directories (``<root>/<namespace>/<xx>/.bench-raw-<i>``), are removed by
``teardown``, and ``cleanup`` removes the directories once both sides of a round are done.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import ClassVar

from hicache.storage import HEADER_SIZE, RawBaseline
from hicache_localdisk.fsio import drop_cache, fsync_dir, read_page, write_page
from hicache_localdisk.layout import FANOUT_DIRS, Layout
from hicache_localdisk.options import Durability, LocalDiskConfig
from hicache_localdisk.startup import make_dirs

__all__ = ["FileBaseline"]


class FileBaseline(RawBaseline):
    """open + pwritev + rename / open + preadv, with the tier's fsync policy."""

    name: ClassVar[str] = "files: open+pwritev+rename / open+preadv (same fsync policy)"

    def __init__(self, config: LocalDiskConfig, namespace: str) -> None:
        # The backend's own directories: where a filesystem places a directory decides how fast
        # files are created and allocated in it (measured on ext4: up to 1.6x between two fresh
        # sibling trees), so both sides write into the same ones.
        self._layout = Layout(os.fspath(config.root), namespace)
        self._dir = self._layout.ns_dir
        self._dir_mode = config.dir_mode
        self._fsync = config.durability is Durability.FSYNC
        self._mode = config.file_mode
        self._num_pages = 0
        self._header = memoryview(bytearray(HEADER_SIZE))

    def _path(self, i: int) -> str:
        # A dot name in the same fan-out directories: never mistaken for a page by the backend
        # (and never present while it is open: teardown removes every one).
        return f"{self._dir}/{i % 256:02x}/.bench-raw-{i}"

    def setup(self, page_bytes: int, num_pages: int) -> None:
        self._num_pages = num_pages
        make_dirs(self._layout, self._dir_mode, self._fsync)

    def put(self, indices: Sequence[int], srcs: Sequence[memoryview]) -> None:
        dirs = set()
        for i, src in zip(indices, srcs, strict=True):
            path = self._path(i)
            tmp = f"{path}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self._mode)
            try:
                write_page(fd, self._header, src, None)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            dirs.add(os.path.dirname(path))
        if self._fsync:
            for d in dirs:
                fsync_dir(d)

    def get(self, indices: Sequence[int], dsts: Sequence[memoryview]) -> None:
        # Each thread reads its own header scratch: the header is not what is measured.
        header = memoryview(bytearray(HEADER_SIZE))
        for i, dst in zip(indices, dsts, strict=True):
            fd = os.open(self._path(i), os.O_RDONLY | os.O_CLOEXEC)
            try:
                read_page(fd, header, dst, hash_payload=False)
            finally:
                os.close(fd)

    def exists(self, indices: Sequence[int]) -> list[bool]:
        return [os.path.exists(self._path(i)) for i in indices]

    def drop_cache(self) -> bool:
        for i in range(self._num_pages):
            drop_cache(self._path(i))
        return True

    def teardown(self) -> None:
        for i in range(self._num_pages):
            for path in (self._path(i), f"{self._path(i)}.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def cleanup(self) -> None:
        """Remove the namespace's directories once both sides are done (only if empty)."""
        for sub in FANOUT_DIRS:
            with contextlib.suppress(OSError):
                os.rmdir(f"{self._dir}/{sub}")
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)
