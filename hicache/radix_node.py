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
from typing import TypeAlias

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


class MatchResult:
    """Result of :meth:`RadixCache.match_prefix`.

    ``device_pages`` are the device page indices of the longest prefix held in L1 (what the
    engine puts in its page table), in the form they were inserted (an ``array`` stays one);
    ``device_pages_count`` is how many there are. ``last_node`` is the deepest node of that
    prefix, ``last_host_node`` the deepest matched node overall, and ``host_hit_pages`` how
    many matched pages after the device prefix are only in host memory (loadable with
    ``load_back``).

    ``device_pages`` is joined from the matched nodes' page runs on first access, as SGLang
    builds its indices only when a request is admitted (``path_device_indices``): a scheduler
    matches every waiting request, often more than once, and mostly wants the count. A 33k-page
    join is a 132 KiB copy into fresh memory: 12 of a page-1 match's 43 us when it was done on
    every match (2026-12-07, load 6). Joining late gives
    what joining at once would: the runs are the nodes' own arrays, which the tree never
    changes in place (a split or an eviction gives a node a new array or none), and the result
    keeps them alive.

    A class with slots rather than a named tuple or a frozen dataclass: built in less time than
    either (every match builds one; a frozen dataclass sets each field through
    ``object.__setattr__``, 0.7 us, a quarter of a whole miss).
    """

    __slots__ = (
        "_pages",
        "_runs",
        "device_pages_count",
        "host_hit_pages",
        "last_host_node",
        "last_node",
    )

    def __init__(
        self,
        device_runs: Sequence[PageList],
        device_pages_count: int,
        last_node: TreeNode,
        last_host_node: TreeNode,
        host_hit_pages: int = 0,
    ) -> None:
        self._runs = device_runs
        self._pages: PageList | None = None
        self.device_pages_count = device_pages_count
        self.last_node = last_node
        self.last_host_node = last_host_node
        self.host_hit_pages = host_hit_pages

    @property
    def device_pages(self) -> PageList:
        """The matched device page indices, joined on first access (a new object, the
        caller's to change; later accesses return the same one)."""
        pages = self._pages
        if pages is None:
            pages = self._pages = _joined(self._runs)
            self._runs = ()
        return pages

    def __repr__(self) -> str:
        return (
            f"MatchResult(device_pages_count={self.device_pages_count}, "
            f"last_node={self.last_node!r}, last_host_node={self.last_host_node!r}, "
            f"host_hit_pages={self.host_hit_pages})"
        )


def _joined(runs: Sequence[PageList]) -> PageList:
    """``runs`` concatenated into a new object of the first run's type (a list when arrays of
    two type codes meet); ``[]`` for none."""
    if not runs:
        return []
    pages = runs[0][:]
    for run in runs[1:]:
        try:
            pages.extend(run)  # an array by an array: one memcpy
        except TypeError:  # arrays of two type codes
            pages = [*pages, *run]
    return pages
