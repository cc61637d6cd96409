"""Reads ahead of writes in the laned pool, and the thread counts tiers and the storage engine
get by default (the engine's lanes are tested in ``test_storage_engine.py``).

Ordering is shown with events, never timing: a read submitted behind writes that cannot finish
completes while they are still blocked.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hicache.config import TierSettings, load_config
from hicache.errors import ConfigError
from hicache.pools import HostPool, KVLayout
from hicache.storage.backend import Capabilities
from hicache.testing.backends import faulty_memory, memory_backend
from hicache.testing.wait import WAIT_S, wait_for
from hicache.tiering.engine import StorageEngine
from hicache.tiering.lanes import Lane, LanedPool, default_io_threads
from hicache.tiering.tiers import Tier, Tiers

PS = 2
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, page_size=PS, dtype=torch.float32)

# ---------------------------------------------------------------------- the pool


class _Gate:
    """Jobs that say they started, then wait for one release."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started: list[str] = []
        self._lock = threading.Lock()

    def job(self, name: str, block: bool = True) -> Callable[[], str]:
        def run() -> str:
            with self._lock:
                self.started.append(name)
            if block:
                assert self.release.wait(WAIT_S)
            return name

        return run

    def started_now(self) -> list[str]:
        with self._lock:
            return list(self.started)


def test_read_runs_while_every_write_slot_is_blocked() -> None:
    pool = LanedPool(3, "t")
    gate = _Gate()
    writes = [pool.submit(gate.job(f"w{i}"), Lane.WRITE) for i in range(5)]
    wait_for(lambda: len(gate.started_now()) == 2, what="two writes running")
    read = pool.submit(gate.job("r", block=False), Lane.READ)
    assert read.result(WAIT_S) == "r"
    # writes hold at most threads - 1 threads: the other three still wait
    assert sorted(gate.started_now()) == ["r", "w0", "w1"]
    assert not any(w.done() for w in writes)
    gate.release.set()
    assert [w.result(WAIT_S) for w in writes] == [f"w{i}" for i in range(5)]
    pool.shutdown(wait=True)


def test_a_job_queued_with_a_thread_idle_is_not_starved_by_a_hung_job() -> None:
    """Threads start on demand. A write is queued while the one thread is idle, and before
    that thread wakes a read is queued: it takes the read first (reads first), and the read
    hangs. The write must still run on a thread of its own: the pool is under its bound (it
    once waited for the hung read, and the engine's eviction poll with it)."""
    pool = LanedPool(2, "t")
    gate = _Gate()
    assert pool.submit(gate.job("warm", block=False)).result(WAIT_S) == "warm"
    wait_for(lambda: pool._idle == 1, what="the one thread idle")
    with pool._cv:  # the idle thread cannot wake until both are queued
        write = pool.submit(gate.job("w", block=False), Lane.WRITE)
        read = pool.submit(gate.job("r"), Lane.READ)
    assert write.result(WAIT_S) == "w"
    assert not read.done()  # still hung
    gate.release.set()
    assert read.result(WAIT_S) == "r"
    pool.shutdown(wait=True)


def test_queued_read_goes_before_queued_writes_on_one_thread() -> None:
    pool = LanedPool(1, "t")
    gate = _Gate()
    first = pool.submit(gate.job("w0"), Lane.WRITE)
    wait_for(lambda: gate.started_now() == ["w0"], what="the first write running")
    later = [pool.submit(gate.job(f"w{i}", block=False), Lane.WRITE) for i in (1, 2)]
    reads = [pool.submit(gate.job(f"r{i}", block=False), Lane.READ) for i in (0, 1)]
    gate.release.set()
    for f in [first, *later, *reads]:
        f.result(WAIT_S)
    assert gate.started_now() == ["w0", "r0", "r1", "w1", "w2"]
    pool.shutdown(wait=True)


def test_shutdown_cancels_queued_jobs_and_refuses_new_ones() -> None:
    pool = LanedPool(1, "t")
    gate = _Gate()
    running = pool.submit(gate.job("w0"), Lane.WRITE)
    wait_for(lambda: gate.started_now() == ["w0"], what="the write running")
    queued = pool.submit(gate.job("w1", block=False), Lane.WRITE)
    pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(gate.job("late", block=False), Lane.READ)
    gate.release.set()
    assert running.result(WAIT_S) == "w0"
    pool.shutdown(wait=True)


def test_run_here_runs_a_queued_job_on_the_calling_thread_once() -> None:
    pool = LanedPool(1, "t")
    gate = _Gate()
    busy = pool.submit(gate.job("w0"), Lane.WRITE)
    wait_for(lambda: gate.started_now() == ["w0"], what="the one thread busy")
    ran_on: list[threading.Thread] = []

    def read() -> str:
        ran_on.append(threading.current_thread())
        return "r"

    queued = pool.submit(read, Lane.READ)
    assert pool.run_here(queued)
    assert queued.result(0) == "r" and ran_on == [threading.current_thread()]
    assert not pool.run_here(queued)  # no longer queued: nothing runs twice
    assert not pool.run_here(busy)  # a worker has it
    gate.release.set()
    assert busy.result(WAIT_S) == "w0"
    assert ran_on == [threading.current_thread()]
    pool.shutdown(wait=True)


def test_shutdown_without_cancelling_ends_threads_that_waited_for_a_write_slot() -> None:
    """Two threads, one write slot: the second thread idles while a write waits for the slot.
    A shutdown that lets queued jobs finish must still end that idle thread (once nothing is
    left), or joining it hangs."""
    pool = LanedPool(2, "t")
    gate = _Gate()
    first = pool.submit(gate.job("w0"), Lane.WRITE)
    wait_for(lambda: gate.started_now() == ["w0"], what="the first write running")
    second = pool.submit(gate.job("w1", block=False), Lane.WRITE)
    wait_for(lambda: pool._idle == 1, what="a second thread idle, the write slot taken")
    closer = threading.Thread(target=pool.shutdown, kwargs={"wait": True, "cancel_futures": False})
    closer.start()
    wait_for(lambda: pool._closed, what="the pool shut")
    gate.release.set()
    closer.join(WAIT_S)
    assert not closer.is_alive()
    assert first.result(0) == "w0" and second.result(0) == "w1"


def test_many_submitters_lose_no_job() -> None:
    """A submit wakes one idle thread, not all: no job may be left queued with a thread idle."""
    pool = LanedPool(3, "t")
    done = threading.Semaphore(0)

    def submit_some(lane: Lane) -> None:
        for _ in range(200):
            pool.submit(done.release, lane)

    submitters = [threading.Thread(target=submit_some, args=(lane,)) for lane in Lane for _ in "ab"]
    for t in submitters:
        t.start()
    for t in submitters:
        t.join(WAIT_S)
    for _ in range(800):
        assert done.acquire(timeout=WAIT_S)
    pool.shutdown(wait=True)


# ---------------------------------------------------------------------- thread counts


def test_default_io_threads_follow_cores_and_tier_kind() -> None:
    assert default_io_threads(remote=False, cores=1) == 3  # a read thread and two writes
    assert default_io_threads(remote=False, cores=2) == 4
    assert default_io_threads(remote=False, cores=12) == 24
    assert default_io_threads(remote=False, cores=64) == 32
    assert default_io_threads(remote=True, cores=2) == 16
    assert default_io_threads(remote=True, cores=64) == 32
    with pytest.raises(ValueError, match="cores must be >= 1, got 0"):
        default_io_threads(remote=False, cores=0)


def test_tiers_and_engine_get_the_default_thread_counts() -> None:
    local = memory_backend(LAYOUT.page_bytes, namespace="eng")
    remote = memory_backend(LAYOUT.page_bytes, namespace="eng", tier_name="r")
    given = memory_backend(LAYOUT.page_bytes, namespace="eng", tier_name="g")
    tiers = Tiers(
        [
            Tier("local", local, TierSettings()),
            Tier("remote", remote, TierSettings(medium="EXTERNAL")),
            Tier("given", given, TierSettings(io_threads=3)),
        ]
    )
    assert tiers["local"].caller.threads == default_io_threads(remote=False)
    assert tiers["remote"].caller.threads == default_io_threads(remote=True)
    assert tiers["given"].caller.threads == 3
    host = HostPool(LAYOUT, 4, pin=False)
    engine = StorageEngine(tiers, host, page_size=PS)
    total = sum(t.caller.threads for t in tiers)
    assert engine.workers._executor.threads == max(2, min(total, 32))
    engine.close()
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        StorageEngine(tiers, host, page_size=PS, workers=0)
    tiers.close()


def test_external_default_medium_counts_as_remote() -> None:
    inner = faulty_memory(
        LAYOUT.page_bytes, namespace="eng", capabilities=Capabilities(default_medium="EXTERNAL")
    )
    tier = Tier("s", inner, TierSettings())
    assert tier.caller.threads == default_io_threads(remote=True)
    tier.close()


@pytest.mark.parametrize("value", ["0", "-2", "300", "many"])
def test_bad_io_threads_is_an_error_at_its_path(tmp_path: Path, value: str) -> None:
    path = tmp_path / "hicache.yaml"
    path.write_text(
        "model: {name: m}\n"
        f"storage:\n  tiers:\n    ram: {{backend: memory, io_threads: {value}}}\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "storage.tiers.ram.io_threads:" in str(exc.value)
    assert value in str(exc.value)
