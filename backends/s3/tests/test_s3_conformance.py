"""The conformance kit against a real S3 HTTP endpoint (moto's server on 127.0.0.1)."""

from __future__ import annotations

from typing import Any

import pytest
from hicache_s3 import S3Backend
from hicache_s3.devserver import DevServer
from hicache_s3.testing import fast_options

from hicache.storage import HEADER_SIZE, Backend, PageStatus
from hicache.testing.kit import BackendTests


def _rewrite(backend: Backend, key: str, edit: Any) -> None:
    """Replace the stored object of ``key`` with ``edit(bytearray(old body))``, bypassing it."""
    assert isinstance(backend, S3Backend)
    client, bucket = backend.client, backend.options.bucket
    object_key = backend.object_key(key)
    body = bytearray(client.get_object(Bucket=bucket, Key=object_key)["Body"].read())
    client.put_object(Bucket=bucket, Key=object_key, Body=bytes(edit(body)))


def _flip(offset: int) -> Any:
    def edit(body: bytearray) -> bytearray:
        body[offset] ^= 0x01
        return body

    return edit


class TestS3Conformance(BackendTests):
    backend_cls = S3Backend
    # HTTP round trips are slower than files: fewer rounds, same coverage
    concurrency_rounds = 8
    state_machine_steps = 10
    state_machine_examples = 5
    max_pages_above_max_batch = 1100

    @pytest.fixture
    def backend_options(self, s3_server: DevServer, bucket: str) -> dict[str, Any]:
        return fast_options(s3_server.endpoint_url, bucket, max_concurrency=16)

    def corrupt_payload(self, backend: Backend, key: str) -> None:
        _rewrite(backend, key, _flip(HEADER_SIZE + 1234))

    def corrupt_header(self, backend: Backend, key: str) -> None:
        _rewrite(backend, key, _flip(100))

    def truncate_page(self, backend: Backend, key: str) -> None:
        _rewrite(backend, key, lambda body: body[: len(body) - 1])

    def test_other_keys_body_reported_corrupt(self, backend: Backend) -> None:
        """An object holding another page's (valid) body must not pass as this page."""
        assert isinstance(backend, S3Backend)
        victim, donor = self.keys(2, "swap")
        assert self.put_pages(backend, [victim, donor]) == [PageStatus.OK] * 2
        client, bucket = backend.client, backend.options.bucket
        donor_body = client.get_object(Bucket=bucket, Key=backend.object_key(donor))["Body"].read()
        client.put_object(Bucket=bucket, Key=backend.object_key(victim), Body=donor_body)
        statuses, bufs = self.read_pages(backend, [victim, donor])
        assert statuses == [PageStatus.CORRUPT, PageStatus.OK]
        assert bufs[1] == self.page(donor)
        assert backend.stats()["corrupt"] == 1
