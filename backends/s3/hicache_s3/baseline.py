"""Raw boto3 baseline of ``hicache bench storage`` for the ``s3`` backend.

The same endpoint, bucket, client configuration and worker count as the backend, but plain
``put_object`` / ``get_object`` / ``head_object`` calls on bare page bytes: no page header, no
conditional write, no verification. It is the limit the backend's figures are divided by.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from hicache.storage import RawBaseline
from hicache_s3 import errors
from hicache_s3.body import read_exact
from hicache_s3.client import make_client
from hicache_s3.options import S3Options

__all__ = ["S3RawBaseline"]


class S3RawBaseline(RawBaseline):
    """Raw boto3 calls with the backend's client settings, fanned out over as many threads."""

    name: ClassVar[str] = "raw boto3 put_object/get_object/head_object, same client config"

    def __init__(self, options: S3Options) -> None:
        self.options = options
        # beside the backend's prefix, never under it, and never a valid namespace name (the
        # leading dot), so listings of hicache pages and namespaces do not see these objects
        self._prefix = f"{options.prefix}.bench-raw-{os.getpid()}/"
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None

    def _key(self, index: int) -> str:
        return f"{self._prefix}{index:08d}"

    def setup(self, page_bytes: int, num_pages: int) -> None:
        self._client = make_client(self.options)
        self._pool = ThreadPoolExecutor(max_workers=self.options.max_concurrency)

    def _fan_out(self, fn: Any, *iterables: Sequence[Any]) -> list[Any]:
        assert self._pool is not None, "setup() was not called"
        if len(iterables[0]) == 1:  # one page: no hand-off to a worker, like the backend's pool
            return [fn(*(it[0] for it in iterables))]
        return list(self._pool.map(fn, *iterables))

    def put(self, indices: Sequence[int], srcs: Sequence[memoryview]) -> None:
        def one(index: int, src: memoryview) -> None:
            # boto3 takes bytes/bytearray bodies: hand over the underlying bytearray when the
            # view covers it whole (no copy), else copy once
            whole = isinstance(src.obj, bytearray) and len(src.obj) == src.nbytes
            body = src.obj if whole else bytes(src)
            self._client.put_object(Bucket=self.options.bucket, Key=self._key(index), Body=body)

        self._fan_out(one, indices, srcs)

    def get(self, indices: Sequence[int], dsts: Sequence[memoryview]) -> None:
        def one(index: int, dst: memoryview) -> None:
            response = self._client.get_object(Bucket=self.options.bucket, Key=self._key(index))
            with contextlib.closing(response["Body"]) as body:
                read_exact(body, dst, self.options.read_chunk_bytes)

        self._fan_out(one, indices, dsts)

    def exists(self, indices: Sequence[int]) -> list[bool]:
        def one(index: int) -> bool:
            try:
                self._client.head_object(Bucket=self.options.bucket, Key=self._key(index))
            except Exception as exc:
                if errors.is_not_found(exc):
                    return False
                raise
            return True

        return self._fan_out(one, indices)

    def drop_cache(self) -> bool:
        # no client-side cache of object bytes exists: every get goes to the endpoint
        return True

    def teardown(self) -> None:
        client, self._client = self._client, None
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        if client is None:
            return
        try:
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.options.bucket, Prefix=self._prefix):
                objects = [{"Key": item["Key"]} for item in page.get("Contents", ())]
                if objects:
                    client.delete_objects(
                        Bucket=self.options.bucket, Delete={"Objects": objects, "Quiet": True}
                    )
        finally:
            client.close()
