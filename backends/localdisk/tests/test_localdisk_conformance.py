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
    def _where(backend: Backend, key: str) -> tuple[str, int]:
        """The file holding ``key`` and where its bytes start there (its pack record)."""
        assert isinstance(backend, LocalDiskBackend)
        return backend.record_of(key) or (backend.page_path(key), 0)

    def _flip(self, backend: Backend, key: str, offset: int) -> None:
        path, start = self._where(backend, key)
        with open(path, "r+b") as f:
            f.seek(start + offset)
            byte = f.read(1)
            f.seek(start + offset)
            f.write(bytes([byte[0] ^ 0x5A]))

    def corrupt_payload(self, backend: Backend, key: str) -> None:
        self._flip(backend, key, HEADER_SIZE + self.page_bytes // 2)

    def corrupt_header(self, backend: Backend, key: str) -> None:
        self._flip(backend, key, 100)  # inside the stored key

    def truncate_page(self, backend: Backend, key: str) -> None:
        path, start = self._where(backend, key)
        cut = HEADER_SIZE + self.page_bytes // 3
        if start == 0 and not path.endswith(".pack"):
            os.truncate(path, cut)
            return
        # a record of a pack: what a write torn by a power loss leaves, the rest zeros
        with open(path, "r+b") as f:
            f.seek(start + cut)
            f.write(bytes(HEADER_SIZE + self.page_bytes - cut))


class TestLocalDiskDefault(_RawHooks):
    @pytest.fixture
    def backend_options(self, tmp_path: Path) -> dict[str, Any]:
        return {"root": str(tmp_path / "root"), "max_bytes": "64MiB"}


class TestLocalDiskFilePerPage(_RawHooks):
    """Packs off: one file per page, as large pages and ``pack_below: 0`` store them."""

    state_machine_examples = 10

    @pytest.fixture
    def backend_options(self, tmp_path: Path) -> dict[str, Any]:
        return {"root": str(tmp_path / "root"), "max_bytes": "64MiB", "pack_below": 0}


class TestLocalDiskPackedFsync(_RawHooks):
    """Packs with power-loss durability (the pack and its directory synced)."""

    state_machine_examples = 10

    @pytest.fixture
    def backend_options(self, tmp_path: Path) -> dict[str, Any]:
        return {"root": str(tmp_path / "root"), "max_bytes": "64MiB", "durability": "fsync"}


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
