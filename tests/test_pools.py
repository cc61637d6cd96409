"""Device and host KV pools: layouts, allocators, holds, zero-copy page views."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hicache.pools import HOST_ALIGNMENT, DevicePool, HostPool, KVLayout, PageAllocator

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, page_size=2, dtype=torch.bfloat16)
MLA = KVLayout(num_layers=3, num_kv_heads=1, head_dim=6, page_size=2, dtype=torch.float16, mla=True)


def test_layout_shapes_and_bytes() -> None:
    assert LAYOUT.page_shape == (2, 3, 2, 2, 4)
    assert LAYOUT.page_numel == 96
    assert LAYOUT.page_bytes == 192
    assert MLA.page_shape == (3, 2, 1, 6)
    assert MLA.page_bytes == 3 * 2 * 6 * 2
    with pytest.raises(ValueError, match="page_size"):
        KVLayout(1, 1, 1, 0, torch.float16)
    spec = LAYOUT.namespace_spec(tp_rank=1, tp_size=2)
    assert spec.dtype == "bfloat16" and spec.tp_rank == 1 and spec.layout == "page_first"
    assert MLA.namespace_spec(tp_rank=1, tp_size=2).namespace() == MLA.namespace_spec().namespace()


def test_allocator_alloc_free_and_exhaustion() -> None:
    a = PageAllocator(4)
    assert a.alloc(3) == [0, 1, 2]
    assert a.alloc(2) is None
    assert a.available == 1
    assert a.alloc(0) == []
    a.free([1])
    assert sorted(a.alloc(2) or []) == [1, 3]
    assert a.available == 0


def test_allocator_double_free_names_the_page_and_changes_nothing() -> None:
    a = PageAllocator(4)
    pages = a.alloc(2)
    assert pages == [0, 1]
    a.free([0])
    with pytest.raises(ValueError, match="page 0"):
        a.free([1, 0])
    assert a.is_allocated(1)  # the batch was rejected whole
    with pytest.raises(ValueError, match="page 1: listed twice"):
        a.free([1, 1])
    with pytest.raises(ValueError, match="page 7"):
        a.free([7])
    a.free([1])
    assert a.available == 4


def _check_allocator_model(num_pages: int, ops: list[tuple[bool, int]]) -> None:
    a = PageAllocator(num_pages)
    held: set[int] = set()
    for is_alloc, n in ops:
        if is_alloc:
            got = a.alloc(n)
            if n > num_pages - len(held):
                assert got is None
            else:
                assert got is not None and len(set(got)) == n and not set(got) & held
                assert all(type(p) is int for p in got)
                held.update(got)
        else:
            batch = sorted(held)[:n]
            a.free(batch)
            held.difference_update(batch)
        assert a.available == num_pages - len(held)
        assert all(a.is_allocated(p) == (p in held) for p in range(num_pages))


@settings(max_examples=50)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=40))
def test_allocator_matches_a_set_model(ops: list[tuple[bool, int]]) -> None:
    _check_allocator_model(8, ops)


@settings(max_examples=25)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 160)), max_size=20))
def test_allocator_matches_a_set_model_in_large_batches(ops: list[tuple[bool, int]]) -> None:
    """Batches past the size where pages are marked with numpy instead of a loop."""
    _check_allocator_model(300, ops)


def test_allocator_keeps_no_python_int_per_free_page() -> None:
    a = PageAllocator(100_000)
    # the free list is one buffer, so the garbage collector has no int per page to walk
    assert not any(isinstance(r, (int, list)) for r in gc.get_referents(a._free))
    assert a.alloc(3) == [0, 1, 2]
    big = a.alloc(200)
    assert big == list(range(3, 203))
    a.free(big)
    with pytest.raises(ValueError, match="page 150: it is not allocated"):
        a.free([150])
    assert a.alloc(200) == big  # freed pages come back first, in the same order


@pytest.mark.parametrize("layout", [LAYOUT, MLA], ids=["mha", "mla"])
def test_device_pool_is_layer_first_and_pages_roundtrip(layout: KVLayout) -> None:
    pool = DevicePool(layout, num_pages=5, device="cpu")
    lead = () if layout.mla else (2,)
    assert pool.kv.shape == (*lead, 3, 5, 2, layout.num_kv_heads, layout.head_dim)
    data = torch.randn(layout.page_shape).to(layout.dtype)
    pool.write_page(3, data)
    assert torch.equal(pool.read_page(3), data)
    assert torch.count_nonzero(pool.read_page(2)) == 0
    # The token view is the same memory, token slots 6 and 7 belong to page 3.
    tv = pool.token_view
    assert tv.data_ptr() == pool.kv.data_ptr()
    assert pool.token_slots([3, 0]).tolist() == [6, 7, 0, 1]
    layer1 = data[1] if layout.mla else data[0, 1]
    assert torch.equal(tv[1, 6:8] if layout.mla else tv[0, 1, 6:8], layer1)
    with pytest.raises(ValueError, match="shape"):
        pool.write_page(0, torch.zeros(1))
    with pytest.raises(ValueError, match="device page 5"):
        pool.read_page(5)


def test_device_pool_allocator() -> None:
    pool = DevicePool(LAYOUT, num_pages=3, device="cpu")
    assert pool.alloc(2) == [0, 1]
    assert pool.available == 1
    pool.free([0])
    with pytest.raises(ValueError, match="page 0"):
        pool.free([0])


@pytest.mark.parametrize("layout", [LAYOUT, MLA], ids=["mha", "mla"])
def test_host_pool_is_page_first_contiguous_and_aligned(layout: KVLayout) -> None:
    pool = HostPool(layout, num_pages=4, pin=False)
    assert pool.kv.shape == (4, *layout.page_shape)
    assert pool.kv.is_contiguous()
    assert pool.data_ptr() % HOST_ALIGNMENT == 0
    assert pool.kv.data_ptr() == pool.data_ptr()
    for p in range(4):
        t = pool.page_tensor(p)
        assert t.data_ptr() == pool.data_ptr() + p * layout.page_bytes
        assert t.shape == layout.page_shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_page_view_is_writable_zero_copy(dtype: torch.dtype) -> None:
    layout = KVLayout(2, 2, 4, 2, dtype)
    pool = HostPool(layout, num_pages=3, pin=False)
    pool.kv.zero_()
    view = pool.page_view(1)
    assert isinstance(view, memoryview)
    assert view.format == "B" and view.nbytes == layout.page_bytes and not view.readonly
    assert view.c_contiguous
    assert [v.nbytes for v in pool.page_views([2, 0])] == [layout.page_bytes] * 2
    # Writing through the view changes the tensor, and only page 1.
    src = torch.arange(layout.page_numel, dtype=torch.float32).to(dtype).reshape(layout.page_shape)
    view[:] = src.view(-1).view(torch.uint8).numpy().tobytes()
    assert torch.equal(pool.page_tensor(1), src)
    assert torch.count_nonzero(pool.page_tensor(0)) == 0
    assert torch.count_nonzero(pool.page_tensor(2)) == 0
    # And the reverse: tensor writes show through the view.
    pool.page_tensor(2).fill_(1)
    raw = bytes(pool.page_view(2))
    assert (
        raw
        == torch.ones(layout.page_shape, dtype=dtype).view(-1).view(torch.uint8).numpy().tobytes()
    )


def test_page_view_outlives_pool_reference() -> None:
    pool = HostPool(LAYOUT, num_pages=2, pin=False)
    pool.kv.fill_(3)
    view = pool.page_view(1)
    expected = bytes(view)
    del pool
    assert bytes(view) == expected  # the view keeps the buffer alive


def test_holds_block_free_and_balance() -> None:
    pool = HostPool(LAYOUT, num_pages=4, pin=False)
    pages = pool.alloc(3)
    assert pages == [0, 1, 2]
    pool.hold([0, 1])
    pool.hold([1])
    assert pool.hold_count(1) == 2 and pool.total_holds() == 3
    with pytest.raises(ValueError, match="page 1: it has 2 hold"):
        pool.free([2, 1])
    assert pool.is_allocated(2)  # rejected whole
    pool.release([1, 1])
    with pytest.raises(ValueError, match="page 1"):
        pool.release([1])
    pool.release([0])
    assert pool.total_holds() == 0
    pool.free(pages)
    assert pool.available == 4
    with pytest.raises(ValueError, match="page 0"):
        pool.free([0])
    with pytest.raises(ValueError, match="hold page 3"):
        pool.hold([3])  # not allocated


def test_free_when_released_defers_held_pages() -> None:
    pool = HostPool(LAYOUT, num_pages=3, pin=False)
    pages = pool.alloc(3)
    assert pages is not None
    pool.hold([1])
    pool.hold([1])
    pool.free_when_released(pages)
    assert pool.available == 2 and pool.pending_frees() == 1
    assert pool.alloc(3) is None
    with pytest.raises(ValueError, match="page 1"):
        pool.free([1])
    with pytest.raises(ValueError, match="pending"):
        pool.hold([1])
    pool.release([1])
    assert pool.available == 2
    pool.release([1])
    assert pool.available == 3 and pool.pending_frees() == 0 and pool.total_holds() == 0


def test_holds_are_thread_safe() -> None:
    pool = HostPool(LAYOUT, num_pages=4, pin=False)
    pages = pool.alloc(4)
    assert pages is not None

    def work() -> None:
        for _ in range(2000):
            pool.hold(pages)
            pool.release(pages)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pool.total_holds() == 0
    assert all(pool.hold_count(p) == 0 for p in pages)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pools_default_to_gpu_and_pinned_host() -> None:
    dev = DevicePool(LAYOUT, num_pages=2)
    assert dev.kv.is_cuda
    host = HostPool(LAYOUT, num_pages=2)
    assert host.pinned and host.kv.is_pinned()
    assert host.data_ptr() % HOST_ALIGNMENT == 0
    view = host.page_view(0)
    view[:4] = b"\x01\x02\x03\x04"
    assert host.bytes[:4].tolist() == [1, 2, 3, 4]


def test_alloc_array_hands_out_what_alloc_would_and_never_resizes_the_free_stack() -> None:
    a, b = PageAllocator(300), PageAllocator(300)
    capacity = a._free.buffer_info()  # (address, length): moved or shrunk means copied
    for n in (3, 70, 0, 16):
        got = a.alloc_array(n)
        assert got is not None and got.typecode == "Q"
        assert got.tolist() == b.alloc(n)
    a.free(list(range(3, 73)))  # a batch of arrays' pages, handed back as a list
    b.free(list(range(3, 73)))
    assert a.alloc_array(5) == b.alloc_array(5)  # freed pages come back first, in order
    assert a.alloc_array(300) is None and a.available == b.available
    assert a._free.buffer_info() == capacity
    pool = HostPool(LAYOUT, 4, pin=False)
    pages = pool.alloc_array(3)
    assert pages is not None and list(pages) == [0, 1, 2]
    pool.free(pages)  # an array goes back like a list
    assert pool.available == 4
