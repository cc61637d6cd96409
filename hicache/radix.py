"""Device-side radix prefix tree: match, insert, split, leaf-first LRU eviction and locks.

A :class:`RadixCache` maps page-aligned token sequences to KV pages in the device pool (L1).

- ``match_prefix(tokens)``   longest cached prefix: device page indices and the last node;
                             a match that ends inside a node splits it at the page boundary
- ``insert(tokens, pages)``  add a sequence whose KV sits in ``pages`` (one index per page);
                             returns how many leading tokens were already cached on the device
- ``evict(num_pages)``       free least recently used unlocked device leaves first (only the
                             tail pages of a leaf longer than needed)
- ``inc_lock_ref(node)`` / ``dec_lock_ref(node)``   protect a node and its ancestors

Keys are whole pages: a node holds ``len(value) * page_size`` tokens and its children are keyed
by their first page, packed (``bytes``), so each step down the tree is one dict lookup. Node
values are page indices (not token slots), which keeps splits and copies small.

Nodes keep their tokens packed (``TreeNode.tokens``), laid out as ``keys.tokens_to_bytes`` does
(uint32, little-endian), never as a ``list``. A ``bytes`` object holds no Python objects, so the
garbage collector never walks it: with lists, walking every new leaf's 1,000-odd tokens in each
young-generation collection cost more than the insert itself. A request is packed once (on
insert; on a match of a list, only once its first page hit), after which the walk reads only
packed bytes: one dict lookup of a page's bytes per node, one ``memcmp`` per node run however
long, and, where a run differs, a galloping then bisecting compare that finds the page
(``packed_tokens.common_pages``). A match collects the device nodes' page runs and counts
their pages; ``MatchResult.device_pages`` joins the runs only when read (a scheduler matches
each waiting request, often more than once, and mostly wants the count; SGLang's tree too
builds the indices only for an admitted request). At page size 1, a 32k-token hit then costs
the request's packing, one ``memcmp`` and a few dict lookups. Content hashes read the packed
tokens as they are. Token ids are therefore uint32, as content hashes already require:
``insert`` raises ``ValueError`` for others, and a match stops before the first page holding
one (no node can hold it).

A request comes in any form ``packed_tokens.pack_request`` accepts: a list (a tokenizer's, what
vLLM hands over), an integer ``array`` (``array('q')`` is what SGLang's scheduler holds), a 1-D
integer numpy array, or ``bytes`` already packed. The array forms are narrowed by numpy, in C,
without a Python int per token: the forms to hand over for long prompts. A list of fresh ints
costs ~8 ns a token to read whatever is done with it (packing it is the cheapest reading).

The tree also carries the fields the hierarchical cache (``hicache.hiradix``) needs — host pages,
lazily computed content hashes, the pending write-through id — so a split here slices all of them
consistently; subclasses hook :meth:`RadixCache._split_node`, :meth:`RadixCache._revive` and
:meth:`RadixCache._evict_node`. The records (``TreeNode``, ``MatchResult``) live in
``hicache.radix_node`` and are re-exported here: import them from this module.
"""

from __future__ import annotations

import heapq
import logging
import struct
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence

from hicache.events import BlockRemoved, EventQueue, KVEvent, Medium, StoredRun
from hicache.keys import block_id, block_ids
from hicache.packed_tokens import (
    TOKEN_BYTES,
    Tokens,
    chain_hashes_packed,
    common_pages,
    pack_request,
    token_list,
)
from hicache.radix_node import MatchResult, PageList, TreeNode

__all__ = ["LeafQueue", "MatchResult", "RadixCache", "TreeNode"]

logger = logging.getLogger(__name__)

#: Frees device pages; usually ``DevicePool.free``.
FreePages = Callable[[Sequence[int]], None]


class LeafQueue:
    """One tier's eviction candidates, least recently used first, kept from one eviction to
    the next (L1's device leaves here, L2's host-only leaves in ``HiRadixCache``).

    Every leaf of the tier is in it: the tree offers a node wherever it may have become one,
    keyed by its ``last_access`` then. An entry is checked only when it comes to the front
    (:meth:`RadixCache._evict_leaves`): a node that is no longer a leaf is dropped (it is
    offered again when it is one), one touched since goes back under its ``last_access`` now,
    and a locked one waits for the next eviction. A node's ``last_access`` never decreases, so
    the first front entry whose key is current is the least recently used leaf: the order of
    a heap of every leaf built afresh, at a few heap operations per node evicted instead of a
    walk over every candidate on every eviction (the walk was most of an eviction's time).
    """

    __slots__ = ("heap",)

    def __init__(self) -> None:
        #: ``(last_access when offered, node id, node)``; a node may be in it more than once
        self.heap: list[tuple[int, int, TreeNode]] = []

    def offer(self, node: TreeNode) -> None:
        """Add ``node`` (a leaf of the tier now)."""
        heapq.heappush(self.heap, (node.last_access, node.id, node))

    def rebuild(self, nodes: Iterable[TreeNode]) -> None:
        """Hold exactly ``nodes`` (every leaf of the tier), once each."""
        self.heap = [(n.last_access, n.id, n) for n in nodes]
        heapq.heapify(self.heap)

    def nodes(self) -> set[TreeNode]:
        """The nodes in it (leaves or not, as the last evictions left them)."""
        return {entry[2] for entry in self.heap}

    def __len__(self) -> int:
        return len(self.heap)


class RadixCache:
    """Radix prefix tree over the device KV pool.

    ``free_pages`` releases device pages when nodes are evicted (``DevicePool.free``); without it
    eviction only forgets them. ``seed`` is the content-hash seed (``keys.seed_hash``) used when
    events need hashes; ``gpu_events`` turns on ``BlockStored``/``BlockRemoved(GPU)`` events,
    which hash every inserted page (off by default: hashing is then never on the hot path).
    Not thread-safe: the serving loop owns it.
    """

    def __init__(
        self,
        page_size: int,
        free_pages: FreePages | None = None,
        *,
        seed: bytes = b"\x00" * 32,
        gpu_events: bool = False,
        lora_id: int | None = None,
    ) -> None:
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.page_size = page_size
        self._page_struct = struct.Struct(f"<{page_size}I")  # one page, packed
        self._free_pages = free_pages
        self.seed = seed
        self.gpu_events = gpu_events
        self.lora_id = lora_id
        self.events = EventQueue()
        self._tick = 0
        #: Tokens (whole pages) ``match_prefix`` was asked for, and how many pages of those it
        #: found on the device (L1) and in host memory only (L2); monotonic, for stats(). A miss
        #: costs ~1 us, so it pays one addition: no call count, no division.
        self.match_tokens = 0
        self.match_device_pages = 0
        self.match_host_pages = 0
        self.reset()

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Forget every node (without freeing pages: the pool is reset with the cache)."""
        self.root = TreeNode(b"", [], None)
        self.root.lock_ref = 1  # the root is never evicted
        #: Every device leaf (and maybe nodes that stopped being one): L1 eviction's candidates
        self._device_leaves = LeafQueue()
        self._evictable_pages = 0
        self._protected_pages = 0

    def evictable_size(self) -> int:
        """Tokens held on the device by unlocked nodes."""
        return self._evictable_pages * self.page_size

    def protected_size(self) -> int:
        """Tokens held on the device by locked nodes."""
        return self._protected_pages * self.page_size

    @property
    def evictable_pages(self) -> int:
        """Device pages held by unlocked nodes."""
        return self._evictable_pages

    @property
    def protected_pages(self) -> int:
        """Device pages held by locked nodes."""
        return self._protected_pages

    def total_device_pages(self) -> int:
        """Device pages held by the tree (evictable + protected)."""
        return self._evictable_pages + self._protected_pages

    def iter_nodes(self) -> Iterator[TreeNode]:
        """Every node except the root, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    # ------------------------------------------------------------------ match

    def page_aligned(self, key: Tokens) -> list[int]:
        """``key`` (any accepted form) cut to whole pages, as a list."""
        key = token_list(key)
        n = len(key) - len(key) % self.page_size
        return key if n == len(key) else key[:n]

    def match_prefix(self, key: Tokens) -> MatchResult:
        """Find the longest cached prefix of ``key`` (cut to whole pages).

        Nodes on the path are touched for LRU. A match ending inside a node splits it, so the
        returned nodes cover exactly the matched pages.
        """
        ps = self.page_size
        step = ps * TOKEN_BYTES
        if type(key) is list:
            # a miss packs only the first page, not the whole list: with a struct, twice as
            # fast as array.fromlist for a page (a first page that does not pack goes on to
            # pack_request, which names a non-integer and stops before an id out of range)
            first: bytes | None = b""
            if len(key) >= ps:
                try:
                    first = self._page_struct.pack(*key[:ps])
                except struct.error:
                    first = None
            if first is not None and first not in self.root.children:
                self._tick += 1
                self.match_tokens += len(key) - len(key) % ps
                return MatchResult((), 0, self.root, self.root, 0)
        packed, total = pack_request(key)
        view = memoryview(packed)
        # whole pages of valid ids: nodes hold whole pages, and no node holds an invalid id
        limit = len(view) - len(view) % step
        self._tick += 1
        tick = self._tick
        node = self.root
        last_device = node
        runs: list[PageList] = []  # the device nodes' own page arrays: joined only when asked
        count = 0
        host_hit = 0
        on_device = True
        child = node.children.get(bytes(view[:step])) if limit else None
        i = 0  # bytes of the request matched
        while child is not None:
            tokens = child.tokens
            end = i + len(tokens)
            # a one-page node matched with the dict lookup; a longer one needs one memcmp
            # (no Python step per page, however long the node)
            if len(tokens) > step and (end > limit or not tokens.startswith(view[i:end])):
                child = self._split_node(child, common_pages(tokens, view[:limit], i, step))
                end = i + len(child.tokens)
                below = None  # the request goes on with another page, or ends here
            else:
                below = child.children.get(bytes(view[end : end + step])) if end < limit else None
            child.last_access = tick
            if on_device and child.value is not None:
                runs.append(child.value)
                count += len(child.value)
                last_device = child
            else:
                on_device = False
                host_hit += (end - i) // step
            node = child
            i = end
            child = below
        self.match_tokens += total - total % ps
        if count:  # a miss pays one addition
            self.match_device_pages += count
        if host_hit:
            self.match_host_pages += host_hit
        return MatchResult(runs, count, last_device, node, host_hit)

    # ------------------------------------------------------------------ insert

    def insert(self, key: Tokens, pages: Sequence[int]) -> int:
        """Insert ``key`` whose KV is in device ``pages`` (one page index per ``page_size``).

        ``pages`` given as an ``array`` stay one: the nodes keep slices of it, which hold no
        Python int per page for the garbage collector to walk (a list of 1,000-odd page ids
        per node was a quarter of a page-1 insert's time).

        Returns how many leading tokens were already cached on the device: for that range the
        tree keeps its own pages and ignores ``pages``; the tree owns the rest of ``pages`` from
        now on. A caller that matched a prefix (and reused the tree's pages for it) frees only
        its own pages between that prefix and the returned length. Token ids must be uint32
        (``ValueError`` otherwise, before the tree changes); ``key`` may come in any form
        :func:`~hicache.packed_tokens.pack_request` accepts.
        """
        if type(pages) is not list and type(pages) is not array:
            pages = list(pages)
        ps = self.page_size
        packed, n = pack_request(key)
        if n != len(pages) * ps:
            raise ValueError(
                f"insert needs len(key) == len(pages) * page_size, got {n} tokens for "
                f"{len(pages)} pages of {ps}"
            )
        view = memoryview(packed)
        size = len(view)
        if size != n * TOKEN_BYTES:
            bad = token_list(key)[size // TOKEN_BYTES]
            raise ValueError(f"token id {bad!r} is outside the uint32 range [0, {2**32 - 1}]")
        step = ps * TOKEN_BYTES
        self._tick += 1
        tick = self._tick
        node = self.root
        dup = 0
        on_device = True
        i = 0  # bytes of the request walked
        first = b""
        while i < size:
            first = bytes(view[i : i + step])
            child = node.children.get(first)
            if child is None:
                break
            tokens = child.tokens
            end = i + len(tokens)
            # the dict hit proved the first page equal; one memcmp covers the rest
            if len(tokens) > step and (end > size or not tokens.startswith(view[i:end])):
                child = self._split_node(child, common_pages(tokens, view, i, step))
                end = i + len(child.tokens)
            child.last_access = tick
            if child.value is None:
                on_device = False
                self._revive(child, pages[i // step : end // step])
            elif on_device:
                dup = end // TOKEN_BYTES
            self._on_path(child)
            node = child
            i = end
        if i < size:
            node = self._add_leaf(node, first, bytes(view[i:]), pages[i // step :], tick)
            if self.gpu_events:
                self._emit_stored(node, Medium.GPU)
            self._on_new_leaf(node)
        return dup

    def _add_leaf(
        self, parent: TreeNode, first: bytes, tokens: bytes, pages: PageList, tick: int
    ) -> TreeNode:
        node = TreeNode(tokens, pages, parent)
        node.last_access = tick
        parent.children[first] = node
        self._evictable_pages += len(pages)
        self._device_leaves.offer(node)
        return node

    def first_page(self, node: TreeNode) -> bytes:
        """``node``'s key in its parent's ``children``: its first page, packed."""
        return node.tokens[: self.page_size * TOKEN_BYTES]

    def _on_path(self, node: TreeNode) -> None:
        """Called for every existing node an insert walks through (hook for hit counting)."""

    def _on_new_leaf(self, node: TreeNode) -> None:
        """Called after an insert created ``node`` (hook for write-through)."""

    def _revive(self, node: TreeNode, pages: PageList) -> None:
        """Give an L2-only node device pages again (an insert covered it); base trees have none."""
        node.value = pages
        if node.lock_ref > 0:
            self._protected_pages += len(pages)
        else:
            self._evictable_pages += len(pages)
        # its children are not on the device (device nodes are ancestor-closed): a device leaf
        self._device_leaves.offer(node)
        if self.gpu_events:
            self._emit_stored(node, Medium.GPU)

    # ------------------------------------------------------------------ split

    def _split_node(self, child: TreeNode, pages: int) -> TreeNode:
        """Split ``child`` after its first ``pages`` pages; return the new prefix node.

        The existing object becomes the suffix (so references to the deepest node, such as a
        write-through's lock node, stay valid); every per-page field is sliced, nothing rehashed.
        """
        tokens = child.tokens
        cut = pages * self.page_size * TOKEN_BYTES
        if not 0 < cut < len(tokens):
            raise ValueError(f"cannot split a {child.num_tokens}-token node at page {pages}")
        parent = child.parent
        assert parent is not None
        first = self.first_page(child)
        prefix = TreeNode(tokens[:cut], None, parent)
        if child.value is not None:
            prefix.value = child.value[:pages]
            child.value = child.value[pages:]
        if child.host_value is not None:
            prefix.host_value = child.host_value[:pages]
            child.host_value = child.host_value[pages:]
        if child.hashes is not None:
            prefix.hashes = child.hashes[:pages]
            child.hashes = child.hashes[pages:]
        prefix.lock_ref = child.lock_ref
        prefix.host_lock_ref = child.host_lock_ref
        prefix.last_access = child.last_access
        prefix.hit_count = child.hit_count
        prefix.write_through_pending_id = child.write_through_pending_id
        child.tokens = tokens[cut:]
        child.parent = prefix
        prefix.children[self.first_page(child)] = child
        parent.children[first] = prefix
        return prefix

    # ------------------------------------------------------------------ locks

    def inc_lock_ref(self, node: TreeNode) -> None:
        """Protect ``node`` and its ancestors from eviction (counted; pair with dec_lock_ref)."""
        while node is not self.root:
            if node.lock_ref == 0 and node.value is not None:
                n = len(node.value)
                self._evictable_pages -= n
                self._protected_pages += n
            node.lock_ref += 1
            parent = node.parent
            assert parent is not None
            node = parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        """Undo one :meth:`inc_lock_ref` of ``node``."""
        while node is not self.root:
            if node.lock_ref <= 0:
                raise RuntimeError(f"dec_lock_ref below zero on {node!r}")
            node.lock_ref -= 1
            if node.lock_ref == 0 and node.value is not None:
                n = len(node.value)
                self._evictable_pages += n
                self._protected_pages -= n
            parent = node.parent
            assert parent is not None
            node = parent

    # ------------------------------------------------------------------ evict

    def _evictable(self, node: TreeNode) -> bool:
        """On the device, unlocked, and no child holds device pages (leaf-first)."""
        return node.lock_ref == 0 and _is_device_leaf(node)

    def evict(self, num_pages: int) -> int:
        """Free ``num_pages`` device pages if possible, least recently used leaves first.

        A leaf longer than what is still needed gives up only its tail pages (it is split): no
        more is evicted than asked for. Returns the number of device pages freed.
        """
        if num_pages <= 0:
            return 0
        leaves = self._device_leaves
        # a node is offered again each time it becomes a leaf: past twice as many entries as
        # the device could hold leaves, start again from the tree
        if len(leaves) > 2 * self.total_device_pages() + 64:
            leaves.rebuild(n for n in self.iter_nodes() if _is_device_leaf(n))
        return self._evict_leaves(
            leaves, num_pages, _is_device_leaf, self._evictable, _device_pages, self._drop_device
        )

    def _drop_device(self, node: TreeNode) -> int:
        """:meth:`_evict_node` for L1 eviction; its parent may be a device leaf now."""
        parent = node.parent
        n = self._evict_node(node)
        if parent is not None and _is_device_leaf(parent):
            self._device_leaves.offer(parent)
        return n

    def _evict_leaves(
        self,
        leaves: LeafQueue,
        num_pages: int,
        is_leaf: Callable[[TreeNode], bool],
        evictable: Callable[[TreeNode], bool],
        pages_of: Callable[[TreeNode], int],
        drop: Callable[[TreeNode], int],
    ) -> int:
        """The one leaf-first LRU loop of L1 and L2 eviction: take the least recent
        ``evictable`` leaf of ``leaves`` (see :class:`LeafQueue`), trim it to the pages still
        needed (tail first), ``drop`` it (its page count; ``drop`` offers the parent once it
        became a leaf)."""
        heap = leaves.heap
        held: list[tuple[int, int, TreeNode]] = []  # locked leaves: for a later eviction
        freed = 0
        while freed < num_pages and heap:
            entry = heapq.heappop(heap)
            node = entry[2]
            if not is_leaf(node):
                continue  # offered again when it is one
            if node.last_access != entry[0]:
                heapq.heappush(heap, (node.last_access, entry[1], node))  # touched since
                continue
            if not evictable(node):
                held.append(entry)
                continue
            self._trim_to_tail(node, pages_of(node), num_pages - freed)
            freed += drop(node)
        for entry in held:
            heapq.heappush(heap, entry)
        return freed

    def _trim_to_tail(self, node: TreeNode, pages: int, need: int) -> None:
        """Split the head off ``node`` (of ``pages`` pages) when it has more than ``need``, so
        that ``node`` holds only its last ``need`` pages: eviction then drops exactly what is
        needed, tail first (a chain's tail is its least recently used part), and the head
        stays cached as a new parent node."""
        if pages > need > 0:
            self._split_node(node, pages - need)

    def _evict_node(self, node: TreeNode) -> int:
        """Drop ``node``'s device pages; return how many. The base tree deletes the leaf."""
        assert node.value is not None
        n = len(node.value)
        if self._free_pages is not None:
            self._free_pages(node.value)
        self._evictable_pages -= n
        if self.gpu_events:
            self._emit_removed(node, Medium.GPU)
        node.value = None
        if not node.children and node.host_value is None:
            self._delete_leaf(node)
        return n

    def _delete_leaf(self, node: TreeNode) -> None:
        parent = node.parent
        assert parent is not None
        del parent.children[self.first_page(node)]
        node.parent = None

    # ------------------------------------------------------------------ hashes and events

    def node_hashes(self, node: TreeNode) -> list[bytes]:
        """Content hashes of ``node``'s pages, computed on first use (ancestors first)."""
        if node.hashes is not None:
            return node.hashes
        missing: list[TreeNode] = []
        parent_hash = self.seed
        cur: TreeNode | None = node
        while cur is not None and cur is not self.root:
            if cur.hashes is not None:
                parent_hash = cur.hashes[-1]
                break
            missing.append(cur)
            cur = cur.parent
        hashes: list[bytes] = []
        for n in reversed(missing):
            hashes = chain_hashes_packed(parent_hash, n.tokens, self.page_size)
            n.hashes = hashes
            parent_hash = hashes[-1]
        return hashes

    def parent_block_hash(self, node: TreeNode) -> int | None:
        """Event id of the page before ``node``'s first page, or None under the root."""
        parent = node.parent
        if parent is None or parent is self.root:
            return None
        return block_id(self.node_hashes(parent)[-1])

    def _emit_stored(self, node: TreeNode, medium: str) -> None:
        """One ``BlockStored`` for ``node``'s pages, chained to the page before it: queued as
        a run, built when taken; nothing is hashed for a medium the queue does not keep."""
        if self.events.wants(medium):
            self.events.put(self._stored_run(node, medium, self.parent_block_hash(node)))

    def _stored_run(self, node: TreeNode, medium: str, parent: int | None) -> StoredRun:
        """The run of ``node``'s pages (see :meth:`_emit_stored`) after ``parent`` (its
        :meth:`parent_block_hash`); its tokens stay packed until a consumer reads them."""
        return StoredRun(
            self.node_hashes(node), parent, node.tokens, self.page_size, self.lora_id, medium
        )

    def _emit_removed(self, node: TreeNode, medium: str) -> None:
        if self.events.wants(medium):
            hashes = self.node_hashes(node)
            self.events.put(BlockRemoved(block_ids(hashes), medium))

    def take_events(self) -> list[KVEvent]:
        """Drain the queued events, oldest first."""
        return self.events.take()


def _device_pages(node: TreeNode) -> int:
    assert node.value is not None
    return len(node.value)


def _is_device_leaf(node: TreeNode) -> bool:
    """Whether ``node`` holds device pages and no child does (the root is none: no parent)."""
    if node.value is None or node.parent is None:
        return False
    return all(child.value is None for child in node.children.values())
