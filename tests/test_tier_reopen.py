"""A tier whose backend could not open (store down at start-up) rejoins once it can open."""

from __future__ import annotations

import hashlib
import threading

from hicache.errors import BackendUnavailableError
from hicache.storage.backend import BackendContext
from hicache.storage.memory import MemoryBackend, MemoryConfig
from hicache.storage.tiers import Tier, Tiers, TierSettings
from hicache.testing.clock import ManualClock
from hicache.testing.wait import wait_for

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
