"""The KV-event wire format, checked by a decoder that owes nothing to hicache.

The msgspec structs below re-declare vLLM's ``KVEventBatch`` / ``BlockStored`` / ``BlockRemoved``
/ ``AllBlocksCleared`` layout (positional ``array_like`` structs, events tagged by class name,
``omit_defaults``), the way routers that import vLLM decode them. The hash chain is rebuilt from
the published ``token_ids`` and ``parent_block_hash`` with the byte-exact definition of DESIGN.md
(seed, then ``sha256(parent || tokens as little-endian uint32)``), written out here again. The
encoding is pinned by golden bytes in ``tests/data/kv_events_golden.msgpack``.
"""

from __future__ import annotations

import hashlib
import struct
import time
from pathlib import Path
from typing import Any

import pytest

msgspec = pytest.importorskip("msgspec")
zmq = pytest.importorskip("zmq")

GOLDEN = Path(__file__).parent / "data" / "kv_events_golden.msgpack"
WAIT_S = 60.0


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """vLLM's base: ``["<ClassName>", field, ...]`` on the wire."""


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


DECODER = msgspec.msgpack.Decoder(KVEventBatch)

#: The batch the golden bytes hold, as the independent structs.
GOLDEN_BATCH = KVEventBatch(
    ts=1_700_000_000.25,
    events=[
        BlockStored([1, -2, 2**62], None, list(range(12)), 4, None, "GPU"),
        BlockStored([-(2**63)], 2**62, [70000, 0, 4294967295, 5], 4, 3, "CPU_PINNED"),
        BlockRemoved([1, -2], "DISK"),
        AllBlocksCleared(),
    ],
    data_parallel_rank=0,
)


def _hicache_batch() -> tuple[float, list[Any], int]:
    from hicache import events as ev

    return (
        1_700_000_000.25,
        [
            ev.BlockStored([1, -2, 2**62], None, list(range(12)), 4, None, ev.Medium.GPU),
            ev.BlockStored([-(2**63)], 2**62, [70000, 0, 4294967295, 5], 4, 3, "CPU_PINNED"),
            ev.BlockRemoved([1, -2], "DISK"),
            ev.AllBlocksCleared(),
        ],
        0,
    )


def test_hicache_encodes_the_golden_bytes_that_vllm_s_structs_encode_and_decode() -> None:
    from hicache.event_publisher import encode_batch

    golden = GOLDEN.read_bytes()
    ts, events, dp_rank = _hicache_batch()
    assert encode_batch(events, ts, dp_rank) == golden
    # byte for byte what vLLM's own msgspec encoder writes for the same batch
    assert msgspec.msgpack.encode(GOLDEN_BATCH) == golden
    assert DECODER.decode(golden) == GOLDEN_BATCH
    # vLLM omits data_parallel_rank when unset; hicache writes nil, which decodes the same
    unset = encode_batch(events, ts, None)
    assert DECODER.decode(unset).data_parallel_rank is None


# ---------------------------------------------------------------------- hash chains


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


def _str(value: str) -> bytes:
    raw = value.encode()
    return _u32(len(raw)) + raw


def seed(model: str, revision: str, salt: str = "") -> bytes:
    """The chain seed as DESIGN.md defines it: ``sha256(b"hicache/seed\\0" || u32(1) ||
    str(model) || str(revision) || str(salt))``."""
    return hashlib.sha256(
        b"hicache/seed\x00" + _u32(1) + _str(model) + _str(revision) + _str(salt)
    ).digest()


def event_id(h: bytes) -> int:
    return int.from_bytes(h[:8], "big", signed=True)


def published_batches(pub: Any) -> list[bytes]:
    """Every payload the publisher sent, fetched back from its replay socket."""
    assert pub.flush(WAIT_S)
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.RCVTIMEO, int(WAIT_S * 1000))
        dealer.connect(pub.replay_endpoint)
        dealer.send_multipart([b"", (0).to_bytes(8, "big", signed=True)])
        payloads: list[bytes] = []
        expected_seq = 0
        while True:
            _, seq_bytes, payload = dealer.recv_multipart()
            seq = int.from_bytes(seq_bytes, "big", signed=True)
            if seq == -1:
                return payloads
            assert seq == expected_seq
            expected_seq += 1
            payloads.append(payload)
    finally:
        ctx.destroy(linger=0)


def test_published_bytes_decode_and_rebuild_every_hash_chain(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from hicache.config import HicacheConfig
    from hicache.hiradix import HiRadixCache

    config = HicacheConfig(
        cache={"page_size": 4, "device": "cpu", "host_pool": "64KiB"},
        model={
            "name": "org/golden",
            "revision": "r1",
            "num_layers": 1,
            "num_kv_heads": 1,
            "head_dim": 8,
            "dtype": "float16",
        },
        storage={
            "prefetch": {"policy": "wait_complete", "threshold_tokens": 4},
            "tiers": {"ram": {"backend": "memory", "medium": "CPU"}},
        },
        events={
            "publisher": "zmq",
            "endpoint": "tcp://127.0.0.1:*",
            "replay_endpoint": "tcp://127.0.0.1:*",
            "topic": "kv@{instance}@{model}",
            "instance": "pod-7",
        },
    )
    cache = HiRadixCache.from_config(config, device_pages=12)
    try:
        prompts = [
            list(range(100, 116)),  # 4 pages
            [*range(100, 108), *range(200, 212)],  # shares 2 pages, then its own 3
            [*range(100, 116), *range(300, 304)],  # extends the first by one page
        ]
        for tokens in prompts:
            r = cache.match_prefix(tokens)
            have = len(r.device_pages)
            need = len(tokens) // 4 - have
            new = cache.device_pool.alloc(need)
            if new is None:
                cache.evict(need)
                new = cache.device_pool.alloc(need)
            assert new is not None
            cache.insert(tokens, r.device_pages + new)
            while cache.ongoing_write_through:
                cache.writing_check()
            assert cache.storage is not None
            assert cache.storage.wait_idle(WAIT_S)
            cache.writing_check()
            cache.publish_events()
        cache.evict(cache.total_device_pages())  # L1 empties: BlockRemoved(GPU), host copies stay
        cache.publish_events()
        payloads = published_batches(cache.event_publisher)
    finally:
        cache.close()

    batches = [DECODER.decode(p) for p in payloads]
    full: dict[int, bytes] = {}
    present: dict[str, set[int]] = {}
    root = seed("org/golden", "r1")
    stored = 0
    for batch in batches:
        assert batch.data_parallel_rank == 0
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                on = present.setdefault(str(ev.medium), set())
                if ev.parent_block_hash is None:
                    prev = root
                else:
                    # a block is announced only after its parent, on the same medium
                    assert ev.parent_block_hash in on, ev
                    prev = full[ev.parent_block_hash]
                bs = ev.block_size
                assert len(ev.token_ids) == bs * len(ev.block_hashes)
                for i, bid in enumerate(ev.block_hashes):
                    tokens = ev.token_ids[i * bs : (i + 1) * bs]
                    h = hashlib.sha256(prev + struct.pack(f"<{bs}I", *tokens)).digest()
                    assert event_id(h) == bid, "the block hash does not follow its chain"
                    full[bid] = h
                    on.add(bid)
                    prev = h
                    stored += 1
            elif isinstance(ev, BlockRemoved):
                on = present.setdefault(str(ev.medium), set())
                assert set(ev.block_hashes) <= on, "removed a block never announced"
                on.difference_update(ev.block_hashes)
            else:
                pytest.fail(f"unexpected {ev!r}")
    assert set(present) == {"GPU", "CPU_PINNED", "CPU"}
    # 4 + 3 + 1 distinct pages, announced on each medium once
    assert stored == 3 * 8
    assert present["GPU"] == set()
    assert len(present["CPU_PINNED"]) == len(present["CPU"]) == 8


def test_topic_frame_follows_the_llm_d_template() -> None:
    from hicache import events as ev
    from hicache.config import EventsConfig
    from hicache.event_publisher import publisher_from_config

    events = EventsConfig(
        publisher="zmq",
        endpoint="tcp://127.0.0.1:*",
        topic="kv@{instance}@{model}",
        instance="10.0.0.7",
    )
    pub = publisher_from_config(events, model="meta-llama/Llama-3.1-8B")
    assert pub is not None
    ctx = zmq.Context()
    try:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
        sub.connect(pub.endpoint)  # type: ignore[attr-defined]
        deadline = time.monotonic() + WAIT_S
        while not sub.poll(50):  # the slow joiner: publish until the subscription is live
            assert time.monotonic() < deadline
            pub.publish([ev.AllBlocksCleared()])
        topic, _seq, payload = sub.recv_multipart()
        assert topic == b"kv@10.0.0.7@meta-llama/Llama-3.1-8B"
        assert topic.decode().split("@") == ["kv", "10.0.0.7", "meta-llama/Llama-3.1-8B"]
        assert DECODER.decode(payload).events == [AllBlocksCleared()]
    finally:
        pub.close()
        ctx.destroy(linger=0)
