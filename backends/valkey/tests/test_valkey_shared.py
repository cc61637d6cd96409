"""Two hicache instances on one server find each other's pages: in one process, and across
processes (a peer process writes, this one reads, and the other way round)."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from typing import Any

import pytest
from hicache_valkey.testing import PAGE_BYTES, make_backend

from hicache.storage import PageStatus
from hicache.testing import kit_key, page_pattern

_PEER = """
import sys
from hicache.testing import kit_key, page_pattern
from hicache_valkey.testing import PAGE_BYTES, fast_options, make_backend
port, salt, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
keys = [kit_key(i, salt) for i in range(count)]
with make_backend(fast_options(port), namespace="shared") as backend:
    if sys.argv[4] == "put":
        pages = [memoryview(page_pattern(k, PAGE_BYTES)) for k in keys]
        assert all(s.stored for s in backend.put(keys, pages))
    else:
        bufs = [bytearray(PAGE_BYTES) for _ in keys]
        statuses = backend.get_into(keys, [memoryview(b) for b in bufs])
        assert [s.value for s in statuses] == ["ok"] * count, statuses
        assert all(b == page_pattern(k, PAGE_BYTES) for k, b in zip(keys, bufs))
print("peer done")
"""


def _peer(port: int, salt: str, count: int, action: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PEER, str(port), salt, str(count), action],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and "peer done" in done.stdout, done.stderr[-3000:]


@pytest.fixture
def salt() -> str:
    """Fresh per test run: the session server keeps earlier runs' pages (``pytest --count``),
    and a put of a key already there answers ALREADY_EXISTS, not the OK these tests expect."""
    return uuid.uuid4().hex


def test_two_instances_find_each_others_pages(options: dict[str, Any], salt: str) -> None:
    mine = [kit_key(i, f"mine-{salt}") for i in range(10)]
    theirs = [kit_key(i, f"theirs-{salt}") for i in range(10)]
    with make_backend(options, namespace="two") as a, make_backend(options, namespace="two") as b:
        assert (
            a.put(mine, [memoryview(page_pattern(k, PAGE_BYTES)) for k in mine])
            == [PageStatus.OK] * 10
        )
        assert (
            b.put(theirs, [memoryview(page_pattern(k, PAGE_BYTES)) for k in theirs])
            == [PageStatus.OK] * 10
        )
        for reader, keys in ((b, mine), (a, theirs)):
            assert reader.exists_prefix(keys) == 10
            bufs = [bytearray(PAGE_BYTES) for _ in keys]
            assert reader.get_into(keys, [memoryview(x) for x in bufs]) == [PageStatus.OK] * 10
            expected = [page_pattern(k, PAGE_BYTES) for k in keys]
            assert [bytes(buf) for buf in bufs] == expected
        # create-only across instances: the second writer is told the page exists
        assert b.put(mine[:1], [memoryview(page_pattern(mine[0], PAGE_BYTES, 1))]) == [
            PageStatus.ALREADY_EXISTS
        ]


def test_racing_instances_keep_one_writer(options: dict[str, Any], salt: str) -> None:
    """Two instances put different bytes under the same keys at once: every key ends up with
    exactly one writer's whole page, and both instances read that same page."""
    keys = [kit_key(i, f"race-{salt}") for i in range(64)]
    with make_backend(options, namespace="race") as a, make_backend(options, namespace="race") as b:
        barrier = threading.Barrier(2)
        results: dict[int, list[PageStatus]] = {}

        def put(backend: Any, variant: int) -> None:
            barrier.wait()
            pages = [memoryview(page_pattern(k, PAGE_BYTES, variant)) for k in keys]
            results[variant] = backend.put(keys, pages)

        threads = [threading.Thread(target=put, args=(x, v)) for v, x in enumerate((a, b))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for i in range(len(keys)):
            assert {results[0][i], results[1][i]} == {PageStatus.OK, PageStatus.ALREADY_EXISTS}
        seen = []
        for reader in (a, b):
            bufs = [bytearray(PAGE_BYTES) for _ in keys]
            assert reader.get_into(keys, [memoryview(x) for x in bufs]) == [PageStatus.OK] * 64
            seen.append([bytes(x) for x in bufs])
        assert seen[0] == seen[1]
        for i, key in enumerate(keys):
            winner = 0 if results[0][i] is PageStatus.OK else 1
            assert seen[0][i] == page_pattern(key, PAGE_BYTES, winner)


def test_peer_processes_share_pages(options: dict[str, Any], salt: str) -> None:
    port = options["port"]
    _peer(port, f"from-peer-{salt}", 8, "put")
    keys = [kit_key(i, f"from-peer-{salt}") for i in range(8)]
    with make_backend(options, namespace="shared") as backend:
        bufs = [bytearray(PAGE_BYTES) for _ in keys]
        assert backend.get_into(keys, [memoryview(x) for x in bufs]) == [PageStatus.OK] * 8
        assert all(buf == page_pattern(k, PAGE_BYTES) for k, buf in zip(keys, bufs, strict=True))
        mine = [kit_key(i, f"to-peer-{salt}") for i in range(8)]
        assert (
            backend.put(mine, [memoryview(page_pattern(k, PAGE_BYTES)) for k in mine])
            == [PageStatus.OK] * 8
        )
    _peer(port, f"to-peer-{salt}", 8, "get")
