"""Two lanes of storage work on one set of threads: reads ahead of writes (no torch).

- ``Lane.READ``    lookups and prefetch reads: a request is waiting for them
- ``Lane.WRITE``   publishes and housekeeping: nobody waits for them
- ``LanedPool(threads, name)``  daemon threads; ``submit(fn, lane, ticket)`` returns a
  ``Future``; ``promote(ticket)`` moves a queued write to the read lane; ``run_here(future)``
  runs a job still queued on the calling thread; ``shutdown(wait=..., cancel_futures=...)``
- ``LaneTicket``   the lane of one piece of work that may pass through several pools: a put a
  lookup must wait for (its pages are on their way) is promoted wherever it is queued
- ``default_io_threads(remote=...)``  how many threads a tier's calls get when not configured
  (from ``usable_cores()``: the CPU affinity of this process, not the machine's core count)

Why lanes: write-through publishes every backed-up page, so puts arrive in bursts far larger
than the lookups and reads a request waits for. With one FIFO queue a lookup submitted behind a
burst waits for every put ahead of it, and the serving thread waits with it. Here a free thread
always takes the oldest read first, and writes may occupy at most ``threads - 1`` threads, so
one thread is free for a read even while every other one is busy putting (one running write
is never interrupted, so with ``threads=1`` a read waits for at most that one).

Hand-offs: every thread waits for the same thing (a read, or a write with a write slot free),
so a submit wakes one idle thread, not all of them: on a small machine every spurious wake-up
is a futex round trip and a fight for the GIL. A thread that finished a write gives its slot
back and takes its next job under one lock; it needs to wake nobody (it takes the next job
itself). A caller about to block on a job still queued runs it itself (``run_here``): the
job costs no wake-up of a worker and none of the caller.

Daemon threads, not ``ThreadPoolExecutor``: its threads are joined at interpreter exit, so one
backend call hung for good (a dead NFS mount) would keep the whole process from exiting. A call
left running here only ever costs its thread.
"""

from __future__ import annotations

import enum
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["Lane", "LaneTicket", "LanedPool", "default_io_threads", "usable_cores"]

T = TypeVar("T")

_Item = tuple[Future[Any], Callable[[], Any], "LaneTicket | None"]

#: Upper bound of a default thread count (a remote store on a large machine).
_MAX_DEFAULT_THREADS = 32


class Lane(enum.IntEnum):
    """Which queue a job waits in; a lower value is served first."""

    READ = 0
    WRITE = 1


class LaneTicket:
    """The lane of one piece of work, shared by every pool it is queued in (mutable)."""

    __slots__ = ("lane",)

    def __init__(self, lane: Lane = Lane.WRITE) -> None:
        self.lane = lane


def default_io_threads(*, remote: bool, cores: int | None = None) -> int:
    """Threads worth giving one tier's calls on this machine.

    A local tier (disk, memory, a mapped file) is bound by the CPU: checksums, copies and
    system calls all want a core; two calls per core let one call's system time (the GIL
    released) overlap another's Python, more only trade the GIL back and forth. A remote tier
    (object store, key-value server) mostly waits on the network, so several calls per core
    overlap their round trips. At least 3: :class:`LanedPool` keeps one thread back for reads,
    and two writes in flight keep a tier's puts draining while one waits for the disk.
    """
    n = cores if cores is not None else usable_cores()
    if n < 1:
        raise ValueError(f"cores must be >= 1, got {n}")
    wanted = 8 * n if remote else 2 * n
    return max(3, min(wanted, _MAX_DEFAULT_THREADS))


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container or ``taskset`` may
    allow fewer than the machine has), else ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return os.cpu_count() or 1


class LanedPool:
    """Daemon threads serving two FIFO lanes, reads first (see the module docstring)."""

    def __init__(self, threads: int, name: str) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self._max = threads
        self._name = name
        # one thread stays free for reads whenever there is more than one
        self._write_limit = threads - 1 if threads > 1 else 1
        self._cv = threading.Condition()
        self._lanes: tuple[deque[_Item], deque[_Item]] = (deque(), deque())
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._writing = 0
        self._closed = False

    @property
    def threads(self) -> int:
        """The most threads this pool runs."""
        return self._max

    def submit(
        self, fn: Callable[[], T], lane: Lane = Lane.WRITE, ticket: LaneTicket | None = None
    ) -> Future[T]:
        """Queue ``fn()`` in ``lane`` (or the ``ticket``'s lane, if that comes first); raises
        ``RuntimeError`` after :meth:`shutdown`."""
        future: Future[T] = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("cannot submit after shutdown")
            # read under the lock: a promote() that ran before sees this item, or set the
            # ticket's lane before we read it here
            if ticket is not None:
                lane = min(lane, ticket.lane)
            self._lanes[lane].append((future, fn, ticket))
            # a thread per queued job up to the bound: an idle thread that has not woken yet
            # may take another job queued meanwhile (a read, first), which may hang, so
            # "some thread is idle" does not mean this job will run
            queued = len(self._lanes[0]) + len(self._lanes[1])
            if queued > self._idle and len(self._threads) < self._max:
                t = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(t)
                t.start()
            # one job: one idle thread can take it (all wait for the same thing); a thread woken
            # for a write while every write slot is taken waits again, and the thread that
            # frees a slot takes the write itself
            self._cv.notify()
        return future

    def run_here(self, future: Future[Any]) -> bool:
        """Run the job of ``future`` on this thread if it is still queued; ``False`` when a
        worker already took it (or it is not this pool's). For a caller that would only block
        on ``future``: the job then costs no hand-off to a worker and back."""
        with self._cv:
            found = next(
                ((q, i) for q in self._lanes for i, item in enumerate(q) if item[0] is future),
                None,
            )
            if found is None:
                return False
            queue, i = found
            fn = queue[i][1]
            del queue[i]
        _run(future, fn)
        return True

    def promote(self, ticket: LaneTicket) -> int:
        """Move the writes queued with ``ticket`` to the end of the read lane (in order);
        return how many moved. Set ``ticket.lane`` first, so later submits go there too."""
        with self._cv:
            reads, writes = self._lanes
            moved = [item for item in writes if item[2] is ticket]
            if moved:
                kept = [item for item in writes if item[2] is not ticket]
                writes.clear()
                writes.extend(kept)
                reads.extend(moved)
                self._cv.notify_all()
            return len(moved)

    def _take(self) -> tuple[_Item, bool] | None:
        """The next job and whether it is a write; None when shut down. Holds ``_cv``."""
        reads, writes = self._lanes
        while True:
            if reads:
                return reads.popleft(), False
            if writes and self._writing < self._write_limit:
                self._writing += 1
                return writes.popleft(), True
            if self._closed and not reads and not writes:
                self._cv.notify_all()  # the others wait for work that will not come: let them end
                return None
            self._idle += 1
            try:
                self._cv.wait()
            finally:
                self._idle -= 1

    def _work(self) -> None:
        write = False
        while True:
            with self._cv:
                if write:  # the slot of the write just finished: this thread takes what waits
                    self._writing -= 1
                taken = self._take()
                if write and taken is not None and not taken[1] and self._lanes[1]:
                    self._cv.notify()  # it took a read: the freed slot is for an idle thread
            if taken is None:
                return
            (future, fn, _), write = taken
            _run(future, fn)

    def shutdown(self, *, wait: bool = False, cancel_futures: bool = True) -> None:
        """Refuse new jobs; cancel queued ones (``cancel_futures``) or let the threads finish
        them; ``wait`` joins the threads (as long as a hung call takes)."""
        with self._cv:
            self._closed = True
            threads = list(self._threads)
            dropped: list[_Item] = []
            if cancel_futures:
                for q in self._lanes:
                    dropped.extend(q)
                    q.clear()
            self._cv.notify_all()
        for future, _, _ in dropped:
            future.cancel()
        if wait:
            current = threading.current_thread()
            for t in threads:
                if t is not current:
                    t.join()


def _run(future: Future[Any], fn: Callable[[], Any]) -> None:
    """Run ``fn`` for ``future`` unless it was cancelled while queued."""
    if future.set_running_or_notify_cancel():
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)
