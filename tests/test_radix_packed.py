"""RadixCache keeps node tokens packed (uint32 bytes): what that must not change, and its edges.

Matches and inserts must give the same answers as a plain prefix model whatever the split
points and however far a match packs the request; nodes must hold no Python token objects (the
point of packing) and no reference to the caller's list; ids outside uint32 are refused on
insert and never matched.
"""

from __future__ import annotations

import gc
from array import array
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hicache.keys import chain_hashes, tokens_to_bytes
from hicache.packed_tokens import (
    Tokens,
    chain_hashes_packed,
    common_pages,
    pack_request,
    token_list,
    unpack,
)
from hicache.radix import RadixCache, TreeNode

PS = 4
U32_MAX = 2**32 - 1

#: Distinct page contents, with ids at both ends of the uint32 range (byte order matters there).
PAGES = [
    [0, 1, 2, 3],
    [U32_MAX, 0, U32_MAX, 7],
    [256, 65_536, 16_777_216, 2**31],
    [5, 5, 5, 5],
    [5, 5, 5, 6],
]


#: The forms a request's tokens come in: a list (a tokenizer's), SGLang's ``array('q')``, and
#: an already 4-byte ``array('I')``; each must give the same answers.
FORMS: list[Callable[[list[int]], Sequence[int]]] = [
    list,
    lambda t: array("q", t),
    lambda t: array("I", t),
]


#: Every form a tree takes a request in (``packed_tokens.pack_request``): the above, numpy arrays
#: (int64 as SGLang's tensors, uint32 read in place), ``bytes`` already packed, a memoryview.
REQUEST_FORMS: list[Callable[[list[int]], Tokens]] = [
    *FORMS,
    lambda t: array("Q", t),  # 8 bytes, unsigned: packed by the same path as array('q')
    lambda t: np.array(t, dtype=np.int64),
    lambda t: np.array(t, dtype=np.uint32),
    lambda t: np.array(t, dtype=">i8"),  # another byte order
    lambda t: np.repeat(np.array(t, dtype=np.int64), 2)[::2],  # not contiguous
    tokens_to_bytes,
    lambda t: bytearray(tokens_to_bytes(t)),
    lambda t: memoryview(array("q", t)),
]
FORM_IDS = [
    "list",
    "array_q",
    "array_I",
    "array_Q",
    "np_i8",
    "np_u4",
    "np_be",
    "np_strided",
    "bytes",
]
FORM_IDS += ["bytearray", "memoryview_q"]


def tokens(page_ids: list[int]) -> list[int]:
    return [t for p in page_ids for t in PAGES[p]]


def model_match(content: dict[tuple[int, ...], int], key: list[int]) -> list[int]:
    want = []
    j = 0
    while (j + 1) * PS <= len(key) and tuple(key[: (j + 1) * PS]) in content:
        want.append(content[tuple(key[: (j + 1) * PS])])
        j += 1
    return want


@settings(max_examples=50)
@given(st.lists(st.integers(0, U32_MAX), max_size=3 * PS).map(lambda t: t[: len(t) // PS * PS]))
def test_packing_is_keys_layout_and_hashes_agree(toks: list[int]) -> None:
    packed = tokens_to_bytes(toks)
    assert unpack(packed) == toks
    parent = bytes(range(32))
    assert chain_hashes_packed(parent, packed, PS) == chain_hashes(parent, toks, PS)


def test_pack_request_cuts_at_ids_outside_uint32() -> None:
    good = tokens([0, 1])
    for form in (list, lambda t: array("q", t), lambda t: np.array(t, dtype=np.int64)):
        packed, n = pack_request(form([*good, 9, 9, 2**32, 9, 9]))
        assert bytes(packed) == tokens_to_bytes([*good, 9, 9]) and n == 2 * PS + 5
        packed, n = pack_request(form([1, -1, *good]))
        assert bytes(packed) == tokens_to_bytes([1]) and n == 2 + 2 * PS
    # unsigned 8-byte ids: the first one past the uint32 range cuts, however far past
    for bad in (2**32, 2**63, 2**64 - 1):
        packed, n = pack_request(array("Q", [*good, U32_MAX, bad, 1]))
        assert bytes(packed) == tokens_to_bytes([*good, U32_MAX]) and n == 2 * PS + 3
    step = PS * 4
    a, b = tokens_to_bytes(tokens([0, 1, 2])), tokens_to_bytes(tokens([3, 0, 1, 4]))
    assert common_pages(a, b, step, step) == 2  # a vs b's pages 1..: [0, 1] shared, then 2 != 4
    # at most the pages b has left; the first counts as shared (callers matched it already)
    assert common_pages(a, b, 3 * step, step) == 1


def test_nodes_hold_packed_tokens_untracked_by_gc() -> None:
    cache = RadixCache(PS)
    cache.insert(tokens([0, 1, 2]), [10, 11, 12])
    cache.insert(tokens([0, 1, 3, 4]), [10, 11, 13, 14])  # splits after two pages
    nodes = list(cache.iter_nodes())
    assert len(nodes) == 3
    for node in nodes:
        assert type(node.tokens) is bytes and not gc.is_tracked(node.tokens)
        assert node.tokens == tokens_to_bytes(node.key)
        assert node.num_tokens == len(node.key) == len(node.value or []) * PS
        assert cache.first_page(node) == tokens_to_bytes(node.key[:PS])
        assert node.parent is not None and node.parent.children[cache.first_page(node)] is node


def test_matches_ending_at_a_shared_prefix_compare_packed_tokens() -> None:
    cache = RadixCache(PS)
    cache.insert(tokens([0, 1, 2]), [10, 11, 12])
    cache.insert(tokens([0, 1, 3]), [10, 11, 13])
    assert cache.match_prefix(tokens([0, 1, 4])).device_pages == [10, 11]
    # same first page, another second one: the packed compare fails and the node is split
    r = cache.match_prefix(tokens([0, 4]))
    assert r.device_pages == [10] and r.last_node.key == tokens([0])
    assert cache.match_prefix(tokens([0, 1, 3])).device_pages == [10, 11, 13]


def test_insert_keeps_no_reference_to_the_callers_list() -> None:
    cache = RadixCache(PS)
    key = tokens([1, 2, 3])
    cache.insert(key, [0, 1, 2])
    original = list(key)
    key[5] = 99  # the caller reuses its list
    assert cache.match_prefix(original).device_pages == [0, 1, 2]
    assert cache.match_prefix(key).device_pages == [0]


def test_ids_outside_uint32_are_refused_on_insert_and_never_matched() -> None:
    cache = RadixCache(PS)
    cache.insert(tokens([0, 1]), [0, 1])
    for bad in (-1, 2**32):
        try:
            cache.insert([*tokens([0, 1]), 1, 2, bad, 3], [0, 1, 2])
        except ValueError as exc:
            assert str(bad) in str(exc)
        else:
            raise AssertionError(f"token id {bad} accepted")
        # refused before the tree changed
        assert [n.num_tokens for n in cache.iter_nodes()] == [2 * PS]
        assert cache.evictable_pages == 2
        # a match stops before the page holding it; one inside a cached node splits it there
        assert cache.match_prefix([*tokens([0, 1]), bad, 0, 0, 0]).device_pages == [0, 1]
        assert cache.match_prefix([*tokens([0]), 1, bad, 2, 3]).device_pages == [0]
        assert cache.match_prefix([bad] * PS).device_pages == []
        cache.reset()
        cache.insert(tokens([0, 1]), [0, 1])


def test_a_long_node_matches_up_to_an_id_outside_uint32_just_after_it() -> None:
    # the request's few tokens after the node are packed with it (no slice of a long list):
    # an id there that cannot be packed still lets the node's pages match
    node = tokens([0, 1, 2, 3, 4, 0, 1, 2])
    for bad in (-1, 2**32):
        cache = RadixCache(PS)
        cache.insert(node, list(range(8)))
        assert cache.match_prefix([*node, 5, bad, 0, 0]).device_pages == list(range(8))
        # a partial last page is never matched, whatever it holds (the list is not cut)
        assert cache.match_prefix([*node, 5, bad]).device_pages == list(range(8))
        assert cache.match_prefix([*node[: 7 * PS], *node[7 * PS : 8 * PS - 1]]).device_pages == (
            list(range(7))
        )
        # a mismatch inside the node still splits it at the last shared page
        assert cache.match_prefix([*tokens([0, 1, 2, 4]), 5, bad, 0, 0]).device_pages == [0, 1, 2]


@pytest.mark.parametrize("form", REQUEST_FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("ps", [1, PS])
def test_chunked_compare_edges(form: Callable[[list[int]], Tokens], ps: int) -> None:
    """A 6-page node, then requests differing inside a page, at a page border, in the last
    token, with a partial last page: each splits (or not) exactly at the last equal page."""
    conv = form
    node_tokens = [1000 + t for t in range(6 * ps)]
    for where, want_pages in [
        (2 * ps + ps // 2, 2),  # inside page 2 (its first token when ps == 1)
        (3 * ps, 3),  # the first token of page 3: a page border
        (6 * ps - 1, 5),  # the node's very last token
    ]:
        cache = RadixCache(ps)
        cache.insert(node_tokens, list(range(6)))
        req = node_tokens[:]
        req[where] = 7
        r = cache.match_prefix(conv(req))
        assert r.device_pages == list(range(want_pages))
        assert r.last_node.num_tokens == want_pages * ps  # split at the last equal page
        # the request inserted from the same form shares exactly those pages
        assert cache.insert(conv(req), list(range(10, 16))) == want_pages * ps
    cache = RadixCache(ps)
    cache.insert(node_tokens, list(range(6)))
    # equal throughout, then a partial page (ignored) or one more differing page
    assert cache.match_prefix(conv([*node_tokens, 5][: 6 * ps + (ps - 1)])).device_pages == list(
        range(6)
    )
    assert cache.match_prefix(conv([*node_tokens, *[9] * ps])).device_pages == list(range(6))
    assert [n.num_tokens for n in cache.iter_nodes()] == [6 * ps]  # nothing was split


def test_array_requests_with_ids_outside_uint32_stop_before_that_page() -> None:
    cache = RadixCache(PS)
    cache.insert(tokens([0, 1]), [0, 1])
    for bad in (-1, 2**32, -(2**40)):
        assert cache.match_prefix(array("q", [*tokens([0, 1]), bad, 0, 0, 0])).device_pages == [
            0,
            1,
        ]
        assert cache.match_prefix(array("q", [*tokens([0]), 1, bad, 2, 3])).device_pages == [0]
        with pytest.raises(ValueError, match=str(bad)):
            cache.insert(array("q", [*tokens([0, 1]), 1, 2, bad, 3]), [0, 1, 2])
        assert cache.evictable_pages == 2  # refused before the tree changed


ops = st.lists(
    st.tuples(
        st.sampled_from(["insert", "match"]),
        st.lists(st.integers(0, len(PAGES) - 1), min_size=0, max_size=8),
        st.integers(0, PS - 1),  # a partial trailing page, which matches ignore
        st.sampled_from(range(len(REQUEST_FORMS))),  # the form the request comes in
    ),
    max_size=30,
)


@settings(max_examples=80)
@given(ops)
def test_long_nodes_match_a_prefix_model(
    operations: list[tuple[str, list[int], int, int]],
) -> None:
    """Multi-page nodes, splits anywhere, matches that end inside, at or past a node: the tree
    answers as a dict of cached page prefixes does."""
    cache = RadixCache(PS)
    content: dict[tuple[int, ...], int] = {}
    next_page = 0
    for op, page_ids, extra, form in operations:
        key = tokens(page_ids)
        conv: Callable[[list[int]], Any] = REQUEST_FORMS[form]
        if op == "insert":
            if not page_ids:
                continue
            pages = list(range(next_page, next_page + len(page_ids)))
            next_page += len(page_ids)
            cached = len(model_match(content, key))
            assert cache.insert(conv(key), pages) == cached * PS
            for j in range(cached, len(page_ids)):
                content[tuple(key[: (j + 1) * PS])] = pages[j]
        else:
            want = model_match(content, key)
            r = cache.match_prefix(conv(key + [7] * extra))
            assert r.device_pages == want
            # the returned node ends exactly where the match does (a node was split if needed)
            depth, node = 0, r.last_node
            while node is not cache.root:
                depth += node.num_tokens
                assert node.parent is not None
                node = node.parent
            assert depth == len(want) * PS
        # the tree's pages, read back through the packed tokens, are the model's
        got: dict[tuple[int, ...], int] = {}
        stack: list[tuple[TreeNode, tuple[int, ...]]] = [(cache.root, ())]
        while stack:
            node, prefix = stack.pop()
            for child in node.children.values():
                p: tuple[int, ...] = prefix
                child_key = child.key
                for j, page in enumerate(child.value or []):
                    p = p + tuple(child_key[j * PS : (j + 1) * PS])
                    got[p] = page
                stack.append((child, p))
        assert got == content


@settings(max_examples=60)
@given(
    st.lists(st.integers(0, U32_MAX), max_size=3 * PS),
    st.sampled_from(range(len(REQUEST_FORMS))),
)
def test_every_request_form_packs_alike(toks: list[int], form: int) -> None:
    """Each form gives the keys layout and the token count, and reads back as the list."""
    req = REQUEST_FORMS[form](toks)
    packed, n = pack_request(req)
    assert bytes(packed) == tokens_to_bytes(toks) and n == len(toks)
    assert token_list(req) == toks


@pytest.mark.parametrize(
    ("request_", "error", "message"),
    [
        (array("d", [1.0, 2.0]), TypeError, "array of type 'd'"),
        (np.array([1.0, 2.0]), TypeError, "dtype float64"),
        (np.array([True, False]), TypeError, "dtype bool"),
        (np.zeros((2, 4), dtype=np.int64), ValueError, r"one-dimensional, got shape \(2, 4\)"),
        (b"\x01\x00\x00\x00\x02", ValueError, "4 bytes each: got 5 bytes"),
        (bytearray(7), ValueError, "got 7 bytes"),
        ([1, 2, "3", 4], TypeError, "got str '3' at 2"),
        ([1, 2.5], TypeError, "got float 2.5 at 1"),
    ],
)
def test_requests_that_are_not_token_ids_get_one_clear_error(
    request_: object, error: type[Exception], message: str
) -> None:
    """Match and insert refuse them alike, naming what is wrong, before the tree changes."""
    cache = RadixCache(2)
    cache.insert([1, 2, 3, 4], [0, 1])
    with pytest.raises(error, match=message):
        cache.match_prefix(request_)  # type: ignore[arg-type]
    with pytest.raises(error, match=message):
        cache.insert(request_, [5, 6])  # type: ignore[arg-type]
    assert [n.num_tokens for n in cache.iter_nodes()] == [4] and cache.evictable_pages == 2


def test_long_requests_in_every_form_match_and_insert_alike() -> None:
    """A 32k-token shared prefix (the long-prompt case): every form finds the same pages, and
    an insert from any form shares exactly the prefix."""
    rng = np.random.default_rng(1)
    prefix = rng.integers(0, 128_000, size=32_768).tolist()
    tail = rng.integers(0, 128_000, size=(len(REQUEST_FORMS), 64)).tolist()
    ps = 64
    cache = RadixCache(ps)
    first = prefix + tail[0]
    cache.insert(first, list(range(len(first) // ps)))
    for j, form in enumerate(REQUEST_FORMS):
        assert cache.match_prefix(form(first)).device_pages == list(range(len(first) // ps))
        req = prefix + tail[j] if j else [*prefix[:-1], 7, *tail[0]]
        shared = len(prefix) // ps - (0 if j else 1)
        assert cache.match_prefix(form(req)).device_pages == list(range(shared))
        assert cache.insert(form(req), list(range(1000, 1000 + len(req) // ps))) == shared * ps


@settings(max_examples=100)
@given(
    st.integers(1, 3),
    st.integers(1, 40),
    st.integers(0, 45),
    st.integers(0, 3),
    st.data(),
)
def test_common_pages_finds_the_first_differing_page(
    ps: int, pages: int, diff_at: int, offset_pages: int, data: st.DataObject
) -> None:
    """Galloping then bisecting gives what a page-by-page compare gives, wherever the runs
    differ and however much of the request is left."""
    step = ps * 4
    run = data.draw(st.binary(min_size=pages * step, max_size=pages * step))
    # the request: the run's first pages (up to past the run's end), one byte flipped in page
    # ``diff_at`` when it has one, after ``offset_pages`` pages of anything
    other = bytearray(run[: max(step, (diff_at + 1) * step)])
    if diff_at and diff_at * step < len(other):
        other[diff_at * step + data.draw(st.integers(0, step - 1))] ^= 0xFF
    packed = data.draw(st.binary(min_size=offset_pages * step, max_size=offset_pages * step))
    packed += bytes(other)
    offset = offset_pages * step
    want = 1
    limit = min(len(run), len(packed) - offset) // step
    while (
        want < limit
        and run[want * step : (want + 1) * step]
        == packed[offset + want * step : offset + (want + 1) * step]
    ):
        want += 1
    assert common_pages(run, packed, offset, step) == want
    assert common_pages(run, memoryview(packed), offset, step) == want
