"""Adapters that let serving engines use hicache tiers; each imports its engine only inside
itself, so nothing in the core ever imports an engine.

- ``hicache.integrations.sglang``  ``HicacheStorage``: SGLang's HiCache L3 storage
  (``--hicache-storage-backend dynamic``)
"""
