"""Faults against real servers: down, hung, SIGKILLed mid-batch, restarted with and without
persistence. Nothing here may hang: every wait is bounded by the backend's own timeouts."""

from __future__ import annotations

import functools
import itertools
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
from hicache_valkey import ValkeyBackend
from hicache_valkey.devserver import DevServer, free_port
from hicache_valkey.testing import PAGE_BYTES, fast_options, make_backend, wait_for

from hicache.errors import BackendUnavailableError
from hicache.storage import Backend, PageStatus
from hicache.testing import kit_key, page_pattern

StartServer = Callable[..., DevServer]


def _keys(n: int, salt: str) -> list[str]:
    return [kit_key(i, salt) for i in range(n)]


def _pages(keys: list[str], page_bytes: int = PAGE_BYTES) -> list[memoryview]:
    return [memoryview(page_pattern(k, page_bytes)) for k in keys]


def _read(backend: Backend, keys: list[str]) -> tuple[list[PageStatus], list[bytearray]]:
    bufs = [bytearray(backend.context.page_bytes) for _ in keys]
    return backend.get_into(keys, [memoryview(b) for b in bufs]), bufs


def test_server_down_at_open_raises_unavailable() -> None:
    backend = make_backend(fast_options(free_port()))
    with pytest.raises(BackendUnavailableError, match=r"127\.0\.0\.1"):
        backend.open()
    assert not backend.is_open


def test_hung_server_times_out_instead_of_hanging() -> None:
    """A listener that accepts connections and never answers: calls fail after the socket
    timeout with BackendUnavailableError."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        port = silent.getsockname()[1]
        backend = make_backend(fast_options(port, socket_timeout_s=0.3))
        with pytest.raises(BackendUnavailableError, match="timed out"):
            backend.open()


def test_server_killed_then_calls_fail_then_recover(server_factory: StartServer) -> None:
    server = server_factory()
    keys = _keys(4, "down")
    with make_backend(fast_options(server.port)) as backend:
        assert backend.put(keys, _pages(keys)) == [PageStatus.OK] * 4
        server.kill()
        for call in (
            lambda: backend.exists(keys),
            lambda: backend.put(keys, _pages(keys)),
            lambda: _read(backend, keys),
            lambda: backend.delete(keys),
        ):
            with pytest.raises(BackendUnavailableError):
                call()
        server.start()  # same port, no persistence: the pages are gone

        def answers() -> bool:
            try:
                return backend.exists(keys) == [False] * 4
            except BackendUnavailableError:
                return False

        wait_for(answers, "the backend to reach the restarted server")
        statuses, _ = _read(backend, keys)
        assert statuses == [PageStatus.NOT_FOUND] * 4


def test_restart_with_persistence_keeps_pages(server_factory: StartServer) -> None:
    server = server_factory(appendonly=True)
    keys = _keys(6, "aof")
    with make_backend(fast_options(server.port)) as backend:
        assert backend.put(keys, _pages(keys)) == [PageStatus.OK] * 6
        server.restart()  # SIGKILL: acknowledged writes are already in the AOF (fsync always)

        def answers() -> bool:
            try:
                return backend.exists(keys) == [True] * 6
            except BackendUnavailableError:
                return False

        wait_for(answers, "the persisted pages after the restart")
        statuses, bufs = _read(backend, keys)
        assert statuses == [PageStatus.OK] * 6
        assert [bytes(b) for b in bufs] == [bytes(p) for p in _pages(keys)]


def _at_least(items: list[str], count: int) -> bool:
    return len(items) >= count


def _write_until_down(
    writer: ValkeyBackend,
    salt: str,
    attempted: list[str],
    acked: list[str],
    failures: list[BaseException],
) -> None:
    """Put batches of 16 pages until the server goes away (BackendUnavailableError)."""
    page_bytes = writer.context.page_bytes
    for batch_no in itertools.count():
        keys = _keys(16, f"{salt}-{batch_no}")
        attempted.extend(keys)
        try:
            statuses = writer.put(keys, _pages(keys, page_bytes))
        except BackendUnavailableError:
            return
        except BaseException as exc:  # anything else is a bug
            failures.append(exc)
            return
        acked.extend(k for k, s in zip(keys, statuses, strict=True) if s.stored)


@pytest.mark.parametrize("max_value_bytes", [1 << 20, 8192], ids=["one-value", "chunked"])
def test_kill_mid_batch_never_serves_a_torn_page(
    server_factory: StartServer, max_value_bytes: int
) -> None:
    """A writer streams batches while the server is SIGKILLed; after the restart every page is
    either whole and verified or absent, and every page acknowledged before the kill survived
    (AOF with fsync always)."""
    page_bytes = 64 << 10
    server = server_factory(appendonly=True)
    options = fast_options(server.port, max_value_bytes=max_value_bytes, pipeline_depth=4)
    attempted: list[str] = []
    acked: list[str] = []
    for round_no in range(3):
        writer = make_backend(options, page_bytes=page_bytes)
        writer.open()
        failures: list[BaseException] = []
        salt = f"kill-{max_value_bytes}-{round_no}"
        thread = threading.Thread(
            target=_write_until_down, args=(writer, salt, attempted, acked, failures)
        )
        thread.start()
        floor = len(acked)
        wait_for(functools.partial(_at_least, acked, floor + 32), "some acknowledged puts")
        server.kill()
        thread.join(timeout=60)
        assert not thread.is_alive() and not failures, failures
        writer.close()
        server.start()
    with make_backend(options, page_bytes=page_bytes) as reader:
        statuses, bufs = _read(reader, attempted)
    survived = {k for k, s in zip(attempted, statuses, strict=True) if s is PageStatus.OK}
    assert set(statuses) <= {PageStatus.OK, PageStatus.NOT_FOUND}, set(statuses)
    for key, status, buf in zip(attempted, statuses, bufs, strict=True):
        if status is PageStatus.OK:
            assert buf == page_pattern(key, page_bytes), f"torn page {key}"
    assert set(acked) <= survived, "an acknowledged page was lost"


def test_pool_bounds_connections_in_flight(options: dict[str, Any]) -> None:
    """Calls from more threads than ``max_connections`` share that many connections."""
    opts = {**options, "max_connections": 2}
    with make_backend(opts) as backend:
        barrier = threading.Barrier(8)
        errors: list[BaseException] = []

        def work(t: int) -> None:
            try:
                barrier.wait()
                keys = _keys(8, f"bound-{t}")
                for _ in range(5):
                    assert all(s.stored for s in backend.put(keys, _pages(keys)))
                    assert _read(backend, keys)[0] == [PageStatus.OK] * 8
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors[0]
        assert backend.stats()["connects"] <= 2


def test_dead_server_is_a_miss_for_the_tier(server_factory: StartServer) -> None:
    """Through the tier runtime: a server killed under an open backend turns lookups into
    misses and puts into FAILED statuses (never an exception), and the breaker opens."""
    from hicache.config import TierSettings
    from hicache.tiering.tiers import Tiers

    server = server_factory()
    keys = _keys(4, "tier-miss")
    backend = make_backend(fast_options(server.port, socket_timeout_s=1.0))
    settings = TierSettings(deadline_s=3.0, breaker_failures=2, breaker_cooldown_s=600.0)
    tiers = Tiers.from_backends([("fleet", backend, settings)])
    assert tiers.open() == []
    try:
        tier = tiers["fleet"]
        assert tier.put(keys, _pages(keys)) == [PageStatus.OK] * 4
        assert [(r.start, r.end) for r in tiers.lookup(keys)] == [(0, 4)]
        server.kill()
        for _ in range(3):
            assert tiers.lookup(keys) == []
            assert tier.put(keys, _pages(keys)) == [PageStatus.FAILED] * 4
        bufs = [memoryview(bytearray(PAGE_BYTES)) for _ in keys]
        assert tiers.get_into(keys, bufs) == [PageStatus.NOT_FOUND] * 4
        snapshot = tier.snapshot()
        assert "BackendUnavailableError" in snapshot["errors_by_kind"], snapshot
        assert snapshot["breaker"]["state"] == "open", snapshot["breaker"]
        assert snapshot["dropped_breaker"] >= 4, "puts kept reaching a dead server"
    finally:
        tiers.close()
