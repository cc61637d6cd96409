"""Per-tier admission: which published pages a tier accepts (``TierConfig.admission``).

- ``AlwaysAdmit``       every page (the default)
- ``SecondHitAdmit``    a page only once its prefix was offered twice: the first sighting is
                        remembered (in a bounded LRU of page keys) and refused, the second admits
- ``make_admission(Admission.X, ...)``  the policy object for a config value

Page keys are chained content hashes, so a key identifies its whole prefix: "the prefix was seen
twice" is "the key was offered twice". In the real trace 76% of blocks are used once; a tier that
admits on the second hit never spends a write on them. Memory is bounded: past ``capacity`` keys
the least recently offered are forgotten (a forgotten key starts over at its first sighting).

Policies are thread-safe; ``admit`` is called once per page on the publish path.
"""

from __future__ import annotations

import enum
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

__all__ = ["Admission", "AdmissionPolicy", "AlwaysAdmit", "SecondHitAdmit", "make_admission"]

#: Keys a second-hit policy remembers by default (~100 bytes each: ~10 MB).
DEFAULT_SEEN_CAPACITY = 100_000


class Admission(enum.StrEnum):
    """Which published pages a tier accepts."""

    #: Every page handed to the tier.
    ALWAYS = "always"
    #: Only pages whose prefix was already seen once (filters one-off prompts).
    SECOND_HIT = "second_hit"


class AdmissionPolicy(ABC):
    """Decides, page by page, whether a tier stores what is published to it."""

    kind: Admission

    @abstractmethod
    def admit(self, keys: Sequence[str]) -> list[bool]:
        """Record one sighting of each key (a chain, head first); return which to store."""

    def admit_prefix(self, keys: Sequence[str]) -> int:
        """Like :meth:`admit`, but return the length of the admitted prefix.

        A tier must stay prefix-closed, so once one page of a chain is refused the rest of that
        publish is not stored either (they are still recorded as seen).
        """
        n = 0
        for ok in self.admit(keys):
            if not ok:
                break
            n += 1
        return n

    def stats(self) -> dict[str, Any]:
        """Counters as plain data."""
        return {"kind": str(self.kind)}


class AlwaysAdmit(AdmissionPolicy):
    """Admit every page."""

    kind = Admission.ALWAYS

    def admit(self, keys: Sequence[str]) -> list[bool]:
        return [True] * len(keys)


class SecondHitAdmit(AdmissionPolicy):
    """Admit a page on its second sighting (see the module docstring)."""

    kind = Admission.SECOND_HIT

    def __init__(self, capacity: int = DEFAULT_SEEN_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        # key -> None; an OrderedDict is an O(1) LRU without a node object per key.
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._admitted = 0
        self._refused = 0
        self._forgotten = 0

    def admit(self, keys: Sequence[str]) -> list[bool]:
        out: list[bool] = []
        with self._lock:
            seen = self._seen
            for key in keys:
                if key in seen:
                    seen.move_to_end(key)
                    out.append(True)
                    continue
                seen[key] = None
                out.append(False)
            if len(seen) > self.capacity:
                extra = len(seen) - self.capacity
                for _ in range(extra):
                    seen.popitem(last=False)
                self._forgotten += extra
            admitted = sum(out)
            self._admitted += admitted
            self._refused += len(out) - admitted
        return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "kind": str(self.kind),
                "remembered": len(self._seen),
                "admitted": self._admitted,
                "refused": self._refused,
                "forgotten": self._forgotten,
            }


def make_admission(
    kind: Admission | str, *, capacity: int = DEFAULT_SEEN_CAPACITY
) -> AdmissionPolicy:
    """The admission policy for a ``TierConfig.admission`` value."""
    kind = Admission(kind)
    if kind is Admission.ALWAYS:
        return AlwaysAdmit()
    if kind is Admission.SECOND_HIT:
        return SecondHitAdmit(capacity)
    raise ValueError(f"unknown admission policy {kind!r}")  # pragma: no cover - enum is closed
