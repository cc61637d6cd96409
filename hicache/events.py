"""KV cache events, in the field order of SGLang/vLLM KV events (no torch).

Routers that already consume SGLang or vLLM events (llm-d, Dynamo) read these unchanged: the
fields come in the same order, and new fields only ever go at the end.

- ``BlockStored`` - pages became available on a medium (one per page or per contiguous run).
- ``BlockRemoved`` - pages left a medium.
- ``AllBlocksCleared`` - a medium (or the whole cache) was reset.
- ``EventQueue`` - a thread-safe in-process queue; ``take()`` drains it.

Block hashes are event block ids (``hicache.keys.block_id``): signed int64.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeAlias

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EventQueue",
    "KVEvent",
    "Medium",
]


class Medium(StrEnum):
    """Where a block lives, named as SGLang names it; an L3 tier may use another string."""

    GPU = "GPU"
    CPU_PINNED = "CPU_PINNED"
    DISK = "DISK"
    EXTERNAL = "EXTERNAL"


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Blocks ``block_hashes`` (chained after ``parent_block_hash``) are stored on ``medium``.

    ``parent_block_hash`` is ``None`` for the first page of a sequence. ``token_ids`` holds the
    tokens of every listed block, ``block_size`` tokens each.
    """

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (``type`` first), ready for JSON or msgpack."""
        return {
            "type": "BlockStored",
            "block_hashes": list(self.block_hashes),
            "parent_block_hash": self.parent_block_hash,
            "token_ids": list(self.token_ids),
            "block_size": self.block_size,
            "lora_id": self.lora_id,
            "medium": str(self.medium),
        }


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks ``block_hashes`` are no longer on ``medium``."""

    block_hashes: list[int]
    medium: str

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (``type`` first), ready for JSON or msgpack."""
        return {
            "type": "BlockRemoved",
            "block_hashes": list(self.block_hashes),
            "medium": str(self.medium),
        }


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """Every block was dropped (the cache was reset)."""

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (``type`` only), ready for JSON or msgpack."""
        return {"type": "AllBlocksCleared"}


KVEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared


class EventQueue:
    """A thread-safe FIFO of events; ``take()`` returns and removes everything queued.

    Unbounded on purpose: the cache calls ``take()`` once per scheduler step, and dropping an
    event would desynchronise a router's view of the cache.
    """

    __slots__ = ("_events", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[KVEvent] = []

    def put(self, event: KVEvent) -> None:
        """Append one event."""
        with self._lock:
            self._events.append(event)

    def extend(self, events: Iterable[KVEvent]) -> None:
        """Append several events, keeping their order and adjacency."""
        batch = list(events)
        with self._lock:
            self._events.extend(batch)

    def take(self) -> list[KVEvent]:
        """Return every queued event in order and empty the queue."""
        with self._lock:
            events, self._events = self._events, []
        return events

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)
