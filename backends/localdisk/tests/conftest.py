"""Shared helpers of the localdisk tests (page keys, payloads, a backend factory)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hicache_localdisk import LocalDiskBackend, LocalDiskConfig

from hicache.storage import HEADER_SIZE, BackendContext
from hicache.storage import PAGE_MAGIC as MAGIC

PAGE_BYTES = 16384


def key_of(i: int, salt: str = "") -> str:
    """A deterministic page key."""
    return hashlib.sha256(f"{salt}:{i}".encode()).hexdigest()


def payload_of(key: str, page_bytes: int = PAGE_BYTES, variant: int = 0) -> bytes:
    """Content derived from the key, so a torn or misplaced page is detected byte for byte."""
    seed = hashlib.sha256(f"{key}:{variant}".encode()).digest()
    return (seed * (page_bytes // len(seed) + 1))[:page_bytes]


def _disk_bytes(ns_dir: Path, page_bytes: int) -> tuple[int, int]:
    """(bytes, pages) the pages under ``ns_dir`` hold on disk, read raw: each page file's size,
    and each pack record (``*.pack``) that is not punched (a punched record reads as zeros)."""
    stored = HEADER_SIZE + page_bytes
    total = pages = 0
    for path in ns_dir.glob("*/*"):
        try:
            if path.name.endswith(".pack"):
                data = path.read_bytes()
                live = sum(
                    data[off : off + len(MAGIC)] == MAGIC
                    for off in range(0, len(data) - stored + 1, stored)
                )
                total += live * stored
                pages += live
            elif not path.name.startswith("."):
                total += os.stat(path).st_size
                pages += 1
        except FileNotFoundError:  # evicted by a concurrent writer since the listing
            continue
    return total, pages


MakeBackend = Callable[..., LocalDiskBackend]


@pytest.fixture(name="key_of")
def _key_of() -> Callable[..., str]:
    return key_of


DiskBytes = Callable[[Path, int], tuple[int, int]]


@pytest.fixture
def disk_bytes() -> DiskBytes:
    """(bytes, pages) the pages under a namespace directory hold on disk, read raw."""
    return _disk_bytes


@pytest.fixture(name="payload_of")
def _payload_of() -> Callable[..., bytes]:
    return payload_of


@pytest.fixture
def make_backend(tmp_path: Path) -> MakeBackend:
    """Factory of unopened backends on ``tmp_path/root`` (options may override anything)."""

    def make(
        namespace: str = "ns", page_bytes: int = PAGE_BYTES, read_only: bool = False, **opts: Any
    ) -> LocalDiskBackend:
        options: dict[str, Any] = {"root": str(tmp_path / "root"), **opts}
        config = LocalDiskConfig.model_validate(options)
        ctx = BackendContext(page_bytes=page_bytes, namespace=namespace, read_only=read_only)
        return LocalDiskBackend(config, ctx)

    return make
