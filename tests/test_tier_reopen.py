"""A tier whose backend could not open (store down at start-up) rejoins once it can open."""

from __future__ import annotations

import hashlib
import time

from hicache.config import TierSettings
from hicache.errors import BackendUnavailableError
from hicache.storage.backend import BackendContext
from hicache.storage.memory import MemoryBackend, MemoryConfig
from hicache.tiering.tiers import Tier, Tiers

PAGE = 4096


class DownAtStart(MemoryBackend):
    """A memory tier whose ``open`` fails while ``down`` is set (an endpoint not yet up)."""

    down = True

    def _open(self) -> None:
        if self.down:
            raise BackendUnavailableError("endpoint 127.0.0.1:9 refused the connection")
        super()._open()


def _key(i: int) -> str:
    return hashlib.sha256(f"reopen:{i}".encode()).hexdigest()


def test_unavailable_tier_is_reopened_after_the_cooldown() -> None:
    now = [0.0]
    backend = DownAtStart(MemoryConfig(), BackendContext(page_bytes=PAGE, namespace="reopen"))
    tier = Tier("remote", backend, TierSettings(breaker_cooldown_s=10.0), clock=lambda: now[0])
    tiers = Tiers([tier])
    assert tiers.open() == ["remote"]
    assert tiers.publishing == []

    backend.down = False
    now[0] = 5.0  # before the cool-down: no new attempt, still out of the cascade
    assert not tier.available
    time.sleep(0.05)
    assert not backend.is_open

    now[0] = 11.0  # after it: one background attempt, the request path never waits for it
    assert not tier.available
    deadline = time.monotonic() + 5
    while not tier.available and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tier.available and backend.is_open
    assert [t.name for t in tiers.publishing] == ["remote"]
    keys = [_key(1)]
    assert backend.put(keys, [memoryview(bytes(PAGE))])[0].stored
    assert [(r.tier.name, r.start, r.end) for r in tiers.lookup(keys)] == [("remote", 0, 1)]
    assert tiers.stats()["remote"]["errors_by_kind"] == {"BackendUnavailableError": 1}
    tiers.close()


def test_a_failed_reopen_waits_another_cooldown() -> None:
    now = [0.0]
    backend = DownAtStart(MemoryConfig(), BackendContext(page_bytes=PAGE, namespace="reopen"))
    tier = Tier("remote", backend, TierSettings(breaker_cooldown_s=10.0), clock=lambda: now[0])
    tiers = Tiers([tier])
    tiers.open()
    now[0] = 10.0
    assert not tier.available  # starts an attempt, which fails
    deadline = time.monotonic() + 5
    while tiers.stats()["remote"]["errors_by_kind"].get("BackendUnavailableError") != 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    backend.down = False
    now[0] = 15.0
    assert not tier.available
    time.sleep(0.05)
    assert not backend.is_open  # the next attempt waits until 20.0
    now[0] = 20.0
    tier.available  # noqa: B018 - the property starts the attempt
    deadline = time.monotonic() + 5
    while not tier.available:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    tiers.close()
