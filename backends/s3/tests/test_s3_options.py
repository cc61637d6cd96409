"""Options, configs and the zero-copy upload body (no server needed)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hicache_s3 import S3Backend, S3Options
from hicache_s3.body import PageBody, read_exact
from hicache_s3.options import parse_duration, strip_userinfo
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from hicache.config import load_config, validate_tiers
from hicache.storage import BackendContext, load_backend_class

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def test_entry_point_resolves_to_the_backend() -> None:
    assert load_backend_class("s3") is S3Backend


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bucket", "Bad_Bucket"),
        ("bucket", "ab"),
        ("prefix", "a//b"),
        ("endpoint_url", "ftp://host"),
        ("addressing_style", "dns"),
        ("max_concurrency", 0),
        ("refresh_after", "soon"),
        ("refresh_after", 0),
        ("checksum", "md5"),
        ("unknown_option", 1),
    ],
)
def test_bad_options_are_rejected_naming_the_field(field: str, value: object) -> None:
    options = {"bucket": "kv-bucket", field: value}
    with pytest.raises(ValidationError) as info:
        S3Options.model_validate(options)
    assert field in str(info.value)


def test_defaults_and_normalisation() -> None:
    options = S3Options(bucket="kvs", prefix="/prod/a/", refresh_after="3d", exists_cache_ttl="2s")
    assert options.prefix == "prod/a" and options.object_prefix("ns") == "prod/a/ns/"
    assert S3Options(bucket="kvs").object_prefix("ns") == "ns/"
    assert options.refresh_after == 3 * 86400 and options.exists_cache_ttl == 2.0
    assert options.max_concurrency == 32 and options.endpoint_url is None


@pytest.mark.parametrize(
    ("text", "seconds"), [("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("12h", 43200.0), (7, 7.0)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_userinfo_never_reaches_botocore() -> None:
    assert strip_userinfo("http://user:p@ss@host:9000/x") == "http://host:9000/x"
    assert strip_userinfo("https://s3.example.com") == "https://s3.example.com"


def test_credentials_are_secret_and_come_in_pairs() -> None:
    marker = "MARKER-7f3a"
    options = S3Options(
        bucket="kvs",
        endpoint_url=f"http://ak:{marker}@127.0.0.1:1",
        access_key_id=marker,
        secret_access_key=marker,
        session_token=marker,
    )
    assert options.secret_access_key is not None
    assert options.secret_access_key.get_secret_value() == marker
    assert marker not in repr(options) and marker not in str(options)
    assert marker not in options.model_dump_json()
    with pytest.raises(ValidationError, match="set together") as caught:
        S3Options(bucket="kvs", secret_access_key=marker)
    assert marker not in str(caught.value)
    with pytest.raises(ValidationError) as caught:
        S3Options(bucket="kvs", access_key_id=[marker], secret_access_key={"x": marker})
    assert marker not in str(caught.value)


def test_repr_names_location_not_secrets() -> None:
    context = BackendContext(page_bytes=4096, namespace="ns", tier_name="t")
    backend = S3Backend(S3Options(bucket="kvs", endpoint_url="http://k:s@127.0.0.1:1"), context)
    assert repr(backend) == (
        "S3Backend(bucket='kvs', prefix='', namespace='ns', endpoint='http://***@127.0.0.1:1')"
    )


@pytest.mark.parametrize(("name", "tier"), [("s3.yaml", "s3"), ("tiered.yaml", "shared")])
def test_endpoint_comes_from_the_environment(
    name: str, tier: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented variable sets the endpoint and merges with the file's other options."""
    monkeypatch.setenv(
        f"HICACHE_STORAGE__TIERS__{tier.upper()}__OPTIONS__ENDPOINT_URL", "http://127.0.0.1:9"
    )
    config = load_config(CONFIGS / name)
    options = validate_tiers(config)[tier]
    assert isinstance(options, S3Options)
    assert options.endpoint_url == "http://127.0.0.1:9"
    assert options.bucket == config.storage.tiers[tier].options["bucket"]


@given(
    header=st.binary(min_size=0, max_size=64),
    payload=st.binary(min_size=0, max_size=256),
    ops=st.lists(
        st.tuples(st.sampled_from(["read", "seek_set", "seek_cur", "seek_end"]), st.integers(0, 80))
    ),
)
def test_page_body_reads_like_the_concatenation(
    header: bytes, payload: bytes, ops: list[tuple[str, int]]
) -> None:
    body = PageBody(header, memoryview(payload))
    model = io.BytesIO(header + payload)
    assert len(body) == len(header) + len(payload)
    for op, n in ops:
        if op == "read":
            got = bytes(body.read(n))
            # a read never spans the two parts: a prefix of what the model returns
            want = model.read(n)
            assert want.startswith(got) and (got or not want)
            model.seek(body.tell())
        else:
            whence = {"seek_set": io.SEEK_SET, "seek_cur": io.SEEK_CUR, "seek_end": io.SEEK_END}
            offset = -min(n, len(header) + len(payload)) if op == "seek_end" else n
            assert body.seek(offset, whence[op]) == model.seek(offset, whence[op])
        assert body.tell() == model.tell()
    body.seek(0)
    assert body.read() == header + payload
    assert body.read(10) == b""


def test_page_body_reads_are_views_of_the_caller_payload() -> None:
    payload = bytearray(b"p" * 100)
    body = PageBody(b"h" * 10, memoryview(payload))
    assert bytes(body.read(50)) == b"h" * 10
    chunk = body.read(50)
    payload[0] = ord("q")
    assert isinstance(chunk, memoryview) and bytes(chunk[:1]) == b"q"  # no copy was made


def test_read_exact_fills_in_chunks_and_stops_at_end() -> None:
    class Raw:
        def __init__(self, data: bytes) -> None:
            self.stream = io.BytesIO(data)
            self.calls = 0

        def readinto(self, view: memoryview) -> int:
            self.calls += 1
            return self.stream.readinto(view)

    raw = Raw(bytes(range(256)) * 4)
    dst = bytearray(1024)
    assert read_exact(raw, memoryview(dst), 100) == 1024 and dst == bytes(range(256)) * 4
    assert raw.calls == 11
    short = bytearray(2048)
    assert read_exact(Raw(b"xy"), memoryview(short), 4096) == 2


def test_read_exact_falls_back_to_chunked_read() -> None:
    class ReadOnly:
        def __init__(self, data: bytes) -> None:
            self.stream = io.BytesIO(data)
            self.sizes: list[int] = []

        def read(self, n: int) -> bytes:
            self.sizes.append(n)
            return self.stream.read(n)

    body = ReadOnly(bytes(range(200)) * 5)
    dst = bytearray(1000)
    assert read_exact(body, memoryview(dst), 300) == 1000 and dst == bytes(range(200)) * 5
    assert max(body.sizes) == 300
