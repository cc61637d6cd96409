"""The versioned header every stored page carries, and its verification.

A stored page is ``HEADER_SIZE`` bytes of header followed by the payload (the page's KV bytes).
The header is padded to 4 KiB so the payload that follows it stays aligned for ``O_DIRECT``.
Backends write header and payload side by side (``os.pwritev``, two S3 parts, two slices of a
mapping) and read the payload straight into the caller's buffer: nothing here copies a payload.

- ``encode_header(namespace, key, payload)``   a fresh ``HEADER_SIZE``-byte header
- ``encode_header_into(buf, ...)``              the same, written into a caller buffer
- ``encode_headers_into(buf, namespace, keys, payload_len, checksums)``  the headers of a batch
                                                back to back in one buffer, checked once
- ``decode_header(header)``                     parse and check a header -> :class:`PageHeader`
- ``verify_page(header, payload, ...)``         decode, then check namespace, key, length, checksum
- ``verify_pages(headers, payloads, ...)``      the same for each page of a batch: the error of
                                                each page, ``None`` for those that pass
- ``payload_checksum(payload)``                 xxh3_64 of a payload, read in place
- ``payload_checksums(payloads)``               the same for each page of a batch (a put's)
- ``payload_hasher()``                          the same, fed piece by piece as bytes land

Layout of version 1 (integers little-endian)::

    offset  size  field
         0     8  magic            b"\\x89HICPG\\r\\n"
         8     2  version          1
        10     2  flags            0 (a set bit names a feature this reader does not know)
        12     1  namespace length 1..64
        13     1  key length       64
        14     2  reserved         0
        16     8  payload length
        24     8  payload checksum xxh3_64 of the payload (seed 0)
        32    64  namespace        ASCII, zero padded
        96    64  key              ASCII lowercase hex
       160  3928  zero padding
      4088     8  header checksum  xxh3_64 of bytes 0..4088

Magic and version sit at the same offsets in every version, so a reader refuses a page of a
version it does not know by its version number instead of misreading it. The header checksum
covers everything else, padding included: any single corrupted header byte is detected.

What a reader may do with a page it cannot use is decided here, once, for every backend:

- :class:`~hicache.errors.PageCorruptError`: proven damage to a page of this version (a checksum
  that does not match, a length that disagrees, a bad magic). The backend may delete it.
- :class:`~hicache.errors.PageVersionError`: a page of a newer format version, or one of this
  version with feature flags this reader does not know, written on purpose by a newer writer
  (rolling upgrades share tiers between versions). A miss, counted apart (``unknown_version``)
  and left in place. A version field that a flipped bit turned into another number is told
  apart by the header checksum: with the version put back, it matches.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

import xxhash

from hicache.errors import PageCorruptError, PageVersionError
from hicache.storage.backend import check_key, check_keys, check_namespace

__all__ = [
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "Buffer",
    "PageHeader",
    "Payload",
    "check_checksum",
    "check_version",
    "decode_header",
    "encode_header",
    "encode_header_into",
    "encode_headers_into",
    "payload_checksum",
    "payload_checksums",
    "payload_hasher",
    "payload_nbytes",
    "stored_size",
    "verify_page",
    "verify_pages",
    "verify_payload",
]

Buffer = bytes | bytearray | memoryview
#: A payload as one buffer or as a page's regions in order (checksummed as their concatenation).
Payload = Buffer | Sequence[Buffer]

#: Size of the header in bytes; the payload starts at this offset (4 KiB keeps it O_DIRECT-aligned).
HEADER_SIZE: Final[int] = 4096
#: The format version this module writes and the only one it reads; a page of a higher version is
#: a newer writer's (:class:`~hicache.errors.PageVersionError`), never corruption.
FORMAT_VERSION: Final[int] = 1
#: First 8 bytes of every stored page. The high bit and CR LF catch 7-bit and newline-mangling
#: transfers, the way PNG's signature does.
MAGIC: Final[bytes] = b"\x89HICPG\r\n"

_PREFIX = struct.Struct("<8sHHBBHQQ")  # magic .. payload checksum: 32 bytes
_NAME_FIELD = 64
_NS_OFFSET = _PREFIX.size
_KEY_OFFSET = _NS_OFFSET + _NAME_FIELD
_END_OF_FIELDS = _KEY_OFFSET + _NAME_FIELD
_CHECKSUM_OFFSET = HEADER_SIZE - 8
_PAYLOAD_CHECKSUM_OFFSET = _PREFIX.size - 8
_U64 = struct.Struct("<Q")
_VERSION = struct.Struct("<H")
_HEX_DIGITS = b"0123456789abcdef"


@dataclass(frozen=True, slots=True)
class PageHeader:
    """The decoded fields of a page header."""

    version: int
    namespace: str
    key: str
    payload_len: int
    checksum: int


#: Bytes 0..4088 of a header as the fields a batch encodes: magic .. payload length (fixed per
#: namespace and length), payload checksum, namespace field, key field, zero padding; _WHOLE
#: adds the header checksum (what verify_page compares).
_FIELDS = struct.Struct(
    f"<{_PAYLOAD_CHECKSUM_OFFSET}sQ{_NAME_FIELD}s{_NAME_FIELD}s{_CHECKSUM_OFFSET - _END_OF_FIELDS}x"
)
_WHOLE = struct.Struct(_FIELDS.format + "Q")


@lru_cache(maxsize=64)
def _fields(namespace: str, payload_len: int) -> tuple[bytes, bytes]:
    """The fixed parts of every header of ``namespace`` pages of ``payload_len`` bytes: bytes
    ``0..24`` (magic .. payload length) and the namespace field. Encoding and verifying a page
    then cost one pack or unpack of the whole header instead of a field-by-field build or
    parse. Raises ``ValueError`` for a bad namespace or a negative length."""
    check_namespace(namespace)
    if payload_len < 0:
        raise ValueError(f"payload_len must be >= 0, got {payload_len}")
    ns = namespace.encode("ascii")
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(ns), _NAME_FIELD, 0, payload_len, 0)
    return prefix[:_PAYLOAD_CHECKSUM_OFFSET], ns.ljust(_NAME_FIELD, b"\0")


def _as_bytes_view(buf: Buffer) -> memoryview:
    """A flat unsigned-byte view of ``buf`` (no copy); refuses non-contiguous buffers."""
    if isinstance(buf, memoryview) and buf.format == "B" and buf.ndim == 1:
        return buf  # already one: a new view would cost as much as the rest of a small call
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


#: Payloads at least this large are hashed with the streaming form, which releases the GIL;
#: ``xxh3_64_intdigest`` keeps it for the whole call (python-xxhash 3/4), so an 8 MiB page held
#: every other thread for ~0.3 ms. Below it the one-shot form's lower call cost wins.
GIL_FREE_HASH_BYTES: Final[int] = 64 << 10


def payload_checksum(payload: Payload) -> int:
    """Return the xxh3_64 checksum of ``payload``, hashed in place (no copy); regions hash as
    the bytes they hold back to back (xxh3's streaming form equals its one-shot form). Large
    payloads are hashed with the GIL released."""
    if isinstance(payload, bytes | bytearray | memoryview):
        if _nbytes(payload) < GIL_FREE_HASH_BYTES:
            return xxhash.xxh3_64_intdigest(payload)
        payload = (payload,)
    elif len(payload) == 1 and _nbytes(payload[0]) < GIL_FREE_HASH_BYTES:
        return xxhash.xxh3_64_intdigest(payload[0])  # a page of one region, the common form
    hasher = xxhash.xxh3_64()
    for region in payload:
        hasher.update(region)
    return int(hasher.intdigest())


def payload_checksums(payloads: Sequence[Payload]) -> list[int]:
    """:func:`payload_checksum` of each payload of a batch (a put's), each hashed with the GIL
    released, however small: a batch of small pages is otherwise one long stretch of Python, and
    a thread waiting for the GIL (a read a request waits for) waits for all of it. Measured on
    the replay (8 KiB pages, 2 cores): tier reads 10-50% faster than with the one-shot form, the
    same CPU."""
    out: list[int] = []
    for payload in payloads:
        hasher = xxhash.xxh3_64()
        if isinstance(payload, bytes | bytearray | memoryview):
            hasher.update(payload)
        else:
            for region in payload:
                hasher.update(region)
        out.append(hasher.intdigest())
    return out


def _nbytes(buf: Buffer) -> int:
    # a memoryview's nbytes counts bytes whatever its item format; bytes' len does too
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def payload_hasher() -> xxhash.xxh3_64:
    """A fresh streaming hasher of payload bytes: ``update`` it with the payload's pieces in
    order (each call releases the GIL); its ``intdigest()`` is then their
    :func:`payload_checksum`."""
    return xxhash.xxh3_64()


def payload_nbytes(payload: Payload) -> int:
    """Length of ``payload`` in bytes (of all its regions)."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return _nbytes(payload)
    if len(payload) == 1:
        return _nbytes(payload[0])
    return sum(_nbytes(region) for region in payload)


def stored_size(payload_len: int) -> int:
    """Bytes a page of ``payload_len`` payload bytes occupies in storage (header included)."""
    return HEADER_SIZE + payload_len


def encode_header_into(
    buf: bytearray | memoryview, namespace: str, key: str, payload_len: int, checksum: int
) -> None:
    """Write a version-1 header into the first ``HEADER_SIZE`` bytes of ``buf``.

    ``buf`` may be longer (e.g. a whole slot of a mapping); only its header bytes are written.
    Raises ``ValueError`` for a bad namespace or key, a negative length or an out-of-range
    checksum, and when ``buf`` is shorter than ``HEADER_SIZE`` or read-only.
    """
    prefix, ns_field = _fields(namespace, payload_len)
    check_key(key)
    view = _header_view(buf, 1, (checksum,))
    _FIELDS.pack_into(view, 0, prefix, checksum, ns_field, key.encode("ascii"))
    _U64.pack_into(view, _CHECKSUM_OFFSET, xxhash.xxh3_64_intdigest(view[:_CHECKSUM_OFFSET]))


def encode_headers_into(
    buf: bytearray | memoryview,
    namespace: str,
    keys: Sequence[str],
    payload_len: int,
    checksums: Sequence[int],
) -> None:
    """Write the headers of ``keys`` (pages of ``payload_len`` bytes under ``namespace``, with
    payload checksums ``checksums``) back to back into ``buf``, ``HEADER_SIZE`` bytes each.

    Each is the header :func:`encode_header_into` writes; the arguments are checked once for
    the batch, so a pack of small pages costs a few slice operations per header. Raises
    ``ValueError`` as :func:`encode_header_into` does, and when ``buf`` is shorter than
    ``len(keys) * HEADER_SIZE``.
    """
    if len(keys) != len(checksums):
        raise ValueError(f"{len(keys)} keys but {len(checksums)} checksums")
    prefix, ns_field = _fields(namespace, payload_len)
    check_keys(keys)
    view = _header_view(buf, len(keys), checksums)
    pack_fields = _FIELDS.pack_into
    pack_u64 = _U64.pack_into
    digest = xxhash.xxh3_64_intdigest
    offsets = range(0, len(keys) * HEADER_SIZE, HEADER_SIZE)
    for off, key, checksum in zip(offsets, keys, checksums, strict=True):
        # one pack writes bytes 0..4088, padding included (struct zeroes what it skips)
        pack_fields(view, off, prefix, checksum, ns_field, key.encode("ascii"))
        end = off + _CHECKSUM_OFFSET
        pack_u64(view, end, digest(view[off:end]))


def _header_view(buf: bytearray | memoryview, n: int, checksums: Sequence[int]) -> memoryview:
    """``buf`` as bytes to write ``n`` headers into, once the checksums are known valid."""
    if checksums and not (min(checksums) >= 0 and max(checksums) < 1 << 64):
        bad = next(c for c in checksums if not 0 <= c < 1 << 64)
        raise ValueError(f"checksum must be an unsigned 64-bit integer, got {bad}")
    view = _as_bytes_view(buf)
    if view.readonly:
        raise ValueError("header buffer is read-only")
    need = n * HEADER_SIZE
    if view.nbytes < need:
        raise ValueError(f"header buffer has {view.nbytes} bytes, expected >= {need}")
    return view


def encode_header(
    namespace: str, key: str, payload: Payload, *, checksum: int | None = None
) -> bytes:
    """Return the ``HEADER_SIZE``-byte header of ``payload`` stored under ``namespace``/``key``.

    ``checksum`` skips hashing the payload when the caller already knows it.
    """
    payload_len = payload_nbytes(payload)
    if checksum is None:
        checksum = payload_checksum(payload)
    out = bytearray(HEADER_SIZE)
    encode_header_into(out, namespace, key, payload_len, checksum)
    return bytes(out)


def _decode_name(raw: memoryview, length: int, field: str) -> str:
    # Reached only with a valid header checksum, i.e. a header some writer built on purpose: a
    # buggy or foreign writer, not bit rot. Still refuse anything the encoder would not write.
    if not 1 <= length <= _NAME_FIELD or any(raw[length:]):
        raise PageCorruptError(field, f"bad {field} length {length} or padding")
    try:
        name = bytes(raw[:length]).decode("ascii")
        (check_namespace if field == "namespace" else check_key)(name)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        raise PageCorruptError(field, f"undecodable {field}: {exc}") from None
    return name


def decode_header(header: Buffer) -> PageHeader:
    """Parse and check the header at the start of ``header`` (which may hold more bytes).

    Checks run in a fixed order so the reported field is the first thing that is wrong:
    ``length`` (fewer than ``HEADER_SIZE`` bytes), ``magic``, ``version`` (a version below this
    one, or a damaged version field), ``header_checksum``, then ``namespace``/``key`` for
    undecodable names. Raises :class:`~hicache.errors.PageCorruptError` naming that field, or
    :class:`~hicache.errors.PageVersionError` for a newer writer's page (a higher version, or
    feature flags this reader does not know): refused, never misread, never corruption.
    """
    view = _as_bytes_view(header)
    check_version(view)  # first: a newer writer's header may be of another size
    if view.nbytes < HEADER_SIZE:
        raise PageCorruptError("length", f"header has {view.nbytes} bytes, expected {HEADER_SIZE}")
    if view[: len(MAGIC)] != MAGIC:
        raise PageCorruptError("magic", f"got {bytes(view[: len(MAGIC)])!r}, expected {MAGIC!r}")
    (version,) = _VERSION.unpack_from(view, len(MAGIC))
    if version != FORMAT_VERSION:
        raise PageCorruptError(
            "version", f"page format version {version}, this reader knows {FORMAT_VERSION}"
        )
    (stored,) = _U64.unpack_from(view, _CHECKSUM_OFFSET)
    actual = xxhash.xxh3_64_intdigest(view[:_CHECKSUM_OFFSET])
    if stored != actual:
        raise PageCorruptError("header_checksum", f"stored {stored:#018x}, computed {actual:#018x}")
    _, _, flags, ns_len, key_len, reserved, payload_len, checksum = _PREFIX.unpack_from(view, 0)
    if flags or reserved:
        # The header checksum matched: a writer set these on purpose, i.e. a newer one.
        raise PageVersionError(
            version,
            f"version {version} page with unknown flags {flags:#x} / reserved {reserved:#x}",
        )
    namespace = _decode_name(view[_NS_OFFSET:_KEY_OFFSET], ns_len, "namespace")
    key = _decode_name(view[_KEY_OFFSET:_END_OF_FIELDS], key_len, "key")
    return PageHeader(FORMAT_VERSION, namespace, key, payload_len, checksum)


def check_version(header: Buffer) -> None:
    """Raise :class:`~hicache.errors.PageVersionError` when ``header`` (a stored page's first
    bytes, however many were read) begins a newer writer's page; return otherwise.

    :func:`decode_header` calls it first; a reader that refuses a page by its size before it
    decodes the header calls it before calling that page corrupt (a newer version may have
    another size).
    """
    view = _as_bytes_view(header)
    if view.nbytes < len(MAGIC) + _VERSION.size or view[: len(MAGIC)] != MAGIC:
        return
    (version,) = _VERSION.unpack_from(view, len(MAGIC))
    if version <= FORMAT_VERSION:
        return
    if view.nbytes >= HEADER_SIZE:
        # One of our pages whose version field was damaged is not a newer writer's: its header
        # checksum matches once the version is put back.
        ours = bytearray(view[:_CHECKSUM_OFFSET])
        _VERSION.pack_into(ours, len(MAGIC), FORMAT_VERSION)
        if _U64.unpack_from(view, _CHECKSUM_OFFSET)[0] == xxhash.xxh3_64_intdigest(ours):
            return
    raise PageVersionError(
        version, f"page format version {version}, this reader knows {FORMAT_VERSION}"
    )


def verify_payload(header: PageHeader, payload: Payload, *, check_payload: bool = True) -> None:
    """Check ``payload`` against a decoded header: its length, then (optionally) its checksum."""
    nbytes = payload_nbytes(payload)
    if nbytes != header.payload_len:
        raise PageCorruptError(
            "length", f"payload has {nbytes} bytes, header says {header.payload_len}"
        )
    if check_payload:
        check_checksum(header, payload_checksum(payload))


def check_checksum(header: PageHeader, computed: int) -> None:
    """Raise ``PageCorruptError("checksum")`` unless ``computed`` is the header's payload
    checksum (for readers that hash the payload while copying it)."""
    if computed != header.checksum:
        raise PageCorruptError(
            "checksum", f"stored {header.checksum:#018x}, computed {computed:#018x}"
        )


def verify_page(
    header: Buffer, payload: Payload, *, namespace: str, key: str, check_payload: bool = True
) -> PageHeader:
    """Decode ``header`` and check it describes ``payload`` stored under ``namespace``/``key``.

    Raises :class:`~hicache.errors.PageCorruptError` with ``field`` in ``magic``, ``version``,
    ``header_checksum``, ``namespace``, ``key``, ``length``, ``checksum``, or
    :class:`~hicache.errors.PageVersionError` for a newer writer's page. With
    ``check_payload=False`` the payload bytes are not hashed (only its length is checked).
    """
    nbytes = payload_nbytes(payload)
    checksum = _checksum_if_exact(header, namespace, key, nbytes)
    if checksum is not None:
        decoded = PageHeader(FORMAT_VERSION, namespace, key, nbytes, checksum)
        if check_payload:
            check_checksum(decoded, payload_checksum(payload))
        return decoded
    # not the header this page would have: decode it to name what is wrong
    decoded = decode_header(header)
    if decoded.namespace != namespace:
        raise PageCorruptError("namespace", f"stored {decoded.namespace!r}, expected {namespace!r}")
    if decoded.key != key:
        raise PageCorruptError("key", f"stored {decoded.key!r}, expected {key!r}")
    verify_payload(decoded, payload, check_payload=check_payload)
    return decoded


def verify_pages(
    headers: Sequence[Buffer],
    payloads: Sequence[Payload],
    *,
    namespace: str,
    keys: Sequence[str],
    check_payload: bool = True,
) -> list[PageCorruptError | PageVersionError | None]:
    """:func:`verify_page` of each page of a batch, without its decoded headers: ``None`` for
    a page that passes, else the error :func:`verify_page` raises for it. A page whose header
    is exactly the expected one costs one unpack and its two hashes; any other goes through
    :func:`verify_page`, which names the field."""
    out: list[PageCorruptError | PageVersionError | None] = []
    for header, payload, key in zip(headers, payloads, keys, strict=True):
        checksum = _checksum_if_exact(header, namespace, key, payload_nbytes(payload))
        if checksum is not None and (not check_payload or payload_checksum(payload) == checksum):
            out.append(None)
            continue
        try:
            verify_page(header, payload, namespace=namespace, key=key, check_payload=check_payload)
        except (PageCorruptError, PageVersionError) as exc:
            out.append(exc)
        else:
            out.append(None)
    return out


def _checksum_if_exact(header: Buffer, namespace: str, key: str, payload_len: int) -> int | None:
    """The payload checksum in ``header`` when its fields are those the encoder writes for a
    page of ``payload_len`` bytes stored under ``namespace``/``key`` and its header checksum
    matches, else ``None``. Such a header passes every check of :func:`decode_header` and the
    name and length checks of :func:`verify_page`, so one unpack stands for them; any other
    header goes through them, to learn which field is wrong."""
    view = _as_bytes_view(header)
    if view.nbytes < HEADER_SIZE:
        return None
    try:
        prefix, ns_field = _fields(namespace, payload_len)
        name = key.encode("ascii")
    except ValueError:  # UnicodeEncodeError is a ValueError
        return None
    if len(name) != _NAME_FIELD or name.translate(None, _HEX_DIGITS):
        return None  # a key the encoder refuses: decode_header names it
    got_prefix, checksum, got_ns, got_key, stored = _WHOLE.unpack_from(view)
    if got_prefix != prefix or got_ns != ns_field or got_key != name:
        return None
    if stored != xxhash.xxh3_64_intdigest(view[:_CHECKSUM_OFFSET]):
        return None
    return int(checksum)
