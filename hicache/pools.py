"""Device (L1) and host (L2) KV pools and their page allocators (torch; no pydantic/stevedore).

- ``KVLayout`` - the shape of one model's KV: layers, heads, head dim, page size, dtype, MLA.
- ``PageAllocator`` - a free list of page numbers; double frees and foreign pages raise.
- ``DevicePool`` - L1: KV stored **layer-first**, ``(2, L, num_pages, page_size, H, D)``
  (``(L, num_pages, page_size, H, D)`` for MLA) on ``cuda`` when available, else on the CPU.
- ``HostPool`` - L2: KV stored **page-first**, ``(num_pages, 2, L, page_size, H, D)`` (no ``2``
  for MLA), so one page is one contiguous byte range; the buffer starts 4 KiB aligned and is
  page-locked when CUDA is available. Pages carry **holds** (a refcount that storage I/O takes
  so a page cannot be freed under a worker) and expose a writable, zero-copy ``memoryview``.

Page numbers index pages in their own pool; a device page ``p`` covers the token slots
``[p * page_size, (p + 1) * page_size)`` of the layer-first buffer (``DevicePool.token_slots``).
"""

from __future__ import annotations

import logging
import threading
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from hicache.keys import NamespaceSpec

__all__ = [
    "HOST_ALIGNMENT",
    "DevicePool",
    "HostPool",
    "KVLayout",
    "PageAllocator",
    "default_device",
]

logger = logging.getLogger(__name__)

HOST_ALIGNMENT = 4096
"""Byte alignment of the host pool's first page (and of every page when ``page_bytes`` is a
multiple of it, as it is for any real model): what O_DIRECT reads and writes need."""


def default_device() -> torch.device:
    """``cuda`` when a GPU is usable, else ``cpu`` (tests run that way)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The KV shape of one model (one tensor-parallel rank's share of it).

    For MLA models (``mla=True``) a page holds one latent tensor per layer instead of K and V;
    ``num_kv_heads`` is then usually 1 and ``head_dim`` the latent width (e.g. 576).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype
    mla: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"KVLayout.dtype must be a torch.dtype, got {self.dtype!r}")

    @property
    def kv_parts(self) -> int:
        """2 (K and V) for ordinary attention, 1 for MLA."""
        return 1 if self.mla else 2

    @property
    def page_shape(self) -> tuple[int, ...]:
        """Shape of one host page: ``(2, L, page_size, H, D)``, or ``(L, page_size, H, D)``."""
        inner = (self.num_layers, self.page_size, self.num_kv_heads, self.head_dim)
        return inner if self.mla else (2, *inner)

    @property
    def page_numel(self) -> int:
        """Elements in one page."""
        return self.kv_parts * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim

    @property
    def itemsize(self) -> int:
        """Bytes per element of ``dtype``."""
        return self.dtype.itemsize

    @property
    def page_bytes(self) -> int:
        """Bytes in one page: what a storage backend stores per key."""
        return self.page_numel * self.itemsize

    def namespace_spec(self, *, tp_rank: int = 0, tp_size: int = 1) -> NamespaceSpec:
        """The storage namespace spec of pages in this layout (host layout ``page_first``)."""
        return NamespaceSpec(
            dtype=str(self.dtype).removeprefix("torch."),
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            page_size=self.page_size,
            layout="page_first",
            tp_rank=tp_rank,
            tp_size=tp_size,
            mla=self.mla,
        )


class PageAllocator:
    """A free list over ``num_pages`` page numbers.

    ``alloc`` hands out the lowest free pages first on a fresh allocator (so batches tend to be
    runs of consecutive pages, which the transfer engines copy in one piece). ``free`` checks the
    whole batch before changing anything: a page that is out of range, not allocated (a double
    free) or listed twice raises ``ValueError`` naming it, and nothing is freed.
    Not thread-safe on its own; the pools lock around it.
    """

    __slots__ = ("_allocated", "_flags", "_free", "_stack", "_top", "num_pages")

    def __init__(self, num_pages: int) -> None:
        if num_pages <= 0:
            raise ValueError(f"num_pages must be positive, got {num_pages}")
        self.num_pages = num_pages
        # A stack of fixed capacity, its top at ``_top``: reversed so the first allocations are
        # 0, 1, 2, ... An array, not a list: a list would keep one Python int per free page
        # alive (36 bytes each) and the garbage collector would walk all of them in every full
        # collection; typecode "Q" because its conversions from and to ints are the fast ones.
        # Never resized: shrinking it on every alloc reallocated (copied) the whole free list.
        self._free = array("Q")
        self._free.frombytes(np.arange(num_pages - 1, -1, -1, dtype=np.uint64).tobytes())
        self._stack = np.frombuffer(self._free, dtype=np.uint64)  # same memory, for batches
        self._top = num_pages
        self._allocated = bytearray(num_pages)
        self._flags = np.frombuffer(self._allocated, dtype=np.uint8)  # same memory, for batches

    @property
    def available(self) -> int:
        """Number of free pages."""
        return self._top

    def is_allocated(self, page: int) -> bool:
        """Whether ``page`` is currently handed out."""
        return 0 <= page < self.num_pages and bool(self._allocated[page])

    def alloc(self, n: int) -> list[int] | None:
        """Return ``n`` free pages, or ``None`` (allocating nothing) if fewer are free."""
        taken = self.alloc_array(n)
        return None if taken is None else taken.tolist()

    def alloc_array(self, n: int) -> array[int] | None:
        """:meth:`alloc` as an ``array('Q')``: no Python int per page (what a tree node keeps)."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        top = self._top
        if n > top:
            return None
        taken = self._free[top - n : top]
        self._top = top - n
        self._mark(taken, 1)
        taken.reverse()
        return taken

    def _mark(self, pages: Sequence[int], flag: int) -> None:
        if len(pages) < _VECTOR_MIN:
            allocated = self._allocated
            for p in pages:
                allocated[p] = flag
        else:  # one numpy scatter instead of a Python loop over many pages (an array: no copy)
            self._flags[np.asarray(pages, dtype=np.uint64)] = flag

    def check_allocated(self, pages: Iterable[int], what: str = "free") -> list[int]:
        """Return ``pages`` as a list after checking each is allocated and listed once."""
        batch = list(pages)
        self._check(batch, what)
        return batch

    def _check(self, batch: Sequence[int], what: str) -> None:
        seen: set[int] = set()
        for p in batch:
            if not isinstance(p, int) or not 0 <= p < self.num_pages:
                raise ValueError(f"cannot {what} page {p!r}: not in [0, {self.num_pages})")
            if not self._allocated[p]:
                raise ValueError(f"cannot {what} page {p}: it is not allocated (double free?)")
            if p in seen:
                raise ValueError(f"cannot {what} page {p}: listed twice in one batch")
            seen.add(p)

    def free(self, pages: Iterable[int]) -> None:
        """Return ``pages`` to the free list (all or nothing; see the class docstring)."""
        # An array('Q') (what alloc_array hands out and a tree node keeps) or a list is checked
        # and marked where it is, then copied once, reversed, onto the stack (so alloc hands
        # the batch back in its order); any other iterable is read into a list first (an
        # iterator can be read only once).
        if isinstance(pages, list) or (isinstance(pages, array) and pages.typecode == "Q"):
            batch: Sequence[int] = pages
        else:
            batch = list(pages)
        self._check(batch, "free")
        self._release(batch)

    def _release(self, batch: Sequence[int]) -> None:
        """:meth:`free` of a batch :meth:`check_allocated` passed already (a list or an
        ``array('Q')``)."""
        n = len(batch)
        if not n:
            return
        top = self._top
        # within capacity: every page is freed once
        if n < _VECTOR_MIN:  # a few pages: numpy's per-call cost is more than the copy's
            self._free[top : top + n] = array("Q", reversed(batch))
            self._mark(batch, 0)
        else:  # converted once (a list), or viewed (an array), for the stack and the flags
            pages_np = np.asarray(batch, dtype=np.uint64)
            self._stack[top : top + n] = pages_np[::-1]
            self._flags[pages_np] = 0
        self._top = top + n


#: Batches of at least this many pages are marked with numpy rather than a Python loop.
_VECTOR_MIN = 64


class DevicePool:
    """L1: the KV pages the attention kernels read, stored layer-first.

    ``kv`` has shape ``(2, L, num_pages, page_size, H, D)`` (``(L, num_pages, page_size, H, D)``
    for MLA); ``token_view`` is the same memory as ``(2, L, num_pages * page_size, H, D)``, the
    per-token-slot layout serving engines index. Thread-safe allocation.
    """

    def __init__(
        self, layout: KVLayout, num_pages: int, device: torch.device | str | None = None
    ) -> None:
        self.layout = layout
        self.num_pages = num_pages
        self.device = torch.device(device) if device is not None else default_device()
        self._lock = threading.Lock()
        self._allocator = PageAllocator(num_pages)
        lead = () if layout.mla else (2,)
        shape = (
            *lead,
            layout.num_layers,
            num_pages,
            layout.page_size,
            layout.num_kv_heads,
            layout.head_dim,
        )
        self.kv = torch.zeros(shape, dtype=layout.dtype, device=self.device)
        logger.debug(
            "device pool: %d pages of %d bytes on %s", num_pages, layout.page_bytes, self.device
        )

    @property
    def page_dim(self) -> int:
        """The dimension of ``kv`` that indexes pages."""
        return 1 if self.layout.mla else 2

    @property
    def token_view(self) -> torch.Tensor:
        """``kv`` per token slot: ``(2, L, num_pages * page_size, H, D)`` (no ``2`` for MLA)."""
        shape = list(self.kv.shape)
        d = self.page_dim
        shape[d : d + 2] = [self.num_pages * self.layout.page_size]
        return self.kv.view(shape)

    @property
    def available(self) -> int:
        """Number of free pages."""
        with self._lock:
            return self._allocator.available

    def alloc(self, n: int) -> list[int] | None:
        """Return ``n`` free pages, or ``None`` if fewer are free."""
        with self._lock:
            return self._allocator.alloc(n)

    def free(self, pages: Iterable[int]) -> None:
        """Free ``pages``; raise ``ValueError`` naming a page that is not allocated."""
        with self._lock:
            self._allocator.free(pages)

    def is_allocated(self, page: int) -> bool:
        """Whether ``page`` is currently handed out."""
        with self._lock:
            return self._allocator.is_allocated(page)

    def token_slots(self, pages: Sequence[int]) -> torch.Tensor:
        """The token-slot indices (int64, on ``device``) covered by ``pages``, in order."""
        ps = self.layout.page_size
        base = torch.as_tensor(list(pages), dtype=torch.int64, device=self.device) * ps
        return (base[:, None] + torch.arange(ps, device=self.device)).reshape(-1)

    def read_page(self, page: int) -> torch.Tensor:
        """A copy of ``page`` in host page layout (``KVLayout.page_shape``), on ``device``."""
        self._check_page(page)
        return self.kv.select(self.page_dim, page).clone()

    def write_page(self, page: int, data: torch.Tensor) -> None:
        """Overwrite ``page`` with ``data`` of shape ``KVLayout.page_shape`` (any device)."""
        self._check_page(page)
        if tuple(data.shape) != self.layout.page_shape:
            raise ValueError(
                f"page data has shape {tuple(data.shape)}, expected {self.layout.page_shape}"
            )
        self.kv.select(self.page_dim, page).copy_(data)

    def _check_page(self, page: int) -> None:
        if not 0 <= page < self.num_pages:
            raise ValueError(f"device page {page} is not in [0, {self.num_pages})")


class HostPool:
    """L2: page-first host KV, one contiguous byte range per page, with per-page holds.

    Layout: ``kv`` is ``(num_pages, *KVLayout.page_shape)``; page ``p`` occupies bytes
    ``[p * page_bytes, (p + 1) * page_bytes)`` of a buffer whose start is ``HOST_ALIGNMENT``
    aligned. ``pin=None`` page-locks the buffer exactly when CUDA is available.

    Holds: ``hold(pages)`` increments a per-page count that storage I/O keeps while a worker
    reads or writes the page; ``release(pages)`` decrements it. ``free`` of a held page raises
    ``ValueError`` (the caller must not give up a page a worker still uses);
    ``free_when_released`` instead frees unheld pages now and held ones at their last release.
    ``total_holds() == 0`` whenever no storage I/O is in flight. Every method is thread-safe.
    """

    def __init__(self, layout: KVLayout, num_pages: int, pin: bool | None = None) -> None:
        self.layout = layout
        self.num_pages = num_pages
        self.pinned = torch.cuda.is_available() if pin is None else pin
        self._lock = threading.Lock()
        self._allocator = PageAllocator(num_pages)
        # per-page counts in an array: a list would be one more num_pages-long list for the
        # garbage collector to walk in every full collection
        self._holds = array("l", bytes(num_pages * array("l").itemsize))
        self._total_holds = 0
        self._deferred: set[int] = set()
        page_bytes = self._page_bytes = layout.page_bytes
        nbytes = num_pages * page_bytes
        # Allocate with slack and slice to an aligned start: torch gives no alignment guarantee
        # beyond the allocator's, and O_DIRECT backends read straight into these pages.
        raw = torch.empty(nbytes + HOST_ALIGNMENT, dtype=torch.uint8, pin_memory=self.pinned)
        offset = -raw.data_ptr() % HOST_ALIGNMENT
        self._raw = raw
        self.bytes = raw[offset : offset + nbytes]
        self.kv = self.bytes.view(layout.dtype).view(num_pages, *layout.page_shape)
        # numpy over the same memory gives writable format-"B" memoryviews; the array keeps a
        # reference to the tensor, so a view handed out keeps the buffer alive.
        self._memview = memoryview(cast(Any, self.bytes.numpy())).cast("B")
        logger.debug(
            "host pool: %d pages of %d bytes, pinned=%s", num_pages, page_bytes, self.pinned
        )

    @property
    def page_bytes(self) -> int:
        """Bytes in one page."""
        return self._page_bytes

    @property
    def available(self) -> int:
        """Number of free pages."""
        with self._lock:
            return self._allocator.available

    def data_ptr(self) -> int:
        """Address of page 0 (``HOST_ALIGNMENT`` aligned)."""
        return int(self.bytes.data_ptr())

    def alloc(self, n: int) -> list[int] | None:
        """Return ``n`` free pages, or ``None`` if fewer are free."""
        with self._lock:
            return self._allocator.alloc(n)

    def alloc_array(self, n: int) -> array[int] | None:
        """:meth:`alloc` as an ``array('Q')``: no Python int per page for the garbage collector
        to walk, 8 bytes a page where a list of ints takes 36 (what a tree node keeps)."""
        with self._lock:
            return self._allocator.alloc_array(n)

    def is_allocated(self, page: int) -> bool:
        """Whether ``page`` is currently handed out (a deferred free still counts)."""
        with self._lock:
            return self._allocator.is_allocated(page)

    def free(self, pages: Iterable[int]) -> None:
        """Free ``pages`` (all or nothing); ``ValueError`` names a double-freed or held page."""
        with self._lock:
            batch = self._allocator.check_allocated(pages)
            self._check_unheld_and_not_deferred(batch)
            self._allocator._release(batch)

    def free_when_released(self, pages: Iterable[int]) -> None:
        """Free unheld ``pages`` now and each held one at its last ``release``."""
        with self._lock:
            batch = self._allocator.check_allocated(pages)
            holds = self._holds
            deferred = self._deferred
            now: list[int] = []
            held: list[int] = []
            # one pass (a page's free is on every L2 eviction's path): nothing changes
            # before every page passed
            for p in batch:
                if p in deferred:
                    raise ValueError(f"cannot free host page {p}: its free is already pending")
                (held if holds[p] else now).append(p)
            deferred.update(held)
            self._allocator._release(now)

    def hold(self, pages: Iterable[int]) -> None:
        """Take one hold on each of ``pages`` (allocated, not pending free)."""
        with self._lock:
            batch = self._allocator.check_allocated(pages, "hold")
            for p in batch:
                if p in self._deferred:
                    raise ValueError(f"cannot hold host page {p}: it is pending free")
            for p in batch:
                self._holds[p] += 1
            self._total_holds += len(batch)

    def release(self, pages: Iterable[int]) -> None:
        """Drop one hold on each of ``pages``; ``ValueError`` names a page without a hold."""
        with self._lock:
            batch = list(pages)
            counts: dict[int, int] = {}
            for p in batch:
                counts[p] = counts.get(p, 0) + 1
                if not 0 <= p < self.num_pages or self._holds[p] < counts[p]:
                    raise ValueError(f"cannot release host page {p}: it holds no (more) hold")
            to_free = []
            for p in batch:
                self._holds[p] -= 1
                if self._holds[p] == 0 and p in self._deferred:
                    self._deferred.discard(p)
                    to_free.append(p)
            self._total_holds -= len(batch)
            if to_free:
                self._allocator.free(to_free)

    def hold_count(self, page: int) -> int:
        """Holds currently on ``page``."""
        with self._lock:
            return self._holds[page]

    def total_holds(self) -> int:
        """Holds on all pages together: 0 when no storage I/O is in flight."""
        with self._lock:
            return self._total_holds

    def pending_frees(self) -> int:
        """Pages freed with ``free_when_released`` that still wait for their last release."""
        with self._lock:
            return len(self._deferred)

    def page_view(self, page: int) -> memoryview:
        """A writable ``uint8`` (format ``B``) memoryview of ``page``'s bytes; no copy.

        This is the buffer handed to storage backends (``put`` sources, ``get_into``
        destinations); hold the page while a worker uses it.
        """
        self._check_page(page)
        start = page * self._page_bytes
        return self._memview[start : start + self._page_bytes]

    def page_views(self, pages: Iterable[int]) -> list[memoryview]:
        """``page_view`` of each of ``pages``, in order."""
        return [self.page_view(p) for p in pages]

    def page_tensor(self, page: int) -> torch.Tensor:
        """``page`` as a tensor view of shape ``KVLayout.page_shape``; no copy."""
        self._check_page(page)
        return self.kv[page]

    def _check_page(self, page: int) -> None:
        if not 0 <= page < self.num_pages:
            raise ValueError(f"host page {page} is not in [0, {self.num_pages})")

    def _check_unheld_and_not_deferred(self, batch: Sequence[int]) -> None:
        for p in batch:
            if self._holds[p]:
                raise ValueError(f"cannot free host page {p}: it has {self._holds[p]} hold(s)")
            if p in self._deferred:
                raise ValueError(f"cannot free host page {p}: its free is already pending")
