"""Raw client baseline of ``hicache bench storage`` for the ``valkey`` backend.

redis-py (with its hiredis parser) on the same server and database with the same timeouts and
connection bound: pipelined ``SET`` / ``GET`` / ``EXISTS`` of the bare page bytes, no page
header, no ``NX``, no verification. A ``GET`` returns a new ``bytes`` object that is then copied
into the destination page, because that is what a plain client makes a caller do. It is the limit
the backend's figures are divided by.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

import redis
import redis.cluster

from hicache.storage import RawBaseline
from hicache_valkey.options import ValkeyOptions

__all__ = ["ValkeyRawBaseline", "redis_client"]


def redis_client(options: ValkeyOptions) -> Any:
    """A redis-py client (``RedisCluster`` with ``cluster: true``) with the backend's server,
    credentials, TLS and timeouts."""
    kwargs: dict[str, Any] = {
        "host": options.host,
        "port": options.port,
        "db": options.db,
        "username": options.username,
        "password": options.password.get_secret_value() if options.password else None,
        "socket_timeout": options.socket_timeout_s,
        "socket_connect_timeout": options.connect_timeout_s,
        "max_connections": options.max_connections,
    }
    if options.cluster:
        del kwargs["db"]
    if options.tls:
        kwargs.update(
            ssl=True,
            ssl_ca_certs=options.tls_ca_file,
            ssl_certfile=options.tls_cert_file,
            ssl_keyfile=options.tls_key_file,
            ssl_password=(
                options.tls_key_password.get_secret_value() if options.tls_key_password else None
            ),
            ssl_check_hostname=options.tls_check_hostname,
        )
    if options.cluster:
        return redis.cluster.RedisCluster(**kwargs)
    return redis.Redis(**kwargs)


class ValkeyRawBaseline(RawBaseline):
    """redis-py pipelines of plain SET/GET/EXISTS, one pipeline per call."""

    name: ClassVar[str] = "redis-py+hiredis pipelined SET/GET/EXISTS of the page bytes"

    def __init__(self, options: ValkeyOptions) -> None:
        self.options = options
        # '.' rather than ':' after the prefix: never parsed as a namespace by listings
        self._prefix = f"{options.key_prefix}.bench-raw-{os.getpid()}:".encode()
        self._client: Any = None

    def _key(self, index: int) -> bytes:
        return self._prefix + b"%08d" % index

    def _live(self) -> Any:
        assert self._client is not None, "setup() was not called"
        return self._client

    def setup(self, page_bytes: int, num_pages: int) -> None:
        self._client = redis_client(self.options)

    def put(self, indices: Sequence[int], srcs: Sequence[memoryview]) -> None:
        pipe = self._live().pipeline(transaction=False)
        for index, src in zip(indices, srcs, strict=True):
            pipe.set(self._key(index), src)
        pipe.execute()

    def get(self, indices: Sequence[int], dsts: Sequence[memoryview]) -> None:
        pipe = self._live().pipeline(transaction=False)
        for index in indices:
            pipe.get(self._key(index))
        for value, dst in zip(pipe.execute(), dsts, strict=True):
            dst[:] = value

    def exists(self, indices: Sequence[int]) -> list[bool]:
        pipe = self._live().pipeline(transaction=False)
        for index in indices:
            pipe.exists(self._key(index))
        return [bool(n) for n in pipe.execute()]

    def drop_cache(self) -> bool:
        return True  # the client caches no values: every get reaches the server

    def teardown(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            batch: list[bytes] = []
            for name in client.scan_iter(match=self._prefix + b"*", count=1000):
                batch.append(name)
                if len(batch) >= 1000:
                    client.unlink(*batch)
                    batch.clear()
            if batch:
                client.unlink(*batch)
        finally:
            client.close()
