"""KV events: SGLang/vLLM field order, media names, and the thread-safe queue."""

from __future__ import annotations

import dataclasses
import json
import threading

from hicache.events import AllBlocksCleared, BlockRemoved, BlockStored, EventQueue, Medium


def test_field_order_matches_sglang_vllm() -> None:
    assert [f.name for f in dataclasses.fields(BlockStored)] == [
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
    ]
    assert [f.name for f in dataclasses.fields(BlockRemoved)] == ["block_hashes", "medium"]
    assert dataclasses.fields(AllBlocksCleared) == ()


def test_media_values_are_their_names() -> None:
    assert [m.value for m in Medium] == ["GPU", "CPU_PINNED", "DISK", "EXTERNAL"]
    assert Medium.CPU_PINNED == "CPU_PINNED"
    event = BlockRemoved([1], Medium.DISK)
    assert event.to_dict()["medium"] == "DISK"
    assert type(event.to_dict()["medium"]) is str


def test_positional_construction_and_to_dict_roundtrip_json() -> None:
    stored = BlockStored([5, -7], None, [1, 2, 3, 4], 2, None, Medium.CPU_PINNED)
    d = stored.to_dict()
    assert list(d) == ["type", *(f.name for f in dataclasses.fields(BlockStored))]
    assert json.loads(json.dumps(d)) == {
        "type": "BlockStored",
        "block_hashes": [5, -7],
        "parent_block_hash": None,
        "token_ids": [1, 2, 3, 4],
        "block_size": 2,
        "lora_id": None,
        "medium": "CPU_PINNED",
    }
    assert AllBlocksCleared().to_dict() == {"type": "AllBlocksCleared"}


def test_queue_take_drains_in_order() -> None:
    q = EventQueue()
    assert q.take() == []
    events = [BlockStored([i], None, [i], 1, None, Medium.GPU) for i in range(3)]
    q.put(events[0])
    q.extend(events[1:])
    q.put(AllBlocksCleared())
    assert len(q) == 4
    assert q.take() == [*events, AllBlocksCleared()]
    assert q.take() == []
    assert len(q) == 0


def test_queue_is_thread_safe() -> None:
    q = EventQueue()
    taken: list[object] = []
    per_thread = 2000
    stop = threading.Event()

    def produce(tid: int) -> None:
        for i in range(per_thread):
            q.put(BlockRemoved([tid, i], Medium.GPU))

    def consume() -> None:
        while not stop.is_set():
            taken.extend(q.take())

    consumer = threading.Thread(target=consume)
    consumer.start()
    producers = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    stop.set()
    consumer.join()
    taken.extend(q.take())
    assert len(taken) == 4 * per_thread
    for tid in range(4):
        mine = [
            e.block_hashes[1]
            for e in taken
            if isinstance(e, BlockRemoved) and e.block_hashes[0] == tid
        ]
        assert mine == list(range(per_thread))  # per-producer order survives
