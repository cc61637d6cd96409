"""KV cache events, in the field order of SGLang/vLLM KV events (no torch).

Routers that already consume SGLang or vLLM events (llm-d, Dynamo) read these unchanged: the
fields come in the same order, and new fields only ever go at the end.

- ``BlockStored`` - pages became available on a medium: one event per contiguous run of pages
  (a tree node), as vLLM sends one per request; the tiers send one per page. A cache builds
  them with ``BlockStored.packed``: ``token_ids`` is decoded from the packed tokens when a
  consumer first reads it (a plain list then, as from the constructor).
- ``BlockRemoved`` - pages left a medium.
- ``AllBlocksCleared`` - forget every block of this cache on every medium: sent only on an
  event overflow (llm-d wipes every tier of the pod on it), never for one tier's wipe.
- ``per_block(events)`` - the same events with one block per ``BlockStored`` (SGLang's form).
- ``removed_in_batches(ids, medium)`` - ``BlockRemoved`` events of at most
  ``REMOVED_BATCH`` ids each (a wiped or shrunk tier never makes one unbounded message).
- ``StoredRun`` - the ``BlockStored`` event of a run of pages, not built yet: a cache queues
  one per node and medium, and the queue builds it when it is taken.
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
from typing import Any, NamedTuple, TypeAlias

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
    "per_block",
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


@dataclass(frozen=True)
class BlockStored:
    """Blocks ``block_hashes`` (chained after ``parent_block_hash``) are stored on ``medium``.

    ``parent_block_hash`` is ``None`` for the first page of a sequence. ``token_ids`` holds the
    tokens of every listed block, ``block_size`` tokens each.

    A cache builds its events with :meth:`packed`: ``token_ids`` stays packed until it is
    first read, then becomes the event's own list (decoded once). Reading the tokens of a
    1,000-token run makes 1,000 int objects; a consumer that reads only the block ids (a
    router that already knows the tokens, or one that drops the event) never pays for them.
    Every other way in (the constructor, ``==``, ``repr``, ``to_dict``, ``dataclasses``)
    sees a plain list. Two threads reading an event's ``token_ids`` for the first time at once
    may each decode it: both get equal lists, and the event keeps one of them.
    """

    # declared here rather than with slots=True: ``token_ids`` is the descriptor below (set
    # on the class after the decorator ran, so that the field takes no default), and the
    # decorator would put a slot of that name in its place
    __slots__ = (
        "_token_ids",
        "block_hashes",
        "block_size",
        "lora_id",
        "medium",
        "parent_block_hash",
    )

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str

    @classmethod
    def packed(
        cls,
        block_hashes: list[int],
        parent_block_hash: int | None,
        tokens: bytes,
        block_size: int,
        lora_id: int | None,
        medium: str,
    ) -> BlockStored:
        """The event with ``tokens`` packed as ``keys.tokens_to_bytes`` lays them out (whole
        blocks): ``token_ids`` decodes them when first read."""
        event = _new(cls)
        _set_hashes(event, block_hashes)
        _set_parent(event, parent_block_hash)
        _set_tokens(event, tokens)
        _set_size(event, block_size)
        _set_lora(event, lora_id)
        _set_medium(event, medium)
        return event

    def __reduce__(self) -> tuple[type[BlockStored], tuple[Any, ...]]:
        # frozen and slotted: copy and pickle rebuild through the constructor, from the fields
        # as they are (astuple would rebuild and deep-copy every list first)
        return (
            BlockStored,
            (
                self.block_hashes,
                self.parent_block_hash,
                self.token_ids,
                self.block_size,
                self.lora_id,
                self.medium,
            ),
        )

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


class _TokenIds:
    """``BlockStored.token_ids``: a list, decoded from the packed tokens on first read."""

    def __get__(self, event: BlockStored | None, owner: type | None = None) -> list[int]:
        if event is None:  # class access: the field has no default
            raise AttributeError("token_ids")
        tokens = _get_tokens(event)
        kind = type(tokens)
        # from packed() or build_events; what the constructor took comes back as it is
        if kind is bytes:
            tokens = unpack(tokens)
            _set_tokens(event, tokens)
        elif kind is _SharedTokens:
            tokens = tokens.copy()
            _set_tokens(event, tokens)
        return tokens  # type: ignore[no-any-return]

    def __set__(self, event: BlockStored, tokens: list[int]) -> None:
        _set_tokens(event, tokens)  # the frozen dataclass's __init__ sets fields this way


class _SharedTokens:
    """The packed tokens of several events over the same pages (one node announced on
    several media): decoded once, on the first read of any of them; each event then gets its
    own copy (a copy of references, several times cheaper than decoding again)."""

    __slots__ = ("_list", "packed")

    def __init__(self, packed: bytes) -> None:
        self.packed = packed
        self._list: list[int] | None = None

    def copy(self) -> list[int]:
        if self._list is None:
            self._list = unpack(self.packed)
        return self._list.copy()


setattr(BlockStored, "token_ids", _TokenIds())  # noqa: B010 - after the decorator (see above)
_new = object.__new__
# the slots' own descriptors: they set a field without the frozen __setattr__ in between
_get_tokens = BlockStored.__dict__["_token_ids"].__get__
_set_tokens = BlockStored.__dict__["_token_ids"].__set__
_set_hashes = BlockStored.__dict__["block_hashes"].__set__
_set_parent = BlockStored.__dict__["parent_block_hash"].__set__
_set_size = BlockStored.__dict__["block_size"].__set__
_set_lora = BlockStored.__dict__["lora_id"].__set__
_set_medium = BlockStored.__dict__["medium"].__set__


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


class StoredRun(NamedTuple):
    """The ``BlockStored`` event of a run of pages, chained after ``parent_block_hash``, not
    built yet.

    ``hashes`` are the pages' 32-byte content hashes and ``tokens`` their tokens, packed as
    ``keys.tokens_to_bytes`` does; both are snapshots nobody changes (a later split of the node
    slices new ones), so building later gives what building now would. The event keeps the
    tokens packed until a consumer reads ``token_ids`` (:meth:`BlockStored.packed`).

    One event carries the whole run (``block_hashes`` in chain order, ``token_ids`` of every
    page), as vLLM announces a request's new blocks: a router reads the same chain as from one
    event per page, and a 16-page insert builds 2 events (GPU, CPU_PINNED) instead of 32, which
    was three quarters of a served insert's time.

    A named tuple rather than a frozen dataclass: as immutable, built in a fraction of the time
    (one per node and medium on the insert path; a frozen dataclass sets each field through
    ``object.__setattr__``).
    """

    hashes: Sequence[bytes]
    parent_block_hash: int | None
    tokens: bytes
    block_size: int
    lora_id: int | None
    medium: str

    def build(self, ids: list[int] | None = None) -> BlockStored:
        """The event; ``ids`` (``keys.block_ids(hashes)``), when given, becomes its own list."""
        return BlockStored.packed(
            block_ids(self.hashes) if ids is None else ids,
            self.parent_block_hash,
            self.tokens,
            self.block_size,
            self.lora_id,
            self.medium,
        )


#: What an event queue holds: events, and runs of ``BlockStored`` built when taken.
QueuedEvent: TypeAlias = KVEvent | StoredRun


def build_events(items: Iterable[QueuedEvent]) -> list[KVEvent]:
    """``items`` with every run built, in order, in one pass: runs over the same pages (one
    node announced on several media, which share their hash list) decode their block ids
    once, and their tokens, if a consumer reads them, once."""
    out: list[KVEvent] = []
    ids_of: dict[int, list[int]] = {}
    first_of: dict[int, BlockStored] = {}
    for item in items:
        if not isinstance(item, StoredRun):
            out.append(item)
            continue
        # keyed by object identity (every run stays referenced by ``items`` meanwhile): one
        # hash list, one run of pages; each event gets its own lists (a consumer that extends
        # one changes no other)
        key = id(item.hashes)
        ids = ids_of.get(key)
        if ids is None:
            ids_of[key] = ids = block_ids(item.hashes)
            first_of[key] = event = item.build(ids)
        else:
            event = item.build(ids.copy())
            first = first_of[key]
            shared = _get_tokens(first)
            if type(shared) is not _SharedTokens:
                shared = _SharedTokens(item.tokens)
                _set_tokens(first, shared)
            _set_tokens(event, shared)
        out.append(event)
    return out


def per_block(events: Iterable[KVEvent]) -> list[KVEvent]:
    """``events`` with every ``BlockStored`` of several blocks split into one per block, chained
    as the run was (each block's parent is the block before it): for a consumer that handles
    one block per event, as SGLang sends them."""
    out: list[KVEvent] = []
    for e in events:
        if not isinstance(e, BlockStored) or len(e.block_hashes) == 1:
            out.append(e)
            continue
        bs = e.block_size
        parents = [e.parent_block_hash, *e.block_hashes[:-1]]
        out += [
            BlockStored([bid], parent, e.token_ids[j * bs : (j + 1) * bs], bs, e.lora_id, e.medium)
            for j, (bid, parent) in enumerate(zip(e.block_hashes, parents, strict=True))
        ]
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
        #: Events queued (a run is one event).
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
        with self._lock:
            self._events.append(event)
            self._count += 1
            limit = self.max_events
            if limit is not None and self._count > limit:
                self._overflow(limit)

    def extend(self, events: Iterable[QueuedEvent]) -> None:
        """Append several events (or runs), keeping their order and adjacency."""
        batch = list(events)
        if not batch:
            return
        with self._lock:
            self._events.extend(batch)
            self._count += len(batch)
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
