"""KV events over real ZMQ sockets on 127.0.0.1, in vLLM's wire format, with replay."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from hicache.config import HicacheConfig, load_config
from hicache.errors import ConfigError
from hicache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, Medium
from hicache.testing.wait import wait_for

zmq = pytest.importorskip("zmq")
msgpack = pytest.importorskip("msgpack")

from hicache.event_publisher import (  # noqa: E402  (after the optional-dependency skips)
    END_SEQ,
    ZmqEventPublisher,
    decode_batch,
    encode_batch,
)

#: The ``run_python`` fixture of tests/conftest.py.
RunPython = Callable[..., "subprocess.CompletedProcess[str]"]

pytestmark = pytest.mark.timeout(120)
LOCAL = "tcp://127.0.0.1:*"
DEADLINE_S = 30.0  # bounds only a test that already fails; a loaded machine needs room


def stored(i: int, medium: str = "GPU") -> BlockStored:
    return BlockStored([i, i + 1], i - 1 if i else None, [1, 2, 3, 4], 2, None, medium)


@pytest.fixture
def ctx() -> Iterator[Any]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def publisher() -> Iterator[ZmqEventPublisher]:
    pub = ZmqEventPublisher(LOCAL, replay_endpoint=LOCAL, topic="kv", buffer_batches=5)
    yield pub
    pub.close()


def recv(sock: Any) -> tuple[int, list[KVEvent]]:
    """One message of the PUB stream: (seq, events); fails after the socket's RCVTIMEO."""
    topic, seq, payload = sock.recv_multipart()
    assert topic == b"kv" and len(seq) == 8
    return int.from_bytes(seq, "big", signed=True), decode_batch(payload)[1]


def subscribe(ctx: Any, pub: ZmqEventPublisher) -> tuple[Any, int]:
    """A SUB socket whose subscription is live, and the next seq it will receive.

    ZMQ's slow joiner: a PUB drops messages until the subscription reaches it, so publish
    markers until one arrives (bounded), then read up to the last marker sent. Each marker is
    sent before the next is queued: a slow publisher thread with a small queue must not drop
    one (it would never get a seq, and the next batch would start with a clear).
    """
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVTIMEO, int(DEADLINE_S * 1000))
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    sub.connect(pub.endpoint)
    deadline = time.monotonic() + DEADLINE_S
    sent = 0
    while not sub.poll(50):
        assert time.monotonic() < deadline, "subscription never became live"
        pub.publish([AllBlocksCleared()])
        sent += 1
        wait_for(lambda n=sent: pub.stats()["batches"] == n, what=f"marker {sent} sent")
    seq = -1
    while seq < sent - 1:  # every marker takes one seq, from 0
        seq, _ = recv(sub)
    return sub, sent


def replay(ctx: Any, endpoint: str, start: int) -> list[tuple[int, list[KVEvent]]]:
    """What a client recovers from the replay socket starting at ``start``."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVTIMEO, int(DEADLINE_S * 1000))
    dealer.connect(endpoint)
    dealer.send_multipart([b"", start.to_bytes(8, "big", signed=True)])
    got = []
    while True:
        empty, seq_bytes, payload = dealer.recv_multipart()
        seq = int.from_bytes(seq_bytes, "big", signed=True)
        assert empty == b""
        if seq == END_SEQ:
            assert payload == b""
            break
        got.append((seq, decode_batch(payload)[1]))
    dealer.close(linger=0)
    return got


# ---------------------------------------------------------------------- encoding


def test_round_trip_keeps_every_event_in_vllm_field_order() -> None:
    events: list[KVEvent] = [
        BlockStored([7, -8], None, [1, 2, 3, 4], 2, 3, Medium.CPU_PINNED),
        BlockStored([9], 7, [5, 6], 2, None, "DISK"),
        BlockRemoved([7], Medium.GPU),
        AllBlocksCleared(),
    ]
    payload = encode_batch(events, 12.5, 1)
    assert decode_batch(payload) == (12.5, events, 1)
    # The raw msgpack is what a vLLM router decodes: array-like, tagged, fields in order.
    assert msgpack.unpackb(payload) == [
        12.5,
        [
            ["BlockStored", [7, -8], None, [1, 2, 3, 4], 2, 3, "CPU_PINNED"],
            ["BlockStored", [9], 7, [5, 6], 2, None, "DISK"],
            ["BlockRemoved", [7], "GPU"],
            ["AllBlocksCleared"],
        ],
        1,
    ]


def test_decode_accepts_omitted_dp_rank_and_later_fields() -> None:
    # vLLM omits a default dp rank; newer producers append fields we do not know yet.
    raw = [
        1.0,
        [["BlockRemoved", [1], "GPU", "extra"], ["BlockStored", [2], 1, [0], 1, None, "GPU", 9]],
    ]
    ts, events, dp_rank = decode_batch(msgpack.packb(raw))
    assert (ts, dp_rank) == (1.0, None)
    assert events == [BlockRemoved([1], "GPU"), BlockStored([2], 1, [0], 1, None, "GPU")]
    with pytest.raises(ValueError, match="unknown or short event 'Nope'"):
        decode_batch(msgpack.packb([1.0, [["Nope"]], 0]))


# ---------------------------------------------------------------------- sockets


def test_subscriber_receives_batches_in_order_with_consecutive_seqs(
    ctx: Any, publisher: ZmqEventPublisher
) -> None:
    assert publisher.endpoint.startswith("tcp://127.0.0.1:") and not publisher.endpoint.endswith(
        "*"
    )
    sub, first = subscribe(ctx, publisher)
    batches = [[stored(i), BlockRemoved([i], "GPU")] for i in range(20)]
    for batch in batches:
        publisher.publish(batch)
    received = [recv(sub) for _ in batches]
    assert [seq for seq, _ in received] == list(range(first, first + len(batches)))
    assert [events for _, events in received] == batches
    # the thread counts a batch just after sending it
    wait_for(lambda: publisher.stats()["batches"] == first + 20)
    stats = publisher.stats()
    assert (stats["events"], stats["dropped"], stats["next_seq"]) == (first + 40, 0, first + 20)


def test_late_subscriber_recovers_missed_batches_through_replay(
    ctx: Any, publisher: ZmqEventPublisher
) -> None:
    assert publisher.replay_endpoint is not None
    for i in range(8):  # nobody listens; the ring keeps the last 5
        publisher.publish([stored(i)])
    wait_for(lambda: publisher.stats()["batches"] == 8)
    assert replay(ctx, publisher.replay_endpoint, 6) == [(6, [stored(6)]), (7, [stored(7)])]
    # older than the ring: everything from the oldest kept batch
    assert replay(ctx, publisher.replay_endpoint, 0) == [(i, [stored(i)]) for i in range(3, 8)]
    assert replay(ctx, publisher.replay_endpoint, 8) == []
    assert publisher.stats()["replays"] == 3


class _GatedTokens(list[int]):
    """Token ids whose encoding waits for ``gate``: holds the publisher thread mid-batch."""

    def __init__(self, tokens: list[int], gate: threading.Event) -> None:
        super().__init__(tokens)
        self.gate = gate  # one per test: a repeated run must stall again

    def __iter__(self) -> Iterator[int]:
        assert self.gate.wait(DEADLINE_S), "gate never opened"
        return super().__iter__()


def test_overflow_is_counted_and_the_next_batch_starts_with_a_clear(ctx: Any) -> None:
    gate = threading.Event()
    pub = ZmqEventPublisher(LOCAL, topic="kv", max_pending=1)
    try:
        sub, first = subscribe(ctx, pub)
        gated = BlockStored([1], None, _GatedTokens([1, 2], gate), 2, None, "GPU")
        pub.publish([gated])  # the thread takes it and stalls encoding it
        wait_for(lambda: pub.stats()["pending"] == 0)
        pub.publish([stored(2)])  # fills the queue (max_pending=1)
        pub.publish([stored(3), stored(4)])  # dropped
        pub.publish([stored(5)])  # dropped
        stats = pub.stats()
        assert (stats["dropped"], stats["dropped_events"]) == (2, 3)
        gate.set()
        wait_for(lambda: pub.stats()["pending"] == 0)
        pub.publish([stored(6)])
        got = [recv(sub) for _ in range(3)]
        assert [seq for seq, _ in got] == [first, first + 1, first + 2]
        assert got[0][1] == [BlockStored([1], None, [1, 2], 2, None, "GPU")]
        assert got[1][1] == [stored(2)]
        assert got[2][1] == [AllBlocksCleared(), stored(6)]
        # the marker is sent once: later batches are plain
        pub.publish([stored(7)])
        assert recv(sub) == (first + 3, [stored(7)])
    finally:
        gate.set()
        pub.close()
    assert pub.closed
    with pytest.raises(RuntimeError, match="closed"):
        pub.publish([stored(8)])


def test_bind_failure_names_the_endpoint(publisher: ZmqEventPublisher) -> None:
    with pytest.raises(OSError, match=r"cannot bind events\.endpoint 'tcp://127\.0\.0\.1:\d+'"):
        ZmqEventPublisher(publisher.endpoint)


def test_without_pyzmq_hicache_imports_torch_free_and_the_publisher_says_what_to_install(
    run_python: RunPython,
) -> None:
    code = (
        "import sys\n"
        "sys.modules['zmq'] = None\n"
        "sys.modules['msgpack'] = None\n"
        "import hicache, hicache.config, hicache.event_publisher as ep\n"
        "assert 'torch' not in sys.modules\n"
        "try:\n"
        "    ep.ZmqEventPublisher('tcp://127.0.0.1:*')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = run_python(code, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pip install 'hicache[zmq]'" in result.stdout


# ---------------------------------------------------------------------- config and cache


def test_config_needs_an_endpoint_and_a_known_publisher(tmp_path: Any) -> None:
    path = tmp_path / "events.yaml"
    path.write_text("events:\n  publisher: zmq\n")
    with pytest.raises(ConfigError, match=r"events\.endpoint: required with publisher zmq"):
        load_config(path)
    with pytest.raises(ValidationError, match=r"events\.publisher[\s\S]*'zmq'"):
        HicacheConfig(events={"publisher": "kafka", "endpoint": "tcp://127.0.0.1:*"})
    with pytest.raises(ValidationError, match="buffer_batches"):
        HicacheConfig(events={"buffer_batches": 0})
    events = HicacheConfig(events={"publisher": "zmq", "endpoint": LOCAL}).events
    assert (events.topic, events.replay_endpoint, events.buffer_batches) == ("", None, 10_000)


def test_cache_from_config_publishes_the_events_of_an_insert(ctx: Any) -> None:
    pytest.importorskip("torch")
    from hicache.hiradix import HiRadixCache

    config = HicacheConfig(
        cache={"page_size": 4, "host_pool": 64 * 1024, "device": "cpu"},
        model={"name": "zmq-model", "num_layers": 1, "num_kv_heads": 1, "head_dim": 4},
        events={"publisher": "zmq", "endpoint": LOCAL, "replay_endpoint": LOCAL, "topic": "kv"},
    )
    cache = HiRadixCache.from_config(config, device_pages=16)
    try:
        publisher = cache.event_publisher
        assert isinstance(publisher, ZmqEventPublisher)
        sub, first = subscribe(ctx, publisher)
        pages = cache.device_pool.alloc(2)
        assert pages is not None
        cache.insert(list(range(100, 108)), pages)
        cache.writing_check()  # the CPU engine copies at once: the ack is ready now
        assert cache.publish_events() == 2  # one event per medium for the new node
        seq, events = recv(sub)
        assert seq == first
        stored_events = [e for e in events if isinstance(e, BlockStored)]
        assert [e.medium for e in stored_events] == ["GPU", "CPU_PINNED"]
        assert [len(e.block_hashes) for e in stored_events] == [2, 2]
        assert stored_events[1].token_ids == list(range(100, 108))
        wait_for(lambda: publisher.stats()["batches"] == first + 1)
        assert cache.stats()["publisher"] == publisher.stats()
    finally:
        cache.close()
    assert publisher.closed
    cache.close()  # idempotent


def test_publish_events_without_a_publisher_points_to_take_events() -> None:
    pytest.importorskip("torch")
    from hicache.hiradix import HiRadixCache

    config = HicacheConfig(
        cache={"page_size": 4, "host_pool": 64 * 1024, "device": "cpu"},
        model={"num_layers": 1, "num_kv_heads": 1, "head_dim": 4},
    )
    cache = HiRadixCache.from_config(config, device_pages=4)
    try:
        assert "publisher" not in cache.stats()
        with pytest.raises(RuntimeError, match="take_events"):
            cache.publish_events()
    finally:
        cache.close()


def test_only_tp_rank_0_publishes_the_others_discard_their_events() -> None:
    pytest.importorskip("torch")
    from hicache.hiradix import HiRadixCache

    config = HicacheConfig(
        cache={"page_size": 4, "host_pool": 64 * 1024, "device": "cpu"},
        model={"num_layers": 1, "num_kv_heads": 1, "head_dim": 4},
        events={"publisher": "zmq", "endpoint": "tcp://127.0.0.1:1"},  # never bound
    )
    cache = HiRadixCache.from_config(config, device_pages=4, tp_rank=1, tp_size=2)
    try:
        pages = cache.device_pool.alloc(1)
        assert pages is not None
        cache.insert([1, 2, 3, 4], pages)
        assert cache.event_publisher is None and cache.publish_events() == 0
        assert cache.take_events() == []
    finally:
        cache.close()
