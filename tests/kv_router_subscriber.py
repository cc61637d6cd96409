"""A KV-event subscriber in the style of llm-d's indexer, run as its own process by
tests/test_events_router.py. It imports nothing from hicache: only pyzmq and msgpack.

What it does, as a router would:

- binds a SUB socket (llm-d's indexer binds and the pods connect), subscribes to ``kv@`` and
  drops any message whose topic is not ``kv@<instance>@<model>`` with the expected model
- checks the sequence numbers: a batch older than the next expected one is a duplicate and is
  dropped; a newer one is a gap, and the missing batches are asked from the pod's replay socket
  (a DEALER request ``[b"", start_seq]``, answered until the ``-1`` end marker)
- applies each batch in order to a per-medium block set: ``BlockStored`` adds,
  ``BlockRemoved`` removes, ``AllBlocksCleared`` empties every medium of the pod

Forced loss for the test: ``--skip OFFSET COUNT`` drops ``COUNT`` batches on the SUB socket,
starting ``OFFSET`` batches after the first one it received (as a subscriber that paused past
its high-water mark would lose them), so the gap check and the replay must recover them.

Protocol with the test, one JSON object per line: the subscriber prints ``{"bound": endpoint}``,
then ``{"live": seq}`` for the first batch it receives; the test writes ``{"replay": endpoint}``
once the pod is up, later ``{"finish": last_seq}``; the subscriber then makes sure it applied
every batch up to ``last_seq`` and prints its state:
``{"media": {medium: [ids]}, "gaps": n, "replayed": n, "skipped": n, "bad_topics": n,
"clears": n, "duplicates": n}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import msgpack
import zmq

END_SEQ = -1


class Router:
    def __init__(self, model: str, skip_offset: int, skip_count: int) -> None:
        self.model = model
        self.skip_offset = skip_offset
        self.skip_count = skip_count
        self.skip: set[int] | None = None  # set once the first batch arrived
        self.media: dict[str, set[int]] = {}
        self.next_seq = 0
        self.stats = dict.fromkeys(
            ("gaps", "replayed", "skipped", "bad_topics", "clears", "duplicates"), 0
        )
        self.replay_endpoint: str | None = None
        self.pending: dict[int, bytes] = {}  # batches seen past a gap, waiting for a replay

    # -------------------------------------------------------------- events

    def apply(self, payload: bytes) -> None:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        _ts, events = batch[0], batch[1]
        for ev in events:
            tag = ev[0]
            if tag == "BlockStored":
                self.media.setdefault(ev[6], set()).update(ev[1])
            elif tag == "BlockRemoved":
                self.media.setdefault(ev[2], set()).difference_update(ev[1])
            elif tag == "AllBlocksCleared":
                self.stats["clears"] += 1
                self.media.clear()
            else:
                raise ValueError(f"unknown event tag {tag!r}")

    def offer(self, seq: int, payload: bytes, ctx: Any) -> None:
        """A batch from the SUB socket."""
        if seq < self.next_seq:
            self.stats["duplicates"] += 1
            return
        if seq > self.next_seq:
            self.stats["gaps"] += 1
            self.pending[seq] = payload
            self.recover(ctx)
            return
        self.apply(payload)
        self.next_seq += 1
        self.drain_pending()

    def drain_pending(self) -> None:
        while self.next_seq in self.pending:
            self.apply(self.pending.pop(self.next_seq))
            self.next_seq += 1
        for seq in [s for s in self.pending if s < self.next_seq]:
            del self.pending[seq]

    def recover(self, ctx: Any) -> None:
        """Ask the replay socket for everything from ``next_seq`` on, and apply it."""
        if self.replay_endpoint is None:
            return  # not told where yet: the test sends it before anything can be missing
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.RCVTIMEO, 60_000)
        dealer.connect(self.replay_endpoint)
        dealer.send_multipart([b"", self.next_seq.to_bytes(8, "big", signed=True)])
        while True:
            empty, seq_bytes, payload = dealer.recv_multipart()
            assert empty == b""
            seq = int.from_bytes(seq_bytes, "big", signed=True)
            if seq == END_SEQ:
                break
            if seq == self.next_seq:
                self.apply(payload)
                self.next_seq += 1
                self.stats["replayed"] += 1
            elif seq > self.next_seq:
                # the pod no longer keeps what was missed: relearn, as after AllBlocksCleared
                raise RuntimeError(f"replay started at {seq}, expected {self.next_seq}")
        dealer.close(linger=0)
        self.drain_pending()

    # -------------------------------------------------------------- socket

    def on_message(self, frames: list[bytes], ctx: Any) -> None:
        if len(frames) != 3:
            self.stats["bad_topics"] += 1
            return
        topic, seq_bytes, payload = frames
        parts = topic.decode().split("@")
        if len(parts) != 3 or parts[0] != "kv" or parts[2] != self.model:
            self.stats["bad_topics"] += 1
            return
        seq = int.from_bytes(seq_bytes, "big", signed=True)
        if self.skip is None:
            first = seq + self.skip_offset
            self.skip = set(range(first, first + self.skip_count))
            print(json.dumps({"live": seq}), flush=True)
        if seq in self.skip:
            self.skip.discard(seq)  # lost once, as past a high-water mark
            self.stats["skipped"] += 1
            return
        self.offer(seq, payload, ctx)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bind", default="tcp://127.0.0.1:*")
    parser.add_argument("--model", required=True)
    parser.add_argument("--skip", nargs=2, type=int, default=(0, 0), metavar=("OFFSET", "N"))
    args = parser.parse_args()

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    sub.bind(args.bind)
    router = Router(args.model, args.skip[0], args.skip[1])
    print(json.dumps({"bound": sub.getsockopt(zmq.LAST_ENDPOINT).decode()}), flush=True)

    stdin = sys.stdin.fileno()
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    poller.register(stdin, zmq.POLLIN)
    pending = b""
    while True:
        ready = dict(poller.poll(1000))
        if sub in ready:
            router.on_message(sub.recv_multipart(), ctx)
            continue  # the socket first: a command waits for what was already sent
        if stdin not in ready:
            continue
        chunk = os.read(stdin, 65536)
        if not chunk:
            return 1  # the test went away
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            cmd = json.loads(line)
            if "replay" in cmd:
                router.replay_endpoint = cmd["replay"]
                if router.pending:
                    router.recover(ctx)
            elif "finish" in cmd:
                # what the SUB socket already holds first, then anything still missing
                while sub.poll(0):
                    router.on_message(sub.recv_multipart(), ctx)
                if router.next_seq <= cmd["finish"]:
                    router.recover(ctx)
                state = {
                    "media": {m: sorted(ids) for m, ids in router.media.items()},
                    "next_seq": router.next_seq,
                    **router.stats,
                }
                print(json.dumps(state), flush=True)
                sub.close(linger=0)
                ctx.term()
                return 0


if __name__ == "__main__":
    raise SystemExit(main())
