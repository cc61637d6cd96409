"""A CPU host pool shaped like SGLang's page-first host pools, for the adapter's tests and bench.

SGLang's own host pool classes cannot be imported without a GPU stack (their module pulls in
Triton kernels at import time), so this pool lays out its buffer the way
``MHATokenToKVPoolHost`` / ``MLATokenToKVPoolHost`` do for ``page_first`` and answers
``get_page_buffer_meta`` with its own arithmetic. ``tests/test_sglang_adapter.py`` checks that
arithmetic against SGLang's real method, run on this very object.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["PageFirstHostPool", "host_indices", "page_keys"]


class PageFirstHostPool:
    """``kv_buffer`` of ``(2, size, layers, heads, head_dim)`` (MHA) or ``(size, layers, 1,
    kv_cache_dim)`` (MLA): page ``p``'s K (and V) region is one contiguous byte range."""

    def __init__(
        self,
        *,
        pages: int,
        page_size: int,
        layer_num: int,
        head_num: int = 0,
        head_dim: int = 0,
        kv_cache_dim: int = 0,
        dtype: torch.dtype = torch.bfloat16,
        layout: str = "page_first",
        mla: bool = False,
    ) -> None:
        self.page_size = page_size
        self.size = pages * page_size
        self.layer_num = layer_num
        self.dtype = dtype
        self.layout = layout
        self.mla = mla
        # The attributes SGLang's MLA pool reads in get_page_buffer_meta (no DCP here).
        self.dcp_size = 1
        self.logical_page_size = page_size
        if mla:
            self.kv_cache_dim = kv_cache_dim
            dims: tuple[int, ...] = (self.size, layer_num, 1, kv_cache_dim)
        else:
            self.head_num = head_num
            self.head_dim = head_dim
            dims = (2, self.size, layer_num, head_num, head_dim)
        self.kv_buffer = torch.zeros(dims, dtype=dtype)

    def _storage_page_index(self, index: int) -> int:
        return index

    @property
    def region_bytes(self) -> int:
        per_token = self.kv_cache_dim if self.mla else self.head_num * self.head_dim
        return self.layer_num * self.page_size * per_token * self.dtype.itemsize

    def get_page_buffer_meta(self, indices: torch.Tensor) -> tuple[list[int], list[int]]:
        """Pointers and sizes of each page's regions: K then V (MHA), or the one latent region."""
        assert len(indices) % self.page_size == 0
        base = self.kv_buffer.data_ptr()
        token_bytes = self.region_bytes // self.page_size
        v_offset = self.size * token_bytes
        ptrs: list[int] = []
        for start in indices.tolist()[:: self.page_size]:
            k_ptr = base + start * token_bytes
            ptrs += [k_ptr] if self.mla else [k_ptr, k_ptr + v_offset]
        return ptrs, [self.region_bytes] * len(ptrs)

    def page_bytes_of(self, page: int) -> bytes:
        """The stored bytes of host page ``page``: its K region then its V region."""
        start, end = page * self.page_size, (page + 1) * self.page_size
        if self.mla:
            return self.kv_buffer[start:end].contiguous().view(torch.uint8).numpy().tobytes()
        k = self.kv_buffer[0, start:end].contiguous().view(torch.uint8).numpy().tobytes()
        v = self.kv_buffer[1, start:end].contiguous().view(torch.uint8).numpy().tobytes()
        return k + v

    def fill(self, page: int, seed: int) -> None:
        """Fill host page ``page`` with bytes derived from ``seed`` (K and V differ)."""
        start, end = page * self.page_size, (page + 1) * self.page_size
        gen = torch.Generator().manual_seed(seed)
        view = self.kv_buffer[start:end] if self.mla else self.kv_buffer[:, start:end]
        noise = torch.randint(0, 256, (*view.shape, self.dtype.itemsize), generator=gen)
        view.copy_(noise.to(torch.uint8).view(self.dtype).squeeze(-1))


def host_indices(pool: PageFirstHostPool, pages: list[int]) -> torch.Tensor:
    """SGLang's ``host_indices`` for whole pages: every token index of each page, in order."""
    return torch.cat(
        [torch.arange(p * pool.page_size, (p + 1) * pool.page_size) for p in pages]
    ).to(torch.int64)


def page_keys(count: int, salt: str = "") -> list[str]:
    """SGLang-style page keys: a SHA-256 chain over (made-up) token pages, as 64 hex chars."""
    keys, prev = [], b""
    for i in range(count):
        prev = hashlib.sha256(prev + f"{salt}:{i}".encode()).digest()
        keys.append(prev.hex())
    return keys
