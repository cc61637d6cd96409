"""``close()`` racing calls in flight: those finish (or miss), later ones raise
``BackendClosedError``, and nothing else (no ``ValueError`` from a closed mapping, no ``EBADF``
from a closed descriptor) ever escapes.

A subclass pauses one call at a chosen point, on events the test controls, so each interleaving
is forced rather than hoped for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hicache_mmap import MmapBackend, MmapOptions
from hicache_mmap.slotfile import SlotFile

from hicache.errors import BackendClosedError
from hicache.storage import BackendContext, PageStatus
from hicache.testing.kit import kit_key, page_pattern

PAGE = 16 * 1024
WAIT_S = 60.0


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


class _Pausing(MmapBackend):
    """Pauses the next call that reaches ``point`` until ``resume`` is set."""

    point = ""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.paused = threading.Event()
        self.resume = threading.Event()

    def _pause(self, here: str) -> None:
        if self.point == here:
            self.point = ""
            self.paused.set()
            assert self.resume.wait(WAIT_S)

    # Inside the call, with the mapping in use: after the call was admitted.
    def _get_one(self, file: SlotFile, key: str, dst: memoryview) -> PageStatus:
        self._pause("get")
        return super()._get_one(file, key, dst)

    def _put_one(self, file: SlotFile, key: str, src: memoryview) -> PageStatus:
        self._pause("put")
        return super()._put_one(file, key, src)

    # Before the call reaches the mapping: it passed the base class's open check only.
    def _get_into(self, keys: Sequence[str], dsts: Sequence[memoryview]) -> list[PageStatus]:
        self._pause("get_into")
        return super()._get_into(keys, dsts)


def _backend(path: Path) -> _Pausing:
    options = MmapOptions(path=str(path), capacity=64 * (4096 + PAGE), prefault=False)
    backend = _Pausing(options, BackendContext(PAGE, "close"))
    backend.open()
    return backend


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # reported by the test, whatever it is
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _close_while_paused(backend: _Pausing) -> threading.Thread:
    """Start close() while a call is paused; return once close has done what it does without
    waiting for that call (it returned, or it is waiting for the call in flight)."""
    assert backend.paused.wait(WAIT_S)
    closer, closed = _in_thread(backend.close)
    wait_for(
        lambda: (
            not closer.is_alive()
            or (not backend.is_open and backend.stats().get("calls_in_flight", 0) > 0)
        ),
        "close() to run or to wait for the call in flight",
    )
    assert "error" not in closed, closed
    return closer


@pytest.mark.parametrize("op", ["get", "put"])
def test_call_in_flight_finishes_when_close_races_it(tmp_path: Path, op: str) -> None:
    backend = _backend(tmp_path / "race.slots")
    keys = [kit_key(i, "race") for i in range(3)]
    pages = [page_pattern(k, PAGE) for k in keys]
    dsts = [bytearray(PAGE) for _ in keys]
    if op == "get":
        assert backend.put(keys, [memoryview(p) for p in pages]) == [PageStatus.OK] * 3

    def call() -> list[PageStatus]:
        if op == "get":
            return backend.get_into(keys, [memoryview(d) for d in dsts])
        return backend.put(keys, [memoryview(p) for p in pages])

    backend.point = op
    caller, result = _in_thread(call)
    closer = _close_while_paused(backend)
    backend.resume.set()
    caller.join(WAIT_S)
    closer.join(WAIT_S)
    assert not caller.is_alive() and not closer.is_alive()
    # The call admitted before close() finished with every page: close waited for it.
    assert "error" not in result, f"{op} racing close() raised {result.get('error')!r}"
    assert result["result"] == [PageStatus.OK] * 3
    if op == "get":
        assert dsts == pages
    with pytest.raises(BackendClosedError):
        backend.get_into(keys[:1], [memoryview(dsts[0])])
    # Nothing was lost: the pages are there for the next opener.
    again = _backend(tmp_path / "race.slots")
    try:
        assert again.exists(keys) == [True] * 3
    finally:
        again.close()


def test_call_admitted_by_the_base_class_then_closed_raises_closed(tmp_path: Path) -> None:
    backend = _backend(tmp_path / "late.slots")
    key = kit_key(0, "late")
    backend.put([key], [memoryview(page_pattern(key, PAGE))])
    backend.point = "get_into"
    caller, result = _in_thread(lambda: backend.get_into([key], [memoryview(bytearray(PAGE))]))
    assert backend.paused.wait(WAIT_S)
    backend.close()  # nothing in flight holds the mapping yet: returns at once
    backend.resume.set()
    caller.join(WAIT_S)
    assert not caller.is_alive()
    assert isinstance(result.get("error"), BackendClosedError), result


def test_listing_paused_by_its_consumer_does_not_hold_up_close(tmp_path: Path) -> None:
    backend = _backend(tmp_path / "list.slots")
    keys = [kit_key(i, "list") for i in range(4)]
    backend.put(keys, [memoryview(page_pattern(k, PAGE)) for k in keys])
    pages = backend.iter_pages()
    first = next(pages)
    assert first.key in keys
    backend.close()  # returns although the listing is unfinished
    rest = list(pages)  # the rest of its chunk was read before close: no error, no mapping
    assert {first.key, *(p.key for p in rest)} == set(keys)
    assert backend.stats()["calls_in_flight"] == 0


def test_gate_hands_a_late_release_to_the_last_call_out() -> None:
    from hicache_mmap.calls import CallGate

    gate = CallGate("test gate")
    released: list[str] = []
    gate.open()
    gate.enter()  # a call that outlives close()'s wait
    gate.close(lambda: released.append("now"), timeout_s=0.01)
    assert released == []  # never while a call is inside
    with pytest.raises(BackendClosedError):
        gate.enter()
    gate.leave()
    assert released == ["now"]  # by the last call out, exactly once
    gate.close(lambda: released.append("again"), timeout_s=0.01)
    assert released == ["now", "again"]  # nothing in flight: at once
