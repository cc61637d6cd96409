"""The system calls the backend (and its raw baseline) use, wrapped once.

- ``write_fully(fd, bufs)``        ``pwritev`` until every byte is written
- ``read_fully(fd, bufs)``         ``preadv`` until the buffers are full or the file ends
- ``write_page(fd, hdr, payload)``  a page file in pieces, hashing each right after its copy
- ``read_page(fd, hdr, payload)``   a page file in pieces, hashing each as it lands (pieces
                                   optionally read by helper threads, hashed in order)
- ``read_cached(fd, bufs)``        what the page cache holds of a file, in one call
  (``payload`` of both: one buffer or a page's regions, written/read back to back)
- ``publish_noreplace(tmp, dst)``  atomic create-only publish: ``renameat2(RENAME_NOREPLACE)``,
                                   else ``link`` + ``unlink``; ``False`` when ``dst`` exists
- ``fsync_dir(path)``              make a directory's entries durable
- ``drop_cache(path)``             evict a file's pages from the page cache (cold reads)
- ``aligned_buffer(n)``            a page-aligned writable buffer (an anonymous mapping)
- ``punch_hole(fd, off, n)``       free a file's bytes in place (``fallocate`` PUNCH_HOLE)
- ``punch_supported(dir)``         whether the filesystem of ``dir`` can punch holes
- ``touch(fd, ns, what)``          set a file's mtime (recency after a restart); ``False`` once
                                   the filesystem refuses it for good
- ``FailureLog(logger)``           warn once per (operation, errno), the rest at debug level
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor, wait

import xxhash

from hicache.storage import Regions, iter_pieces

__all__ = [
    "DIRECT_ALIGN",
    "O_DIRECT",
    "FailureLog",
    "aligned_buffer",
    "drop_cache",
    "fsync_dir",
    "publish_noreplace",
    "punch_hole",
    "punch_supported",
    "read_cached",
    "read_fully",
    "read_page",
    "remove",
    "touch",
    "write_fully",
    "write_page",
]

log = logging.getLogger(__name__)

#: Alignment ``O_DIRECT`` needs for addresses, offsets and lengths (covers 512 B and 4 KiB
#: logical blocks).
DIRECT_ALIGN = 4096
O_DIRECT: int = getattr(os, "O_DIRECT", 0)
#: Piece of a read: fits the L2 cache, so hashing reads what the copy just wrote there. Measured
#: against 1 MiB (the L2 size) on 8 MiB pages, 4 threads, 2 loaded vCPUs, the same process
#: alternating: 1 MiB pieces cost 4-11% less CPU per hot read of pages the page cache held
#: long, but a cold read in 1 MiB pieces left pages whose next (first hot) read cost 20-25%
#: more CPU than after a cold read in 256 KiB pieces (4.3-4.5 vs 5.5-5.6 GB per CPU second):
#: the piece of the cold read decides, the hot read's piece hardly matters there.
READ_CHUNK = 256 << 10
#: Piece of a read split over helper threads: large enough that a hand-off (~20 us) stays small
#: next to the copy it starts.
SPLIT_CHUNK = 1 << 20
#: Piece of a write: half of a 2 MiB L2, measured best among 256 KiB..whole page.
IO_CHUNK = 1 << 20
#: Below this a page is written with one pwritev (a second system call would cost more).
SMALL_IO = 64 << 10

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
#: ``fallocate`` modes (linux/falloc.h): free a range, the file keeping its size.
_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2
#: Buffers one ``pwritev``/``preadv`` may take (the kernel refuses more with EINVAL).
IOV_MAX: int = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def write_fully(fd: int, bufs: list[memoryview], offset: int = 0) -> None:
    """Write every byte of ``bufs`` at ``offset`` with as few ``pwritev`` calls as possible."""
    if len(bufs) > IOV_MAX:  # a pack of many pages of many regions
        for start in range(0, len(bufs), IOV_MAX):
            group = bufs[start : start + IOV_MAX]
            write_fully(fd, group, offset)
            offset += sum(b.nbytes for b in group)
        return
    total = sum(b.nbytes for b in bufs)
    done = os.pwritev(fd, bufs, offset)
    while done < total:
        # Short writes are rare (signals, a filesystem at its limits): continue where it stopped.
        rest = _after(bufs, done)
        n = os.pwritev(fd, rest, offset + done)
        if n == 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        done += n


def read_fully(fd: int, bufs: list[memoryview], offset: int = 0) -> int:
    """Fill ``bufs`` from ``offset``; return the bytes read (less than asked only at EOF)."""
    if len(bufs) > IOV_MAX:
        done = 0
        for start in range(0, len(bufs), IOV_MAX):
            group = bufs[start : start + IOV_MAX]
            want = sum(b.nbytes for b in group)
            n = read_fully(fd, group, offset + done)
            done += n
            if n < want:
                break
        return done
    total = sum(b.nbytes for b in bufs)
    done = os.preadv(fd, bufs, offset)
    while 0 < done < total:
        n = os.preadv(fd, _after(bufs, done), offset + done)
        if n == 0:
            break
        done += n
    return done


def write_page(
    fd: int, header: memoryview, payload: Regions, seal: Callable[[int], None] | None
) -> None:
    """Write a page file: ``header`` at offset 0, ``payload`` (its regions back to back) after it.

    ``seal(checksum)`` fills ``header`` from the payload's xxh3_64 (seed 0) before the header is
    written; ``None`` writes ``header`` as it is and hashes nothing (the raw baseline). Small
    payloads go in one ``pwritev([header, *regions])``, hashed first. Larger ones go payload
    first in ``IO_CHUNK`` pieces, each hashed right after the kernel copied it (still in cache:
    ~10% less CPU than hashing first), then the header: measured on Linux 6.18, one 8 MiB
    buffered ``pwritev`` is several times slower than the same bytes in 1 MiB calls.
    """
    regions = [payload] if isinstance(payload, memoryview) else list(payload)
    if sum(r.nbytes for r in regions) < SMALL_IO:
        if seal is not None:
            digest = xxhash.xxh3_64()
            for region in regions:
                digest.update(region)
            seal(digest.intdigest())
        write_fully(fd, [header, *regions])
        return
    hasher = xxhash.xxh3_64() if seal is not None else None
    for off, view in iter_pieces(regions, IO_CHUNK):
        write_fully(fd, [view], header.nbytes + off)
        if hasher is not None:
            hasher.update(view)
    if seal is not None and hasher is not None:
        seal(hasher.intdigest())
    write_fully(fd, [header], 0)


def read_page(
    fd: int,
    header: memoryview,
    payload: Regions,
    *,
    hash_payload: bool,
    helpers: Executor | None = None,
) -> tuple[int, int]:
    """Read ``header`` then ``payload`` (its regions back to back) from offset 0 in pieces,
    hashing each piece (xxh3_64, seed 0) right after it lands when ``hash_payload``: a verified
    read then costs about one pass over memory instead of two, and cold reads of large pages run
    faster in pieces than in one call. Returns (bytes read, checksum or 0); the checksum is
    meaningless when the file was shorter than the page.

    With ``helpers``, every piece after the first is read by a helper thread (``SPLIT_CHUNK``
    pieces) while this one reads the first and then hashes them in order as they land: the
    kernel's copy runs on several cores and the hash hides behind it (both release the GIL). It
    returns only once every helper read finished, whatever happened.

    An unhashed read without helpers first takes what the page cache holds in one
    ``RWF_NOWAIT`` call (see :func:`read_cached`): a hot page costs one system call, and only
    the bytes not cached yet are read, in pieces. A hashed read stays in pieces even when hot:
    hashing each piece while it sits in the L2 cache cost less than one call and a hash of the
    whole page from memory (8 MiB pages, 4 threads, 2 vCPUs: 7.5 vs 6.9 GB per CPU second).
    """
    if not hash_payload and helpers is None:
        bufs = [header, *([payload] if isinstance(payload, memoryview) else payload)]
        done = read_cached(fd, bufs)
        if done:
            for off, view in iter_pieces(_after(bufs, done), READ_CHUNK):
                n = read_fully(fd, [view], done + off)
                if n < view.nbytes:
                    return done + off + n, 0
            return sum(b.nbytes for b in bufs), 0
    if helpers is None:
        return _read_hashed(fd, header, payload, xxhash.xxh3_64() if hash_payload else None)
    digest = xxhash.xxh3_64() if hash_payload else None
    pieces = list(iter_pieces(payload, SPLIT_CHUNK))
    if not pieces:
        got = read_fully(fd, [header])
        return got, digest.intdigest() if digest is not None else 0
    start = header.nbytes
    later = [helpers.submit(read_fully, fd, [view], start + off) for off, view in pieces[1:]]
    try:
        first = pieces[0][1]
        got = read_fully(fd, [header, first])
        if got < start + first.nbytes:
            return got, 0
        if digest is not None:
            digest.update(first)
        end = got
        for j, (off, view) in enumerate(pieces[1:]):
            n = later[j].result()
            if n < view.nbytes:
                return start + off + n, 0
            if digest is not None:
                digest.update(view)
            end = start + off + view.nbytes
        return end, digest.intdigest() if digest is not None else 0
    finally:
        # Never return while a helper still writes into the caller's buffer.
        wait(later)


def _read_hashed(
    fd: int, header: memoryview, payload: Regions, digest: xxhash.xxh3_64 | None
) -> tuple[int, int]:
    """``read_page`` on this thread alone: ``[header, first piece]`` in one call, then the other
    ``READ_CHUNK`` pieces, each hashed right after it lands (``digest``; ``None``: a cold
    unhashed read). Per piece the loop calls ``preadv`` directly and only a short
    read takes :func:`read_fully`: beside the copy and the hash, that is all the Python a
    piece costs."""
    pieces = iter_pieces(payload, READ_CHUNK)
    first = next(pieces, None)
    bufs = [header] if first is None else [header, first[1]]
    pos = read_fully(fd, bufs)
    if pos < sum(b.nbytes for b in bufs):
        return pos, 0
    update = digest.update if digest is not None else None
    if update is not None and first is not None:
        update(first[1])
    preadv = os.preadv
    for _off, view in pieces:
        want = view.nbytes
        n = preadv(fd, [view], pos)
        if 0 < n < want:  # a signal or a filesystem at its limits: continue where it stopped
            n += read_fully(fd, [view[n:]], pos + n)
        if n < want:
            return pos + n, 0
        if update is not None:
            update(view)
        pos += want
    return pos, digest.intdigest() if digest is not None else 0


#: Whether ``preadv`` takes ``RWF_NOWAIT`` here (cleared on the first EOPNOTSUPP/EINVAL).
_nowait_reads = hasattr(os, "RWF_NOWAIT")


def read_cached(fd: int, bufs: list[memoryview]) -> int:
    """Fill ``bufs`` from offset 0 with what the page cache already holds, in one
    ``preadv(RWF_NOWAIT)``; return the bytes read: 0 when the first page is not cached (or the
    filesystem cannot tell), fewer than asked when a later one is not or the file ends.

    A hot 8 MiB page read in ``READ_CHUNK`` pieces pays 32 system calls (and 32 GIL round
    trips) where one does; a cold one still goes in pieces, which the device reads faster.
    """
    global _nowait_reads
    if not _nowait_reads:
        return 0
    try:
        return os.preadv(fd, bufs, 0, os.RWF_NOWAIT)
    except BlockingIOError:  # EAGAIN: nothing cached at offset 0
        return 0
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        _nowait_reads = False
        log.info("preadv(RWF_NOWAIT) unsupported here (%s): hot reads go in pieces too", exc)
        return 0


def _after(bufs: list[memoryview], skip: int) -> list[memoryview]:
    rest: list[memoryview] = []
    for b in bufs:
        if skip >= b.nbytes:
            skip -= b.nbytes
            continue
        rest.append(b[skip:] if skip else b)
        skip = 0
    return rest


class _Renamer:
    """``renameat2(..., RENAME_NOREPLACE)`` through libc, with a one-time fallback."""

    def __init__(self) -> None:
        self._fn: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_uint,
            ]
            fn.restype = ctypes.c_int
            self._fn = fn
        except AttributeError:
            log.info("libc has no renameat2: publishing pages with link + unlink")
        self._unsupported: set[int] = set()
        self._lock = threading.Lock()

    def publish(self, tmp: str, dst: str) -> bool:
        fn = self._fn
        if fn is not None:
            dev = os.stat(tmp).st_dev if self._unsupported else -1
            if dev not in self._unsupported:
                # ctypes.CDLL releases the GIL around the call.
                rc = fn(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
                if rc == 0:
                    return True
                err = ctypes.get_errno()
                if err == errno.EEXIST:
                    return False
                if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise OSError(err, os.strerror(err), tmp)
                with self._lock:
                    self._unsupported.add(os.stat(tmp).st_dev)
                log.info("filesystem of %s lacks RENAME_NOREPLACE: using link + unlink", tmp)
        # link() fails with EEXIST instead of replacing: the same create-only guarantee.
        try:
            os.link(tmp, dst)
        except FileExistsError:
            return False
        os.unlink(tmp)
        return True


_renamer = _Renamer()


def publish_noreplace(tmp: str, dst: str) -> bool:
    """Move ``tmp`` to ``dst`` atomically unless ``dst`` exists; ``False`` (``tmp`` kept) if so."""
    return _renamer.publish(tmp, dst)


def fsync_dir(path: str) -> None:
    """``fsync`` a directory so the entries created or renamed in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cache(path: str) -> None:
    """Write back and drop ``path``'s cached pages so the next read comes from the device."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # DONTNEED skips dirty pages: write them back first.
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def aligned_buffer(nbytes: int) -> memoryview:
    """A zeroed, page-aligned, writable buffer of ``nbytes`` (an anonymous private mapping)."""
    return memoryview(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))


def remove(path: str, failed: list[str] | None = None) -> bool:
    """Unlink ``path``; True if this call removed it. A missing file is fine; another failure
    is logged (and ``path`` appended to ``failed``), never raised: the caller is cleaning up
    after work that already succeeded or failed on its own."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)
        if failed is not None:
            failed.append(path)
        return False
    return True


class _Puncher:
    """``fallocate(PUNCH_HOLE | KEEP_SIZE)`` through libc (``os`` has no hole punching)."""

    def __init__(self) -> None:
        self._fn: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]
        try:
            fn = ctypes.CDLL(None, use_errno=True).fallocate
        except AttributeError:
            return
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int
        self._fn = fn

    def punch(self, fd: int, offset: int, length: int) -> None:
        fn = self._fn
        if fn is None:
            raise OSError(errno.EOPNOTSUPP, "libc has no fallocate")
        # ctypes.CDLL releases the GIL around the call.
        if fn(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


_puncher = _Puncher()


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free ``length`` bytes of ``fd`` at ``offset`` (they read back as zeros; the file keeps
    its size); raises ``OSError`` (``EOPNOTSUPP`` where the filesystem cannot)."""
    _puncher.punch(fd, offset, length)


def punch_supported(directory: str) -> bool:
    """Whether files in ``directory`` can have holes punched: a probe file of two 4 KiB blocks,
    the first punched; ``False`` (with the reason logged) where that fails."""
    probe = f"{directory}/.hicache-punch-probe-{os.getpid()}-{threading.get_ident()}"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        log.info("cannot probe hole punching under %s: %s", directory, exc)
        return False
    try:
        try:
            os.pwrite(fd, b"\xff" * (2 * DIRECT_ALIGN), 0)
            punch_hole(fd, 0, DIRECT_ALIGN)
            ok = os.pread(fd, DIRECT_ALIGN, 0) == bytes(DIRECT_ALIGN)
        finally:
            os.close(fd)
    except OSError as exc:
        log.info("cannot punch holes in files under %s: %s", directory, exc)
        ok = False
    remove(probe)
    if not ok:
        log.info("%s: pages are stored one file each (no hole punching)", directory)
    return ok


def touch(fd: int, ns: int, what: str) -> bool:
    """Set the mtime of ``fd`` to ``ns`` (what a restart rebuilds recency from); ``False`` when
    the filesystem refuses it for good (read-only, not ours): the caller stops trying and keeps
    recency in memory only. Any other error skips this one update."""
    try:
        os.utime(fd, ns=(ns, ns))
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EPERM, errno.EACCES):
            log.info("cannot update %s mtimes (%s): recency is kept in memory only", what, exc)
            return False
    return True


class FailureLog:
    """Warns once per (operation, errno) and logs the rest at debug level: a full or read-only
    disk fails every call, and one warning says so while the log stays readable."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._seen: set[tuple[str, int | None]] = set()

    def __call__(self, op: str, what: str, exc: OSError) -> None:
        seen = (op, exc.errno)
        first = seen not in self._seen
        self._seen.add(seen)
        (self._log.warning if first else self._log.debug)("%s %s failed: %s", op, what, exc)
