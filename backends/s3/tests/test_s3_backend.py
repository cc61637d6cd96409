"""S3-specific behaviour of the backend, against a real S3 HTTP endpoint (moto on 127.0.0.1)."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from typing import Any

import pytest
from hicache_s3 import S3Backend
from hicache_s3.devserver import DevServer
from hicache_s3.testing import (
    PAGE_BYTES,
    fast_options,
    make_s3_backend,
    page_keys,
    page_payloads,
)

from hicache.errors import BackendClosedError, BackendError
from hicache.storage import HEADER_SIZE, PageStatus, decode_header
from hicache.testing.wait import wait_for


def _get(backend: S3Backend, keys: list[str]) -> tuple[list[PageStatus], list[bytearray]]:
    bufs = [bytearray(b"\xee" * PAGE_BYTES) for _ in keys]
    return backend.get_into(keys, [memoryview(b) for b in bufs]), bufs


def test_object_layout_is_prefix_namespace_key_and_header_then_page(
    backend: S3Backend, s3: Any
) -> None:
    [key], [payload] = page_keys(1), page_payloads(1)
    assert backend.put([key], [payload]) == [PageStatus.OK]
    obj = s3.get_object(Bucket=backend.options.bucket, Key=f"tests/ns/{key}")
    body = obj["Body"].read()
    assert len(body) == HEADER_SIZE + PAGE_BYTES
    header = decode_header(body[:HEADER_SIZE])
    assert (header.namespace, header.key, header.payload_len) == ("ns", key, PAGE_BYTES)
    assert body[HEADER_SIZE:] == payload


def test_second_put_keeps_first_content(backend: S3Backend) -> None:
    [key] = page_keys(1)
    first, second = page_payloads(2)
    assert backend.put([key], [first]) == [PageStatus.OK]
    assert backend.put([key], [second]) == [PageStatus.ALREADY_EXISTS]
    statuses, [buf] = _get(backend, [key])
    assert statuses == [PageStatus.OK] and buf == first
    assert backend.stats()["already_exists"] == 1


def test_head_then_put_mode_skips_existing_keys(s3_options: dict[str, Any]) -> None:
    with make_s3_backend({**s3_options, "conditional_put": "never"}) as backend:
        assert isinstance(backend, S3Backend)
        keys, payloads = page_keys(3), page_payloads(3)
        assert backend.put(keys[:1], payloads[:1]) == [PageStatus.OK]
        assert backend.put(keys, page_payloads(3, seed=9)) == [
            PageStatus.ALREADY_EXISTS,
            PageStatus.OK,
            PageStatus.OK,
        ]
        statuses, bufs = _get(backend, keys[:1])
        assert statuses == [PageStatus.OK] and bufs[0] == payloads[0]


def test_exists_prefix_stops_at_first_gap(backend: S3Backend) -> None:
    keys = page_keys(200)
    stored = keys[:5] + keys[6:]  # a gap at index 5
    assert all(s.stored for s in backend.put(stored, page_payloads(len(stored))))
    heads_before = backend.stats()["heads"]
    assert backend.exists_prefix(keys) == 5
    heads = backend.stats()["heads"] - heads_before
    # ordered, windowed fan-out: at most one window (2 x max_concurrency) beyond the gap
    assert 6 <= heads <= 6 + 2 * backend.options.max_concurrency
    assert backend.exists(keys[4:7]) == [True, False, True]
    assert backend.exists_prefix(keys[6:]) == len(keys) - 6


def test_positive_exists_cache_only(s3_options: dict[str, Any], s3: Any) -> None:
    """Cached positives skip HEADs; a page added by someone else is seen at once (no negatives)."""
    with make_s3_backend({**s3_options, "exists_cache_ttl": "1h"}) as backend:
        assert isinstance(backend, S3Backend)
        a, b = page_keys(2)
        backend.put([a], page_payloads(1))
        assert backend.exists([a, b]) == [True, False]
        assert backend.stats()["exists_cache_hits"] == 1
        with make_s3_backend(s3_options) as other:  # another instance publishes b
            other.put([b], page_payloads(1, seed=3))
        assert backend.exists([a, b]) == [True, True]
        backend.delete([a])
        assert backend.exists([a]) == [False]


def test_refresh_after_recopies_old_objects_in_place(s3_options: dict[str, Any], s3: Any) -> None:
    [key], [payload] = page_keys(1), page_payloads(1)
    # A backend whose limit no read in this test gets near: a young object is not refreshed.
    with make_s3_backend({**s3_options, "refresh_after": "1h"}) as patient:
        assert isinstance(patient, S3Backend)
        patient.put([key], [payload])
        object_key = patient.object_key(key)
        created = s3.head_object(Bucket=patient.options.bucket, Key=object_key)["LastModified"]
        statuses, _ = _get(patient, [key])
    # close() waits for background copies: none was started
    assert statuses == [PageStatus.OK] and patient.stats()["refreshes"] == 0
    # Last-Modified has one-second resolution; wait until the object is older than the limit
    # below, then read it exactly once: exactly one refresh, however late that read runs.
    wait_for(lambda: (datetime.now(UTC) - created).total_seconds() > 1.5, what="object age > 1.5 s")
    with make_s3_backend({**s3_options, "refresh_after": "1s"}) as backend:
        assert isinstance(backend, S3Backend)
        statuses, [buf] = _get(backend, [key])
        assert statuses == [PageStatus.OK] and buf == payload
    # close() waits for the background copy
    assert backend.stats()["refreshes"] == 1
    head = s3.head_object(Bucket=backend.options.bucket, Key=object_key)
    assert head["LastModified"] > created
    assert "hicache-refreshed" in head["Metadata"]
    with make_s3_backend(s3_options) as again:  # the refreshed object is still a valid page
        statuses, [buf] = _get(again, [key])  # type: ignore[arg-type]
        assert statuses == [PageStatus.OK] and buf == payload


def test_sse_and_native_checksum_pass_through(s3_options: dict[str, Any], s3: Any) -> None:
    options = {**s3_options, "server_side_encryption": "AES256", "checksum": "crc32"}
    with make_s3_backend(options) as backend:
        assert isinstance(backend, S3Backend)
        [key], [payload] = page_keys(1), page_payloads(1)
        assert backend.put([key], [payload]) == [PageStatus.OK]
        head = s3.head_object(
            Bucket=backend.options.bucket, Key=backend.object_key(key), ChecksumMode="ENABLED"
        )
        assert head["ServerSideEncryption"] == "AES256"
        assert head.get("ChecksumCRC32")
        statuses, [buf] = _get(backend, [key])
        assert statuses == [PageStatus.OK] and buf == payload


def test_listing_and_namespaces(s3_options: dict[str, Any], s3: Any) -> None:
    with (
        make_s3_backend(s3_options, namespace="alpha") as alpha,
        make_s3_backend(s3_options, namespace="beta") as beta,
    ):
        alpha.put(page_keys(3, "x"), page_payloads(3))
        beta.put(page_keys(2, "y"), page_payloads(2))
        # a foreign object under the prefix is not mistaken for a page or a namespace
        s3.put_object(Bucket=s3_options["bucket"], Key="tests/NOT A NS/readme", Body=b"x")
        s3.put_object(Bucket=s3_options["bucket"], Key="tests/alpha/readme.txt", Body=b"x")
        assert {p.key for p in alpha.iter_pages()} == set(page_keys(3, "x"))
        assert {p.stored_bytes for p in beta.iter_pages()} == {HEADER_SIZE + PAGE_BYTES}
        assert set(alpha.iter_namespaces()) == {"alpha", "beta"}


def test_stats_and_repr_never_show_credentials(
    s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret, key_id = "Sup3rSecretValue/xyz", "AKIDSHOULDNOTLEAK"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    options = {**s3_options, "endpoint_url": s3_options["endpoint_url"].replace("//", "//u:pw@")}
    with make_s3_backend(options) as backend:
        backend.put(page_keys(1), page_payloads(1))
        shown = repr(backend) + json.dumps(backend.stats())
    for needle in (secret, key_id, "u:pw@", ":pw"):
        assert needle not in shown
    assert s3_options["bucket"] in shown


def test_concurrent_callers_share_the_worker_pool(backend: S3Backend) -> None:
    """Several engine threads calling at once each get their own pages back."""
    errors: list[BaseException] = []

    def worker(tid: int) -> None:
        try:
            keys, payloads = page_keys(12, f"t{tid}"), page_payloads(12, seed=tid)
            assert all(s is PageStatus.OK for s in backend.put(keys, payloads))
            statuses, bufs = _get(backend, keys)
            assert statuses == [PageStatus.OK] * 12
            assert [bytes(b) for b in bufs] == [bytes(p) for p in payloads]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_racing_conditional_puts_have_one_winner(s3_server: DevServer, bucket: str) -> None:
    """Two writers (separate clients) race create-only puts of the same keys with different
    bytes: per key exactly one OK and one ALREADY_EXISTS, and the stored bytes are the winner's."""
    options = fast_options(s3_server.endpoint_url, bucket)
    keys = page_keys(16, "race")
    contents = [page_payloads(16, seed=1), page_payloads(16, seed=2)]
    results: list[list[PageStatus]] = [[], []]
    barrier = threading.Barrier(2)
    with make_s3_backend(options) as one, make_s3_backend(options) as two:

        def writer(idx: int, backend: Any) -> None:
            barrier.wait()
            results[idx] = backend.put(keys, contents[idx])

        threads = [threading.Thread(target=writer, args=(i, b)) for i, b in enumerate((one, two))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses, bufs = _get(one, keys)  # type: ignore[arg-type]
    assert statuses == [PageStatus.OK] * len(keys)
    for i in range(len(keys)):
        pair = {results[0][i], results[1][i]}
        assert pair == {PageStatus.OK, PageStatus.ALREADY_EXISTS}, (i, pair)
        winner = 0 if results[0][i] is PageStatus.OK else 1
        assert bufs[i] == contents[winner][i]


def test_close_during_calls_raises_only_closed_errors(s3_options: dict[str, Any]) -> None:
    """close() racing batch calls: each call completes or raises BackendClosedError."""
    backend = make_s3_backend(s3_options)
    backend.open()
    keys, payloads = page_keys(16, "closing"), page_payloads(16)
    seen: list[BaseException] = []
    started = threading.Event()

    def caller() -> None:
        try:
            while True:
                backend.put(keys, payloads)
                started.set()
                _get(backend, keys)
        except BaseException as exc:
            seen.append(exc)

    thread = threading.Thread(target=caller)
    thread.start()
    assert started.wait(30), "no call got through before close"
    backend.close()
    thread.join(30)
    assert not thread.is_alive()
    assert len(seen) == 1 and isinstance(seen[0], BackendClosedError), seen


def test_crc32c_without_crt_is_a_clear_error_at_open(s3_options: dict[str, Any]) -> None:
    import importlib.util

    backend = make_s3_backend({**s3_options, "checksum": "crc32c"})
    if importlib.util.find_spec("awscrt") is not None:  # pragma: no cover - crt installed
        with backend:
            assert backend.put(page_keys(1), page_payloads(1)) == [PageStatus.OK]
        return
    with pytest.raises(BackendError, match=r"hicache-s3\[crt\]"):
        backend.open()
