"""Evicted page files kept for the next put to reuse (single-process mode).

- ``SpareFiles(layout)``     one per backend instance
- ``retire(key)``            rename an evicted page's file to a temporary of this process and
                             return its path (None: no file, or a read in flight may hold it)
- ``reading(keys)``          context of a batch of reads (they may hold those files open)
- ``discard(paths)``         unlink spares a put did not reuse

Why: on ext4 without a journal (and on some other filesystems) creating a file right after
others were deleted is slow: the inode allocator skips every inode freed in the last minutes,
and checks each one, so a tier that evicts as fast as it stores (a full tier, the steady state)
pays a scan over thousands of inodes per put (measured: ~750 us of kernel time per 8 KiB page,
against ~35 us when the evicted file is reused). A put that had to evict instead takes over the
victims' files: the victim is renamed to a temporary (invisible, swept after a crash like any
temporary of a dead owner), overwritten in place (header and payload cover every byte; only
files of this tier's page size are retired) and published under the new key.

Readers: a read that opened a page file before its eviction keeps reading that file. Unlinked,
the file lived on for it; reused, it would be overwritten under it. So reads name the keys they
are reading (before opening anything), and the file of a key a read in flight named is not
retired but unlinked as before. The check and the rename are made under the lock the reads
name their keys under, so a read names its key either before (the file is not retired) or
after the rename (it finds no file to open). Other processes never read a single-process
root, and shared mode (where they do) never retires. Neither does ``durability: fsync``: after
a power loss the victim's rename could be lost while the overwrite was synced, leaving the new
page's bytes under the old name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence

from hicache_localdisk.fsio import remove
from hicache_localdisk.layout import Layout

__all__ = ["SpareFiles"]

log = logging.getLogger(__name__)


class SpareFiles:
    """Retired page files and the reads in flight that may still hold one (module docstring)."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._lock = threading.Lock()
        #: keys of the reads in flight (how many reads each)
        self._reading: dict[str, int] = {}

    def retire(self, key: str) -> str | None:
        """Rename the file of evicted page ``key`` to a temporary and return its path; None
        when a read in flight named ``key`` (it may hold the file open) or there is no file
        (or it cannot be renamed): the caller unlinks it as before."""
        path = self._layout.page_path(key)
        tmp = self._layout.temp_path(key)
        with self._lock:  # see the module docstring: no read may name the key meanwhile
            if key in self._reading:
                return None
            try:
                os.rename(path, tmp)
            except FileNotFoundError:
                return None
            except OSError as exc:
                log.debug("cannot retire %s: %s", path, exc)
                return None
        return tmp

    @contextlib.contextmanager
    def reading(self, keys: Sequence[str]) -> Iterator[None]:
        """Hold while reading the files of ``keys``: those evicted meanwhile are not reused."""
        reading = self._reading
        with self._lock:
            for key in keys:
                reading[key] = reading.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                for key in keys:
                    left = reading[key] - 1
                    if left:
                        reading[key] = left
                    else:
                        del reading[key]

    @staticmethod
    def discard(paths: Iterable[str]) -> None:
        """Unlink spares nobody reuses (missing ones are fine)."""
        for path in paths:
            remove(path)
