"""Pack files: the small new pages of one put in one file (single-process mode).

- ``PackFiles(layout, page_bytes, ...)``  one per backend instance whose pages are packed
- ``write(keys, srcs, mtime_ns)``         the new pages of a put: one ``pwritev``, one rename
- ``reading(keys)``                       a batch of reads: where each key is, and no record
                                          they read is punched before they end
- ``read(keys, dsts, where, touch_ns)``   read and verify packed pages, one open per pack
- ``forget(keys)`` / ``flush()``          evicted or deleted pages: their records are punched
                                          (grouped by pack), a pack whose last record goes is
                                          unlinked
- ``drop(where)``                         pages a read found gone: forgotten, nothing punched
- ``load(records, extra)``               what ``open()`` found on disk
                                          (:func:`hicache_localdisk.startup.scan_packs`)

Why: a page file costs ~8 system calls to publish (open, pwritev, utime, close, rename, and the
eviction of a victim) and 3 to read, each a round trip of the GIL; at 8 KiB pages the replay
spent its time there, not in the bytes. A pack holds the new pages of one put as consecutive
records, each exactly a page file's bytes (4 KiB header + payload: self-describing, 4 KiB
aligned when the payload is), written with one ``pwritev`` into a temporary and published with
one create-only rename. Capacity stays per page: an evicted page's record is punched out
(``fallocate(PUNCH_HOLE)``), so the disk follows the accounting, and the pack goes with its
last record.

Readers: a read names its keys (and learns their records) under the lock evictions take, and
the punch of a record whose key a read in flight named waits until that read ends: a read never
sees a record go to zeros under it. Records are never rewritten (a pack is immutable once
published, its offsets never reused), so a record a read located is that key's bytes or, after
its eviction, still that key's bytes until the read ends.

Emptied packs are reused (not with ``durability: fsync``, as for page files in
:mod:`hicache_localdisk.spares`): a pack whose last record goes is renamed to a temporary of this
process and truncated to nothing, and the next pack is written into it, so a put creates no
file. On ext4 creating a file
right after others were deleted cost ~0.9 ms of kernel time here (the inode allocator scans the
inodes freed recently), more than everything else a put of 20 small pages does. No read can
hold an emptied pack: a record a read named is not punched before that read ends.

Writers of one key at once: the first pack to register the key after its rename holds it; a
later one's record of that key is ``ALREADY_EXISTS`` and is punched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import count

from hicache.errors import PageCorruptError
from hicache.storage import (
    HEADER_SIZE,
    PAGE_MAGIC,
    PageParts,
    PageStatus,
    encode_headers_into,
    open_regular,
    payload_checksums,
    stored_size,
    verify_pages,
)
from hicache_localdisk.fsio import (
    FailureLog,
    fsync_dir,
    publish_noreplace,
    punch_hole,
    read_fully,
    remove,
    touch,
    write_fully,
)
from hicache_localdisk.layout import Layout, ScannedRecord
from hicache_localdisk.pageio import ReadResult

__all__ = ["Pack", "PackFiles", "Record", "punch_records"]

log = logging.getLogger(__name__)

_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
#: Emptied packs kept for reuse at most (the rest are unlinked).
_MAX_SPARES = 16
#: Headers a thread's header buffer holds at least (a backend call's pages at most).
_HEADERS_KEPT = 64
ZERO_MAGIC = bytes(len(PAGE_MAGIC))


@dataclass(eq=False, slots=True)
class Pack:
    """A published pack file and how many of its records are not punched yet."""

    path: str
    #: records still holding bytes: live, or forgotten and waiting for their punch
    remaining: int
    #: the pack's mtime (its records' recency after a restart); a punch changes the file's
    #: mtime, so it is set back to this after each
    mtime_ns: int
    #: punches of its records in flight (an ``fd`` open on it): while any, an emptied pack is
    #: unlinked, never reused (a punch could land in the next pack's records)
    punching: int = 0


#: Where a packed page is: its pack and the record's offset there.
Record = tuple[Pack, int]


def punch_records(path: str, offsets: Sequence[int], stored: int, mtime_ns: int) -> None:
    """Punch records of the pack at ``path`` (one open), then set its mtime back to
    ``mtime_ns`` (the recency of the records left); failures are logged."""
    if not offsets:
        return
    try:
        # not through a symlink, nor blocked on a FIFO, planted under the pack's name
        fd = open_regular(path, os.O_WRONLY)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("cannot punch records of %s: %s", path, exc)
        return
    if fd is None:
        return  # not a pack of ours any more: nothing to punch
    try:
        # adjacent records go in one punch: evictions take a batch's tail together
        start = end = -1
        for off in sorted(offsets):
            if off != end:
                if end > start:
                    punch_hole(fd, start, end - start)
                start = off
            end = off + stored
        punch_hole(fd, start, end - start)
        os.utime(fd, ns=(mtime_ns, mtime_ns))
    except OSError as exc:
        log.warning("cannot punch records of %s: %s", path, exc)
    finally:
        os.close(fd)


class PackFiles:
    """Packed pages of one namespace: where each is, and the punches they are owed.

    Thread-safe; ``located`` may be read without the lock (dict lookups are atomic)."""

    def __init__(
        self,
        layout: Layout,
        page_bytes: int,
        *,
        file_mode: int,
        fsync: bool,
        verify: bool,
        reuse: bool = False,
    ) -> None:
        self._layout = layout
        self._ns = layout.namespace
        self._page_bytes = page_bytes
        self.stored_bytes = stored_size(page_bytes)
        self._file_mode = file_mode
        self._chmod = bool(file_mode & 0o077)  # open(2) applies the umask
        self._fsync = fsync
        self._verify = verify
        self._lock = threading.Lock()
        self.located: dict[str, Record] = {}
        #: keys of the reads in flight (how many reads each)
        self._reading: dict[str, int] = {}
        #: records of forgotten keys a read in flight named: punched when the last such ends
        self._deferred: dict[str, list[Record]] = {}
        self._punch: list[Record] = []
        #: emptied packs, renamed to temporaries of this process and truncated, for the next
        #: writes; None: no reuse
        self._spares: list[str] | None = [] if reuse else None
        self._local = threading.local()
        self._seq = count()
        self._touch_off = False
        self._log_failure = FailureLog(log)

    # ------------------------------------------------------------------ open

    def load(self, records: Sequence[ScannedRecord], extra: Sequence[ScannedRecord]) -> None:
        """Take over the records ``open()`` kept (one per key); ``extra`` records (duplicates)
        are owed a punch (:meth:`flush`)."""
        packs: dict[str, Pack] = {}
        located: dict[str, Record] = {}
        owed: list[Record] = []
        for recs, live in ((records, True), (extra, False)):
            for rec in recs:
                pack = packs.get(rec.path)
                if pack is None:
                    pack = packs[rec.path] = Pack(rec.path, 0, rec.pack_mtime_ns)
                pack.remaining += 1
                if live:
                    located[rec.key] = (pack, rec.offset)
                else:
                    owed.append((pack, rec.offset))
        with self._lock:
            self.located = located
            self._punch = owed

    def clear(self) -> None:
        """Forget everything and unlink the spare packs (on close)."""
        with self._lock:
            self.located = {}
            self._punch = []
            self._deferred = {}
            spares, self._spares = self._spares, [] if self._spares is not None else None
        for path in spares or []:
            remove(path)

    # ------------------------------------------------------------------ put

    def write(
        self, keys: Sequence[str], srcs: Sequence[PageParts], mtime_ns: int
    ) -> list[PageStatus]:
        """Store distinct ``keys`` as one pack: ``OK`` for each key this pack now holds,
        ``ALREADY_EXISTS`` where another writer's pack holds it, all ``FAILED`` (logged, no
        temporary left) when the pack could not be written."""
        block, headers = self._headers(len(keys))
        # every header of the pack in one pass over one buffer: checked once, not per page
        encode_headers_into(block, self._ns, keys, self._page_bytes, payload_checksums(srcs))
        iov: list[memoryview] = []
        for header, src in zip(headers, srcs, strict=True):
            iov.append(header)
            iov += src
        path = self._layout.pack_path(keys[0], f"{time.time_ns():x}-{next(self._seq):x}")
        fd, tmp = self._open_spare()
        if fd is None:
            tmp = self._layout.temp_path(keys[0])
            try:
                fd = os.open(tmp, _WRITE_FLAGS, self._file_mode)
            except OSError as exc:
                self._log_failure("put", keys[0], exc)
                return [PageStatus.FAILED] * len(keys)
        try:
            try:
                write_fully(fd, iov)
                if self._chmod:
                    os.fchmod(fd, self._file_mode)
                # The pack's mtime is the recency a restart gives its records (head newest).
                os.utime(fd, ns=(mtime_ns, mtime_ns))
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if not publish_noreplace(tmp, path):
                raise FileExistsError(path)
            if self._fsync:
                try:
                    fsync_dir(os.path.dirname(path))
                except OSError:
                    remove(path)  # visible but not durable: never reported stored
                    raise
        except OSError as exc:
            # ENOSPC, EROFS, EIO...: every page of the pack fails; no temporary may linger.
            self._log_failure("put", keys[0], exc)
            remove(tmp)
            return [PageStatus.FAILED] * len(keys)
        stored = self.stored_bytes
        pack = Pack(path, len(keys), mtime_ns)
        statuses: list[PageStatus] = []
        with self._lock:
            located = self.located
            for j, key in enumerate(keys):
                if key in located:  # another writer's pack was registered first
                    statuses.append(PageStatus.ALREADY_EXISTS)
                    self._punch.append((pack, j * stored))
                else:
                    located[key] = (pack, j * stored)
                    statuses.append(PageStatus.OK)
        return statuses

    def _open_spare(self) -> tuple[int | None, str]:
        """An emptied (truncated) pack to write into: (fd, its temporary path); fd None when
        there is none (or it cannot be opened: then it is gone)."""
        if not self._spares:
            return None, ""
        with self._lock:
            if not self._spares:
                return None, ""
            tmp = self._spares.pop()
        try:
            fd = open_regular(tmp, os.O_WRONLY)
        except OSError as exc:
            log.debug("cannot reuse %s: %s", tmp, exc)
            fd = None
        if fd is None:
            remove(tmp)
            return None, ""
        return fd, tmp

    def _headers(self, n: int) -> tuple[memoryview, list[memoryview]]:
        """This thread's header buffer (reused across calls): ``n`` headers back to back, and
        each of them."""
        local = self._local
        views: list[memoryview] | None = getattr(local, "headers", None)
        if views is None or len(views) < n:
            block = memoryview(bytearray(max(n, _HEADERS_KEPT) * HEADER_SIZE))
            views = [block[i : i + HEADER_SIZE] for i in range(0, block.nbytes, HEADER_SIZE)]
            local.block, local.headers = block, views
        return local.block[: n * HEADER_SIZE], views[:n]

    # ------------------------------------------------------------------ get

    @contextlib.contextmanager
    def reading(self, keys: Sequence[str]) -> Iterator[dict[str, Record]]:
        """Hold while reading ``keys``: yields where the packed ones are; none of those
        records is punched before this ends."""
        reading = self._reading
        with self._lock:
            located = self.located
            where = {key: located[key] for key in keys if key in located}
            for key in where:
                reading[key] = reading.get(key, 0) + 1
        try:
            yield where
        finally:
            released = False
            with self._lock:
                for key in where:
                    left = reading[key] - 1
                    if left:
                        reading[key] = left
                        continue
                    del reading[key]
                    owed = self._deferred.pop(key, None)
                    if owed:
                        self._punch += owed
                        released = True
            if released:
                self.flush()

    def read(
        self,
        keys: Sequence[str],
        dsts: Sequence[PageParts],
        where: dict[str, Record],
        touch_ns: int | None,
    ) -> list[tuple[ReadResult, str]]:
        """Read and verify the packed pages ``keys`` (each in ``where``) into ``dsts``: one
        ``open`` per pack and one ``preadv`` per run of adjacent records."""
        out: list[tuple[ReadResult, str]] = [(ReadResult.FAILED, "")] * len(keys)
        by_pack: dict[Pack, list[tuple[int, int]]] = {}
        for j, key in enumerate(keys):
            pack, off = where[key]
            by_pack.setdefault(pack, []).append((off, j))
        stored = self.stored_bytes
        for pack, recs in by_pack.items():
            try:
                fd = open_regular(pack.path)
            except FileNotFoundError:
                for _, j in recs:
                    out[j] = (ReadResult.MISSING, "")
                continue
            except OSError as exc:
                self._log_failure("get", keys[recs[0][1]], exc)
                continue
            if fd is None:
                for _, j in recs:
                    out[j] = (ReadResult.NOT_REGULAR, "")
                continue
            try:
                recs.sort()  # by offset
                _, headers = self._headers(len(recs))
                start = 0
                for n in range(1, len(recs)):
                    if recs[n][0] != recs[n - 1][0] + stored:
                        self._read_run(fd, keys, dsts, recs[start:n], headers, out)
                        start = n
                self._read_run(fd, keys, dsts, recs[start:], headers, out)
                if touch_ns is not None and not self._touch_off:
                    # A pack's mtime is its records' recency after a restart: a read renews it.
                    pack.mtime_ns = touch_ns
                    self._touch_off = not touch(fd, touch_ns, "pack")
            finally:
                os.close(fd)
        return out

    def _read_run(
        self,
        fd: int,
        keys: Sequence[str],
        dsts: Sequence[PageParts],
        run: list[tuple[int, int]],
        headers: list[memoryview],
        out: list[tuple[ReadResult, str]],
    ) -> None:
        """Read adjacent records ``run`` ((offset, index in ``keys``), by offset) with one
        ``preadv`` and verify them in one pass."""
        iov: list[memoryview] = []
        hdrs = headers[: len(run)]
        for header, (_, j) in zip(hdrs, run, strict=True):
            iov.append(header)
            iov += dsts[j]
        try:
            got = read_fully(fd, iov, run[0][0])
        except OSError as exc:
            self._log_failure("get", keys[run[0][1]], exc)
            return
        whole = min(len(run), got // self.stored_bytes)
        for _, j in run[whole:]:
            out[j] = (ReadResult.CORRUPT, "length")  # the pack was cut short
        errors = verify_pages(
            hdrs[:whole],
            [dsts[j] for _, j in run[:whole]],
            namespace=self._ns,
            keys=[keys[j] for _, j in run[:whole]],
            check_payload=self._verify,
        )
        for header, (_, j), error in zip(hdrs, run, errors, strict=False):
            if error is None:
                out[j] = (ReadResult.OK, "")
            elif header[: len(PAGE_MAGIC)] == ZERO_MAGIC:
                out[j] = (ReadResult.MISSING, "")  # zeros: punched (not by us: a power loss)
            elif isinstance(error, PageCorruptError):
                out[j] = (ReadResult.CORRUPT, error.field)
            else:
                out[j] = (ReadResult.UNKNOWN_VERSION, error.detail)

    # ------------------------------------------------------------------ evict, delete

    def forget(self, keys: Sequence[str]) -> int:
        """Forget packed pages (evicted, deleted, corrupt): their records are owed a punch
        (:meth:`flush`, or when the last read naming them ends). Returns how many were packed."""
        found = 0
        with self._lock:
            located = self.located
            reading = self._reading
            for key in keys:
                rec = located.pop(key, None)
                if rec is None:
                    continue
                found += 1
                if key in reading:
                    self._deferred.setdefault(key, []).append(rec)
                else:
                    self._punch.append(rec)
        return found

    def drop(self, where: dict[str, Record]) -> None:
        """Forget packed pages a read found gone (zeros, no pack, not a regular file): no punch
        is owed (there is nothing of ours to punch, and a read-only instance writes nothing); a
        key since stored again in another record keeps that one."""
        with self._lock:
            located = self.located
            for key, rec in where.items():
                if located.get(key) == rec:
                    del located[key]
                    rec[0].remaining -= 1

    def flush(self) -> None:
        """Punch the records owed a punch, one ``open`` per pack; unlink a pack instead when
        these are its last records."""
        if not self._punch:
            # Read without the lock (twice per put and once per get, mostly with nothing
            # owed): what this thread forgot it sees, and a record another thread forgot is
            # flushed by that thread's own call (or taken by a flush already under way, as
            # with the lock).
            return
        with self._lock:
            if not self._punch:
                return
            owed, self._punch = self._punch, []
            by_pack: dict[Pack, list[int]] = {}
            for pack, off in owed:
                by_pack.setdefault(pack, []).append(off)
            plan: list[tuple[Pack, list[int], bool, bool]] = []
            for pack, offs in by_pack.items():
                pack.remaining -= len(offs)
                last = pack.remaining <= 0
                if not last:
                    pack.punching += 1
                plan.append((pack, offs, last, last and pack.punching == 0))
        for pack, offs, last, reusable in plan:
            if not last:
                try:
                    punch_records(pack.path, offs, self.stored_bytes, pack.mtime_ns)
                finally:
                    with self._lock:
                        pack.punching -= 1
            elif not (reusable and self._keep_spare(pack)):
                remove(pack.path)

    def _keep_spare(self, pack: Pack) -> bool:
        """Rename an emptied pack to a temporary for the next write; False: not kept."""
        spares = self._spares
        if spares is None or len(spares) >= _MAX_SPARES:
            return False
        # the first key of its name names the temporary (swept as ours after a crash)
        tmp = self._layout.temp_path(os.path.basename(pack.path)[:64])
        try:
            # truncated through this descriptor: never through a symlink planted under the name
            fd = open_regular(pack.path, os.O_WRONLY)
        except OSError as exc:
            log.debug("cannot keep %s for reuse: %s", pack.path, exc)
            return False
        if fd is None:
            return False
        try:
            os.rename(pack.path, tmp)
        except OSError as exc:
            os.close(fd)
            log.debug("cannot keep %s for reuse: %s", pack.path, exc)
            return False
        try:
            # its last records' blocks go now: between calls the disk holds what is accounted
            os.ftruncate(fd, 0)
        except OSError as exc:
            log.debug("cannot keep %s for reuse: %s", tmp, exc)
            remove(tmp)
            return False
        finally:
            os.close(fd)
        with self._lock:
            spares.append(tmp)
        return True

    def paths(self) -> set[str]:
        """Paths of the packs holding live records."""
        with self._lock:
            return {pack.path for pack, _off in self.located.values()}
