"""MemoryBackend: the conformance kit, plus what only the reference backend promises."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from hicache.storage.backend import Backend, BackendContext, PageStatus
from hicache.storage.eviction import EvictionPolicy
from hicache.storage.memory import MemoryBackend, MemoryConfig
from hicache.storage.pageformat import HEADER_SIZE
from hicache.testing import BackendTests


def _stored(backend: Backend, key: str) -> Any:
    assert isinstance(backend, MemoryBackend)
    store = backend._store
    assert store is not None
    return store.pages[backend.context.namespace][key]


class TestMemoryBackend(BackendTests):
    backend_cls = MemoryBackend

    def corrupt_payload(self, backend: Backend, key: str) -> None:
        _stored(backend, key).payload[self.page_bytes // 2] ^= 0x01

    def corrupt_header(self, backend: Backend, key: str) -> None:
        _stored(backend, key).header[HEADER_SIZE // 2] ^= 0x80

    def truncate_page(self, backend: Backend, key: str) -> None:
        del _stored(backend, key).payload[-1:]


class TestSharedMemoryBackend(TestMemoryBackend):
    """With ``shared_name`` instances share a store: read-only and isolation tests get teeth."""

    backend_cls = MemoryBackend

    @pytest.fixture
    def backend_options(self, tmp_path: Any) -> Iterator[dict[str, Any]]:
        name = f"kit-{uuid.uuid4().hex}"
        yield {"shared_name": name, "max_batch": 32}
        MemoryBackend.drop_shared_store(name)


def _ctx(namespace: str = "kit", page_bytes: int = 4096, **kw: Any) -> BackendContext:
    return BackendContext(page_bytes=page_bytes, namespace=namespace, **kw)


def _key(i: int) -> str:
    return f"{i:064x}"


def _page(i: int, page_bytes: int = 4096) -> memoryview:
    return memoryview(bytes([i % 251]) * page_bytes)


def test_shared_store_is_shared_between_caches_and_namespaced() -> None:
    name = f"t-{uuid.uuid4().hex}"
    config = MemoryConfig(shared_name=name)
    a, b = MemoryBackend(config, _ctx("kv-a")), MemoryBackend(config, _ctx("kv-a"))
    c = MemoryBackend(config, _ctx("kv-c"))
    try:
        for inst in (a, b, c):
            inst.open()
        assert a.put([_key(1)], [_page(1)]) == [PageStatus.OK]
        assert b.put([_key(1)], [_page(2)]) == [PageStatus.ALREADY_EXISTS]
        assert b.exists([_key(1)]) == [True]
        assert c.exists([_key(1)]) == [False]
        assert sorted(c.iter_namespaces()) == ["kv-a"]
    finally:
        for inst in (a, b, c):
            inst.close()
        MemoryBackend.drop_shared_store(name)


def test_private_store_is_dropped_on_close() -> None:
    backend = MemoryBackend(MemoryConfig(), _ctx())
    backend.open()
    backend.put([_key(1)], [_page(1)])
    backend.close()
    backend.open()
    assert backend.exists([_key(1)]) == [False]
    assert not backend.capabilities.persistent
    backend.close()


@pytest.mark.parametrize("eviction", list(EvictionPolicy))
def test_capacity_evicts_tail_first_and_reports_evictions(eviction: EvictionPolicy) -> None:
    # Both policies: PredictedReuse acts as tail-first LRU until it has learned anything.
    stored = HEADER_SIZE + 4096
    backend = MemoryBackend(MemoryConfig(capacity=4 * stored, eviction=eviction), _ctx())
    backend.open()
    try:
        chain_a = [_key(i) for i in range(3)]
        assert backend.put(chain_a, [_page(i) for i in range(3)]) == [PageStatus.OK] * 3
        chain_b = [_key(10 + i) for i in range(2)]
        assert backend.put(chain_b, [_page(i) for i in range(2)]) == [PageStatus.OK] * 2
        # One page had to go: the least recent, which is chain A's tail, never its head.
        assert backend.take_evicted() == [chain_a[2]]
        assert backend.exists_prefix(chain_a) == 2
        assert backend.stats()["stored_bytes"] == 4 * stored
        assert backend.take_evicted() == []
        # A batch larger than the whole capacity stores the prefix that fits, never a tail alone.
        big = [_key(100 + i) for i in range(6)]
        statuses = backend.put(big, [_page(i) for i in range(6)])
        assert statuses == [PageStatus.OK] * 4 + [PageStatus.FAILED] * 2
        assert backend.exists_prefix(big) == 4
        assert sorted(backend.take_evicted()) == sorted(chain_a[:2] + chain_b)
    finally:
        backend.close()


def test_capacity_parses_sizes_and_rejects_typos() -> None:
    assert MemoryConfig.model_validate({"capacity": "1MiB"}).capacity == 1 << 20
    with pytest.raises(ValueError, match="capacty"):
        MemoryConfig.model_validate({"capacty": "1MiB"})


def test_typed_destination_views_are_filled_bytewise() -> None:
    import array

    backend = MemoryBackend(MemoryConfig(), _ctx())
    backend.open()
    try:
        src = array.array("H", range(2048))
        assert backend.put([_key(1)], [memoryview(src)]) == [PageStatus.OK]
        dst = array.array("H", bytes(4096))
        assert backend.get_into([_key(1)], [memoryview(dst)]) == [PageStatus.OK]
        assert dst == src
    finally:
        backend.close()


def test_key_repeated_within_one_batch_is_stored_once() -> None:
    backend = MemoryBackend(MemoryConfig(), _ctx())
    backend.open()
    try:
        statuses = backend.put([_key(1), _key(1)], [_page(1), _page(2)])
        assert statuses == [PageStatus.OK, PageStatus.ALREADY_EXISTS]
        dst = memoryview(bytearray(4096))
        assert backend.get_into([_key(1)], [dst]) == [PageStatus.OK]
        assert bytes(dst) == bytes(_page(1))
        assert backend.stats()["pages"] == 1
    finally:
        backend.close()


def test_newer_writers_page_is_a_miss_that_stays() -> None:
    from hicache.testing.peer import as_newer_version

    backend = MemoryBackend(MemoryConfig(), _ctx())
    backend.open()
    try:
        keys = [_key(1), _key(2)]
        assert backend.put(keys, [_page(1), _page(2)]) == [PageStatus.OK] * 2
        page = _stored(backend, keys[0])
        original = bytes(page.header)
        page.header[:] = as_newer_version(original)
        dst = memoryview(bytearray(4096))
        assert backend.get_into(keys, [dst, memoryview(bytearray(4096))]) == [
            PageStatus.NOT_FOUND,
            PageStatus.OK,
        ]
        stats = backend.stats()
        assert (stats["unknown_version"], stats["corrupt"], stats["pages"]) == (1, 0, 2)
        page.header[:] = as_newer_version(bytes(page.header), version=1)  # still there, intact
        assert backend.get_into(keys[:1], [dst]) == [PageStatus.OK]
        assert bytes(dst) == bytes(_page(1))
    finally:
        backend.close()
