"""The ordered list of storage tiers (L3) and the cascade across them (no torch).

- ``Tiers.from_config(config, namespace)``  build every configured tier through the registry
- ``Tiers.from_backends([(name, backend[, settings]), ...])``  wrap backends built by hand (tests)
- ``lookup(keys)``     cascade: tier 1 answers the longest stored prefix, tier 2 only the pages
                       after tier 1 stopped, and so on; returns ``(tier, start, end)`` ranges
- ``get_into(keys, dsts)``  read each page from the tier the cascade found it in
- ``publishing``       the tiers every backed-up page is published to (``publish: true``)

Each :class:`Tier` owns the hardening of its backend: its own I/O threads with a deadline per
call, retries with backoff for retryable errors and a circuit breaker
(:class:`~hicache.tiering.calls.TierCaller`), a bound on publish bytes in flight
(:class:`~hicache.tiering.inflight.InflightGate`), an admission policy
(:mod:`~hicache.tiering.admission`), counters (:class:`~hicache.tiering.stats.TierCounters`)
and its opening within the deadline at start-up (:class:`~hicache.tiering.opening.TierOpener`).

Every ``Tier`` data method is synchronous, meant for the I/O workers of
:mod:`hicache.tiering.engine`, and never raises because of the backend: a failed, refused or
late call turns into misses or ``FAILED`` statuses, counted on the tier. A method that gives up
waiting leaves the call running; its ``on_return`` callback fires when the call really returned,
and only then may the caller release the buffers it handed over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hicache.config import TierSettings
from hicache.errors import BackendUnavailableError
from hicache.storage.backend import Backend, BackendContext, PageBuffers, PageStatus
from hicache.tiering.admission import AdmissionPolicy, make_admission
from hicache.tiering.breaker import CircuitBreaker
from hicache.tiering.calls import CallOutcome, FailureKind, RetryPolicy, TierCaller, failure_kind
from hicache.tiering.inflight import InflightGate
from hicache.tiering.lanes import Lane, LaneTicket, default_io_threads
from hicache.tiering.opening import TierOpener
from hicache.tiering.stats import TierCounters, tier_snapshot

if TYPE_CHECKING:
    from hicache.config import HicacheConfig

__all__ = ["Tier", "TierRange", "Tiers"]

logger = logging.getLogger(__name__)

#: The medium of a store reached over the network: its calls mostly wait, so more threads.
_REMOTE_MEDIUM = "EXTERNAL"


class Tier:
    """One configured backend instance in the cascade, with its deadline, retries, breaker,
    in-flight bound, admission policy and counters."""

    def __init__(
        self,
        name: str,
        backend: Backend,
        settings: TierSettings | None = None,
        *,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.name = name
        self.backend = backend
        self.settings = s = settings or TierSettings()
        self.stats = TierCounters()
        extra: dict[str, Any] = {}
        if clock is not None:
            extra["clock"] = clock
        self.breaker = CircuitBreaker(s.breaker_failures, s.breaker_cooldown_s, name=name, **extra)
        if sleep is not None:
            extra["sleep"] = sleep
        self.caller = TierCaller(
            name,
            deadline_s=s.deadline_s,
            threads=s.io_threads or default_io_threads(remote=self.medium == _REMOTE_MEDIUM),
            breaker=self.breaker,
            retry=RetryPolicy(
                attempts=s.retry_attempts,
                backoff_s=s.retry_backoff_s,
                backoff_max_s=s.retry_backoff_max_s,
            ),
            **extra,
        )
        self.gate = InflightGate(s.max_inflight_bytes)
        #: Keys put calls took from the backend's ``take_evicted``, not handed out yet.
        self._evicted: list[str] = []
        self._evicted_lock = threading.Lock()
        self.admission: AdmissionPolicy = make_admission(s.admission)
        self.opener = TierOpener(
            name,
            backend,
            deadline_s=s.deadline_s,
            cooldown_s=s.breaker_cooldown_s,
            stats=self.stats,
            clock=clock or time.monotonic,
        )

    def __repr__(self) -> str:
        return f"Tier({self.name!r}, {type(self.backend).__name__})"

    # ------------------------------------------------------------------ availability

    @property
    def available(self) -> bool:
        """False while the backend could not be opened: the cascade and publishing skip it.

        An unavailable tier is opened again in the background once per breaker cool-down, so a
        store that was down when the cache started (an S3 endpoint, a disk not yet mounted)
        joins the cascade when it comes back, without a restart and without blocking a request.
        """
        return self.opener.available

    @available.setter
    def available(self, value: bool) -> None:
        self.opener.set_available(value)

    def close(self) -> None:
        """Stop the I/O threads and close the backend (idempotent; never raises)."""
        self.close_calls(wait=False)
        self.opener.close()

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
        if self.settings.batch_pages is not None:
            return self.settings.batch_pages
        return max(1, self.backend.capabilities.max_batch)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page payload."""
        return self.backend.context.page_bytes

    def _observe(self, op: str, started: float, out: CallOutcome[Any]) -> None:
        # a call the breaker refused never reached the backend: its ~0 s would only hide the
        # real latencies
        if out.failure is not FailureKind.BREAKER_OPEN:
            self.stats.observe(op, time.perf_counter() - started)

    def _failed(self, out: CallOutcome[Any], what: str) -> None:
        assert out.failure is not None
        if out.failure is not FailureKind.BREAKER_OPEN:
            self.stats.error(out.error, str(out.failure))

    # ------------------------------------------------------------------ data calls

    @property
    def lookups_here(self) -> bool:
        """Whether lookups may run on the calling thread (the backend's ``memory_lookups``)."""
        return self.backend.capabilities.memory_lookups

    def exists_prefix(self, keys: Sequence[str], *, here: bool = False) -> int:
        """Longest stored prefix of ``keys`` here; 0 (counted) when the call fails or the
        breaker is open. ``here``: on the calling thread (only when :attr:`lookups_here`)."""
        step = self.max_batch

        def run() -> int:
            done = 0
            for start in range(0, len(keys), step):
                chunk = keys[start : start + step]
                n = self.backend.exists_prefix(chunk)
                done += n
                if n < len(chunk):
                    break
            return done

        started = time.perf_counter()
        out = self.caller.call_here(run) if here else self.caller.call(run, lane=Lane.READ)
        self._observe("exists", started, out)
        found = out.value if out.ok and out.value is not None else 0
        if not out.ok:
            self._failed(out, "exists_prefix")
        self.stats.add(lookups=1, hit_pages=found, miss_pages=len(keys) - found)
        return found

    def get_into(
        self,
        keys: Sequence[str],
        dsts: Sequence[PageBuffers],
        *,
        on_return: Callable[[], None] | None = None,
    ) -> list[PageStatus]:
        """Read ``keys`` into ``dsts``; a failed or late call makes its pages ``FAILED``.

        Chunks are read in order and the read stops after a chunk with a page that is not
        ``OK`` (later pages are useless to a prefix): they come back ``NOT_FOUND``, untouched.
        ``on_return`` runs when the backend really finished with ``dsts``.
        """
        step = self.max_batch

        def run() -> list[PageStatus]:
            got: list[PageStatus] = []
            for start in range(0, len(keys), step):
                chunk = self.backend.get_into(
                    keys[start : start + step], dsts[start : start + step]
                )
                got += chunk
                if chunk.count(PageStatus.OK) != len(chunk):
                    break
            return got + [PageStatus.NOT_FOUND] * (len(keys) - len(got))

        started = time.perf_counter()
        out = self.caller.call(run, on_return=on_return, lane=Lane.READ)
        self._observe("get", started, out)
        if out.ok and out.value is not None:
            statuses = out.value
        else:
            self._failed(out, "get_into")
            statuses = [PageStatus.FAILED] * len(keys)
        self.stats.count_gets(statuses, self.page_bytes)
        return statuses

    def put(
        self,
        keys: Sequence[str],
        srcs: Sequence[PageBuffers],
        *,
        on_return: Callable[[], None] | None = None,
        ticket: LaneTicket | None = None,
        on_late: Callable[[list[PageStatus]], None] | None = None,
        take_evicted: bool = False,
        batches: Sequence[int] = (),
    ) -> list[PageStatus]:
        """Store ``srcs`` under ``keys``; a failed, refused or late call makes its pages
        ``FAILED``. ``on_return`` runs when the backend really finished with ``srcs``. Puts
        queue in the write lane, unless ``ticket`` is promoted (a lookup waits for them).

        A call that returns after the deadline (its pages already counted ``FAILED``) hands its
        real statuses to ``on_late``: the pages it stored are on the tier after all.

        ``take_evicted``: the same call then asks the backend what it evicted (a put is what
        makes a bounded backend evict); ``take_evicted(call=False)`` hands those keys out
        without a second call, so a publish costs one hand-off to this tier's threads, not
        two.

        ``batches``: where each of several puts handed over together ends (offsets into
        ``keys``, the last ``len(keys)``); they go as one ``put_batches`` call, made as if one
        after another (at most ``max_batch`` pages in all)."""
        step = self.max_batch

        def run() -> list[PageStatus]:
            got: list[PageStatus] = []
            if batches:
                starts = [0, *batches[:-1]]
                for part in self.backend.put_batches(
                    [(keys[b:e], srcs[b:e]) for b, e in zip(starts, batches, strict=True)]
                ):
                    got += part
            else:
                for start in range(0, len(keys), step):
                    got += self.backend.put(keys[start : start + step], srcs[start : start + step])
            if take_evicted:
                self._keep_evicted()
            return got

        started = time.perf_counter()
        out = self.caller.call(run, on_return=on_return, ticket=ticket, on_late=on_late)
        if out.failure is FailureKind.BREAKER_OPEN:
            # never attempted: a drop, not a failed put
            self.stats.add(dropped_breaker=len(keys))
            return [PageStatus.FAILED] * len(keys)
        self._observe("put", started, out)
        if out.ok and out.value is not None:
            statuses = out.value
        else:
            self._failed(out, "put")
            statuses = [PageStatus.FAILED] * len(keys)
        self.stats.count_puts(statuses, self.page_bytes)
        return statuses

    def take_evicted(self, *, call: bool = True) -> list[str]:
        """Keys the backend dropped on its own: those put calls took already (``put`` with
        ``take_evicted``), then, with ``call``, those a call to the backend's ``take_evicted``
        returns now; what the call would have returned is lost to nobody when it fails (it is
        then ``[]``, counted; the backend still has it). Never raises.

        The call bypasses the breaker (housekeeping must not use up its probe) but keeps the
        deadline; it goes in the read lane: a cheap call that must not queue behind a hung put.
        """
        with self._evicted_lock:
            taken, self._evicted = self._evicted, []
        if call:
            out = self.caller.call(self.backend.take_evicted, use_breaker=False, lane=Lane.READ)
            if not out.ok or out.value is None:
                self._failed(out, "take_evicted")
            else:
                taken += out.value
        if taken:
            self.stats.add(evicted_pages=len(taken))
        return taken

    def _keep_evicted(self) -> None:
        """Within a put call (on this tier's thread): take the backend's evictions for the next
        ``take_evicted``. A failure here is counted, never the put's: its pages are stored."""
        try:
            evicted = self.backend.take_evicted()
        except Exception as exc:
            self.stats.error(exc, str(failure_kind(exc)))
            logger.warning("tier %s: take_evicted after a put failed (%r)", self.name, exc)
            return
        if evicted:
            with self._evicted_lock:
                self._evicted += evicted

    def snapshot(self) -> dict[str, Any]:
        """Counters, failures by kind, breaker, in-flight gate, admission and whether the tier is
        in the cascade (``available``: false while it could not be opened) as plain data."""
        out = tier_snapshot(
            self.stats,
            failures=self.caller.failures,
            breaker=self.breaker,
            gate=self.gate,
            admission=self.admission,
        )
        out["available"] = self.opener.is_available
        return out

    def close_calls(self, *, wait: bool = False) -> None:
        """Stop this tier's I/O threads (queued calls are cancelled)."""
        self.caller.close(wait=wait)


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
            tiers.append(Tier(name, backend, tier))
        return cls(tiers)

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> list[str]:
        """Open every backend (idempotent), all at once, each within its tier's ``deadline_s``;
        return the names of tiers that did not open.

        A tier that fails to open, or is still opening at its deadline, is logged, counted and
        left out (``available`` false, so every lookup skips it and nothing is published to it)
        and opened again in the background once per ``breaker_cooldown_s``: storage is an
        accelerator, so a missing bucket or a frozen endpoint never stops the cache from
        starting. A tier with ``required`` set is the exception: when it does not open, every
        tier is closed and :class:`~hicache.errors.BackendUnavailableError` names it.
        """
        began = time.monotonic()
        attempts = [(t, t.opener.start()) for t in self.tiers]
        failed: list[str] = []
        fatal: list[str] = []
        for t, attempt in attempts:
            # one clock for all: the tiers open side by side, so each waits its own deadline
            left = max(0.0, began + t.settings.deadline_s - time.monotonic())
            problem = t.opener.settle(attempt, left)
            if problem is None:
                continue
            failed.append(t.name)
            if t.settings.required:
                fatal.append(f"tier {t.name!r} ({type(t.backend).__name__}) {problem}")
                logger.error("tier %s: required, %s", t.name, problem)
            else:
                logger.error(
                    "tier %s: %s; started without it (every lookup a miss), opening it again "
                    "every %.3g s",
                    t.name,
                    problem,
                    t.settings.breaker_cooldown_s,
                )
        if fatal:
            self.close()
            raise BackendUnavailableError(
                f"required storage {'; '.join(fatal)} (set required: false to start without it)"
            )
        return failed

    def close(self) -> None:
        """Stop the tiers' I/O threads and close every backend (idempotent); a failing close is
        logged, not raised. A call still hung in a backend keeps its thread until it returns."""
        for t in self.tiers:
            t.close()

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self.tiers)

    def __iter__(self) -> Iterator[Tier]:
        return iter(self.tiers)

    def __getitem__(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(f"no tier named {name!r}; tiers: {[t.name for t in self.tiers]}")

    @property
    def publishing(self) -> list[Tier]:
        """The tiers pages are published to, in order."""
        return [t for t in self.tiers if t.publishes and t.available]

    def earlier_publishing(self, tier: Tier) -> list[Tier]:
        """The publishing tiers before ``tier`` (where its pages may be promoted to)."""
        out: list[Tier] = []
        for t in self.tiers:
            if t is tier:
                return out
            if t.publishes and t.available:
                out.append(t)
        raise ValueError(f"{tier!r} is not one of these tiers")

    def lookups_here(self) -> bool:
        """Whether every tier in the cascade answers lookups from memory (see ``lookup``)."""
        return all(t.lookups_here for t in self.tiers if t.available)

    def lookup(self, keys: Sequence[str], *, here: bool = False) -> list[TierRange]:
        """Cascade lookup: contiguous ranges from ``0``, each stored in the tier named.

        The ranges cover ``[0, n)`` where ``n`` is how far the tiers together hold the chain. A
        tier whose breaker is open (or whose call fails) finds nothing: the next one is asked.
        ``here``: on the calling thread (only when :meth:`lookups_here`).
        """
        ranges: list[TierRange] = []
        pos = 0
        for t in self.tiers:
            if pos >= len(keys):
                break
            if not t.available:
                continue
            n = t.exists_prefix(keys[pos:], here=here)
            if n:
                ranges.append(TierRange(t, pos, pos + n))
                pos += n
        return ranges

    def get_into(self, keys: Sequence[str], dsts: Sequence[PageBuffers]) -> list[PageStatus]:
        """Read the chain ``keys`` into ``dsts`` through the cascade; one status per key.

        Synchronous convenience (tools, tests): it waits for each call's deadline but not for
        calls that outlive it, so use it only with buffers that may be written late. The engine
        reads through :meth:`Tier.get_into` with holds instead. Pages after the first that is not
        ``OK`` are ``NOT_FOUND`` (and not touched).
        """
        if len(keys) != len(dsts):
            raise ValueError(f"{len(keys)} keys but {len(dsts)} buffers")
        out: list[PageStatus] = []
        for r in self.lookup(keys):
            got = r.tier.get_into(keys[r.start : r.end], dsts[r.start : r.end])
            out += got
            if any(s is not PageStatus.OK for s in got):
                break
        out += [PageStatus.NOT_FOUND] * (len(keys) - len(out))
        return out

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per-tier counters as plain data."""
        return {t.name: t.snapshot() for t in self.tiers}
