"""Page contents and buffers the conformance kit uses (plain bytes; no torch, no pytest).

- ``kit_key(i, salt)``              the i-th page key (64 lowercase hex chars)
- ``page_pattern(key, n, variant)`` a page whose every byte depends on its key and variant
- ``canary_buffer(n, offset)``      a page-sized view inside a larger canary-filled bytearray
- ``canaries_intact(raw, ...)``     whether the bytes around that view are still canaries
"""

from __future__ import annotations

import hashlib

__all__ = ["CANARY", "CANARY_WIDTH", "canaries_intact", "canary_buffer", "kit_key", "page_pattern"]

#: Byte value filling canary regions around destination buffers and untouched destinations.
CANARY = 0xA5
#: Canary bytes after (and by default before) each destination view.
CANARY_WIDTH = 64


def kit_key(index: int, salt: str = "") -> str:
    """The ``index``-th page key of the kit (64 lowercase hex chars, deterministic per salt)."""
    return hashlib.sha256(f"hicache-kit:{salt}:{index}".encode()).hexdigest()


def page_pattern(key: str, page_bytes: int, variant: int = 0) -> bytes:
    """Content of the page stored under ``key``: a repeated digest of ``key`` and ``variant``.

    The first 32 bytes identify (key, variant); the rest repeats them, so a torn page (two
    writers' bytes mixed) or a page of another key never matches.
    """
    digest = hashlib.sha256(f"{key}/{variant}".encode()).digest()
    reps = page_bytes // len(digest) + 1
    return (digest * reps)[:page_bytes]


def canary_buffer(page_bytes: int, offset: int = CANARY_WIDTH) -> tuple[bytearray, memoryview]:
    """A canary-filled bytearray with room around a page, and the page-sized view inside it."""
    raw = bytearray([CANARY]) * (offset + page_bytes + CANARY_WIDTH)
    return raw, memoryview(raw)[offset : offset + page_bytes]


def canaries_intact(raw: bytearray, offset: int, page_bytes: int) -> bool:
    """True when every byte of ``raw`` outside ``[offset, offset + page_bytes)`` is a canary."""
    before = raw[:offset]
    after = raw[offset + page_bytes :]
    return before.count(CANARY) == len(before) and after.count(CANARY) == len(after)
