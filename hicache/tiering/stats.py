"""Per-tier counters a dashboard needs, as plain data (no torch).

``TierCounters`` is one tier's page and byte counters plus its prefetch outcomes and drops;
``tier_snapshot(...)`` merges it with the tier's failure counts (:mod:`~hicache.tiering.calls`),
breaker state (:mod:`~hicache.tiering.breaker`), backpressure gate
(:mod:`~hicache.tiering.inflight`) and admission policy into one JSON-able dict, so a metrics
layer exports ``{tier: snapshot}`` without knowing any of those classes.

Counter names (all monotonic):

- ``lookups``, ``hit_pages``, ``miss_pages``      cascade lookups and the pages they found / not
- ``get_pages``, ``get_ok``, ``get_not_found``, ``get_corrupt``, ``get_failed``, ``bytes_read``
- ``put_pages``, ``put_stored``, ``put_failed``, ``bytes_written``
- ``announced_pages``   pages announced ``BlockStored(<medium>)`` on this tier
- ``unannounced_pages`` pages handed to this tier and not announced (failed, dropped, after
                        a failure in their chain, or with their head not on the tier); a stored
                        one is still announced once its head is (then counted in both)
- ``late_acked_pages``  pages this tier stored with a put that came back after its deadline
                        (counted failed then, announced when the late result came)
- ``evicted_pages``     pages the backend reported through ``take_evicted``
- ``promoted_pages``    pages copied here from a later tier (promotion)
- ``republished_pages`` ancestors published again ahead of a page whose parent the tier lost
                        (keeps the tier's chains prefix-closed, so they can be announced)
- ``dropped_backpressure``, ``dropped_breaker``, ``dropped_admission``   pages not published
- ``call_errors``, ``errors_by_kind``   failed calls, by exception type
- ``prefetch``          ``{outcome: count}`` (:class:`~hicache.tiering.prefetch.PrefetchOutcome`)
- ``latency``           ``{op: {"le_s": [...], "cumulative": [...], "count": n, "sum_s": s}}``
                        per call kind (``exists``, ``get``, ``put``): :class:`LatencyHistogram`

Latencies are counted in fixed buckets (``LATENCY_BUCKETS_S``) under the counters' own lock:
one ``bisect`` and three additions per backend call, so a metrics layer exports a histogram
without the serving path calling into it.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from hicache.storage.backend import PageStatus

__all__ = ["LATENCY_BUCKETS_S", "LatencyHistogram", "TierCounters", "tier_snapshot"]

#: Upper bounds (seconds, inclusive) of the latency buckets: 100 us (a page in the page cache)
#: to 10 s (past any sane deadline); anything slower lands in the implicit ``+Inf`` bucket.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


@dataclass(slots=True)
class LatencyHistogram:
    """Call latencies in the fixed ``LATENCY_BUCKETS_S`` buckets (not thread-safe alone: the
    owning :class:`TierCounters` updates it under its lock).

    ``counts[i]`` counts calls of at most ``LATENCY_BUCKETS_S[i]`` seconds and more than the
    bound before (the last entry: slower than every bound); ``as_dict`` makes them cumulative,
    as Prometheus histograms are.
    """

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    sum_s: float = 0.0

    def observe(self, seconds: float) -> None:
        """Count one call of ``seconds``."""
        self.counts[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.sum_s += seconds

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON data: ``{"le_s": bounds, "cumulative": [calls <= each bound], "count": n,
        "sum_s": s}`` (``count`` is the implicit ``+Inf`` bucket)."""
        cumulative: list[int] = []
        total = 0
        for n in self.counts[:-1]:
            total += n
            cumulative.append(total)
        return {
            "le_s": list(LATENCY_BUCKETS_S),
            "cumulative": cumulative,
            "count": total + self.counts[-1],
            "sum_s": self.sum_s,
        }


@dataclass(slots=True)
class TierCounters:
    """Thread-safe monotonic counters of one tier (see the module docstring)."""

    lookups: int = 0
    hit_pages: int = 0
    miss_pages: int = 0
    get_pages: int = 0
    get_ok: int = 0
    get_not_found: int = 0
    get_corrupt: int = 0
    get_failed: int = 0
    bytes_read: int = 0
    put_pages: int = 0
    put_stored: int = 0
    put_failed: int = 0
    bytes_written: int = 0
    announced_pages: int = 0
    unannounced_pages: int = 0
    late_acked_pages: int = 0
    evicted_pages: int = 0
    promoted_pages: int = 0
    republished_pages: int = 0
    dropped_backpressure: int = 0
    dropped_breaker: int = 0
    dropped_admission: int = 0
    prefetch: dict[str, int] = field(default_factory=dict)
    #: Failed calls, and the same by exception type (or failure kind when there was none).
    call_errors: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    #: Call latencies as the cache saw them, by call kind (see :meth:`observe`).
    latency: dict[str, LatencyHistogram] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        """Add ``deltas`` to the named counters (unknown names raise ``AttributeError``)."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def count_gets(self, statuses: Sequence[PageStatus], page_bytes: int) -> None:
        """Count one ``get_into``'s statuses (and the bytes of its ``OK`` pages)."""
        ok = nf = corrupt = 0
        for s in statuses:
            if s is PageStatus.OK:
                ok += 1
            elif s is PageStatus.NOT_FOUND:
                nf += 1
            elif s is PageStatus.CORRUPT:
                corrupt += 1
        self.add(
            get_pages=len(statuses),
            get_ok=ok,
            get_not_found=nf,
            get_corrupt=corrupt,
            get_failed=len(statuses) - ok - nf - corrupt,
            bytes_read=ok * page_bytes,
        )

    def count_puts(self, statuses: Sequence[PageStatus], page_bytes: int) -> None:
        """Count one ``put``'s statuses (bytes for pages written now, not ``ALREADY_EXISTS``)."""
        stored = sum(1 for s in statuses if s.stored)
        written = sum(1 for s in statuses if s is PageStatus.OK)
        self.add(
            put_pages=len(statuses),
            put_stored=stored,
            put_failed=len(statuses) - stored,
            bytes_written=written * page_bytes,
        )

    def count_prefetch(self, outcome: str) -> None:
        """Count one prefetch outcome."""
        key = str(outcome)
        with self._lock:
            self.prefetch[key] = self.prefetch.get(key, 0) + 1

    def observe(self, op: str, seconds: float) -> None:
        """Count one ``op`` call (``exists``, ``get``, ``put``) that took ``seconds``.

        Measured around the whole tier call: queueing on the tier's threads and retries
        included, and a call the cache stopped waiting for counts at its deadline.
        """
        with self._lock:
            hist = self.latency.get(op)
            if hist is None:
                hist = self.latency[op] = LatencyHistogram()
            hist.observe(seconds)

    def error(self, exc: BaseException | None, kind: str) -> None:
        """Count one failed call under its exception's type name (``kind`` when none)."""
        name = type(exc).__name__ if exc is not None else str(kind)
        with self._lock:
            self.call_errors += 1
            self.errors_by_kind[name] = self.errors_by_kind.get(name, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        """A snapshot as plain data."""
        with self._lock:
            out: dict[str, Any] = {
                f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")
            }
            out["prefetch"] = dict(self.prefetch)
            out["errors_by_kind"] = dict(self.errors_by_kind)
            out["latency"] = {op: h.as_dict() for op, h in self.latency.items()}
        return out


def tier_snapshot(
    counters: TierCounters,
    *,
    failures: Any = None,
    breaker: Any = None,
    gate: Any = None,
    admission: Any = None,
) -> dict[str, Any]:
    """One tier's counters merged with its failure counts, breaker, gate and admission stats.

    Each extra part is optional and read through its ``as_dict()`` / ``snapshot()`` /
    ``stats()``, so this module depends on none of them.
    """
    out = counters.as_dict()
    if failures is not None:
        f = failures.as_dict()
        out["failures"] = f["by_kind"]
        out["retries"] = f["retries"]
        out["late_returns"] = f["late_returns"]
    if breaker is not None:
        out["breaker"] = breaker.snapshot().as_dict()
    if gate is not None:
        out["inflight"] = gate.stats()
    if admission is not None:
        out["admission"] = admission.stats()
    return out
