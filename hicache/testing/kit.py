"""The conformance kit: one test class every storage backend's test module subclasses.

Usage (a backend's ``tests/test_<kind>_conformance.py``)::

    from hicache.testing import BackendTests

    class TestLocalDisk(BackendTests):
        backend_cls = LocalDiskBackend

        @pytest.fixture
        def backend_options(self, tmp_path):
            return {"root": str(tmp_path)}

        def corrupt_payload(self, backend, key):   # optional raw hooks: bypass the backend and
            ...                                     # damage what it stored; tests that need a
                                                    # hook the subclass lacks are skipped

The kit reads ``backend.capabilities`` to skip what a backend does not claim (persistence,
listing). Test names are API: a subclass may override one to skip it knowingly, so names never
change once published. Buffers are plain ``bytearray``/``memoryview`` objects: no torch here.

Pages are filled with a pattern derived from their key (and a variant number), so any page that
comes back torn, shifted or belonging to another key is detected byte for byte.
"""

from __future__ import annotations

import functools
import gc
import itertools
import json
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from hicache.errors import BackendClosedError, BackendReadOnlyError
from hicache.storage.backend import (
    Backend,
    BackendContext,
    PageStatus,
    check_key,
)
from hicache.testing.kit_parts import ScatterGatherTests
from hicache.testing.pages import (
    CANARY,
    CANARY_WIDTH,
    canaries_intact,
    canary_buffer,
    kit_key,
    page_pattern,
)
from hicache.testing.statemachine import backend_state_machine
from hicache.testing.wait import wait_for

__all__ = ["CANARY", "BackendTests", "kit_key", "page_pattern"]

# Keys of one process run never collide with keys of the previous run stored by a persistent
# backend in a reused directory: the salt changes per process.
_RUN_SALT = f"{time.time_ns()}"
_namespace_counter = itertools.count()


class BackendTests(ScatterGatherTests):
    """Conformance tests for one backend class; subclass it in the backend's test module.

    Set ``backend_cls``, override the ``backend_options`` fixture, and implement the raw hooks
    (``corrupt_payload``, ``corrupt_header``, ``truncate_page``) where the stored bytes can be
    reached. Class variables tune the cost for slow backends.
    """

    pytestmark = [pytest.mark.conformance]

    #: The backend under test.
    backend_cls: ClassVar[type[Backend]]
    #: Payload size of every page; small pages keep the kit fast.
    page_bytes: ClassVar[int] = 16384
    #: Pages per batch in the "N pages" round trip.
    batch_pages: ClassVar[int] = 8
    #: Rounds each of the 8 threads runs in the concurrency tests.
    concurrency_rounds: ClassVar[int] = 20
    #: Steps per example of the state machine; examples come from the hypothesis profile.
    state_machine_steps: ClassVar[int] = 15
    #: Cap on hypothesis examples for the state machine (None: the active profile's).
    state_machine_examples: ClassVar[int | None] = None
    #: Batches above max_batch are skipped when max_batch exceeds this (too many pages).
    max_pages_above_max_batch: ClassVar[int] = 4097

    # ------------------------------------------------------------------ fixtures and helpers

    @pytest.fixture
    def backend_options(self, tmp_path: Any) -> dict[str, Any]:
        """Options of the backend under test; override (e.g. ``{"root": str(tmp_path)}``)."""
        return {}

    @pytest.fixture
    def backend(self, backend_options: dict[str, Any]) -> Iterator[Backend]:
        """An opened backend in namespace ``kit``; closed after the test."""
        instance = self.make_backend(backend_options)
        instance.open()
        try:
            yield instance
        finally:
            instance.close()

    def make_backend(
        self, options: dict[str, Any], *, namespace: str = "kit", read_only: bool = False
    ) -> Backend:
        """A new, unopened backend of ``backend_cls`` with ``options`` (validated by its model)."""
        config = self.backend_cls.config_model.model_validate(options)
        context = BackendContext(
            page_bytes=self.page_bytes,
            namespace=namespace,
            read_only=read_only,
            tier_name="kit",
        )
        return self.backend_cls(config, context)

    def corrupt_payload(self, backend: Backend, key: str) -> None:
        """Flip one stored payload byte of ``key``, bypassing the backend (optional hook)."""
        raise NotImplementedError

    def corrupt_header(self, backend: Backend, key: str) -> None:
        """Flip one stored header byte of ``key``, bypassing the backend (optional hook)."""
        raise NotImplementedError

    def truncate_page(self, backend: Backend, key: str) -> None:
        """Cut the stored page of ``key`` short, bypassing the backend (optional hook)."""
        raise NotImplementedError

    def keys(self, count: int, salt: str = "") -> list[str]:
        """``count`` distinct page keys, fresh for this process run."""
        return [kit_key(i, f"{_RUN_SALT}:{salt}") for i in range(count)]

    def page(self, key: str, variant: int = 0) -> bytes:
        """The kit's content for ``key`` (see :func:`page_pattern`)."""
        return page_pattern(key, self.page_bytes, variant)

    def put_pages(
        self, backend: Backend, keys: Sequence[str], variant: int = 0
    ) -> list[PageStatus]:
        """Store the kit's pattern for every key (from read-only sources)."""
        return backend.put(list(keys), [memoryview(self.page(k, variant)) for k in keys])

    def read_pages(
        self, backend: Backend, keys: Sequence[str]
    ) -> tuple[list[PageStatus], list[bytearray]]:
        """``get_into`` every key into fresh canary-filled buffers; return statuses and buffers."""
        bufs = [bytearray([CANARY]) * self.page_bytes for _ in keys]
        statuses = backend.get_into(list(keys), [memoryview(b) for b in bufs])
        return statuses, bufs

    def fresh_namespace(self, prefix: str = "kit") -> str:
        """A namespace no other test of this process used (``<prefix>-<n>``)."""
        return f"{prefix}-{next(_namespace_counter)}"

    def _run_hook(self, hook: Any, backend: Backend, key: str) -> None:
        try:
            hook(backend, key)
        except NotImplementedError:
            pytest.skip(f"{type(self).__name__} does not implement the raw hook {hook.__name__}")

    def _visible_to_another_instance(self, backend: Backend) -> bool:
        caps = backend.capabilities
        return caps.persistent or caps.shared

    # ------------------------------------------------------------------ basics

    def test_capabilities_are_sane(self, backend: Backend) -> None:
        caps = backend.capabilities
        assert caps.max_batch >= 1
        assert caps.alignment >= 1 and caps.alignment & (caps.alignment - 1) == 0
        assert isinstance(caps.default_medium, str) and caps.default_medium
        assert backend.is_open

    def test_roundtrip_empty_batch(self, backend: Backend) -> None:
        assert backend.put([], []) == []
        assert backend.get_into([], []) == []
        assert backend.exists([]) == []
        assert backend.exists_prefix([]) == 0
        backend.delete([])

    def test_roundtrip_single_page(self, backend: Backend) -> None:
        [key] = self.keys(1, "single")
        assert backend.exists([key]) == [False]
        assert self.put_pages(backend, [key]) == [PageStatus.OK]
        assert backend.exists([key]) == [True]
        statuses, bufs = self.read_pages(backend, [key])
        assert statuses == [PageStatus.OK]
        assert bufs[0] == self.page(key)

    def test_roundtrip_batch(self, backend: Backend) -> None:
        keys = self.keys(self.batch_pages, "batch")
        assert self.put_pages(backend, keys) == [PageStatus.OK] * len(keys)
        statuses, bufs = self.read_pages(backend, keys)
        assert statuses == [PageStatus.OK] * len(keys)
        for key, buf in zip(keys, bufs, strict=True):
            assert buf == self.page(key), f"page {key} came back with the wrong bytes"

    def test_roundtrip_above_max_batch(self, backend: Backend) -> None:
        count = backend.capabilities.max_batch + 1
        if count > self.max_pages_above_max_batch:
            pytest.skip(f"max_batch {count - 1} is too large to exceed cheaply")
        keys = self.keys(count, "above-max-batch")
        assert self.put_pages(backend, keys) == [PageStatus.OK] * count
        assert backend.exists(keys) == [True] * count
        assert backend.exists_prefix(keys) == count
        statuses, bufs = self.read_pages(backend, keys)
        assert statuses == [PageStatus.OK] * count
        bad = [k for k, b in zip(keys, bufs, strict=True) if b != self.page(k)]
        assert not bad, f"{len(bad)} pages came back wrong, first {bad[0]}"

    def test_put_accepts_read_only_sources(self, backend: Backend) -> None:
        [key] = self.keys(1, "ro-src")
        src = memoryview(self.page(key))  # bytes-backed: read-only
        assert src.readonly
        assert backend.put([key], [src]) == [PageStatus.OK]
        statuses, bufs = self.read_pages(backend, [key])
        assert statuses == [PageStatus.OK] and bufs[0] == self.page(key)

    def test_put_does_not_modify_source(self, backend: Backend) -> None:
        [key] = self.keys(1, "src-intact")
        src = bytearray(self.page(key))
        assert backend.put([key], [memoryview(src)]) == [PageStatus.OK]
        assert src == self.page(key)

    # ------------------------------------------------------------------ statuses

    def test_get_missing_leaves_destination_untouched(self, backend: Backend) -> None:
        present, missing = self.keys(2, "missing")
        assert self.put_pages(backend, [present]) == [PageStatus.OK]
        raw_missing, dst_missing = canary_buffer(self.page_bytes)
        _, dst_present = canary_buffer(self.page_bytes)
        statuses = backend.get_into([missing, present], [dst_missing, dst_present])
        assert statuses == [PageStatus.NOT_FOUND, PageStatus.OK]
        assert raw_missing.count(CANARY) == len(raw_missing), "NOT_FOUND touched its buffer"
        assert bytes(dst_present) == self.page(present)

    def test_put_is_create_only(self, backend: Backend) -> None:
        [key] = self.keys(1, "create-only")
        assert self.put_pages(backend, [key], variant=1) == [PageStatus.OK]
        assert self.put_pages(backend, [key], variant=2) == [PageStatus.ALREADY_EXISTS]
        assert self.put_pages(backend, [key], variant=1) == [PageStatus.ALREADY_EXISTS]
        statuses, bufs = self.read_pages(backend, [key])
        assert statuses == [PageStatus.OK]
        assert bufs[0] == self.page(key, variant=1), "a second put changed a stored page"

    def test_put_mixed_new_and_existing(self, backend: Backend) -> None:
        old, new = self.keys(2, "mixed")
        assert self.put_pages(backend, [old]) == [PageStatus.OK]
        assert self.put_pages(backend, [old, new]) == [PageStatus.ALREADY_EXISTS, PageStatus.OK]
        assert all(s.stored for s in self.put_pages(backend, [new, old]))

    def test_put_batches_are_puts_one_after_another(self, backend: Backend) -> None:
        a, b = self.keys(2, "batch-a"), self.keys(3, "batch-b")

        def views(keys: list[str]) -> list[memoryview]:
            return [memoryview(self.page(k)) for k in keys]

        ok, exists = PageStatus.OK, PageStatus.ALREADY_EXISTS
        # the third batch repeats a page of the first: stored by the first, met by the third
        got = backend.put_batches([(a, views(a)), ([], []), (b, views(b)), (a[:1], views(a[:1]))])
        assert got == [[ok, ok], [], [ok, ok, ok], [exists]]
        statuses, bufs = self.read_pages(backend, a + b)
        assert statuses == [ok] * 5
        assert bufs == [self.page(k) for k in a + b]
        # checked before any I/O: a bad page in a later batch stores nothing of the earlier
        c = self.keys(1, "batch-c")
        with pytest.raises(ValueError):
            backend.put_batches([(c, views(c)), (["not-a-key"], views(c))])
        assert backend.exists(c) == [False]

    def test_exists_and_exists_prefix_agree(self, backend: Backend) -> None:
        chain = self.keys(8, "prefix")
        stored = [chain[i] for i in (0, 1, 2, 4, 6)]
        assert all(s is PageStatus.OK for s in self.put_pages(backend, stored))
        flags = backend.exists(chain)
        assert flags == [key in stored for key in chain]
        assert backend.exists_prefix(chain) == 3
        assert backend.exists_prefix(chain[3:]) == 0
        assert backend.exists_prefix(chain[:3]) == 3
        rng = random.Random(7)
        for _ in range(10):
            sample = rng.sample(chain, rng.randint(1, len(chain)))
            flags = backend.exists(sample)
            expected = flags.index(False) if False in flags else len(flags)
            assert backend.exists_prefix(sample) == expected

    def test_delete(self, backend: Backend) -> None:
        keep, gone, never = self.keys(3, "delete")
        assert self.put_pages(backend, [keep, gone]) == [PageStatus.OK] * 2
        backend.delete([gone, never])
        assert backend.exists([keep, gone, never]) == [True, False, False]
        statuses, _ = self.read_pages(backend, [gone])
        assert statuses == [PageStatus.NOT_FOUND]
        # A deleted key can be stored again, with new content.
        assert self.put_pages(backend, [gone], variant=3) == [PageStatus.OK]
        statuses, bufs = self.read_pages(backend, [gone])
        assert statuses == [PageStatus.OK] and bufs[0] == self.page(gone, 3)

    def test_namespaces_are_isolated(self, backend: Backend, backend_options: Any) -> None:
        [key] = self.keys(1, "isolation")
        assert self.put_pages(backend, [key]) == [PageStatus.OK]
        other = self.make_backend(backend_options, namespace=self.fresh_namespace("other"))
        other.open()
        try:
            assert other.exists([key]) == [False]
            statuses, bufs = self.read_pages(other, [key])
            assert statuses == [PageStatus.NOT_FOUND]
            assert self.put_pages(other, [key], variant=5) == [PageStatus.OK]
        finally:
            other.close()
        statuses, bufs = self.read_pages(backend, [key])
        assert statuses == [PageStatus.OK] and bufs[0] == self.page(key)

    # ------------------------------------------------------------------ the buffer contract

    def test_destination_canaries_intact(self, backend: Backend) -> None:
        keys = self.keys(3, "canary")
        assert self.put_pages(backend, keys) == [PageStatus.OK] * 3
        align = max(backend.capabilities.alignment, CANARY_WIDTH)
        # An aligned view, an odd offset and the default width: the backend must stay in bounds.
        layouts = [canary_buffer(self.page_bytes, off) for off in (align, 7, CANARY_WIDTH)]
        statuses = backend.get_into(keys, [view for _, view in layouts])
        assert statuses == [PageStatus.OK] * 3
        for key, (raw, view), off in zip(keys, layouts, (align, 7, CANARY_WIDTH), strict=True):
            assert bytes(view) == self.page(key)
            assert canaries_intact(raw, off, self.page_bytes), "bytes written outside the page"

    def test_no_buffer_references_retained(self, backend: Backend) -> None:
        keys = self.keys(2, "refs")
        srcs_raw = [bytearray(self.page(k)) for k in keys]
        dsts_raw = [bytearray(self.page_bytes) for _ in keys]
        src_views = [memoryview(b) for b in srcs_raw]
        dst_views = [memoryview(b) for b in dsts_raw]
        views = src_views + dst_views
        counts = [sys.getrefcount(v) for v in views]
        assert backend.put(keys, src_views) == [PageStatus.OK] * 2
        assert backend.get_into(keys, dst_views) == [PageStatus.OK] * 2
        assert backend.exists(keys) == [True, True]
        self._eventually(
            lambda: [sys.getrefcount(v) for v in views] == counts,
            "the backend kept a reference to a caller's memoryview",
        )
        for view in views:
            view.release()
        for raw in srcs_raw + dsts_raw:
            self._eventually(
                functools.partial(self._resizable, raw),
                "a view of a caller buffer is still alive after the call returned",
            )

    @staticmethod
    def _resizable(raw: bytearray) -> bool:
        # A bytearray cannot be resized while any memoryview of it exists: a backend that kept a
        # slice or a derived view makes this fail.
        try:
            raw.append(0)
        except BufferError:
            return False
        raw.pop()
        return True

    @staticmethod
    def _eventually(check: Callable[[], bool], message: str) -> None:
        # A thread pool's worker drops its reference to a work item a moment after the future
        # completed, so the caller may run first: wait (a loaded machine may starve that worker
        # for a while), collecting cycles between looks, then fail.
        def collected_check() -> bool:
            gc.collect()
            return check()

        wait_for(collected_check, interval=0.01, what=message)

    def test_wrong_size_buffers_rejected_before_io(self, backend: Backend) -> None:
        good, bad = self.keys(2, "wrong-size")
        small = memoryview(bytearray(self.page_bytes - 1))
        big = memoryview(bytearray(self.page_bytes + 1))
        for wrong in (small, big):
            with pytest.raises(ValueError):
                backend.put([good, bad], [memoryview(self.page(good)), wrong])
        assert backend.exists([good, bad]) == [False, False], "a rejected put stored a page"
        assert self.put_pages(backend, [good]) == [PageStatus.OK]
        # A destination of another size cannot hold a page of this namespace: a miss, untouched.
        for wrong in (small, big):
            wrong[:] = bytes([CANARY]) * wrong.nbytes
            _raw, dst = canary_buffer(self.page_bytes)
            assert backend.get_into([good, good], [wrong, dst]) == [
                PageStatus.NOT_FOUND,
                PageStatus.OK,
            ]
            assert bytes(dst) == self.page(good)
            assert wrong.tobytes().count(CANARY) == wrong.nbytes, "a missized buffer was written"
        with pytest.raises(ValueError):
            backend.get_into([good], [memoryview(bytes(self.page_bytes))])  # read-only dst
        with pytest.raises(ValueError):
            backend.put([good, bad], [memoryview(self.page(good))])  # length mismatch

    def test_invalid_keys_rejected(self, backend: Backend) -> None:
        page = memoryview(bytes(self.page_bytes))
        for key in ("", "ABC", "g" * 64, "0" * 63, "0" * 65, "../" + "0" * 61):
            with pytest.raises(ValueError):
                check_key(key)
            with pytest.raises(ValueError):
                backend.put([key], [page])
            with pytest.raises(ValueError):
                backend.exists([key])

    # ------------------------------------------------------------------ lifecycle

    def test_open_close_idempotent(self, backend_options: Any) -> None:
        instance = self.make_backend(backend_options)
        assert instance.stats()["open"] is False
        instance.open()
        instance.open()
        assert instance.is_open
        [key] = self.keys(1, "idempotent")
        assert self.put_pages(instance, [key]) == [PageStatus.OK]
        instance.close()
        instance.close()
        assert instance.stats()["open"] is False
        instance.open()  # reopening a closed instance works
        try:
            assert instance.is_open
            if instance.capabilities.persistent:
                assert instance.exists([key]) == [True]
            else:
                assert instance.exists([key]) in ([True], [False])
        finally:
            instance.close()

    def test_use_before_open_and_after_close_raises(self, backend_options: Any) -> None:
        instance = self.make_backend(backend_options)
        [key] = self.keys(1, "closed")
        page = memoryview(self.page(key))
        dst = memoryview(bytearray(self.page_bytes))
        calls: list[Callable[[], object]] = [
            lambda: instance.exists([key]),
            lambda: instance.exists_prefix([key]),
            lambda: instance.put([key], [page]),
            lambda: instance.get_into([key], [dst]),
            lambda: instance.delete([key]),
            # Listing refuses at the call, listable or not: not at the first item.
            instance.iter_pages,
            instance.iter_namespaces,
        ]
        for call in calls:
            with pytest.raises(BackendClosedError):
                call()
        instance.open()
        instance.close()
        for call in calls:
            with pytest.raises(BackendClosedError):
                call()
        assert instance.stats()["open"] is False

    def test_persistence_across_reopen(self, backend: Backend, backend_options: Any) -> None:
        if not backend.capabilities.persistent:
            pytest.skip("backend does not claim persistence")
        keys = self.keys(3, "persist")
        assert self.put_pages(backend, keys) == [PageStatus.OK] * 3
        backend.close()
        reopened = self.make_backend(backend_options)
        reopened.open()
        try:
            assert reopened.exists_prefix(keys) == 3
            statuses, bufs = self.read_pages(reopened, keys)
            assert statuses == [PageStatus.OK] * 3
            assert [bytes(b) for b in bufs] == [self.page(k) for k in keys]
        finally:
            reopened.close()

    def test_read_only_refuses_writes(self, backend_options: Any) -> None:
        instance = self.make_backend(backend_options, read_only=True)
        instance.open()
        try:
            [key] = self.keys(1, "read-only")
            with pytest.raises(BackendReadOnlyError):
                instance.put([key], [memoryview(self.page(key))])
            with pytest.raises(BackendReadOnlyError):
                instance.delete([key])
            assert instance.exists([key]) == [False]
            statuses, _ = self.read_pages(instance, [key])
            assert statuses == [PageStatus.NOT_FOUND]
        finally:
            instance.close()

    def test_read_only_reads_existing_pages(self, backend: Backend, backend_options: Any) -> None:
        if not self._visible_to_another_instance(backend):
            pytest.skip("pages of one instance are invisible to another (not persistent/shared)")
        keys = self.keys(2, "read-only-reads")
        assert self.put_pages(backend, keys) == [PageStatus.OK] * 2
        reader = self.make_backend(backend_options, read_only=True)
        reader.open()
        try:
            assert reader.exists_prefix(keys) == 2
            statuses, bufs = self.read_pages(reader, keys)
            assert statuses == [PageStatus.OK] * 2
            assert [bytes(b) for b in bufs] == [self.page(k) for k in keys]
            with pytest.raises(BackendReadOnlyError):
                reader.delete(keys)
        finally:
            reader.close()
        assert backend.exists(keys) == [True, True]

    def test_stats_are_plain_data(self, backend: Backend) -> None:
        [key] = self.keys(1, "stats")
        self.put_pages(backend, [key])
        self.read_pages(backend, [key])
        stats = backend.stats()
        assert stats["open"] is True
        json.dumps(stats)  # JSON-able: no objects, no bytes

    def test_take_evicted_drains(self, backend: Backend) -> None:
        first = backend.take_evicted()
        assert isinstance(first, list) and all(isinstance(k, str) for k in first)
        assert backend.take_evicted() == []

    def test_listing(self, backend: Backend) -> None:
        if not backend.capabilities.listable:
            pytest.skip("backend is not listable")
        keys = self.keys(3, "listing")
        self.put_pages(backend, keys)
        listed = {page.key: page.stored_bytes for page in backend.iter_pages()}
        assert set(keys) <= set(listed)
        assert all(listed[k] >= self.page_bytes for k in keys)
        assert backend.context.namespace in set(backend.iter_namespaces())

    # ------------------------------------------------------------------ corruption

    def _check_damage_reported(self, backend: Backend, hook: Any) -> None:
        damaged, intact = self.keys(2, f"damage-{hook.__name__}")
        assert self.put_pages(backend, [damaged, intact]) == [PageStatus.OK] * 2
        self._run_hook(hook, backend, damaged)
        statuses, bufs = self.read_pages(backend, [damaged, intact])
        assert statuses[0] is PageStatus.CORRUPT, f"damaged page reported {statuses[0]}"
        assert statuses[1] is PageStatus.OK and bufs[1] == self.page(intact)

    def test_corrupt_payload_reported(self, backend: Backend) -> None:
        self._check_damage_reported(backend, self.corrupt_payload)

    def test_corrupt_header_reported(self, backend: Backend) -> None:
        self._check_damage_reported(backend, self.corrupt_header)

    def test_truncated_page_reported(self, backend: Backend) -> None:
        self._check_damage_reported(backend, self.truncate_page)

    # ------------------------------------------------------------------ concurrency

    def _hammer(self, backend: Backend, keys: list[str]) -> dict[str, set[int]]:
        """8 threads put and get overlapping batches; return the variants seen per key."""
        threads = 8
        barrier = threading.Barrier(threads)
        errors: list[BaseException] = []
        seen: dict[str, set[int]] = {k: set() for k in keys}
        seen_lock = threading.Lock()
        heads = {self.page(k, v)[:32]: v for k in keys for v in range(threads)}

        def worker(tid: int) -> None:
            rng = random.Random(tid)
            try:
                barrier.wait()
                for _ in range(self.concurrency_rounds):
                    batch = rng.sample(keys, 4)
                    if rng.random() < 0.5:
                        statuses = self.put_pages(backend, batch, variant=tid)
                        assert all(s.stored for s in statuses), statuses
                    else:
                        statuses, bufs = self.read_pages(backend, batch)
                        for key, status, buf in zip(batch, statuses, bufs, strict=True):
                            if status is PageStatus.NOT_FOUND:
                                assert buf.count(CANARY) == len(buf)
                                continue
                            assert status is PageStatus.OK, f"{key}: {status}"
                            variant = heads.get(bytes(buf[:32]))
                            assert variant is not None and buf == self.page(key, variant), (
                                f"torn or foreign page under {key}"
                            )
                            with seen_lock:
                                seen[key].add(variant)
            except BaseException as exc:
                errors.append(exc)

        pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        if errors:
            raise errors[0]
        return seen

    def test_concurrent_puts_and_gets_no_torn_pages(self, backend: Backend) -> None:
        keys = self.keys(24, "threads")
        self._hammer(backend, keys)
        statuses, bufs = self.read_pages(backend, keys)
        for key, status, buf in zip(keys, statuses, bufs, strict=True):
            if status is PageStatus.OK:
                assert any(buf == self.page(key, v) for v in range(8)), f"torn page {key}"
            else:
                assert status is PageStatus.NOT_FOUND, f"{key}: {status}"

    def test_concurrent_puts_keep_first_writer(self, backend: Backend) -> None:
        keys = self.keys(24, "first-writer")
        seen = self._hammer(backend, keys)
        flipped = {k: v for k, v in seen.items() if len(v) > 1}
        assert not flipped, f"create-only broken: readers saw several versions of {flipped}"

    # ------------------------------------------------------------------ stateful model test

    def test_state_machine(self, backend_options: Any) -> None:
        machine = backend_state_machine(self, backend_options)
        overrides: dict[str, Any] = {
            "stateful_step_count": self.state_machine_steps,
            "deadline": None,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
        }
        if self.state_machine_examples is not None:
            overrides["max_examples"] = self.state_machine_examples
        run_state_machine_as_test(machine, settings=settings(settings.default, **overrides))
