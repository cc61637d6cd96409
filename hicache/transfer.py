"""L1 <-> L2 page copies that complete asynchronously, acknowledged by ack id (torch, numpy).

- ``TransferEngine.submit(direction, src_pages, dst_pages)`` - start copying pages between the
  device pool (L1, layer-first) and the host pool (L2, page-first); returns its ack id.
- ``TransferEngine.poll()`` - ack ids that completed since the last poll, without blocking;
  every ack id is reported exactly once, whether or not it was also waited for.
- ``TransferEngine.wait(ack_id)`` - block until ``ack_id`` completed.

Engines:

- ``CudaTransferEngine`` - on a dedicated CUDA stream: one gather kernel packs the pages into a
  contiguous staging buffer, then one asynchronous copy per run of consecutive host pages (one per
  batch when the host allocator handed out a run) moves it to page-locked memory; one CUDA event
  per ack id, so ``poll`` is ``event.query()``. H2D is the mirror image (copy, then one scatter).
- ``CpuTransferEngine`` - copies synchronously inside ``submit``; the ack id is reported by the
  next ``poll``. For machines without a GPU. With a CPU device pool it copies through numpy views
  of both pools' memory: one gather and one scatter per batch, whatever its runs (a batch is a
  handful of small pages, so the count of array operations, each a dispatch and a chance for a
  storage worker to take the GIL, was the cost, not the bytes).
- ``ManualTransferEngine`` - copies only when a test calls ``complete(ack_id)`` (in any order),
  so tests decide exactly when each ack arrives.

Contract for callers: the pages of a submitted copy (source and destination, on both pools) must
stay allocated and unmodified by others until the ack id completes; a D2H destination is
undefined until then. For H2D on CUDA, kernels that read the loaded pages must be ordered after
the ack id (``wait`` it, or ``CudaTransferEngine.stream_wait(ack_id)`` on the consumer stream).
"""

from __future__ import annotations

import logging
import math
import threading
from abc import ABC, abstractmethod
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch

from hicache.packed_tokens import INT_TYPECODES
from hicache.pools import DevicePool, HostPool

__all__ = [
    "CpuTransferEngine",
    "CudaTransferEngine",
    "Direction",
    "ManualTransferEngine",
    "TransferEngine",
    "byte_view",
    "default_engine",
    "device_rows",
    "page_runs",
]

logger = logging.getLogger(__name__)


class Direction(Enum):
    """Which way pages move."""

    D2H = "d2h"
    """device pool (L1) -> host pool (L2): a write-through backup."""
    H2D = "h2d"
    """host pool (L2) -> device pool (L1): a load back."""


def page_runs(pages: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split ``pages`` into runs of consecutive page numbers: ``(offset, first_page, length)``."""
    runs: list[tuple[int, int, int]] = []
    i, n = 0, len(pages)
    while i < n:
        j = i + 1
        while j < n and pages[j] == pages[j - 1] + 1:
            j += 1
        runs.append((i, pages[i], j - i))
        i = j
    return runs


def _pages(pages: Sequence[int]) -> Sequence[int]:
    """``pages`` as the engines take them: an integer ``array`` as it is (the cache hands its
    nodes' arrays: converting them made an int object per page), anything else as a list."""
    if type(pages) is array and pages.typecode in INT_TYPECODES:
        return pages
    return _page_list(pages)


def _page_list(pages: Sequence[int]) -> list[int]:
    """``pages`` as a new list of ints. ``array('q')`` converts in one C loop (a write-through
    submits a node's pages on every insert: ``int()`` per page was a tenth of a served insert);
    anything it refuses (a float, a string, an int beyond int64) goes through ``int()``, which
    raises, or converts, as before."""
    try:
        return array("q", pages).tolist()
    except (TypeError, OverflowError):
        return [int(p) for p in pages]


def _ints(pages: Sequence[int]) -> Sequence[int]:
    """``pages`` as ``torch.tensor`` reads them: a list as it is (``_pages`` already made it a
    new list; copying it again was a second pass per page), an array in one C loop."""
    if type(pages) is list:
        return pages
    return pages.tolist() if type(pages) is array else list(pages)


def _index(pages: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(_ints(pages), dtype=torch.int64, device=device)


def copy_pages_sync(
    device_pool: DevicePool,
    host_pool: HostPool,
    direction: Direction,
    src_pages: Sequence[int],
    dst_pages: Sequence[int],
) -> None:
    """Copy pages between the pools now, on the calling thread (blocking on any device)."""
    if not src_pages:
        return
    dim = device_pool.page_dim
    if device_pool.kv.device.type == "cpu":
        _copy_cpu(*_cpu_rows(device_pool, host_pool), direction, src_pages, dst_pages)
        return
    dev = device_pool.kv.device
    if direction is Direction.D2H:
        # index_select on the page-major view packs whole pages in host layout in one pass.
        data = device_pool.kv.movedim(dim, 0).index_select(0, _index(src_pages, dev))
        host_pool.kv.index_copy_(0, _index(dst_pages, torch.device("cpu")), data.cpu())
    else:
        data = host_pool.kv.index_select(0, _index(src_pages, torch.device("cpu")))
        device_pool.kv.movedim(dim, 0).index_copy_(0, _index(dst_pages, dev), data.to(dev))


def byte_view(kv: torch.Tensor) -> np.ndarray:
    """A CPU pool's ``kv`` as a writable numpy array of bytes over the same memory (its last
    dimension counted in bytes: numpy has no bfloat16, and a copy needs no element type)."""
    return kv.view(torch.uint8).numpy()


def device_rows(kv: torch.Tensor, page_dim: int) -> np.ndarray:
    """A CPU device pool's ``kv`` (pages along ``page_dim``) as writable numpy bytes over the
    same memory, ``(lead, num_pages, row)``: ``lead`` rows per page (one per K/V and layer), each
    the ``row`` bytes the pool keeps contiguous per page. Three dimensions, not six: numpy's
    indexing then walks whole rows, not every small dimension of a page."""
    b = byte_view(kv)
    return b.reshape(math.prod(b.shape[:page_dim]), b.shape[page_dim], -1)


def _cpu_rows(device_pool: DevicePool, host_pool: HostPool) -> tuple[np.ndarray, np.ndarray]:
    """Both CPU pools as rows: the device pool as :func:`device_rows`, the host pool (pages
    first) as ``(num_pages, lead, row)``, so a host page's rows line up with a device page's."""
    dev = device_rows(device_pool.kv, device_pool.page_dim)
    return dev, byte_view(host_pool.kv).reshape(host_pool.num_pages, dev.shape[0], -1)


def _copy_cpu(
    dev: np.ndarray,
    host: np.ndarray,
    direction: Direction,
    src_pages: Sequence[int],
    dst_pages: Sequence[int],
) -> None:
    """:func:`copy_pages_sync` between the rows of a CPU device pool and of the host pool
    (:func:`_cpu_rows`): one gather and one scatter for the whole batch."""
    src = np.asarray(src_pages, dtype=np.intp)
    dst = np.asarray(dst_pages, dtype=np.intp)
    if direction is Direction.D2H:
        host[dst] = dev[:, src].transpose(1, 0, 2)
    else:
        dev[:, dst] = host[src].transpose(1, 0, 2)


class TransferEngine(ABC):
    """Moves pages between one device pool and one host pool; completion is acknowledged by
    ack id. Ack ids are positive ints, increasing in submission order.

    Notes for implementers: implement ``_start`` (begin one copy) and ``_collect`` (finished
    ack ids, non-blocking) and ``_wait`` (block until one ack id finished); the base class
    validates arguments, numbers ack ids and makes ``poll`` report each ack id once.
    ``_start`` gets the pages as a list of ints or, as the cache hands them, an integer
    ``array`` (validated either way).
    """

    def __init__(self, device_pool: DevicePool, host_pool: HostPool) -> None:
        if device_pool.layout != host_pool.layout:
            raise ValueError(
                f"device and host pools differ in layout: {device_pool.layout} vs "
                f"{host_pool.layout}"
            )
        self.device_pool = device_pool
        self.host_pool = host_pool
        self._lock = threading.Lock()
        self._next_ack_id = 1
        self._pending: set[int] = set()
        self._finished: list[int] = []  # completed, not yet reported by poll

    def submit(
        self, direction: Direction, src_pages: Sequence[int], dst_pages: Sequence[int]
    ) -> int:
        """Start copying ``src_pages[i]`` to ``dst_pages[i]``; return its ack id."""
        src, dst = self._validate(direction, src_pages, dst_pages)
        with self._lock:
            ack_id = self._next_ack_id
            self._next_ack_id += 1
            self._pending.add(ack_id)
        self._start(ack_id, direction, src, dst)
        return ack_id

    def poll(self) -> list[int]:
        """Ack ids completed since the last ``poll``, in ack id order; never blocks."""
        done = self._collect()
        with self._lock:
            for t in done:
                if t in self._pending:
                    self._pending.discard(t)
                    self._finished.append(t)
            out, self._finished = sorted(self._finished), []
        return out

    def wait(self, ack_id: int) -> None:
        """Block until ``ack_id`` completed (it is still reported by the next ``poll``)."""
        with self._lock:
            if not 0 < ack_id < self._next_ack_id:
                raise ValueError(f"unknown transfer ack id {ack_id}")
            if ack_id not in self._pending:
                return
        self._wait(ack_id)
        with self._lock:
            if ack_id in self._pending:
                self._pending.discard(ack_id)
                self._finished.append(ack_id)

    def in_flight(self) -> int:
        """Ack ids submitted and not yet completed."""
        with self._lock:
            return len(self._pending)

    def close(self) -> None:
        """Wait for every copy in flight (their ack ids are still reported by ``poll``)."""
        with self._lock:
            pending = sorted(self._pending)
        for t in pending:
            self.wait(t)

    @abstractmethod
    def _start(
        self, ack_id: int, direction: Direction, src: Sequence[int], dst: Sequence[int]
    ) -> None: ...

    @abstractmethod
    def _collect(self) -> list[int]: ...

    @abstractmethod
    def _wait(self, ack_id: int) -> None: ...

    def _validate(
        self, direction: Direction, src_pages: Sequence[int], dst_pages: Sequence[int]
    ) -> tuple[Sequence[int], Sequence[int]]:
        if not isinstance(direction, Direction):
            raise ValueError(f"direction must be a Direction, got {direction!r}")
        src, dst = _pages(src_pages), _pages(dst_pages)
        if len(src) != len(dst):
            raise ValueError(f"{len(src)} source pages but {len(dst)} destination pages")
        if direction is Direction.D2H:
            src_n, dst_n = self.device_pool.num_pages, self.host_pool.num_pages
            src_name, dst_name = "device", "host"
        else:
            src_n, dst_n = self.host_pool.num_pages, self.device_pool.num_pages
            src_name, dst_name = "host", "device"
        # min, max and set run in C; the per-page loops below only find the page to name
        if src and (min(src) < 0 or max(src) >= src_n):
            for p in src:
                if not 0 <= p < src_n:
                    raise ValueError(f"source {src_name} page {p} is not in [0, {src_n})")
        if dst and (min(dst) < 0 or max(dst) >= dst_n or len(set(dst)) != len(dst)):
            seen: set[int] = set()
            for p in dst:
                if not 0 <= p < dst_n:
                    raise ValueError(f"destination {dst_name} page {p} is not in [0, {dst_n})")
                if p in seen:
                    raise ValueError(f"destination {dst_name} page {p} is listed twice")
                seen.add(p)
        return src, dst


class CpuTransferEngine(TransferEngine):
    """Copies synchronously inside ``submit``; the next ``poll`` reports the ack id.

    Works with a device pool on any device (a CUDA pool is copied through blocking copies).
    """

    def __init__(self, device_pool: DevicePool, host_pool: HostPool) -> None:
        super().__init__(device_pool, host_pool)
        self._done: list[int] = []
        # the pools' memory as numpy bytes, made once: a copy is then two numpy operations
        self._views = (
            _cpu_rows(device_pool, host_pool) if device_pool.kv.device.type == "cpu" else None
        )

    def _start(
        self, ack_id: int, direction: Direction, src: Sequence[int], dst: Sequence[int]
    ) -> None:
        if self._views is None:
            copy_pages_sync(self.device_pool, self.host_pool, direction, src, dst)
        elif src:
            _copy_cpu(*self._views, direction, src, dst)
        with self._lock:
            self._done.append(ack_id)

    def _collect(self) -> list[int]:
        with self._lock:
            done, self._done = self._done, []
        return done

    def _wait(self, ack_id: int) -> None:
        return  # already copied in submit


@dataclass(slots=True)
class _ManualJob:
    direction: Direction
    src: Sequence[int]
    dst: Sequence[int]


class ManualTransferEngine(TransferEngine):
    """Copies nothing until the test calls ``complete(ack_id)``; any order is allowed.

    ``wait(ack_id)`` completes a pending ack id on the spot (as if the copy had just finished),
    so code paths that must block on a load back still work under this engine.
    """

    def __init__(self, device_pool: DevicePool, host_pool: HostPool) -> None:
        super().__init__(device_pool, host_pool)
        self._jobs: dict[int, _ManualJob] = {}
        self._done: list[int] = []

    def pending(self) -> list[int]:
        """Ack ids submitted and not yet completed, in submission order."""
        with self._lock:
            return list(self._jobs)

    def job(self, ack_id: int) -> tuple[Direction, list[int], list[int]]:
        """What pending ``ack_id`` will copy: ``(direction, src_pages, dst_pages)``."""
        with self._lock:
            j = self._jobs.get(ack_id)
        if j is None:
            raise ValueError(f"transfer ack id {ack_id} is not pending")
        return j.direction, list(j.src), list(j.dst)

    def complete(self, ack_id: int) -> None:
        """Perform pending ``ack_id``'s copy now; the next ``poll`` reports it."""
        with self._lock:
            j = self._jobs.pop(ack_id, None)
        if j is None:
            raise ValueError(f"transfer ack id {ack_id} is not pending")
        copy_pages_sync(self.device_pool, self.host_pool, j.direction, j.src, j.dst)
        with self._lock:
            self._done.append(ack_id)

    def complete_all(self) -> list[int]:
        """Complete every pending ack id in submission order; return them."""
        ack_ids = self.pending()
        for t in ack_ids:
            self.complete(t)
        return ack_ids

    def _start(
        self, ack_id: int, direction: Direction, src: Sequence[int], dst: Sequence[int]
    ) -> None:
        with self._lock:
            self._jobs[ack_id] = _ManualJob(direction, src, dst)

    def _collect(self) -> list[int]:
        with self._lock:
            done, self._done = self._done, []
        return done

    def _wait(self, ack_id: int) -> None:
        with self._lock:
            pending = ack_id in self._jobs
        if pending:
            self.complete(ack_id)


@dataclass(slots=True)
class _CudaJob:
    event: torch.cuda.Event
    # Tensors the queued kernels and copies still use: kept alive until the event fired.
    keep: list[torch.Tensor] = field(default_factory=list)


class CudaTransferEngine(TransferEngine):
    """Asynchronous copies on a dedicated CUDA stream, one CUDA event per ack id.

    D2H: ``index_select`` gathers the pages (page-major, host layout) into a contiguous device
    staging buffer, then one ``non_blocking`` copy per run of consecutive destination host pages
    moves it into page-locked memory. H2D: one ``non_blocking`` copy per run of consecutive source
    host pages into a device staging buffer, then one ``index_copy_`` scatters it into the
    layer-first pool. Each batch first waits for the stream that was current at ``submit`` (the
    compute stream), so KV written by earlier kernels is what gets copied.
    """

    def __init__(
        self,
        device_pool: DevicePool,
        host_pool: HostPool,
        stream: torch.cuda.Stream | None = None,
    ) -> None:
        super().__init__(device_pool, host_pool)
        if not device_pool.kv.is_cuda:
            raise ValueError(
                f"CudaTransferEngine needs a CUDA device pool, got {device_pool.device}"
            )
        if not host_pool.kv.is_pinned():
            # Still correct, but non_blocking copies from pageable memory are synchronous.
            logger.warning("host pool is not page-locked: CUDA copies will not overlap compute")
        self.device = device_pool.kv.device
        if stream is None:
            stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        self.stream = stream
        self._jobs: dict[int, _CudaJob] = {}

    def stream_wait(self, ack_id: int, stream: torch.cuda.Stream | None = None) -> None:
        """Order later work on ``stream`` (default: the current one) after ``ack_id``, no block."""
        with self._lock:
            job = self._jobs.get(ack_id)
        if job is not None:
            (stream or torch.cuda.current_stream(self.device)).wait_event(job.event)

    def _indices(self, pages: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        host = torch.tensor(_ints(pages), dtype=torch.int64, pin_memory=True)
        return host, host.to(self.device, non_blocking=True)

    def _start(
        self, ack_id: int, direction: Direction, src: Sequence[int], dst: Sequence[int]
    ) -> None:
        producer = torch.cuda.current_stream(self.device)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        keep: list[torch.Tensor] = []
        layout = self.device_pool.layout
        pages_major = self.device_pool.kv.movedim(self.device_pool.page_dim, 0)
        host_kv = self.host_pool.kv
        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(producer)
            if src and direction is Direction.D2H:
                idx_host, idx_dev = self._indices(src)
                staging = pages_major.index_select(0, idx_dev)
                for off, first, n in page_runs(dst):
                    host_kv[first : first + n].copy_(staging[off : off + n], non_blocking=True)
                keep += [idx_host, idx_dev, staging]
            elif src:
                staging = torch.empty(
                    (len(src), *layout.page_shape), dtype=layout.dtype, device=self.device
                )
                for off, first, n in page_runs(src):
                    staging[off : off + n].copy_(host_kv[first : first + n], non_blocking=True)
                idx_host, idx_dev = self._indices(dst)
                pages_major.index_copy_(0, idx_dev, staging)
                keep += [idx_host, idx_dev, staging]
            event.record(self.stream)
        with self._lock:
            self._jobs[ack_id] = _CudaJob(event, keep)

    def _collect(self) -> list[int]:
        with self._lock:
            jobs = list(self._jobs.items())
        done = [t for t, job in jobs if job.event.query()]  # type: ignore[no-untyped-call]
        with self._lock:
            for t in done:
                self._jobs.pop(t, None)
        return done

    def _wait(self, ack_id: int) -> None:
        with self._lock:
            job = self._jobs.get(ack_id)
        if job is not None:
            job.event.synchronize()
            with self._lock:
                self._jobs.pop(ack_id, None)


def default_engine(device_pool: DevicePool, host_pool: HostPool) -> TransferEngine:
    """``CudaTransferEngine`` for a CUDA device pool, else ``CpuTransferEngine``."""
    if device_pool.kv.is_cuda:
        return CudaTransferEngine(device_pool, host_pool)
    return CpuTransferEngine(device_pool, host_pool)
