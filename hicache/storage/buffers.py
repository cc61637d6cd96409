"""Moving page bytes between buffers without holding the GIL.

- ``buffer_address(buf, writable=False)``  address of a contiguous buffer's first byte
- ``copy_bytes(dst, src)``                 ``memcpy`` between two equal-sized buffers
- ``copy_and_hash(dst, src, hash_dst=...)`` the same in pieces, xxh3-hashing each piece as it lands
- ``iter_pieces(parts, chunk)``            a page's regions as ``(offset, view)`` pieces

Either side of a copy may be one buffer or a page's regions in order (a scatter-gather page,
``hicache.storage.backend.PageParts``): the bytes are copied region by region, never staged.

A slice assignment (``dst[:] = src``) holds the GIL for the whole copy: an 8 MiB page keeps
every other thread of the serving process (the scheduler among them) waiting for ~0.3 ms, and
several I/O threads copying at once take turns instead of using the cores. ``ctypes.memmove``
releases the GIL, and so does ``xxhash``'s update, so a verified copy runs in parallel across
threads (measured on 2 cores, 8 MiB pages from a shared mapping, 4 threads: 12.5 GB/s with
slice assignment, 24 GB/s with these). Nothing here imports torch.

The caller keeps both buffers alive (and, for a mapping, a memoryview slice of it, which makes
``mmap.close()`` fail with ``BufferError`` instead of unmapping under a copy) for the duration
of the call: the copies work on raw addresses.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence

import xxhash

__all__ = ["COPY_CHUNK", "Regions", "buffer_address", "copy_and_hash", "copy_bytes", "iter_pieces"]

#: One buffer, or a page's regions in order.
Regions = memoryview | Sequence[memoryview]

#: Piece of a hashed copy: hashing reads what the copy just wrote while it is still in cache,
#: and each piece costs two GIL hand-offs, which several threads copying at once contend for
#: (measured on 2 cores, 2 MiB pages, 4 threads: 128 KiB pieces 31 GB/s, 512 KiB 36 GB/s).
#: It must also stay at or above glibc's ``rep movsb`` ceiling (the L2 size per core on AMD):
#: below it ``memmove`` uses ``rep movsb``, which on a 2-vCPU EPYC guest copied from the mmap
#: tier's slot file at a quarter of the speed (8 MiB pages, verified get/memcpy: 256 KiB pieces
#: 0.27, 512 KiB 0.76, 1 MiB 0.97, medians of 31 paired rounds).
COPY_CHUNK = 1 << 20

_PYBUF_SIMPLE = 0
_PYBUF_WRITABLE = 1


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


# ctypes.pythonapi keeps the GIL (it is a PyDLL), as the buffer protocol requires.
_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def buffer_address(buf: memoryview, writable: bool = False) -> int:
    """Address of the first byte of a contiguous buffer.

    Raises ``BufferError`` (from the buffer protocol) for a non-contiguous buffer, or for a
    read-only one when ``writable``.
    """
    if not buf.readonly and buf.c_contiguous and buf.nbytes:
        # ctypes maps a writable buffer directly: 4x cheaper than the generic path below, which
        # is paid on every page copied.
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))
    view = _PyBuffer()
    # PyBUF_SIMPLE asks for a contiguous buffer: strided views are refused, never misread.
    _get_buffer(buf, ctypes.byref(view), _PYBUF_WRITABLE if writable else _PYBUF_SIMPLE)
    try:
        return view.buf or 0
    finally:
        _release_buffer(ctypes.byref(view))


def _flat(buf: memoryview) -> memoryview:
    return buf if buf.format == "B" and buf.ndim == 1 else buf.cast("B")


def _regions(bufs: Regions) -> Sequence[memoryview]:
    return (bufs,) if isinstance(bufs, memoryview) else bufs


def iter_pieces(parts: Regions, chunk: int) -> Iterator[tuple[int, memoryview]]:
    """Yield ``(offset in the page, byte view)`` pieces of at most ``chunk`` bytes, region by
    region; a piece never spans two regions (each is one ``iovec``, one ``memmove``)."""
    offset = 0
    for region in _regions(parts):
        view = _flat(region)
        for start in range(0, view.nbytes, chunk):
            piece = view[start : start + chunk]
            yield offset + start, piece
        offset += view.nbytes


def _segments(bufs: Regions, *, writable: bool) -> list[tuple[int, memoryview]]:
    return [(buffer_address(b, writable=writable), _flat(b)) for b in _regions(bufs) if b.nbytes]


def _single(bufs: Regions) -> memoryview | None:
    """The one region of ``bufs``, or None for a page of several."""
    return bufs if isinstance(bufs, memoryview) else bufs[0] if len(bufs) == 1 else None


def copy_bytes(dst: Regions, src: Regions) -> None:
    """Copy ``src`` into ``dst`` (same total size, contiguous regions) with the GIL released."""
    d = _single(dst)
    s = _single(src)
    if d is not None and s is not None:
        _copy_one(d, s, None, hash_dst=False)
        return
    _copy(dst, src, None, hash_dst=False)


def copy_and_hash(dst: Regions, src: Regions, *, hash_dst: bool) -> int:
    """Copy ``src`` into ``dst`` piece by piece and return the xxh3_64 (seed 0) of the bytes
    copied, taken from ``dst`` (``hash_dst``: what a reader received) or from ``src`` (what a
    writer meant to store). Equal to ``pageformat.payload_checksum`` of that side."""
    hasher = xxhash.xxh3_64()
    d = _single(dst)
    s = _single(src)
    if d is not None and s is not None:
        _copy_one(d, s, hasher, hash_dst=hash_dst)
    else:
        _copy(dst, src, hasher, hash_dst=hash_dst)
    return int(hasher.intdigest())


def _copy_one(
    d: memoryview, s: memoryview, hasher: xxhash.xxh3_64 | None, *, hash_dst: bool
) -> None:
    """:func:`_copy` for one region each side (a page of a mapping into one host buffer, every
    mmap get), without its region walk, whose bookkeeping cost more than a 64 KiB copy (a fifth
    of the CPU of an unverified 2 MiB mmap get; ~1.7 us of a verified 4 KiB one): one memmove,
    or with a hasher the same pieces as _copy."""
    n = d.nbytes
    if s.nbytes != n:
        raise ValueError(f"copy of {s.nbytes} bytes into a buffer of {n} bytes")
    if not n:
        return
    daddr = buffer_address(d, writable=True)
    saddr = buffer_address(s)
    memmove = ctypes.memmove
    if hasher is None:
        memmove(daddr, saddr, n)
        return
    hashed = _flat(d if hash_dst else s)
    update = hasher.update
    for off in range(0, n, COPY_CHUNK):
        memmove(daddr + off, saddr + off, min(COPY_CHUNK, n - off))
        update(hashed[off : off + COPY_CHUNK])


def _copy(dst: Regions, src: Regions, hasher: xxhash.xxh3_64 | None, *, hash_dst: bool) -> None:
    dsegs = _segments(dst, writable=True)
    ssegs = _segments(src, writable=False)
    total = sum(v.nbytes for _, v in dsegs)
    if sum(v.nbytes for _, v in ssegs) != total:
        raise ValueError(
            f"copy of {sum(v.nbytes for _, v in ssegs)} bytes into a buffer of {total} bytes"
        )
    memmove = ctypes.memmove
    di = si = doff = soff = 0
    # Walk both region lists at once; a hashed copy goes in COPY_CHUNK pieces (see COPY_CHUNK),
    # a plain one in the largest piece both current regions allow.
    limit = COPY_CHUNK if hasher is not None else total
    while di < len(dsegs):
        daddr, dview = dsegs[di]
        saddr, sview = ssegs[si]
        n = min(limit, dview.nbytes - doff, sview.nbytes - soff)
        memmove(daddr + doff, saddr + soff, n)
        if hasher is not None:
            hasher.update(dview[doff : doff + n] if hash_dst else sview[soff : soff + n])
        doff += n
        soff += n
        if doff == dview.nbytes:
            di, doff = di + 1, 0
        if soff == sview.nbytes:
            si, soff = si + 1, 0
