"""TEST-ONLY: vLLM's ``TieringOffloadingSpec`` with the device <-> primary copy done by torch
slicing, so the stock tiering runs on vLLM's CPU platform.

Stock vLLM refuses offloading on CPU in ``CPUOffloadingSpec.get_worker`` (worker side only):
its copy engine is CUDA streams and a swap-blocks kernel. :class:`CpuSlicingTieringSpec`
replaces exactly that: ``get_worker`` returns :class:`SlicingWorker`, which maps the same
shared primary region vLLM's worker maps (``SharedOffloadRegion``, rank 0) and copies whole
blocks with tensor indexing, synchronously. Everything on the scheduler side (the tiering
manager, the CPU primary tier, cascading stores, promotion, the secondary tiers) is stock.
Only the direct layout with one block per chunk's sub-block slot is handled (what these tests
configure); anything else raises. Never part of the product.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.kv_offload.base import (
    BlockIDsLoadStoreSpec,
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)
from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec


class SlicingWorker(OffloadingWorker):  # type: ignore[misc]
    """Copies KV blocks between the engine's (CPU) KV tensors and the primary region."""

    def __init__(self, kv_caches: CanonicalKVCaches, spec: CpuSlicingTieringSpec) -> None:
        self.blocks_per_chunk = spec.blocks_per_chunk
        self.region = SharedOffloadRegion(
            engine_id=spec._engine_id,
            num_chunks=spec.num_chunks,
            rank=0,
            kv_bytes_per_chunk=spec.kv_bytes_per_chunk,
            cpu_page_size=spec.cpu_page_size_per_worker,
        )
        self.refs = kv_caches.group_data_refs
        self.device: list[torch.Tensor] = []
        self.primary: list[torch.Tensor] = []
        for t in kv_caches.tensors:
            page = t.page_size_bytes
            self.device.append(t.tensor.view(torch.int8).view(-1, page))
            self.primary.append(self.region.create_next_worker_view(page * self.blocks_per_chunk))
        self.done: list[TransferResult] = []

    def _copy(self, job_id: int, gpu: GPULoadStoreSpec, cpu: LoadStoreSpec, store: bool) -> bool:
        assert isinstance(cpu, BlockIDsLoadStoreSpec)
        bpc = self.blocks_per_chunk
        gpu_blocks, chunks = gpu.block_ids, cpu.block_ids
        g_off = c_off = 0
        nbytes = 0
        for g, (size, first) in enumerate(zip(gpu.group_sizes, gpu.block_indices, strict=True)):
            if size == 0:
                continue
            skip = first % bpc
            n_chunks = -(-(size + skip) // bpc)
            for i in range(size):
                block = int(gpu_blocks[g_off + i])
                slot = skip + i
                chunk = int(chunks[c_off + slot // bpc])
                sub = slot % bpc
                for ref in self.refs[g]:
                    dev, prim = self.device[ref.tensor_idx], self.primary[ref.tensor_idx]
                    page = dev.shape[1]
                    n = ref.page_size_bytes
                    lo = sub * page
                    if store:
                        prim[chunk, lo : lo + n] = dev[block, :n]
                    else:
                        dev[block, :n] = prim[chunk, lo : lo + n]
                    nbytes += n
            g_off += size
            c_off += n_chunks
        self.done.append(TransferResult(job_id, True, nbytes, 0.0))
        return True

    def submit_store(self, job_id: int, src_spec: Any, dst_spec: Any) -> bool:
        return self._copy(job_id, src_spec, dst_spec, store=True)

    def submit_load(self, job_id: int, src_spec: Any, dst_spec: Any) -> bool:
        return self._copy(job_id, dst_spec, src_spec, store=False)

    def get_finished(self) -> list[TransferResult]:
        out, self.done = self.done, []
        return out

    def wait(self, job_ids: set[int]) -> None:
        return None  # every copy finished inside its submit

    def shutdown(self) -> None:
        self.device, self.primary = [], []  # views into the region: the mmap closes after them
        self.region.cleanup()


class CpuSlicingTieringSpec(TieringOffloadingSpec):  # type: ignore[misc]
    """``TieringOffloadingSpec`` whose worker copies by slicing (module docstring)."""

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        if self.config.canonical_layout:
            raise NotImplementedError("the test-only slicing worker copies the direct layout")
        if self._worker is None:
            self._worker = SlicingWorker(kv_caches, self)
        return self._worker
