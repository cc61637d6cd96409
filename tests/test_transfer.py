"""Transfer engines: byte-identical L1 <-> L2 round trips, ack ids, manual completion order."""

from __future__ import annotations

from array import array
from collections.abc import Callable

import pytest
import torch

from hicache.pools import DevicePool, HostPool, KVLayout
from hicache.transfer import (
    CpuTransferEngine,
    CudaTransferEngine,
    Direction,
    ManualTransferEngine,
    TransferEngine,
    default_engine,
    page_runs,
)

HAS_CUDA = torch.cuda.is_available()
cuda_only = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"),
]

LAYOUTS = {
    "bf16": KVLayout(3, 2, 4, 2, torch.bfloat16),
    "fp16": KVLayout(2, 3, 8, 4, torch.float16),
    "mla": KVLayout(3, 1, 6, 2, torch.bfloat16, mla=True),
}


def _raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())


def _random_page(layout: KVLayout, gen: torch.Generator) -> torch.Tensor:
    # Random bit patterns, NaNs included: the copy must be byte-exact, not value-exact.
    bits = torch.randint(0, 256, (layout.page_bytes,), dtype=torch.uint8, generator=gen)
    return bits.view(layout.dtype).reshape(layout.page_shape)


def _make(layout: KVLayout, device: str, pin: bool) -> tuple[DevicePool, HostPool]:
    return DevicePool(layout, num_pages=8, device=device), HostPool(layout, num_pages=10, pin=pin)


def _finish(engine: TransferEngine, ack_id: int) -> None:
    if isinstance(engine, ManualTransferEngine):
        engine.complete(ack_id)
    engine.wait(ack_id)


ENGINES: list[object] = [
    pytest.param(CpuTransferEngine, "cpu", id="cpu"),
    pytest.param(ManualTransferEngine, "cpu", id="manual"),
    pytest.param(CudaTransferEngine, "cuda", id="cuda", marks=cuda_only),
]


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize(("engine_cls", "device"), ENGINES)
def test_round_trip_is_byte_identical(
    engine_cls: Callable[[DevicePool, HostPool], TransferEngine], device: str, layout_name: str
) -> None:
    layout = LAYOUTS[layout_name]
    dev, host = _make(layout, device, pin=device == "cuda")
    engine = engine_cls(dev, host)
    gen = torch.Generator().manual_seed(7)
    pages = {p: _random_page(layout, gen) for p in (1, 2, 3, 6)}
    for p, data in pages.items():
        dev.write_page(p, data)
    # Non-consecutive, unordered destinations: several runs in one batch.
    src, dst = [1, 2, 3, 6], [7, 8, 0, 4]
    t1 = engine.submit(Direction.D2H, src, dst)
    _finish(engine, t1)
    assert engine.poll() == [t1]
    for s, d in zip(src, dst, strict=True):
        assert _raw(host.page_tensor(d)) == _raw(pages[s])
    # Back into other device pages, host pages read in yet another order.
    back_src, back_dst = [4, 0, 8, 7], [0, 5, 4, 7]
    t2 = engine.submit(Direction.H2D, back_src, back_dst)
    _finish(engine, t2)
    assert engine.poll() == [t2]
    host_to_dev = dict(zip(dst, src, strict=True))
    for hs, dd in zip(back_src, back_dst, strict=True):
        assert _raw(dev.read_page(dd)) == _raw(pages[host_to_dev[hs]])
    # Pages not involved are untouched.
    assert torch.count_nonzero(dev.read_page(2).view(torch.uint8)) > 0
    assert _raw(dev.read_page(2)) == _raw(pages[2])
    assert engine.poll() == []
    assert engine.in_flight() == 0


@pytest.mark.parametrize(("engine_cls", "device"), ENGINES)
def test_empty_batch_completes(
    engine_cls: Callable[[DevicePool, HostPool], TransferEngine], device: str
) -> None:
    dev, host = _make(LAYOUTS["bf16"], device, pin=device == "cuda")
    engine = engine_cls(dev, host)
    t = engine.submit(Direction.D2H, [], [])
    _finish(engine, t)
    assert engine.poll() == [t]


def test_cpu_engine_tickets_and_wait() -> None:
    dev, host = _make(LAYOUTS["fp16"], "cpu", pin=False)
    engine = CpuTransferEngine(dev, host)
    t1 = engine.submit(Direction.D2H, [0], [0])
    t2 = engine.submit(Direction.D2H, [1], [1])
    assert t2 > t1 > 0
    engine.wait(t2)
    assert engine.poll() == [t1, t2]
    assert engine.poll() == []
    engine.wait(t1)  # already reported: returns at once
    with pytest.raises(ValueError, match="ack id 99"):
        engine.wait(99)


def test_manual_engine_copies_only_on_complete_in_any_order() -> None:
    layout = LAYOUTS["bf16"]
    dev, host = _make(layout, "cpu", pin=False)
    host.kv.zero_()
    engine = ManualTransferEngine(dev, host)
    gen = torch.Generator().manual_seed(1)
    a, b = _random_page(layout, gen), _random_page(layout, gen)
    dev.write_page(0, a)
    dev.write_page(1, b)
    t1 = engine.submit(Direction.D2H, [0], [3])
    t2 = engine.submit(Direction.D2H, [1], [4])
    assert engine.pending() == [t1, t2]
    assert engine.job(t2) == (Direction.D2H, [1], [4])
    assert engine.poll() == []
    assert torch.count_nonzero(host.page_tensor(3).view(torch.uint8)) == 0
    # The second copy completes first.
    engine.complete(t2)
    assert engine.pending() == [t1]
    assert _raw(host.page_tensor(4)) == _raw(b)
    assert torch.count_nonzero(host.page_tensor(3).view(torch.uint8)) == 0
    assert engine.poll() == [t2]
    # The copy reads the source when it completes, as a real asynchronous copy may.
    c = _random_page(layout, gen)
    dev.write_page(0, c)
    engine.complete(t1)
    assert _raw(host.page_tensor(3)) == _raw(c)
    assert engine.poll() == [t1]
    with pytest.raises(ValueError, match=f"ack id {t1} is not pending"):
        engine.complete(t1)
    assert engine.in_flight() == 0


def test_manual_engine_wait_completes_and_complete_all() -> None:
    dev, host = _make(LAYOUTS["mla"], "cpu", pin=False)
    engine = ManualTransferEngine(dev, host)
    ack_ids = [engine.submit(Direction.H2D, [i], [i]) for i in range(3)]
    engine.wait(ack_ids[1])
    assert engine.pending() == [ack_ids[0], ack_ids[2]]
    assert engine.complete_all() == [ack_ids[0], ack_ids[2]]
    assert engine.poll() == ack_ids
    assert engine.pending() == []


def test_submit_validates_pages() -> None:
    dev, host = _make(LAYOUTS["bf16"], "cpu", pin=False)
    engine = CpuTransferEngine(dev, host)
    with pytest.raises(ValueError, match="2 source pages but 1"):
        engine.submit(Direction.D2H, [0, 1], [0])
    with pytest.raises(ValueError, match="source device page 8"):
        engine.submit(Direction.D2H, [8], [0])
    with pytest.raises(ValueError, match="destination device page 9"):
        engine.submit(Direction.H2D, [9], [9])
    with pytest.raises(ValueError, match="destination host page 3 is listed twice"):
        engine.submit(Direction.D2H, [0, 1], [3, 3])
    with pytest.raises(ValueError, match="direction"):
        engine.submit("d2h", [0], [0])  # type: ignore[arg-type]
    assert engine.in_flight() == 0 and engine.poll() == []
    with pytest.raises(ValueError, match="layout"):
        CpuTransferEngine(dev, HostPool(LAYOUTS["fp16"], 2, pin=False))


@pytest.mark.parametrize(("engine_cls", "device"), ENGINES)
def test_integer_arrays_copy_the_same_pages_as_lists(
    engine_cls: Callable[[DevicePool, HostPool], TransferEngine], device: str
) -> None:
    """The cache hands its nodes' page arrays over as they are (no list of ints made)."""
    layout = LAYOUTS["fp16"]
    dev, host = _make(layout, device, pin=device == "cuda")
    engine = engine_cls(dev, host)
    gen = torch.Generator().manual_seed(3)
    pages = {p: _random_page(layout, gen) for p in (2, 5, 6)}
    for p, data in pages.items():
        dev.write_page(p, data)
    ack = engine.submit(Direction.D2H, array("i", [2, 5, 6]), array("Q", [9, 1, 2]))
    _finish(engine, ack)
    for s, d in ((2, 9), (5, 1), (6, 2)):
        assert _raw(host.page_tensor(d)) == _raw(pages[s])
    ack = engine.submit(Direction.H2D, array("Q", [1]), array("q", [0]))
    _finish(engine, ack)
    assert _raw(dev.read_page(0)) == _raw(pages[5])
    with pytest.raises(ValueError, match="source device page 8"):
        engine.submit(Direction.D2H, array("q", [8]), array("Q", [0]))
    with pytest.raises(ValueError, match="source device page -1"):
        engine.submit(Direction.D2H, array("q", [-1]), array("Q", [0]))
    with pytest.raises(ValueError, match="destination host page 3 is listed twice"):
        engine.submit(Direction.D2H, array("i", [0, 1]), array("Q", [3, 3]))


def test_page_runs() -> None:
    assert page_runs([]) == []
    assert page_runs([3, 4, 5]) == [(0, 3, 3)]
    assert page_runs([7, 8, 0, 4, 5]) == [(0, 7, 2), (2, 0, 1), (3, 4, 2)]
    assert page_runs([2, 1]) == [(0, 2, 1), (1, 1, 1)]


def test_default_engine_on_cpu() -> None:
    dev, host = _make(LAYOUTS["bf16"], "cpu", pin=False)
    assert isinstance(default_engine(dev, host), CpuTransferEngine)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_engine_orders_after_compute_stream_and_many_tickets() -> None:
    layout = KVLayout(4, 2, 16, 8, torch.bfloat16)
    dev = DevicePool(layout, num_pages=64)
    host = HostPool(layout, num_pages=64)
    assert dev.kv.is_cuda and host.kv.is_pinned()
    engine = CudaTransferEngine(dev, host)
    assert isinstance(default_engine(dev, host), CudaTransferEngine)
    ack_ids = []
    for i in range(8):
        # Written by a kernel on the compute stream right before the submit: the engine's
        # stream must wait for it.
        dev.kv.select(dev.page_dim, i).fill_(float(i + 1))
        ack_ids.append(engine.submit(Direction.D2H, [i], [63 - i]))
    seen: list[int] = []
    while len(seen) < len(ack_ids):
        seen += engine.poll()
        torch.cuda.synchronize()
    assert sorted(seen) == ack_ids
    for i in range(8):
        assert bool((host.page_tensor(63 - i).float() == i + 1).all())
    # H2D, consumed through stream_wait rather than a host-side wait.
    t = engine.submit(Direction.H2D, list(range(56, 64)), list(range(8, 16)))
    engine.stream_wait(t)
    got = dev.kv.movedim(dev.page_dim, 0)[8:16].float().flatten(1).mean(1).cpu().tolist()
    assert got == [float(8 - j) for j in range(8)]
    engine.close()
    assert engine.poll() == [t] and engine.in_flight() == 0


def test_transfer_bench_smoke_on_cpu() -> None:
    from hicache.tools.transfer_bench import run_bench

    report = run_bench(
        LAYOUTS["fp16"], batch_pages=3, iters=1, warmup=0, device=torch.device("cpu")
    )
    assert report["bytes_verified"] is True
    assert report["engine"] == "CpuTransferEngine"
    figures = report["gb_per_s"]
    assert isinstance(figures, dict)
    assert {"d2h_raw", "h2d_raw", "d2h_engine", "h2d_engine"} <= set(figures)
    assert all(v > 0 for v in figures.values())
