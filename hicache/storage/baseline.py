"""What a backend provides so ``hicache bench storage`` can put its figures next to the machine's.

- :class:`Benchmarkable`  the protocol: ``bench_baseline(config, context)`` (a classmethod) and
                          ``drop_page_cache()``; a backend that has both is measured against its
                          own raw limit, with cold reads; any other against memcpy, cold reads
                          shown as ``n/a``
- :class:`RawBaseline`    the machine's limit for the backend's access pattern, measured with the
                          same system calls outside hicache
- :class:`ToolLimit`      a figure the service's own benchmark tool measured in the same run
                          (``redis-benchmark``), shown beside the raw limit
- :class:`RemoteBenchHooks` both members of :class:`Benchmarkable` for a backend whose pages live
                          in a server and which keeps no page bytes itself (S3, Valkey)

A backend implements its :class:`RawBaseline` in a module of its own (``raw.py``, ``baseline.py``)
that imports only this module, and imports that module inside ``bench_baseline``: serving never
loads benchmark code. Nothing here imports torch or the benchmark itself.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from hicache.storage.backend import BackendConfig, BackendContext

__all__ = ["Benchmarkable", "RawBaseline", "RemoteBenchHooks", "ToolLimit"]


@dataclass(frozen=True, slots=True)
class ToolLimit:
    """A throughput the service's own benchmark tool reached on the same server in the same run.

    ``figure`` names the figure it bounds (``put`` or ``get_hot``); ``gbps`` is ``None`` when the
    tool could not measure here, ``note`` then says why (else the command, secrets left out).
    """

    name: str
    figure: str
    gbps: float | None
    note: str


class RawBaseline(ABC):
    """The machine's limit for one backend's access pattern, measured outside hicache.

    Notes for implementers: use the same system calls the backend uses (files: create + write +
    rename with the same fsync policy; a mapping: memcpy into and out of a prefaulted mapping; S3:
    raw client calls). ``put``/``get``/``exists`` are called from several threads at once, on
    disjoint index sets; indices run from 0 to ``num_pages - 1``. ``teardown`` removes whatever
    ``setup`` and ``put`` created, and is called even after a failure.
    """

    #: One line naming what is measured, shown in the report.
    name: ClassVar[str] = "raw"

    @abstractmethod
    def setup(self, page_bytes: int, num_pages: int) -> None:
        """Prepare for ``num_pages`` pages of ``page_bytes`` (not timed)."""

    @abstractmethod
    def put(self, indices: Sequence[int], srcs: Sequence[memoryview]) -> None:
        """Store ``srcs[j]`` as page ``indices[j]``."""

    @abstractmethod
    def get(self, indices: Sequence[int], dsts: Sequence[memoryview]) -> None:
        """Read page ``indices[j]`` into ``dsts[j]``."""

    @abstractmethod
    def exists(self, indices: Sequence[int]) -> list[bool]:
        """Raw presence check of each page."""

    def drop_cache(self) -> bool:
        """Make the next ``get`` cold; return False when that is impossible (the default)."""
        return False

    @abstractmethod
    def teardown(self) -> None:
        """Remove everything ``setup`` and ``put`` created."""

    def settle(self) -> None:
        """Called before each side of a round is measured, the backend's and this baseline's
        alike (not timed): bring what the previous side left behind on a shared service to one
        state, e.g. memory a server freed and has not yet returned to the OS, which the next side
        would otherwise reuse without page faults while the server returns it in the background.
        The default does nothing."""
        return

    def cleanup(self) -> None:
        """Called once per round after both sides finished (and the backend deleted its pages):
        remove what the baseline shares with the backend, e.g. a directory tree both wrote into.
        The default does nothing."""
        return

    def tool_limits(
        self, page_bytes: int, threads: int, pages: int, batch: int
    ) -> Sequence[ToolLimit]:
        """Run the service's own benchmark tool with ``pages`` requests of ``page_bytes`` over
        ``threads`` connections, ``batch`` in flight on each, once per round after both sides
        (not set up); the default measures nothing."""
        return ()


@runtime_checkable
class Benchmarkable(Protocol):
    """A backend ``hicache bench storage`` measures against its own raw limit.

    Notes for implementers: both members are optional as a pair; a backend without them is
    measured against :class:`~hicache.tools.benchmark.MemcpyBaseline` and shows no cold reads.
    ``isinstance(backend, Benchmarkable)`` checks only that both exist.
    """

    @classmethod
    def bench_baseline(cls, config: BackendConfig, context: BackendContext) -> RawBaseline:
        """A fresh, not yet set up :class:`RawBaseline` for a backend built with ``config`` and
        ``context``: the same system calls, the same durability, the same endpoint."""
        ...

    def drop_page_cache(self) -> bool:
        """Make the next reads of this instance's pages cold (written back and dropped from
        every cache the backend controls); return False when that is impossible."""
        ...


class RemoteBenchHooks:
    """:class:`Benchmarkable` for a backend whose pages live in a server it reaches over the
    network and which caches no page bytes itself, so every read reaches the server.

    Notes for implementers: set ``bench_baseline_ref`` to ``"module:Class"`` of the backend's
    :class:`RawBaseline`, a class built from the backend's config alone; the module is imported
    only when a benchmark asks for it.
    """

    #: ``"package.module:ClassName"`` of the backend's :class:`RawBaseline`.
    bench_baseline_ref: ClassVar[str]

    def drop_page_cache(self) -> bool:
        """Nothing to drop: no page bytes are kept client-side (always True)."""
        return True

    @classmethod
    def bench_baseline(cls, config: BackendConfig, context: BackendContext) -> RawBaseline:
        """The baseline class named by ``bench_baseline_ref``, built with ``config``."""
        module, _, name = cls.bench_baseline_ref.partition(":")
        baseline = getattr(importlib.import_module(module), name)(config)
        if not isinstance(baseline, RawBaseline):
            raise TypeError(f"{cls.bench_baseline_ref} built {type(baseline).__name__}")
        return baseline
