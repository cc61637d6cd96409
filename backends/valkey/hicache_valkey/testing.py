"""Helpers for tests of the ``valkey`` backend against a server the tests start themselves.

Importable (unlike a ``conftest.py`` under ``--import-mode=importlib``) so every test module
shares them. Nothing here is used when serving.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from hicache.storage import BackendContext
from hicache_valkey.backend import ValkeyBackend
from hicache_valkey.options import ValkeyOptions

__all__ = ["PAGE_BYTES", "fast_options", "make_backend", "wait_for"]

#: Small pages keep the tests fast.
PAGE_BYTES = 16384


def fast_options(port: int, **overrides: Any) -> dict[str, Any]:
    """Options of a backend on the local server at ``port`` with short timeouts."""
    return {"port": port, "connect_timeout_s": 1.0, "socket_timeout_s": 5.0, **overrides}


def make_backend(
    options: dict[str, Any],
    *,
    namespace: str = "ns",
    page_bytes: int = PAGE_BYTES,
    read_only: bool = False,
) -> ValkeyBackend:
    """A new, unopened backend (options validated by the backend's model)."""
    context = BackendContext(
        page_bytes=page_bytes, namespace=namespace, read_only=read_only, tier_name="valkey"
    )
    return ValkeyBackend(ValkeyOptions.model_validate(options), context)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after a generous timeout."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.01)
