"""hicache storage backend ``valkey``: a Valkey/Redis server shared by a fleet (see README)."""

from __future__ import annotations

from hicache_valkey.backend import ValkeyBackend
from hicache_valkey.options import ValkeyOptions

__all__ = ["ValkeyBackend", "ValkeyOptions"]
