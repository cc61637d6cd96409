"""Wipe one storage tier and say which blocks left it (no torch).

- ``clear_tier(engine, name, events)``  delete every page of the tier's namespace; append the
  ``BlockRemoved(<tier medium>)`` events for them, ``REMOVED_BATCH`` ids at most each

Why not ``AllBlocksCleared``: routers that follow llm-d (since its PR #626) drop every block of
the instance on every medium when they see it, GPU and host memory included, although only one
tier lost its pages. A single tier's wipe therefore names the blocks it removed, in bounded
batches, and the other media keep what routers know about them. ``AllBlocksCleared`` stays what
an event overflow sends (:class:`hicache.events.EventQueue`): there the router must relearn.

The wipe is an operator action, not a serving-path call: the caller finishes the storage I/O in
flight first (:meth:`hicache.hiradix.HiRadixCache.clear_storage_tier` does), so no publish to
the tier can be announced after the removal of its page. Pages written later are published and
announced as usual; the tier's chains are rebuilt through republishing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from hicache.events import REMOVED_BATCH, KVEvent, removed_in_batches
from hicache.keys import block_id

if TYPE_CHECKING:
    from hicache.tiering.engine import StorageEngine

__all__ = ["clear_tier"]

logger = logging.getLogger(__name__)


def clear_tier(
    engine: StorageEngine, name: str, events: list[KVEvent], *, max_ids: int = REMOVED_BATCH
) -> int:
    """Delete every page tier ``name`` holds in its namespace (through the backend's listing).

    Appends the ``BlockRemoved`` events of the deleted pages to ``events`` (``max_ids`` ids at
    most each, in listing order), forgets them in the announcer (so they are announced again
    once republished) and returns how many pages were deleted. Raises ``KeyError`` for an
    unknown tier, ``ValueError`` for a tier that cannot list its pages or is read-only, and the
    backend's ``BackendError`` when listing or deleting fails; the pages deleted by then are in
    ``events`` all the same (a router never keeps a block that is gone).
    """
    tier = engine.tiers[name]
    if not tier.backend.capabilities.listable:
        raise ValueError(f"tier {name!r} cannot list its pages, so it cannot be cleared")
    if tier.settings.read_only:
        raise ValueError(f"tier {name!r} is read_only: cannot clear it")
    keys = [page.key for page in tier.backend.iter_pages()]
    step = max(1, tier.max_batch)
    deleted = 0
    try:
        for start in range(0, len(keys), step):
            tier.backend.delete(keys[start : start + step])
            deleted = min(len(keys), start + step)
    finally:
        ids = [block_id(k) for k in keys[:deleted]]
        engine.announcer.removed(name, ids)
        events.extend(removed_in_batches(ids, tier.medium, max_ids))
        logger.warning("tier %s: cleared %d of %d pages", name, deleted, len(keys))
    return deleted
