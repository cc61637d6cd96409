"""Helpers for tests and benchmarks of the ``s3`` backend against a local endpoint.

Importable (unlike a ``conftest.py`` under ``--import-mode=importlib``) so test modules, the
cross-process peer script and the benchmarks share them. Nothing here is used when serving.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from typing import Any

from hicache.storage import BackendContext
from hicache_s3.backend import S3Backend
from hicache_s3.client import new_client
from hicache_s3.options import S3Options

__all__ = [
    "PAGE_BYTES",
    "fast_options",
    "make_s3_backend",
    "new_bucket",
    "page_keys",
    "page_payloads",
    "raw_client",
]

#: Small pages keep the tests fast.
PAGE_BYTES = 16384
_bucket_ids = itertools.count()


def raw_client(endpoint_url: str, **kwargs: Any) -> Any:
    """A plain boto3 S3 client on ``endpoint_url`` (a way around the backend).

    A fresh session every time: boto3's default session caches the credentials it found first.
    """
    return new_client("s3", endpoint_url=endpoint_url, region_name="us-east-1", **kwargs)


def new_bucket(endpoint_url: str, client: Any = None) -> str:
    """Create a fresh bucket with a unique name on ``endpoint_url``; return its name."""
    name = f"hicache-test-{os.getpid()}-{next(_bucket_ids)}"
    (client or raw_client(endpoint_url)).create_bucket(Bucket=name)
    return name


def fast_options(endpoint_url: str, bucket: str, **overrides: Any) -> dict[str, Any]:
    """Options with short timeouts and few retries, so fault tests end quickly."""
    options: dict[str, Any] = {
        "bucket": bucket,
        "prefix": "tests",
        "endpoint_url": endpoint_url,
        "max_concurrency": 8,
        "connect_timeout": 1.0,
        "read_timeout": 2.0,
        "max_attempts": 2,
    }
    options.update(overrides)
    return options


def make_s3_backend(
    options: dict[str, Any],
    *,
    namespace: str = "ns",
    page_bytes: int = PAGE_BYTES,
    read_only: bool = False,
) -> S3Backend:
    """An unopened backend for ``options``."""
    context = BackendContext(
        page_bytes=page_bytes, namespace=namespace, read_only=read_only, tier_name="s3"
    )
    return S3Backend(S3Options(**options), context)


def page_payloads(n: int, seed: int = 0, page_bytes: int = PAGE_BYTES) -> list[memoryview]:
    """``n`` distinct, deterministic page payloads."""
    out = []
    for i in range(n):
        digest = hashlib.sha256(f"{seed}-{i}".encode()).digest()
        out.append(memoryview(bytearray((digest * (page_bytes // 32 + 1))[:page_bytes])))
    return out


def page_keys(n: int, tag: str = "a") -> list[str]:
    """``n`` distinct valid page keys."""
    return [hashlib.sha256(f"{tag}-{i}".encode()).hexdigest() for i in range(n)]
