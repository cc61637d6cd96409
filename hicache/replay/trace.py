"""Trace loading and deterministic token expansion for replays.

A trace request is a chain of block ids (the Mooncake format: each id stands for a 512-token
block, and equal ids are equal, prefix-chained content). The replay expands each id into
``block_tokens`` token ids with a fixed integer mix of the id and the position, so equal ids give
equal tokens in every process, and different ids give different first tokens with overwhelming
probability.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from hicache.errors import ConfigError

__all__ = [
    "TraceRequest",
    "default_trace_path",
    "expand_block",
    "expand_blocks_packed",
    "load_trace",
]

_DEFAULT_TRACE = "mooncake_conversation_trace.jsonl"
#: Token ids stay below a typical vocabulary size, like real prompts.
_VOCAB = 1 << 17
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace: arrival time and its prompt as block ids."""

    timestamp_ms: int
    input_length: int
    output_length: int
    block_ids: tuple[int, ...]


def default_trace_path() -> Path:
    """The Mooncake conversation trace shipped as package data (Apache-2.0, see its licence)."""
    return Path(str(resources.files("hicache") / "data" / _DEFAULT_TRACE))


def load_trace(path: str | Path | None = None, limit: int | None = None) -> list[TraceRequest]:
    """Read a JSONL trace; ``limit`` keeps the first N requests. Errors name file and line."""
    trace_path = Path(path) if path is not None else default_trace_path()
    try:
        handle = trace_path.open("r", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read trace {trace_path}: {exc.strerror}") from exc
    requests: list[TraceRequest] = []
    with handle:
        for lineno, line in enumerate(handle, 1):
            if limit is not None and len(requests) >= limit:
                break
            if not line.strip():
                continue
            requests.append(_parse_line(trace_path, lineno, line))
    return requests


def _parse_line(path: Path, lineno: int, line: str) -> TraceRequest:
    try:
        row = json.loads(line)
        ids = row["hash_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ValueError("hash_ids must be a list of non-negative integers")
        return TraceRequest(
            timestamp_ms=int(row.get("timestamp", 0)),
            input_length=int(row.get("input_length", 0)),
            output_length=int(row.get("output_length", 0)),
            block_ids=tuple(ids),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}:{lineno}: bad trace line: {exc}") from exc


def _mix(x: int) -> int:
    # splitmix64 finaliser: cheap, well-distributed, identical on every platform.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def expand_block(block_id: int, block_tokens: int) -> list[int]:
    """The ``block_tokens`` token ids a block id stands for (deterministic everywhere)."""
    base = _mix(block_id)
    return [_mix(base + i) % _VOCAB for i in range(block_tokens)]


@functools.cache
def _offsets(block_tokens: int) -> np.ndarray:
    return np.arange(block_tokens, dtype=np.uint64)


def _mix_array(x: np.ndarray) -> np.ndarray:
    # _mix on uint64 arrays: numpy's uint64 arithmetic wraps modulo 2**64, as the masks do
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    out: np.ndarray = x ^ (x >> np.uint64(31))
    return out


def expand_blocks_packed(block_ids: list[int], block_tokens: int) -> list[bytes]:
    """:func:`expand_block` of each id, packed as ``keys.tokens_to_bytes`` packs tokens
    (uint32, little-endian), all ids in one numpy pass: a replay meets ~180k distinct blocks,
    and expanding them one int at a time was a few percent of its main thread. (The offsets
    are cached: ``np.arange`` lets go of the GIL, and beside busy storage workers getting it
    back cost the serving thread ~1 ms a call.)"""
    try:
        ids = np.array(block_ids, dtype=np.uint64)
    except OverflowError:  # ids beyond 64 bits: the Python path takes any int
        return [np.array(expand_block(b, block_tokens), "<u4").tobytes() for b in block_ids]
    base = _mix_array(ids)
    tokens = _mix_array(base[:, None] + _offsets(block_tokens)[None, :])
    rows = (tokens & np.uint64(_VOCAB - 1)).astype("<u4")  # % _VOCAB: a power of two
    return [row.tobytes() for row in rows]


def iter_tokens(block_ids: tuple[int, ...], block_tokens: int) -> Iterator[int]:
    """All token ids of a chain of blocks, in order."""
    for block_id in block_ids:
        yield from expand_block(block_id, block_tokens)
