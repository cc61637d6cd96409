"""Page format: golden vectors, version refusal, and detection of every single-byte corruption."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hicache.errors import PageCorruptError, PageVersionError
from hicache.storage import pageformat as pf

DATA = Path(__file__).parent / "data" / "pageformat"
NS = "kv-0123456789abcdef"
KEY = "ab" * 32
VECTORS: dict[str, Any] = json.loads((DATA / "vectors.json").read_text())


def _vector_ids(v: dict[str, Any]) -> str:
    return str(v["name"])


@pytest.mark.parametrize("vec", VECTORS["vectors"], ids=_vector_ids)
def test_golden_vectors_decode(vec: dict[str, Any]) -> None:
    header = (DATA / vec["header_file"]).read_bytes()
    payload = (DATA / vec["payload_file"]).read_bytes()
    assert len(header) == pf.HEADER_SIZE == VECTORS["header_size"]
    assert header[:8].hex() == VECTORS["magic_hex"]
    decoded = pf.verify_page(header, payload, namespace=vec["namespace"], key=vec["key"])
    assert decoded == pf.PageHeader(
        version=vec["version"],
        namespace=vec["namespace"],
        key=vec["key"],
        payload_len=vec["payload_len"],
        checksum=int(vec["checksum"], 16),
    )
    assert pf.payload_checksum(payload) == int(vec["checksum"], 16)
    assert struct.unpack_from("<Q", header, pf.HEADER_SIZE - 8)[0] == int(
        vec["header_checksum"], 16
    )


@pytest.mark.parametrize("vec", VECTORS["vectors"], ids=_vector_ids)
def test_golden_vectors_encode_byte_exact(vec: dict[str, Any]) -> None:
    payload = (DATA / vec["payload_file"]).read_bytes()
    header = pf.encode_header(vec["namespace"], vec["key"], payload)
    assert header == (DATA / vec["header_file"]).read_bytes()
    assert hashlib.sha256(header).hexdigest() == vec["header_sha256"]
    buf = bytearray(b"\xee" * (pf.HEADER_SIZE + 10))
    pf.encode_header_into(buf, vec["namespace"], vec["key"], len(payload), int(vec["checksum"], 16))
    assert bytes(buf[: pf.HEADER_SIZE]) == header
    assert buf[pf.HEADER_SIZE :] == b"\xee" * 10  # nothing written past the header


@pytest.mark.parametrize("ref", VECTORS["refused"], ids=lambda r: str(r["header_file"]))
def test_future_version_refused_as_unknown_not_corrupt(ref: dict[str, Any]) -> None:
    header = (DATA / ref["header_file"]).read_bytes()
    with pytest.raises(PageVersionError) as info:
        pf.decode_header(header)
    assert not isinstance(info.value, PageCorruptError)
    assert info.value.version == ref["version"]
    assert str(ref["version"]) in str(info.value)


@pytest.mark.parametrize("version", [2, 3, 0xFFFF])
def test_newer_version_with_its_own_checksum_is_unknown(version: int) -> None:
    header = bytearray(pf.encode_header(NS, KEY, b"payload"))
    struct.pack_into("<H", header, 8, version)
    struct.pack_into("<Q", header, pf.HEADER_SIZE - 8, _header_checksum(header))
    with pytest.raises(PageVersionError) as info:
        pf.decode_header(header)
    assert info.value.version == version


def test_newer_version_of_another_size_is_unknown_however_short() -> None:
    # A newer format may have a shorter header: the version decides before the length does.
    header = bytearray(pf.encode_header(NS, KEY, b"payload"))
    struct.pack_into("<H", header, 8, 2)
    for cut in (10, 100, pf.HEADER_SIZE - 1):
        with pytest.raises(PageVersionError):
            pf.check_version(header[:cut])
        with pytest.raises(PageVersionError):
            pf.decode_header(header[:cut])
    pf.check_version(pf.encode_header(NS, KEY, b"payload")[:100])  # ours: no opinion
    with pytest.raises(PageCorruptError, match="length"):
        pf.decode_header(pf.encode_header(NS, KEY, b"payload")[:100])


@pytest.mark.parametrize("version", [2, 3, 0x8001])
def test_damaged_version_field_of_a_v1_page_is_corrupt(version: int) -> None:
    # The header checksum still describes version 1: a flipped bit, not a newer writer.
    header = bytearray(pf.encode_header(NS, KEY, b"payload"))
    struct.pack_into("<H", header, 8, version)
    with pytest.raises(PageCorruptError) as info:
        pf.decode_header(header)
    assert info.value.field == "version"


def test_older_version_is_corrupt() -> None:
    header = bytearray(pf.encode_header(NS, KEY, b"payload"))
    struct.pack_into("<H", header, 8, 0)
    struct.pack_into("<Q", header, pf.HEADER_SIZE - 8, _header_checksum(header))
    with pytest.raises(PageCorruptError) as info:
        pf.decode_header(header)
    assert info.value.field == "version"


def _header_checksum(header: bytearray) -> int:
    import xxhash

    return xxhash.xxh3_64_intdigest(bytes(header[: pf.HEADER_SIZE - 8]))


@pytest.mark.parametrize(("offset", "value"), [(10, 1), (14, 1)], ids=["flags", "reserved"])
def test_unknown_flags_are_a_newer_writers_page(offset: int, value: int) -> None:
    header = bytearray(pf.encode_header(NS, KEY, b"payload"))
    header[offset] = value
    struct.pack_into("<Q", header, pf.HEADER_SIZE - 8, _header_checksum(header))
    with pytest.raises(PageVersionError) as info:
        pf.decode_header(header)
    assert info.value.version == pf.FORMAT_VERSION


def test_every_single_byte_header_corruption_detected() -> None:
    payload = bytes(range(256)) * 16
    header = pf.encode_header(NS, KEY, payload)
    fields: set[str] = set()
    for pos in range(pf.HEADER_SIZE):
        # Two flips per byte: one bit (bit rot) and all bits (a torn or zeroed write).
        for flip in (0x01 << (pos % 8), 0xFF):
            bad = bytearray(header)
            bad[pos] ^= flip
            with pytest.raises(PageCorruptError) as info:
                pf.verify_page(bad, payload, namespace=NS, key=KEY)
            fields.add(info.value.field)
            if pos < 8:
                assert info.value.field == "magic"
            elif pos < 10:
                assert info.value.field == "version"
            else:
                assert info.value.field == "header_checksum"
    assert fields == {"magic", "version", "header_checksum"}


def test_every_single_byte_payload_corruption_detected_small_page() -> None:
    payload = bytes(random.Random(1).getrandbits(8) for _ in range(4096))
    header = pf.encode_header(NS, KEY, payload)
    for pos in range(len(payload)):
        bad = bytearray(payload)
        bad[pos] ^= 0x01 << (pos % 8)
        with pytest.raises(PageCorruptError) as info:
            pf.verify_page(header, bad, namespace=NS, key=KEY)
        assert info.value.field == "checksum"


def test_sampled_payload_corruption_detected_large_page() -> None:
    rng = random.Random(2)
    payload = bytearray(rng.randbytes(1 << 20))
    header = pf.encode_header(NS, KEY, payload)
    positions = [0, 1, 4095, 4096, len(payload) // 2, len(payload) - 1]
    positions += rng.sample(range(len(payload)), 64)
    for pos in positions:
        old = payload[pos]
        payload[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(PageCorruptError) as info:
            pf.verify_page(header, payload, namespace=NS, key=KEY)
        assert info.value.field == "checksum"
        payload[pos] = old
    pf.verify_page(header, payload, namespace=NS, key=KEY)  # restored page passes again


@given(
    payload=st.binary(min_size=1, max_size=8192),
    data=st.data(),
)
def test_payload_corruption_detected_hypothesis(payload: bytes, data: st.DataObject) -> None:
    header = pf.encode_header(NS, KEY, payload)
    pos = data.draw(st.integers(0, len(payload) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(payload)
    bad[pos] ^= flip
    with pytest.raises(PageCorruptError) as info:
        pf.verify_page(header, bad, namespace=NS, key=KEY)
    assert info.value.field == "checksum"
    assert pf.verify_page(header, payload, namespace=NS, key=KEY).payload_len == len(payload)


@given(
    namespace=st.from_regex(r"[0-9a-z][0-9a-z_-]{0,63}", fullmatch=True),
    key=st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
    payload=st.binary(max_size=512),
)
def test_round_trip_hypothesis(namespace: str, key: str, payload: bytes) -> None:
    header = pf.encode_header(namespace, key, payload)
    assert len(header) == pf.HEADER_SIZE
    decoded = pf.verify_page(header, memoryview(payload), namespace=namespace, key=key)
    assert (decoded.namespace, decoded.key, decoded.payload_len) == (namespace, key, len(payload))
    assert decoded.version == pf.FORMAT_VERSION


def test_wrong_namespace_key_length_named() -> None:
    payload = b"x" * 100
    header = pf.encode_header(NS, KEY, payload)
    cases = [
        ({"namespace": "other", "key": KEY}, payload, "namespace"),
        ({"namespace": NS, "key": "cd" * 32}, payload, "key"),
        ({"namespace": NS, "key": KEY}, payload[:-1], "length"),
        ({"namespace": NS, "key": KEY}, payload + b"x", "length"),
    ]
    for kwargs, body, field in cases:
        with pytest.raises(PageCorruptError) as info:
            pf.verify_page(header, body, **kwargs)
        assert info.value.field == field
    with pytest.raises(PageCorruptError) as info:
        pf.decode_header(header[:-1])
    assert info.value.field == "length"


def test_check_payload_false_skips_hash_but_not_length() -> None:
    payload = bytearray(b"y" * 64)
    header = pf.encode_header(NS, KEY, payload)
    payload[3] ^= 1
    pf.verify_page(header, payload, namespace=NS, key=KEY, check_payload=False)
    with pytest.raises(PageCorruptError):
        pf.verify_page(header, payload[:10], namespace=NS, key=KEY, check_payload=False)


def test_decode_accepts_longer_buffer_and_views() -> None:
    payload = bytes(1000)
    slot = bytearray(pf.stored_size(len(payload)))
    pf.encode_header_into(slot, NS, KEY, len(payload), pf.payload_checksum(payload))
    slot[pf.HEADER_SIZE :] = payload
    view = memoryview(slot)
    decoded = pf.verify_page(view, view[pf.HEADER_SIZE :], namespace=NS, key=KEY)
    assert decoded.payload_len == 1000


def test_encode_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="namespace"):
        pf.encode_header("Bad NS", KEY, b"")
    with pytest.raises(ValueError, match="page key"):
        pf.encode_header(NS, "xyz", b"")
    with pytest.raises(ValueError, match="bytes"):
        pf.encode_header_into(bytearray(100), NS, KEY, 0, 0)
    with pytest.raises(ValueError, match="read-only"):
        pf.encode_header_into(memoryview(bytes(pf.HEADER_SIZE)), NS, KEY, 0, 0)
    with pytest.raises(ValueError, match="payload_len"):
        pf.encode_header_into(bytearray(pf.HEADER_SIZE), NS, KEY, -1, 0)


def test_checksum_and_verify_copy_no_payload() -> None:
    payload = bytearray(32 << 20)
    payload[12345] = 7
    header = pf.encode_header(NS, KEY, memoryview(payload))
    tracemalloc.start()
    try:
        pf.payload_checksum(memoryview(payload)[1:])
        pf.verify_page(header, memoryview(payload), namespace=NS, key=KEY)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"verifying a 32 MiB payload allocated {peak} bytes"
