"""Page indices inserted as an ``array``: the tree keeps them as arrays (no Python int per page
for the garbage collector), and match, split, eviction, events and write-through see the same
pages as with a list."""

from __future__ import annotations

from array import array

import torch

from hicache.events import BlockStored, Medium
from hicache.hiradix import HiRadixCache
from hicache.pools import DevicePool, HostPool, KVLayout
from hicache.radix import RadixCache
from hicache.transfer import CpuTransferEngine

PS = 2


def seq(*pages: int) -> list[int]:
    """Tokens of whole pages, page ``p`` holding ``[p * 10, p * 10 + 1]``."""
    return [p * 10 + j for p in pages for j in range(PS)]


def test_array_pages_stay_arrays_through_match_split_and_evict() -> None:
    freed: list[int] = []
    cache = RadixCache(PS, freed.extend)
    assert cache.insert(seq(1, 2, 3), array("q", [7, 8, 9])) == 0
    (node,) = cache.root.children.values()
    assert isinstance(node.value, array) and list(node.value) == [7, 8, 9]
    # a second request splits the node: both halves keep arrays of the right pages
    assert cache.insert(seq(1, 4), array("q", [7, 5])) == PS
    full = cache.match_prefix(seq(1, 2, 3)).device_pages
    assert full == array("q", [7, 8, 9])  # pages come back in the form they went in
    assert cache.match_prefix(seq(1, 4)).device_pages == array("q", [7, 5])
    # a list inserted below an array (a revived node's pages are a list) joins it
    cache.insert(seq(1, 4, 6), [7, 5, 4])
    assert list(cache.match_prefix(seq(1, 4, 6)).device_pages) == [7, 5, 4]
    cache.insert(seq(1, 4, 6, 3), array("i", [7, 5, 4, 2]))  # another type code
    assert list(cache.match_prefix(seq(1, 4, 6, 3)).device_pages) == [7, 5, 4, 2]
    prefix = cache.match_prefix(seq(1)).last_node
    assert isinstance(prefix.value, array) and list(prefix.value) == [7]
    assert cache.evict(5) == 5
    assert sorted(freed) == [2, 4, 5, 8, 9]
    assert cache.match_prefix(seq(1, 2)).device_pages == array("q", [7])


def test_hiradix_writes_through_and_announces_array_pages() -> None:
    layout = KVLayout(1, 1, 4, PS, torch.float32)
    dev = DevicePool(layout, 8, "cpu")
    host = HostPool(layout, 8, pin=False)
    cache = HiRadixCache(dev, host, CpuTransferEngine(dev, host))
    pages = dev.alloc(3)
    assert pages is not None
    for j, p in enumerate(pages):
        dev.write_page(p, torch.full(layout.page_shape, float(j + 1)))
    cache.insert(seq(1, 2, 3), array("q", pages))
    assert cache.writing_check() == 1
    (node,) = cache.root.children.values()
    assert node.host_value is not None
    for j, hp in enumerate(node.host_value):
        assert bool((host.page_tensor(hp) == j + 1).all())
    stored = [e for e in cache.take_events() if isinstance(e, BlockStored)]
    assert [e.medium for e in stored] == [Medium.GPU, Medium.CPU_PINNED]
    assert stored[0].block_hashes == stored[1].block_hashes and len(stored[0].block_hashes) == 3
    assert stored[0].token_ids == stored[1].token_ids == seq(1, 2, 3)
    # L1 eviction of the backed-up node hands its array pages back to the device pool
    assert cache.evict(3) == 3
    assert dev.available == 8
