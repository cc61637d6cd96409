"""The worker pool a :class:`~hicache.tiering.engine.StorageEngine` owns (no torch).

- ``submit(fn, *args, lane=...)``  run a job on a worker thread; it counts as in flight until
                           it returns; ``Lane.READ`` jobs (lookups, prefetch reads) go ahead of
                           queued ``Lane.WRITE`` ones (publishes, housekeeping)
- ``run_here(future)``      run a job still queued on the calling thread (a caller that would
                           only block on it saves the hand-off to a worker and back)
- ``hold(pages, ...)``     holds on the host pages of one job (and bytes of an in-flight gate),
                           released at the last ``drop``: a page under a worker is never freed
- ``report(item)`` / ``take_reports()``   a worker reports what it finished; the engine's
                           ``poll`` takes the reports on the cache's thread, in order
- ``in_flight()`` / ``holds_outstanding()``   jobs still running / sets of holds still out
- ``wait_idle()``          block until nothing is in flight and every hold is released
- ``close()``              wait for the workers and stop them
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures

from hicache.tiering.engine_records import HostPages, _Done
from hicache.tiering.inflight import InflightGate
from hicache.tiering.lanes import Lane, LanedPool, LaneTicket

__all__ = ["EngineWorkers"]


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
    """A thread pool whose jobs hold host pages and report on a queue (module docstring)."""

    def __init__(self, host_pool: HostPages, *, workers: int) -> None:
        self.host_pool = host_pool
        self._executor = LanedPool(workers, "hicache-io")
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
        """Run ``fn(*args)`` on a worker, in ``lane`` (or ``ticket``'s, see :meth:`promote`);
        it counts as in flight until it returns."""
        fut: Future[None] = self._executor.submit(lambda: fn(*args), lane, ticket)
        self._track(fut)
        return fut

    def submit_after(
        self,
        after: list[Future[None]],
        fn: Callable[..., None],
        *args: object,
        lane: Lane = Lane.WRITE,
    ) -> Future[None]:
        """Like :meth:`submit`, but queue the job only once every job of ``after`` finished
        (without holding a worker meanwhile); it counts as in flight from now on."""
        if not after:
            return self.submit(fn, *args, lane=lane)
        outer: Future[None] = Future()
        self._track(outer)
        left = [len(after)]
        lock = threading.Lock()

        def ready(_: Future[None]) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            try:
                inner = self._executor.submit(lambda: fn(*args), lane)
            except RuntimeError as exc:  # closed meanwhile
                outer.set_exception(exc)
                return
            inner.add_done_callback(lambda f: _settle(f, outer))

        for dep in after:
            dep.add_done_callback(ready)
        return outer

    def run_here(self, fut: Future[None]) -> bool:
        """Run the job of ``fut`` (from :meth:`submit`) on this thread if no worker took it
        yet; ``False`` otherwise (then wait for it as usual)."""
        return self._executor.run_here(fut)

    def promote(self, ticket: LaneTicket) -> int:
        """Move the jobs queued with ``ticket`` to the read lane (set ``ticket.lane`` first)."""
        return self._executor.promote(ticket)

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
        self._executor.shutdown(wait=True, cancel_futures=False)


def _settle(inner: Future[None], outer: Future[None]) -> None:
    """Give ``outer`` the outcome of ``inner``."""
    if inner.cancelled():
        outer.cancel()
        return
    exc = inner.exception()
    if exc is not None:
        outer.set_exception(exc)
    else:
        outer.set_result(None)
