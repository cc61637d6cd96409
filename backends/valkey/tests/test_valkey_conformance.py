"""The conformance kit against a real server, for both layouts: a page in one value, and a page
split into chunks written by one Lua script (a small ``max_value_bytes`` forces it)."""

from __future__ import annotations

from typing import Any

import pytest
from hicache_valkey import ValkeyBackend
from hicache_valkey.devserver import DevCluster, DevServer
from hicache_valkey.testing import fast_options

from hicache.storage import HEADER_SIZE, Backend, PageStatus
from hicache.testing.kit import BackendTests


class TestValkeyConformance(BackendTests):
    backend_cls = ValkeyBackend
    max_pages_above_max_batch = 1100

    @pytest.fixture
    def backend_options(self, valkey_server: DevServer) -> dict[str, Any]:
        return fast_options(valkey_server.port)

    def _rewrite(self, backend: Backend, key: str, offset: int | None, cut: bool = False) -> None:
        """Flip the stored byte at ``offset`` of the page (header + payload), or cut the page
        short by one byte, with redis-py: around the backend."""
        assert isinstance(backend, ValkeyBackend)
        page_key = backend.keyspace.page(key)
        client = redis_client(backend)
        try:
            names = [page_key]
            i = 0
            while client.exists(page_key + b":%d" % i):
                names.append(page_key + b":%d" % i)
                i += 1
            values = [bytearray(client.get(n) or b"") for n in names]
            if cut:
                values[-1] = values[-1][:-1]
            else:
                assert offset is not None
                for value in values:
                    if offset < len(value):
                        value[offset] ^= 0x01
                        break
                    offset -= len(value)
            for name, value in zip(names, values, strict=True):
                client.set(name, bytes(value))
        finally:
            client.close()

    def corrupt_payload(self, backend: Backend, key: str) -> None:
        self._rewrite(backend, key, HEADER_SIZE + 1234)

    def corrupt_header(self, backend: Backend, key: str) -> None:
        self._rewrite(backend, key, 100)

    def truncate_page(self, backend: Backend, key: str) -> None:
        self._rewrite(backend, key, None, cut=True)

    def test_other_keys_body_reported_corrupt(self, backend: Backend) -> None:
        """A value holding another page's (valid) page must not pass as this page."""
        assert isinstance(backend, ValkeyBackend)
        victim, donor = self.keys(2, "swap")
        assert self.put_pages(backend, [victim, donor]) == [PageStatus.OK] * 2
        client = redis_client(backend)
        try:
            # GET + SET, not COPY: in a cluster the two keys live in different slots
            client.set(backend.keyspace.page(victim), client.get(backend.keyspace.page(donor)))
        finally:
            client.close()
        statuses, bufs = self.read_pages(backend, [victim, donor])
        assert statuses == [PageStatus.CORRUPT, PageStatus.OK]
        assert bufs[1] == self.page(donor)
        assert backend.stats()["corrupt"] == 1

    def test_small_pipeline_windows_keep_order(self, backend_options: dict[str, Any]) -> None:
        """Batches far larger than one pipeline window (3 commands, 64 KiB) come back whole
        and in order, for puts, gets, exists and deletes."""
        opts = {**backend_options, "pipeline_depth": 3, "pipeline_bytes": 65536}
        instance = self.make_backend(opts)
        instance.open()
        try:
            keys = self.keys(50, "windows")
            assert self.put_pages(instance, keys[::2]) == [PageStatus.OK] * 25
            assert instance.exists(keys) == [i % 2 == 0 for i in range(50)]
            statuses, bufs = self.read_pages(instance, keys)
            assert statuses == [PageStatus.OK, PageStatus.NOT_FOUND] * 25
            assert all(bufs[i] == self.page(keys[i]) for i in range(0, 50, 2))
            instance.delete(keys)
            assert instance.exists(keys) == [False] * 50
        finally:
            instance.close()

    def test_payload_checksum_mismatch_deletes_and_reports(self, backend: Backend) -> None:
        """A proven checksum mismatch is removed (so the next put repairs it) and reported."""
        damaged, intact = self.keys(2, "repair")
        assert self.put_pages(backend, [damaged, intact]) == [PageStatus.OK] * 2
        backend.take_evicted()
        self.corrupt_payload(backend, damaged)
        statuses, _ = self.read_pages(backend, [damaged, intact])
        assert statuses == [PageStatus.CORRUPT, PageStatus.OK]
        assert backend.take_evicted() == [damaged]
        assert backend.exists([damaged, intact]) == [False, True]
        assert self.put_pages(backend, [damaged]) == [PageStatus.OK]
        statuses, bufs = self.read_pages(backend, [damaged])
        assert statuses == [PageStatus.OK] and bufs[0] == self.page(damaged)


class TestValkeyChunkedConformance(TestValkeyConformance):
    """Pages of 16 KiB with values of at most 8 KiB: a header key and two chunk keys.

    A chunk list shorter than the header says is what an evicted chunk looks like, so it reads
    as a miss (``test_chunk_eviction_loses_the_whole_page``); the truncation hook here cuts the
    header value, the one part whose length alone proves damage.
    """

    def truncate_page(self, backend: Backend, key: str) -> None:
        assert isinstance(backend, ValkeyBackend)
        client = redis_client(backend)
        try:
            page_key = backend.keyspace.page(key)
            client.set(page_key, (client.get(page_key) or b"")[:-1])
        finally:
            client.close()

    @pytest.fixture
    def backend_options(self, valkey_server: DevServer) -> dict[str, Any]:
        # its own key prefix: the kit's keys repeat across classes within one process run
        return fast_options(valkey_server.port, max_value_bytes=8192, key_prefix="chunked")

    def test_layout_is_chunked(self, backend: Backend) -> None:
        assert isinstance(backend, ValkeyBackend)
        [key] = self.keys(1, "layout")
        assert self.put_pages(backend, [key]) == [PageStatus.OK]
        client = redis_client(backend)
        try:
            page_key = backend.keyspace.page(key)
            assert client.strlen(page_key) == HEADER_SIZE
            assert [client.strlen(page_key + b":%d" % i) for i in range(3)] == [8192, 8192, 0]
        finally:
            client.close()


class TestValkeyClusterConformance(TestValkeyConformance):
    """The kit on a three-node cluster: pages spread over the masters by their hash tag."""

    @pytest.fixture
    def backend_options(self, valkey_cluster: DevCluster) -> dict[str, Any]:
        return fast_options(valkey_cluster.port, cluster=True)


def redis_client(backend: ValkeyBackend) -> Any:
    from hicache_valkey.baseline import redis_client as make

    return make(backend.options)
