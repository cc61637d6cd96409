"""Start-up against a frozen S3 endpoint: a TCP server on 127.0.0.1 that accepts connections and
never answers. Opening the tiers stops waiting at the tier's deadline: the tier starts degraded
(out of the cascade, opened again in the background) or, with ``required: true``, the start-up
fails with an error naming the tier. A cache whose only L3 tier is that one serves from L1/L2.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from hicache.config import HicacheConfig
from hicache.errors import BackendUnavailableError
from hicache.hiradix import HiRadixCache
from hicache.testing.wait import run_bounded
from hicache.tiering.tiers import Tiers

# Hang detection only, never a speed assertion: without the deadline, opening would wait for
# the client's read timeout below (600 s), far past this.
JOIN_S = 120.0


class FrozenEndpoint:
    """Listens on 127.0.0.1, accepts every connection, reads nothing and answers nothing."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.accepted = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="frozen-s3", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            self._conns.append(conn)
            self.accepted.set()

    def close(self) -> None:
        # shutdown, not just close, wakes the thread blocked in accept() (Linux)
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(JOIN_S)
        for conn in self._conns:
            conn.close()


@pytest.fixture
def frozen(aws_env: dict[str, str]) -> Iterator[FrozenEndpoint]:
    endpoint = FrozenEndpoint()
    try:
        yield endpoint
    finally:
        endpoint.close()


def _config(endpoint: FrozenEndpoint, **tier: Any) -> HicacheConfig:
    return HicacheConfig(
        cache={"page_size": 4, "host_pool": 64 * 1024, "device": "cpu"},
        model={"name": "frozen", "num_layers": 2, "num_kv_heads": 2, "head_dim": 4},
        storage={
            "prefetch": {"threshold_tokens": 0},
            "tiers": {
                "far": {
                    "backend": "s3",
                    "deadline_s": 0.5,
                    "breaker_cooldown_s": 3600,
                    **tier,
                    "options": {
                        "bucket": "kv-pages",
                        "endpoint_url": endpoint.url,
                        "connect_timeout": 5,
                        "read_timeout": 600,
                        "max_attempts": 1,
                    },
                }
            },
        },
    )


def _bounded(fn: Callable[[], Any]) -> Any:
    """``fn()`` on a thread, joined with a generous timeout; its result or its exception."""
    finished, outcome = run_bounded(fn, JOIN_S)
    assert finished, "open waited for the frozen endpoint past its deadline"
    return outcome


def test_frozen_endpoint_starts_the_tier_degraded(frozen: FrozenEndpoint) -> None:
    tiers = Tiers.from_config(_config(frozen), "ns")
    failed = _bounded(tiers.open)
    assert failed == ["far"]
    # the open really reached the endpoint (client set-up may take a while on a loaded machine)
    assert frozen.accepted.wait(JOIN_S)
    tier = tiers["far"]
    assert not tier.available
    snap = tiers.stats()["far"]
    assert snap["available"] is False
    assert snap["errors_by_kind"] == {"open_timeout": 1}
    # every lookup a miss, nothing published, and nobody waits for the frozen endpoint
    assert _bounded(lambda: tiers.lookup(["0" * 64])) == []
    assert tiers.publishing == []
    _bounded(tiers.close)


def test_frozen_required_tier_fails_the_start_up_naming_it(frozen: FrozenEndpoint) -> None:
    tiers = Tiers.from_config(_config(frozen, required=True), "ns")
    error = _bounded(tiers.open)
    assert isinstance(error, BackendUnavailableError), error
    assert "tier 'far'" in str(error) and "deadline_s of 0.5 s" in str(error)
    assert "required" in str(error)


def test_frozen_required_tier_fails_the_cache_start_up(frozen: FrozenEndpoint) -> None:
    config = _config(frozen, required=True)
    error = _bounded(lambda: HiRadixCache.from_config(config, device_pages=16))
    assert isinstance(error, BackendUnavailableError), error
    assert "tier 'far'" in str(error)


def test_cache_whose_only_tier_is_frozen_serves_from_l1_and_l2(frozen: FrozenEndpoint) -> None:
    cache = _bounded(lambda: HiRadixCache.from_config(_config(frozen), device_pages=16))
    assert isinstance(cache, HiRadixCache), cache
    assert cache.tiers is not None and not cache.tiers["far"].available
    ps = cache.page_size
    tokens = list(range(1000, 1000 + 4 * ps))
    pages = cache.device_pool.alloc(4)
    assert pages is not None
    gen = torch.Generator().manual_seed(7)
    layout = cache.device_pool.layout
    for p in pages:
        cache.device_pool.write_page(
            p, torch.randn(layout.page_shape, generator=gen).to(layout.dtype)
        )
    written = [cache.device_pool.read_page(p).clone() for p in pages]
    cache.insert(tokens, pages)
    assert cache.match_prefix(tokens).device_pages == pages  # L1
    # the write-through to L2 completes; its publish to the frozen tier is skipped, not awaited
    assert cache.writing_check() == 1 and not cache.ongoing_write_through
    storage = cache.storage
    assert storage is not None and _bounded(lambda: storage.wait_idle(timeout=JOIN_S)) is True
    cache.evict(4)
    r = cache.match_prefix(tokens)
    assert r.device_pages == [] and r.host_hit_pages == 4  # L2
    loaded = cache.load_back(r.last_host_node)
    assert loaded is not None and len(loaded) == 4
    for p, want in zip(loaded, written, strict=True):
        assert torch.equal(cache.device_pool.read_page(p), want)
    # a prefetch is a miss, answered without waiting for the frozen endpoint
    handle = cache.prefetch_from_storage(list(range(5000, 5000 + 4 * ps)))
    assert handle is not None
    assert _bounded(lambda: cache.check_prefetch(handle, wait=True)) == 0
    assert cache.tiers.stats()["far"]["lookups"] == 0
    _bounded(cache.close)
