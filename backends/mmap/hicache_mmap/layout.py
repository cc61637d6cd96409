"""On-file layout of the slot file: superblock, per-set version counters, slot headers.

File (integers little-endian)::

    0                 superblock (SUPERBLOCK_SIZE = 4 KiB): the file version and the geometry
                      (page size, slot payload and size, sets, associativity, offsets, file
                      size), with an xxh3 of them all
    SUPERBLOCK_SIZE   set table: one u64 version per set, bumped after every change to the set
                      (lets a reader that missed a key skip rescanning an unchanged set);
                      padded to 4 KiB
    slots_offset      num_sets * associativity slots of slot_size bytes each; set ``s`` owns
                      slots ``[s * associativity, (s + 1) * associativity)``

Slot (``slot_size = SLOT_HEADER_SIZE + slot_payload``)::

    offset  size  field
         0     8  generation       odd while a writer owns the slot, even otherwise
         8     8  magic            SLOT_MAGIC (all zero: a free slot)
        16     8  payload length   <= slot_payload
        24     8  payload checksum xxh3_64 of the payload (``pageformat.payload_checksum``)
        32    32  key              the 32 bytes of the page key's hex
        64     1  namespace length 1..64
        65    64  namespace        ASCII, zero padded
       129     7  zero
       136     8  header checksum  xxh3_64 of bytes 8..136, seeded with the generation
       144  3952  unused (the payload starts 4 KiB aligned)

Seeding the header checksum with the generation ties the header to the write that produced it:
a torn header, a flipped byte anywhere in bytes 0..144, or a header paired with a generation it
was not written under all fail the check.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Final

import xxhash

from hicache.errors import PageCorruptError, PageVersionError
from hicache.storage import HEADER_SIZE

__all__ = [
    "FILE_VERSION",
    "SLOT_HEADER_SIZE",
    "SUPERBLOCK_SIZE",
    "Geometry",
    "SlotHeader",
    "SlotState",
    "decode_slot_header",
    "decode_superblock",
    "encode_slot_body",
    "encode_superblock",
    "namespace_field",
    "used_slot",
]

SUPERBLOCK_SIZE: Final[int] = 4096
#: Slot headers are padded like every hicache page header, so payloads stay 4 KiB aligned.
SLOT_HEADER_SIZE: Final[int] = HEADER_SIZE
#: Version 2 added the page size to the superblock (version 1 files are refused, never read).
FILE_VERSION: Final[int] = 2
FILE_MAGIC: Final[bytes] = b"\x89HICMMAP"
SLOT_MAGIC: Final[bytes] = b"\x89HICSLOT"
_ALIGN: Final[int] = 4096

# magic, version, slot header size, page bytes, slot payload, slot size, num sets,
# associativity, reserved, set table offset, slots offset, file size; then an xxh3_64 of those.
_SUPER = struct.Struct("<8sIIQQQQIIQQQ")
_VERSION_AT: Final[int] = 8
_SUPER_SUM = struct.Struct("<Q")

GEN: Final = struct.Struct("<Q")
_U64: Final = GEN
_GEN_MAGIC: Final = struct.Struct("<Q8s")
#: Everything after the generation: magic .. namespace, then the header checksum.
_BODY = struct.Struct("<8sQQ32sB64s7x")
_HSUM = struct.Struct("<Q")
BODY_OFFSET: Final[int] = GEN.size
HSUM_OFFSET: Final[int] = BODY_OFFSET + _BODY.size
HEADER_USED: Final[int] = HSUM_OFFSET + _HSUM.size  # 144
KEY_OFFSET: Final[int] = 32
NS_FIELD_OFFSET: Final[int] = 64
NS_FIELD_END: Final[int] = NS_FIELD_OFFSET + 65


def _round_up(n: int, align: int = _ALIGN) -> int:
    return -(-n // align) * align


@dataclass(frozen=True, slots=True)
class Geometry:
    """Where everything lives in one slot file; derived once, checked against the file size.

    ``page_bytes`` is part of it: every page in the file has exactly that payload length, so a
    reader with another page size would take every page for a damaged one.
    """

    page_bytes: int
    num_sets: int
    associativity: int
    # Derived once (hot paths read them per call); see __post_init__.
    slot_payload: int = field(init=False)
    slot_size: int = field(init=False)
    num_slots: int = field(init=False)
    slots_offset: int = field(init=False)
    file_size: int = field(init=False)

    def __post_init__(self) -> None:
        slot_payload = _round_up(self.page_bytes)
        slot_size = SLOT_HEADER_SIZE + slot_payload
        num_slots = self.num_sets * self.associativity
        slots_offset = SUPERBLOCK_SIZE + _round_up(8 * self.num_sets)
        object.__setattr__(self, "slot_payload", slot_payload)
        object.__setattr__(self, "slot_size", slot_size)
        object.__setattr__(self, "num_slots", num_slots)
        object.__setattr__(self, "slots_offset", slots_offset)
        object.__setattr__(self, "file_size", slots_offset + num_slots * slot_size)

    @classmethod
    def for_capacity(cls, capacity: int, page_bytes: int, associativity: int) -> Geometry:
        """Fit whole sets of slots for ``page_bytes`` pages into ``capacity`` bytes.

        A capacity too small for one full set gets one smaller set; one too small for a single
        slot raises ``ValueError``.
        """
        slot_payload = _round_up(page_bytes)
        slot_size = SLOT_HEADER_SIZE + slot_payload
        num_slots = capacity // slot_size
        if num_slots < 1:
            raise ValueError(
                f"capacity {capacity} bytes holds no slot of {slot_size} bytes "
                f"(a {page_bytes}-byte page plus its {SLOT_HEADER_SIZE}-byte header)"
            )
        assoc = min(associativity, num_slots)
        return cls(page_bytes, num_slots // assoc, assoc)

    def describe(self) -> str:
        """One line naming what defines the layout (for errors that compare two geometries)."""
        return (
            f"page_bytes={self.page_bytes}, {self.num_sets} sets x {self.associativity} slots "
            f"({self.file_size} bytes)"
        )

    @property
    def set_table_offset(self) -> int:
        return SUPERBLOCK_SIZE

    def slot_offset(self, slot: int) -> int:
        """Offset of slot ``slot``'s header; ``IndexError`` outside the file."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} outside 0..{self.num_slots - 1}")
        return self.slots_offset + slot * self.slot_size

    def set_version_offset(self, set_index: int) -> int:
        return SUPERBLOCK_SIZE + 8 * set_index


def encode_superblock(geo: Geometry) -> bytes:
    """The ``SUPERBLOCK_SIZE`` bytes describing ``geo``."""
    body = _SUPER.pack(
        FILE_MAGIC,
        FILE_VERSION,
        SLOT_HEADER_SIZE,
        geo.page_bytes,
        geo.slot_payload,
        geo.slot_size,
        geo.num_sets,
        geo.associativity,
        0,
        geo.set_table_offset,
        geo.slots_offset,
        geo.file_size,
    )
    out = body + _SUPER_SUM.pack(xxhash.xxh3_64_intdigest(body))
    return out + bytes(SUPERBLOCK_SIZE - len(out))


def decode_superblock(raw: bytes, file_size: int) -> Geometry:
    """Parse and check a superblock; ``PageCorruptError`` names the first field that is wrong,
    ``PageVersionError`` reports a file of another version (magic intact, version differs)."""
    if len(raw) < _SUPER.size + _SUPER_SUM.size:
        raise PageCorruptError("length", f"superblock of {len(raw)} bytes")
    if raw[: len(FILE_MAGIC)] != FILE_MAGIC:
        raise PageCorruptError("magic", f"{raw[: len(FILE_MAGIC)]!r} is not a hicache slot file")
    (version,) = struct.unpack_from("<I", raw, _VERSION_AT)
    if version != FILE_VERSION:
        # Checked before the rest: another version's superblock has another layout.
        raise PageVersionError(version, f"file version {version}, this reader knows {FILE_VERSION}")
    body = raw[: _SUPER.size]
    (_, _, hdr, page, payload, slot_size, sets, assoc, _, table, slots, size) = _SUPER.unpack(body)
    (stored_sum,) = _SUPER_SUM.unpack_from(raw, _SUPER.size)
    if stored_sum != xxhash.xxh3_64_intdigest(body):
        raise PageCorruptError("header_checksum", "superblock checksum mismatch")
    if hdr != SLOT_HEADER_SIZE or page <= 0 or sets < 1 or assoc < 1:
        raise PageCorruptError("length", f"bad geometry {hdr}/{page}/{sets}/{assoc}")
    geo = Geometry(page, sets, assoc)
    if (payload, slot_size, table, slots, size) != (
        geo.slot_payload,
        geo.slot_size,
        geo.set_table_offset,
        geo.slots_offset,
        geo.file_size,
    ):
        raise PageCorruptError("length", "superblock offsets disagree with its geometry")
    if size != file_size:
        raise PageCorruptError("length", f"superblock says {size} bytes, the file has {file_size}")
    return geo


def namespace_field(namespace: str) -> bytes:
    """The 65 bytes (length + zero-padded ASCII) a namespace occupies in a slot header."""
    raw = namespace.encode("ascii")
    return bytes([len(raw)]) + raw.ljust(64, b"\0")


class SlotState(enum.Enum):
    """What a slot header says, judged without reading the payload."""

    FREE = "free"  # never written, deleted, or an all-zero header
    BUSY = "busy"  # odd generation: a writer owns it (or died owning it)
    TORN = "torn"  # even generation but the header fails its checks
    USED = "used"


@dataclass(frozen=True, slots=True)
class SlotHeader:
    """A decoded slot header (``key``/``namespace`` are set only when ``state`` is USED)."""

    state: SlotState
    generation: int
    key: str = ""
    namespace: str = ""
    payload_len: int = 0
    checksum: int = 0


def encode_slot_body(
    generation: int, key_raw: bytes, ns_field: bytes, payload_len: int, checksum: int
) -> bytes:
    """Bytes ``BODY_OFFSET..HEADER_USED`` of a slot header written under even ``generation``."""
    body = _BODY.pack(SLOT_MAGIC, payload_len, checksum, key_raw, ns_field[0], ns_field[1:])
    return body + _HSUM.pack(xxhash.xxh3_64_intdigest(body, generation))


def decode_slot_header(raw: bytes, slot_payload: int) -> SlotHeader:
    """Judge ``HEADER_USED`` header bytes; never raises for any content."""
    (generation,) = GEN.unpack_from(raw, 0)
    if generation & 1:
        return SlotHeader(SlotState.BUSY, generation)
    body = raw[BODY_OFFSET:HSUM_OFFSET]
    magic, payload_len, checksum, key_raw, ns_len, ns_raw = _BODY.unpack(body)
    if magic != SLOT_MAGIC:
        if not any(body):
            return SlotHeader(SlotState.FREE, generation)
        return SlotHeader(SlotState.TORN, generation)
    (hsum,) = _HSUM.unpack_from(raw, HSUM_OFFSET)
    if (
        hsum != xxhash.xxh3_64_intdigest(body, generation)
        or not 0 <= payload_len <= slot_payload
        or not 1 <= ns_len <= 64
    ):
        return SlotHeader(SlotState.TORN, generation)
    try:
        namespace = ns_raw[:ns_len].decode("ascii")
    except UnicodeDecodeError:
        return SlotHeader(SlotState.TORN, generation)
    return SlotHeader(SlotState.USED, generation, key_raw.hex(), namespace, payload_len, checksum)


def used_slot(raw: bytes, slot_payload: int) -> tuple[int, bytes, bytes] | None:
    """Fast path of :func:`decode_slot_header` for scans: ``(generation, key_raw, ns_field)`` of
    a USED header, ``None`` for any other state. Same checks, no objects built."""
    generation, magic = _GEN_MAGIC.unpack_from(raw, 0)
    if generation & 1 or magic != SLOT_MAGIC:
        return None
    if _HSUM.unpack_from(raw, HSUM_OFFSET)[0] != xxhash.xxh3_64_intdigest(
        raw[BODY_OFFSET:HSUM_OFFSET], generation
    ):
        return None
    ns_len = raw[NS_FIELD_OFFSET]
    if _U64.unpack_from(raw, 16)[0] > slot_payload or not 1 <= ns_len <= 64:
        return None
    return generation, raw[KEY_OFFSET : KEY_OFFSET + 32], raw[NS_FIELD_OFFSET:NS_FIELD_END]
