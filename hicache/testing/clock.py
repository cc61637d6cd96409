"""A clock that moves only when a test moves it (no torch, no pytest).

Breakers, callers and tiers take a ``clock`` callable; tests hand them a :class:`ManualClock`
and step through cool-downs and deadlines without sleeping.
"""

from __future__ import annotations

__all__ = ["ManualClock"]


class ManualClock:
    """Returns ``now``, which only changes when the test sets it or calls :meth:`advance`."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move the clock ``seconds`` forward; return the new time."""
        self.now += seconds
        return self.now
