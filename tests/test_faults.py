"""FaultyBackend: each injected fault does what it says, around a real MemoryBackend."""

from __future__ import annotations

import threading

import pytest

from hicache.errors import BackendCapacityError, BackendUnavailableError
from hicache.storage.backend import Backend, BackendContext, PageStatus
from hicache.storage.memory import MemoryBackend, MemoryConfig
from hicache.testing.clock import ManualClock
from hicache.testing.faults import GARBAGE, FaultOp, FaultyBackend
from hicache.testing.wait import wait_for

PAGE = 64


def k(i: int) -> str:
    return f"{i:064x}"


def page(i: int) -> memoryview:
    return memoryview(bytearray([i % 251]) * PAGE)


def dst() -> memoryview:
    return memoryview(bytearray(PAGE))


@pytest.fixture
def faulty() -> FaultyBackend:
    inner = MemoryBackend(MemoryConfig(), BackendContext(page_bytes=PAGE, namespace="f"))
    fb = FaultyBackend(inner)
    fb.open()
    yield fb  # type: ignore[misc]
    fb.close()


def test_passes_through_without_faults(faulty: FaultyBackend) -> None:
    assert faulty.inner.is_open
    assert faulty.put([k(1), k(2)], [page(1), page(2)]) == [PageStatus.OK] * 2
    assert faulty.exists_prefix([k(1), k(2), k(3)]) == 2
    assert faulty.exists([k(3), k(1)]) == [False, True]
    d = dst()
    assert faulty.get_into([k(2)], [d]) == [PageStatus.OK] and bytes(d) == bytes(page(2))
    assert faulty.calls == {"put": 1, "exists": 2, "get": 1}
    assert faulty.put_log == [k(1), k(2)] and faulty.get_log == [k(2)]
    assert faulty.capabilities == faulty.inner.capabilities
    faulty.close()
    assert not faulty.inner.is_open


def test_per_key_failures(faulty: FaultyBackend) -> None:
    faulty.put([k(1), k(2), k(3)], [page(1), page(2), page(3)])
    faulty.fail_keys([k(2)], PageStatus.CORRUPT, ops=[FaultOp.GET])
    faulty.fail_keys([k(3)], PageStatus.FAILED)
    dsts = [dst() for _ in range(3)]
    got = faulty.get_into([k(1), k(2), k(3)], dsts)
    assert got == [PageStatus.OK, PageStatus.CORRUPT, PageStatus.FAILED]
    assert bytes(dsts[1]) == bytes([GARBAGE]) * PAGE  # undefined contents, never the page
    # a failed put leaves no key behind; the others are stored
    assert faulty.put([k(4), k(3)], [page(4), page(3)]) == [PageStatus.OK, PageStatus.FAILED]
    faulty.fail_keys([k(5)], PageStatus.FAILED, ops=[FaultOp.PUT])
    assert faulty.put([k(5)], [page(5)]) == [PageStatus.FAILED]
    assert not faulty.inner.exists([k(5)])[0]
    assert faulty.stats()["injected"]["get_corrupt"] == 1
    with pytest.raises(ValueError, match="FAILED or CORRUPT"):
        faulty.fail_keys([k(1)], PageStatus.NOT_FOUND)


def test_whole_call_errors_count_down_and_target_ops(faulty: FaultyBackend) -> None:
    faulty.fail_calls(2, ops=[FaultOp.PUT])
    assert faulty.exists([k(1)]) == [False]  # not targeted
    for _ in range(2):
        with pytest.raises(BackendUnavailableError):
            faulty.put([k(1)], [page(1)])
    assert faulty.put([k(1)], [page(1)]) == [PageStatus.OK]
    faulty.fail_calls(None, error=lambda: BackendCapacityError("full"))
    for _ in range(3):
        with pytest.raises(BackendCapacityError):
            faulty.exists([k(1)])
    faulty.heal()
    assert faulty.exists([k(1)]) == [True]


def test_hang_blocks_until_released(faulty: FaultyBackend) -> None:
    faulty.put([k(1)], [page(1)])
    release = faulty.hang(ops=[FaultOp.GET])
    out: list[list[PageStatus]] = []
    t = threading.Thread(target=lambda: out.append(faulty.get_into([k(1)], [dst()])))
    t.start()
    assert faulty.wait_hung(1)
    assert out == [] and faulty.hung_now == 1
    assert faulty.exists([k(1)]) == [True]  # other ops are not hung
    release.set()
    t.join(30)
    assert out == [[PageStatus.OK]] and faulty.hung_now == 0


def test_close_releases_hangs(faulty: FaultyBackend) -> None:
    faulty.hang()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            faulty.exists([k(1)])
        except BaseException as exc:  # the closed inner backend may refuse the late call
            errors.append(exc)

    t = threading.Thread(target=call)
    t.start()
    assert faulty.wait_hung(1)
    faulty.close()
    t.join(30)
    assert not t.is_alive()


def test_evictions_are_dropped_and_reported(faulty: FaultyBackend) -> None:
    faulty.put([k(1), k(2)], [page(1), page(2)])
    faulty.evict([k(2)])
    assert faulty.exists([k(1), k(2)]) == [True, False]
    assert faulty.take_evicted() == [k(2)]
    assert faulty.take_evicted() == []


def test_vanish_between_exists_and_get(faulty: FaultyBackend) -> None:
    faulty.put([k(1), k(2)], [page(1), page(2)])
    faulty.vanish_on_get([k(2)])
    assert faulty.exists_prefix([k(1), k(2)]) == 2
    d = dst()
    before = bytes(d)
    assert faulty.get_into([k(1), k(2)], [dst(), d]) == [PageStatus.OK, PageStatus.NOT_FOUND]
    assert bytes(d) == before  # NOT_FOUND leaves the destination untouched
    assert faulty.exists([k(2)]) == [False]


def test_damage_on_get_harms_each_stored_page_once_before_it_is_read(
    faulty: FaultyBackend,
) -> None:
    faulty.put([k(1), k(2)], [page(1), page(2)])
    damaged: list[str] = []

    def rot(inner: Backend, key: str) -> None:
        # a raw hook: rewrite the stored bytes behind the backend's API
        assert isinstance(inner, MemoryBackend)
        damaged.append(key)
        inner.delete([key])
        inner.put([key], [memoryview(bytearray([0x5A]) * PAGE)])

    faulty.damage_on_get(rot)
    d1, d2, d3 = dst(), dst(), dst()
    assert faulty.get_into([k(1), k(3)], [d1, d3]) == [PageStatus.OK, PageStatus.NOT_FOUND]
    assert bytes(d1) == bytes([0x5A]) * PAGE  # damaged where it rests, then read
    assert faulty.get_into([k(1), k(2)], [d1, d2]) == [PageStatus.OK] * 2
    assert damaged == [k(1), k(2)]  # once per key; a missing key is not damaged
    assert faulty.injected["damaged"] == 2
    faulty.heal()
    faulty.put([k(4)], [page(4)])
    d4 = dst()
    assert faulty.get_into([k(4)], [d4]) == [PageStatus.OK] and bytes(d4) == bytes(page(4))


def test_latency_is_applied(faulty: FaultyBackend) -> None:
    faulty.latency_s = 0.001
    assert faulty.exists([k(1)]) == [False]
    faulty.heal()
    assert faulty.latency_s == 0.0


def test_hang_only_the_next_count_calls_and_wait_finished(faulty: FaultyBackend) -> None:
    release = faulty.hang(ops=[FaultOp.EXISTS], count=1)
    t = threading.Thread(target=lambda: faulty.exists([k(1)]))
    t.start()
    assert faulty.wait_hung(1)
    assert faulty.exists([k(2)]) == [False]  # the second call is not held
    assert faulty.finished["exists"] == 1
    release.set()
    assert faulty.wait_finished(FaultOp.EXISTS, 2)
    t.join(30)
    assert faulty.calls["exists"] == 2


def test_hang_only_calls_naming_the_given_keys(faulty: FaultyBackend) -> None:
    release = faulty.hang(ops=[FaultOp.PUT], keys=[k(1)])
    t = threading.Thread(target=lambda: faulty.put([k(0), k(1)], [page(0), page(1)]))
    t.start()
    assert faulty.wait_hung(1)
    assert faulty.put([k(2)], [page(2)]) == [PageStatus.OK]  # names no hung key: not held
    assert faulty.hung_now == 1 and faulty.exists([k(1)]) == [False]
    release.set()
    t.join(30)
    assert faulty.exists([k(0), k(1)]) == [True, True]


def test_clear_key_faults_keeps_the_other_knobs(faulty: FaultyBackend) -> None:
    faulty.fail_keys([k(1)], PageStatus.FAILED, ops=[FaultOp.PUT])
    faulty.fail_calls(None, ops=[FaultOp.EXISTS])
    faulty.clear_key_faults()
    assert faulty.put([k(1)], [page(1)]) == [PageStatus.OK]
    with pytest.raises(BackendUnavailableError):
        faulty.exists([k(1)])


def test_put_counts_and_the_calls_an_injected_error_refused(faulty: FaultyBackend) -> None:
    faulty.put([k(1), k(2)], [page(1), page(2)])
    faulty.put([k(1)], [page(1)])
    faulty.fail_calls(1, ops=[FaultOp.PUT])
    with pytest.raises(BackendUnavailableError):
        faulty.put([k(3)], [page(3)])
    assert faulty.put_counts() == {k(1): 2, k(2): 1}  # the refused call logged no key
    assert faulty.calls["put"] == 3


def test_capabilities_and_open_failures_are_the_tests_choice() -> None:
    from hicache.storage.backend import Capabilities

    inner = MemoryBackend(MemoryConfig(), BackendContext(page_bytes=PAGE, namespace="f"))
    fb = FaultyBackend(inner, capabilities=Capabilities(max_batch=2, default_medium="DISK"))
    assert (fb.capabilities.max_batch, fb.capabilities.default_medium) == (2, "DISK")
    fb.fail_open(lambda: ConnectionError("bucket missing"))
    with pytest.raises(ConnectionError, match="bucket missing"):
        fb.open()
    assert not fb.is_open and not inner.is_open
    fb.fail_open(None)
    fb.open()
    assert fb.is_open and inner.is_open
    fb.close()


def test_manual_clock_moves_only_when_told() -> None:
    clock = ManualClock(5.0)
    assert clock() == 5.0 == clock()
    assert clock.advance(2.5) == 7.5 and clock() == 7.5


def test_wait_for_returns_once_the_condition_holds_and_names_it_on_timeout() -> None:
    flag = threading.Event()
    threading.Timer(0.05, flag.set).start()
    wait_for(flag.is_set, what="the flag")
    assert flag.is_set()
    with pytest.raises(AssertionError, match=r"never true not reached within 0\.05s"):
        wait_for(lambda: False, 0.05, what="never true")
