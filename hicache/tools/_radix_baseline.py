"""A same-run baseline for ``hicache bench radix``: the algorithm of SGLang's pure-Python
``RadixCache`` (paged key match, tuple child keys, token-index tensors as node values,
``time.monotonic()`` touches, ``torch.cat`` of the matched values), re-implemented in a few lines.

It exists only so the benchmark can report a ratio measured on the same machine, in the same
process, on the same token lists, instead of comparing against figures from another run. It is
not used by the cache.
"""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["BaselineRadix"]


class _Node:
    __slots__ = ("children", "key", "last_access_time", "lock_ref", "parent", "value")

    def __init__(self) -> None:
        self.children: dict[tuple[int, ...], _Node] = {}
        self.parent: _Node | None = None
        self.key: list[int] = []
        self.value: Any = None
        self.lock_ref = 0
        self.last_access_time = time.monotonic()


class BaselineRadix:
    """Insert and match only: the paths the benchmark times."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.root = _Node()
        self.root.value = torch.empty(0, dtype=torch.int64)
        self.evictable_size = 0

    def _child_key(self, key: list[int]) -> tuple[int, ...]:
        return tuple(key[: self.page_size])

    def _key_match(self, key0: list[int], key1: list[int]) -> int:
        ps = self.page_size
        n = min(len(key0), len(key1))
        i = 0
        while i < n:
            if key0[i : i + ps] != key1[i : i + ps]:
                break
            i += ps
        return i

    def match_prefix(self, key: list[int]) -> torch.Tensor:
        """Token indices of the longest cached prefix (one int64 tensor)."""
        key = key[: len(key) // self.page_size * self.page_size]
        node = self.root
        node.last_access_time = time.monotonic()
        values = []
        while key:
            child = node.children.get(self._child_key(key))
            if child is None:
                break
            child.last_access_time = time.monotonic()
            n = self._key_match(child.key, key)
            if n < len(child.key):
                node = self._split(child, n)
                values.append(node.value)
                break
            values.append(child.value)
            node = child
            key = key[n:]
        if not values:
            return torch.empty(0, dtype=torch.int64)
        return torch.cat(values)

    def _split(self, child: _Node, n: int) -> _Node:
        new = _Node()
        new.children = {self._child_key(child.key[n:]): child}
        new.parent = child.parent
        new.lock_ref = child.lock_ref
        new.key = child.key[:n]
        new.value = child.value[:n]
        child.parent = new
        child.key = child.key[n:]
        child.value = child.value[n:]
        assert new.parent is not None
        new.parent.children[self._child_key(new.key)] = new
        return new

    def insert(self, key: list[int], value: torch.Tensor) -> int:
        """Insert ``key`` with per-token ``value``; return the cached prefix length."""
        node = self.root
        node.last_access_time = time.monotonic()
        total = 0
        while key:
            child = node.children.get(self._child_key(key))
            if child is None:
                break
            node = child
            node.last_access_time = time.monotonic()
            n = self._key_match(node.key, key)
            total += n
            key = key[n:]
            value = value[n:]
            if n < len(node.key):
                node = self._split(node, n)
        if key:
            new = _Node()
            new.parent = node
            new.key = key
            new.value = value
            node.children[self._child_key(key)] = new
            self.evictable_size += len(value)
        return total
