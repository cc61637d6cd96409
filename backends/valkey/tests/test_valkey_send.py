"""What a put sends: a pipelined window larger than the socket buffers goes out in one gathered
``sendmsg`` that the kernel takes in parts (every byte of every page still arrives, in order),
and a page's value is the last argument of its command where the server allows it."""

from __future__ import annotations

import hashlib
import socket
from typing import Any

from hicache_valkey.devserver import DevServer
from hicache_valkey.testing import make_backend

from hicache.storage import PageStatus

PAGE = 1 << 20


def test_window_larger_than_socket_buffers_arrives_whole(options: dict[str, Any]) -> None:
    backend = make_backend({**options, "pipeline_depth": 32}, namespace="send", page_bytes=PAGE)
    backend.open()
    try:
        keys = [hashlib.sha256(f"send/{i}".encode()).hexdigest() for i in range(24)]
        pages = [bytes([i]) * 1000 + hashlib.sha256(k.encode()).digest() * (PAGE // 32 - 32)
                 for i, k in enumerate(keys)]  # fmt: skip
        pages = [p[:PAGE].ljust(PAGE, b"\x07") for p in pages]
        with socket.socket() as probe:  # the window must exceed what the kernel buffers at once
            assert len(keys) * PAGE > 4 * probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert backend.put(keys, [memoryview(p) for p in pages]) == [PageStatus.OK] * len(keys)
        dsts = [bytearray(PAGE) for _ in keys]
        assert backend.get_into(keys, [memoryview(d) for d in dsts]) == [PageStatus.OK] * len(keys)
        assert dsts == pages
        backend.delete(keys)
    finally:
        backend.close()


def _calls(client: Any, command: str) -> int:
    stats = client.info("commandstats").get(f"cmdstat_{command}", {})
    return int(stats.get("calls", 0))


def test_put_sends_the_value_last(options: dict[str, Any]) -> None:
    """Without a TTL a put is ``SETNX key value``: nothing follows the value, so the server can
    keep the buffer it read the value into instead of copying it (see ``_send_put``). With a TTL
    it is ``SET key value NX PX ms``. Both stay create-only."""
    client = DevServer.client_for(options["port"])
    try:
        for ttl_s, command in ((None, "setnx"), (600.0, "set")):
            opts = {**options, "ttl_s": ttl_s}
            with make_backend(opts, namespace=f"last-{command}", page_bytes=PAGE) as backend:
                keys = [hashlib.sha256(f"last/{command}/{i}".encode()).hexdigest()
                        for i in range(3)]  # fmt: skip
                pages = [memoryview(bytes([i + 1]) * PAGE) for i in range(3)]
                before = {name: _calls(client, name) for name in ("setnx", "set")}
                assert backend.put(keys, pages) == [PageStatus.OK] * 3
                again = [memoryview(bytes(PAGE))] * 3
                assert backend.put(keys, again) == [PageStatus.ALREADY_EXISTS] * 3
                after = {name: _calls(client, name) for name in ("setnx", "set")}
                other = "set" if command == "setnx" else "setnx"
                assert (after[command] - before[command], after[other] - before[other]) == (6, 0)
                dst = bytearray(PAGE)
                assert backend.get_into(keys[:1], [memoryview(dst)]) == [PageStatus.OK]
                assert dst == pages[0]
                ttl_ms = client.pttl(backend.keyspace.page(keys[0]))
                assert (ttl_ms > 0) if ttl_s else (ttl_ms == -1), ttl_ms
                backend.delete(keys)
    finally:
        client.close()
