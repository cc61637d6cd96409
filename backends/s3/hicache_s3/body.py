"""Moving page bytes through boto3 without whole-object copies.

- :class:`PageBody` is the upload body: the page header followed by the caller's payload, as one
  seekable, sized file-like object whose reads are zero-copy ``memoryview`` slices. botocore
  needs a seekable body to hash it for signing, to compute an optional checksum and to rewind it
  for a retry; urllib3 sends each slice with ``sendall``.
- :func:`read_exact` streams a response body into a caller buffer chunk by chunk.
"""

from __future__ import annotations

import io
from typing import Any

__all__ = ["PageBody", "read_exact"]


class PageBody:
    """``header + payload`` as a read-only, seekable stream, without concatenating them.

    ``read(n)`` returns a ``memoryview`` of at most ``n`` bytes that never spans the two parts
    (a short read, which every consumer of file-like bodies handles); only ``read()`` of
    everything copies. The object keeps a reference to ``payload`` until it is dropped, so it
    must not outlive the call that received the payload.
    """

    def __init__(self, header: bytes, payload: memoryview) -> None:
        self._parts = (memoryview(header), payload.cast("B") if payload.format != "B" else payload)
        self._split = len(header)
        self._size = self._split + self._parts[1].nbytes
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
            # a read never spans the two parts, so two reads drain whatever is left
            first = bytes(self.read(self._size))
            return first + bytes(self.read(self._size))
        if self._pos >= self._size or size == 0:
            return b""
        if self._pos < self._split:
            part, start, end = self._parts[0], self._pos, self._split
        else:
            part, start, end = self._parts[1], self._pos - self._split, self._size - self._split
        stop = min(end, start + size)
        self._pos += stop - start
        return part[start:stop]

    def close(self) -> None:
        """Nothing to release; present because some consumers close file-like bodies."""


def read_exact(body: Any, dst: memoryview, chunk_bytes: int) -> int:
    """Read from a botocore ``StreamingBody`` into ``dst`` until it is full or the body ends.

    Uses ``readinto`` on slices of ``dst`` where the body has it, else ``read(chunk)`` into
    slices; never a whole-object ``bytes``. Returns the bytes read.
    """
    view = dst.cast("B") if dst.format != "B" else dst
    total = view.nbytes
    pos = 0
    readinto = getattr(body, "readinto", None)
    while pos < total:
        end = min(total, pos + chunk_bytes)
        if readinto is not None:
            n = readinto(view[pos:end])
        else:  # bodies without readinto: one chunk-sized bytes at a time, never the whole object
            chunk = body.read(end - pos)
            n = len(chunk)
            view[pos : pos + n] = chunk
        if not n:
            break
        pos += n
    return pos
