"""Where a page lives on the server: key names, the chunked layout and its Lua scripts.

A page of namespace ``ns`` and key ``k`` is stored under::

    <key_prefix>:<ns>:{<k>}          the page: header + payload in one value, or the header alone
    <key_prefix>:<ns>:{<k>}:<i>      chunk i of the payload, when header + payload is larger than
                                     max_value_bytes (i = 0, 1, ...)

- The namespace is a key prefix, so ``SCAN MATCH <key_prefix>:<ns>:*`` lists one namespace.
- The page key in braces is the cluster hash tag: a page's chunks hash to the same slot as its
  header (one shard, one atomic script), while different pages spread over the shards.
- A chunked page is written by one Lua script, chunks first and the header key last; a reader
  finds nothing until the whole script ran (scripts are atomic), so no half page is visible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from hicache.storage import HEADER_SIZE, PAGE_KEY_LEN

__all__ = [
    "DELETE_SCRIPT",
    "GET_CHUNKED_SCRIPT",
    "PUT_CHUNKED_SCRIPT",
    "KeySpace",
    "chunk_layout",
    "chunk_regions",
]

# KEYS = header key, chunk keys; ARGV = header, chunks..., ttl in ms (0 = none).
# A page counts as stored only when all its keys exist (LRU may have taken a chunk); otherwise
# every key is rewritten, header last.
PUT_CHUNKED_SCRIPT = b"""
local n = #KEYS
if redis.call('EXISTS', unpack(KEYS)) == n then return 0 end
local ttl = tonumber(ARGV[n + 1])
for i = n, 1, -1 do
  if ttl > 0 then
    redis.call('SET', KEYS[i], ARGV[i], 'PX', ttl)
  else
    redis.call('SET', KEYS[i], ARGV[i])
  end
end
return 1
"""

# KEYS = header key. Returns nil, or {value} when the value holds the whole page (or is not a
# header), or {header, chunk 0, chunk 1, ...} covering the payload length the header states
# (bytes 16..23, little-endian), or {header} when a chunk is missing (evicted, expired): one
# atomic read, whatever chunk size the writer used.
GET_CHUNKED_SCRIPT = (
    b"""
local h = redis.call('GET', KEYS[1])
if not h then return false end
if #h ~= %d then return {h} end
local want = 0
for b = 24, 17, -1 do want = want * 256 + string.byte(h, b) end
local out = {h}
local got = 0
local i = 0
while got < want do
  local c = redis.call('GET', KEYS[1] .. ':' .. i)
  if not c then return {h} end
  out[#out + 1] = c
  got = got + #c
  i = i + 1
end
return out
"""
    % HEADER_SIZE
)

# KEYS = header key; ARGV = chunks this writer would use. Deletes the header and every chunk,
# whatever chunk size wrote them (it keeps going while chunk keys exist).
DELETE_SCRIPT = b"""
local i = 0
local min = tonumber(ARGV[1])
redis.call('DEL', KEYS[1])
while true do
  local gone = redis.call('DEL', KEYS[1] .. ':' .. i)
  if gone == 0 and i >= min then break end
  i = i + 1
end
return 1
"""


def chunk_layout(page_bytes: int, max_value_bytes: int) -> tuple[int, int]:
    """``(chunks, chunk_bytes)`` of a page: ``(0, 0)`` when header + payload fit one value."""
    if HEADER_SIZE + page_bytes <= max_value_bytes:
        return 0, 0
    chunks = math.ceil(page_bytes / max_value_bytes)
    return chunks, math.ceil(page_bytes / chunks)


def chunk_regions(regions: Sequence[memoryview], size: int) -> list[tuple[memoryview, ...]]:
    """A page's regions (flat byte views, in order) cut into chunks of ``size`` bytes (the last
    one may be shorter), each chunk the views of the regions it spans: nothing is copied."""
    chunks: list[tuple[memoryview, ...]] = []
    current: list[memoryview] = []
    room = size
    for region in regions:
        start = 0
        while start < region.nbytes:
            take = min(room, region.nbytes - start)
            current.append(region[start : start + take])
            start += take
            room -= take
            if not room:
                chunks.append(tuple(current))
                current, room = [], size
    if current:
        chunks.append(tuple(current))
    return chunks


class KeySpace:
    """Key names of one namespace."""

    def __init__(self, key_prefix: str, namespace: str) -> None:
        self.root = f"{key_prefix}:".encode()
        self.prefix = f"{key_prefix}:{namespace}:".encode()

    def page(self, key: str) -> bytes:
        return b"%s{%s}" % (self.prefix, key.encode())

    def chunks(self, page_key: bytes, count: int) -> list[bytes]:
        return [b"%s:%d" % (page_key, i) for i in range(count)]

    @property
    def pattern(self) -> bytes:
        """``SCAN MATCH`` pattern of every key of this namespace."""
        return self.prefix + b"*"

    def page_key_of(self, name: bytes) -> tuple[str, bool] | None:
        """``(page key, is the header key)`` of a key name of this namespace, else None."""
        if not name.startswith(self.prefix):
            return None
        rest = name[len(self.prefix) :]
        if len(rest) < PAGE_KEY_LEN + 2 or rest[:1] != b"{" or rest[PAGE_KEY_LEN + 1] != 0x7D:
            return None
        key = rest[1 : PAGE_KEY_LEN + 1]
        tail = rest[PAGE_KEY_LEN + 2 :]
        if key.strip(b"0123456789abcdef") or (tail and tail[:1] != b":"):
            return None
        return key.decode(), not tail

    def namespace_of(self, name: bytes) -> str | None:
        """The namespace part of a key name under the key prefix, else None."""
        if not name.startswith(self.root):
            return None
        namespace, sep, _ = name[len(self.root) :].partition(b":")
        return namespace.decode("ascii", "replace") if sep else None
