"""The storage side of hicache: the plugin contract and the machinery every backend shares.

Nothing here imports torch: a plugin author needs only this package (and pydantic).
"""

from hicache.storage.backend import (
    API_VERSION,
    Backend,
    BackendConfig,
    BackendContext,
    Capabilities,
    PageStatus,
    StoredPage,
    check_key,
    check_namespace,
)

__all__ = [
    "API_VERSION",
    "Backend",
    "BackendConfig",
    "BackendContext",
    "Capabilities",
    "PageStatus",
    "StoredPage",
    "check_key",
    "check_namespace",
]
