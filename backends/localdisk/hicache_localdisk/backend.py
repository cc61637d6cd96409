"""``LocalDiskBackend``: pages as files under ``root/<namespace>/``, bounded, crash-safe.

Where things are: ``layout`` (paths, temporaries, the directory scan), ``pageio`` (the system
calls of one page), ``packs`` (the small pages of one put in one file: what is where, the system
calls) and ``packed`` (puts, reads and deletes of packed pages through the index), ``index``
(what is stored, single-process capacity), ``shared`` (the cross-process counter and eviction
rounds), ``startup`` (what ``open()`` does first, the pack scan included), ``outcomes``
(``stats()``'s counters, warnings logged once). This module wires them into the contract: put,
get, exists, delete, listing and statistics.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from stat import S_ISREG
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from hicache.errors import BackendError
from hicache.storage import (
    Backend,
    BackendConfig,
    BackendContext,
    Capabilities,
    PageParts,
    PageStatus,
    StoredPage,
    check_namespace,
    stored_size,
)
from hicache_localdisk.fsio import DIRECT_ALIGN, drop_cache, punch_supported, remove
from hicache_localdisk.index import PageIndex
from hicache_localdisk.layout import Layout
from hicache_localdisk.options import Durability, LocalDiskConfig
from hicache_localdisk.outcomes import Outcomes
from hicache_localdisk.packed import forget_packed, put_packed, read_packed
from hicache_localdisk.packs import PackFiles, Record
from hicache_localdisk.pageio import _CORES, PageIO, ReadResult
from hicache_localdisk.shared import SharedState, join_shared, settle_shared
from hicache_localdisk.spares import SpareFiles
from hicache_localdisk.startup import (
    drop_packs,
    load_packs,
    make_dirs,
    probe_direct,
    resolve_max_bytes,
    scan_packs,
    sweep,
)

if TYPE_CHECKING:
    from hicache.storage import RawBaseline

__all__ = ["LocalDiskBackend"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
#: ``where`` of reads when nothing is packed (shared mode): no key is in a pack.
_NOT_PACKED: contextlib.nullcontext[dict[str, Record]] = contextlib.nullcontext({})
#: Spacing of the mtimes given to the pages of one batch (head newest): 1 us survives the
#: timestamp granularity of every filesystem with nanosecond mtimes.
_MTIME_STEP_NS = 1000
#: Pages per backend call (its ``max_batch``), also told to its capacity policy.
_MAX_BATCH = 64
#: Unset ``io_threads``: pages smaller than this are written and read on the calling thread.
#: Measured on 2 cores (8 KiB pages, the replay): 20% less CPU and half the context switches
#: than spreading each batch over 4 threads, whose hand-offs cost more than a page's syscalls.
_POOL_MIN_PAGE_BYTES = 256 * 1024


class LocalDiskBackend(Backend):
    """Pages as files on a local filesystem (kind ``localdisk``); see the package README."""

    config_model: ClassVar[type[BackendConfig]] = LocalDiskConfig

    def __init__(self, config: BackendConfig, context: BackendContext) -> None:
        super().__init__(config, context)
        assert isinstance(config, LocalDiskConfig)  # checked by the base class
        self.options: LocalDiskConfig = config
        self._layout = Layout(os.fspath(config.root), context.namespace)
        self._stored = stored_size(context.page_bytes)
        #: Evicted files a put reuses (see hicache_localdisk.spares): single-process mode, and
        #: not with fsync, whose power-loss promise would need the victim's rename synced too.
        reuse = not config.shared and config.durability is Durability.NONE
        self._spares = SpareFiles(self._layout) if reuse else None
        self._index = PageIndex(self._stored, self._unlink_page, self._on_disk, self._retire)
        #: Packed pages (single-process mode; see hicache_localdisk.packs), read whatever
        #: ``pack_below`` says; new pages go into packs only when ``_pack_writes``.
        self._packs: PackFiles | None = None
        self._pack_writes = False
        self._max_bytes = 0
        self._pool: ThreadPoolExecutor | None = None
        self._shared: SharedState | None = None
        self._io: PageIO | None = None
        self._outcomes = Outcomes(self._layout.ns_dir)
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
        """Bytes on disk this instance accounts for (the global counter in shared mode)."""
        if self._shared is not None:
            return self._shared.read()
        return self._index.used_bytes()

    def page_path(self, key: str) -> str:
        """Path of the file of ``key`` (whether or not it exists); a packed page: see
        :meth:`record_of`."""
        return self._layout.page_path(key)

    def record_of(self, key: str) -> tuple[str, int] | None:
        """(pack path, record offset) of a packed page, ``None`` when ``key`` is not packed."""
        packs = self._packs
        rec = packs.located.get(key) if packs is not None else None
        return None if rec is None else (rec[0].path, rec[1])

    @property
    def packing(self) -> bool:
        """Whether new pages are written as packs (see the ``pack_below`` option)."""
        return self._pack_writes

    def drop_page_cache(self) -> bool:
        """Write back and drop every page file of this instance from the OS page cache, so the
        next reads come from the device (``hicache bench storage`` cold reads)."""
        packs = self._packs
        located = packs.located if packs is not None else {}
        paths = {
            self._layout.page_path(key) for key in list(self._index.pages) if key not in located
        }
        if packs is not None:
            paths |= packs.paths()
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                drop_cache(path)
        return True

    @classmethod
    def bench_baseline(cls, config: BackendConfig, context: BackendContext) -> RawBaseline:
        """The raw file baseline of ``hicache bench storage`` (same calls, same fsync policy)."""
        from hicache_localdisk.raw import FileBaseline  # the bench machinery loads lazily

        assert isinstance(config, LocalDiskConfig)
        return FileBaseline(config, context.namespace)

    @property
    def io_threads(self) -> int:
        """Threads a batch's pages are read/written with (``options.io_threads``, or its
        default for this page size: see the option)."""
        if self.options.io_threads is not None:
            return self.options.io_threads
        if self.context.page_bytes < _POOL_MIN_PAGE_BYTES:
            return 1
        return min(4, 2 * _CORES)

    # ------------------------------------------------------------------ lifecycle

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            persistent=True,
            shared=self.options.shared,
            manages_capacity=True,
            max_batch=_MAX_BATCH,
            alignment=DIRECT_ALIGN if self._io is not None and self._io.direct else 1,
            listable=True,
            default_medium="DISK",
            # the index answers alone; shared mode asks the filesystem on a miss
            memory_lookups=not self.options.shared,
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
        fsync = opts.durability is Durability.FSYNC
        if writable:
            make_dirs(self._layout, opts.dir_mode, fsync)
        if opts.shared and writable:
            self._shared, alone = join_shared(self._layout.ns_dir, opts.file_mode)
        else:
            alone = False
        started = time.perf_counter()
        scan = self._layout.scan()
        swept = sweep(self._layout, scan.pages, scan.dead_temps, self.context.page_bytes, writable)
        self._outcomes.count(
            dead_temps_removed=swept.dead_temps_removed, bad_size_removed=swept.damaged_removed
        )
        self._outcomes.set("other_size_pages", swept.other_size_pages)
        pages = swept.pages
        if not opts.shared:
            self._packs, packed, damaged = load_packs(
                self._layout,
                opts,
                scan.packs,
                pages,
                self.context.page_bytes,
                _MTIME_STEP_NS,
                writable,
            )
            pages += packed
            self._outcomes.count(bad_size_removed=damaged)
        elif scan.packs and writable:
            drop_packs(self._layout, scan.packs)
        used = sum(p.size for p in pages)
        self._max_bytes = resolve_max_bytes(
            self._layout, opts.max_bytes, used, self._stored, writable, opts.shared
        )
        pages.sort(key=lambda p: p.mtime_ns, reverse=True)  # newest first
        self._index.load(
            [p.key for p in pages],
            [p.size for p in pages],
            None if opts.shared else self._max_bytes,
            opts.eviction,
            _MAX_BATCH,
        )
        self._io = PageIO(
            self._layout,
            self.context.page_bytes,
            file_mode=opts.file_mode,
            fsync=fsync,
            direct=opts.direct_io and probe_direct(self._layout, self.context.page_bytes, writable),
            verify=opts.verify_checksums,
            hash_threads=max(4, self.io_threads),
        )
        self._pack_writes = (
            self._packs is not None
            and writable
            and self._stored < opts.pack_below
            # a punch frees only whole blocks: unaligned records would keep the blocks they
            # share with their neighbours after eviction, the disk passing max_bytes
            and self._stored % DIRECT_ALIGN == 0
            and not self._io.direct  # O_DIRECT tiers keep one file per page
            and punch_supported(self._layout.ns_dir)  # logs why not
        )
        if self._pack_writes:
            self._spares = None  # packs leave no victim files to reuse
        if opts.shared:
            shared = self._shared
            # read-only (neither counts nor evicts), or the state files are unusable: None
            if shared is not None and settle_shared(shared, used, alone) > self._max_bytes:
                self._enforce_shared(0)
        elif writable and used > self._max_bytes:
            self._index.evict_to_capacity()
        self._flush_packs()
        elapsed = time.perf_counter() - started
        self._open_scan = {
            "pages": len(pages),
            "seconds": elapsed,
            "pages_per_second": len(pages) / elapsed if elapsed > 0 else 0.0,
        }
        if self.io_threads > 1:
            self._pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix="hicache-localdisk")
        log.info(
            "localdisk %s: %d pages (%d bytes, max %d) indexed in %.3fs",
            self._layout.ns_dir,
            len(pages),
            used,
            self._max_bytes,
            elapsed,
        )

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._shared is not None:
            self._shared.close()
            self._shared = None
        if self._io is not None:
            self._io.close()
            self._io = None
        if self._packs is not None:
            self._packs.flush()
            self._packs.clear()
            self._packs = None
        self._index.clear()

    # ------------------------------------------------------------------ exists

    def _exists(self, keys: Sequence[str]) -> list[bool]:
        pages = self._index.pages
        found = [k in pages for k in keys]
        if self.options.shared:
            for i, key in enumerate(keys):
                if not found[i]:
                    found[i] = self._probe_fs(key)
        return found

    def _exists_prefix(self, keys: Sequence[str]) -> int:
        pages = self._index.pages
        shared = self.options.shared
        for i, key in enumerate(keys):
            if key not in pages and not (shared and self._probe_fs(key)):
                return i
        return len(keys)

    def _probe_fs(self, key: str) -> bool:
        """Shared mode: another process may have stored ``key`` since we last looked."""
        size = self._require_io().page_size_on_disk(key)
        if size is None:
            return False
        self._index.note_present(key, size)
        return True

    # ------------------------------------------------------------------ put

    def _put(self, keys: Sequence[str], srcs: Sequence[PageParts]) -> list[PageStatus]:
        io = self._require_io()
        statuses: list[PageStatus | None] = [None] * len(keys)
        retired: list[str] = []  # temporary paths of retired victims' files
        if self._pack_writes:
            assert self._packs is not None
            return self._put_done(put_packed(self._index, self._packs, keys, srcs, _MTIME_STEP_NS))
        if self._shared is not None:
            todo = self._plan_shared(keys, statuses)
        else:
            todo = self._index.reserve(keys, statuses, retired)
        # This put's evictions become its new pages' files (see hicache_localdisk.spares).
        reuse = dict(zip(todo, retired, strict=False))
        now = time.time_ns()
        try:
            results = self._map(
                lambda i: io.write(keys[i], srcs[i], now - i * _MTIME_STEP_NS, reuse.get(i)),
                todo,
            )
        finally:
            # a spare no write took is unlinked even if the writes raised: between calls no
            # spare file is left (a write that took one and failed on an OSError removed it)
            if len(retired) > len(reuse):
                taken = set(reuse.values())
                SpareFiles.discard(p for p in retired if p not in taken)
        for i, status in zip(todo, results, strict=True):
            statuses[i] = status
        if self.options.durability is Durability.FSYNC:
            io.sync_dirs(keys, todo, statuses)
        published = self._index.settle(keys, todo, statuses)
        # Counted after the rename, so a concurrent eviction round can only over-count (it saw
        # the file, then we add it): the safe direction, corrected by the next round.
        shared = self._shared
        if published and shared is not None and shared.add(published) > self._max_bytes:
            self._enforce_shared(0)
        return self._put_done(statuses)

    def _put_batches(
        self, batches: Sequence[tuple[Sequence[str], Sequence[PageParts]]]
    ) -> list[list[PageStatus]]:
        # docstring inherited. Packed: one pack for every batch, room made batch by batch.
        if not self._pack_writes or len(batches) < 2:
            return super()._put_batches(batches)
        assert self._packs is not None
        keys = [k for ks, _ in batches for k in ks]
        srcs = [p for _, ps in batches for p in ps]
        ends = list(itertools.accumulate(len(ks) for ks, _ in batches))
        statuses = self._put_done(
            put_packed(self._index, self._packs, keys, srcs, _MTIME_STEP_NS, ends=ends)
        )
        return [statuses[end - len(ks) : end] for (ks, _), end in zip(batches, ends, strict=True)]

    def _put_done(self, statuses: list[PageStatus | None]) -> list[PageStatus]:
        out = [PageStatus.FAILED if s is None else s for s in statuses]
        self._outcomes.count(
            puts_ok=out.count(PageStatus.OK),
            puts_existing=out.count(PageStatus.ALREADY_EXISTS),
            puts_failed=out.count(PageStatus.FAILED),
        )
        return out

    def _plan_shared(self, keys: Sequence[str], statuses: list[PageStatus | None]) -> list[int]:
        """Shared mode: skip pages on disk (whatever our index says), make room for the rest."""
        io = self._require_io()
        todo: list[int] = []
        seen: set[str] = set()
        for i, key in enumerate(keys):
            if key not in seen:
                seen.add(key)
                if io.page_size_on_disk(key) is not None:
                    statuses[i] = PageStatus.ALREADY_EXISTS
                    continue
            todo.append(i)
        need = len(todo) * self._stored
        shared = self._shared
        if need and shared is not None and shared.read() + need > self._max_bytes:
            self._enforce_shared(need)
        return todo

    # ------------------------------------------------------------------ get

    def _get_into(self, keys: Sequence[str], dsts: Sequence[PageParts]) -> list[PageStatus]:
        io = self._require_io()
        shared = self.options.shared
        pages = self._index.pages
        now = None if self.context.read_only else time.time_ns()
        todo = [i for i, key in enumerate(keys) if shared or key in pages]
        # A page read alone has the I/O threads to itself: its pieces are read on them.
        split = len(todo) == 1
        # evicted files are not reused while these reads may hold them open
        spares = self._spares
        reading = (
            spares.reading([keys[i] for i in todo])
            if spares is not None
            else contextlib.nullcontext()
        )
        packs = self._packs
        # the records of packed pages are not punched while these reads may read them
        located = packs.reading([keys[i] for i in todo]) if packs is not None else _NOT_PACKED
        with located as where, reading:
            files = [i for i in todo if keys[i] not in where] if where else todo
            results = self._map(
                lambda i: io.read(
                    keys[i], dsts[i], None if now is None else now - i * _MTIME_STEP_NS, split=split
                ),
                files,
            )
            if where:
                assert packs is not None
                in_packs = [i for i in todo if keys[i] in where]
                packed = read_packed(packs, keys, dsts, in_packs, where, now)
                by_index = dict(zip(files, results, strict=True))
                by_index.update(zip(in_packs, packed, strict=True))
                results = [by_index[i] for i in todo]
        statuses = [PageStatus.NOT_FOUND] * len(keys)
        hits: list[str] = []
        missing: list[str] = []
        corrupt: list[tuple[str, str]] = []
        not_regular: list[str] = []
        for i, (result, field) in zip(todo, results, strict=True):
            key = keys[i]
            if result is ReadResult.OK:
                statuses[i] = PageStatus.OK
                hits.append(key)
                if shared and key not in pages:
                    self._index.note_present(key, self._stored)
            elif result is ReadResult.MISSING:
                missing.append(key)  # deleted or evicted behind our back
            elif result is ReadResult.NOT_REGULAR:
                not_regular.append(key)
            elif result is ReadResult.CORRUPT:
                statuses[i] = PageStatus.CORRUPT
                corrupt.append((key, field))
            elif result is ReadResult.UNKNOWN_VERSION:
                self._outcomes.unknown_version(key, field)  # NOT_FOUND, and the file stays
            else:
                statuses[i] = PageStatus.FAILED
        if not_regular:
            self._outcomes.not_regular(self._layout.page_path(not_regular[0]), len(not_regular))
        if missing or not_regular:
            self._index.note_missing(missing + not_regular)
        self._index.touch(hits)
        self._outcomes.count(
            gets_ok=len(hits),
            gets_missing=statuses.count(PageStatus.NOT_FOUND),
            gets_failed=statuses.count(PageStatus.FAILED),
        )
        for key, field in corrupt:
            self._outcomes.corrupt(key, field, self._remove_corrupt)
        self._flush_packs()
        return statuses

    def _remove_corrupt(self, key: str) -> bool:
        """Forget a page that failed checks and remove it (when writable); True if removed."""
        writable = not self.context.read_only
        if self._shared is not None:
            self._index.note_corrupt(key, unlink=False)
            return writable and self._remove_pages([key]) == 1
        # Unlinked under the index lock, like an eviction: see hicache_localdisk.index.
        return self._index.note_corrupt(key, unlink=writable)

    # ------------------------------------------------------------------ delete, eviction

    def _delete(self, keys: Sequence[str]) -> None:
        failed: list[str] = []
        self._remove_pages(keys, failed)
        self._flush_packs()
        # A page that could not be unlinked (read-only filesystem) stays indexed and served.
        kept = {os.path.basename(path) for path in failed}
        self._index.note_missing([key for key in keys if key not in kept])
        if failed:
            raise BackendError(
                f"localdisk: could not delete {len(failed)} page(s), e.g. {failed[0]}"
            )

    def _remove_pages(self, keys: Sequence[str], failed: list[str] | None = None) -> int:
        """Unlink page files (missing ones are fine); return how many this call removed."""
        packs = self._packs
        packed = 0
        if packs is not None:
            packed, keys = forget_packed(packs, self._layout, keys, failed)
        paths = [self._layout.page_path(key) for key in keys]
        if self._shared is not None:
            return self._shared.remove(paths, self._stored, failed)
        return packed + sum(remove(path, failed) for path in paths)

    def _unlink_page(self, key: str) -> bool:
        """Unlink the file of a page the index is forgetting (it calls this under its lock).

        A packed page is forgotten by its pack at once (a put of the key registers a new
        record from now on); its record is punched by the next ``_flush_packs``, outside the
        index lock, or when the last read in flight naming it ends."""
        packs = self._packs
        if packs is not None and packs.forget([key]):
            return True
        return remove(self._layout.page_path(key))

    def _retire(self, key: str) -> str | None:
        spares = self._spares
        return spares.retire(key) if spares is not None else None

    def _flush_packs(self) -> None:
        """Punch the records of packed pages forgotten so far (one open per pack)."""
        packs = self._packs
        if packs is not None:
            packs.flush()

    def _on_disk(self, key: str) -> bool:
        """Whether ``key`` has a published file or pack record now (the index asks under its
        lock)."""
        packs = self._packs
        if packs is not None and key in packs.located:
            return True
        try:
            st = os.stat(self._layout.page_path(key), follow_symlinks=False)
        except OSError:
            return False
        return S_ISREG(st.st_mode)

    def _enforce_shared(self, need: int) -> None:
        shared = self._shared
        assert shared is not None
        removed = shared.enforce(self._layout, self._stored, self._max_bytes, need)
        if removed:
            self._index.note_evicted(removed)

    def take_evicted(self) -> list[str]:
        # docstring inherited
        return self._index.take_evicted()

    # ------------------------------------------------------------------ stats, listing

    def _stats(self) -> Mapping[str, Any]:
        with self._index.lock:
            pages = len(self._index.pages)
            used = sum(self._index.pages.values())
        counters = self._outcomes.snapshot()
        return {
            **counters,
            "evicted": self._index.evictions,
            "pages": pages,
            "used_bytes": used,
            "shared_used_bytes": self._shared.read() if self._shared is not None else None,
            "max_bytes": self._max_bytes,
            "direct_io": bool(self._io is not None and self._io.direct),
            "packing": self._pack_writes,
            "packed_pages": len(self._packs.located) if self._packs is not None else 0,
            "open_scan": dict(self._open_scan),
        }

    def _iter_pages(self) -> Iterator[StoredPage]:
        # docstring inherited
        scan = self._layout.scan()
        seen: set[str] = set()
        for page in scan.pages:
            seen.add(page.key)
            yield StoredPage(page.key, page.size)
        if scan.packs and not self.options.shared:
            page_bytes = self.context.page_bytes
            found = scan_packs(scan.packs, self._layout.namespace, page_bytes, 0, writable=False)
            for rec in found.records:
                if rec.key not in seen:
                    seen.add(rec.key)
                    yield StoredPage(rec.key, self._stored)

    def _iter_namespaces(self) -> Iterator[str]:
        # docstring inherited
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
