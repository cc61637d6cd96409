"""Moving page bytes through boto3 without whole-object copies.

- :class:`PageBody` is the upload body: the page header followed by the caller's payload, as one
  seekable, sized file-like object whose reads are zero-copy ``memoryview`` slices. botocore
  needs a seekable body to hash it for signing, to compute an optional checksum and to rewind it
  for a retry; urllib3 sends each slice with ``sendall``.
- :func:`read_exact` streams a response body into a caller buffer chunk by chunk.
"""

from __future__ import annotations

import bisect
import io
import itertools
from collections.abc import Sequence
from typing import Any

from hicache.storage import iter_pieces

__all__ = ["PageBody", "read_exact"]


class PageBody:
    """``header + payload`` as a read-only, seekable stream, without concatenating them.

    ``payload`` is one buffer or a page's regions in order. ``read(n)`` returns a ``memoryview``
    of at most ``n`` bytes that never spans two parts (a short read, which every consumer of
    file-like bodies handles); only ``read()`` of everything copies. The object keeps
    references to the payload until it is dropped, so it must not outlive the call that
    received the payload.
    """

    def __init__(self, header: bytes, payload: memoryview | Sequence[memoryview]) -> None:
        regions = (payload,) if isinstance(payload, memoryview) else tuple(payload)
        flat = (r.cast("B") if r.format != "B" or r.ndim != 1 else r for r in regions if r.nbytes)
        self._parts = (memoryview(header), *flat)
        # Start offset of every part, and the total size as the last entry.
        self._starts = list(itertools.accumulate((p.nbytes for p in self._parts), initial=0))
        self._size = self._starts[-1]
        self._pos = 0

    def __len__(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def read(self, size: int | None = -1) -> Any:
        """Up to ``size`` bytes (a memoryview); ``b""`` at the end; everything as bytes if -1."""
        if size is None or size < 0:
            rest = bytearray()
            while chunk := self.read(self._size):
                rest += chunk
            return bytes(rest)
        if self._pos >= self._size or size == 0:
            return b""
        index = bisect.bisect_right(self._starts, self._pos) - 1
        part, start = self._parts[index], self._pos - self._starts[index]
        stop = min(part.nbytes, start + size)
        self._pos += stop - start
        return part[start:stop]

    def close(self) -> None:
        """Nothing to release; present because some consumers close file-like bodies."""


def read_exact(body: Any, dst: memoryview | Sequence[memoryview], chunk_bytes: int) -> int:
    """Read from a botocore ``StreamingBody`` into ``dst`` (one buffer or a page's regions, in
    order) until it is full or the body ends.

    Uses ``readinto`` on slices of ``dst`` where the body has it, else ``read(chunk)`` into
    slices; never a whole-object ``bytes``. Returns the bytes read.
    """
    pos = 0
    readinto = getattr(body, "readinto", None)
    for _, view in iter_pieces(dst, chunk_bytes):
        got = 0
        while got < view.nbytes:
            if readinto is not None:
                n = readinto(view[got:])
            else:  # bodies without readinto: one chunk-sized bytes at a time, never the whole
                chunk = body.read(view.nbytes - got)
                n = len(chunk)
                view[got : got + n] = chunk
            if not n:
                return pos + got
            got += n
        pos += got
    return pos
