"""End to end over real ZMQ sockets: a replay publishes its KV events to a router-style subscriber
in another process (tests/kv_router_subscriber.py: llm-d's topic filter, the sequence gap check,
a replay request on a gap) that loses a range of batches on purpose; once the replay is done the
subscriber holds exactly the blocks the cache holds, medium by medium."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from hicache.events import BlockRemoved
from hicache.keys import block_id
from hicache.replay.app import ReplayHooks, ReplaySettings, run_replay
from hicache.replay.plan import ByteMode

pytest.importorskip("zmq")
pytest.importorskip("msgpack")

pytestmark = pytest.mark.timeout(600)

SUBSCRIBER = Path(__file__).with_name("kv_router_subscriber.py")
WAIT_S = 120.0
MODEL = "org/tiny-model"


class Subscriber:
    """The subscriber process and its line-by-line JSON channel."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SUBSCRIBER), "--model", MODEL, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, name="subscriber-stdout", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def expect(self, key: str, timeout: float = WAIT_S) -> Any:
        msg = self.lines.get(timeout=timeout)
        assert key in msg, msg
        return msg[key] if len(msg) == 1 else msg

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT_S)


@pytest.fixture
def subscriber() -> Iterator[Subscriber]:
    # loses 12 batches on its SUB socket, starting 3 after the first one it receives
    sub = Subscriber("--skip", "3", "12")
    yield sub
    sub.kill()


def holdings(cache: Any) -> dict[str, set[int]]:
    """What the cache holds: device and host pages from its tree, L3 pages from the tier."""
    gpu: set[int] = set()
    cpu: set[int] = set()
    for node in cache.iter_nodes():
        ids = {block_id(h) for h in cache.node_hashes(node)}
        if node.value is not None:
            gpu |= ids
        if node.host_value is not None:
            assert node.write_through_pending_id is None, "a write-through is still pending"
            cpu |= ids
    disk = {block_id(page.key) for page in cache.tiers["disk"].backend.iter_pages()}
    return {"GPU": gpu, "CPU_PINNED": cpu, "DISK": disk}


def test_router_relearns_a_gap_and_ends_with_the_cache_s_blocks(
    tmp_path: Path, subscriber: Subscriber, reuse_trace: Path
) -> None:
    bound = subscriber.expect("bound")
    config = tmp_path / "hicache.yaml"
    config.write_text(
        "cache: {page_size: 16, device: cpu, host_pool: 64MiB}\n"
        f"model: {{name: {MODEL}, revision: v1, num_layers: 2, num_kv_heads: 2, head_dim: 32,"
        " dtype: float16}\n"
        "storage:\n"
        "  prefetch: {policy: wait_complete, threshold_tokens: 16}\n"
        "  tiers:\n"
        # a put past its deadline is a counted failure whose page may still land unannounced
        # (tests/test_faults.py covers deadlines): generous here, so a loaded machine's slow
        # put is not one
        f"    disk: {{backend: localdisk, options: {{root: '{tmp_path / 'l3'}', "
        "max_bytes: 1GiB, durability: none}, deadline_s: 600}\n"
        # the router binds; the pod connects (llm-d's indexer layout) and serves replays
        f"events: {{publisher: zmq, mode: connect, endpoint: '{bound}', "
        "replay_endpoint: 'tcp://127.0.0.1:*', topic: 'kv@{instance}@{model}', "
        "instance: pod-a}\n"
    )
    wipe_at = 50
    seen: dict[str, Any] = {}

    def started(caches: Sequence[Any], _url: str | None) -> None:
        pub = caches[0].event_publisher
        seen["cache"] = caches[0]
        subscriber.send(replay=pub.replay_endpoint)
        # ZMQ drops what a PUB sends before the subscription reached it: probe with empty
        # removals until the subscriber says it receives (the lost probes are a first gap)
        deadline = time.monotonic() + WAIT_S
        while True:
            pub.publish([BlockRemoved([], "GPU")])
            try:
                subscriber.expect("live", timeout=0.05)
                break
            except queue.Empty:
                assert time.monotonic() < deadline, "the subscriber never received a batch"

    def request_done(i: int) -> None:
        if i == wipe_at:
            # one L3 tier wiped mid-run: BlockRemoved(DISK) batches, never AllBlocksCleared
            seen["wiped"] = seen["cache"].clear_storage_tier("disk")

    def finished(caches: Sequence[Any]) -> None:
        cache = caches[0]
        cache.storage.wait_idle()
        cache.writing_check()
        cache.publish_events()
        pub = cache.event_publisher
        assert pub.flush(WAIT_S), "the publisher did not send its queue"
        last = pub.stats()["next_seq"] - 1
        seen["expected"] = holdings(cache)
        subscriber.send(finish=last)
        seen["state"] = subscriber.expect("media")
        seen["last"] = last

    settings = ReplaySettings(
        trace=reuse_trace,
        data_dir=tmp_path,
        progress=False,
        config=config,
        # measuring the tier writes and reads 96 MiB of its own pages: nothing this test asserts
        calibrate=False,
        # a replay page per trace block (16 token ids), not 32 real pages of 16 tokens: the
        # same requests, hits, tier writes, wipe and event batches (one per request) at 1/32 of
        # the pages, so one run takes seconds, not minutes (what the router must relearn is
        # the gap in the batches, not their size)
        bytes_mode=ByteMode.SCALED,
        l1_fraction=0.02,
        l2_fraction=0.3,
    )
    report, _ = run_replay(
        settings, ReplayHooks(started=started, request_done=request_done, finished=finished)
    )
    assert report.verification.mismatches == 0

    state, expected = seen["state"], seen["expected"]
    assert seen["wiped"] > 0
    assert state["next_seq"] == seen["last"] + 1
    assert state["skipped"] == 12 and state["gaps"] >= 1 and state["replayed"] >= 12
    assert state["bad_topics"] == 0 and state["clears"] == 0
    got = {medium: set(ids) for medium, ids in state["media"].items()}
    assert set(got) == {"GPU", "CPU_PINNED", "DISK"}
    for medium, ids in expected.items():
        assert ids, f"the cache holds nothing on {medium}: the replay exercised too little"
        missing, extra = ids - got[medium], got[medium] - ids
        assert not missing and not extra, (medium, len(missing), len(extra))


# ---------------------------------------------------------------------- the events section


def test_topic_template_is_validated_and_filled(tmp_path: Path) -> None:
    import socket

    from hicache.config import EventsConfig, EventsMode, load_config
    from hicache.errors import ConfigError

    ev = EventsConfig(topic="kv@{instance}@{model}")
    assert ev.topic_for("m/x") == f"kv@{socket.gethostname()}@m/x"  # the documented default
    assert EventsConfig(topic="kv@{instance}@{model}", instance="pod-3").topic_for("m") == (
        "kv@pod-3@m"
    )
    assert EventsConfig().topic_for("m") == ""  # vLLM's default topic
    with pytest.raises(ConfigError, match=r"events\.topic: model\.name 'a@b' contains '@'"):
        ev.topic_for("a@b")
    with pytest.raises(ConfigError, match=r"events\.topic: events\.instance 'p@q'"):
        EventsConfig(topic="kv@{instance}@{model}", instance="p@q").topic_for("m")

    bad = tmp_path / "bad.yaml"
    bad.write_text("events: {topic: 'kv@{pod}@{model}', mode: dial}\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    text = str(info.value)
    assert "events.topic" in text and "{pod}" in text
    assert "events.mode" in text and "dial" in text
    assert EventsConfig(mode="connect").mode is EventsMode.CONNECT


def test_connect_mode_reaches_a_bound_subscriber() -> None:
    import zmq

    from hicache.event_publisher import ZmqEventPublisher, decode_batch
    from hicache.events import BlockStored

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind("tcp://127.0.0.1:*")
    endpoint = sub.getsockopt(zmq.LAST_ENDPOINT).decode()
    pub = ZmqEventPublisher(endpoint, mode="connect", topic="kv@a@m")
    try:
        assert pub.endpoint == endpoint
        event = BlockStored([5], None, [1, 2], 2, None, "GPU")
        deadline = time.monotonic() + WAIT_S
        while not sub.poll(50):
            assert time.monotonic() < deadline, "the connecting publisher never arrived"
            pub.publish([event])
        topic, _seq, payload = sub.recv_multipart()
        assert topic == b"kv@a@m" and decode_batch(payload)[1] == [event]
        with pytest.raises(ValueError, match="mode must be"):
            ZmqEventPublisher(endpoint, mode="dial")
    finally:
        pub.close()
        ctx.destroy(linger=0)
