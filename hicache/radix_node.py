"""The radix tree's records: :class:`TreeNode` (one node) and :class:`MatchResult` (one match).

- :class:`TreeNode`     a run of whole pages: packed tokens, device and host pages, content
                        hashes, locks, LRU tick and the pending write-through id
- :class:`MatchResult`  what :meth:`~hicache.radix.RadixCache.match_prefix` returns

Only the data lives here; the tree logic (match, insert, split, evict) and the reasons for the
packed-token layout are in :mod:`hicache.radix`, which re-exports both names; import them from
there.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Sequence
from typing import NamedTuple, TypeAlias

from hicache.keys import tokens_to_bytes
from hicache.packed_tokens import TOKEN_BYTES, unpack

__all__ = ["MatchResult", "PageList", "TreeNode"]

#: A node's page indices: a list, or an ``array`` when the caller inserted one (see
#: ``RadixCache.insert``); slices keep the type.
PageList: TypeAlias = "list[int] | array[int]"

_node_ids = itertools.count()


class TreeNode:
    """One radix node: a run of whole pages shared by every sequence below it.

    ``value`` is ``None`` when the node's pages are not on the device (L2-only, see
    ``hicache.hiradix``); ``host_value`` is ``None`` when they are not in host memory.
    ``hashes`` holds one content hash per page once computed; a split slices it.
    ``tokens`` holds the node's tokens packed (see :mod:`hicache.radix`); ``key`` decodes them.
    """

    __slots__ = (
        "children",
        "hashes",
        "hit_count",
        "host_lock_ref",
        "host_value",
        "id",
        "last_access",
        "lock_ref",
        "parent",
        "tokens",
        "value",
        "write_through_pending_id",
    )

    def __init__(
        self,
        key: Sequence[int] | bytes,
        value: PageList | None,
        parent: TreeNode | None,
    ) -> None:
        self.id = next(_node_ids)
        self.children: dict[bytes, TreeNode] = {}  # keyed by the first page, packed
        self.parent = parent
        # bytes are taken as already packed; tokens_to_bytes rejects non-uint32 ids
        self.tokens = key if isinstance(key, bytes) else tokens_to_bytes(key)
        self.value = value
        self.host_value: PageList | None = None
        self.hashes: list[bytes] | None = None
        self.lock_ref = 0
        self.host_lock_ref = 0
        self.last_access = 0
        self.hit_count = 0
        self.write_through_pending_id: int | None = None

    @property
    def key(self) -> list[int]:
        """The node's tokens, as a new list."""
        return unpack(self.tokens)

    @property
    def num_tokens(self) -> int:
        """Tokens in this node (``num_pages * page_size``)."""
        return len(self.tokens) // TOKEN_BYTES

    @property
    def backed_up(self) -> bool:
        """True once the node's pages have host pages (from the moment the copy is submitted)."""
        return self.host_value is not None

    @property
    def evicted(self) -> bool:
        """True when the node's pages are not on the device."""
        return self.value is None

    @property
    def num_pages(self) -> int:
        """Pages in this node (its key is ``num_pages * page_size`` tokens)."""
        if self.value is not None:
            return len(self.value)
        if self.host_value is not None:
            return len(self.host_value)
        return 0

    def __repr__(self) -> str:
        where = ("D" if self.value is not None else "") + ("H" if self.host_value else "")
        return (
            f"TreeNode(id={self.id}, tokens={self.num_tokens}, {where or '-'}, "
            f"lock={self.lock_ref})"
        )


class MatchResult(NamedTuple):
    """Result of :meth:`RadixCache.match_prefix`.

    ``device_pages`` are the device page indices of the longest prefix held in L1 (what the
    engine puts in its page table), in the form they were inserted (an ``array`` stays one);
    ``last_node`` is the deepest node of that prefix.
    ``last_host_node`` is the deepest matched node overall, and ``host_hit_pages`` how many
    matched pages after the device prefix are only in host memory (loadable with ``load_back``).

    A named tuple rather than a frozen dataclass: as immutable, built in half the time (every
    match builds one, and a frozen dataclass sets each field through ``object.__setattr__``:
    0.7 us, a quarter of a whole miss).
    """

    device_pages: PageList
    last_node: TreeNode
    last_host_node: TreeNode
    host_hit_pages: int = 0

    @property
    def device_pages_count(self) -> int:
        """Number of device pages matched."""
        return len(self.device_pages)
