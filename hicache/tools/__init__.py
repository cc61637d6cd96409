"""Benchmarks and operator tools: ``hicache bench storage|radix|eviction``, ``hicache storage``.

Nothing on the serving path imports from here.
"""
