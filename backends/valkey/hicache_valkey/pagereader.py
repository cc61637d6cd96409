"""Reading a page reply off a connection: one or more bulk values seen as one byte stream.

A page comes back as one value (header + payload, from ``GET``) or as several (header, then
chunks, from the read script). ``read_page_parts`` lays the stream over its targets in order,
the 4 KiB header buffer and then each region of the caller's page (one buffer, or the K and V
regions of a scatter-gather page), reading every piece straight into place: value boundaries
and region boundaries need not line up. Bytes beyond the page are drained and reported, never
written anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hicache_valkey.resp import Connection, ProtocolError

if TYPE_CHECKING:
    import xxhash

__all__ = ["HASH_PIECE", "read_page_parts"]

#: Payload bytes received before they are hashed: hashing reads them while they are still in
#: cache (one pass over memory), and the piece stays above glibc's ``rep movsb`` ceiling for the
#: copy of already-buffered bytes (see ``hicache.storage.buffers.COPY_CHUNK``).
HASH_PIECE = 1 << 20


def read_page_parts(
    conn: Connection,
    parts: int,
    first: int,
    header: memoryview,
    regions: Sequence[memoryview],
    digest: xxhash.xxh3_64 | None = None,
) -> tuple[int, bool]:
    """Read ``parts`` bulk values (the first of ``first`` bytes, its length line already read)
    into ``header`` then ``regions`` (flat byte views, in order); return (bytes placed, whether
    more bytes came than fit). ``digest`` is fed the regions' bytes (not the header's) in
    pieces as they land."""
    targets = [t for t in (header, *regions) if t.nbytes]
    target = 0  # index of the target being filled
    offset = 0  # bytes already placed in it
    total = 0
    overflow = False
    length = first
    for index in range(parts):
        if index:
            line = conn.read_head()
            if line[:1] != b"$" or int(line[1:]) < 0:
                raise ProtocolError(f"unexpected part of a page reply: {line[:20]!r}")
            length = int(line[1:])
        left = length
        while left:
            if target == len(targets):
                conn.skip(left)
                overflow = True
                break
            view = targets[target]
            take = min(left, view.nbytes - offset)
            if digest is not None and view is not header:
                take = min(take, HASH_PIECE)
                piece = view[offset : offset + take]
                conn.read_into(piece)
                digest.update(piece)
            else:
                conn.read_into(view[offset : offset + take])
            total += take
            left -= take
            offset += take
            if offset == view.nbytes:
                target, offset = target + 1, 0
        conn.read_crlf()
    return total, overflow
