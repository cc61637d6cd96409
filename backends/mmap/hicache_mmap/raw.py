"""Raw access to a slot file, bypassing the protocol: for tests that damage what was stored.

These helpers write into the mapping without locks or generation changes, exactly like a stray
write or a disk error would; never use them on a live cache.
"""

from __future__ import annotations

import struct

import xxhash

from hicache.storage import Backend
from hicache_mmap.backend import MmapBackend
from hicache_mmap.layout import (
    BODY_OFFSET,
    HSUM_OFFSET,
    SLOT_HEADER_SIZE,
    SlotState,
    decode_slot_header,
)
from hicache_mmap.slotfile import SlotFile

_U64 = struct.Struct("<Q")


def slot_file(backend: Backend) -> SlotFile:
    """The open slot file behind ``backend`` (an open :class:`MmapBackend`)."""
    assert isinstance(backend, MmapBackend)
    file = backend._file
    assert file is not None, "backend is not open"
    return file


def find_slot(backend: Backend, key: str) -> int:
    """The slot holding ``key`` in the backend's namespace, found by reading headers."""
    file = slot_file(backend)
    geo = file.geo
    s = int(key[:16], 16) % geo.num_sets
    for slot in range(s * geo.associativity, (s + 1) * geo.associativity):
        hdr = decode_slot_header(file.header(slot), geo.slot_payload)
        if (
            hdr.state is SlotState.USED
            and hdr.key == key
            and hdr.namespace == backend.context.namespace
        ):
            return slot
    raise KeyError(key)


def flip_byte(backend: Backend, offset: int) -> None:
    """Invert the byte at ``offset`` of the mapping."""
    file = slot_file(backend)
    file.mm[offset] ^= 0xFF


def flip_payload_byte(backend: Backend, key: str, index: int = 1234) -> None:
    """Invert payload byte ``index`` of ``key``'s slot."""
    file = slot_file(backend)
    off = file.slot_offset(find_slot(backend, key)) + SLOT_HEADER_SIZE
    flip_byte(backend, off + index % backend.context.page_bytes)


def flip_header_byte(backend: Backend, key: str, index: int = 20) -> None:
    """Flip header byte ``index`` (8..143: the checksummed body; 0..7: the generation)."""
    file = slot_file(backend)
    flip_byte(backend, file.slot_offset(find_slot(backend, key)) + index)


def rewrite_header(backend: Backend, key: str, *, payload_len: int) -> None:
    """Rewrite ``key``'s header with a consistent checksum but another payload length."""
    file = slot_file(backend)
    off = file.slot_offset(find_slot(backend, key))
    (gen,) = _U64.unpack_from(file.mm, off)
    body = bytearray(file.mm[off + BODY_OFFSET : off + HSUM_OFFSET])
    _U64.pack_into(body, 8, payload_len)  # body offset 8 = header offset 16
    file.mm[off + BODY_OFFSET : off + HSUM_OFFSET] = bytes(body)
    _U64.pack_into(file.mm, off + HSUM_OFFSET, xxhash.xxh3_64_intdigest(bytes(body), gen))


def leave_generation_odd(backend: Backend, key: str) -> None:
    """What a writer killed between its first and last generation store leaves behind."""
    file = slot_file(backend)
    off = file.slot_offset(find_slot(backend, key))
    (gen,) = _U64.unpack_from(file.mm, off)
    _U64.pack_into(file.mm, off, gen + 1)
