"""Conformance tests of the scatter-gather page form, mixed into ``BackendTests``.

A page may reach ``put``/``get_into`` as a sequence of buffers (the K and V regions of an
SGLang host-pool page, say). Whatever the split, it is one stored page: the bytes read back are
the regions back to back, whichever form wrote them and whichever form reads them, and its
stored size is that of the same page written as one buffer. A split whose sizes do not sum to
``page_bytes`` is a ``ValueError`` on ``put`` and a miss (``NOT_FOUND``, buffers untouched) on
``get_into``.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

from hicache.storage.backend import Backend, PageStatus
from hicache.testing.pages import CANARY

__all__ = ["ScatterGatherTests", "split_page"]


def split_page(buf: bytearray | bytes, cuts: Sequence[int]) -> list[memoryview]:
    """Views of ``buf`` cut at the byte offsets ``cuts`` (ascending): regions back to back."""
    view = memoryview(buf)
    bounds = [0, *cuts, view.nbytes]
    return [view[a:b] for a, b in itertools.pairwise(bounds)]


class ScatterGatherTests:
    """The scatter-gather form of ``put``/``get_into`` (see the module docstring)."""

    if TYPE_CHECKING:  # provided by BackendTests, which mixes this class in
        page_bytes: ClassVar[int]

        def keys(self, count: int, salt: str = "") -> list[str]: ...
        def page(self, key: str, variant: int = 0) -> bytes: ...
        def put_pages(
            self, backend: Backend, keys: Sequence[str], variant: int = 0
        ) -> list[PageStatus]: ...
        def read_pages(
            self, backend: Backend, keys: Sequence[str]
        ) -> tuple[list[PageStatus], list[bytearray]]: ...
        def corrupt_payload(self, backend: Backend, key: str) -> None: ...
        def _run_hook(self, hook: Any, backend: Backend, key: str) -> None: ...
        @staticmethod
        def _eventually(check: Callable[[], bool], message: str) -> None: ...

    def _cuts(self) -> list[list[int]]:
        half = self.page_bytes // 2
        # K|V halves (SGLang's page-first MHA page), an odd cut, three regions with an empty one.
        return [[half], [7], [4096 % self.page_bytes, half, half]]

    def test_scatter_gather_roundtrip(self, backend: Backend) -> None:
        for n, cuts in enumerate(self._cuts()):
            key, plain = self.keys(2, f"sg-roundtrip-{n}")
            src = bytearray(self.page(key))
            assert backend.put([key], [split_page(src, cuts)]) == [PageStatus.OK]
            assert self.put_pages(backend, [plain]) == [PageStatus.OK]
            # parts -> one buffer
            statuses, bufs = self.read_pages(backend, [key])
            assert statuses == [PageStatus.OK] and bufs[0] == self.page(key)
            # one buffer -> parts, and parts -> parts cut elsewhere
            for other in self._cuts():
                for k in (key, plain):
                    dst = bytearray([CANARY]) * self.page_bytes
                    assert backend.get_into([k], [split_page(dst, other)]) == [PageStatus.OK]
                    assert dst == self.page(k), f"regions cut at {other} came back wrong"

    def test_scatter_gather_batch_mixes_forms(self, backend: Backend) -> None:
        keys = self.keys(4, "sg-mixed")
        half = self.page_bytes // 2
        srcs: list[Any] = []
        for i, key in enumerate(keys):
            page = bytearray(self.page(key))
            srcs.append(memoryview(page) if i % 2 else tuple(split_page(page, [half])))
        assert backend.put(keys, srcs) == [PageStatus.OK] * 4
        assert backend.put(keys, srcs) == [PageStatus.ALREADY_EXISTS] * 4
        dsts = [bytearray(self.page_bytes) for _ in keys]
        views: list[Any] = [
            split_page(d, [half]) if i % 2 else memoryview(d) for i, d in enumerate(dsts)
        ]
        assert backend.get_into(keys, views) == [PageStatus.OK] * 4
        assert [bytes(d) for d in dsts] == [self.page(k) for k in keys]

    def test_scatter_gather_regions_of_any_item_format(self, backend: Backend) -> None:
        # Regions of a host pool arrive typed (a tensor's uint16 view); sizes count bytes.
        if self.page_bytes % 8:
            pytest.skip("page_bytes is not a multiple of 8")
        [key] = self.keys(1, "sg-format")
        src = bytearray(self.page(key))
        parts = [p.cast("H") for p in split_page(src, [self.page_bytes // 2])]
        assert backend.put([key], [parts]) == [PageStatus.OK]
        dst = bytearray(self.page_bytes)
        regions = [p.cast("I") for p in split_page(dst, [self.page_bytes // 4])]
        assert backend.get_into([key], [regions]) == [PageStatus.OK]
        assert dst == self.page(key)

    def test_scatter_gather_is_one_stored_page(self, backend: Backend) -> None:
        if not backend.capabilities.listable:
            pytest.skip("backend is not listable")
        split, plain = self.keys(2, "sg-one-page")
        assert backend.put([split], [split_page(bytearray(self.page(split)), [7])]) == [
            PageStatus.OK
        ]
        assert self.put_pages(backend, [plain]) == [PageStatus.OK]
        listed = {p.key: p.stored_bytes for p in backend.iter_pages()}
        assert listed[split] == listed[plain], "a split page is stored differently"

    def test_scatter_gather_wrong_total_size(self, backend: Backend) -> None:
        good, bad = self.keys(2, "sg-wrong-size")
        half = self.page_bytes // 2
        for delta in (-1, 1):
            wrong = [memoryview(bytearray(half)), memoryview(bytearray(half + delta))]
            with pytest.raises(ValueError, match="page_bytes"):
                backend.put([good, bad], [memoryview(self.page(good)), wrong])
        assert backend.exists([good, bad]) == [False, False], "a rejected put stored a page"
        assert self.put_pages(backend, [good, bad]) == [PageStatus.OK] * 2
        for delta in (-1, 1):
            short = bytearray([CANARY]) * (self.page_bytes + delta)
            right = bytearray([CANARY]) * self.page_bytes
            statuses = backend.get_into(
                [bad, good], [split_page(short, [half]), split_page(right, [half])]
            )
            assert statuses == [PageStatus.NOT_FOUND, PageStatus.OK]
            assert short.count(CANARY) == len(short), "a missized destination was written"
            assert right == self.page(good)

    def test_scatter_gather_corrupt_reported(self, backend: Backend) -> None:
        damaged, intact = self.keys(2, "sg-corrupt")
        half = self.page_bytes // 2
        srcs = [split_page(bytearray(self.page(k)), [half]) for k in (damaged, intact)]
        assert backend.put([damaged, intact], srcs) == [PageStatus.OK] * 2
        self._run_hook(self.corrupt_payload, backend, damaged)
        dsts = [bytearray(self.page_bytes) for _ in range(2)]
        statuses = backend.get_into([damaged, intact], [split_page(d, [half]) for d in dsts])
        assert statuses == [PageStatus.CORRUPT, PageStatus.OK]
        assert dsts[1] == self.page(intact)

    def test_scatter_gather_no_references_retained(self, backend: Backend) -> None:
        [key] = self.keys(1, "sg-refs")
        src, dst = bytearray(self.page(key)), bytearray(self.page_bytes)
        src_parts = split_page(src, [self.page_bytes // 2])
        dst_parts = split_page(dst, [self.page_bytes // 2])
        views = src_parts + dst_parts
        counts = [sys.getrefcount(v) for v in views]
        assert backend.put([key], [src_parts]) == [PageStatus.OK]
        assert backend.get_into([key], [dst_parts]) == [PageStatus.OK]
        self._eventually(
            lambda: [sys.getrefcount(v) for v in views] == counts,
            "the backend kept a reference to a region",
        )
