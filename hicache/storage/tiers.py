"""The ordered list of storage tiers (L3) and the cascade across them (no torch).

- ``Tiers.from_config(config, namespace)``  build every configured tier through the registry
- ``Tiers.from_backends([(name, backend), ...])``  wrap backends built by hand (tests)
- ``lookup(keys)``     cascade: tier 1 answers the longest stored prefix, tier 2 only the pages
                       after tier 1 stopped, and so on; returns ``(tier, start, end)`` ranges
- ``get_into(keys, dsts)``  read each page from the tier the cascade found it in
- ``publishing``       the tiers every backed-up page is published to (``publish: true``)

Every backend call here is synchronous and meant for the I/O workers of
:mod:`hicache.storage.engine`; a backend exception never escapes: it turns into misses or
``FAILED`` statuses and is counted on the tier (:class:`TierStats`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hicache.storage.backend import Backend, BackendContext, PageStatus

if TYPE_CHECKING:
    from hicache.config import HicacheConfig, TierConfig

__all__ = ["Tier", "TierRange", "TierSettings", "TierStats", "Tiers"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TierSettings:
    """What the cache needs from a tier's configuration (a subset of ``config.TierConfig``)."""

    publish: bool = True
    read_only: bool = False
    #: Medium announced in ``BlockStored`` events; None = the backend's ``default_medium``.
    medium: str | None = None

    @classmethod
    def from_config(cls, tier: TierConfig) -> TierSettings:
        """The settings of one configured tier."""
        return cls(publish=tier.publish, read_only=tier.read_only, medium=tier.medium)


@dataclass(slots=True)
class TierStats:
    """Counters of one tier, as plain numbers (thread-safe through ``add``)."""

    lookups: int = 0
    hit_pages: int = 0
    get_pages: int = 0
    get_ok: int = 0
    get_not_found: int = 0
    get_corrupt: int = 0
    get_failed: int = 0
    put_pages: int = 0
    put_stored: int = 0
    put_failed: int = 0
    call_errors: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        """Add ``deltas`` to the named counters."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def error(self, exc: BaseException) -> None:
        """Count one whole-call failure of kind ``type(exc).__name__``."""
        kind = type(exc).__name__
        with self._lock:
            self.call_errors += 1
            self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + 1

    def as_dict(self) -> dict[str, object]:
        """A snapshot as plain data."""
        with self._lock:
            out: dict[str, object] = {
                name: getattr(self, name)
                for name in self.__dataclass_fields__
                if not name.startswith("_") and name != "errors_by_kind"
            }
            out["errors_by_kind"] = dict(self.errors_by_kind)
        return out


@dataclass(slots=True)
class Tier:
    """One configured backend instance in the cascade."""

    name: str
    backend: Backend
    settings: TierSettings = field(default_factory=TierSettings)
    stats: TierStats = field(default_factory=TierStats)
    #: False when ``open()`` failed: the cascade and publishing skip the tier.
    available: bool = True

    @property
    def medium(self) -> str:
        """The medium of this tier's ``BlockStored`` events."""
        return self.settings.medium or self.backend.capabilities.default_medium

    @property
    def publishes(self) -> bool:
        """Whether backed-up pages are published to this tier."""
        return self.settings.publish and not self.settings.read_only

    @property
    def max_batch(self) -> int:
        """Pages per backend call."""
        return max(1, self.backend.capabilities.max_batch)

    def exists_prefix(self, keys: Sequence[str]) -> int:
        """Longest stored prefix of ``keys`` here; 0 (counted) when the backend call fails."""
        done = 0
        try:
            for start in range(0, len(keys), self.max_batch):
                chunk = keys[start : start + self.max_batch]
                n = self.backend.exists_prefix(chunk)
                done += n
                if n < len(chunk):
                    break
        except Exception as exc:  # a backend failure is a miss, never the caller's problem
            self.stats.error(exc)
            logger.warning("tier %s: exists_prefix failed: %r", self.name, exc)
        self.stats.add(lookups=1, hit_pages=done)
        return done

    def get_into(self, keys: Sequence[str], dsts: Sequence[memoryview]) -> list[PageStatus]:
        """Read ``keys`` into ``dsts``; a failed call makes its pages ``FAILED``."""
        out: list[PageStatus] = []
        for start in range(0, len(keys), self.max_batch):
            chunk = keys[start : start + self.max_batch]
            try:
                out += self.backend.get_into(chunk, dsts[start : start + self.max_batch])
            except Exception as exc:
                self.stats.error(exc)
                logger.warning("tier %s: get_into failed: %r", self.name, exc)
                out += [PageStatus.FAILED] * len(chunk)
        self.stats.add(
            get_pages=len(out),
            get_ok=out.count(PageStatus.OK),
            get_not_found=out.count(PageStatus.NOT_FOUND),
            get_corrupt=out.count(PageStatus.CORRUPT),
            get_failed=out.count(PageStatus.FAILED),
        )
        return out

    def put(self, keys: Sequence[str], srcs: Sequence[memoryview]) -> list[PageStatus]:
        """Store ``srcs`` under ``keys``; a failed call makes its pages ``FAILED``."""
        out: list[PageStatus] = []
        for start in range(0, len(keys), self.max_batch):
            chunk = keys[start : start + self.max_batch]
            try:
                out += self.backend.put(chunk, srcs[start : start + self.max_batch])
            except Exception as exc:
                self.stats.error(exc)
                logger.warning("tier %s: put failed: %r", self.name, exc)
                out += [PageStatus.FAILED] * len(chunk)
        stored = sum(1 for s in out if s.stored)
        self.stats.add(put_pages=len(out), put_stored=stored, put_failed=len(out) - stored)
        return out


@dataclass(frozen=True, slots=True)
class TierRange:
    """Pages ``[start, end)`` of a lookup are stored in ``tier``."""

    tier: Tier
    start: int
    end: int


class Tiers:
    """The ordered tiers of one cache (lookup order = configuration order)."""

    def __init__(self, tiers: Iterable[Tier]) -> None:
        self.tiers = list(tiers)
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_backends(
        cls,
        backends: Iterable[tuple[str, Backend] | tuple[str, Backend, TierSettings]],
    ) -> Tiers:
        """Tiers around ready-made backends: ``(name, backend[, settings])`` items."""
        tiers = []
        for item in backends:
            settings = item[2] if len(item) == 3 else TierSettings()
            tiers.append(Tier(item[0], item[1], settings))
        return cls(tiers)

    @classmethod
    def from_config(
        cls,
        config: HicacheConfig,
        namespace: str,
        *,
        page_bytes: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> Tiers:
        """Build (not open) every tier of ``config.storage.tiers`` for ``namespace``.

        ``page_bytes`` defaults to ``config.page_bytes``. Raises ``ConfigError`` / ``PluginError``
        from the registry for bad options or unknown kinds.
        """
        from hicache.storage.registry import create_backend

        nbytes = config.page_bytes if page_bytes is None else page_bytes
        tiers = []
        for name, tier in config.storage.tiers.items():
            context = BackendContext(
                page_bytes=nbytes,
                namespace=namespace,
                read_only=tier.read_only,
                rank=rank,
                world_size=world_size,
                tier_name=name,
            )
            backend = create_backend(
                tier.backend, tier.options, context, path=f"storage.tiers.{name}.options"
            )
            tiers.append(Tier(name, backend, TierSettings.from_config(tier)))
        return cls(tiers)

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> list[str]:
        """Open every backend (idempotent); return the names of tiers that failed to open.

        A tier that cannot open is logged, counted and left out (``available`` false): storage
        is an accelerator, so a missing bucket or disk never stops the cache from starting.
        """
        failed = []
        for t in self.tiers:
            try:
                t.backend.open()
            except Exception as exc:
                t.available = False
                t.stats.error(exc)
                failed.append(t.name)
                logger.error("tier %s: cannot open, left out: %s", t.name, exc)
            else:
                t.available = True
        return failed

    def close(self) -> None:
        """Close every backend (idempotent); a failing close is logged, not raised."""
        for t in self.tiers:
            try:
                t.backend.close()
            except Exception as exc:
                logger.warning("tier %s: close failed: %r", t.name, exc)

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self.tiers)

    def __iter__(self) -> Iterator[Tier]:
        return iter(self.tiers)

    @property
    def publishing(self) -> list[Tier]:
        """The tiers pages are published to, in order."""
        return [t for t in self.tiers if t.publishes and t.available]

    def lookup(self, keys: Sequence[str]) -> list[TierRange]:
        """Cascade lookup: contiguous ranges from ``0``, each stored in the tier named.

        The ranges cover ``[0, n)`` where ``n`` is how far the tiers together hold the chain.
        """
        ranges: list[TierRange] = []
        pos = 0
        for t in self.tiers:
            if pos >= len(keys):
                break
            if not t.available:
                continue
            n = t.exists_prefix(keys[pos:])
            if n:
                ranges.append(TierRange(t, pos, pos + n))
                pos += n
        return ranges

    def get_into(self, keys: Sequence[str], dsts: Sequence[memoryview]) -> list[PageStatus]:
        """Read the chain ``keys`` into ``dsts`` through the cascade; one status per key.

        Pages after the found ranges are ``NOT_FOUND`` (and not touched).
        """
        if len(keys) != len(dsts):
            raise ValueError(f"{len(keys)} keys but {len(dsts)} buffers")
        out: list[PageStatus] = []
        for r in self.lookup(keys):
            out += r.tier.get_into(keys[r.start : r.end], dsts[r.start : r.end])
        out += [PageStatus.NOT_FOUND] * (len(keys) - len(out))
        return out

    def stats(self) -> dict[str, dict[str, object]]:
        """Per-tier counters as plain data."""
        return {t.name: t.stats.as_dict() for t in self.tiers}
