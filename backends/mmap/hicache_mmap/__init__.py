"""hicache ``mmap`` backend: pages in a set-associative slot file shared through ``mmap``.

- :class:`MmapBackend`  the backend (entry point ``mmap`` in ``hicache.backends``)
- :class:`MmapOptions`  its options (``path``, ``capacity``, ``create``, ``msync``, ...)
"""

from hicache_mmap.backend import MmapBackend
from hicache_mmap.options import MmapOptions, MsyncMode

__all__ = ["MmapBackend", "MmapOptions", "MsyncMode"]
