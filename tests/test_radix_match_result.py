"""``MatchResult.device_pages`` is joined from the matched nodes' page runs on first access:
what it gives must be what joining at match time gave, whatever the tree did in between."""

from __future__ import annotations

from array import array

from hicache.radix import RadixCache

PS = 2


def seq(*pages: int) -> list[int]:
    """Tokens of whole pages, page ``p`` holding ``[p * 10, p * 10 + 1]``."""
    return [p * 10 + j for p in pages for j in range(PS)]


def test_pages_joined_late_are_the_pages_matched_whatever_the_tree_did_since() -> None:
    freed: list[int] = []
    cache = RadixCache(PS, freed.extend)
    cache.insert(seq(1, 2, 3), array("i", [7, 8, 9]))
    cache.insert(seq(1, 2, 3, 4, 5), array("i", [7, 8, 9, 4, 5]))
    r = cache.match_prefix(seq(1, 2, 3, 4, 5))
    assert r.device_pages_count == 5 and r.last_node.num_tokens == 2 * PS
    # before the result is read, the tree splits the matched nodes and evicts their tails
    cache.insert(seq(1, 6), array("i", [7, 6]))
    cache.insert(seq(1, 2, 3, 4, 6), array("i", [7, 8, 9, 4, 3]))
    assert cache.evict(3) == 3 and sorted(freed) == [3, 5, 6]
    assert r.device_pages == array("i", [7, 8, 9, 4, 5])  # as the match found them
    assert r.device_pages is r.device_pages  # joined once
    assert cache.match_prefix(seq(1, 2, 3, 4, 5)).device_pages == array("i", [7, 8, 9, 4])


def test_the_pages_are_the_callers_to_change() -> None:
    cache = RadixCache(PS)
    cache.insert(seq(1, 2), array("q", [7, 8]))
    r = cache.match_prefix(seq(1, 2))
    (node,) = cache.root.children.values()
    assert r.device_pages is not node.value  # a single run is copied too
    r.device_pages.append(99)
    r.device_pages[0] = 0
    assert node.value == array("q", [7, 8])
    assert cache.match_prefix(seq(1, 2)).device_pages == array("q", [7, 8])


def test_runs_of_several_forms_join_as_the_first_one_came() -> None:
    cache = RadixCache(PS)
    cache.insert(seq(1), array("q", [7]))
    cache.insert(seq(1, 2), array("q", [7, 8]))  # same type code: one array
    cache.insert(seq(1, 2, 3), [7, 8, 9])  # a list below: joins the array
    cache.insert(seq(1, 2, 3, 4), array("i", [7, 8, 9, 4]))  # another type code: a list
    r = cache.match_prefix(seq(1, 2))
    assert r.device_pages == array("q", [7, 8]) and type(r.device_pages) is array
    assert cache.match_prefix(seq(1, 2, 3)).device_pages == array("q", [7, 8, 9])
    r = cache.match_prefix(seq(1, 2, 3, 4))
    assert r.device_pages == [7, 8, 9, 4] and r.device_pages_count == 4


def test_a_miss_has_no_pages() -> None:
    cache = RadixCache(PS)
    cache.insert(seq(1, 2), [0, 1])
    for key in (seq(3), seq(1)[:1], [], array("q", seq(5, 1))):
        r = cache.match_prefix(key)
        assert r.device_pages == [] and r.device_pages_count == 0
        assert r.last_node is cache.root and r.last_host_node is cache.root
        assert "device_pages_count=0" in repr(r)
