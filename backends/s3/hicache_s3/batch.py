"""Fan a batch out over the backend's worker threads and gather it back, in key order.

Rules every batch follows:
- a call returns only after every request it started has finished, so no worker still touches a
  caller's buffer afterwards (the contract forbids keeping references);
- the first :class:`~hicache.errors.BackendUnavailableError` (or ``BackendClosedError``)
  cancels the requests not started yet (the endpoint is down: fail fast instead of timing out
  page by page) and is raised once the started ones are done;
- any other per-page error becomes ``on_error`` for that page, logged.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, wait
from typing import TypeVar

from hicache.errors import BackendClosedError, BackendUnavailableError

__all__ = ["gather", "ordered_prefix"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def gather(
    pool: ThreadPoolExecutor,
    fn: Callable[..., T],
    args: Sequence[tuple[object, ...]],
    *,
    on_error: T,
    what: str,
) -> list[T]:
    """Run ``fn(*a)`` for every ``a`` of ``args`` on ``pool``; results in order.

    A single page runs in the calling thread: a hand-off to a worker would only add latency.
    """
    if len(args) == 1:
        done: Future[T] = Future()
        try:
            done.set_result(fn(*args[0]))
        except BaseException as exc:
            done.set_exception(exc)
        return _collect([done], on_error=on_error, what=what)
    futures: list[Future[T]] = []
    try:
        for a in args:
            futures.append(pool.submit(fn, *a))
    except RuntimeError:  # the pool was shut down: close() raced this call
        for fut in futures:
            fut.cancel()
        wait(futures)
        raise BackendClosedError(f"S3 backend closed during a {what} batch") from None
    return _collect(futures, on_error=on_error, what=what)


def _collect(futures: Sequence[Future[T]], *, on_error: T, what: str) -> list[T]:
    results: list[T] = []
    unavailable: BackendUnavailableError | BackendClosedError | None = None
    for fut in futures:
        try:
            results.append(fut.result())
        except CancelledError:
            results.append(on_error)
        except (BackendUnavailableError, BackendClosedError) as exc:
            results.append(on_error)
            if unavailable is None:
                unavailable = exc
                for other in futures:
                    other.cancel()
        except Exception:
            log.exception("S3 %s failed for one page", what)
            results.append(on_error)
    if unavailable is not None:
        raise _detached(unavailable)
    return results


def _detached(exc: BaseException) -> BaseException:
    """``exc`` without its traceback and chained causes, ready to raise to the caller.

    The worker frames in them hold the caller's page buffers (and botocore's request, which
    wraps them): the contract forbids keeping references to those once the call returns, and
    a caller may well keep the exception. The cause is logged at debug level instead.
    """
    log.debug("S3 batch failed", exc_info=exc)
    exc.__cause__ = None
    exc.__context__ = None
    return exc.with_traceback(None)


def ordered_prefix(
    pool: ThreadPoolExecutor,
    check: Callable[[str], bool],
    keys: Sequence[str],
    *,
    window: int,
) -> int:
    """Length of the leading run of ``keys`` for which ``check`` is true, asked in parallel.

    At most ``window`` checks of this call are in flight; the first ``False`` (in key order)
    stops it, and checks not started yet are cancelled. A check that raises stops the call the
    same way, then its error propagates.
    """
    inflight: deque[Future[bool]] = deque()
    next_idx = 0
    result = len(keys)
    error: BaseException | None = None
    for idx in range(len(keys)):
        while next_idx < len(keys) and len(inflight) < window:
            try:
                inflight.append(pool.submit(check, keys[next_idx]))
            except RuntimeError:  # the pool was shut down: close() raced this call
                for fut in inflight:
                    fut.cancel()
                raise BackendClosedError("S3 backend closed during exists_prefix") from None
            next_idx += 1
        fut = inflight.popleft()
        try:
            present = fut.result()
        except BaseException as exc:
            error, present = exc, False
        if not present:
            result = idx
            break
    # HEADs already running are left to finish on their own: they touch no caller buffer, and
    # waiting for them would only add latency to an answer that is already decided.
    for fut in inflight:
        fut.cancel()
    if error is not None:
        raise _detached(error)
    return result
