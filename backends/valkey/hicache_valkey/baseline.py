"""Raw client baseline of ``hicache bench storage`` for the ``valkey`` backend.

redis-py (with its hiredis parser) on the same server and database with the same timeouts and
connection bound: pipelined ``SET`` / ``GET`` / ``EXISTS`` of the bare page bytes, no page
header, no ``NX``, no verification. A ``GET`` returns a new ``bytes`` object that is then copied
into the destination page, because that is what a plain client makes a caller do. It is the limit
the backend's figures are divided by.

Beside it, ``tool_limits`` runs ``redis-benchmark`` (or ``valkey-benchmark``) against the same
server in the same round: ``SET``/``GET`` of values of the page size over as many connections as
the benchmark has threads, pipelined as deep as its batch, i.e. what the server and loopback
allow with a C client. It writes and then removes the tool's own key ``key:__rand_int__``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any, ClassVar

import redis
import redis.cluster

from hicache.storage import RawBaseline, ToolLimit
from hicache_valkey.options import ValkeyOptions

__all__ = ["ValkeyRawBaseline", "redis_client", "server_benchmark"]

log = logging.getLogger(__name__)

#: The tool's key for SET/GET tests without ``-r``.
_TOOL_KEY = "key:__rand_int__"
_TOOL_TIMEOUT_S = 600.0


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

    def settle(self) -> None:
        # Before either side: the server returns what the previous side's deleted pages freed
        # (jemalloc keeps it for seconds and returns it on a background thread). Without it the
        # side measured second reused part of the first side's memory without page faults, while
        # the purge ran beside it; faulting memory in is most of a server's work for a put.
        client = redis_client(self.options)
        try:
            client.memory_purge()
        except redis.RedisError as exc:  # refused by ACLs, or not a jemalloc build: nothing to do
            log.debug("MEMORY PURGE before a bench side failed: %s", exc)
        finally:
            client.close()

    def tool_limits(
        self, page_bytes: int, threads: int, pages: int, batch: int
    ) -> Sequence[ToolLimit]:
        # docstring inherited
        return server_benchmark(self.options, page_bytes, threads, pages, batch)

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


def server_benchmark(
    options: ValkeyOptions, page_bytes: int, clients: int, requests: int, pipeline: int = 1
) -> list[ToolLimit]:
    """``SET`` and ``GET`` GB/s that ``redis-benchmark`` reaches on the server of ``options``:
    ``requests`` values of ``page_bytes`` over ``clients`` connections. Figures are ``None``
    (with the reason) where it cannot run: not installed, a cluster, TLS, or a password (which
    would show on its command line)."""
    names = ("redis-benchmark SET", "redis-benchmark GET")
    figures = ("put", "get_hot")
    tool = shutil.which("valkey-benchmark") or shutil.which("redis-benchmark")
    why = (
        "not installed (Debian: redis-tools)" if tool is None
        else "cluster mode" if options.cluster
        else "TLS" if options.tls
        else "the server needs a password" if options.password is not None
        else None
    )  # fmt: skip
    if tool is None or why is not None:
        return [ToolLimit(n, f, None, why or "") for n, f in zip(names, figures, strict=True)]
    args = [
        tool,
        "-h", options.host,
        "-p", str(options.port),
        "--dbnum", str(options.db),
        "-d", str(page_bytes),
        "-t", "set,get",
        "-n", str(max(requests, clients)),
        "-c", str(clients),
        "-P", str(pipeline),
        "--csv",
    ]  # fmt: skip
    note = " ".join([os.path.basename(tool), *args[5:]])  # host and port are the tier's
    try:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S, check=True
        )
    except (OSError, subprocess.SubprocessError) as exc:
        reason = f"{os.path.basename(tool)} failed: {type(exc).__name__}"
        return [ToolLimit(n, f, None, reason) for n, f in zip(names, figures, strict=True)]
    finally:
        with contextlib.suppress(redis.RedisError):
            client = redis_client(options)
            try:
                client.delete(_TOOL_KEY)
            finally:
                client.close()
    rps = {row[0]: float(row[1]) for row in csv.reader(io.StringIO(done.stdout)) if len(row) > 1
           and row[0] in ("SET", "GET")}  # fmt: skip
    return [
        ToolLimit(n, f, rps[op] * page_bytes / 1e9 if op in rps else None, f"{note}")
        for n, f, op in zip(names, figures, ("SET", "GET"), strict=True)
    ]
