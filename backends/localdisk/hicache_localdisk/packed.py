"""The backend's puts, reads and deletes of packed pages (single-process mode).

- ``put_packed(index, packs, keys, srcs, step_ns)``  the new pages of a put as one pack
- ``read_packed(packs, keys, dsts, in_packs, where, now)``  read them; drop the records gone
- ``forget_packed(packs, layout, keys, failed)``     deleted pages: their records owed a punch

:mod:`hicache_localdisk.packs` is what is where and the system calls; this module is how the
backend's calls go through the index (capacity) and the packs in order.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from hicache.storage import PageParts, PageStatus
from hicache_localdisk.index import PageIndex
from hicache_localdisk.layout import Layout
from hicache_localdisk.packs import PackFiles, Record
from hicache_localdisk.pageio import SYNCED, ReadResult

__all__ = ["forget_packed", "put_packed", "read_packed"]

#: Read outcomes of a packed page whose record is gone: forgotten, then a miss.
_GONE = (ReadResult.MISSING, ReadResult.NOT_REGULAR)


def put_packed(
    index: PageIndex,
    packs: PackFiles,
    keys: Sequence[str],
    srcs: Sequence[PageParts],
    step_ns: int,
    ends: Sequence[int] = (),
) -> list[PageStatus | None]:
    """The new pages of this put as one pack (see :mod:`hicache_localdisk.packs`); ``None``
    where the index reserved nothing. ``ends``: where each of several puts made together
    ends (``Backend.put_batches``): the index makes room for each in turn, as for puts one
    by one, so a later one may evict an earlier one's reservation (its writer, this put,
    then drops that page when it settles, and reports it evicted)."""
    statuses: list[PageStatus | None] = [None] * len(keys)
    todo: list[int] = []
    begin = 0
    for end in ends or (len(keys),):
        part = statuses[begin:end]
        todo += [begin + i for i in index.reserve(keys[begin:end], part)]
        statuses[begin:end] = part
        begin = end
    # the victims' records are punched before the pack is written: the disk, like the
    # accounting, never passes max_bytes
    packs.flush()
    first: dict[str, int] = {}
    for i in todo:
        first.setdefault(keys[i], i)
    pack = list(first.values())
    if pack:
        now = time.time_ns() - pack[0] * step_ns
        written = packs.write([keys[i] for i in pack], [srcs[i] for i in pack], now)
        for i, status in zip(pack, written, strict=True):
            statuses[i] = status
        for i in todo:
            if statuses[i] is None:  # the key again in this batch: as a second writer
                stored = statuses[first[keys[i]]] in SYNCED
                statuses[i] = PageStatus.ALREADY_EXISTS if stored else PageStatus.FAILED
    index.settle(keys, todo, statuses)
    packs.flush()  # what settling forgot (pages evicted while their pack was written)
    return statuses


def read_packed(
    packs: PackFiles,
    keys: Sequence[str],
    dsts: Sequence[PageParts],
    in_packs: list[int],
    where: dict[str, Record],
    now: int | None,
) -> list[tuple[ReadResult, str]]:
    """Read the packed pages ``in_packs`` (indexes of ``keys``, each in ``where``, which
    :meth:`PackFiles.reading` holds); a record found gone (zeros, no regular pack) is
    forgotten, nothing punched, so the index's ``note_missing`` drops its key."""
    packed = packs.read([keys[i] for i in in_packs], [dsts[i] for i in in_packs], where, now)
    gone = {
        keys[i]: where[keys[i]]
        for i, (result, _field) in zip(in_packs, packed, strict=True)
        if result in _GONE
    }
    if gone:
        packs.drop(gone)
    return packed


def forget_packed(
    packs: PackFiles, layout: Layout, keys: Sequence[str], failed: list[str] | None
) -> tuple[int, list[str]]:
    """Deleted or removed pages: the packed ones among ``keys`` are owed a punch. Returns how
    many were packed and the keys that were not. With ``failed`` (a delete), a page whose pack
    cannot be written (a read-only filesystem) is kept and its path added to ``failed``."""
    located = {key: rec for key in keys if (rec := packs.located.get(key)) is not None}
    if located and failed is not None:
        # a delete that cannot punch must fail, the page kept
        stuck = {
            path
            for path in {rec[0].path for rec in located.values()}
            if not os.access(path, os.W_OK)
        }
        for key, rec in list(located.items()):
            if rec[0].path in stuck:
                failed.append(layout.page_path(key))
                del located[key]
    packed = packs.forget(list(located))
    return packed, [key for key in keys if key not in located]
