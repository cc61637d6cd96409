"""Waiting on a condition in tests, never on the clock (no torch, no pytest).

- ``wait_for(predicate, timeout=...)``  poll ``predicate`` until it holds; ``AssertionError``
                                        naming ``what`` once ``timeout`` seconds passed
- ``run_bounded(fn, timeout)``          ``fn()`` on a daemon thread: ``(finished, outcome)``,
                                        its result or the exception it raised, so a hang fails
                                        the test instead of freezing the run

A test that asserts what a background thread does waits for the state it needs with this
helper and then asserts; a fixed sleep passes or fails with the machine's load. The default
timeout is generous on purpose: it only bounds a test that is already failing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["WAIT_S", "run_bounded", "wait_for"]

#: Default bound of a wait: far past anything a healthy run needs, even on a loaded machine.
WAIT_S = 30.0


def wait_for(
    predicate: Callable[[], object],
    timeout: float = WAIT_S,
    *,
    interval: float = 0.005,
    what: str = "condition",
) -> None:
    """Return once ``predicate()`` is true; raise ``AssertionError`` after ``timeout`` seconds.

    The predicate is checked once more after the deadline, so a thread starved until then still
    counts if it got there.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            if predicate():
                return
            raise AssertionError(f"{what} not reached within {timeout:g}s")
        time.sleep(interval)


def run_bounded(fn: Callable[[], Any], timeout: float = WAIT_S) -> tuple[bool, Any]:
    """Run ``fn()`` on a daemon thread and wait up to ``timeout`` seconds for it.

    Returns ``(finished, outcome)``: ``outcome`` is what ``fn`` returned, or the exception it
    raised (returned, not raised, so a test can assert on it). A thread that never finishes is
    left behind (daemon: it cannot keep the interpreter alive).
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["outcome"] = fn()
        except BaseException as exc:
            box["outcome"] = exc

    thread = threading.Thread(target=target, daemon=True, name="hicache-bounded")
    thread.start()
    thread.join(timeout)
    return not thread.is_alive(), box.get("outcome")
