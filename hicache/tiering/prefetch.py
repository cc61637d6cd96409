"""Prefetch policies: whether to prefetch, how long a request waits, and what it may use.

- ``PrefetchRules.from_config(storage.prefetch)``  the policy, threshold and timeout knobs
- ``rules.should_prefetch(num_tokens)``  only past ``threshold_tokens`` is a storage trip worth it
- ``rules.wait_budget(num_tokens)``      seconds the request waits for its prefetch:
    ``best_effort``    0: the request takes whatever already arrived when it is scheduled
    ``wait_complete``  ``None``: until the prefetch finished (each backend call still has its
                       deadline, so this is bounded too)
    ``timeout``        ``base + per_1k_tokens * num_tokens / 1000``, capped at ``max``
- ``PrefetchWait``   a started wait (``expired()``, ``remaining()``), with an injectable clock
- ``usable_prefix(statuses)``  the longest contiguous ``OK`` prefix: the only pages the cache uses
- ``prefetch_outcome(requested, statuses, ...)``  the :class:`PrefetchOutcome` counted in the stats

A page can vanish between ``exists`` and ``get_into`` (another process, the tier's own eviction):
its ``NOT_FOUND`` just shortens the prefetch (outcome ``short``), it is not an error.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hicache.storage.backend import PageStatus

if TYPE_CHECKING:
    from hicache.config import PrefetchConfig

__all__ = [
    "PrefetchOutcome",
    "PrefetchPolicy",
    "PrefetchRules",
    "PrefetchWait",
    "prefetch_outcome",
    "usable_prefix",
]


class PrefetchPolicy(enum.StrEnum):
    """How long a request waits for pages being prefetched from storage (SGLang's names)."""

    BEST_EFFORT = "best_effort"
    WAIT_COMPLETE = "wait_complete"
    TIMEOUT = "timeout"


class PrefetchOutcome(enum.StrEnum):
    """How one prefetch ended (counted per outcome)."""

    #: Every requested page arrived.
    COMPLETE = "complete"
    #: A contiguous prefix arrived; the next page was not there (missing, or vanished after the
    #: lookup). Not an error.
    SHORT = "short"
    #: A page came back ``CORRUPT`` or ``FAILED`` (or its call failed): the prefix stops there.
    FAILED = "failed"
    #: The request stopped waiting (policy budget); only what arrived before may be used.
    TIMED_OUT = "timed_out"
    #: Below ``threshold_tokens``: not attempted.
    SKIPPED = "skipped"
    #: Nothing to read: the lookup found no stored prefix.
    MISS = "miss"


def usable_prefix(statuses: Sequence[PageStatus]) -> int:
    """Length of the leading run of ``OK`` statuses."""
    n = 0
    for status in statuses:
        if status is not PageStatus.OK:
            break
        n += 1
    return n


def prefetch_outcome(
    requested: int, statuses: Sequence[PageStatus], *, timed_out: bool = False
) -> PrefetchOutcome:
    """The outcome of a prefetch of ``requested`` pages that produced ``statuses``."""
    if timed_out:
        return PrefetchOutcome.TIMED_OUT
    if requested == 0 or not statuses:
        return PrefetchOutcome.MISS
    n = usable_prefix(statuses)
    if n == requested:
        return PrefetchOutcome.COMPLETE
    if n < len(statuses) and statuses[n] in (PageStatus.CORRUPT, PageStatus.FAILED):
        return PrefetchOutcome.FAILED
    return PrefetchOutcome.SHORT


@dataclass(frozen=True, slots=True)
class PrefetchRules:
    """The prefetch policy and its knobs (see the module docstring)."""

    policy: PrefetchPolicy
    threshold_tokens: int = 256
    timeout_base_s: float = 2.0
    timeout_per_1k_tokens_s: float = 0.25
    timeout_max_s: float = 8.0

    def __post_init__(self) -> None:
        if self.threshold_tokens < 0:
            raise ValueError(f"threshold_tokens must be >= 0, got {self.threshold_tokens}")
        if self.timeout_base_s <= 0 or self.timeout_per_1k_tokens_s < 0:
            raise ValueError(f"invalid prefetch timeout in {self!r}")
        if self.timeout_max_s < self.timeout_base_s:
            raise ValueError(
                f"timeout_max_s ({self.timeout_max_s}) is below timeout_base_s "
                f"({self.timeout_base_s})"
            )

    @classmethod
    def from_config(cls, config: PrefetchConfig, **overrides: float) -> PrefetchRules:
        """Rules from ``storage.prefetch``; ``timeout_s`` is the base, the cap 4x the base
        unless configured."""
        base = config.timeout_s
        values: dict[str, float] = {
            "timeout_base_s": base,
            "timeout_per_1k_tokens_s": config.timeout_per_1k_tokens_s,
            "timeout_max_s": config.timeout_max_s or 4 * base,
        }
        values.update(overrides)
        return cls(
            policy=config.policy,
            threshold_tokens=config.threshold_tokens,
            timeout_base_s=values["timeout_base_s"],
            timeout_per_1k_tokens_s=values["timeout_per_1k_tokens_s"],
            timeout_max_s=values["timeout_max_s"],
        )

    def should_prefetch(self, num_tokens: int) -> bool:
        """Whether ``num_tokens`` more tokens from storage are worth a prefetch."""
        return num_tokens > 0 and num_tokens >= self.threshold_tokens

    def wait_budget(self, num_tokens: int) -> float | None:
        """Seconds to wait for a prefetch of ``num_tokens`` tokens; ``None`` = until done."""
        if self.policy is PrefetchPolicy.BEST_EFFORT:
            return 0.0
        if self.policy is PrefetchPolicy.WAIT_COMPLETE:
            return None
        budget = self.timeout_base_s + self.timeout_per_1k_tokens_s * num_tokens / 1000
        return min(budget, self.timeout_max_s)

    def start(
        self, num_tokens: int, *, clock: Callable[[], float] = time.monotonic
    ) -> PrefetchWait:
        """Start the wait of one prefetch of ``num_tokens`` tokens."""
        return PrefetchWait(self.wait_budget(num_tokens), clock)


class PrefetchWait:
    """The clock of one request waiting for its prefetch."""

    __slots__ = ("_clock", "budget_s", "started")

    def __init__(self, budget_s: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget_s = budget_s
        self._clock = clock
        self.started = clock()

    def remaining(self) -> float | None:
        """Seconds left (never negative); ``None`` = no limit."""
        if self.budget_s is None:
            return None
        return max(0.0, self.budget_s - (self._clock() - self.started))

    def expired(self) -> bool:
        """True once the request should stop waiting and use what arrived."""
        left = self.remaining()
        return left is not None and left <= 0.0
