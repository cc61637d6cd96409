"""Pages the server drops on its own (maxmemory eviction, TTL expiry) come back through
``take_evicted()``, learnt from keyspace notifications the backend enables itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hicache_valkey.devserver import DevServer
from hicache_valkey.testing import PAGE_BYTES, fast_options, make_backend, wait_for

from hicache.storage import PageStatus
from hicache.testing import kit_key, page_pattern

StartServer = Callable[..., DevServer]


def _keys(n: int, salt: str) -> list[str]:
    return [kit_key(i, salt) for i in range(n)]


def _pages(keys: list[str]) -> list[memoryview]:
    return [memoryview(page_pattern(k, PAGE_BYTES)) for k in keys]


def test_backend_enables_notifications(server_factory: StartServer) -> None:
    server = server_factory(extra=[("notify-keyspace-events", "")])
    with make_backend(fast_options(server.port)) as backend:
        client = server.client()
        flags = str(client.config_get("notify-keyspace-events")["notify-keyspace-events"])
        client.close()
        assert {"E", "e", "x"} <= set(flags), flags
        assert backend.stats()["notifications"] == "configured"


def test_maxmemory_evictions_are_reported(server_factory: StartServer) -> None:
    server = server_factory(extra=[("maxmemory-policy", "allkeys-lru")])
    client = server.client()
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used + (3 << 20))  # room for ~150 of the 400 pages below
    client.close()
    keys = _keys(400, "evict")
    reported: set[str] = set()
    with (
        make_backend(fast_options(server.port)) as backend,
        make_backend(fast_options(server.port), namespace="bystander") as other,
    ):
        for start in range(0, len(keys), 20):
            batch = keys[start : start + 20]
            statuses = backend.put(batch, _pages(batch))
            assert set(statuses) <= {PageStatus.OK, PageStatus.FAILED}, statuses
        present = backend.exists(keys)
        gone = {k for k, p in zip(keys, present, strict=True) if not p}
        assert len(gone) > 100, "the server evicted too little for the test to mean anything"

        def all_reported() -> bool:
            reported.update(backend.take_evicted())
            return gone <= reported

        wait_for(all_reported, f"{len(gone)} evictions reported")
        assert reported <= set(keys)
        assert not any(backend.exists(sorted(reported)))
        statuses = backend.get_into(
            sorted(gone)[:5], [memoryview(bytearray(PAGE_BYTES)) for _ in range(5)]
        )
        assert statuses == [PageStatus.NOT_FOUND] * 5
        assert other.take_evicted() == [], "another namespace's evictions were reported"
        assert backend.stats()["evicted"] >= len(gone)


def test_ttl_expiry_is_reported(options: dict[str, Any]) -> None:
    keys = _keys(5, "ttl")
    with make_backend({**options, "ttl_s": 0.2}, namespace="ttl") as backend:
        assert backend.put(keys, _pages(keys)) == [PageStatus.OK] * 5
        reported: set[str] = set()

        def all_expired() -> bool:
            reported.update(backend.take_evicted())
            return reported == set(keys)

        wait_for(all_expired, "the expired pages to be reported")
        assert backend.exists(keys) == [False] * 5


def test_chunk_eviction_loses_the_whole_page(options: dict[str, Any]) -> None:
    """When LRU takes one chunk, the page is a miss, removed and reported; a put repairs it."""
    [key] = _keys(1, "chunk-gone")
    opts = {**options, "max_value_bytes": 8192}
    backend = make_backend(opts, namespace="chunks")
    with backend:
        assert backend.put([key], _pages([key])) == [PageStatus.OK]
        client = DevServer.client_for(options["port"])
        client.delete(backend.keyspace.page(key) + b":1")  # what an eviction of a chunk does
        client.close()
        dst = bytearray(b"\xa5") * PAGE_BYTES
        assert backend.get_into([key], [memoryview(dst)]) == [PageStatus.NOT_FOUND]
        assert dst.count(0xA5) == PAGE_BYTES, "a miss touched its destination"
        assert backend.take_evicted() == [key]
        assert backend.exists([key]) == [False]
        assert backend.put([key], _pages([key])) == [PageStatus.OK]
        assert backend.get_into([key], [memoryview(dst)]) == [PageStatus.OK]
        assert dst == page_pattern(key, PAGE_BYTES)


def test_full_server_without_eviction_fails_puts_not_calls(server_factory: StartServer) -> None:
    """``noeviction`` at ``maxmemory``: puts come back FAILED (the call itself succeeds) and
    the pages already stored still read back."""
    server = server_factory(extra=[("maxmemory-policy", "noeviction")])
    client = server.client()
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + (1 << 20))
    client.close()
    keys = _keys(200, "oom")
    with make_backend(fast_options(server.port), namespace="oom") as backend:
        statuses = backend.put(keys, _pages(keys))
        stored = [k for k, s in zip(keys, statuses, strict=True) if s is PageStatus.OK]
        assert PageStatus.FAILED in statuses and stored, statuses
        assert set(statuses) == {PageStatus.OK, PageStatus.FAILED}
        bufs = [bytearray(PAGE_BYTES) for _ in stored]
        assert backend.get_into(stored, [memoryview(b) for b in bufs]) == [PageStatus.OK] * len(
            stored
        )
        assert backend.stats()["failed_pages"] == statuses.count(PageStatus.FAILED)
        assert backend.take_evicted() == []
