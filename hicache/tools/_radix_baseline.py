"""The two sides ``hicache bench radix`` times: hicache's trees and SGLang's own ``RadixCache``.

- :class:`Workload`        one shared prefix followed by a unique suffix per request
- :func:`hicache_sides`    hicache's plain :class:`~hicache.radix.RadixCache` and
                           :class:`~hicache.hiradix.HiRadixCache` as it is served
- :func:`sglang_sides`     SGLang's ``RadixCache`` with events off and on (the real class, see
                           :mod:`hicache.tools._sglang_radix`)

Every side builds its inputs in the form it takes, outside the timer, from fresh objects per request
(a tokenizer's list of fresh ints, put in that form): SGLang an
``InsertParams``/``MatchPrefixParams`` around a ``RadixKey`` of an ``array('q')`` (what SGLang 0.5's
scheduler holds) and an int64 tensor of token slots; hicache, by default, the same ``array('q')`` of
tokens (its trees take it as it is, see ``packed_tokens.pack_request``) and an ``array('i')`` of
page indices (an engine's page table is an int32 tensor). ``input_form="list"`` hands hicache the
``list[int]`` itself instead (what vLLM holds): reading a list of fresh ints costs ~8 ns a token
whatever reads it. A side's ``step`` is what the serving loop calls for one request; the bench calls
it for each prepared input.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hicache.hiradix import HiRadixCache
from hicache.pools import DevicePool, HostPool, KVLayout
from hicache.radix import RadixCache
from hicache.tools._sglang_radix import SglangPeer
from hicache.transfer import Direction, TransferEngine

__all__ = ["INPUT_FORMS", "Side", "Workload", "hicache_sides", "sglang_sides"]

#: The request forms ``hicache_sides`` can hand hicache's trees.
INPUT_FORMS = ("array", "list")

_VOCAB = 128_000


@dataclass(frozen=True, slots=True)
class Workload:
    """``requests`` requests of one ``prefix_tokens`` shared prefix + ``unique_tokens`` each."""

    page_size: int
    prefix_tokens: int
    unique_tokens: int
    requests: int
    seed: int = 0

    @property
    def tokens(self) -> int:
        return self.prefix_tokens + self.unique_tokens

    @property
    def pages_per_request(self) -> int:
        return self.tokens // self.page_size

    @property
    def cached_pages(self) -> int:
        """Pages a tree holds once every request is inserted."""
        return (self.prefix_tokens + self.requests * self.unique_tokens) // self.page_size

    def arrays(self, what: str) -> list[np.ndarray[Any, Any]]:
        """Token arrays of one phase: ``requests`` (the inserted sequences), ``prefix_hits``
        (the shared prefix and a new suffix)."""
        rng = np.random.default_rng(self.seed)
        prefix = rng.integers(0, _VOCAB, size=self.prefix_tokens)
        suffixes = rng.integers(0, _VOCAB, size=(self.requests, self.unique_tokens))
        if what == "prefix_hits":  # ids above the vocabulary: no inserted suffix starts so
            suffixes = rng.integers(_VOCAB, 2 * _VOCAB, size=suffixes.shape)
        return [np.concatenate((prefix, s)) for s in suffixes]


#: One request's work for a side: called with one prepared input.
Step = Callable[[Any], object]


@dataclass(slots=True)
class Side:
    """One tree of one implementation in one configuration."""

    name: str
    tree: Any
    #: input for an insert / a match of one token array (built outside the timer)
    insert_input: Callable[[np.ndarray[Any, Any], int], Any]
    match_input: Callable[[np.ndarray[Any, Any]], Any]
    insert: Step
    match: Step
    #: tokens a match result covers
    matched: Callable[[Any], int]


class _AckOnly(TransferEngine):
    """A transfer engine whose copies finish at once without moving bytes: bookkeeping only."""

    def __init__(self, device_pool: DevicePool, host_pool: HostPool) -> None:
        super().__init__(device_pool, host_pool)
        self._done: list[int] = []

    def _start(
        self, ack_id: int, direction: Direction, src: Sequence[int], dst: Sequence[int]
    ) -> None:
        self._done.append(ack_id)

    def _collect(self) -> list[int]:
        done, self._done = self._done, []
        return done

    def _wait(self, ack_id: int) -> None:
        return


def _hicache_inputs(ps: int, form: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    if form not in INPUT_FORMS:
        raise ValueError(f"input form must be one of {INPUT_FORMS}, got {form!r}")

    def request(tokens: np.ndarray[Any, Any]) -> Any:
        fresh = tokens.tolist()  # fresh ints, as a tokenizer hands them over
        return fresh if form == "list" else array("q", fresh)

    def insert_input(tokens: np.ndarray[Any, Any], i: int) -> tuple[Any, array[int]]:
        n = len(tokens) // ps
        # page ids as an engine holds them (SGLang's page table is int32): no Python int per
        # page, in the request nor in the tree that keeps slices of it
        return request(tokens), array("i", range(i * n, (i + 1) * n))

    return insert_input, request


def hicache_sides(w: Workload, input_form: str = "array") -> dict[str, Side]:
    """``hicache``: the plain tree; ``hicache_served``: ``HiRadixCache`` as served (write-through,
    events on for GPU and CPU_PINNED, ``writing_check`` and ``take_events`` after each insert).
    ``input_form``: the form of the requests handed to both (see :data:`INPUT_FORMS`)."""
    ps = w.page_size
    insert_input, match_input = _hicache_inputs(ps, input_form)
    plain = RadixCache(ps)
    pages = w.requests * w.pages_per_request + 1
    layout = KVLayout(1, 1, 1, ps, torch.float32)  # tiny pages: no KV bytes to speak of
    dev = DevicePool(layout, pages, "cpu")
    host = HostPool(layout, pages, pin=False)
    served = HiRadixCache(dev, host, _AckOnly(dev, host))

    def served_insert(a: tuple[Any, list[int]]) -> int:
        dup = served.insert(a[0], a[1])
        served.writing_check()
        served.take_events()
        return dup

    def matched(r: Any) -> int:
        return len(r.device_pages) * ps

    return {
        "hicache": Side(
            "hicache",
            plain,
            insert_input,
            match_input,
            lambda a: plain.insert(a[0], a[1]),
            plain.match_prefix,
            matched,
        ),
        "hicache_served": Side(
            "hicache_served",
            served,
            insert_input,
            match_input,
            served_insert,
            served.match_prefix,
            matched,
        ),
    }


def sglang_sides(w: Workload, peer: SglangPeer) -> dict[str, Side]:
    """``sglang``: SGLang's ``RadixCache`` with events off; ``sglang_events``: with events on,
    ``take_events`` after each insert."""
    ps = w.page_size

    def insert_input(tokens: np.ndarray[Any, Any], i: int) -> Any:
        n = len(tokens)
        slots = torch.arange(i * n, (i + 1) * n, dtype=torch.int64)
        return peer.insert_params(key=peer.radix_key(array("q", tokens.tolist())), value=slots)

    def match_input(tokens: np.ndarray[Any, Any]) -> Any:
        return peer.match_params(key=peer.radix_key(array("q", tokens.tolist())))

    def matched(r: Any) -> int:
        return int(r.device_prefix_len)

    sides = {}
    for name, events in (("sglang", False), ("sglang_events", True)):
        tree = peer.radix_cache.create_simulated(page_size=ps, enable_kv_cache_events=events)
        insert: Step = tree.insert
        if events:

            def insert_take(params: Any, tree: Any = tree) -> object:
                result = tree.insert(params)
                tree.take_events()
                return result

            insert = insert_take
        match = tree.match_prefix
        sides[name] = Side(name, tree, insert_input, match_input, insert, match, matched)
    return sides


def prepared(side: Side, arrays: Sequence[np.ndarray[Any, Any]], insert: bool) -> list[Any]:
    """``side``'s inputs for ``arrays`` (fresh objects for each request)."""
    if insert:
        return [side.insert_input(a, i) for i, a in enumerate(arrays)]
    return [side.match_input(a) for a in arrays]
