"""A pipelined window larger than the socket buffers goes out in one gathered ``sendmsg``
that the kernel takes in parts: every byte of every page still arrives, in order."""

from __future__ import annotations

import hashlib
import socket
from typing import Any

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
