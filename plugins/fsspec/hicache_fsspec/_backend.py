"""``FsspecBackend``: one hicache tier on any filesystem fsspec can open.

Layout: ``<url>/<namespace>/<key[:2]>/<key>``; each object is the core page header
(``hicache.storage.pageformat``, 4 KiB) followed by the payload. Temporary objects are named
``<url>/<namespace>/<key[:2]>/.tmp-<key>-<random>`` and are never listed as pages.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import IO, Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from hicache.errors import (
    BackendClosedError,
    BackendError,
    BackendUnavailableError,
    PageCorruptError,
    PageVersionError,
)
from hicache.storage import (
    HEADER_SIZE,
    Backend,
    BackendConfig,
    BackendContext,
    Capabilities,
    PageHeader,
    PageParts,
    PageStatus,
    StoredPage,
    check_key,
    check_namespace,
    copy_bytes,
    create_file,
    decode_header,
    encode_header,
    make_dirs,
    open_regular,
    redact_url,
    reveal,
    verify_page,
    verify_payload,
)
from hicache_fsspec._config import FsspecConfig, WriteMode

__all__ = ["FsspecBackend"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_I = TypeVar("_I")
_TMP_PREFIX = ".tmp-"
#: errno values of a filesystem that cannot hard-link (the `auto` write mode then renames).
_NO_LINK = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP})
#: Corrupt keys remembered for "log once"; past this many, corruption is only counted.
_MAX_LOGGED_CORRUPT = 4096
# Create-only under RENAME/DIRECT is a check-then-publish; these stripes make it atomic between
# all instances of this process (two tiers, or a close/reopen racing a worker), not just one.
_KEY_LOCKS = tuple(threading.Lock() for _ in range(64))


def _key_lock(key: str) -> threading.Lock:
    return _KEY_LOCKS[int(key[:4], 16) % len(_KEY_LOCKS)]


class _NotRegularError(OSError):
    """A local page name held by a FIFO, socket, device, directory or symlink."""


def _unavailable(what: str, url: str, exc: BaseException) -> BackendUnavailableError:
    # The client library's text may quote the URL it was given, userinfo included.
    detail = redact_url(str(exc))
    return BackendUnavailableError(f"fsspec {url}: {what} failed: {type(exc).__name__}: {detail}")


class FsspecBackend(Backend):
    """Pages as objects of an fsspec filesystem: ``memory://``, ``file://``, ``gcs://``, ...

    - **Writes** go to a temporary name and are published by hard link (local filesystem), by
      ``fs.mv`` or directly, per :class:`~hicache_fsspec.WriteMode`; header and payload are
      written as two ``write`` calls, never concatenated.
    - **Reads** take the header, then ``readinto`` the caller's buffer when the filesystem hands
      out private file handles with ``readinto`` (``file://``). Otherwise (``memory://``, whose
      ``open`` returns one shared handle per path; remote filesystems, whose ``readinto`` is a
      ``read`` plus a copy anyway) the whole object is fetched with ``cat_file`` and the payload
      copied once into the buffer.
    - **Verification**: every read checks the header (and, with ``verify_checksum``, the
      payload checksum); a failing page is ``CORRUPT``, counted, logged once per key and, with
      ``drop_corrupt``, deleted and reported by ``take_evicted()`` so a later put can repair it.
    - **Capabilities** depend on the protocol: ``memory://`` pages live in this process only
      (not ``persistent``, not ``shared``; they do survive ``close()`` + ``open()`` within the
      process); every other protocol is ``persistent`` and ``shared``.
    """

    config_model = FsspecConfig

    def __init__(self, config: BackendConfig, context: BackendContext) -> None:
        super().__init__(config, context)
        if not isinstance(config, FsspecConfig):  # the base class refused anything else
            raise TypeError(f"expected FsspecConfig, got {type(config).__name__}")
        self._options = config
        self._url = redact_url(config.url)
        fs_cls = fsspec.get_filesystem_class(fsspec.utils.get_protocol(config.url))
        self._in_process = issubclass(fs_cls, MemoryFileSystem)
        self._local = issubclass(fs_cls, LocalFileSystem)
        mode = config.write_mode
        if mode is WriteMode.AUTO:
            mode = WriteMode.LINK if self._local else WriteMode.RENAME
        self._write_mode = mode
        self._capabilities = Capabilities(
            persistent=not self._in_process,
            shared=not self._in_process,
            manages_capacity=False,
            max_batch=config.max_batch,
            alignment=1,
            listable=True,
            default_medium="CPU" if self._in_process else "DISK" if self._local else "EXTERNAL",
        )
        self._fs: fsspec.AbstractFileSystem | None = None
        self._base = ""
        self._root = ""
        self._pool: ThreadPoolExecutor | None = None
        self._made_dirs: set[str] = set()
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self._corrupt_logged: set[str] = set()
        self._not_regular_logged = False
        self._evicted: list[str] = []

    @property
    def capabilities(self) -> Capabilities:
        # docstring inherited
        return self._capabilities

    @property
    def filesystem(self) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem this open instance uses (for tests and storage tools)."""
        return self._require_fs()

    def page_path(self, key: str) -> str:
        """Path of ``key``'s object in :attr:`filesystem` (valid while open)."""
        self._require_fs()
        return f"{self._root}/{key[:2]}/{key}"

    # ------------------------------------------------------------------ lifecycle

    def _open(self) -> None:
        options = reveal(self._options.storage_options)
        # fsspec caches filesystem instances per process by their arguments; a private instance
        # keeps one tier's client state (sessions, credentials) from leaking into another's.
        options.setdefault("skip_instance_cache", True)
        try:
            fs, base = fsspec.url_to_fs(self._options.url, **options)
        except Exception as exc:  # any client error: bad option, unreachable endpoint, ...
            raise _unavailable("opening the filesystem", self._url, exc) from exc
        base = base.rstrip("/")
        root = f"{base}/{self.context.namespace}" if base else self.context.namespace
        if not self.context.read_only:
            try:
                self._makedirs(fs, root)
            except Exception as exc:
                raise _unavailable(f"creating {root!r}", self._url, exc) from exc
        self._fs, self._base, self._root = fs, base, root
        self._made_dirs = set()
        if self._options.io_threads > 1:
            self._pool = ThreadPoolExecutor(
                self._options.io_threads, thread_name_prefix=f"hicache-fsspec-{self._url}"
            )

    def _close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        # Calls already past the open check captured the filesystem and finish with it.
        self._fs = None

    def _require_fs(self) -> fsspec.AbstractFileSystem:
        fs = self._fs
        if fs is None:
            raise BackendClosedError(f"fsspec tier {self.context.tier_name!r} is not open")
        return fs

    # ------------------------------------------------------------------ hooks

    def _exists(self, keys: Sequence[str]) -> list[bool]:
        fs = self._require_fs()
        return self._fan_out(lambda key: self._is_stored(fs, key), list(keys))

    def _put(self, keys: Sequence[str], srcs: Sequence[PageParts]) -> list[PageStatus]:
        fs = self._require_fs()
        work = list(zip(keys, srcs, strict=True))
        statuses = self._fan_out(lambda page: self._put_one(fs, *page), work)
        self._count(f"put_{s.value}" for s in statuses)
        return statuses

    def _get_into(self, keys: Sequence[str], dsts: Sequence[PageParts]) -> list[PageStatus]:
        fs = self._require_fs()
        work = list(zip(keys, dsts, strict=True))
        statuses = self._fan_out(lambda page: self._get_one(fs, *page), work)
        self._count(f"get_{s.value}" for s in statuses)
        return statuses

    def _delete(self, keys: Sequence[str]) -> None:
        fs = self._require_fs()
        failed = self._fan_out(lambda key: self._delete_one(fs, key), list(keys))
        self._count("delete_failed" for f in failed if f)

    def _stats(self) -> Mapping[str, Any]:
        with self._counts_lock:
            counts = dict(self._counts)
        return {
            "url": self._url,
            "write_mode": self._write_mode.value,
            "io_threads": self._options.io_threads,
            **counts,
        }

    # ------------------------------------------------------------------ listing

    def _iter_pages(self) -> Iterator[StoredPage]:
        # docstring inherited
        fs = self._require_fs()
        try:
            found = fs.find(self._root, detail=True)
        except FileNotFoundError:
            return
        except Exception as exc:
            raise _unavailable("listing pages", self._url, exc) from exc
        for path, info in found.items():
            shard, _, name = path.rstrip("/").rpartition("/")
            if len(name) != 64 or shard.rpartition("/")[2] != name[:2]:
                continue
            if info.get("type") != "file" or info.get("islink"):
                continue  # a FIFO, socket or symlink under a page's name is no page
            try:
                check_key(name)
            except ValueError:
                continue
            yield StoredPage(key=name, stored_bytes=int(info.get("size") or 0))

    def _iter_namespaces(self) -> Iterator[str]:
        # docstring inherited
        fs = self._require_fs()
        try:
            entries = fs.ls(self._base or "/", detail=True)
        except FileNotFoundError:
            return
        except Exception as exc:
            raise _unavailable("listing namespaces", self._url, exc) from exc
        for entry in entries:
            if entry.get("type") != "directory":
                continue
            name = str(entry["name"]).rstrip("/").rpartition("/")[2]
            try:
                yield check_namespace(name)
            except ValueError:
                continue

    # ------------------------------------------------------------------ one page

    def _is_stored(self, fs: fsspec.AbstractFileSystem, key: str) -> bool:
        path = f"{self._root}/{key[:2]}/{key}"
        try:
            if self._local:
                # lstat: a symlink (which may lead out of the root) or a FIFO is no page.
                return stat.S_ISREG(os.lstat(path).st_mode)
            if self._in_process:
                # O(1) there; memory's info() scans the whole process-wide store.
                return bool(fs.isfile(path))
            # The generic isfile() swallows every error as False; info() lets an unreachable
            # endpoint surface as a whole-call failure instead of a silent miss.
            return bool(fs.info(path).get("type") == "file")
        except (FileNotFoundError, NotADirectoryError):
            return False
        except Exception as exc:
            raise _unavailable(f"checking {key}", self._url, exc) from exc

    def _put_one(self, fs: fsspec.AbstractFileSystem, key: str, src: PageParts) -> PageStatus:
        if self._is_stored(fs, key):
            return PageStatus.ALREADY_EXISTS
        shard = f"{self._root}/{key[:2]}"
        path = f"{shard}/{key}"
        header = encode_header(self.context.namespace, key, src)
        direct = self._write_mode is WriteMode.DIRECT
        target = path if direct else f"{shard}/{_TMP_PREFIX}{key}-{uuid.uuid4().hex}"
        started = False  # only what this call began writing is ever removed on failure
        try:
            if direct:
                with _key_lock(key):
                    if self._is_stored(fs, key):
                        return PageStatus.ALREADY_EXISTS
                    started = True
                    self._write(fs, shard, path, header, src)
                status = PageStatus.OK
            else:
                started = True
                self._write(fs, shard, target, header, src)
                status = self._publish(fs, target, path, key)
        except BackendError:
            if started:
                self._discard(fs, target)
            raise
        except (ConnectionError, TimeoutError) as exc:
            if started:
                self._discard(fs, target)
            raise _unavailable(f"writing {key}", self._url, exc) from exc
        except FileExistsError as exc:
            # A local create-only open met something that is not a page (a FIFO, a directory)
            # under the name: this call created nothing, so it removes nothing.
            logger.warning("fsspec %s: put of %s failed: %s", self._url, key, exc)
            return PageStatus.FAILED
        except Exception as exc:  # per-page failure: full disk, permissions, client errors
            if started:
                self._discard(fs, target)
            logger.warning(
                "fsspec %s: put of %s failed: %s: %s", self._url, key, type(exc).__name__, exc
            )
            return PageStatus.FAILED
        if status is PageStatus.OK:
            self._count(("bytes_written",), HEADER_SIZE + self.context.page_bytes)
        return status

    def _write(
        self, fs: fsspec.AbstractFileSystem, shard: str, path: str, header: bytes, src: PageParts
    ) -> None:
        if shard not in self._made_dirs:
            self._makedirs(fs, shard)
            self._made_dirs.add(shard)
        try:
            handle = self._open_for_write(fs, path)
        except FileNotFoundError:
            # The shard directory vanished under us (someone cleaned the cache): recreate once.
            self._makedirs(fs, shard)
            handle = self._open_for_write(fs, path)
        with handle:
            # One write per part, never header + payload concatenated: written in place.
            handle.write(header)
            for region in src:
                handle.write(region)

    def _open_for_write(self, fs: fsspec.AbstractFileSystem, path: str) -> IO[bytes]:
        """A new file at ``path``; a local one is created with the configured mode (fsspec's
        ``open()`` leaves 0666 minus the umask), create-only, never through a symlink."""
        if not self._local:
            handle: IO[bytes] = fs.open(path, "wb")
            return handle
        flags = os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        return os.fdopen(create_file(path, flags, self._options.file_mode), "wb")

    def _makedirs(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        if self._local:
            make_dirs(path, self._options.dir_mode)  # owner-only unless configured
        else:
            fs.makedirs(path, exist_ok=True)

    def _publish(self, fs: fsspec.AbstractFileSystem, tmp: str, path: str, key: str) -> PageStatus:
        """Make the fully written ``tmp`` visible as ``path``, create-only; removes ``tmp``."""
        if self._write_mode is WriteMode.LINK:
            try:
                fs.link(tmp, path)  # os.link refuses an existing name: create-only, atomically
            except FileExistsError:
                self._discard(fs, tmp)
                return PageStatus.ALREADY_EXISTS
            except OSError as exc:
                if self._options.write_mode is not WriteMode.AUTO or exc.errno not in _NO_LINK:
                    raise
                # `auto` chose link for a local path whose filesystem has no hard links (some
                # FUSE and SMB mounts): rename from now on; this page goes the same way below.
                logger.warning(
                    "fsspec %s: hard links unsupported (%s); publishing by rename", self._url, exc
                )
                self._write_mode = WriteMode.RENAME
            else:
                self._discard(fs, tmp)
                return PageStatus.OK
        with _key_lock(key):
            if self._is_stored(fs, key):
                self._discard(fs, tmp)
                return PageStatus.ALREADY_EXISTS
            if self._in_process:
                # memory's mv() goes through info(), which scans the whole process-wide store;
                # cp_file() is one dict assignment of a finished file: just as atomic.
                fs.cp_file(tmp, path)
                fs.rm_file(tmp)
            else:
                fs.mv(tmp, path)
        return PageStatus.OK

    def _discard(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        # Best effort: the name is a temporary or a failed direct write.
        with contextlib.suppress(Exception):
            fs.rm_file(path)

    def _get_one(self, fs: fsspec.AbstractFileSystem, key: str, dst: PageParts) -> PageStatus:
        path = f"{self._root}/{key[:2]}/{key}"
        try:
            if self._in_process or not self._local:
                self._read_whole(fs, path, key, dst)
            else:
                self._read_into(fs, path, key, dst)
        except FileNotFoundError:
            return PageStatus.NOT_FOUND
        except _NotRegularError:
            self._report_not_regular(path)
            return PageStatus.NOT_FOUND
        except PageCorruptError as exc:
            self._report_corrupt(key, exc)
            self._drop_corrupt(fs, path, key)
            return PageStatus.CORRUPT
        except PageVersionError as exc:
            self._report_unknown_version(key, exc)  # a newer writer's page: left in place
            return PageStatus.NOT_FOUND
        except (ConnectionError, TimeoutError) as exc:
            raise _unavailable(f"reading {key}", self._url, exc) from exc
        except Exception as exc:
            logger.warning(
                "fsspec %s: get of %s failed: %s: %s", self._url, key, type(exc).__name__, exc
            )
            return PageStatus.FAILED
        self._count(("bytes_read",), HEADER_SIZE + self.context.page_bytes)
        return PageStatus.OK

    def _check_header(self, header: bytes | memoryview, key: str) -> PageHeader:
        decoded = decode_header(header)
        if decoded.namespace != self.context.namespace:
            raise PageCorruptError(
                "namespace", f"stored {decoded.namespace!r}, expected {self.context.namespace!r}"
            )
        if decoded.key != key:
            raise PageCorruptError("key", f"stored {decoded.key!r}, expected {key!r}")
        want = self.context.page_bytes
        if decoded.payload_len != want:
            raise PageCorruptError(
                "length", f"header says {decoded.payload_len} bytes, page_bytes is {want}"
            )
        return decoded

    def _read_into(
        self, fs: fsspec.AbstractFileSystem, path: str, key: str, dst: PageParts
    ) -> None:
        """Header first, then the payload straight into ``dst``'s regions (no copy in Python)."""
        # Not fs.open(): a FIFO under the page's name would block it forever, and it follows
        # symlinks out of the root.
        fd = open_regular(path)
        if fd is None:
            raise _NotRegularError(errno.EINVAL, "not a regular file", path)
        with os.fdopen(fd, "rb") as handle:
            header = handle.read(HEADER_SIZE)
            # Checked before the payload is read, so a bad header never touches ``dst``.
            decoded = self._check_header(header, key)
            got = 0
            for region in dst:
                view = region.cast("B") if region.format != "B" or region.ndim != 1 else region
                filled = 0
                while filled < view.nbytes:
                    n = handle.readinto(view[filled:])
                    if not n:
                        break
                    filled += n
                got += filled
                if filled != view.nbytes:
                    break
            if got != decoded.payload_len:
                raise PageCorruptError(
                    "length", f"payload cut short at {got} of {decoded.payload_len}"
                )
            if handle.read(1):
                raise PageCorruptError("length", "bytes after the payload")
        verify_payload(decoded, dst, check_payload=self._options.verify_checksum)

    def _read_whole(
        self, fs: fsspec.AbstractFileSystem, path: str, key: str, dst: PageParts
    ) -> None:
        """One ``cat_file`` of the whole object, verified, then one copy of the payload."""
        data = memoryview(fs.cat_file(path))
        verify_page(
            data[:HEADER_SIZE],
            data[HEADER_SIZE:],
            namespace=self.context.namespace,
            key=key,
            check_payload=self._options.verify_checksum,
        )
        want = self.context.page_bytes
        if data.nbytes - HEADER_SIZE != want:
            raise PageCorruptError(
                "length", f"payload has {data.nbytes - HEADER_SIZE} bytes, expected {want}"
            )
        copy_bytes(dst, data[HEADER_SIZE:])

    def _drop_corrupt(self, fs: fsspec.AbstractFileSystem, path: str, key: str) -> None:
        # A direct write on a filesystem is visible while in progress: what reads as damaged
        # there may be a page still being written, which must not be deleted under its writer.
        partial_visible = self._write_mode is WriteMode.DIRECT and (self._local or self._in_process)
        if not self._options.drop_corrupt or self.context.read_only or partial_visible:
            return
        try:
            fs.rm_file(path)
        except Exception:  # gone already, or the store refuses: the next read reports it again
            return
        with self._counts_lock:
            self._evicted.append(key)
            self._counts["corrupt_dropped"] += 1

    def take_evicted(self) -> list[str]:
        """Keys of pages this instance deleted because they failed verification (``drop_corrupt``).

        The backend never evicts for capacity: it does not manage its size.
        """
        with self._counts_lock:
            evicted, self._evicted = self._evicted, []
        return evicted

    def _delete_one(self, fs: fsspec.AbstractFileSystem, key: str) -> bool:
        """Delete one page; return True when it failed (counted, the page may remain)."""
        path = f"{self._root}/{key[:2]}/{key}"
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            return False
        except (ConnectionError, TimeoutError) as exc:
            raise _unavailable(f"deleting {key}", self._url, exc) from exc
        except Exception as exc:
            logger.warning(
                "fsspec %s: delete of %s failed: %s: %s", self._url, key, type(exc).__name__, exc
            )
            return True
        return False

    # ------------------------------------------------------------------ plumbing

    def _fan_out(self, work: Callable[[_I], _T], items: list[_I]) -> list[_T]:
        """Return ``[work(item) for item in items]``, run over the I/O pool when there is one.

        Waits for every item before returning or raising, so no worker still touches a caller
        buffer once the call is over. ``items`` (which holds the caller's buffers) is emptied on
        the way out: a pool thread may drop its finished task a moment after the future
        completed, and that task must then no longer lead to any caller buffer.
        """
        pool = self._pool
        if pool is None or len(items) == 1:
            return [work(item) for item in items]

        def run(i: int) -> _T:
            return work(items[i])

        futures: list[Future[_T]] = []
        try:
            try:
                for i in range(len(items)):
                    futures.append(pool.submit(run, i))
            except RuntimeError as exc:  # the pool was shut down by a concurrent close()
                raise BackendClosedError(
                    f"fsspec tier {self.context.tier_name!r} closed during a call"
                ) from exc
            finally:
                wait(futures)
            return [f.result() for f in futures]
        finally:
            items.clear()

    def _count(self, names: Iterable[str], amount: int = 1) -> None:
        with self._counts_lock:
            for name in names:
                self._counts[name] += amount

    def _report_unknown_version(self, key: str, exc: PageVersionError) -> None:
        with self._counts_lock:
            self._counts["unknown_version"] += 1
            first = self._counts["unknown_version"] == 1
        (logger.warning if first else logger.debug)(
            "fsspec %s: page %s of namespace %s: %s; a miss, left in place",
            self._url,
            key,
            self.context.namespace,
            exc,
        )

    def _report_not_regular(self, path: str) -> None:
        with self._counts_lock:
            self._counts["not_regular"] += 1
            first, self._not_regular_logged = not self._not_regular_logged, True
        (logger.warning if first else logger.debug)(
            "fsspec %s: %s is not a regular file (a FIFO, socket, device, directory or "
            "symlink): treated as a miss and left in place",
            self._url,
            path,
        )

    def _report_corrupt(self, key: str, exc: PageCorruptError) -> None:
        with self._counts_lock:
            first = key not in self._corrupt_logged
            if first and len(self._corrupt_logged) < _MAX_LOGGED_CORRUPT:
                self._corrupt_logged.add(key)
            else:
                first = False
        if first:
            logger.warning(
                "fsspec %s: page %s of namespace %s is corrupt (%s); treated as a miss",
                self._url,
                key,
                self.context.namespace,
                exc,
            )
