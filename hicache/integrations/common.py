"""What every engine adapter shares; imports no engine and no torch.

- ``load_tiers_config(hicache_config, tiers, origin)``  the hicache configuration an adapter's
  options name: a YAML file, or the ``storage.tiers`` mapping inline (validated, with every
  error naming its path under ``origin``); ``check_one_source`` checks only that one is given
- ``LogLimiter``    failures counted by kind, each kind logged at most once per ``LOG_EVERY_S``
- ``address_view``  a writable byte view of host memory at an address (zero-copy page buffers)
- ``AdapterStats``  what :class:`~hicache.metrics.HicacheCollector` reads of an adapter
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hicache.config import HicacheConfig, load_config, validate_tiers
from hicache.errors import ConfigError
from hicache.tiering.tiers import Tiers

__all__ = [
    "LOG_EVERY_S",
    "AdapterStats",
    "LogLimiter",
    "address_view",
    "check_one_source",
    "load_tiers_config",
]

logger = logging.getLogger(__name__)

#: At most one log line per kind of failure this often.
LOG_EVERY_S = 30.0


def check_one_source(hicache_config: str | None, tiers: object, *, origin: str) -> None:
    """Raise ``ConfigError`` unless exactly one of a YAML file and inline tiers is given."""
    if (hicache_config is None) == (tiers is None):
        raise ConfigError(
            f"{origin}: give exactly one of 'hicache_config' (a hicache YAML file) "
            "and 'tiers' (the tiers inline)"
        )


def load_tiers_config(
    hicache_config: str | None, tiers: dict[str, Any] | None, *, origin: str
) -> HicacheConfig:
    """The configuration of exactly one of ``hicache_config`` (a YAML file) and ``tiers`` (the
    tiers inline), every tier's options validated; errors say ``<origin>.<path>: <problem>``."""
    check_one_source(hicache_config, tiers, origin=origin)
    if hicache_config is not None:
        return load_config(Path(hicache_config))
    try:
        data: dict[str, Any] = {"storage": {"tiers": tiers}}
        config = HicacheConfig(**data)
    except ValidationError as exc:
        lines = [
            f"{origin}.{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors()
        ]
        raise ConfigError("\n".join(lines)) from None
    validate_tiers(config, origin=origin)
    return config


class LogLimiter:
    """Counts failures by kind and logs each kind at most once per ``LOG_EVERY_S``."""

    def __init__(self, what: str = "hicache adapter") -> None:
        self.what = what
        self.counts: Counter[str] = Counter()
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def failed(self, kind: str, exc: BaseException | str, n: int = 1) -> None:
        """``n`` failures of ``kind``; ``exc`` is the error (or a description) to log."""
        now = time.monotonic()
        with self._lock:
            self.counts[kind] += n
            due = now - self._last.get(kind, -LOG_EVERY_S) >= LOG_EVERY_S
            if due:
                self._last[kind] = now
            count = self.counts[kind]
        if due:
            logger.warning("%s: %s failed (%d so far): %r", self.what, kind, count, exc)


def address_view(address: int, nbytes: int) -> memoryview:
    """A writable byte view of ``nbytes`` of host memory at ``address`` (a host-pool region or
    a tensor's storage); whoever owns that memory must keep it alive while the view is used."""
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


class AdapterStats:
    """What :class:`~hicache.metrics.HicacheCollector` reads of an adapter: its tiers (read at
    every scrape, so an adapter may create the collector before its tiers exist) and its page
    size in tokens (for the tier token counters)."""

    def __init__(self, tiers: Callable[[], Tiers | None], page_size: Callable[[], int]) -> None:
        self._tiers = tiers
        self._page_size = page_size

    @property
    def tiers(self) -> Tiers | None:
        return self._tiers()

    def stats(self) -> dict[str, object]:
        if self._tiers() is None:
            return {}
        return {"page_size": self._page_size()}
