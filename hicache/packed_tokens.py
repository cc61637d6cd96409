"""Token runs packed as ``keys.tokens_to_bytes`` lays them out: uint32, little-endian.

The radix tree (``hicache.radix``) stores node tokens this way: a ``bytes`` object holds no
Python objects, so the garbage collector never walks it, and two runs compare with one
``memcmp``. Only token ids in the uint32 range can be packed, as content hashes already require.

- ``pack_request(tokens)``       a request in any accepted form packed up to its first id that is
                                 not a uint32, and its length: what the tree's match and insert walk
- ``token_list(tokens)``         a request in any accepted form as a list of ints
- ``unpack(packed)``             back to a new list
- ``common_pages(a, b, ...)``    whole pages two packed runs share (galloping, then bisecting)
- ``chain_hashes_packed(...)``   ``keys.chain_hashes`` of tokens that are already packed

A request's accepted forms (every one gives the same answers):

- ``list[int]``                  a tokenizer's output (vLLM hands lists): packed once, with
                                 ``array.fromlist``, about 8 ns a token for fresh int objects
- ``array`` of an integer type    SGLang's scheduler holds ``array('q')``
- a 1-D integer numpy array       or anything numpy reads as one (a CPU torch tensor, a
                                 ``memoryview`` of an integer format)
- ``bytes``/``bytearray``         already packed in this layout (``keys.tokens_to_bytes``); a
                                 length that is not a multiple of 4 is a ``ValueError``

An array or numpy request is narrowed to uint32 by numpy, in C, with no Python int per token
(33k tokens of an ``array('q')``: 9 us in the CPU cache, about 25 us not, reading the
request from memory; 2026-12-07 15:00 UTC, load 6); a non-integer dtype is a
``TypeError``.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "TOKEN_BYTES",
    "Packed",
    "Tokens",
    "chain_hashes_packed",
    "common_pages",
    "pack_request",
    "token_list",
    "unpack",
]

#: A packed run as the tree reads it: ``bytes``, or a view of a packed buffer.
Packed: TypeAlias = "bytes | memoryview"

#: A request's tokens in any accepted form (see above).
Tokens: TypeAlias = "Sequence[int] | bytes | bytearray | memoryview | npt.NDArray[np.integer[Any]]"

#: Bytes per packed token.
TOKEN_BYTES = 4
_ARRAY_CODE = "I" if array("I").itemsize == TOKEN_BYTES else "L"
_BIG_ENDIAN = sys.byteorder == "big"


_np: Any = None


def _numpy() -> Any:
    """numpy, imported on first use: the cache side has it, and only array requests need it
    (an import statement per call cost a microsecond)."""
    global _np
    if _np is None:
        import numpy

        _np = numpy
    return _np


#: Integer ``array`` type codes (the forms taken as they are, without a list of ints).
INT_TYPECODES = frozenset("bBhHiIlLqQ")
_U32_MAX = 0xFFFFFFFF


def pack_request(tokens: Tokens) -> tuple[Packed, int]:
    """``(packed, count)``: a request's tokens in any accepted form (see above) packed up to,
    not including, its first id that is not a uint32, and how many tokens it has.

    ``packed`` may be a view of the caller's buffer (an ``array('I')``, a uint32 numpy array):
    read it before the caller changes it, copy what is kept. ``TypeError`` for ids that are
    not integers, ``ValueError`` for a shape or byte length that holds no token ids.
    """
    if isinstance(tokens, list):
        return _pack_list(tokens), len(tokens)
    if isinstance(tokens, (bytes, bytearray)):
        n = len(tokens)
        if n % TOKEN_BYTES:
            raise ValueError(f"packed tokens are uint32, {TOKEN_BYTES} bytes each: got {n} bytes")
        return bytes(tokens), n // TOKEN_BYTES  # bytes(a bytes object) is that object
    if isinstance(tokens, array):
        code = tokens.typecode
        if code not in INT_TYPECODES:
            raise TypeError(f"token ids must be integers, got an array of type {code!r}")
        if not _BIG_ENDIAN:
            if tokens.itemsize == TOKEN_BYTES and code in "IL":
                return memoryview(tokens).cast("B"), len(tokens)
            if tokens.itemsize == 8:
                return _pack_wide(tokens)
        return _pack_numpy(_numpy().frombuffer(tokens, dtype=code))
    if isinstance(tokens, memoryview) or hasattr(tokens, "__array__"):
        return _pack_numpy(_numpy().asarray(tokens))
    as_list = list(tokens)
    return _pack_list(as_list), len(as_list)


def _pack_list(tokens: list[int]) -> Packed:
    arr = array(_ARRAY_CODE)
    try:
        arr.fromlist(tokens)
    except (OverflowError, TypeError):
        arr = array(_ARRAY_CODE)
        arr.fromlist(tokens[: _first_bad(tokens)])
    if _BIG_ENDIAN:
        arr.byteswap()
    return memoryview(arr).cast("B")


def _first_bad(tokens: list[int]) -> int:
    """Index of the first id that is not a uint32 (rare: a slow path); ``TypeError`` for a
    token that is not an integer at all."""
    for j, tok in enumerate(tokens):
        try:
            value = tok.__index__()
        except AttributeError:
            raise TypeError(
                f"token ids must be integers, got {type(tok).__name__} {tok!r} at {j}"
            ) from None
        if not 0 <= value <= _U32_MAX:
            return j
    return len(tokens)


def _pack_wide(tokens: array[int]) -> tuple[Packed, int]:
    """``pack_request`` of a little-endian 8-byte integer ``array`` (SGLang's ``array('q')``):
    what :func:`_pack_numpy` does, without its dtype dispatch (2 us a call, a fifth of a
    4k-token pack)."""
    np = _numpy()
    wide = np.frombuffer(tokens, dtype="<u8")
    # read as unsigned, a negative id is above every valid one (see _pack_numpy)
    if len(wide) and np.maximum.reduce(wide) > _U32_MAX:
        return _pack_numpy(np.frombuffer(tokens, dtype=tokens.typecode))  # finds the cut
    return memoryview(wide.astype("<u4")).cast("B"), len(wide)


def _pack_numpy(arr: Any) -> tuple[Packed, int]:
    """``pack_request`` of a numpy array: narrowed to uint32 in C, one range check, no copy
    beyond the narrowing (none for a little-endian uint32 array)."""
    np = _numpy()
    if arr.ndim != 1:
        raise ValueError(f"token ids must be one-dimensional, got shape {arr.shape}")
    dtype = arr.dtype
    if dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got dtype {dtype}")
    n = len(arr)
    size = dtype.itemsize
    if not dtype.isnative:
        arr = arr.astype(dtype.newbyteorder("="))
    if dtype.kind == "i" or size > TOKEN_BYTES:
        # read as unsigned, a negative id is above every valid one: one maximum checks the
        # whole run (measured 3x cheaper than testing the high words, and than comparing after
        # narrowing); it also brings the run into the cache for the narrowing
        wide = arr.view(f"u{size}")
        limit = _U32_MAX if size > TOKEN_BYTES else (1 << (8 * size - 1)) - 1
        if n and np.maximum.reduce(wide) > limit:
            arr = arr[: int(np.argmax(wide > limit))]
    out = arr.astype("<u4", copy=False)
    if not out.flags.c_contiguous:
        out = np.ascontiguousarray(out)
    return memoryview(out.view(np.uint8)), n


def token_list(tokens: Tokens) -> list[int]:
    """A request in any accepted form (see above) as a list of Python ints: the list itself when
    it is one. Ids are not checked (callers that need uint32 ids pack the request)."""
    if isinstance(tokens, list):
        return tokens
    if isinstance(tokens, (bytes, bytearray)):
        return unpack(pack_request(tokens)[0])  # checks the byte length
    if isinstance(tokens, (array, memoryview)) or hasattr(tokens, "tolist"):
        out: list[int] = tokens.tolist()
        return out
    return list(tokens)


def unpack(packed: Packed) -> list[int]:
    """The tokens of a packed run, as a new list."""
    arr = array(_ARRAY_CODE)
    arr.frombytes(packed)
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tolist()


def common_pages(run: bytes, packed: Packed, offset: int, step: int) -> int:
    """Whole pages (of ``step`` bytes) ``run`` shares with ``packed[offset:]``, counting the first
    page as shared (callers found it equal already).

    Spans of 1, 2, 4, ... pages are compared (one ``memcmp`` each) until one differs, then that
    span is bisected: about 2 log2(pages) compares, never a Python step per page.
    """
    view = memoryview(packed)
    pages = min(len(run), len(view) - offset) // step
    lo = 1  # pages known equal
    span = 1
    while lo < pages:
        hi = min(lo + span, pages)
        if run.startswith(view[offset + lo * step : offset + hi * step], lo * step):
            lo = hi
            span *= 2
            continue
        while hi - lo > 1:  # pages lo..hi-1 hold the first difference
            mid = (lo + hi) // 2
            if run.startswith(view[offset + lo * step : offset + mid * step], lo * step):
                lo = mid
            else:
                hi = mid
        break
    return lo


def chain_hashes_packed(parent: bytes, packed: bytes, page_size: int) -> list[bytes]:
    """``keys.chain_hashes(parent, tokens, page_size)`` where ``packed`` is
    ``keys.tokens_to_bytes(tokens)``: the same hashes, without decoding and re-encoding.

    ``parent`` must be a 32-byte hash and ``packed`` whole pages (the caller's invariants).
    """
    step = page_size * TOKEN_BYTES
    sha256 = hashlib.sha256
    out: list[bytes] = []
    prev = parent
    # as keys.chain_hashes: one concatenation and one-shot sha256 per page
    for start in range(0, len(packed), step):
        prev = sha256(prev + packed[start : start + step]).digest()
        out.append(prev)
    return out
