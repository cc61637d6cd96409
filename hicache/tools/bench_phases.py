"""Timing one side of a storage benchmark round (the backend, or its raw baseline).

- :func:`measure_side`  put every page, read back cold and hot, ask ``exists``/``exists_prefix``
- :func:`run_parallel`  one timed phase: threads released together, every call timed
- :func:`settle`        flush what the previous side left dirty before timing the next
- :func:`fill_page`     incompressible, distinct page contents at no urandom cost

:mod:`hicache.tools.benchmark` pairs two sides into figures and ratios.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hicache.storage.backend import PageStatus

if TYPE_CHECKING:
    from hicache.tools.benchmark import BenchSpec

__all__ = [
    "Phase",
    "Side",
    "Work",
    "fill_page",
    "measure_side",
    "run_parallel",
    "settle",
    "side_phases",
    "split_slices",
]


@dataclass(frozen=True, slots=True)
class Phase:
    seconds: float
    #: Pages or keys the phase went through.
    units: int
    latencies: list[float]
    problems: dict[str, int]
    #: CPU time of the whole process over the phase (every thread, user and system): on cores
    #: shared with other work the wall clock says what share of them a side got, this what the
    #: side cost.
    cpu_seconds: float = 0.0


Work = Callable[[Sequence[int], int], Sequence[PageStatus] | None]


def run_parallel(
    threads: int,
    slices: Sequence[Sequence[int]],
    step: int,
    work: Work,
    progress: Callable[[int], None] | None,
) -> Phase:
    """Run ``work(indices, thread_no)`` over each thread's slice in chunks of ``step``, all
    threads released together; time the whole phase and every call."""
    barrier = threading.Barrier(threads + 1)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    problems: dict[str, int] = {}
    problems_lock = threading.Lock()
    errors: list[BaseException] = []

    def body(t: int) -> None:
        mine = slices[t]
        own = latencies[t]
        barrier.wait()
        try:
            for start in range(0, len(mine), step):
                chunk = mine[start : start + step]
                began = time.perf_counter()
                statuses = work(chunk, t)
                own.append(time.perf_counter() - began)
                if statuses is not None:
                    bad = [s for s in statuses if s is not PageStatus.OK]
                    if bad:
                        with problems_lock:
                            for status in bad:
                                problems[status.value] = problems.get(status.value, 0) + 1
                if progress is not None:
                    progress(len(chunk))
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=body, args=(t,), daemon=True) for t in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    began = time.perf_counter()
    cpu_began = time.process_time()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - began
    cpu_seconds = time.process_time() - cpu_began
    if errors:
        raise errors[0]
    units = sum(len(own) for own in slices)
    return Phase(seconds, units, [x for own in latencies for x in own], problems, cpu_seconds)


def split_slices(indices: Sequence[int], threads: int) -> list[list[int]]:
    """Contiguous, near-equal runs of ``indices``, one per thread."""
    n = len(indices)
    bounds = [n * t // threads for t in range(threads + 1)]
    return [list(indices[bounds[t] : bounds[t + 1]]) for t in range(threads)]


def fill_page(buf: bytearray, seed: int) -> None:
    # Incompressible, distinct per buffer; built from a hash chain so no page costs urandom time.
    block = hashlib.sha256(seed.to_bytes(8, "little")).digest() * 2048  # 64 KiB
    for off in range(0, len(buf), len(block)):
        buf[off : off + len(block)] = block[: len(buf) - off]
    buf[:8] = seed.to_bytes(8, "little")


@dataclass(slots=True)
class Side:
    """Measured phases of one side (the backend, or its raw baseline)."""

    put: Phase
    get_cold: Phase | None
    get_hot: Phase | None
    exists: Phase | None
    exists_prefix: Phase | None


def measure_side(
    *,
    put: Work,
    get: Work,
    exists: Work,
    exists_prefix: Work,
    drop_cache: Callable[[], bool],
    num_pages: int,
    readable: Callable[[], list[int]],
    threads: int,
    spec: BenchSpec,
    progress: Callable[[int], None] | None,
) -> tuple[Side, list[int]]:
    """Put every page, then read back (cold, hot) and ask about the pages ``readable()`` names
    (a tier with less capacity than the run keeps only some); return them with the phases."""
    put_phase = run_parallel(
        threads, split_slices(range(num_pages), threads), spec.batch, put, progress
    )
    read = readable()
    if progress is not None and len(read) < num_pages:
        progress(2 * (num_pages - len(read)))  # reads skipped for pages the tier dropped
    slices = split_slices(read, threads)
    cold: Phase | None = None
    if read and drop_cache():
        cold = run_parallel(threads, slices, spec.batch, get, progress)
    elif progress is not None:
        progress(len(read))
    if not read:
        return Side(put_phase, None, None, None, None), read
    hot = run_parallel(threads, slices, spec.batch, get, progress)
    # Presence checks are cheap: repeat them over the same keys so the timing is not noise.
    repeated = [own * spec.exists_repeats(len(read)) for own in slices]
    ex = run_parallel(threads, repeated, spec.exists_batch, exists, None)
    exp = run_parallel(threads, repeated, spec.exists_batch, exists_prefix, None)
    return Side(put_phase, cold, hot, ex, exp), read


def settle() -> None:
    """Flush what the previous side left dirty (its writes, its deletes) before timing the next
    one, so neither side pays for the other's writeback: without it the side measured second
    ran up to several times slower on a fresh disk right after 2 GiB were deleted."""
    if hasattr(os, "sync"):
        os.sync()


def side_phases(side: Side) -> dict[str, Phase | None]:
    return {
        "put": side.put,
        "get_cold": side.get_cold,
        "get_hot": side.get_hot,
        "exists": side.exists,
        "exists_prefix": side.exists_prefix,
    }
