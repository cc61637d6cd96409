"""The slot file: create or check it, map it, and the raw slot operations of the put protocol.

Nothing here knows about keys in a cache or about eviction; :mod:`hicache_mmap.backend` builds
the protocol on top. Every offset is derived from a :class:`~hicache_mmap.layout.Geometry` that
was checked against the file's size, and every length read from a header is checked against the
slot's payload capacity, so no header content can make an access leave the mapping.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from dataclasses import dataclass

from hicache.errors import (
    BackendCapacityError,
    BackendError,
    BackendUnavailableError,
    PageCorruptError,
    PageVersionError,
)
from hicache.storage import (
    DEFAULT_DIR_MODE,
    DEFAULT_FILE_MODE,
    Regions,
    copy_and_hash,
    copy_bytes,
    create_file,
    make_dirs,
    payload_nbytes,
)
from hicache_mmap.layout import (
    BODY_OFFSET,
    FILE_VERSION,
    GEN,
    HEADER_USED,
    SLOT_HEADER_SIZE,
    SLOT_MAGIC,
    SUPERBLOCK_SIZE,
    Geometry,
    decode_superblock,
    encode_slot_body,
    encode_superblock,
)
from hicache_mmap.locks import SetLocks

__all__ = ["OpenRequest", "SlotFile"]

logger = logging.getLogger(__name__)

_ZERO_BODY = bytes(HEADER_USED - BODY_OFFSET)
_MAP_POPULATE: int = getattr(mmap, "MAP_POPULATE", 0)
#: fallocate(2) is not available for this file (filesystem or libc): reserve by writing zeros.
_NO_FALLOCATE = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})
_ZERO_CHUNK = bytes(1 << 20)


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """What a backend asks of the file it opens."""

    path: str
    page_bytes: int
    capacity: int
    associativity: int
    create: bool
    writable: bool
    prefault: bool
    lock_timeout_s: float
    durable: bool = False
    file_mode: int = DEFAULT_FILE_MODE
    dir_mode: int = DEFAULT_DIR_MODE


class SlotFile:
    """An open, mapped slot file. Construct with :meth:`open`; ``close`` releases everything."""

    def __init__(
        self,
        path: str,
        fd: int,
        mm: mmap.mmap,
        geo: Geometry,
        writable: bool,
        lock_timeout_s: float,
    ) -> None:
        self.path = path
        self.fd = fd
        self.mm = mm
        #: One writable (or read-only) view of the whole mapping; slices of it are the only way
        #: payload bytes move, so each put and get copies exactly once.
        self.view = memoryview(mm)
        self.geo = geo
        self.writable = writable
        self.locks = SetLocks(fd, lock_timeout_s)

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, req: OpenRequest) -> SlotFile:
        """Open (creating when asked and absent) and map the slot file ``req.path``."""
        fd = cls._open_fd(req)
        try:
            geo = cls._init_or_check(fd, req)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if req.writable else 0)
            flags = mmap.MAP_SHARED | (_MAP_POPULATE if req.prefault else 0)
            try:
                mm = mmap.mmap(fd, geo.file_size, flags=flags, prot=prot)
            except OSError as exc:
                raise BackendUnavailableError(f"cannot map slot file {req.path}: {exc}") from exc
            if req.prefault and not _MAP_POPULATE:
                _touch_pages(mm)
            return cls(req.path, fd, mm, geo, req.writable, req.lock_timeout_s)
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def exists(path: str) -> bool:
        """True when ``path`` exists and holds at least a superblock's worth of bytes."""
        try:
            return os.stat(path).st_size >= SUPERBLOCK_SIZE
        except FileNotFoundError:
            return False

    @staticmethod
    def _open_fd(req: OpenRequest) -> int:
        flags = (os.O_RDWR if req.writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            if req.create and req.writable:
                make_dirs(os.path.dirname(os.path.abspath(req.path)), req.dir_mode)
                return create_file(req.path, flags, req.file_mode)
            return os.open(req.path, flags)
        except FileNotFoundError as exc:
            why = "create is false" if req.writable else "the tier is read-only"
            raise BackendUnavailableError(f"slot file {req.path} does not exist and {why}") from exc
        except OSError as exc:
            raise BackendUnavailableError(f"cannot open slot file {req.path}: {exc}") from exc

    @staticmethod
    def _init_or_check(fd: int, req: OpenRequest) -> Geometry:
        locks = SetLocks(fd, req.lock_timeout_s)
        # Creation and the geometry check happen under the init lock, so two processes opening
        # a new file at the same moment agree on one geometry, and a reader never sees a file
        # being rebuilt.
        locks.lock_init(exclusive=req.writable)
        try:
            # Every open instance holds a shared "users" lock until it closes: an opener that
            # can convert its own to exclusive knows nobody else has the file mapped.
            locks.hold_users()
            geo = SlotFile._geometry(fd, req, locks)
        except OSError as exc:
            raise BackendUnavailableError(f"cannot initialise slot file {req.path}: {exc}") from exc
        finally:
            locks.unlock_init()
        return geo

    @staticmethod
    def _geometry(fd: int, req: OpenRequest, locks: SetLocks) -> Geometry:
        raw = os.pread(fd, SUPERBLOCK_SIZE, 0)
        if not any(raw):
            # Empty, or a creator died before writing the superblock: nothing to lose.
            if not req.writable:
                raise BackendUnavailableError(f"slot file {req.path} is not initialised")
            return SlotFile._create(fd, req)
        try:
            geo = decode_superblock(raw, os.fstat(fd).st_size)
        except PageVersionError as exc:
            by = "a newer" if exc.version > FILE_VERSION else "an older"
            raise BackendError(
                f"slot file {req.path} was written by {by} hicache ({exc.detail}); refusing to "
                "overwrite it: use another path, or delete it once no process uses it"
            ) from exc
        except PageCorruptError as exc:
            raise BackendError(
                f"{req.path} is not a usable slot file ({exc}); refusing to overwrite it"
            ) from exc
        if not req.writable:
            # A read-only instance never writes or frees a slot, so it can map any geometry as
            # the file records it (the operator tools open tiers this way, with whatever page
            # size they were given); its reads of a page of another size are misses.
            if geo.page_bytes != req.page_bytes:
                logger.info(
                    "slot file %s has geometry %s; read-only, adopting it (this tier's "
                    "%d-byte pages read as misses)",
                    req.path,
                    geo.describe(),
                    req.page_bytes,
                )
            return geo
        wanted = SlotFile._wanted(req)
        if geo == wanted:
            return geo
        # Another geometry was asked for (capacity, page size, associativity changed). Rebuild
        # the file only when that loses nothing: no other process has it open and no slot holds
        # a page. Otherwise refuse: a writer with another page size would take every page of
        # the others for a damaged one and free it.
        if locks.users_idle() and not _any_used(fd, geo):
            logger.info("slot file %s is empty and unused: re-creating it", req.path)
            os.ftruncate(fd, 0)
            return SlotFile._create(fd, req)
        raise BackendError(
            f"slot file {req.path} has geometry {geo.describe()}, this tier asks for "
            f"{wanted.describe()}: every user of a slot file needs the same page_bytes, capacity "
            "and associativity, and one in use or holding pages is never rebuilt; use the "
            "file's options or another path"
        )

    @staticmethod
    def _wanted(req: OpenRequest) -> Geometry:
        try:
            return Geometry.for_capacity(req.capacity, req.page_bytes, req.associativity)
        except ValueError as exc:
            raise BackendError(f"slot file {req.path}: {exc}") from exc

    @staticmethod
    def _create(fd: int, req: OpenRequest) -> Geometry:
        geo = SlotFile._wanted(req)
        os.ftruncate(fd, geo.file_size)
        _reserve(fd, req, geo)
        # Written last: a creator that dies before this leaves a file the next opener re-creates.
        os.pwrite(fd, encode_superblock(geo), 0)
        if req.durable:
            os.fsync(fd)
        logger.info(
            "created slot file %s: %d sets x %d slots of %d bytes",
            req.path,
            geo.num_sets,
            geo.associativity,
            geo.slot_size,
        )
        return geo

    def close(self) -> None:
        """Unmap and close. Callers stop all other use first."""
        self.view.release()
        self.mm.close()
        os.close(self.fd)

    # ------------------------------------------------------------------ raw slot access

    def slot_offset(self, slot: int) -> int:
        return self.geo.slot_offset(slot)

    def generation(self, slot: int) -> int:
        (gen,) = GEN.unpack_from(self.mm, self.geo.slot_offset(slot))
        return int(gen)

    def header(self, slot: int) -> bytes:
        """A copy of the used bytes of slot ``slot``'s header."""
        off = self.geo.slot_offset(slot)
        return self.mm[off : off + HEADER_USED]

    def set_version(self, set_index: int) -> int:
        (version,) = GEN.unpack_from(self.mm, self.geo.set_version_offset(set_index))
        return int(version)

    def bump_set_version(self, set_index: int) -> int:
        """Advance set ``set_index``'s version (its writer lock held); return the new value."""
        off = self.geo.set_version_offset(set_index)
        (version,) = GEN.unpack_from(self.mm, off)
        version = (int(version) + 1) & 0xFFFF_FFFF_FFFF_FFFF
        GEN.pack_into(self.mm, off, version)
        return version

    def begin_write(self, slot: int, durable: bool) -> int:
        """Make the slot's generation odd (a writer owns it); return that odd generation."""
        off = self.geo.slot_offset(slot)
        (gen,) = GEN.unpack_from(self.mm, off)
        # A writer that died leaves an odd generation: step past it, never back to a used value.
        odd = int(gen) + (1 if gen % 2 == 0 else 2)
        GEN.pack_into(self.mm, off, odd)
        if durable:
            self.mm.flush(off, SLOT_HEADER_SIZE)
        return odd

    def write_payload(self, slot: int, src: Regions, durable: bool) -> int:
        """Copy ``src`` (a buffer or a page's regions, piecewise) into the slot's payload area
        (the one copy of a put); return its checksum (``pageformat.payload_checksum``)."""
        off = self.geo.slot_offset(slot) + SLOT_HEADER_SIZE
        n = payload_nbytes(src)
        if n > self.geo.slot_payload:
            raise ValueError(f"payload of {n} bytes exceeds the {self.geo.slot_payload}-byte slot")
        # The slice pins the mapping (close() fails with BufferError) while the copy, which
        # works on raw addresses with the GIL released, runs.
        region = self.view[off : off + n]
        checksum = copy_and_hash(region, src, hash_dst=False)
        if durable:
            self.mm.flush(off, -(-n // mmap.PAGESIZE) * mmap.PAGESIZE)
        return checksum

    def read_payload(self, slot: int, dst: Regions, verify: bool) -> int | None:
        """Copy the slot's first payload bytes into ``dst`` (a buffer or a page's regions, filled
        piecewise); return the checksum of what was copied when ``verify``, else ``None``."""
        off = self.geo.slot_offset(slot) + SLOT_HEADER_SIZE
        # A get's page is one region but for scatter-gather callers: its size without the
        # generic walk (~1 us, a tenth of the Python of a get).
        if isinstance(dst, memoryview):
            n = dst.nbytes
        else:
            n = dst[0].nbytes if len(dst) == 1 else payload_nbytes(dst)
        if n > self.geo.slot_payload:
            raise ValueError(f"payload of {n} bytes exceeds the {self.geo.slot_payload}-byte slot")
        region = self.view[off : off + n]  # pins the mapping: see write_payload
        if not verify:
            copy_bytes(dst, region)
            return None
        return copy_and_hash(dst, region, hash_dst=True)

    def finish_write(
        self,
        slot: int,
        odd: int,
        key_raw: bytes,
        ns_field: bytes,
        payload_len: int,
        checksum: int,
        durable: bool,
    ) -> int:
        """Write the header for a complete payload, then publish it (even generation)."""
        off = self.geo.slot_offset(slot)
        final = odd + 1
        self.mm[off + BODY_OFFSET : off + HEADER_USED] = encode_slot_body(
            final, key_raw, ns_field, payload_len, checksum
        )
        # The header is complete before the generation turns even (x86 stores are not reordered
        # with each other), so a reader that sees the even value sees the whole header.
        GEN.pack_into(self.mm, off, final)
        if durable:
            self.mm.flush(off, SLOT_HEADER_SIZE)
        return final

    def clear(self, slot: int, durable: bool) -> None:
        """Free the slot: odd generation, zero header body, even generation."""
        off = self.geo.slot_offset(slot)
        odd = self.begin_write(slot, False)
        self.mm[off + BODY_OFFSET : off + HEADER_USED] = _ZERO_BODY
        GEN.pack_into(self.mm, off, odd + 1)
        if durable:
            self.mm.flush(off, SLOT_HEADER_SIZE)


def _any_used(fd: int, geo: Geometry) -> bool:
    """True when any slot header carries the slot magic (read with ``pread``, before mapping)."""
    for slot in range(geo.num_slots):
        magic_at = geo.slot_offset(slot) + BODY_OFFSET
        if os.pread(fd, len(SLOT_MAGIC), magic_at) == SLOT_MAGIC:
            return True
    return False


def _reserve(fd: int, req: OpenRequest, geo: Geometry) -> None:
    """Give the new file all its blocks now.

    ``ftruncate`` leaves the file sparse, and a store into a page of a shared mapping that the
    filesystem cannot back (a full tmpfs) is a SIGBUS that kills the process: running out of
    room must happen here, as an error, instead.
    """
    st = os.fstatvfs(fd)
    free = st.f_bavail * st.f_frsize
    try:
        try:
            os.posix_fallocate(fd, 0, geo.file_size)
        except OSError as exc:
            if exc.errno not in _NO_FALLOCATE:
                raise
            _write_zeros(fd, geo.file_size)
    except OSError as exc:
        os.ftruncate(fd, 0)  # give back whatever was reserved; the next opener starts over
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise BackendCapacityError(
                f"slot file {req.path}: no room for capacity {req.capacity} bytes (a "
                f"{geo.file_size}-byte file) on its filesystem, {free} bytes free; lower "
                "capacity or free space"
            ) from exc
        raise BackendUnavailableError(
            f"cannot reserve {geo.file_size} bytes for slot file {req.path}: {exc}"
        ) from exc


def _write_zeros(fd: int, size: int) -> None:
    # The file is new and all zero: writing zeros changes nothing but gives every page a block,
    # and a write that finds no room fails with ENOSPC where a store would have been a SIGBUS.
    off = 0
    while off < size:
        n = os.pwrite(fd, memoryview(_ZERO_CHUNK)[: min(len(_ZERO_CHUNK), size - off)], off)
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        off += n


def _touch_pages(mm: mmap.mmap) -> None:
    # Without MAP_POPULATE, read one byte per page so later copies do not fault.
    for off in range(0, len(mm), mmap.PAGESIZE):
        mm[off]
