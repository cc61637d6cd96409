"""PageIndex on its own: a put's reservations, one per page written, whatever the put's shape
(its bulk path for distinct new pages, its per-page path otherwise), and what settling does."""

from __future__ import annotations

import random

import pytest
from hicache_localdisk.index import PageIndex

from hicache.storage import EvictionPolicy, PageStatus

STORED = 10


class Disk:
    """What the index is told about files: the keys on disk, and the unlinks it asked for."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.unlinked: list[str] = []

    def unlink(self, key: str) -> bool:
        self.unlinked.append(key)
        gone = key in self.files
        self.files.discard(key)
        return gone

    def on_disk(self, key: str) -> bool:
        return key in self.files


def _index(
    pages: int, eviction: EvictionPolicy = EvictionPolicy.PREDICTED_REUSE
) -> tuple[PageIndex, Disk]:
    disk = Disk()
    index = PageIndex(STORED, disk.unlink, disk.on_disk)
    index.load([], [], pages * STORED, eviction, batch=8)
    return index, disk


def _write(disk: Disk, keys: list[str], todo: list[int], ok: bool) -> list[PageStatus | None]:
    """The writes of a put's ``todo``: each file lands (``OK``, or ``ALREADY_EXISTS`` for a
    key's second page in the put) or fails."""
    statuses: list[PageStatus | None] = [None] * len(keys)
    for i in todo:
        if not ok:
            statuses[i] = PageStatus.FAILED
        elif keys[i] in disk.files:
            statuses[i] = PageStatus.ALREADY_EXISTS
        else:
            disk.files.add(keys[i])
            statuses[i] = PageStatus.OK
    return statuses


def test_a_key_twice_in_a_put_holds_two_reservations() -> None:
    # put 1 writes "a" twice, put 2 once, at the same time; put 1's writes fail: put 2's
    # reservation must survive them, or its settle takes its file for a page evicted in flight
    index, disk = _index(pages=8)
    first = ["a", "a"]
    todo1 = index.reserve(first, [None, None])
    todo2 = index.reserve(["a"], [None])
    assert todo1 == [0, 1] and todo2 == [0]
    index.settle(first, todo1, _write(disk, first, todo1, ok=False))
    assert "a" in index.policy  # type: ignore[operator]
    published = index.settle(["a"], todo2, _write(disk, ["a"], todo2, ok=True))
    assert published == STORED
    assert index.pages == {"a": STORED} and disk.unlinked == []
    assert index.take_evicted() == []


@pytest.mark.parametrize("eviction", list(EvictionPolicy))
def test_random_puts_keep_pages_files_and_policy_in_step(eviction: EvictionPolicy) -> None:
    """Puts of distinct new pages (the bulk path) mixed with puts of stored, repeated or
    failing pages, two at a time in flight: every known page has its file, every file that
    was not evicted is known, and the policy holds exactly the known pages at the end."""
    rng = random.Random(5)
    index, disk = _index(pages=24, eviction=eviction)
    evicted: set[str] = set()
    pending: list[tuple[list[str], list[int], bool]] = []
    for step in range(3000):
        keys = [f"k{rng.randrange(60)}" for _ in range(rng.randrange(1, 9))]
        if rng.random() < 0.5:
            keys = list(dict.fromkeys(keys))  # distinct
        todo = index.reserve(keys, [None] * len(keys))
        pending.append((keys, todo, rng.random() < 0.9))
        if len(pending) > 1 or rng.random() < 0.5:
            keys, todo, ok = pending.pop(rng.randrange(len(pending)))
            index.settle(keys, todo, _write(disk, keys, todo, ok))
        evicted.update(index.take_evicted())
        assert sum(index.pages.values()) <= 24 * STORED, step
        assert set(index.pages) <= disk.files, step
    for keys, todo, ok in pending:
        index.settle(keys, todo, _write(disk, keys, todo, ok))
    assert set(index.pages) == disk.files
    assert index.policy is not None
    assert sorted(index.policy.missing(sorted(index.pages))) == []
    assert len(index.policy) == len(index.pages)
    assert evicted
