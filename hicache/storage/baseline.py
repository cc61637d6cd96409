"""What a backend provides so ``hicache bench storage`` can put its figures next to the machine's.

- :class:`Benchmarkable`  the protocol: ``bench_baseline(config, context)`` (a classmethod) and
                          ``drop_page_cache()``; a backend that has both is measured against its
                          own raw limit, with cold reads; any other against memcpy, cold reads
                          shown as ``n/a``
- :class:`RawBaseline`    the machine's limit for the backend's access pattern, measured with the
                          same system calls outside hicache

A backend implements its :class:`RawBaseline` in a module of its own (``raw.py``, ``baseline.py``)
that imports only this module, and imports that module inside ``bench_baseline``: serving never
loads benchmark code. Nothing here imports torch or the benchmark itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from hicache.storage.backend import BackendConfig, BackendContext

__all__ = ["Benchmarkable", "RawBaseline"]


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

    def cleanup(self) -> None:
        """Called once per round after both sides finished (and the backend deleted its pages):
        remove what the baseline shares with the backend, e.g. a directory tree both wrote into.
        The default does nothing."""
        return


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
