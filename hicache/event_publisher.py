"""KV events over ZMQ, in vLLM's wire format, with a replay buffer (no torch).

- ``encode_batch(events, ts, dp_rank)``  one batch as msgpack bytes, the way vLLM encodes it
- ``decode_batch(payload)``              back to ``(ts, events, dp_rank)`` with our dataclasses
- ``ZmqEventPublisher``                  a PUB socket fed by a background thread; ``publish()``
                                         never blocks; a ROUTER socket replays missed batches
- ``publisher_from_config(events, model=...)``  the publisher an ``events:`` section asks for
                                         (its topic template filled in), or None

Wire format (what routers reading vLLM's ZMQ events, llm-d or Dynamo, already parse): each
message is ``[topic, seq, payload]``; ``seq`` is an 8-byte big-endian signed integer, consecutive
from 0; ``payload`` is msgpack of ``[ts, [event, ...], data_parallel_rank]`` and each event is a
tagged array in the field order of :mod:`hicache.events`: ``["BlockStored", block_hashes,
parent_block_hash, token_ids, block_size, lora_id, medium]``, ``["BlockRemoved", block_hashes,
medium]``, ``["AllBlocksCleared"]``. Replay: a client sends ``[b"", start_seq]`` to the ROUTER
socket and gets ``[b"", seq, payload]`` for every kept batch with ``seq >= start_seq``, then
``[b"", -1, b""]``. pyzmq and msgpack are optional (``pip install 'hicache[zmq]'``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from hicache.config import EventsMode
from hicache.errors import ConfigError
from hicache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

if TYPE_CHECKING:
    from hicache.config import EventsConfig

__all__ = [
    "END_SEQ",
    "EventPublisher",
    "ZmqEventPublisher",
    "decode_batch",
    "encode_batch",
    "publisher_from_config",
]

log = logging.getLogger(__name__)

#: The sequence number of the replay end marker.
END_SEQ = -1
_INSTALL_HINT = "pyzmq and msgpack are not installed, run `pip install 'hicache[zmq]'`"


class EventPublisher(Protocol):
    """What ``HiRadixCache`` hands its event batches to."""

    @property
    def closed(self) -> bool: ...
    def publish(self, events: Sequence[KVEvent]) -> None: ...
    def close(self) -> None: ...
    def stats(self) -> dict[str, int]: ...


def _msgpack() -> Any:
    try:
        import msgpack
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return msgpack


def _seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=True)


def _event_array(event: KVEvent) -> list[Any]:
    if isinstance(event, BlockStored):
        return [
            "BlockStored",
            list(event.block_hashes),
            event.parent_block_hash,
            list(event.token_ids),
            event.block_size,
            event.lora_id,
            str(event.medium),  # a StrEnum packs as its value, not as a subclass
        ]
    if isinstance(event, BlockRemoved):
        return ["BlockRemoved", list(event.block_hashes), str(event.medium)]
    if isinstance(event, AllBlocksCleared):
        return ["AllBlocksCleared"]
    raise TypeError(f"not a KV event: {event!r}")


def _event(raw: Any) -> KVEvent:
    # Fields beyond ours are ignored: newer producers only ever append fields.
    if not isinstance(raw, list) or not raw or not isinstance(raw[0], str):
        raise ValueError(f"malformed event (expected a tagged array): {raw!r}")
    tag = raw[0]
    if tag == "BlockStored" and len(raw) >= 7:
        return BlockStored(list(raw[1]), raw[2], list(raw[3]), raw[4], raw[5], raw[6])
    if tag == "BlockRemoved" and len(raw) >= 3:
        return BlockRemoved(list(raw[1]), raw[2])
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    raise ValueError(f"unknown or short event {tag!r} with {len(raw) - 1} fields")


def encode_batch(events: Sequence[KVEvent], ts: float, dp_rank: int | None = 0) -> bytes:
    """One batch as msgpack: ``[ts, [tagged event arrays], dp_rank]`` (vLLM's ``KVEventBatch``)."""
    body = [float(ts), [_event_array(e) for e in events], dp_rank]
    data: bytes = _msgpack().packb(body, use_bin_type=True)
    return data


def decode_batch(payload: bytes) -> tuple[float, list[KVEvent], int | None]:
    """Decode :func:`encode_batch` (or vLLM's) bytes: ``(ts, events, dp_rank)``.

    ``dp_rank`` is None when the producer omitted it (vLLM omits a default ``None``).
    """
    raw = _msgpack().unpackb(payload, raw=False, strict_map_key=False)
    if not isinstance(raw, list) or len(raw) < 2 or not isinstance(raw[1], list):
        raise ValueError("malformed event batch: expected [ts, [events...], dp_rank]")
    dp_rank = raw[2] if len(raw) > 2 else None
    return float(raw[0]), [_event(e) for e in raw[1]], dp_rank


class ZmqEventPublisher:
    """Publish event batches on a ZMQ PUB socket from a background thread, keeping a replay ring.

    ``publish()`` only puts the batch on a bounded queue (``max_pending`` batches); the thread
    owns the sockets, numbers batches consecutively, sends them, keeps the last
    ``buffer_batches`` for replay and answers replay requests on ``replay_endpoint``. A batch
    that finds the queue full is dropped and counted, and the next one starts with
    ``AllBlocksCleared``: a subscriber forgets this cache's blocks and relearns them rather than
    keep one that is gone. With ``mode="bind"`` the PUB socket binds ``endpoint``; with
    ``mode="connect"`` it connects to a subscriber that bound it (a router that receives from
    every pod). The replay socket is always bound. ``endpoint`` / ``replay_endpoint`` hold the
    bound addresses (a ``tcp://host:*`` or port 0 endpoint gets its real port there).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        replay_endpoint: str | None = None,
        mode: EventsMode | str = EventsMode.BIND,
        topic: str = "",
        buffer_batches: int = 10_000,
        max_pending: int = 1024,
        dp_rank: int | None = 0,
        flush_timeout_s: float = 2.0,
    ) -> None:
        if buffer_batches < 1 or max_pending < 1:
            raise ValueError("buffer_batches and max_pending must be >= 1")
        if mode not in tuple(EventsMode):
            raise ValueError(f"mode must be one of {[str(m) for m in EventsMode]}, got {mode!r}")
        try:
            import zmq
        except ImportError as exc:
            raise ImportError(_INSTALL_HINT) from exc
        _msgpack()
        self._zmq = zmq
        self._topic = topic.encode()
        self._dp_rank = dp_rank
        self._flush_timeout_s = flush_timeout_s
        self._ring: deque[tuple[int, bytes]] = deque(maxlen=buffer_batches)
        self._queue: queue.Queue[tuple[float, list[KVEvent]]] = queue.Queue(max_pending)
        self._lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        #: The next batch must start with AllBlocksCleared (one was dropped since the last).
        self._reset = False
        self._seq = 0
        # batches queued and not yet sent or dropped by the thread (flush() waits for 0)
        self._unsent = 0
        self._sent_cond = threading.Condition(self._lock)
        self.counters = {"batches": 0, "events": 0, "dropped": 0, "dropped_events": 0, "replays": 0}
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._router: Any = None
        try:
            if mode == EventsMode.CONNECT:
                self._connect(self._pub, endpoint)
                self.endpoint = endpoint
            else:
                self.endpoint = self._bind(self._pub, endpoint, "events.endpoint")
            self.replay_endpoint: str | None = None
            if replay_endpoint is not None:
                self._router = self._ctx.socket(zmq.ROUTER)
                # a whole ring fits in the send queue: one replay is never cut short by the HWM
                self._router.setsockopt(zmq.SNDHWM, buffer_batches + 1)
                self.replay_endpoint = self._bind(
                    self._router, replay_endpoint, "events.replay_endpoint"
                )
        except BaseException:
            self._close_sockets()
            raise
        # Sockets are not thread-safe; from here on only the thread touches them (the start of
        # a thread is the memory barrier ZMQ asks for when a socket changes threads).
        self._thread = threading.Thread(target=self._run, name="hicache-events-zmq", daemon=True)
        self._thread.start()

    def _bind(self, sock: Any, endpoint: str, field: str) -> str:
        try:
            sock.bind(endpoint)
        except self._zmq.ZMQError as exc:
            raise OSError(exc.errno, f"cannot bind {field} {endpoint!r}: {exc}") from exc
        bound: bytes = sock.getsockopt(self._zmq.LAST_ENDPOINT)
        return bound.decode()

    def _connect(self, sock: Any, endpoint: str) -> None:
        # connect() returns at once and ZMQ reconnects on its own: a router that is not up yet
        # only means the first batches are missed (the replay socket serves them)
        try:
            sock.connect(endpoint)
        except self._zmq.ZMQError as exc:
            raise OSError(exc.errno, f"cannot connect events.endpoint {endpoint!r}: {exc}") from exc

    @property
    def closed(self) -> bool:
        """``close()`` was called: ``publish()`` refuses batches."""
        return self._closed

    def publish(self, events: Sequence[KVEvent]) -> None:
        """Queue one batch for sending; never blocks (a full queue drops it, see the class)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the event publisher is closed")
            batch = list(events)
            if self._reset:
                batch.insert(0, AllBlocksCleared())
            if not batch:
                return
            try:
                self._queue.put_nowait((time.time(), batch))
            except queue.Full:
                self._drop(len(batch) - int(self._reset))
                return
            self._unsent += 1
            self._reset = False

    def flush(self, timeout_s: float) -> bool:
        """Wait until every batch queued so far is sent (or dropped); False on timeout."""
        with self._sent_cond:
            return self._sent_cond.wait_for(lambda: self._unsent == 0, timeout_s)

    def _drop(self, events: int) -> None:
        # under self._lock
        if not self.counters["dropped"]:
            log.warning(
                "KV event publisher fell behind: a batch was dropped, the next one starts with "
                "AllBlocksCleared (see stats()['publisher'])"
            )
        self.counters["dropped"] += 1
        self.counters["dropped_events"] += events
        self._reset = True

    def stats(self) -> dict[str, int]:
        """Batches and events sent, batches (and their events) dropped, replays served."""
        with self._lock:
            return {**self.counters, "pending": self._queue.qsize(), "next_seq": self._seq}

    def close(self) -> None:
        """Send what is queued (at most ``flush_timeout_s``), then stop the thread; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._thread.join(self._flush_timeout_s)
        if self._thread.is_alive():
            log.warning("KV event publisher did not flush within %.1fs", self._flush_timeout_s)

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        poller = self._zmq.Poller()
        if self._router is not None:
            poller.register(self._router, self._zmq.POLLIN)
        try:
            while True:
                # A replay request is answered between two batches, not after the whole backlog.
                if self._router is not None and poller.poll(0):
                    self._serve_replay()
                try:
                    ts, batch = self._queue.get(block=self._router is None, timeout=0.05)
                except queue.Empty:
                    if self._stop.is_set():
                        return  # closed and drained: publish() refuses new batches now
                    # With a replay socket, its requests wake this wait; a batch waits <= 10 ms.
                    if self._router is not None and poller.poll(10):
                        self._serve_replay()
                    continue
                try:
                    self._send(ts, batch)
                finally:
                    with self._sent_cond:
                        self._unsent -= 1
                        self._sent_cond.notify_all()
        except Exception:
            log.exception("KV event publisher thread failed; events are no longer published")
        finally:
            self._close_sockets()

    def _send(self, ts: float, batch: list[KVEvent]) -> None:
        try:
            payload = encode_batch(batch, ts, self._dp_rank)
        except (TypeError, ValueError, OverflowError):
            log.exception("KV event batch could not be encoded; dropped")
            with self._lock:
                self._drop(len(batch))
            return
        with self._lock:
            seq, self._seq = self._seq, self._seq + 1
        self._pub.send_multipart([self._topic, _seq_bytes(seq), payload])
        self._ring.append((seq, payload))
        with self._lock:
            self.counters["batches"] += 1
            self.counters["events"] += len(batch)

    def _serve_replay(self) -> None:
        frames = self._router.recv_multipart()
        identity = frames[0]
        if len(frames) == 3 and len(frames[2]) == 8:
            start = int.from_bytes(frames[2], "big", signed=True)
            for seq, payload in self._ring:
                if seq >= start:
                    self._router.send_multipart([identity, b"", _seq_bytes(seq), payload])
        else:
            log.warning("malformed KV event replay request (%d frames) ignored", len(frames))
        # counted before the end marker goes out: a client that has the marker sees its replay
        # in stats()
        with self._lock:
            self.counters["replays"] += 1
        self._router.send_multipart([identity, b"", _seq_bytes(END_SEQ), b""])

    def _close_sockets(self) -> None:
        for sock in (self._pub, self._router):
            if sock is not None:
                # half the flush budget for subscribers still receiving; then term() returns
                sock.close(linger=int(self._flush_timeout_s * 500))
        self._ctx.term()


def publisher_from_config(
    events: EventsConfig, *, model: str, dp_rank: int | None = 0
) -> EventPublisher | None:
    """The publisher an ``events:`` section asks for (None: events are drained in-process).

    ``model`` (``model.name``) fills the topic template's ``{model}``.
    """
    if not events.enabled or events.publisher is None:
        return None
    if events.endpoint is None:
        raise ConfigError("events.endpoint: required with publisher zmq")
    return ZmqEventPublisher(
        events.endpoint,
        replay_endpoint=events.replay_endpoint,
        mode=events.mode,
        topic=events.topic_for(model),
        buffer_batches=events.buffer_batches,
        dp_rank=dp_rank,
    )
