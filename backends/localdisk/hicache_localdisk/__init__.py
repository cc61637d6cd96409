"""hicache-localdisk: the ``localdisk`` storage backend (pages as files on a local filesystem).

Registered under the ``hicache.backends`` entry-point group as ``localdisk``; see the README for
options, the on-disk layout and what each durability mode guarantees.
"""

from hicache_localdisk.backend import LocalDiskBackend
from hicache_localdisk.options import Durability, LocalDiskConfig

__all__ = ["Durability", "LocalDiskBackend", "LocalDiskConfig"]
