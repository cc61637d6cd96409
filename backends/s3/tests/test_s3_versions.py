"""Mixed-version tiers on S3: an object a newer hicache wrote is a miss that stays in place,
counted apart from corruption, whatever its size. Another process reads the bucket."""

from __future__ import annotations

from typing import Any

from hicache_s3 import S3Backend
from hicache_s3.testing import PAGE_BYTES, make_s3_backend, page_keys, page_payloads

from hicache.storage import HEADER_SIZE, PageStatus
from hicache.testing.peer import as_newer_version, read_in_other_process


def test_newer_object_survives_a_reader_in_another_process(
    s3: Any, s3_options: dict[str, Any]
) -> None:
    bucket = s3_options["bucket"]
    with make_s3_backend(s3_options) as writer:
        assert isinstance(writer, S3Backend)
        newer, shorter, corrupt, _intact = keys = page_keys(4, "versions")
        payloads = page_payloads(4, seed=7)
        assert writer.put(keys, payloads) == [PageStatus.OK] * 4

        def raw(key: str) -> bytes:
            body: bytes = s3.get_object(Bucket=bucket, Key=writer.object_key(key))["Body"].read()
            return body

        def plant(key: str, data: bytes) -> None:
            s3.put_object(Bucket=bucket, Key=writer.object_key(key), Body=data)

        plant(newer, as_newer_version(raw(newer)))
        plant(shorter, as_newer_version(raw(shorter))[:-100])  # a newer format, another size
        damaged = bytearray(raw(corrupt))
        damaged[HEADER_SIZE + 7] ^= 0xFF  # a payload byte of a version-1 page: proven damage
        plant(corrupt, bytes(damaged))
        planted = {k: raw(k) for k in (newer, shorter)}

        seen = read_in_other_process(
            S3Backend, s3_options, page_bytes=PAGE_BYTES, namespace="ns", keys=keys
        )
        assert seen.statuses == [
            PageStatus.NOT_FOUND,
            PageStatus.NOT_FOUND,
            PageStatus.CORRUPT,
            PageStatus.OK,
        ]
        assert seen.stats["unknown_version"] == 2
        assert seen.stats["corrupt"] == 1
        assert {k: raw(k) for k in planted} == planted
        # A reader that knows the format still reads it (here: the version put back).
        plant(newer, as_newer_version(planted[newer], version=1))
        dst = bytearray(PAGE_BYTES)
        assert writer.get_into([newer], [memoryview(dst)]) == [PageStatus.OK]
        assert dst == payloads[0]
