"""``MmapBackend``: pages in a set-associative slot file, shared by the processes that map it.

A key can live only in the slots of its set (``int(key[:16], 16) % num_sets``), so any process
finds any page by reading that set's headers: there is no shared index. Each process keeps a
local index (key -> slot and the generation it saw there) that a single generation read
validates, and a per-set version counter in the file tells it when a set it already scanned
has changed.

- **put** (per key, under the set's thread lock and OFD lock): refresh the local view of the set
  when its version changed; an existing copy is ``ALREADY_EXISTS``; else take a free slot or
  CLOCK's victim, make its generation odd, copy the payload in (the one copy, hashed as it goes),
  write the header, make the generation even, bump the set version.
- **get_into** (no lock, a seqlock read): read and check the header, copy the payload into the
  caller's buffer, re-read the generation; a change means the page was replaced while being
  read (``NOT_FOUND`` after one retry), a checksum mismatch is ``CORRUPT``. Wrong bytes are never
  reported ``OK``.
- **open** scans every header to rebuild the local view; odd or torn slots count as free. A
  writable open needs the file's geometry (page size, capacity, associativity); a read-only one
  (the ``hicache storage`` tools) adopts the file's own, lists its pages, and reads a page of
  another size as ``NOT_FOUND`` (counted as ``other_size_reads``), never as damage.

The local view (index, per-set versions, CLOCK) and how it is kept current are in
:mod:`hicache_mmap.view`; this module holds the protocol: locking, reads, writes and counts.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final

import xxhash

from hicache.errors import BackendCapacityError, BackendClosedError, BackendError
from hicache.storage import (
    Backend,
    BackendConfig,
    BackendContext,
    Capabilities,
    PageParts,
    PageStatus,
    StoredPage,
)
from hicache_mmap.calls import CallGate
from hicache_mmap.layout import (
    BODY_OFFSET,
    GEN,
    HEADER_USED,
    HSUM_OFFSET,
    KEY_OFFSET,
    NS_FIELD_END,
    NS_FIELD_OFFSET,
    SLOT_MAGIC,
    SlotState,
    decode_slot_header,
    namespace_field,
    used_slot,
)
from hicache_mmap.locks import LockTimeoutError
from hicache_mmap.options import MmapOptions, MsyncMode
from hicache_mmap.slotfile import OpenRequest, SlotFile
from hicache_mmap.view import LocalView

if TYPE_CHECKING:
    from hicache.storage import RawBaseline

__all__ = ["MmapBackend"]

logger = logging.getLogger(__name__)

#: Slots whose headers a listing reads per visit to the mapping.
_LIST_CHUNK: Final = 4096
#: CPUs whose store/load ordering (TSO) makes the fence-free seqlock read sound.
_TSO_MACHINES: Final = frozenset({"x86_64", "AMD64", "i686", "i386"})


class _Race(Exception):
    """The slot changed under a lock-free read; the caller retries or reports NOT_FOUND."""


class MmapBackend(Backend):
    """Pages in one memory-mapped file of fixed-size slots (kind ``mmap``)."""

    config_model: ClassVar[type[BackendConfig]] = MmapOptions

    def __init__(self, config: BackendConfig, context: BackendContext) -> None:
        super().__init__(config, context)
        if not isinstance(config, MmapOptions):  # pragma: no cover - Backend.__init__ checks
            raise TypeError(f"MmapBackend expects MmapOptions, got {type(config).__name__}")
        self.options: MmapOptions = config
        self._file: SlotFile | None = None
        # Every data call holds the gate while it touches the mapping: close() waits for them.
        self._calls = CallGate(f"mmap tier {context.tier_name!r}")
        self._ns_field = namespace_field(context.namespace)
        self._durable = config.msync is MsyncMode.ON_PUT
        self._pid = 0
        # Kept for the backend's life (a close only empties its index): a call still in flight
        # when the backend closes goes on with the view it started with.
        self._view = LocalView(self._ns_field)
        self._evicted: list[str] = []
        self._evicted_lock = threading.Lock()
        self._logged_corrupt: set[tuple[int, int]] = set()
        self._counts: dict[str, int] = dict.fromkeys(
            (
                "puts",
                "gets",
                "hits",
                "evictions",
                "corrupt",
                "races",
                "lock_timeouts",
                "other_size_reads",
            ),
            0,
        )
        self._scan_seconds = 0.0
        self._empty = False

    @property
    def capabilities(self) -> Capabilities:
        # docstring inherited
        return Capabilities(
            persistent=True,
            shared=True,
            manages_capacity=True,
            max_batch=1024,
            alignment=1,
            listable=True,
            default_medium="DISK",
        )

    # ------------------------------------------------------------------ lifecycle

    def _open(self) -> None:
        opts = self.options
        if self.context.read_only and not SlotFile.exists(opts.path):
            # Nothing was ever stored: a reader sees an empty tier rather than an error.
            logger.warning(
                "read-only mmap tier: %s does not exist yet; it reads as empty", opts.path
            )
            self._pid = os.getpid()
            self._empty = True
            self._calls.open()
            return
        self._empty = False
        self._file = file = SlotFile.open(
            OpenRequest(
                path=opts.path,
                page_bytes=self.context.page_bytes,
                capacity=opts.capacity,
                associativity=opts.associativity,
                create=opts.create,
                writable=not self.context.read_only,
                prefault=opts.prefault,
                lock_timeout_s=opts.lock_timeout_s,
                durable=self._durable,
                file_mode=opts.file_mode,
                dir_mode=opts.dir_mode,
            )
        )
        self._pid = os.getpid()
        if platform.machine() not in _TSO_MACHINES and not opts.verify_checksum:
            logger.warning(
                "mmap tier %r: lock-free reads rely on x86-64 memory ordering; on %s keep "
                "verify_checksum on so a torn page is caught by its checksum",
                self.context.tier_name,
                platform.machine(),
            )
        self._scan(file)
        self._calls.open()

    def _close(self) -> None:
        file = self._file

        def release() -> None:
            # Runs once no call is in flight (see CallGate), possibly after a reopen: it
            # releases this file only.
            self._empty = False
            if file is None:
                return
            if self._file is file:
                self._file = None
                self._view.index.clear()
            try:
                file.close()
            except BufferError:  # pragma: no cover - every slice dies with its call
                logger.warning("slot file %s still in use at close; left mapped", file.path)

        # Calls in flight are bounded by their lock waits; the gate hands the release to the
        # last of them should this wait run out.
        self._calls.close(release, timeout_s=max(30.0, 4 * self.options.lock_timeout_s))

    def _scan(self, file: SlotFile) -> None:
        """Rebuild the local view from every slot header, and log how long that took."""
        self._scan_seconds = self._view.scan(file)
        geo = file.geo
        logger.info(
            "opened %s: %d slots scanned in %.3fs (%.0f slots/s), %d pages of namespace %s",
            file.path,
            geo.num_slots,
            self._scan_seconds,
            geo.num_slots / max(self._scan_seconds, 1e-9),
            len(self._view.index),
            self.context.namespace,
        )

    def _req_file(self) -> SlotFile:
        file = self._file
        if file is None:
            raise BackendClosedError(f"mmap tier {self.context.tier_name!r} is not open")
        return file

    # ------------------------------------------------------------------ lookup

    def _exists(self, keys: Sequence[str]) -> list[bool]:
        self._calls.enter()
        try:
            if self._empty:
                return [False] * len(keys)
            file = self._req_file()
            if file.geo.page_bytes != self.context.page_bytes:
                # a read-only open that adopted the file's geometry: every page in the file
                # has the file's page size, so none is a page of ours
                return [False] * len(keys)
            return self._view.exists(file, keys)
        finally:
            self._calls.leave()

    # ------------------------------------------------------------------ get

    def _get_into(self, keys: Sequence[str], dsts: Sequence[PageParts]) -> list[PageStatus]:
        self._calls.enter()
        try:
            if self._empty:
                return [PageStatus.NOT_FOUND] * len(keys)
            file = self._req_file()
            out: list[PageStatus] = []
            for key, dst in zip(keys, dsts, strict=True):
                out.append(self._get_one(file, key, dst))
            self._counts["gets"] += len(keys)
            return out
        finally:
            self._calls.leave()

    def _get_one(self, file: SlotFile, key: str, dst: PageParts) -> PageStatus:
        view = self._view
        for _attempt in range(2):
            entry = view.locate(file, key)
            if entry is None:
                return PageStatus.NOT_FOUND
            try:
                status = self._read_slot(file, entry[0], key, dst)
            except _Race:
                self._counts["races"] += 1
                continue
            if status is PageStatus.OK:
                self._counts["hits"] += 1
                clock = view.clock
                if clock is not None:
                    clock.touch(entry[0])
            return status
        # Replaced twice while we read it: it is gone for this reader. The destination may hold
        # some of the replacement's bytes; the cache never uses a buffer that is not OK.
        return PageStatus.NOT_FOUND

    def _read_slot(self, file: SlotFile, slot: int, key: str, dst: PageParts) -> PageStatus:
        """Seqlock read of one slot into ``dst``; raises ``_Race`` when the slot changed."""
        geo = file.geo
        mm = file.mm
        off = geo.slots_offset + slot * geo.slot_size
        raw = mm[off : off + HEADER_USED]
        (gen,) = GEN.unpack_from(raw, 0)
        if gen & 1:
            raise _Race
        body = raw[BODY_OFFSET:HSUM_OFFSET]
        (hsum,) = GEN.unpack_from(raw, HSUM_OFFSET)
        if body[:8] != SLOT_MAGIC or hsum != xxhash.xxh3_64_intdigest(body, gen):
            # Either a writer got in between the generation and the rest of our copy, or the
            # header is damaged: only a re-read of the generation tells which.
            if GEN.unpack_from(mm, off)[0] != gen:
                raise _Race
            return self._corrupt(slot, gen, key, "header checksum")
        if raw[KEY_OFFSET : KEY_OFFSET + 32] != bytes.fromhex(key) or (
            raw[NS_FIELD_OFFSET:NS_FIELD_END] != self._ns_field
        ):
            raise _Race  # the slot now holds another page; the index was stale
        (payload_len,) = GEN.unpack_from(raw, 16)
        (checksum,) = GEN.unpack_from(raw, 24)
        if payload_len == geo.page_bytes != self.context.page_bytes:
            # a read-only open of a file of another geometry: the page is intact but not of
            # our size, a miss that stays in place
            self._counts["other_size_reads"] += 1
            return PageStatus.NOT_FOUND
        if payload_len != self.context.page_bytes or payload_len > geo.slot_payload:
            return self._corrupt(slot, gen, key, f"payload length {payload_len}")
        copied_sum = file.read_payload(slot, dst, self.options.verify_checksum)
        if GEN.unpack_from(mm, off)[0] != gen:
            raise _Race
        if copied_sum is not None and copied_sum != checksum:
            return self._corrupt(slot, gen, key, "payload checksum")
        return PageStatus.OK

    def _corrupt(self, slot: int, gen: int, key: str, what: str) -> PageStatus:
        self._counts["corrupt"] += 1
        if (slot, gen) not in self._logged_corrupt:
            self._logged_corrupt.add((slot, gen))
            logger.warning(
                "corrupt page %s in slot %d of %s: %s mismatch",
                key,
                slot,
                self.options.path,
                what,
            )
        self._free_corrupt(slot, gen)
        return PageStatus.CORRUPT

    def _free_corrupt(self, slot: int, gen: int) -> None:
        """Free a slot that failed verification, so the page can be stored again (a put would
        otherwise find the damaged copy and answer ALREADY_EXISTS forever)."""
        file = self._file
        if file is None or self.context.read_only or os.getpid() != self._pid:
            return
        s = slot // file.geo.associativity
        try:
            file.locks.acquire(s)
        except LockTimeoutError:
            return  # a busy set: the next reader that finds the damage tries again
        try:
            if file.generation(slot) != gen:
                return  # already replaced by a writer
            file.clear(slot, self._durable)
            view = self._view
            clock = view.clock
            if clock is not None:
                clock.release(slot)
            view.observe(slot, None, gen + 2)
            view.seen[s] = file.bump_set_version(s)
        finally:
            file.locks.release(s)

    # ------------------------------------------------------------------ put / delete

    def _check_pid(self) -> None:
        # OFD locks belong to the open file, which a fork shares: a child writing through its
        # parent's mapping would not be excluded by the parent's locks.
        if os.getpid() != self._pid:
            raise BackendError(
                "mmap backend used in a forked child; open a new instance after fork"
            )

    def _put(self, keys: Sequence[str], srcs: Sequence[PageParts]) -> list[PageStatus]:
        self._calls.enter()
        try:
            return self._put_all(self._req_file(), keys, srcs)
        finally:
            self._calls.leave()

    def _put_all(
        self, file: SlotFile, keys: Sequence[str], srcs: Sequence[PageParts]
    ) -> list[PageStatus]:
        self._check_pid()
        out: list[PageStatus] = []
        for key, src in zip(keys, srcs, strict=True):
            try:
                out.append(self._put_one(file, key, src))
            except LockTimeoutError as exc:
                self._counts["lock_timeouts"] += 1
                logger.warning("put of %s failed: %s", key, exc)
                out.append(PageStatus.FAILED)
            except BackendCapacityError as exc:
                logger.warning("put of %s failed: %s", key, exc)
                out.append(PageStatus.FAILED)
        self._counts["puts"] += len(keys)
        return out

    def _put_one(self, file: SlotFile, key: str, src: PageParts) -> PageStatus:
        page_bytes = self.context.page_bytes
        geo = file.geo
        s = int(key[:16], 16) % geo.num_sets
        first = s * geo.associativity
        end = first + geo.associativity
        view = self._view
        clock = view.clock
        assert clock is not None
        victim_key: str | None = None
        evicted = False
        durable = self._durable
        file.locks.acquire(s)
        try:
            # Under the writer lock the set is stable: after a refresh (skipped when the set's
            # version shows nothing changed since we last saw it) the local view is exact.
            view.rescan_set(file, s, writer=True)
            entry = view.index.get(key)
            if entry is not None and file.generation(entry[0]) == entry[1]:
                clock.touch(entry[0])
                return PageStatus.ALREADY_EXISTS
            slot = clock.choose(first, end)
            if clock.is_used(slot):
                evicted = True
                victim_key = view.slot_key[slot]
            odd = file.begin_write(slot, durable)
            view.observe(slot, None, odd)
            checksum = file.write_payload(slot, src, durable)
            final = file.finish_write(
                slot, odd, bytes.fromhex(key), self._ns_field, page_bytes, checksum, durable
            )
            if not clock.is_used(slot):
                clock.mark_used(slot)
            view.observe(slot, key, final)
            view.seen[s] = file.bump_set_version(s)
        finally:
            file.locks.release(s)
        if evicted:
            self._counts["evictions"] += 1
            if victim_key is not None:
                with self._evicted_lock:
                    self._evicted.append(victim_key)
        return PageStatus.OK

    def _delete(self, keys: Sequence[str]) -> None:
        self._calls.enter()
        try:
            self._delete_all(self._req_file(), keys)
        finally:
            self._calls.leave()

    def _delete_all(self, file: SlotFile, keys: Sequence[str]) -> None:
        self._check_pid()
        geo = file.geo
        view = self._view
        clock = view.clock
        assert clock is not None
        for key in keys:
            s = int(key[:16], 16) % geo.num_sets
            file.locks.acquire(s)
            try:
                view.rescan_set(file, s, writer=True)
                entry = view.index.get(key)
                if entry is None:
                    continue
                slot = entry[0]
                hdr = decode_slot_header(file.header(slot), geo.slot_payload)
                if hdr.state is not SlotState.USED or hdr.key != key:
                    continue
                file.clear(slot, self._durable)
                clock.release(slot)
                view.observe(slot, None, hdr.generation + 2)
                view.seen[s] = file.bump_set_version(s)
            finally:
                file.locks.release(s)

    # ------------------------------------------------------------------ other calls

    @classmethod
    def bench_baseline(cls, config: BackendConfig, context: BackendContext) -> RawBaseline:
        """The raw limit for ``hicache bench storage``: memcpy through a prefaulted mapping."""
        from hicache_mmap.rawbench import MmapRawBaseline  # the bench code loads lazily

        if not isinstance(config, MmapOptions):
            raise TypeError(f"MmapBackend expects MmapOptions, got {type(config).__name__}")
        return MmapRawBaseline(config.path, prefault=config.prefault)

    def drop_page_cache(self) -> bool:
        """Cold reads are not measurable: a shared mapping's pages cannot be dropped safely."""
        return False

    def take_evicted(self) -> list[str]:
        # docstring inherited
        with self._evicted_lock:
            out, self._evicted = self._evicted, []
        return out

    def _iter_pages(self) -> Iterator[StoredPage]:
        # docstring inherited
        ours = self._ns_field
        for _slot, slot_size, key_raw, ns, payload_len in self._iter_used():
            if ns == ours:
                yield StoredPage(key_raw.hex(), slot_size, payload_len)

    def _iter_namespaces(self) -> Iterator[str]:
        # docstring inherited
        seen: set[bytes] = set()
        for _slot, _size, _key, ns, _len in self._iter_used():
            if ns not in seen:
                seen.add(ns)
                name = ns[1 : 1 + ns[0]].decode("ascii", "replace")
                yield name

    def _iter_used(self) -> Iterator[tuple[int, int, bytes, bytes, int]]:
        """``(slot, slot_size, key_raw, ns_field, payload_len)`` of every used slot (no locks).

        Read in chunks, each under the call gate: a listing paused by its consumer never holds
        up ``close()``, and one resumed after it raises ``BackendClosedError``.
        """
        start = 0
        while True:
            self._calls.enter()
            try:
                if self._empty:
                    return
                file = self._req_file()
                end = min(start + _LIST_CHUNK, file.geo.num_slots)
                chunk = list(self._used_in(file, start, end))
            finally:
                self._calls.leave()
            yield from chunk
            if end >= file.geo.num_slots:
                return
            start = end

    @staticmethod
    def _used_in(
        file: SlotFile, start: int, end: int
    ) -> Iterator[tuple[int, int, bytes, bytes, int]]:
        geo = file.geo
        mm, payload, base, size = file.mm, geo.slot_payload, geo.slots_offset, geo.slot_size
        for slot in range(start, end):
            off = base + slot * size
            if mm[off + BODY_OFFSET : off + BODY_OFFSET + 8] != SLOT_MAGIC:
                continue
            raw = mm[off : off + HEADER_USED]
            found = used_slot(raw, payload)
            if found is not None:
                yield slot, size, found[1], found[2], GEN.unpack_from(raw, 16)[0]

    def _stats(self) -> Mapping[str, Any]:
        file = self._file
        out: dict[str, Any] = dict(self._counts)
        out["calls_in_flight"] = self._calls.active
        if file is not None:
            geo = file.geo
            clock = self._view.clock
            out.update(
                path=file.path,
                num_slots=geo.num_slots,
                num_sets=geo.num_sets,
                associativity=geo.associativity,
                slot_bytes=geo.slot_size,
                capacity_bytes=geo.num_slots * geo.slot_size,
                used_slots=clock.num_used if clock is not None else 0,
                used_bytes=(clock.num_used if clock is not None else 0) * geo.slot_size,
                pages=len(self._view.index),
                scan_seconds=self._scan_seconds,
                scan_slots_per_s=geo.num_slots / max(self._scan_seconds, 1e-9),
            )
            if geo.page_bytes != self.context.page_bytes:  # an adopted geometry: none is ours
                out.update(pages=0, other_size_pages=len(self._view.index))
        return out
