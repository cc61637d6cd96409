"""KV cache events, in the field order of SGLang/vLLM KV events (no torch).

Routers that already consume SGLang or vLLM events (llm-d, Dynamo) read these unchanged: the
fields come in the same order, and new fields only ever go at the end.

- ``BlockStored`` - pages became available on a medium (one per page or per contiguous run).
- ``BlockRemoved`` - pages left a medium.
- ``AllBlocksCleared`` - forget every block of this cache on every medium: sent only on an
  event overflow (llm-d wipes every tier of the pod on it), never for one tier's wipe.
- ``removed_in_batches(ids, medium)`` - ``BlockRemoved`` events of at most
  ``REMOVED_BATCH`` ids each (a wiped or shrunk tier never makes one unbounded message).
- ``StoredRun`` - the ``BlockStored`` events of a run of pages, not built yet: a cache queues
  one per node and medium, and the queue builds one ``BlockStored`` per page when it is taken.
- ``EventQueue`` - a thread-safe in-process queue; ``take()`` drains it; bounded, an overflow
  turns into ``AllBlocksCleared`` rather than a silent gap; ``wants(medium)`` says whether
  anything for that medium is kept (a cache builds nothing for a medium nobody consumes).

Block hashes are event block ids (``hicache.keys.block_id``): signed int64.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeAlias

from hicache.keys import block_ids
from hicache.packed_tokens import unpack

__all__ = [
    "REMOVED_BATCH",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EventQueue",
    "KVEvent",
    "Medium",
    "QueuedEvent",
    "StoredRun",
    "build_events",
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


@dataclass(frozen=True, slots=True)
class StoredRun:
    """One ``BlockStored`` per page of a run, chained after ``parent_block_hash``, not built yet.

    ``hashes`` are the pages' 32-byte content hashes and ``tokens`` their tokens packed as
    ``keys.tokens_to_bytes`` does; both are immutable snapshots (a later split of the node
    slices new lists), so building later gives what building now would.
    """

    hashes: Sequence[bytes]
    parent_block_hash: int | None
    tokens: bytes
    block_size: int
    lora_id: int | None
    medium: str

    def __len__(self) -> int:
        return len(self.hashes)

    def build(
        self, ids: Sequence[int] | None = None, token_ids: list[int] | None = None
    ) -> list[BlockStored]:
        """The events; ``ids`` (``keys.block_ids(hashes)``) and ``token_ids`` (the unpacked
        tokens) may come from another run over the same pages."""
        ids = block_ids(self.hashes) if ids is None else ids
        toks = unpack(self.tokens) if token_ids is None else token_ids
        ps, lora, medium = self.block_size, self.lora_id, self.medium
        parents = [self.parent_block_hash, *ids[:-1]]
        new = _new_block_stored
        return [
            new([bid], parent, toks[off : off + ps], ps, lora, medium)
            for bid, parent, off in zip(ids, parents, range(0, len(ids) * ps, ps), strict=True)
        ]


def _slot_setter(field: str) -> Any:
    return BlockStored.__dict__[field].__set__


_SET_HASHES = _slot_setter("block_hashes")
_SET_PARENT = _slot_setter("parent_block_hash")
_SET_TOKENS = _slot_setter("token_ids")
_SET_SIZE = _slot_setter("block_size")
_SET_LORA = _slot_setter("lora_id")
_SET_MEDIUM = _slot_setter("medium")


def _new_block_stored(
    block_hashes: list[int],
    parent_block_hash: int | None,
    token_ids: list[int],
    block_size: int,
    lora_id: int | None,
    medium: str,
) -> BlockStored:
    """``BlockStored(...)``, the same object, built through its slots: a frozen dataclass's
    ``__init__`` sets each field through ``object.__setattr__``, which made up half the cost
    of building a page's event (every page of every insert gets one per medium)."""
    event = object.__new__(BlockStored)
    _SET_HASHES(event, block_hashes)
    _SET_PARENT(event, parent_block_hash)
    _SET_TOKENS(event, token_ids)
    _SET_SIZE(event, block_size)
    _SET_LORA(event, lora_id)
    _SET_MEDIUM(event, medium)
    return event


#: What an event queue holds: events, and runs of ``BlockStored`` built when taken.
QueuedEvent: TypeAlias = KVEvent | StoredRun


def build_events(items: Iterable[QueuedEvent]) -> list[KVEvent]:
    """``items`` with every run built, in order, in one pass: runs over the same pages (one
    node announced on several media) decode their tokens and block ids once."""
    out: list[KVEvent] = []
    ids_of: dict[int, Sequence[int]] = {}
    tokens_of: dict[int, list[int]] = {}
    for item in items:
        if not isinstance(item, StoredRun):
            out.append(item)
            continue
        # keyed by object identity: every run stays referenced by ``items`` meanwhile
        ids = ids_of.get(id(item.hashes))
        if ids is None:
            ids = ids_of[id(item.hashes)] = block_ids(item.hashes)
        toks = tokens_of.get(id(item.tokens))
        if toks is None:
            toks = tokens_of[id(item.tokens)] = unpack(item.tokens)
        out += item.build(ids, toks)
    return out


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

    __slots__ = (
        "_count",
        "_events",
        "_lock",
        "_logged",
        "_marked",
        "dropped",
        "max_events",
        "overflows",
    )

    def __init__(self, max_events: int | None = None) -> None:
        if max_events is not None and max_events < 2:
            raise ValueError(f"max_events must be >= 2 (a marker and one event), got {max_events}")
        self._lock = threading.Lock()
        self._events: list[QueuedEvent] = []
        #: Events queued (a run counts one per page).
        self._count = 0
        self._logged = False
        #: The backlog starts with the marker of an overflow since the last take().
        self._marked = False
        #: The bound (``None``: unbounded).
        self.max_events = max_events
        #: Events discarded by overflows, and how many overflows there were.
        self.dropped = 0
        self.overflows = 0

    def wants(self, medium: str) -> bool:
        """Whether events of ``medium`` are kept (a cache builds none that are not)."""
        return True

    def put(self, event: QueuedEvent) -> None:
        """Append one event (or one run of them)."""
        self.extend((event,))

    def extend(self, events: Iterable[QueuedEvent]) -> None:
        """Append several events (or runs), keeping their order and adjacency."""
        batch = list(events)
        count = sum(len(e) if isinstance(e, StoredRun) else 1 for e in batch)
        with self._lock:
            self._events.extend(batch)
            self._count += count
            limit = self.max_events
            if limit is not None and self._count > limit:
                self._overflow(limit)

    def _overflow(self, limit: int) -> None:
        # Keep the newest events after the marker: a suffix of the stream replayed after a
        # clear never makes a consumer believe in a block that is gone.
        events = build_events(self._events)
        body = events[1:] if self._marked else events
        keep = body[len(body) - (limit - 1) :]
        self.dropped += len(body) - len(keep)
        self.overflows += 1
        self._events = [AllBlocksCleared(), *keep]
        self._count = len(self._events)
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
            items, self._events = self._events, []
            self._count = 0
            self._marked = False
        return build_events(items)

    def __len__(self) -> int:
        with self._lock:
            return self._count
