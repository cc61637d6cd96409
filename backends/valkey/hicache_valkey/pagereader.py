"""Reading a page reply off a connection: one or more bulk values seen as one byte stream.

A page comes back as one value (header + payload, from ``GET``) or as several (header, then
chunks, from the read script). ``read_page_parts`` lays the stream over two targets, the 4 KiB
header buffer and then the caller's page buffer, reading each part straight into place; bytes
beyond the page are drained and reported, never written anywhere.
"""

from __future__ import annotations

from hicache_valkey.resp import Connection, ProtocolError

__all__ = ["read_page_parts"]


def read_page_parts(
    conn: Connection, parts: int, first: int, header: memoryview, dst: memoryview
) -> tuple[int, bool]:
    """Read ``parts`` bulk values (the first of ``first`` bytes, its length line already read)
    into ``header`` then ``dst``; return (bytes placed, whether more bytes came than fit)."""
    targets = (header, dst)
    expected = header.nbytes + dst.nbytes
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
            if total >= expected:
                conn.skip(left)
                overflow = True
                break
            in_header = total < header.nbytes
            target = targets[0] if in_header else targets[1]
            offset = total if in_header else total - header.nbytes
            take = min(left, target.nbytes - offset)
            conn.read_into(target[offset : offset + take])
            total += take
            left -= take
        conn.read_crlf()
    return total, overflow
