"""The conformance kit on the mmap backend, with raw hooks that damage the slot file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hicache_mmap import MmapBackend
from hicache_mmap.raw import flip_header_byte, flip_payload_byte, rewrite_header

from hicache.storage import Backend
from hicache.testing.kit import BackendTests


class TestMmapConformance(BackendTests):
    backend_cls = MmapBackend

    @pytest.fixture
    def backend_options(self, tmp_path: Path) -> dict[str, Any]:
        # 4 sets of 512 slots: the kit's 1025-page batch (256 per set on average, sd 16) never
        # overflows a set; few slots keep the many opens of the state machine cheap.
        return {
            "path": str(tmp_path / "kit.slots"),
            "capacity": 4 * 512 * (4096 + self.page_bytes),
            "associativity": 512,
            "prefault": False,
        }

    def corrupt_payload(self, backend: Backend, key: str) -> None:
        flip_payload_byte(backend, key)

    def corrupt_header(self, backend: Backend, key: str) -> None:
        flip_header_byte(backend, key)

    def truncate_page(self, backend: Backend, key: str) -> None:
        # A slot cannot be shorter than its file; a header claiming a short payload is the
        # mmap equivalent of a truncated page file.
        rewrite_header(backend, key, payload_len=self.page_bytes - 1)
