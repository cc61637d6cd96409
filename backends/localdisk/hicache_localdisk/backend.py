"""``LocalDiskBackend``: pages as files under ``root/<namespace>/``, bounded, crash-safe.

What is where:

- ``_index``   published pages this process knows (key -> bytes on disk): answers ``exists``.
- ``_policy``  the core's tail-first LRU over published pages *and* reservations of puts in
               flight, so capacity is enforced before bytes hit the disk (single-process mode).
- ``shared``   with ``shared: true`` capacity is global instead: a counter file all processes
               update and an ``flock``-elected evictor that ranks pages by mtime (every put and
               get sets mtimes tail-first, so mtime order is the global tail-first LRU order).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from hicache.errors import (
    BackendCapacityError,
    BackendError,
    BackendUnavailableError,
    PageCorruptError,
)
from hicache.storage.backend import (
    Backend,
    BackendConfig,
    BackendContext,
    Capabilities,
    PageStatus,
    StoredPage,
    check_namespace,
)
from hicache.storage.eviction import TailFirstLRU
from hicache.storage.pageformat import HEADER_SIZE, decode_header, stored_size
from hicache_localdisk.fsio import DIRECT_ALIGN, O_DIRECT, drop_cache, fsync_dir
from hicache_localdisk.layout import FANOUT_DIRS, Layout, ScannedPage
from hicache_localdisk.options import DEFAULT_FREE_FRACTION, Durability, LocalDiskConfig
from hicache_localdisk.pageio import PageIO, ReadResult
from hicache_localdisk.shared import SharedState

if TYPE_CHECKING:
    from hicache.storage.benchmark import RawBaseline

__all__ = ["LocalDiskBackend"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
#: Spacing of the mtimes given to the pages of one batch (head newest): 1 us survives the
#: timestamp granularity of every filesystem with nanosecond mtimes.
_MTIME_STEP_NS = 1000
#: A shared eviction round frees this share of ``max_bytes`` beyond what is needed, so rounds
#: (each a directory scan) stay rare under steady writing.
_SHARED_SLACK = 1 / 16
_SYNCED = (PageStatus.OK, PageStatus.ALREADY_EXISTS)


class LocalDiskBackend(Backend):
    """Pages as files on a local filesystem (kind ``localdisk``); see the package README."""

    config_model: ClassVar[type[BackendConfig]] = LocalDiskConfig

    def __init__(self, config: BackendConfig, context: BackendContext) -> None:
        super().__init__(config, context)
        assert isinstance(config, LocalDiskConfig)  # checked by the base class
        self.options: LocalDiskConfig = config
        self._layout = Layout(os.fspath(config.root), context.namespace)
        self._lock = threading.Lock()
        self._index: dict[str, int] = {}
        self._policy: TailFirstLRU | None = None
        self._inflight: dict[str, int] = {}
        self._evicted: list[str] = []
        self._max_bytes = 0
        self._pool: ThreadPoolExecutor | None = None
        self._shared: SharedState | None = None
        self._io: PageIO | None = None
        self._corrupt_logged = False
        self._counters: dict[str, int] = dict.fromkeys(
            (
                "puts_ok",
                "puts_existing",
                "puts_failed",
                "gets_ok",
                "gets_missing",
                "gets_failed",
                "corrupt",
                "evicted",
                "dead_temps_removed",
                "bad_size_removed",
                "other_size_pages",
            ),
            0,
        )
        self._open_scan: dict[str, float] = {}

    # ------------------------------------------------------------------ public extras

    @property
    def layout(self) -> Layout:
        """Where this instance's files live (tests and tools use it to reach the raw files)."""
        return self._layout

    @property
    def max_bytes(self) -> int:
        """The effective capacity bound (resolved at ``open()`` when not configured)."""
        return self._max_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes on disk this instance accounts for (global counter in shared mode)."""
        if self._shared is not None:
            return self._shared.read()
        with self._lock:
            return sum(self._index.values())

    def page_path(self, key: str) -> str:
        """Path of the file of ``key`` (whether or not it exists)."""
        return self._layout.page_path(key)

    def drop_page_cache(self) -> bool:
        """Write back and drop every page file of this instance from the OS page cache, so the
        next reads come from the device (``hicache bench storage`` cold reads)."""
        with self._lock:
            keys = list(self._index)
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                drop_cache(self._layout.page_path(key))
        return True

    @classmethod
    def bench_baseline(cls, config: BackendConfig, context: BackendContext) -> RawBaseline:
        """The raw file baseline of ``hicache bench storage`` (same calls, same fsync policy)."""
        from hicache_localdisk.raw import FileBaseline  # the bench machinery loads lazily

        assert isinstance(config, LocalDiskConfig)
        return FileBaseline(config)

    # ------------------------------------------------------------------ lifecycle

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            persistent=True,
            shared=self.options.shared,
            manages_capacity=True,
            max_batch=64,
            alignment=DIRECT_ALIGN if self._io is not None and self._io.direct else 1,
            listable=True,
            default_medium="DISK",
        )

    def _open(self) -> None:
        try:
            self._open_inner()
        except BaseException:
            if self._shared is not None:  # release our membership: we never opened
                self._shared.close()
                self._shared = None
            raise

    def _open_inner(self) -> None:
        opts = self.options
        writable = not self.context.read_only
        if writable:
            self._make_dirs()
        alone = False
        if opts.shared and writable:
            alone = self._join_shared()
        started = time.perf_counter()
        scan = self._layout.scan()
        pages = self._sweep(scan.pages, scan.dead_temps, writable)
        self._max_bytes = self._resolve_max_bytes(sum(p.size for p in pages), writable)
        stored = stored_size(self.context.page_bytes)
        if writable and self._max_bytes < stored:
            raise BackendCapacityError(
                f"max_bytes={self._max_bytes} cannot hold one page of {stored} bytes "
                f"(root {self._layout.root!r})"
            )
        # Newest first: the policy records a batch tail-first, so the first key ends most recent.
        pages.sort(key=lambda p: p.mtime_ns, reverse=True)
        self._index = {p.key: p.size for p in pages}
        self._io = PageIO(
            self._layout,
            self.context.page_bytes,
            file_mode=opts.file_mode,
            fsync=opts.durability is Durability.FSYNC,
            direct=self._probe_direct(writable),
            verify=opts.verify_checksums,
            hash_threads=max(4, opts.io_threads),
        )
        if opts.shared:
            self._settle_shared(pages, alone)
        else:
            self._policy = TailFirstLRU(self._max_bytes)
            self._policy.add([p.key for p in pages], [p.size for p in pages])
            if writable and self._policy.used_bytes > self._max_bytes:
                self._drop(self._policy.evict_for(0))
        elapsed = time.perf_counter() - started
        self._open_scan = {
            "pages": len(pages),
            "seconds": elapsed,
            "pages_per_second": len(pages) / elapsed if elapsed > 0 else 0.0,
        }
        if opts.io_threads > 1:
            self._pool = ThreadPoolExecutor(opts.io_threads, thread_name_prefix="hicache-localdisk")
        log.info(
            "localdisk %s: %d pages (%d bytes, max %d) indexed in %.3fs",
            self._layout.ns_dir,
            len(pages),
            sum(self._index.values()),
            self._max_bytes,
            elapsed,
        )

    def _make_dirs(self) -> None:
        mode = self.options.dir_mode
        ns_dir = self._layout.ns_dir
        try:
            created = not os.path.isdir(ns_dir)
            # makedirs gives `mode` to the leaf only: create root and namespace explicitly so
            # both are owner-only (the root's parents are not ours to restrict).
            os.makedirs(self._layout.root, mode=mode, exist_ok=True)
            for path in [ns_dir, *(f"{ns_dir}/{sub}" for sub in FANOUT_DIRS)]:
                try:
                    os.mkdir(path, mode)
                    created = True
                except FileExistsError:
                    continue
                if mode & 0o077:  # mkdir applies the umask; honour a configured wider mode
                    os.chmod(path, mode)
            if created and self.options.durability is Durability.FSYNC:
                fsync_dir(ns_dir)
                fsync_dir(self._layout.root)
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC):
                # Reads of what is there still work; every put will fail with a status.
                log.warning("localdisk root %s is not writable (%s): puts will fail", ns_dir, exc)
                return
            raise BackendUnavailableError(f"cannot use localdisk root {ns_dir!r}: {exc}") from exc

    def _sweep(
        self, pages: list[ScannedPage], dead_temps: list[str], writable: bool
    ) -> list[ScannedPage]:
        """Remove dead owners' temporaries and damaged pages; return the pages of our size."""
        if writable:
            for path in dead_temps:
                if _remove(path):
                    self._counters["dead_temps_removed"] += 1
        stored = stored_size(self.context.page_bytes)
        good = [p for p in pages if p.size == stored]
        if len(good) == len(pages):
            return good
        damaged = foreign = 0
        for p in pages:
            if p.size == stored:
                continue
            if self._is_damaged(p):
                damaged += 1
                if writable and _remove(self._layout.page_path(p.key)):
                    self._counters["bad_size_removed"] += 1
            else:
                # A sound page of another page size (a tool opened us with another size):
                # not ours to serve, and certainly not ours to delete.
                foreign += 1
        self._counters["other_size_pages"] = foreign
        log.warning(
            "localdisk %s: %d damaged page file(s) %s, %d page(s) of another page size ignored",
            self._layout.ns_dir,
            damaged,
            "removed" if writable else "skipped",
            foreign,
        )
        return good

    def _is_damaged(self, page: ScannedPage) -> bool:
        """True for a file that can never be a valid page (torn, truncated, foreign header)."""
        if page.size < HEADER_SIZE:
            return True
        try:
            with open(self._layout.page_path(page.key), "rb") as f:
                header = decode_header(f.read(HEADER_SIZE))
        except PageCorruptError:
            return True
        except OSError:
            return False  # unreadable now; a later read decides
        if header.namespace != self.context.namespace or header.key != page.key:
            return True
        return stored_size(header.payload_len) != page.size

    def _resolve_max_bytes(self, used: int, writable: bool) -> int:
        if self.options.max_bytes is not None:
            return self.options.max_bytes
        if not writable:
            return max(used, 1)  # never writes nor evicts: the bound only admits what is there
        try:
            st = os.statvfs(self._layout.root)
        except OSError as exc:
            raise BackendUnavailableError(
                f"cannot size localdisk root {self._layout.root!r}: {exc}"
            ) from exc
        free = st.f_bavail * st.f_frsize
        return int((free + used) * DEFAULT_FREE_FRACTION)

    def _probe_direct(self, writable: bool) -> bool:
        if not self.options.direct_io:
            return False
        if O_DIRECT == 0 or self.context.page_bytes % DIRECT_ALIGN:
            log.warning(
                "localdisk: direct_io needs O_DIRECT and page_bytes a multiple of %d "
                "(page_bytes=%d): using buffered I/O",
                DIRECT_ALIGN,
                self.context.page_bytes,
            )
            return False
        probe = os.path.join(self._layout.ns_dir, f".hicache-direct-probe-{os.getpid()}")
        try:
            if writable:
                fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_DIRECT, 0o600)
                os.close(fd)
                os.unlink(probe)
            else:
                fd = os.open(self._layout.ns_dir, os.O_RDONLY | O_DIRECT)
                os.close(fd)
        except OSError as exc:
            # tmpfs (before Linux 6.6) and some network filesystems refuse O_DIRECT with EINVAL.
            log.warning(
                "localdisk: %s does not support O_DIRECT (%s): using buffered I/O",
                self._layout.ns_dir,
                exc,
            )
            _remove(probe)
            return False
        return True

    def _join_shared(self) -> bool:
        """Open the shared state before the scan; True when no other process has the root."""
        shared = SharedState(self._layout.ns_dir, self.options.file_mode)
        try:
            alone = shared.open()
        except OSError as exc:
            shared.close()
            log.warning("localdisk shared state unavailable in %s: %s", self._layout.ns_dir, exc)
            return False
        self._shared = shared
        return alone

    def _settle_shared(self, pages: list[ScannedPage], alone: bool) -> None:
        shared = self._shared
        if shared is None:
            return  # read-only (neither counts nor evicts), or the state files are unusable
        total = sum(p.size for p in pages)
        if alone:
            # Nobody else is in: the scan is the truth, whatever drift killed processes left.
            shared.set(total)
            shared.admit_others()
        else:
            with shared.evict_round():
                shared.init_if_unset(total)
        if shared.read() > self._max_bytes:
            self._shared_enforce(0)

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._shared is not None:
            self._shared.close()
            self._shared = None
        if self._io is not None:
            self._io.close()
        with self._lock:
            self._index = {}
            self._inflight = {}
            self._policy = None
        self._io = None

    # ------------------------------------------------------------------ exists

    def _exists(self, keys: Sequence[str]) -> list[bool]:
        index = self._index
        found = [k in index for k in keys]
        if self.options.shared:
            for i, key in enumerate(keys):
                if not found[i]:
                    found[i] = self._probe_fs(key)
        return found

    def _exists_prefix(self, keys: Sequence[str]) -> int:
        index = self._index
        shared = self.options.shared
        for i, key in enumerate(keys):
            if key not in index and not (shared and self._probe_fs(key)):
                return i
        return len(keys)

    def _probe_fs(self, key: str) -> bool:
        """Shared mode: another process may have stored ``key`` since we last looked."""
        size = self._require_io().page_size_on_disk(key)
        if size is None:
            return False
        with self._lock:
            self._index[key] = size
        return True

    # ------------------------------------------------------------------ put

    def _put(self, keys: Sequence[str], srcs: Sequence[memoryview]) -> list[PageStatus]:
        io = self._require_io()
        srcs = [_bytes_view(s) for s in srcs]
        statuses: list[PageStatus | None] = [None] * len(keys)
        if self._shared is not None:
            todo = self._reserve_shared(keys, statuses)
        else:
            todo = self._reserve_local(keys, statuses)
        now = time.time_ns()
        results = self._map(lambda i: io.write(keys[i], srcs[i], now - i * _MTIME_STEP_NS), todo)
        for i, status in zip(todo, results, strict=True):
            statuses[i] = status
        if self.options.durability is Durability.FSYNC:
            self._sync_dirs(keys, todo, statuses)
        self._settle_puts(keys, todo, statuses)
        out = [PageStatus.FAILED if s is None else s for s in statuses]
        with self._lock:
            c = self._counters
            c["puts_ok"] += out.count(PageStatus.OK)
            c["puts_existing"] += out.count(PageStatus.ALREADY_EXISTS)
            c["puts_failed"] += out.count(PageStatus.FAILED)
        return out

    def _reserve_local(self, keys: Sequence[str], statuses: list[PageStatus | None]) -> list[int]:
        """Decide which pages to write and make room for them before any byte is written."""
        policy = self._policy
        assert policy is not None
        stored = self._require_io().stored_bytes
        with self._lock:
            todo: list[int] = []
            existing: list[str] = []
            new: list[str] = []
            seen: set[str] = set()
            for i, key in enumerate(keys):
                if key in self._index:
                    statuses[i] = PageStatus.ALREADY_EXISTS
                    existing.append(key)
                    continue
                todo.append(i)
                if key not in policy and key not in seen:
                    new.append(key)
                seen.add(key)
            # Re-stored pages are used again: refresh them first so room is made elsewhere.
            policy.touch(existing)
            fit = min(len(new), policy.capacity_bytes // stored)
            victims = policy.evict_for(fit * stored)
            room = max(0, (policy.capacity_bytes - policy.used_bytes) // stored)
            refused = set(new[min(fit, room) :])
            if refused:
                # Only when one batch is larger than the whole capacity: its tail is dropped.
                todo = [i for i in todo if keys[i] not in refused]
                for i, key in enumerate(keys):
                    if key in refused:
                        statuses[i] = PageStatus.FAILED
            reserve = [keys[i] for i in todo]
            policy.add(reserve, [stored] * len(reserve))
            for key in reserve:
                self._inflight[key] = self._inflight.get(key, 0) + 1
            dropped = self._forget(victims)
        for i, key in enumerate(keys):
            if key in dropped and statuses[i] is PageStatus.ALREADY_EXISTS:
                statuses[i] = PageStatus.FAILED  # evicted by its own batch (tiny capacity)
        self._unlink_evicted(dropped)
        return todo

    def _reserve_shared(self, keys: Sequence[str], statuses: list[PageStatus | None]) -> list[int]:
        shared = self._shared
        assert shared is not None
        io = self._require_io()
        todo: list[int] = []
        seen: set[str] = set()
        for i, key in enumerate(keys):
            if key not in seen:
                seen.add(key)
                # The index may be stale (another process evicted): ask the filesystem.
                if io.page_size_on_disk(key) is not None:
                    statuses[i] = PageStatus.ALREADY_EXISTS
                    continue
            todo.append(i)
        need = len(todo) * io.stored_bytes
        if need and shared.read() + need > self._max_bytes:
            self._shared_enforce(need)
        return todo

    def _settle_puts(
        self, keys: Sequence[str], todo: list[int], statuses: list[PageStatus | None]
    ) -> None:
        stored = self._require_io().stored_bytes
        published = 0
        late_victims: list[str] = []
        with self._lock:
            for i in todo:
                key = keys[i]
                status = statuses[i]
                if self._shared is not None:
                    if status is PageStatus.OK or status is PageStatus.ALREADY_EXISTS:
                        self._index[key] = stored
                    published += stored if status is PageStatus.OK else 0
                    continue
                policy = self._policy
                assert policy is not None
                left = self._inflight.get(key, 1) - 1
                if left:
                    self._inflight[key] = left
                else:
                    self._inflight.pop(key, None)
                if status is PageStatus.OK or status is PageStatus.ALREADY_EXISTS:
                    if key in policy:
                        self._index[key] = stored
                    elif key not in self._index and status is PageStatus.OK:
                        # Evicted while in flight: our file was never accounted, remove it
                        # and report it like any other eviction.
                        late_victims.append(key)
                        self._evicted.append(key)
                        self._counters["evicted"] += 1
                elif not left and key not in self._index:
                    policy.remove(key)
        # Counted after the rename, so a concurrent eviction round can only over-count (it
        # saw the file, then we add it): the safe direction, corrected by the next round.
        shared = self._shared
        if published and shared is not None and shared.add(published) > self._max_bytes:
            self._shared_enforce(0)
        for key in late_victims:
            _remove(self._layout.page_path(key))

    def _sync_dirs(
        self, keys: Sequence[str], todo: list[int], statuses: list[PageStatus | None]
    ) -> None:
        """One ``fsync`` per directory that received a page: then the batch is power-loss safe.

        A page another writer published first (``ALREADY_EXISTS`` from the rename) was synced
        before its rename, but its directory entry maybe not yet: sync that directory too.
        """
        dirs = {self._layout.dir_of(keys[i]) for i in todo if statuses[i] in _SYNCED}
        for d in sorted(dirs):
            try:
                fsync_dir(d)
            except OSError as exc:
                log.warning("fsync of %s failed: %s", d, exc)
                for i in todo:
                    if statuses[i] in _SYNCED and self._layout.dir_of(keys[i]) == d:
                        # Visible but not durable: report failure; the file may stay (harmless).
                        statuses[i] = PageStatus.FAILED

    # ------------------------------------------------------------------ get

    def _get_into(self, keys: Sequence[str], dsts: Sequence[memoryview]) -> list[PageStatus]:
        io = self._require_io()
        dsts = [_bytes_view(d) for d in dsts]
        shared = self.options.shared
        index = self._index
        now = None if self.context.read_only else time.time_ns()
        todo = [i for i, key in enumerate(keys) if shared or key in index]
        results = self._map(
            lambda i: io.read(keys[i], dsts[i], None if now is None else now - i * _MTIME_STEP_NS),
            todo,
        )
        statuses = [PageStatus.NOT_FOUND] * len(keys)
        hits: list[str] = []
        corrupt: list[tuple[str, str]] = []
        with self._lock:
            for i, (result, field) in zip(todo, results, strict=True):
                key = keys[i]
                if result is ReadResult.OK:
                    statuses[i] = PageStatus.OK
                    hits.append(key)
                    if shared and key not in self._index:
                        self._index[key] = io.stored_bytes
                elif result is ReadResult.MISSING:
                    self._index.pop(key, None)  # deleted or evicted behind our back
                    if self._policy is not None and key not in self._inflight:
                        self._policy.remove(key)
                elif result is ReadResult.CORRUPT:
                    statuses[i] = PageStatus.CORRUPT
                    corrupt.append((key, field))
                else:
                    statuses[i] = PageStatus.FAILED
            c = self._counters
            c["gets_ok"] += len(hits)
            c["gets_missing"] += statuses.count(PageStatus.NOT_FOUND)
            c["gets_failed"] += statuses.count(PageStatus.FAILED)
            if self._policy is not None and hits:
                self._policy.touch(hits)
        for key, field in corrupt:
            self._on_corrupt(key, field)
        return statuses

    def _on_corrupt(self, key: str, field: str) -> None:
        """Count, log (once at warning level), forget and remove a page that failed checks."""
        with self._lock:
            self._counters["corrupt"] += 1
            first = not self._corrupt_logged
            self._corrupt_logged = True
            known = self._index.pop(key, None) is not None
            if self._policy is not None:
                self._policy.remove(key)
            if known:
                self._evicted.append(key)
        removed = not self.context.read_only and self._unlink_counted([key]) == 1
        (log.warning if first else log.debug)(
            "localdisk %s: page %s is corrupt (%s): %s",
            self._layout.ns_dir,
            key,
            field,
            "removed" if removed else "left in place",
        )

    # ------------------------------------------------------------------ delete, eviction

    def _delete(self, keys: Sequence[str]) -> None:
        failed: list[str] = []
        self._unlink_counted(keys, failed)
        failed_set = set(failed)
        gone = [key for key in keys if key not in failed_set]
        with self._lock:
            for key in gone:
                self._index.pop(key, None)
                if self._policy is not None and key not in self._inflight:
                    self._policy.remove(key)
        if failed:
            raise BackendError(
                f"localdisk: could not delete {len(failed)} page(s), e.g. {failed[0]}"
            )

    def _unlink_counted(self, keys: Sequence[str], failed: list[str] | None = None) -> int:
        """Unlink page files (missing ones are fine); return how many this call removed.

        In shared mode this runs inside an eviction round's lock, so no round can rescan between
        an unlink and its decrement (which would count the page twice as gone).
        """
        shared = self._shared
        with shared.evict_round() if shared is not None else contextlib.nullcontext():
            freed = 0
            for key in keys:
                try:
                    os.unlink(self._layout.page_path(key))
                    freed += 1
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    # Still on disk (read-only filesystem...): keep serving and accounting it.
                    log.warning("cannot remove page %s: %s", key, exc)
                    if failed is not None:
                        failed.append(key)
            if shared is not None and freed:
                shared.add(-freed * self._require_io().stored_bytes)
        return freed

    def take_evicted(self) -> list[str]:
        # docstring inherited
        with self._lock:
            out, self._evicted = self._evicted, []
        return out

    def _forget(self, victims: Sequence[str]) -> set[str]:
        """Drop evicted keys from the index (lock held); return those that had files."""
        dropped: set[str] = set()
        for key in victims:
            if self._index.pop(key, None) is not None:
                dropped.add(key)
                self._evicted.append(key)
        self._counters["evicted"] += len(dropped)
        return dropped

    def _drop(self, victims: Sequence[str]) -> None:
        with self._lock:
            dropped = self._forget(victims)
        self._unlink_evicted(dropped)

    def _unlink_evicted(self, keys: set[str]) -> None:
        for key in keys:
            _remove(self._layout.page_path(key))

    def _shared_enforce(self, need: int) -> None:
        """Run one eviction round if the shared counter plus ``need`` is (still) over the bound.

        The round rescans the directory, so it decides on what is really there, and re-anchors
        the counter on it by a delta (concurrent additions are kept), which also removes the
        drift a killed process leaves.
        """
        shared = self._shared
        assert shared is not None
        stored = self._require_io().stored_bytes
        with shared.evict_round():
            before = shared.read()
            if before + need <= self._max_bytes:
                return  # another process's round made room while we waited
            scan = self._layout.scan()
            pages = [p for p in scan.pages if p.size == stored]
            on_disk = sum(p.size for p in pages)
            # Other writers' temporaries are pages about to land: make room for them too.
            pending = scan.live_temps * stored + need
            drift = before - on_disk
            pages.sort(key=lambda p: p.mtime_ns, reverse=True)
            ranking = TailFirstLRU(self._max_bytes)
            ranking.add([p.key for p in pages], [p.size for p in pages])
            want = pending + int(self._max_bytes * _SHARED_SLACK)
            victims = ranking.evict_for(min(want, self._max_bytes))
            removed = [key for key in victims if _remove(self._layout.page_path(key))]
            shared.add(-(len(removed) * stored + drift))
        with self._lock:
            for key in removed:
                self._index.pop(key, None)
            self._evicted.extend(removed)
            self._counters["evicted"] += len(removed)
        log.debug("localdisk shared round: evicted %d pages, drift %d bytes", len(removed), drift)

    # ------------------------------------------------------------------ stats, listing

    def _stats(self) -> Mapping[str, Any]:
        with self._lock:
            counters = dict(self._counters)
            pages = len(self._index)
            used = sum(self._index.values())
        return {
            **counters,
            "pages": pages,
            "used_bytes": used,
            "shared_used_bytes": self._shared.read() if self._shared is not None else None,
            "max_bytes": self._max_bytes,
            "direct_io": bool(self._io is not None and self._io.direct),
            "open_scan": dict(self._open_scan),
        }

    def iter_pages(self) -> Iterator[StoredPage]:
        # docstring inherited
        self._check_call([])
        for page in self._layout.scan().pages:
            yield StoredPage(page.key, page.size)

    def iter_namespaces(self) -> Iterator[str]:
        # docstring inherited
        self._check_call([])
        for name in self._layout.namespaces():
            try:
                yield check_namespace(name)
            except ValueError:
                continue

    # ------------------------------------------------------------------ helpers

    def _require_io(self) -> PageIO:
        io = self._io
        if io is None:  # only reachable through a race with close()
            raise BackendError("localdisk backend is closed")
        return io

    def _map(self, fn: Callable[[int], _T], items: list[int]) -> list[_T]:
        pool = self._pool
        if pool is None or len(items) <= 1:
            return [fn(i) for i in items]
        return list(pool.map(fn, items))


def _bytes_view(buf: memoryview) -> memoryview:
    # Slicing for short reads/writes must count bytes, whatever the caller's item format.
    return buf if buf.format == "B" and buf.ndim == 1 else buf.cast("B")


def _remove(path: str) -> bool:
    """Unlink ``path``; True if this call removed it."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)
        return False
    return True
