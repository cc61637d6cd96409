"""The L3 runtime that only the cache drives (no torch).

Tiers (:mod:`~hicache.tiering.tiers`), backend calls with deadlines and retries
(:mod:`~hicache.tiering.calls`), the circuit breaker, the bound on bytes in flight, admission and
prefetch policies, announcements and the storage I/O engine (:mod:`~hicache.tiering.engine`).
A backend never imports from here: its whole world is :mod:`hicache.storage`.
"""
