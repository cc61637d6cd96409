"""The one exception tree of hicache.

Every class also subclasses the natural built-in, so callers that know nothing about hicache
(``except ValueError``, ``except ConnectionError``) still catch what they expect.
"""

from __future__ import annotations

__all__ = [
    "BackendCapacityError",
    "BackendClosedError",
    "BackendConflictError",
    "BackendContractError",
    "BackendError",
    "BackendLoadError",
    "BackendNotFoundError",
    "BackendReadOnlyError",
    "BackendUnavailableError",
    "ConfigError",
    "HicacheError",
    "PageCorruptError",
    "PageVersionError",
    "PluginError",
]


class HicacheError(Exception):
    """Root of every error hicache raises on purpose."""


class ConfigError(HicacheError, ValueError):
    """A configuration value is invalid; the message names its YAML path."""


class PluginError(HicacheError):
    """A backend plugin could not be found, loaded or accepted."""


class BackendNotFoundError(PluginError, LookupError):
    """No installed distribution provides the requested backend kind."""


class BackendConflictError(PluginError, LookupError):
    """Several installed distributions register the same backend kind."""


class BackendLoadError(PluginError, ImportError):
    """The entry point exists but importing it failed (the cause is chained)."""


class BackendContractError(PluginError, TypeError):
    """The loaded object does not honour the Backend contract (not a class, abstract, ...)."""


class BackendError(HicacheError):
    """A whole backend call failed; per-page problems are statuses, never this."""


class BackendUnavailableError(BackendError, ConnectionError):
    """The storage behind a backend cannot be reached (endpoint down, disk gone)."""


class BackendCapacityError(BackendError):
    """The backend cannot make room for what it was asked to store."""


class BackendReadOnlyError(BackendError, PermissionError):
    """A write was attempted on a backend opened read-only."""


class BackendClosedError(BackendError):
    """A backend was used before ``open()`` or after ``close()``."""


class PageCorruptError(HicacheError, ValueError):
    """A stored page failed verification; ``field`` names what did not match."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"corrupt page: {field} mismatch ({detail})")
        self.field = field
        self.detail = detail


class PageVersionError(HicacheError, ValueError):
    """A stored page is in a format this reader does not know: a newer writer's page version or
    feature flags. Not corruption: the page is a miss for this reader and stays where it is (a
    newer reader sharing the tier may need it, as in a rolling upgrade)."""

    def __init__(self, version: int, detail: str) -> None:
        super().__init__(f"unknown page format: {detail}")
        self.version = version
        self.detail = detail
