"""hicache: a hierarchical KV cache for LLM serving in which storage is a plugin.

Importing the package is cheap and imports no torch; the cache side (``hicache.hiradix``,
``hicache.pools``, ``hicache.transfer``) imports torch when it is used.
"""

__version__ = "0.1.0"
