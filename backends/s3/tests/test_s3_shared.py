"""One bucket shared by separate serving processes, and the cache's failure handling around S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hicache_s3 import S3Backend
from hicache_s3.devserver import DevServer
from hicache_s3.testing import (
    fast_options,
    make_s3_backend,
    new_bucket,
    page_keys,
    page_payloads,
    raw_client,
)

from hicache.storage import PageStatus
from hicache.testing.wait import wait_for
from hicache.tiering.breaker import BreakerState, CircuitBreaker
from hicache.tiering.calls import FailureKind, TierCaller

PEER = Path(__file__).with_name("s3_cache_peer.py")


# Opening runs under the tier's deadline (5 s by default): a loaded machine may take longer to
# build a boto3 client, and these tests are about sharing pages, not about a degraded start.
_GENEROUS_DEADLINE = "\n                  deadline_s: 60.0"


def _config(
    tmp_path: Path, endpoint: str, bucket: str, tier_extra: str = _GENEROUS_DEADLINE
) -> Path:
    path = tmp_path / "shared.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            cache: {{page_size: 4, device: cpu, host_pool: 1MiB, write_policy: write_through}}
            model: {{name: test/tiny, revision: r1, num_layers: 2, num_kv_heads: 2,
                     head_dim: 64, dtype: bfloat16}}
            storage:
              prefetch: {{policy: timeout, threshold_tokens: 4, timeout_s: 60.0}}
              tiers:
                shared:
                  backend: s3{tier_extra}
                  options: {{bucket: {bucket}, prefix: shared, endpoint_url: "{endpoint}",
                             connect_timeout: 1.0, read_timeout: 30.0, max_attempts: 2}}
            events: {{publisher: null}}
            """
        )
    )
    return path


def _peer(role: str, config: Path, pages: int, env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(PEER), role, str(config), str(pages)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.timeout(900)
def test_second_process_prefetches_what_the_first_published(
    s3_server: DevServer, tmp_path: Path, aws_env: dict[str, str]
) -> None:
    """Two processes, two caches, one bucket: the second prefetches the first's pages from S3
    into its own L2, loads them back to L1, and reads bytes identical to what the first computed.
    """
    pytest.importorskip("torch")
    bucket = new_bucket(s3_server.endpoint_url)
    # budgets (prefetch wait, call deadline, read timeout) far past what a loaded machine
    # needs: this test is about the bytes that arrive, not how fast
    config = _config(
        tmp_path, s3_server.endpoint_url, bucket, "\n                  deadline_s: 60.0"
    )
    env = {**os.environ}
    published = _peer("publish", config, 6, env)
    assert len(published["digests"]) == 6
    assert published["tiers"]["shared"]["put_stored"] == 6, published["tiers"]
    fetched = _peer("prefetch", config, 6, env)
    assert fetched["inserted_tokens"] == 6 * 4 and fetched["host_hit_pages"] == 6
    assert fetched["digests"] == published["digests"]
    assert fetched["tiers"]["shared"]["get_ok"] == 6, fetched["tiers"]


def test_breaker_opens_on_a_dead_endpoint_and_closes_when_it_is_back(
    aws_env: dict[str, str], tmp_path: Path
) -> None:
    """The tiers' call wrapper around the S3 backend: failures within the deadline, the breaker
    opens, refuses calls while open, and closes after the server is back."""
    server = DevServer(log_path=tmp_path / "moto.log").start()
    try:
        bucket = new_bucket(server.endpoint_url)
        keys, payloads = page_keys(4, "breaker"), page_payloads(4)
        breaker = CircuitBreaker(failure_threshold=2, cooldown_s=0.5)
        caller = TierCaller("s3", deadline_s=10.0, threads=2, breaker=breaker)
        with make_s3_backend(fast_options(server.endpoint_url, bucket)) as backend:
            assert isinstance(backend, S3Backend)

            def read() -> Any:
                bufs = [memoryview(bytearray(len(p))) for p in payloads]
                return caller.call(lambda: backend.get_into(keys, bufs))

            assert caller.call(lambda: backend.put(keys, payloads)).value == [PageStatus.OK] * 4
            assert read().value == [PageStatus.OK] * 4
            server.kill()
            outcomes = [read() for _ in range(2)]
            assert [o.failure for o in outcomes] == [FailureKind.UNAVAILABLE] * 2
            assert breaker.state is BreakerState.OPEN
            assert read().failure is FailureKind.BREAKER_OPEN  # not even tried
            server.restart()
            raw_client(server.endpoint_url).create_bucket(Bucket=bucket)  # moto forgot it
            # past the cool-down: the next call is the probe
            wait_for(lambda: not breaker.would_refuse(), what="the breaker's cool-down")
            assert caller.call(lambda: backend.put(keys, payloads)).value is not None
            assert breaker.state is BreakerState.CLOSED
            assert read().value == [PageStatus.OK] * 4
        caller.close(wait=True)
    finally:
        server.kill()


def _publish(cache: Any, tokens: list[int], seed: int) -> None:
    import torch

    layout = cache.device_pool.layout
    pages = cache.device_pool.alloc(len(tokens) // cache.page_size)
    assert pages is not None
    gen = torch.Generator().manual_seed(seed)
    for p in pages:
        cache.device_pool.write_page(
            p, torch.randn(layout.page_shape, generator=gen).to(layout.dtype)
        )
    cache.insert(tokens, pages)
    cache.writing_check()
    assert cache.storage.wait_idle(timeout=60)
    cache.writing_check()


def _external_pages(events: list[Any]) -> int:
    from hicache.events import BlockStored

    return sum(
        len(e.block_hashes) for e in events if isinstance(e, BlockStored) and e.medium == "EXTERNAL"
    )


def test_cache_degrades_to_misses_while_s3_is_down(aws_env: dict[str, str], tmp_path: Path) -> None:
    """Two caches on one bucket; the server dies: publishing fails without announcing anything,
    prefetch is a miss, nothing raises or hangs, and the tier's breaker opens; after the server
    is back and the cool-down passed, the breaker closes and the same caches work again."""
    pytest.importorskip("torch")
    from hicache.config import load_config
    from hicache.hiradix import HiRadixCache

    server = DevServer(log_path=tmp_path / "moto.log").start()
    try:
        bucket = new_bucket(server.endpoint_url)
        extra = "\n                  deadline_s: 20.0\n                  breaker_failures: 2"
        extra += "\n                  breaker_cooldown_s: 1.0"
        config = load_config(_config(tmp_path, server.endpoint_url, bucket, extra))
        writer = HiRadixCache.from_config(config, device_pages=64, device="cpu")
        reader = HiRadixCache.from_config(config, device_pages=64, device="cpu")
        assert writer.tiers is not None and reader.tiers is not None
        ps = writer.page_size
        shared = list(range(1000, 1000 + 4 * ps))
        _publish(writer, shared, seed=1)
        assert _external_pages(writer.take_events()) == 4

        server.kill()
        _publish(writer, list(range(5000, 5000 + 4 * ps)), seed=2)  # returns: failures counted
        assert _external_pages(writer.take_events()) == 0  # a failed backup is never announced
        assert writer.tiers.stats()["shared"]["put_stored"] == 4
        for _ in range(3):  # misses, never exceptions; the failures open the breaker
            handle = reader.prefetch_from_storage(shared)
            if handle is not None:
                assert reader.check_prefetch(handle, wait=True) == 0
        assert reader.match_prefix(shared).host_hit_pages == 0
        breaker = reader.tiers.stats()["shared"]["breaker"]
        assert breaker["state"] == "open" and breaker["opened"] >= 1, breaker

        server.restart()
        raw_client(server.endpoint_url).create_bucket(Bucket=bucket)  # moto kept nothing
        # past the cool-down: the next call is the probe
        reader_breaker = reader.tiers["shared"].breaker
        wait_for(lambda: not reader_breaker.would_refuse(), what="the breaker's cool-down")
        _publish(reader, list(range(9000, 9000 + 3 * ps)), seed=3)
        assert _external_pages(reader.take_events()) == 3  # the same instance works again
        breaker = reader.tiers.stats()["shared"]["breaker"]
        assert breaker["state"] == "closed" and breaker["closed_after_probe"] >= 1, breaker
        writer.close()
        reader.close()
    finally:
        server.kill()
