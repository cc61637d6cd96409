"""MemoryBackend: the reference backend, pages in a process-local dictionary.

It is the simplest complete implementation of the contract in :mod:`hicache.storage.backend`:
read it first when writing a backend. Pages carry the same versioned header as on disk
(:mod:`hicache.storage.pageformat`), so reads are verified the same way and the conformance kit can
corrupt stored bytes and watch them come back ``CORRUPT``.

Options (``storage.tiers.<name>.options``):

- ``capacity``     optional size (``"2GiB"``); beyond it pages are evicted (by ``eviction``) and
                   reported by ``take_evicted()``. Unset: unbounded.
- ``eviction``     which pages go first at capacity: ``predicted_reuse`` (default) or ``lru``
                   (:class:`~hicache.storage.eviction.EvictionPolicy`).
- ``shared_name``  optional; instances with the same name in one process share one store (each
                   still sees only its own namespace), e.g. two caches sharing a tier in a test.
                   A named store lives until :meth:`MemoryBackend.drop_shared_store`.
- ``verify``       check the payload checksum on every read (default true).
- ``max_batch``    the batch size the engine should use.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

from pydantic import Field, field_validator

from hicache.errors import (
    BackendCapacityError,
    BackendClosedError,
    PageCorruptError,
    PageVersionError,
)
from hicache.storage.backend import (
    Backend,
    BackendConfig,
    BackendContext,
    Capabilities,
    PageParts,
    PageStatus,
    StoredPage,
)
from hicache.storage.buffers import copy_and_hash, copy_bytes
from hicache.storage.eviction import (
    DEFAULT_EVICTION,
    CapacityPolicy,
    EvictionPolicy,
    make_capacity_policy,
)
from hicache.storage.pageformat import check_checksum, encode_header, verify_page
from hicache.storage.sizes import Size

__all__ = ["MemoryBackend", "MemoryConfig"]

logger = logging.getLogger(__name__)


class MemoryConfig(BackendConfig):
    """Options of the ``memory`` backend."""

    capacity: Size | None = Field(
        default=None, description="byte budget (headers included); unset = unbounded"
    )
    shared_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="instances with the same name in one process share one store",
    )
    eviction: EvictionPolicy = Field(
        default=DEFAULT_EVICTION,
        description="which pages go first at capacity: predicted_reuse (least likely to be "
        "read again, learned online) or lru",
    )
    verify: bool = Field(default=True, description="verify the payload checksum on every read")
    max_batch: int = Field(default=256, ge=1, le=65536, description="preferred batch size")

    @field_validator("capacity")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError(f"capacity must be positive, got {value}")
        return value


class _Page:
    """One stored page: its header and payload, both mutable only for the kit's raw hooks."""

    __slots__ = ("header", "payload")

    def __init__(self, header: bytearray, payload: bytearray) -> None:
        self.header = header
        self.payload = payload

    @property
    def stored_bytes(self) -> int:
        return len(self.header) + len(self.payload)


class _Store:
    """Pages of every namespace of one store, and the open instances to tell about evictions."""

    def __init__(
        self,
        capacity: int | None,
        eviction: EvictionPolicy = DEFAULT_EVICTION,
        batch: int | None = None,
    ) -> None:
        self.lock = threading.Lock()
        self.pages: dict[str, dict[str, _Page]] = {}
        # Policy keys are "namespace/key": one budget covers every namespace of the store.
        self.policy: CapacityPolicy | None = (
            make_capacity_policy(eviction, capacity, batch=batch) if capacity is not None else None
        )
        self.capacity = capacity
        self.listeners: dict[str, set[MemoryBackend]] = {}

    def namespace(self, namespace: str) -> dict[str, _Page]:
        return self.pages.setdefault(namespace, {})


_shared_lock = threading.Lock()
_shared_stores: dict[str, _Store] = {}


class MemoryBackend(Backend):
    """Pages in process memory; thread-safe, create-only, verified on read.

    Not persistent: a private store disappears at ``close()``; a named (``shared_name``) store
    outlives its instances but not the process.
    """

    config_model: ClassVar[type[BackendConfig]] = MemoryConfig

    def __init__(self, config: BackendConfig, context: BackendContext) -> None:
        super().__init__(config, context)
        if not isinstance(config, MemoryConfig):  # the base class checked; this narrows the type
            raise TypeError(f"MemoryBackend expects a MemoryConfig, got {type(config).__name__}")
        self._cfg = config
        self._ns = context.namespace
        self._store: _Store | None = None
        self._evicted: list[str] = []
        self._counters_lock = threading.Lock()
        self._counters = dict.fromkeys(
            ("hits", "misses", "corrupt", "unknown_version", "puts", "evictions"), 0
        )

    @classmethod
    def drop_shared_store(cls, shared_name: str) -> bool:
        """Forget the named store (its pages go when no open instance uses it); True if known."""
        with _shared_lock:
            return _shared_stores.pop(shared_name, None) is not None

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            persistent=False,
            shared=self._cfg.shared_name is not None,
            manages_capacity=self._cfg.capacity is not None,
            max_batch=self._cfg.max_batch,
            alignment=1,
            listable=True,
            default_medium="CPU",
        )

    # ------------------------------------------------------------------ lifecycle

    def _open(self) -> None:
        name = self._cfg.shared_name
        store: _Store
        if name is None:
            store = _Store(self._cfg.capacity, self._cfg.eviction, self._cfg.max_batch)
        else:
            with _shared_lock:
                known = _shared_stores.get(name)
                store = (
                    known
                    if known is not None
                    else _Store(self._cfg.capacity, self._cfg.eviction, self._cfg.max_batch)
                )
                _shared_stores[name] = store
            if store.capacity != self._cfg.capacity:
                raise BackendCapacityError(
                    f"memory store {name!r} exists with capacity {store.capacity}, "
                    f"this tier asks for {self._cfg.capacity}"
                )
        with store.lock:
            store.listeners.setdefault(self._ns, set()).add(self)
        self._store = store

    def _close(self) -> None:
        store = self._store
        if store is None:
            return
        with store.lock:
            store.listeners.get(self._ns, set()).discard(self)
        self._store = None

    def _require_store(self) -> _Store:
        store = self._store
        if store is None:  # only reachable by a close() racing a data call
            raise BackendClosedError(f"memory tier {self._tier!r} was closed during a call")
        return store

    # ------------------------------------------------------------------ data calls

    def _exists(self, keys: Sequence[str]) -> list[bool]:
        store = self._require_store()
        with store.lock:
            pages = store.pages.get(self._ns, {})
            return [key in pages for key in keys]

    def _exists_prefix(self, keys: Sequence[str]) -> int:
        store = self._require_store()
        with store.lock:
            pages = store.pages.get(self._ns, {})
            for i, key in enumerate(keys):
                if key not in pages:
                    return i
            return len(keys)

    def _put(self, keys: Sequence[str], srcs: Sequence[PageParts]) -> list[PageStatus]:
        store = self._require_store()
        # Build whole pages before taking the lock: a reader can only ever find a complete page.
        with store.lock:
            pages = store.namespace(self._ns)
            fresh_idx = [i for i, key in enumerate(keys) if key not in pages]
        # bytearray(src) copies into fresh, unzeroed memory in one pass (join: region by
        # region); a GIL-free copy (buffers.copy_and_hash) needs a zeroed buffer first and
        # measured no faster.
        fresh = {
            i: _Page(
                bytearray(encode_header(self._ns, keys[i], srcs[i])),
                bytearray(srcs[i][0]) if len(srcs[i]) == 1 else bytearray().join(srcs[i]),
            )
            for i in fresh_idx
        }
        statuses: list[PageStatus] = []
        evicted: list[str] = []
        with store.lock:
            pages = store.namespace(self._ns)
            admitted: dict[int, _Page] = {}
            taken: set[str] = set()  # a key repeated within the batch is stored once
            budget = store.capacity
            used = 0
            for i, key in enumerate(keys):
                page = fresh.get(i)
                if key in pages or key in taken or page is None:
                    # Stored meanwhile by another thread (or before): create-only, keep theirs.
                    statuses.append(PageStatus.ALREADY_EXISTS)
                elif budget is not None and used + page.stored_bytes > budget:
                    # Only a prefix of the chain fits: dropping the tail keeps it prefix-closed.
                    statuses.append(PageStatus.FAILED)
                else:
                    admitted[i] = page
                    taken.add(key)
                    used += page.stored_bytes
                    statuses.append(PageStatus.OK)
            if store.policy is not None:
                stored = [i for i, s in enumerate(statuses) if s is PageStatus.ALREADY_EXISTS]
                store.policy.touch([self._qualify(keys[i]) for i in stored])
                evicted = store.policy.evict_for(used)
                self._drop_locked(store, evicted)
            for i, page in admitted.items():
                pages[keys[i]] = page
            if store.policy is not None:
                # the pages stored before were touched above: adding them again would count
                # a second use (as localdisk, only the new pages are added)
                kept = [i for i in admitted if keys[i] in pages]
                store.policy.add(
                    [self._qualify(keys[i]) for i in kept],
                    [pages[keys[i]].stored_bytes for i in kept],
                )
        self._count(puts=len(admitted), evictions=len(evicted))
        return statuses

    def _get_into(self, keys: Sequence[str], dsts: Sequence[PageParts]) -> list[PageStatus]:
        store = self._require_store()
        with store.lock:
            pages = store.pages.get(self._ns, {})
            found = [pages.get(key) for key in keys]
            if store.policy is not None:
                store.policy.touch(
                    [self._qualify(k) for k, p in zip(keys, found, strict=True) if p]
                )
        # Pages are never modified once stored, so they are read outside the lock.
        statuses: list[PageStatus] = []
        hits = misses = corrupt = unknown = 0
        for key, page, dst in zip(keys, found, dsts, strict=True):
            if page is None:
                statuses.append(PageStatus.NOT_FOUND)
                misses += 1
                continue
            try:
                header = verify_page(
                    page.header, page.payload, namespace=self._ns, key=key, check_payload=False
                )
                # One pass, GIL released: the payload is hashed as it lands in ``dst``.
                payload = memoryview(page.payload)
                if not self._cfg.verify:
                    copy_bytes(dst, payload)
                else:
                    check_checksum(header, copy_and_hash(dst, payload, hash_dst=True))
            except PageCorruptError as exc:
                logger.warning("memory tier %r: page %s is corrupt: %s", self._tier, key, exc)
                statuses.append(PageStatus.CORRUPT)
                corrupt += 1
                continue
            except PageVersionError as exc:
                # A newer writer's page (only planted bytes here): a miss, and it stays.
                (logger.debug if unknown else logger.warning)(
                    "memory tier %r: page %s: %s; a miss", self._tier, key, exc
                )
                statuses.append(PageStatus.NOT_FOUND)
                unknown += 1
                continue
            statuses.append(PageStatus.OK)
            hits += 1
        self._count(hits=hits, misses=misses, corrupt=corrupt, unknown_version=unknown)
        return statuses

    def _delete(self, keys: Sequence[str]) -> None:
        store = self._require_store()
        with store.lock:
            pages = store.pages.get(self._ns, {})
            for key in keys:
                if pages.pop(key, None) is not None and store.policy is not None:
                    store.policy.remove(self._qualify(key))

    def take_evicted(self) -> list[str]:
        with self._counters_lock:
            evicted, self._evicted = self._evicted, []
        return evicted

    def _stats(self) -> Mapping[str, Any]:
        store = self._store
        pages = stored = 0
        if store is not None:
            with store.lock:
                ns_pages = store.pages.get(self._ns, {})
                pages = len(ns_pages)
                stored = sum(p.stored_bytes for p in ns_pages.values())
        with self._counters_lock:
            counters = dict(self._counters)
        return {"pages": pages, "stored_bytes": stored, "capacity": self._cfg.capacity, **counters}

    # ------------------------------------------------------------------ listing

    def _iter_pages(self) -> Iterator[StoredPage]:
        store = self._require_store()
        with store.lock:
            snapshot = [
                StoredPage(key, page.stored_bytes, payload_bytes=len(page.payload))
                for key, page in store.pages.get(self._ns, {}).items()
            ]
        yield from snapshot

    def _iter_namespaces(self) -> Iterator[str]:
        store = self._require_store()
        with store.lock:
            names = sorted(ns for ns, pages in store.pages.items() if pages)
        yield from names

    # ------------------------------------------------------------------ internals

    @property
    def _tier(self) -> str:
        return self.context.tier_name

    def _qualify(self, key: str) -> str:
        return f"{self._ns}/{key}"

    def _drop_locked(self, store: _Store, victims: list[str]) -> None:
        """Remove evicted pages (policy keys) and tell every open instance of their namespace."""
        by_ns: dict[str, list[str]] = {}
        for victim in victims:
            ns, _, key = victim.partition("/")
            if store.pages.get(ns, {}).pop(key, None) is not None:
                by_ns.setdefault(ns, []).append(key)
        for ns, keys in by_ns.items():
            for listener in store.listeners.get(ns, ()):
                listener._note_evicted(keys)

    def _note_evicted(self, keys: list[str]) -> None:
        with self._counters_lock:
            self._evicted.extend(keys)

    def _count(self, **deltas: int) -> None:
        with self._counters_lock:
            for name, delta in deltas.items():
                self._counters[name] += delta
