"""KV page content derived from the tokens a page holds, so a replay can verify every page it
gets back from a lower tier.

The content of a page is a pure function of its chained content hash (which covers its tokens
and every token before it): word ``i`` of the page (in host layout) is ``(i * 2654435761) ^ c``,
truncated to the word, where ``c`` is the hash's first bytes, little-endian. Words are 8 bytes
(so two different pages collide only if 64 bits of their hashes do) unless a page's rows in
the device pool (the bytes one layer keeps contiguous per page: ``page_size * heads * head_dim
* itemsize``) are not a multiple of 8: then words are the largest of 4, 2 or 1 bytes that
divides them. A page of another block, a stale page, a torn page (rows of two pages) or a page
whose rows moved all differ from it.

A replay fills and checks a handful of small pages per request, on the serving thread, so the
cost is the number of array operations and the bytes they write: the words of a batch are built
by one XOR of the precomputed ``i * 2654435761`` with the pages' ``c``, directly in the device
pool's layout (rows by layer, then page), so a fill is that XOR and one scatter, and a check is
one gather, that XOR and one comparison. A pool on another device goes through torch (one
host-to-device copy and one ``index_copy_``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hicache.keys import HASH_LEN
from hicache.pools import DevicePool, KVLayout
from hicache.transfer import device_rows

__all__ = ["PageContent"]

_MULT = 2654435761
#: Unsigned word types by width.
_WORDS: dict[int, np.dtype[np.unsignedinteger]] = {
    8: np.dtype("<u8"),
    4: np.dtype("<u4"),
    2: np.dtype("<u2"),
    1: np.dtype("u1"),
}


class PageContent:
    """Fills device pages with their expected content and checks pages against it."""

    def __init__(self, layout: KVLayout) -> None:
        if layout.page_bytes % 8:
            raise ValueError(f"page_bytes must be a multiple of 8, got {layout.page_bytes}")
        self.layout = layout
        # a page in a device pool is ``lead`` rows of ``row`` bytes (one per K/V and layer)
        row = layout.page_size * layout.num_kv_heads * layout.head_dim * layout.itemsize
        self._lead = layout.page_bytes // row
        width = next(w for w in (8, 4, 2, 1) if row % w == 0)
        self._word = _WORDS[width]
        self._row_words = row // width
        i = np.arange(layout.page_bytes // width, dtype=np.uint64) * np.uint64(_MULT)
        #: ``i * 2654435761`` of a page's words in device order: (lead, 1, words per row)
        self._grid = i.astype(self._word).reshape(self._lead, 1, self._row_words)
        #: numpy row views of CPU device pools' memory (None for a pool on another device), by
        #: pool (the pool kept alive with it)
        self._views: dict[int, tuple[DevicePool, np.ndarray | None]] = {}
        #: the words a fill or check builds, reused (grown as needed): ``(lead, pages, words per
        #: row)``, of which a call uses the first pages
        self._scratch = np.empty((self._lead, 0, self._row_words), dtype=self._word)

    def expected(self, hashes: Sequence[bytes]) -> torch.Tensor:
        """The pages of ``hashes`` as a ``(n, page_bytes)`` uint8 tensor (host layout)."""
        rows = self._expected_rows(hashes).view(np.uint8)
        pages = rows.transpose(1, 0, 2).reshape(len(hashes), self.layout.page_bytes)
        return torch.from_numpy(np.ascontiguousarray(pages))

    def _expected_rows(self, hashes: Sequence[bytes], *, scratch: bool = False) -> np.ndarray:
        """The pages of ``hashes`` in device order: ``(lead, n, words per row)`` words; with
        ``scratch``, in the reused buffer (valid until the next call: for a fill or check)."""
        w = self._word.itemsize
        n = len(hashes)
        joined = b"".join(hashes)
        if len(joined) == HASH_LEN * n:
            # every hash's first word, read in place: no slice per hash
            c = np.frombuffer(joined, dtype=self._word)[:: HASH_LEN // w]
        else:
            c = np.frombuffer(b"".join([h[:w] for h in hashes]), dtype=self._word)
        if not scratch:
            rows: np.ndarray = np.bitwise_xor(self._grid, c[:, None])
            return rows
        if self._scratch.shape[1] < n:
            self._scratch = np.empty((self._lead, n, self._row_words), dtype=self._word)
        out = self._scratch[:, :n]
        np.bitwise_xor(self._grid, c[:, None], out=out)
        return out

    def _rows(self, pool: DevicePool) -> np.ndarray | None:
        """``pool.kv`` as writable ``(lead, num_pages, words per row)`` words over the same
        memory (CPU pools only, else None), made once per pool."""
        entry = self._views.get(id(pool))
        if entry is None or entry[0] is not pool:
            rows = None
            if pool.kv.device.type == "cpu":
                rows = device_rows(pool.kv, pool.page_dim).view(self._word)
            entry = self._views[id(pool)] = (pool, rows)
        return entry[1]

    def _torch_rows(self, pool: DevicePool) -> torch.Tensor:
        """``pool.kv`` as ``(lead, num_pages, row bytes)`` uint8 over the same memory (``view``
        raises where ``reshape`` would quietly copy, and a fill would then be lost)."""
        return pool.kv.view(torch.uint8).view(self._lead, pool.num_pages, -1)

    def fill(self, pool: DevicePool, pages: Sequence[int], hashes: Sequence[bytes]) -> None:
        """Write the expected content of ``hashes`` into device ``pages``."""
        if not len(pages):
            return
        if len(pages) != len(hashes):
            raise ValueError(f"{len(pages)} pages but {len(hashes)} hashes")
        rows = self._rows(pool)
        if rows is not None:
            rows[:, np.asarray(pages, dtype=np.intp)] = self._expected_rows(hashes, scratch=True)
            return
        want = self._expected_rows(hashes)
        data = torch.from_numpy(want.view(np.uint8)).to(pool.device)
        index = torch.tensor(list(pages), dtype=torch.int64, device=pool.device)
        self._torch_rows(pool).index_copy_(1, index, data)

    def mismatches(self, pool: DevicePool, pages: Sequence[int], hashes: Sequence[bytes]) -> int:
        """How many of device ``pages`` differ from the content of ``hashes``."""
        n = len(pages)
        if not n:
            return 0
        if n != len(hashes):
            raise ValueError(f"{n} pages but {len(hashes)} hashes")
        want = self._expected_rows(hashes, scratch=True)
        rows = self._rows(pool)
        if rows is not None:
            got = rows[:, np.asarray(pages, dtype=np.intp)]
        else:
            index = torch.tensor(list(pages), dtype=torch.int64, device=pool.device)
            picked = self._torch_rows(pool).index_select(1, index).cpu().numpy()
            got = picked.view(self._word)
        if np.array_equal(got, want):
            return 0  # the usual case: one comparison for the whole batch
        return int(np.count_nonzero((got != want).any(axis=(0, 2))))
