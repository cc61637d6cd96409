"""KV cache events, in the field order of SGLang/vLLM KV events (no torch).

Routers that already consume SGLang or vLLM events (llm-d, Dynamo) read these unchanged: the
fields come in the same order, and new fields only ever go at the end.

- ``BlockStored`` - pages became available on a medium (one per page or per contiguous run).
- ``BlockRemoved`` - pages left a medium.
- ``AllBlocksCleared`` - forget every block of this cache on every medium: sent only on an
  event overflow (llm-d wipes every tier of the pod on it), never for one tier's wipe.
- ``removed_in_batches(ids, medium)`` - ``BlockRemoved`` events of at most
  ``REMOVED_BATCH`` ids each (a wiped or shrunk tier never makes one unbounded message).
- ``EventQueue`` - a thread-safe in-process queue; ``take()`` drains it; bounded, an overflow
  turns into ``AllBlocksCleared`` rather than a silent gap.

Block hashes are event block ids (``hicache.keys.block_id``): signed int64.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeAlias

__all__ = [
    "REMOVED_BATCH",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EventQueue",
    "KVEvent",
    "Medium",
    "removed_in_batches",
]

#: Most block ids in one ``BlockRemoved`` (about 9 KiB of msgpack).
REMOVED_BATCH = 1024

log = logging.getLogger(__name__)


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


def removed_in_batches(
    block_ids: Sequence[int], medium: str, max_ids: int = REMOVED_BATCH
) -> list[BlockRemoved]:
    """``BlockRemoved(medium)`` events covering ``block_ids`` in order, ``max_ids`` at most each."""
    if max_ids < 1:
        raise ValueError(f"max_ids must be >= 1, got {max_ids}")
    return [
        BlockRemoved(list(block_ids[i : i + max_ids]), medium)
        for i in range(0, len(block_ids), max_ids)
    ]


class EventQueue:
    """A thread-safe FIFO of events; ``take()`` returns and removes everything queued.

    ``max_events`` bounds the backlog of a consumer that stopped draining. Dropping single
    events would be worse than useless: a lost ``BlockRemoved`` leaves a router believing a
    block is still here, and it routes requests to a cache that no longer holds it. So on
    overflow the queue discards its whole backlog and starts again with ``AllBlocksCleared``:
    the consumer forgets this cache's blocks and relearns them from the events that follow,
    which can only under-state what is cached (a missed hit), never over-state it. Every
    discarded event is counted (``dropped``), and the first overflow is logged as a warning.
    """

    __slots__ = ("_events", "_lock", "_logged", "_marked", "dropped", "max_events", "overflows")

    def __init__(self, max_events: int | None = None) -> None:
        if max_events is not None and max_events < 2:
            raise ValueError(f"max_events must be >= 2 (a marker and one event), got {max_events}")
        self._lock = threading.Lock()
        self._events: list[KVEvent] = []
        self._logged = False
        #: The backlog starts with the marker of an overflow since the last take().
        self._marked = False
        #: The bound (``None``: unbounded).
        self.max_events = max_events
        #: Events discarded by overflows, and how many overflows there were.
        self.dropped = 0
        self.overflows = 0

    def put(self, event: KVEvent) -> None:
        """Append one event."""
        self.extend((event,))

    def extend(self, events: Iterable[KVEvent]) -> None:
        """Append several events, keeping their order and adjacency."""
        batch = list(events)
        with self._lock:
            self._events.extend(batch)
            limit = self.max_events
            if limit is not None and len(self._events) > limit:
                self._overflow(limit)

    def _overflow(self, limit: int) -> None:
        # Keep the newest events after the marker: a suffix of the stream replayed after a
        # clear never makes a consumer believe in a block that is gone.
        body = self._events[1:] if self._marked else self._events
        keep = body[len(body) - (limit - 1) :]
        self.dropped += len(body) - len(keep)
        self.overflows += 1
        self._events = [AllBlocksCleared(), *keep]
        self._marked = True
        if not self._logged:
            self._logged = True
            log.warning(
                "KV event queue overflowed (max_events=%d): %d events discarded and replaced "
                "by AllBlocksCleared; drain take_events() more often or raise events.max_queue",
                limit,
                self.dropped,
            )

    def take(self) -> list[KVEvent]:
        """Return every queued event in order and empty the queue."""
        with self._lock:
            events, self._events = self._events, []
            self._marked = False
        return events

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)
