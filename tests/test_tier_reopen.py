"""A tier whose backend could not open (store down at start-up) rejoins once it can open."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any

from hicache.config import TierSettings
from hicache.errors import BackendUnavailableError
from hicache.storage.backend import BackendContext
from hicache.storage.memory import MemoryBackend, MemoryConfig
from hicache.testing.clock import ManualClock
from hicache.testing.wait import run_bounded, wait_for
from hicache.tiering.tiers import Tier, Tiers

PAGE = 4096


class DownAtStart(MemoryBackend):
    """A memory tier whose ``open`` fails while ``down`` is set (an endpoint not yet up)."""

    down = True
    #: ``open`` attempts that reached the backend (counted before they succeed or fail).
    attempts = 0

    def _open(self) -> None:
        self.attempts += 1
        if self.down:
            raise BackendUnavailableError("endpoint 127.0.0.1:9 refused the connection")
        super()._open()


def assert_no_attempt_started(backend: DownAtStart, attempts_before: int) -> None:
    """No background open was started: none is running now and none has run (the running one
    is checked first: one that ends between the two checks has counted its attempt by then)."""
    running = [t for t in threading.enumerate() if t.name == "hicache-reopen-remote"]
    assert running == [], running
    assert backend.attempts == attempts_before and not backend.is_open


def _key(i: int) -> str:
    return hashlib.sha256(f"reopen:{i}".encode()).hexdigest()


def test_unavailable_tier_is_reopened_after_the_cooldown() -> None:
    clock = ManualClock(0.0)
    backend = DownAtStart(MemoryConfig(), BackendContext(page_bytes=PAGE, namespace="reopen"))
    tier = Tier("remote", backend, TierSettings(breaker_cooldown_s=10.0), clock=clock)
    tiers = Tiers([tier])
    assert tiers.open() == ["remote"]
    assert tiers.publishing == []

    backend.down = False
    clock.now = 5.0  # before the cool-down: no new attempt, still out of the cascade
    assert not tier.available
    assert_no_attempt_started(backend, 1)

    clock.now = 11.0  # after it: one background attempt, the request path never waits for it
    assert not tier.available
    wait_for(lambda: tier.available, what="the tier back in the cascade")
    assert backend.is_open and backend.attempts == 2
    assert [t.name for t in tiers.publishing] == ["remote"]
    keys = [_key(1)]
    assert backend.put(keys, [memoryview(bytes(PAGE))])[0].stored
    assert [(r.tier.name, r.start, r.end) for r in tiers.lookup(keys)] == [("remote", 0, 1)]
    assert tiers.stats()["remote"]["errors_by_kind"] == {"BackendUnavailableError": 1}
    tiers.close()


def test_a_failed_reopen_waits_another_cooldown() -> None:
    clock = ManualClock(0.0)
    backend = DownAtStart(MemoryConfig(), BackendContext(page_bytes=PAGE, namespace="reopen"))
    tier = Tier("remote", backend, TierSettings(breaker_cooldown_s=10.0), clock=clock)
    tiers = Tiers([tier])
    tiers.open()
    clock.now = 10.0
    assert not tier.available  # starts an attempt, which fails
    # the attempt's thread is gone once it has counted the error and cleared its flag
    wait_for(
        lambda: (
            tiers.stats()["remote"]["errors_by_kind"].get("BackendUnavailableError") == 2
            and not any(t.name == "hicache-reopen-remote" for t in threading.enumerate())
        ),
        what="the failed reopen",
    )
    backend.down = False
    clock.now = 15.0
    assert not tier.available
    assert_no_attempt_started(backend, 2)  # the next attempt waits until 20.0
    clock.now = 20.0
    tier.available  # noqa: B018 - the property starts the attempt
    wait_for(lambda: tier.available, what="the tier back in the cascade")
    assert backend.attempts == 3
    tiers.close()


class HangsAtStart(MemoryBackend):
    """A memory tier whose ``open`` blocks until ``release`` is set (a frozen endpoint)."""

    def __init__(self, config: MemoryConfig, context: BackendContext) -> None:
        super().__init__(config, context)
        self.release = threading.Event()
        self.entered = threading.Event()
        self.closed = threading.Event()

    def _open(self) -> None:
        self.entered.set()
        assert self.release.wait(JOIN_S), "the test never released the open"
        super()._open()

    def _close(self) -> None:
        super()._close()
        self.closed.set()


# Hang detection only, never a speed assertion.
JOIN_S = 60.0


def _bounded(fn: Callable[[], Any]) -> Any:
    """``fn()`` on a thread, joined with a generous timeout; its result or its exception."""
    finished, outcome = run_bounded(fn, JOIN_S)
    assert finished, "waited past the deadline"
    return outcome


def _ctx() -> BackendContext:
    return BackendContext(page_bytes=PAGE, namespace="reopen")


def test_open_stops_waiting_at_the_deadline_and_a_late_open_joins_the_cascade() -> None:
    hung = HangsAtStart(MemoryConfig(), _ctx())
    fine = MemoryBackend(MemoryConfig(), _ctx())
    slow = Tier("slow", hung, TierSettings(deadline_s=0.2, breaker_cooldown_s=3600))
    tiers = Tiers([slow, Tier("fine", fine)])
    assert _bounded(tiers.open) == ["slow"]
    assert hung.entered.is_set() and not slow.available and fine.is_open
    assert [t.name for t in tiers.publishing] == ["fine"]
    assert tiers.stats()["slow"]["available"] is False
    assert tiers.stats()["slow"]["errors_by_kind"] == {"open_timeout": 1}
    # the open that outlived the deadline finishes: the tier joins without waiting a cool-down
    hung.release.set()
    wait_for(lambda: slow.available, JOIN_S, what="the late open joining the cascade")
    assert hung.is_open and [t.name for t in tiers.publishing] == ["slow", "fine"]
    tiers.close()
    assert not hung.is_open and not fine.is_open


def test_close_during_a_hung_open_returns_and_the_open_closes_after_itself() -> None:
    hung = HangsAtStart(MemoryConfig(), _ctx())
    tier = Tier("slow", hung, TierSettings(deadline_s=0.2, breaker_cooldown_s=3600))
    tiers = Tiers([tier])
    assert _bounded(tiers.open) == ["slow"]
    _bounded(tiers.close)  # does not wait for the open
    hung.release.set()
    assert hung.closed.wait(JOIN_S)
    assert not hung.is_open and not tier.available


def test_required_tier_that_cannot_open_fails_the_start_up_naming_it() -> None:
    down = DownAtStart(MemoryConfig(), _ctx())
    other = MemoryBackend(MemoryConfig(), _ctx())
    tiers = Tiers([Tier("remote", down, TierSettings(required=True)), Tier("local", other)])
    error = _bounded(tiers.open)
    assert isinstance(error, BackendUnavailableError)
    assert "tier 'remote'" in str(error) and "127.0.0.1:9 refused" in str(error)
    assert not other.is_open  # the tiers that did open are closed again


def test_required_tier_that_hangs_fails_the_start_up_within_its_deadline() -> None:
    hung = HangsAtStart(MemoryConfig(), _ctx())
    tiers = Tiers([Tier("slow", hung, TierSettings(deadline_s=0.2, required=True))])
    error = _bounded(tiers.open)
    assert isinstance(error, BackendUnavailableError)
    assert "tier 'slow'" in str(error) and "deadline_s of 0.2 s" in str(error)
    hung.release.set()
    assert hung.closed.wait(JOIN_S)  # opened late, then closed: start-up had given up on it
    assert not hung.is_open


def test_required_tier_that_opens_starts_normally() -> None:
    backend = MemoryBackend(MemoryConfig(), _ctx())
    tiers = Tiers([Tier("local", backend, TierSettings(required=True))])
    assert tiers.open() == []
    assert backend.is_open and tiers["local"].available
    tiers.close()
