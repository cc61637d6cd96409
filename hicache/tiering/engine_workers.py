"""The jobs of a :class:`~hicache.tiering.engine.StorageEngine` and their holds (no torch).

- ``start(fn, *args, after=...)``  a job: ``fn(job, *args)`` starts asynchronous tier calls
                           (:meth:`TierCaller.start <hicache.tiering.calls.TierCaller.start>`)
                           and continues in their callbacks, on the tiers' threads, until it
                           calls ``finish(job)``; it counts as in flight until then, and starts
                           once the jobs ``after`` finished (``when_all``)
- ``submit(fn, *args, lane=...)``  with ``workers`` threads (the vLLM connector's loads and
                           stores, which make blocking tier calls): run a job on a worker;
                           ``Lane.READ`` jobs go ahead of queued ``Lane.WRITE`` ones
- ``hold(pages, ...)``     holds on the host pages of one job (and bytes of an in-flight gate),
                           released at the last ``drop``: a page under a backend call is never
                           freed
- ``report(item)`` / ``take_reports()``   a job reports what it finished (any thread); the
                           engine's ``poll`` takes the reports on the cache's thread, in order
- ``in_flight()`` / ``holds_outstanding()``   jobs not finished / sets of holds still out
- ``wait_idle()``          block until nothing is in flight and every hold is released
- ``close()``              wait for the workers and stop them
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures

from hicache.tiering.engine_records import HostPages, _Done
from hicache.tiering.inflight import InflightGate
from hicache.tiering.lanes import Lane, LanedPool, LaneTicket

__all__ = ["EngineWorkers", "finish", "when_all"]

logger = logging.getLogger(__name__)


class _Holds:
    """Holds on host pages (and bytes of an in-flight gate) released at the last ``drop``."""

    __slots__ = ("_count", "_gate", "_lock", "_nbytes", "_workers", "pages")

    def __init__(
        self,
        workers: EngineWorkers,
        pages: list[int],
        gate: InflightGate | None = None,
        nbytes: int = 0,
    ) -> None:
        self._workers = workers
        self.pages = pages
        self._gate = gate
        self._nbytes = nbytes
        self._lock = threading.Lock()
        self._count = 1
        workers.host_pool.hold(pages)
        workers._holds_changed(+1)

    def add(self) -> None:
        with self._lock:
            if self._count <= 0:
                raise RuntimeError("holds already released")
            self._count += 1

    def drop(self) -> None:
        with self._lock:
            self._count -= 1
            last = self._count == 0
        if last:
            try:
                self._workers.host_pool.release(self.pages)
                if self._gate is not None:
                    self._gate.release(self._nbytes)
            finally:
                self._workers._holds_changed(-1)


class EngineWorkers:
    """Jobs that hold host pages and report on a queue, optionally on a thread pool of their
    own (module docstring)."""

    def __init__(self, host_pool: HostPages, *, workers: int | None = None) -> None:
        self.host_pool = host_pool
        # None: jobs only :meth:`start` tier calls, nothing blocks a thread of its own
        self._executor = LanedPool(workers, "hicache-io") if workers is not None else None
        self._done: queue.SimpleQueue[_Done] = queue.SimpleQueue()
        self._futures: set[Future[None]] = set()
        self._futures_lock = threading.Lock()
        self._holds_cv = threading.Condition()
        self._holds_out = 0
        self._closed = False

    def submit(
        self,
        fn: Callable[..., None],
        *args: object,
        lane: Lane = Lane.WRITE,
        ticket: LaneTicket | None = None,
    ) -> Future[None]:
        """Run ``fn(*args)`` on a worker (a pool built with ``workers``), in ``lane`` (or
        ``ticket``'s); it counts as in flight until it returns."""
        if self._executor is None:
            raise RuntimeError("these workers have no threads: start() jobs instead")
        fut: Future[None] = self._executor.submit(lambda: fn(*args), lane, ticket)
        self._track(fut)
        return fut

    def start(
        self, fn: Callable[..., None], *args: object, after: Sequence[Future[None]] = ()
    ) -> Future[None]:
        """Call ``fn(job, *args)`` once every job of ``after`` finished (on the thread that
        finished the last one, or here): ``fn`` starts asynchronous tier calls and must not
        block; the job counts as in flight until it resolves ``job`` (``finish(job)``)."""
        job: Future[None] = Future()
        job.set_running_or_notify_cancel()
        self._track(job)

        def go() -> None:
            try:
                fn(job, *args)
            except Exception as exc:  # the tiers never raise; this guards against bugs
                logger.exception("storage job failed")
                if not job.done():
                    job.set_exception(exc)

        when_all(after, go)
        return job

    def _track(self, fut: Future[None]) -> None:
        with self._futures_lock:
            self._futures.add(fut)
        fut.add_done_callback(self._forget)

    def hold(self, pages: list[int], gate: InflightGate | None = None, nbytes: int = 0) -> _Holds:
        """One hold on each of ``pages`` (and ``nbytes`` of ``gate``) until the last ``drop``."""
        return _Holds(self, pages, gate, nbytes)

    def report(self, item: _Done) -> None:
        """A worker finished ``item`` (any thread)."""
        self._done.put(item)

    def take_reports(self) -> list[_Done]:
        """Every report so far, oldest first; never blocks."""
        out: list[_Done] = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def _forget(self, fut: Future[None]) -> None:
        with self._futures_lock:
            self._futures.discard(fut)

    def _holds_changed(self, delta: int) -> None:
        with self._holds_cv:
            self._holds_out += delta
            if self._holds_out == 0:
                self._holds_cv.notify_all()

    def in_flight(self) -> int:
        """Jobs submitted and not finished by their worker yet."""
        with self._futures_lock:
            return len(self._futures)

    def holds_outstanding(self) -> int:
        """Sets of host-page holds not released yet (late backend calls included)."""
        with self._holds_cv:
            return self._holds_out

    def wait_idle(self, timeout: float | None = None, *, holds: bool = True) -> bool:
        """Block until every submitted job finished and (with ``holds``) every hold was released
        (results still wait for ``poll``); ``False`` if that did not happen within ``timeout``.

        Jobs finish within their calls' deadlines; holds of a call hung in a backend last until
        it returns, so pass ``holds=False`` (or a timeout) when a backend may hang.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._futures_lock:
            futures = list(self._futures)
        _, not_done = wait_futures(futures, timeout=timeout)
        if not_done:
            return False
        if not holds:
            return True
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        with self._holds_cv:
            return self._holds_cv.wait_for(lambda: self._holds_out == 0, left)

    def close(self) -> None:
        """Wait for the workers and stop them (results not polled are dropped). A backend call
        hung past its deadline is not waited for; its holds go when it returns."""
        if self._closed:
            return
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=False)


def finish(job: Future[None]) -> None:
    """A job started with :meth:`EngineWorkers.start` is done."""
    job.set_result(None)


def when_all(after: Sequence[Future[None]], fn: Callable[[], None]) -> None:
    """Call ``fn()`` once every future of ``after`` is done: here when they are (or there are
    none), else on the thread that finishes the last one."""
    left = [len(after)]
    if not after:
        fn()
        return
    lock = threading.Lock()

    def ready(_: Future[None]) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        fn()

    for dep in after:
        dep.add_done_callback(ready)
