"""KV page content derived from the tokens a page holds, so a replay can verify every page it
gets back from a lower tier.

The content of a page is a pure function of its chained content hash (which covers its tokens
and every token before it): 64-bit words ``(i * 2654435761 + lo) ^ hi`` where ``lo`` and ``hi``
are 31-bit slices of the hash. Two different pages collide only if 62 bits of their hashes do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hicache.pools import DevicePool, KVLayout

__all__ = ["PageContent"]

_MULT = 2654435761
_MASK31 = (1 << 31) - 1


class PageContent:
    """Fills device pages with their expected content and checks pages against it."""

    def __init__(self, layout: KVLayout) -> None:
        if layout.page_bytes % 8:
            raise ValueError(f"page_bytes must be a multiple of 8, got {layout.page_bytes}")
        self.layout = layout
        self._words = torch.arange(layout.page_bytes // 8, dtype=torch.int64) * _MULT

    def expected(self, hashes: Sequence[bytes]) -> torch.Tensor:
        """The pages of ``hashes`` as a ``(n, page_bytes)`` uint8 tensor."""
        lo = torch.tensor([int.from_bytes(h[:4], "little") & _MASK31 for h in hashes])
        hi = torch.tensor([int.from_bytes(h[4:8], "little") & _MASK31 for h in hashes])
        words = (self._words[None, :] + lo[:, None]) ^ hi[:, None]
        return words.view(torch.uint8).reshape(len(hashes), -1)

    def fill(self, pool: DevicePool, pages: Sequence[int], hashes: Sequence[bytes]) -> None:
        """Write the expected content of ``hashes`` into device ``pages``."""
        if not pages:
            return
        data = self.expected(hashes).view(self.layout.dtype)
        data = data.reshape(len(pages), *self.layout.page_shape).to(pool.device)
        index = torch.tensor(list(pages), dtype=torch.int64, device=pool.device)
        pool.kv.index_copy_(pool.page_dim, index, data.movedim(0, pool.page_dim))

    def mismatches(self, pool: DevicePool, pages: Sequence[int], hashes: Sequence[bytes]) -> int:
        """How many of device ``pages`` differ from the content of ``hashes``."""
        if not pages:
            return 0
        index = torch.tensor(list(pages), dtype=torch.int64, device=pool.device)
        got = pool.kv.index_select(pool.page_dim, index).movedim(pool.page_dim, 0).contiguous()
        got_bytes = got.cpu().view(torch.uint8).reshape(len(pages), -1)
        same = (got_bytes == self.expected(hashes)).all(dim=1)
        return int((~same).sum())
