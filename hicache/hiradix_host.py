"""The host (L2) side of :class:`~hicache.hiradix.HiRadixCache`: L1 eviction that keeps host
copies, L2 eviction and loading host pages back to the device.

- ``_evict_node``   L1: a backed-up, acknowledged node keeps its host pages and becomes L2-only
                    (``BlockRemoved(GPU)``); others are deleted as in :class:`RadixCache`
- ``evict_host``    L2: least recently used host-only leaves (``BlockRemoved(CPU_PINNED)``);
                    pages under storage I/O are freed when the workers let go of them
- ``load_back``     L2 -> L1 for the host-only nodes of a match

:class:`HostLayer` is the first layer of :class:`~hicache.hiradix.HiRadixCache` and is not used
alone: ``HiRadixCache.__init__`` sets the state declared on it.
"""

from __future__ import annotations

from hicache.events import Medium
from hicache.pools import DevicePool, HostPool
from hicache.radix import RadixCache, TreeNode
from hicache.transfer import Direction, TransferEngine

__all__ = ["HostLayer"]


class HostLayer(RadixCache):
    """L1 eviction keeping host copies, L2 eviction and load-back (module docstring)."""

    device_pool: DevicePool
    host_pool: HostPool
    transfer: TransferEngine
    #: The cache's counters (``HiRadixCache.stats``); every layer adds to them.
    counters: dict[str, int]

    # ------------------------------------------------------------------ eviction

    def _evict_node(self, node: TreeNode) -> int:
        if node.host_value is None or node.write_through_pending_id is not None:
            return super()._evict_node(node)
        # backed up and acknowledged: the host copy stays, the node becomes L2-only
        assert node.value is not None
        n = len(node.value)
        self.device_pool.free(node.value)
        node.value = None
        self._evictable_pages -= n
        if self.gpu_events:
            self._emit_removed(node, Medium.GPU)
        self.counters["l1_evicted_pages"] += n
        return n

    def _host_evictable(self, node: TreeNode) -> bool:
        return (
            node is not self.root
            and node.value is None
            and node.host_value is not None
            and node.host_lock_ref == 0
            and not node.children
        )

    def evict_host(self, num_pages: int) -> int:
        """Drop at least ``num_pages`` host pages of L2-only leaves, least recently used first.

        Pages a storage worker still uses are freed when it lets go of them. Returns the number
        of host pages given up.
        """
        if num_pages <= 0:
            return 0
        import heapq

        heap = [(n.last_access, n.id, n) for n in self.iter_nodes() if self._host_evictable(n)]
        heapq.heapify(heap)
        freed = 0
        while freed < num_pages and heap:
            _, _, node = heapq.heappop(heap)
            if not self._host_evictable(node):
                continue
            assert node.host_value is not None
            parent = node.parent
            self._emit_removed(node, Medium.CPU_PINNED)
            self.host_pool.free_when_released(node.host_value)
            freed += len(node.host_value)
            node.host_value = None
            self._delete_leaf(node)
            if parent is not None and self._host_evictable(parent):
                heapq.heappush(heap, (parent.last_access, parent.id, parent))
        self.counters["l2_evicted_pages"] += freed
        return freed

    def _alloc_device(self, n: int) -> list[int] | None:
        pages = self.device_pool.alloc(n)
        if pages is None:
            self.evict(n - self.device_pool.available)
            pages = self.device_pool.alloc(n)
        return pages

    # ------------------------------------------------------------------ load back

    def load_back(self, node: TreeNode) -> list[int] | None:
        """Copy the host-only nodes from ``node`` up to the first device node back to L1.

        Returns the device pages of the loaded nodes (prefix order; ``[]`` when ``node`` is
        already on the device), or None when L1 has no room. Blocks until the copy finished.
        """
        path: list[TreeNode] = []
        cur = node
        while cur is not self.root and cur.value is None:
            path.append(cur)
            assert cur.parent is not None
            cur = cur.parent
        if not path:
            return []
        path.reverse()
        host: list[int] = []
        for n in path:
            assert n.host_value is not None
            host += n.host_value
        # keep the device ancestor (and the path) out of the eviction that makes room
        self.inc_lock_ref(cur)
        for n in path:
            n.host_lock_ref += 1
        try:
            dev = self._alloc_device(len(host))
        finally:
            for n in path:
                n.host_lock_ref -= 1
            self.dec_lock_ref(cur)
        if dev is None:
            return None
        ack_id = self.transfer.submit(Direction.H2D, host, dev)
        self.transfer.wait(ack_id)
        off = 0
        for n in path:
            assert n.host_value is not None
            k = len(n.host_value)
            self._revive(n, dev[off : off + k])
            off += k
        self.counters["loaded_back_pages"] += len(dev)
        return dev
