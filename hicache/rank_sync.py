"""Agreement between the tensor-parallel ranks of one model (no torch).

Every decision ranks must agree on (acks completed, prefetch hit length, prefetch termination)
goes through :class:`RankSync`, called at the same points on every rank, unconditionally.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["NoRankSync", "RankSync"]


class RankSync(Protocol):
    """Agreement between the tensor-parallel ranks of one model.

    ``all_reduce_min`` is called at the same points on every rank, unconditionally; it returns
    the element-wise minimum over ranks (a MIN all-reduce).
    """

    def all_reduce_min(self, values: list[int]) -> list[int]: ...


class NoRankSync:
    """A single rank: the minimum over one rank is its own value."""

    def all_reduce_min(self, values: list[int]) -> list[int]:
        return list(values)
