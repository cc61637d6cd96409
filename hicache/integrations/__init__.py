"""Adapters that let serving engines use hicache tiers; each imports its engine only inside
itself, so nothing in the core ever imports an engine.

- ``hicache.integrations.sglang``  ``HicacheStorage``: SGLang's HiCache L3 storage
  (``--hicache-storage-backend dynamic``)
- ``hicache.integrations.vllm``    ``HicacheTierManager``: a secondary tier of vLLM's KV
  offloading (``TieringOffloadingSpec``)
- ``hicache.integrations.common``  what the adapters share (config loading, rate-limited
  failure logs, address views, the metrics source); imports no engine
"""
