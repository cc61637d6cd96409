"""Cluster mode on real cluster-enabled servers: pages spread over the masters, keyspace events
of every node reported, and a slot that moves after open() followed through MOVED."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hicache_valkey import ValkeyBackend
from hicache_valkey.devserver import DevCluster
from hicache_valkey.testing import PAGE_BYTES, fast_options, make_backend, wait_for
from redis.crc import key_slot

from hicache.storage import PageStatus
from hicache.testing import kit_key, page_pattern


def _pages(keys: list[str]) -> list[memoryview]:
    return [memoryview(page_pattern(k, PAGE_BYTES)) for k in keys]


def test_pages_spread_and_expiry_reported_from_every_node(valkey_cluster: DevCluster) -> None:
    keys = [kit_key(i, "cluster-ttl") for i in range(60)]
    backend = make_backend(
        fast_options(valkey_cluster.port, cluster=True, ttl_s=0.5), namespace="ttl"
    )
    with backend:
        assert backend.stats()["nodes"] == 3
        assert backend.put(keys, _pages(keys)) == [PageStatus.OK] * 60
        per_node = []
        for server in valkey_cluster.servers:
            client = server.client()
            per_node.append(len(list(client.scan_iter(match=b"hicache:ttl:*"))))
            client.close()
        assert all(n > 0 for n in per_node) and sum(per_node) <= 60, per_node
        reported: set[str] = set()

        def all_expired() -> bool:
            reported.update(backend.take_evicted())
            return reported == set(keys)

        wait_for(all_expired, "expiry events from all three nodes")


def test_slot_moved_after_open_is_followed(tmp_path: Path) -> None:
    """Slots of node 3 move to node 1 under an open backend: its next calls get MOVED, re-read
    the slot map and succeed."""
    with DevCluster(tmp_path / "cluster") as cluster:
        backend = make_backend(fast_options(cluster.port, cluster=True), namespace="moved")
        with backend:
            clients = [s.client() for s in cluster.servers]
            first, third = clients[0], clients[2]
            start = 2 * (16384 // 3)  # node 3 serves start..16383
            candidates = [kit_key(i, "moved") for i in range(200)]
            keys = [k for k in candidates if _moved(backend, k, start)][:10]
            assert keys, "no key hashed into node 3's slots"
            target = first.cluster("MYID")
            target = target.decode() if isinstance(target, bytes) else str(target)
            for slot in {key_slot(backend.keyspace.page(k)) for k in keys}:
                for client in clients:  # the resharding hand-over of an empty slot
                    client.cluster("SETSLOT", slot, "NODE", target)
            assert all(_owner(third.cluster("SLOTS"), key_slot(backend.keyspace.page(k)))
                       == cluster.port for k in keys)  # fmt: skip
            assert backend.put(keys, _pages(keys)) == [PageStatus.OK] * len(keys)
            bufs = [bytearray(PAGE_BYTES) for _ in keys]
            assert backend.get_into(keys, [memoryview(b) for b in bufs]) == [PageStatus.OK] * len(
                keys
            )
            assert [bytes(b) for b in bufs] == [bytes(p) for p in _pages(keys)]
            assert first.dbsize() == len(keys) and third.dbsize() == 0
            assert backend.stats()["nodes"] == 3
            assert backend.stats()["slot_map_refreshes"] == 1, "no MOVED was followed"
            for client in clients:
                client.close()


def _moved(backend: ValkeyBackend, key: str, start: int) -> bool:
    return key_slot(backend.keyspace.page(key)) >= start


def _owner(slots: Any, slot: int) -> int | None:
    """Port of the master serving ``slot`` in a ``CLUSTER SLOTS`` answer, as redis-py parses it
    (a dict keyed by ``(start, end)``) or raw (a list of entries)."""
    if isinstance(slots, dict):
        for (start, end), entry in slots.items():
            if int(start) <= slot <= int(end):
                return int(entry["primary"][1])
        return None
    for entry in slots:
        if int(entry[0]) <= slot <= int(entry[1]):
            return int(entry[2][1])
    return None
