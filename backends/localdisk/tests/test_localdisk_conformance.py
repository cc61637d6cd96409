"""The conformance kit, run against localdisk in its main configurations."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hicache_localdisk import LocalDiskBackend

from hicache.storage import HEADER_SIZE, Backend
from hicache.testing.kit import BackendTests


class _RawHooks(BackendTests):
    backend_cls = LocalDiskBackend

    @staticmethod
    def _path(backend: Backend, key: str) -> str:
        assert isinstance(backend, LocalDiskBackend)
        return backend.page_path(key)

    def _flip(self, backend: Backend, key: str, offset: int) -> None:
        with open(self._path(backend, key), "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x5A]))

    def corrupt_payload(self, backend: Backend, key: str) -> None:
        self._flip(backend, key, HEADER_SIZE + self.page_bytes // 2)

    def corrupt_header(self, backend: Backend, key: str) -> None:
        self._flip(backend, key, 100)  # inside the stored key

    def truncate_page(self, backend: Backend, key: str) -> None:
        os.truncate(self._path(backend, key), HEADER_SIZE + self.page_bytes // 3)


class TestLocalDiskDefault(_RawHooks):
    @pytest.fixture
    def backend_options(self, tmp_path: Path) -> dict[str, Any]:
        return {"root": str(tmp_path / "root"), "max_bytes": "64MiB"}


class TestLocalDiskFsyncDirect(_RawHooks):
    """Power-loss durability and O_DIRECT (falls back per page for the kit's unaligned buffers)."""

    # Every put here syncs files and directories: the default class covers the model more.
    state_machine_examples = 10

    @pytest.fixture
    def backend_options(self, tmp_path: Path) -> dict[str, Any]:
        return {
            "root": str(tmp_path / "root"),
            "max_bytes": "64MiB",
            "durability": "fsync",
            "direct_io": True,
            "io_threads": 1,
        }


class TestLocalDiskShared(_RawHooks):
    state_machine_examples = 10

    @pytest.fixture
    def backend_options(self, tmp_path: Path) -> dict[str, Any]:
        return {"root": str(tmp_path / "root"), "max_bytes": "64MiB", "shared": True}
