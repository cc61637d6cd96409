"""RadixCache: match, insert, splits, locks, leaf-first LRU eviction, lazy hashes, GPU events."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hicache.events import BlockRemoved, BlockStored, Medium
from hicache.keys import ModelIdentity, block_id, chain_hashes, seed_hash, tokens_to_bytes
from hicache.radix import RadixCache, TreeNode

PS = 4


def seq(*pages: int) -> list[int]:
    """Tokens of pages whose tokens are all equal to the given ids (page p -> [p]*PS)."""
    return [t for p in pages for t in [p] * PS]


def check_tree(cache: RadixCache) -> dict[tuple[int, ...], int]:
    """Structural invariants; return {token prefix of each page: device page} of the tree."""
    content: dict[tuple[int, ...], int] = {}
    evictable = protected = 0

    def walk(node: TreeNode, prefix: tuple[int, ...]) -> None:
        nonlocal evictable, protected
        for first, child in node.children.items():
            assert child.parent is node
            assert cache.first_page(child) == first == tokens_to_bytes(child.key[:PS])
            assert len(child.key) % PS == 0 and child.key
            assert child.value is not None and len(child.value) * PS == len(child.key)
            assert child.lock_ref >= 0
            if child.lock_ref:
                protected += len(child.value)
            else:
                evictable += len(child.value)
            p = prefix
            for j, page in enumerate(child.value):
                p = p + tuple(child.key[j * PS : (j + 1) * PS])
                content[p] = page
            walk(child, p)

    walk(cache.root, ())
    assert cache.evictable_pages == evictable
    assert cache.protected_pages == protected
    return content


def test_insert_then_match_returns_device_pages() -> None:
    cache = RadixCache(PS)
    assert cache.insert(seq(1, 2, 3), [10, 11, 12]) == 0
    r = cache.match_prefix(seq(1, 2, 3, 4))
    assert r.device_pages == [10, 11, 12]
    assert r.last_node.key == seq(1, 2, 3)
    assert cache.match_prefix(seq(9)).device_pages == []
    assert cache.match_prefix(seq(9)).last_node is cache.root


def test_match_ignores_partial_trailing_page() -> None:
    cache = RadixCache(PS)
    cache.insert(seq(1, 2), [5, 6])
    assert cache.match_prefix([*seq(1, 2), 2, 2]).device_pages == [5, 6]
    # a partial first page never matches, even if its tokens agree
    assert cache.match_prefix([1, 1, 1]).device_pages == []


def test_match_splits_node_at_page_boundary() -> None:
    cache = RadixCache(PS)
    cache.insert(seq(1, 2, 3, 4), [10, 11, 12, 13])
    old = cache.match_prefix(seq(1, 2, 3, 4)).last_node
    r = cache.match_prefix(seq(1, 2, 7))
    assert r.device_pages == [10, 11]
    assert r.last_node.key == seq(1, 2)
    assert r.last_node.value == [10, 11]
    # the old object is the suffix, hanging below the new prefix
    assert old.key == seq(3, 4) and old.value == [12, 13]
    assert old.parent is r.last_node
    assert check_tree(cache)[tuple(seq(1, 2, 3, 4))] == 13


def test_match_mismatch_inside_page_stops_at_previous_page() -> None:
    cache = RadixCache(PS)
    cache.insert(seq(1, 2, 3), [10, 11, 12])
    key = [*seq(1, 2), 3, 3, 3, 99]
    assert cache.match_prefix(key).device_pages == [10, 11]


def test_insert_returns_cached_prefix_and_splits() -> None:
    cache = RadixCache(PS)
    cache.insert(seq(1, 2, 3), [10, 11, 12])
    assert cache.insert(seq(1, 2, 5, 6), [20, 21, 22, 23]) == 2 * PS
    content = check_tree(cache)
    assert content[tuple(seq(1, 2))] == 11
    assert content[tuple(seq(1, 2, 5, 6))] == 23
    assert content[tuple(seq(1, 2, 3))] == 12
    assert cache.total_device_pages() == 5
    # full duplicate insert changes nothing
    assert cache.insert(seq(1, 2, 3), [30, 31, 32]) == 3 * PS
    assert check_tree(cache) == content


def test_insert_rejects_misaligned_key() -> None:
    cache = RadixCache(PS)
    try:
        cache.insert([1, 2, 3], [0])
    except ValueError as exc:
        assert "page_size" in str(exc)
    else:
        raise AssertionError("misaligned insert accepted")


def test_locks_protect_path_and_balance() -> None:
    freed: list[int] = []
    cache = RadixCache(PS, freed.extend)
    cache.insert(seq(1, 2), [10, 11])
    cache.insert(seq(1, 2, 3), [10, 11, 12])
    leaf = cache.match_prefix(seq(1, 2, 3)).last_node
    cache.inc_lock_ref(leaf)
    assert cache.protected_pages == 3 and cache.evictable_pages == 0
    assert cache.evict(10) == 0 and freed == []
    cache.dec_lock_ref(leaf)
    assert cache.protected_pages == 0 and cache.evictable_pages == 3
    try:
        cache.dec_lock_ref(leaf)
    except RuntimeError:
        pass
    else:
        raise AssertionError("lock went below zero silently")


def test_split_copies_lock_and_unlock_from_suffix_balances() -> None:
    cache = RadixCache(PS)
    cache.insert(seq(1, 2, 3, 4), [10, 11, 12, 13])
    node = cache.match_prefix(seq(1, 2, 3, 4)).last_node
    cache.inc_lock_ref(node)
    cache.insert(seq(1, 2, 8), [20, 21, 22])  # splits the locked node
    assert node.parent is not None and node.parent.lock_ref == 1
    check_tree(cache)
    cache.dec_lock_ref(node)
    check_tree(cache)
    assert cache.protected_pages == 0 and cache.evictable_pages == 5


def test_evict_is_leaf_first_lru() -> None:
    freed: list[int] = []
    cache = RadixCache(PS, freed.extend)
    cache.insert(seq(1, 2), [10, 11])
    cache.insert(seq(1, 2, 3), [10, 11, 12])  # leaf [3]
    cache.insert(seq(1, 2, 4), [10, 11, 13])  # leaf [4]
    cache.match_prefix(seq(1, 2, 3))  # [3] is now more recent than [4]
    assert cache.evict(1) == 1
    assert freed == [13]
    assert cache.evict(1) == 1
    assert freed == [13, 12]
    # the shared prefix went last, and only as much of it as asked for: its tail page first
    assert cache.evict(1) == 1
    assert freed == [13, 12, 11]
    check_tree(cache)
    assert cache.match_prefix(seq(1, 2)).device_pages == [10]
    assert cache.evict(5) == 1
    assert sorted(freed) == [10, 11, 12, 13]
    assert cache.root.children == {}
    assert cache.total_device_pages() == 0


def test_node_hashes_are_lazy_and_sliced_on_split() -> None:
    seed = seed_hash(ModelIdentity("m"))
    cache = RadixCache(PS, seed=seed)
    cache.insert(seq(1, 2, 3, 4), [0, 1, 2, 3])
    node = cache.match_prefix(seq(1, 2, 3, 4)).last_node
    assert node.hashes is None  # nothing hashed on insert or match
    full = chain_hashes(seed, seq(1, 2, 3, 4), PS)
    assert cache.node_hashes(node) == full
    cache.insert(seq(1, 2, 9), [0, 1, 7])
    assert node.hashes == full[2:]
    assert node.parent is not None and node.parent.hashes == full[:2]
    branch = cache.match_prefix(seq(1, 2, 9)).last_node
    assert cache.node_hashes(branch) == chain_hashes(seed, seq(1, 2, 9), PS)[2:]


def test_gpu_events_chain_and_removal() -> None:
    seed = seed_hash(ModelIdentity("m"))
    cache = RadixCache(PS, seed=seed, gpu_events=True)
    cache.insert(seq(1, 2), [0, 1])
    cache.insert(seq(1, 2, 3), [0, 1, 2])
    hs = [block_id(h) for h in chain_hashes(seed, seq(1, 2, 3), PS)]
    ev = cache.take_events()
    # one event per new node, its pages chained in it
    assert ev == [
        BlockStored([hs[0], hs[1]], None, seq(1, 2), PS, None, Medium.GPU),
        BlockStored([hs[2]], hs[1], seq(3), PS, None, Medium.GPU),
    ]
    cache.evict(1)
    assert cache.take_events() == [BlockRemoved([hs[2]], Medium.GPU)]
    assert cache.take_events() == []


ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.lists(st.integers(0, 2), min_size=1, max_size=6)),
        st.tuples(st.just("match"), st.lists(st.integers(0, 2), min_size=0, max_size=6)),
        st.tuples(st.just("evict"), st.integers(1, 4)),
        st.tuples(st.just("lock"), st.lists(st.integers(0, 2), min_size=1, max_size=6)),
    ),
    max_size=40,
)


@settings(max_examples=60)
@given(ops)
def test_random_operations_match_model(operations: list[tuple[str, object]]) -> None:
    freed: list[int] = []
    cache = RadixCache(PS, freed.extend)
    next_page = 0
    locks: list[TreeNode] = []
    for op, arg in operations:
        content = check_tree(cache)
        if op in ("insert", "lock"):
            assert isinstance(arg, list)
            key = seq(*arg)
            pages = list(range(next_page, next_page + len(arg)))
            next_page += len(arg)
            cached = 0
            while cached < len(arg) and tuple(key[: (cached + 1) * PS]) in content:
                cached += 1
            assert cache.insert(key, pages) == cached * PS
            freed.extend(pages[:cached])  # the caller frees its duplicates
            after = check_tree(cache)
            for j in range(len(arg)):
                p = tuple(key[: (j + 1) * PS])
                assert after[p] == (content[p] if j < cached else pages[j])
            if op == "lock":
                node = cache.match_prefix(key).last_node
                cache.inc_lock_ref(node)
                locks.append(node)
        elif op == "match":
            assert isinstance(arg, list)
            key = seq(*arg)
            want = []
            j = 0
            while j < len(arg) and tuple(key[: (j + 1) * PS]) in content:
                want.append(content[tuple(key[: (j + 1) * PS])])
                j += 1
            assert cache.match_prefix(key).device_pages == want
            assert check_tree(cache) == content
        else:
            assert isinstance(arg, int)
            before = cache.evictable_pages
            got = cache.evict(arg)
            assert got >= min(arg, before) or cache.evictable_pages == 0
            after = check_tree(cache)
            assert set(after) <= set(content)
            assert len(content) - len(after) == got
        # every page is either in the tree or was freed, never both, never twice
        live = list(check_tree(cache).values())
        assert len(set(live)) == len(live)
        assert len(set(freed)) == len(freed)
        assert not set(freed) & set(live)
        assert len(freed) + len(live) == next_page
    for node in locks:
        cache.dec_lock_ref(node)
    assert cache.protected_pages == 0
    cache.evict(10**6)
    assert cache.total_device_pages() == 0 and cache.root.children == {}
