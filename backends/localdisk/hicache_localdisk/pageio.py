"""Writing and reading one page file: header + payload, straight from and into caller buffers.

A put writes the payload from the caller's buffer and the 4 KiB header into a fresh temporary
(small pages and ``O_DIRECT``: one ``pwritev([header, payload])``; larger ones payload first,
hashed as it is written or on a helper thread, header last), sets its mtime (the recency a
restart rebuilds from), optionally ``fsync``s it, and publishes it create-only. A get reads
``[header, payload]`` with ``preadv`` straight into the caller's buffer, hashing chunk by chunk
as it lands, then verifies. With ``O_DIRECT`` the header travels through a page-aligned
per-thread buffer and the payload must be page-aligned too; unaligned buffers silently take the
buffered path.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial
from stat import S_ISREG

from hicache.errors import PageCorruptError, PageVersionError
from hicache.storage import (
    HEADER_SIZE,
    PageParts,
    PageStatus,
    buffer_address,
    check_checksum,
    check_version,
    encode_header_into,
    iter_pieces,
    open_regular,
    payload_checksum,
    stored_size,
    verify_page,
)
from hicache_localdisk.fsio import (
    DIRECT_ALIGN,
    IO_CHUNK,
    O_DIRECT,
    FailureLog,
    aligned_buffer,
    fsync_dir,
    publish_noreplace,
    read_fully,
    read_page,
    remove,
    touch,
    write_fully,
    write_page,
)
from hicache_localdisk.layout import Layout

__all__ = ["PARALLEL_HASH_MIN_BYTES", "SYNCED", "PageIO", "ReadResult"]

log = logging.getLogger(__name__)

#: Statuses of a page that is stored after a put (by this call or another writer).
SYNCED = (PageStatus.OK, PageStatus.ALREADY_EXISTS)

#: Pages at least this large are checksummed on a helper thread while the payload is written
#: (xxh3 releases the GIL), and read in pieces by helper threads when read alone; below it the
#: hand-off costs more than it hides.
PARALLEL_HASH_MIN_BYTES = 1 << 20
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


class ReadResult(enum.Enum):
    """Outcome of reading one page file (richer than a status: the backend acts on it)."""

    OK = "ok"
    MISSING = "missing"
    CORRUPT = "corrupt"
    #: A newer writer's page (see ``pageformat.check_version``): a miss, left in place.
    UNKNOWN_VERSION = "unknown_version"
    FAILED = "failed"
    #: Something else under the page's name (FIFO, socket, device, directory, symlink): a miss
    #: that is never read, followed or removed.
    NOT_REGULAR = "not_regular"


class PageIO:
    """Per-page system calls for one namespace; thread-safe (buffers are per thread)."""

    def __init__(
        self,
        layout: Layout,
        page_bytes: int,
        *,
        file_mode: int,
        fsync: bool,
        direct: bool,
        verify: bool,
        hash_threads: int = 4,
    ) -> None:
        self._layout = layout
        self._ns = layout.namespace
        self._page_bytes = page_bytes
        self.stored_bytes = stored_size(page_bytes)
        self._file_mode = file_mode
        # open(2) applies the umask; modes wider than owner-only need an explicit fchmod.
        self._chmod = bool(file_mode & 0o077)
        self._fsync = fsync
        self.direct = direct
        self._verify = verify
        self._local = threading.local()
        #: Set after the first EROFS/EPERM on a recency touch: stop trying on this filesystem.
        self._touch_off = False
        self._log_failure = FailureLog(log)
        self._hasher: ThreadPoolExecutor | None = None
        self._writers = 0
        self._writers_lock = threading.Lock()
        #: A read holds the helper threads (see ``_claim_helpers``).
        self._splitting = False
        if page_bytes >= PARALLEL_HASH_MIN_BYTES:
            self._hasher = ThreadPoolExecutor(hash_threads, thread_name_prefix="hicache-xxh3")

    def _header(self) -> memoryview:
        buf: memoryview | None = getattr(self._local, "header", None)
        if buf is None:
            # An anonymous mapping is page-aligned, as O_DIRECT needs for every iovec.
            buf = self._local.header = aligned_buffer(HEADER_SIZE)
        return buf

    def close(self) -> None:
        """Stop the hashing threads (idempotent)."""
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)
            self._hasher = None

    def _write_page(self, fd: int, key: str, src: PageParts, direct: bool) -> None:
        header = self._header()
        hasher = self._hasher
        with self._writers_lock:
            self._writers += 1
            # A helper thread only helps while cores are idle: each such put keeps two busy, and
            # on a small machine sharing its cores (measured on 2 vCPUs) the cache-hot inline
            # hash wins, so ask for plenty of spare cores.
            parallel = hasher is not None and 4 * self._writers <= _CORES
        try:
            if not parallel or hasher is None:
                if direct:
                    # O_DIRECT copies nothing through the CPU cache: pieces would only split
                    # one large device write.
                    checksum = payload_checksum(src)
                    encode_header_into(header, self._ns, key, self._page_bytes, checksum)
                    write_fully(fd, [header, *src])
                else:
                    write_page(fd, header, src, partial(self._seal, header, key))
                return
            # The checksum pass costs as much CPU as the copy into the page cache: run it on
            # another core while this thread writes the payload, then write the header.
            pending = hasher.submit(payload_checksum, src)
            try:
                for off, piece in iter_pieces(src, IO_CHUNK):  # pieces: see fsio.write_page
                    write_fully(fd, [piece], HEADER_SIZE + off)
            finally:
                # Never return while a worker still reads the caller's buffer.
                wait([pending])
            encode_header_into(header, self._ns, key, self._page_bytes, pending.result())
            write_fully(fd, [header], 0)
        finally:
            with self._writers_lock:
                self._writers -= 1

    def _seal(self, header: memoryview, key: str, checksum: int) -> None:
        encode_header_into(header, self._ns, key, self._page_bytes, checksum)

    def _direct_ok(self, parts: PageParts) -> bool:
        # Every iovec of an O_DIRECT transfer must start aligned, and every one but the last
        # must end aligned too.
        return self.direct and all(
            buffer_address(part) % DIRECT_ALIGN == 0
            and (i == len(parts) - 1 or part.nbytes % DIRECT_ALIGN == 0)
            for i, part in enumerate(parts)
        )

    # ------------------------------------------------------------------ put

    def write(
        self, key: str, src: PageParts, mtime_ns: int, reuse: str | None = None
    ) -> PageStatus:
        """Store one page create-only: ``OK``, ``ALREADY_EXISTS`` or ``FAILED`` (logged).

        ``reuse``: a retired page file of this size (a temporary of this process, see
        :mod:`hicache_localdisk.spares`) to overwrite instead of creating one; it is this
        call's from now on (published, or unlinked)."""
        direct = self._direct_ok(src)
        fd = self._open_spare(reuse, direct) if reuse is not None else None
        reused = fd is not None
        tmp = reuse if reuse is not None and reused else self._layout.temp_path(key)
        if fd is None:
            try:
                fd = os.open(tmp, _WRITE_FLAGS | (O_DIRECT if direct else 0), self._file_mode)
            except OSError as exc:
                self._log_failure("put", key, exc)
                return PageStatus.FAILED
        try:
            try:
                self._write_page(fd, key, src, direct)
                if self._chmod or reused:  # a reused file keeps the mode it was created with
                    os.fchmod(fd, self._file_mode)
                # Tail-first mtimes (set by the caller) let a restart rebuild chain-aware recency.
                os.utime(fd, ns=(mtime_ns, mtime_ns))
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            published = publish_noreplace(tmp, self._layout.page_path(key))
        except OSError as exc:
            # ENOSPC, EROFS, EIO...: this page fails; the temporary must not linger.
            self._log_failure("put", key, exc)
            remove(tmp)
            return PageStatus.FAILED
        if not published:
            remove(tmp)
            return PageStatus.ALREADY_EXISTS
        return PageStatus.OK

    @staticmethod
    def _open_spare(path: str, direct: bool) -> int | None:
        """Open a retired page file for overwriting (same size: nothing to truncate); None
        (and the file gone) when that fails: the put creates a file as usual."""
        try:
            return os.open(path, os.O_WRONLY | os.O_CLOEXEC | (O_DIRECT if direct else 0))
        except OSError as exc:
            log.debug("cannot reuse %s: %s", path, exc)
            remove(path)
            return None

    # ------------------------------------------------------------------ get

    def read(
        self, key: str, dst: PageParts, touch_ns: int | None, *, split: bool = False
    ) -> tuple[ReadResult, str]:
        """Read and verify one page into ``dst``; ``dst`` is untouched when ``MISSING``.

        ``split``: read a large page's pieces on the helper threads while this thread hashes
        them (for a page read alone; a batch already spreads its pages over the I/O threads).
        Returns the outcome and, for ``CORRUPT``, the field that failed verification.
        """
        path = self._layout.page_path(key)
        flags = O_DIRECT if self._direct_ok(dst) else 0
        try:
            opened = open_regular(path, flags)
        except FileNotFoundError:
            return ReadResult.MISSING, ""
        except OSError as exc:
            self._log_failure("get", key, exc)
            return ReadResult.FAILED, ""
        if opened is None:
            return ReadResult.NOT_REGULAR, ""
        fd = opened
        try:
            header = self._header()
            # O_DIRECT reads stay whole: pieces would turn one large device read into many.
            hashed = self._verify and not flags & O_DIRECT
            if flags & O_DIRECT:
                n, checksum = read_fully(fd, [header, *dst]), 0
            elif split and self._claim_helpers():
                try:
                    n, checksum = read_page(
                        fd, header, dst, hash_payload=hashed, helpers=self._hasher
                    )
                finally:
                    with self._writers_lock:
                        self._splitting = False
            else:
                n, checksum = read_page(fd, header, dst, hash_payload=hashed)
            if n != self.stored_bytes:
                check_version(header[: min(n, HEADER_SIZE)])  # a newer page may be sized apart
                raise PageCorruptError("length", f"file has {n} bytes, not {self.stored_bytes}")
            decoded = verify_page(
                header, dst, namespace=self._ns, key=key, check_payload=self._verify and not hashed
            )
            if hashed:
                check_checksum(decoded, checksum)
            if touch_ns is not None and not self._touch_off:
                self._touch_off = not touch(fd, touch_ns, "page")
        except PageCorruptError as exc:
            return ReadResult.CORRUPT, exc.field
        except PageVersionError as exc:
            return ReadResult.UNKNOWN_VERSION, exc.detail
        except OSError as exc:
            self._log_failure("get", key, exc)
            return ReadResult.FAILED, ""
        finally:
            os.close(fd)
        return ReadResult.OK, ""

    def _claim_helpers(self) -> bool:
        """Whether this read may spread over the helper threads: they exist and no other read
        holds them (single-page reads from several threads are parallel already; splitting each
        would only queue their pieces behind one another)."""
        with self._writers_lock:
            if self._hasher is None or self._splitting:
                return False
            self._splitting = True
            return True

    def page_size_on_disk(self, key: str) -> int | None:
        """Size of the published file of ``key``, ``None`` when there is none (or what is
        there is not a regular file)."""
        try:
            st = os.stat(self._layout.page_path(key), follow_symlinks=False)
        except OSError:
            return None
        return st.st_size if S_ISREG(st.st_mode) else None

    def sync_dirs(
        self, keys: Sequence[str], todo: list[int], statuses: list[PageStatus | None]
    ) -> None:
        """One ``fsync`` per directory that received a page: then the batch is power-loss safe.

        A page another writer published first (``ALREADY_EXISTS`` from the rename) was synced
        before its rename, but its directory entry maybe not yet: sync that directory too.
        """
        dirs = {self._layout.dir_of(keys[i]) for i in todo if statuses[i] in SYNCED}
        for d in sorted(dirs):
            try:
                fsync_dir(d)
            except OSError as exc:
                log.warning("fsync of %s failed: %s", d, exc)
                for i in todo:
                    if statuses[i] in SYNCED and self._layout.dir_of(keys[i]) == d:
                        # Visible but not durable: report failure; the file may stay (harmless).
                        statuses[i] = PageStatus.FAILED
