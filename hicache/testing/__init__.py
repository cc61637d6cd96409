"""The conformance kit every backend runs: subclass :class:`BackendTests` (see ``kit``).

``BackendTests`` is imported lazily, so loading the pytest plugin (``hicache.testing.plugin``)
does not import the kit before pytest registered it for assertion rewriting.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hicache.testing.kit import BackendTests, kit_key, page_pattern

__all__ = ["BackendTests", "kit_key", "page_pattern"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from hicache.testing import kit

        return getattr(kit, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
