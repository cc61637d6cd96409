"""Backends the tests build their tiers from (no torch, no pytest).

- ``memory_backend(page_bytes, ...)``    an unopened ``MemoryBackend`` (private, or one of a
                                         named in-process store shared with other instances)
- ``faulty_memory(page_bytes, ...)``     the same behind a :class:`FaultyBackend`
- ``shared_store_name(prefix)``          a fresh store name; tests drop it with
                                         ``MemoryBackend.drop_shared_store`` when done
"""

from __future__ import annotations

import uuid

from hicache.storage.backend import BackendContext, Capabilities
from hicache.storage.memory import MemoryBackend, MemoryConfig
from hicache.testing.faults import FaultyBackend

__all__ = ["faulty_memory", "memory_backend", "shared_store_name"]


def shared_store_name(prefix: str = "t") -> str:
    """A store name no other test uses (memory stores live for the whole process)."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def memory_backend(
    page_bytes: int,
    *,
    namespace: str = "test",
    tier_name: str = "t",
    shared: str | None = None,
    capacity: int | None = None,
) -> MemoryBackend:
    """An unopened memory backend; instances with the same ``shared`` name share one store."""
    context = BackendContext(page_bytes=page_bytes, namespace=namespace, tier_name=tier_name)
    return MemoryBackend(MemoryConfig(shared_name=shared, capacity=capacity), context)


def faulty_memory(
    page_bytes: int,
    *,
    namespace: str = "test",
    tier_name: str = "t",
    shared: str | None = None,
    capabilities: Capabilities | None = None,
    latency_s: float = 0.0,
) -> FaultyBackend:
    """A :func:`memory_backend` behind a :class:`FaultyBackend` (no fault armed yet)."""
    inner = memory_backend(page_bytes, namespace=namespace, tier_name=tier_name, shared=shared)
    return FaultyBackend(inner, capabilities=capabilities, latency_s=latency_s)
