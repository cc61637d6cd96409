"""KV page content derived from the tokens a page holds, so a replay can verify every page it
gets back from a lower tier.

The content of a page is a pure function of its chained content hash (which covers its tokens
and every token before it): 64-bit words ``(i * 2654435761 + lo) ^ hi`` where ``lo`` and ``hi``
are 31-bit slices of the hash. Two different pages collide only if 62 bits of their hashes do.

A replay fills and checks a handful of small pages per request, so the cost is the number of
array operations, not the bytes: the words of a batch are built in one numpy pass over
precomputed ``i * 2654435761``, and a CPU device pool is written and read through a numpy view
of its memory, one fancy-index assignment (or gather) for the whole batch. A pool on another
device goes through torch (one host-to-device copy and one ``index_copy_``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hicache.pools import DevicePool, KVLayout
from hicache.transfer import byte_view

__all__ = ["PageContent"]

_MULT = 2654435761
_MASK31 = (1 << 31) - 1
#: A content hash's first 8 bytes hold ``lo`` and ``hi``.
_HEAD = 8


class PageContent:
    """Fills device pages with their expected content and checks pages against it."""

    def __init__(self, layout: KVLayout) -> None:
        if layout.page_bytes % 8:
            raise ValueError(f"page_bytes must be a multiple of 8, got {layout.page_bytes}")
        self.layout = layout
        self._words = np.arange(layout.page_bytes // 8, dtype=np.int64) * _MULT
        # one page as bytes in host layout: page_shape with the last dim counted in bytes
        *lead, last = layout.page_shape
        self._byte_shape = (*lead, last * layout.itemsize)
        #: numpy byte views of CPU device pools' memory, by pool (the pool kept alive with it)
        self._views: dict[int, tuple[DevicePool, np.ndarray]] = {}

    def expected(self, hashes: Sequence[bytes]) -> torch.Tensor:
        """The pages of ``hashes`` as a ``(n, page_bytes)`` uint8 tensor."""
        return torch.from_numpy(self._expected_words(hashes).view(np.uint8))

    def _expected_words(self, hashes: Sequence[bytes]) -> np.ndarray:
        """The pages of ``hashes`` as ``(n, page_bytes // 8)`` int64 words."""
        head = b"".join([h[:_HEAD] for h in hashes])
        lo_hi = np.frombuffer(head, dtype="<u4").reshape(len(hashes), 2).astype(np.int64)
        lo_hi &= _MASK31
        words = self._words[None, :] + lo_hi[:, 0:1]
        words ^= lo_hi[:, 1:2]
        return words

    def _expected_pages(self, hashes: Sequence[bytes]) -> np.ndarray:
        """The pages of ``hashes`` as ``(n, *page_shape)`` bytes (last dim in bytes)."""
        return self._expected_words(hashes).view(np.uint8).reshape(len(hashes), *self._byte_shape)

    def _cpu_view(self, pool: DevicePool) -> np.ndarray | None:
        """``pool.kv`` as a writable numpy byte array over the same memory (CPU pools only)."""
        if pool.kv.device.type != "cpu":
            return None
        entry = self._views.get(id(pool))
        if entry is None or entry[0] is not pool:
            entry = self._views[id(pool)] = (pool, byte_view(pool.kv))
        return entry[1]

    def fill(self, pool: DevicePool, pages: Sequence[int], hashes: Sequence[bytes]) -> None:
        """Write the expected content of ``hashes`` into device ``pages``."""
        if not len(pages):
            return
        data = self._expected_pages(hashes)
        d = pool.page_dim
        view = self._cpu_view(pool)
        if view is not None:
            where = (slice(None),) * d + (np.asarray(pages, dtype=np.intp),)
            view[where] = np.moveaxis(data, 0, d)
            return
        kv = torch.from_numpy(data).view(self.layout.dtype).to(pool.device)
        index = torch.tensor(list(pages), dtype=torch.int64, device=pool.device)
        pool.kv.index_copy_(d, index, kv.movedim(0, d))

    def mismatches(self, pool: DevicePool, pages: Sequence[int], hashes: Sequence[bytes]) -> int:
        """How many of device ``pages`` differ from the content of ``hashes``."""
        n = len(pages)
        if not n:
            return 0
        want = self._expected_pages(hashes)
        d = pool.page_dim
        view = self._cpu_view(pool)
        if view is not None:
            got = view[(slice(None),) * d + (np.asarray(pages, dtype=np.intp),)]
            if np.array_equal(got, np.moveaxis(want, 0, d)):
                return 0  # the usual case: one comparison for the whole batch
            got = np.moveaxis(got, d, 0)
        else:
            index = torch.tensor(list(pages), dtype=torch.int64, device=pool.device)
            pages_major = pool.kv.index_select(d, index).movedim(d, 0).contiguous()
            got = pages_major.cpu().view(torch.uint8).numpy()
        same = (got.reshape(n, -1) == want.reshape(n, -1)).all(axis=1)
        return int(n - np.count_nonzero(same))
