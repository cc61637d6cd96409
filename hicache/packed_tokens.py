"""Token runs packed as ``keys.tokens_to_bytes`` lays them out: uint32, little-endian.

The radix tree (``hicache.radix``) stores node tokens this way: a ``bytes`` object holds no
Python objects, so the garbage collector never walks it, and two runs compare with one
``memcmp``. Only token ids in the uint32 range can be packed, as content hashes already require.

- ``pack(tokens)``               a list or ``array`` packed, or None when an id is not a uint32
- ``unpack(packed)``             back to a new list
- ``pack_matchable(tokens, ps)`` packed up to the first page holding an id that is not a uint32
- ``common_pages(a, b, ...)``    whole pages two packed runs share
- ``chain_hashes_packed(...)``   ``keys.chain_hashes`` of tokens that are already packed
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence
from typing import Any

__all__ = [
    "TOKEN_BYTES",
    "chain_hashes_packed",
    "common_pages",
    "pack",
    "pack_matchable",
    "unpack",
]

#: Bytes per packed token.
TOKEN_BYTES = 4
_ARRAY_CODE = "I" if array("I").itemsize == TOKEN_BYTES else "L"
_BIG_ENDIAN = sys.byteorder == "big"


def pack(tokens: Sequence[int], start: int = 0, stop: int | None = None) -> bytes | None:
    """``keys.tokens_to_bytes(tokens[start:stop])`` for a list or an ``array``, or None when an
    id is not a uint32. An array's range is read in place (no slice copy); ``start >= 0``."""
    if stop is None:
        stop = len(tokens)
    if type(tokens) is array:
        return _pack_array(tokens, start, stop)
    if type(tokens) is not list or start or stop != len(tokens):
        tokens = list(tokens[start:stop])
    arr = array(_ARRAY_CODE)
    try:
        arr.fromlist(tokens)  # measurably faster than array(code, tokens)
    except (OverflowError, TypeError):
        return None
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tobytes()


_np: Any = None


def _numpy() -> Any:
    """numpy, imported on first use: the cache side has it, and only array requests need it
    (an import statement per call cost a microsecond)."""
    global _np
    if _np is None:
        import numpy

        _np = numpy
    return _np


def _pack_array(tokens: array[int], start: int, stop: int) -> bytes | None:
    """``pack`` of an array's range, without a Python int per token where the layout allows."""
    stop = min(stop, len(tokens))  # as a slice would
    if stop <= start:
        return b""
    size = tokens.itemsize
    if _BIG_ENDIAN:
        return pack(tokens[start:stop].tolist())
    if size == 8 and tokens.typecode in "qQlL":
        np = _numpy()
        wide = np.frombuffer(tokens, dtype="<u8", count=stop - start, offset=start * size)
        # read as unsigned, a negative id is above 2**63: one maximum checks the whole range
        # (measured 3x cheaper than testing the high words, and than comparing after narrowing)
        if np.maximum.reduce(wide) > 0xFFFFFFFF:
            return None
        packed: bytes = wide.astype("<u4").tobytes()
        return packed
    if size == TOKEN_BYTES and tokens.typecode in "IL":
        return memoryview(tokens)[start:stop].tobytes()
    return pack(tokens[start:stop].tolist())


def unpack(packed: bytes) -> list[int]:
    """The tokens of a packed run, as a new list."""
    arr = array(_ARRAY_CODE, packed)
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tolist()


def pack_matchable(
    tokens: Sequence[int], page_size: int, start: int = 0, stop: int | None = None
) -> bytes:
    """``tokens[start:stop]`` packed, cut before the first page holding an id that is not a
    uint32 (a packed run never holds one, so nothing from that page on can equal one)."""
    packed = pack(tokens, start, stop)
    if packed is not None:
        return packed
    tokens = tokens[start:stop]
    good = 0
    while good < len(tokens) and pack(tokens[good : good + 1]) is not None:
        good += 1
    return pack(tokens[: good - good % page_size]) or b""


def common_pages(run: bytes, packed: bytes, offset: int, step: int) -> int:
    """Whole pages (of ``step`` bytes) ``run`` shares with ``packed[offset:]``, counting the first
    page as shared (callers found it equal already)."""
    n = min(len(run), len(packed) - offset)
    off = step
    while off + step <= n and packed.startswith(run[off : off + step], offset + off):
        off += step
    return off // step


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
