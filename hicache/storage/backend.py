"""The storage plugin contract: everything a backend author needs, and nothing that needs torch.

A backend stores fixed-size pages of KV bytes under string keys, for one namespace. The cache
calls it from I/O worker threads, in batches, synchronously:

- ``exists(keys)``         which of these pages are stored
- ``exists_prefix(keys)``  how many leading pages are all stored (the chain stops at the first gap)
- ``put(keys, srcs)``      store pages, create-only: ``OK`` or ``ALREADY_EXISTS`` per key
- ``put_batches(batches)`` several puts in one call, as if one after another (optional hook
                           ``_put_batches`` writes them together)
- ``get_into(keys, dsts)`` read pages straight into caller-owned page buffers

A page's bytes come as one buffer or as a sequence of buffers (its regions in order, e.g. the K
and V regions of a host-pool page): either way it is one stored page with one header and one
checksum, written and read with scatter-gather I/O, never through a staging copy.
- ``delete(keys)``         forget pages (missing keys are not an error)
- ``stats()``              counters as plain data
- ``take_evicted()``       keys the backend dropped on its own since the last call
- ``open()`` / ``close()`` acquire and release resources; both idempotent

A plugin subclasses :class:`Backend`, implements the underscore hooks (``_open``, ``_close``,
``_exists``, ``_put``, ``_get_into``, ``_delete``), sets ``config_model`` to a
:class:`BackendConfig` subclass describing its options, and registers the class under the
``hicache.backends`` entry-point group. The public methods here validate arguments, enforce the
open/closed and read-only rules and count calls, so every backend behaves the same at the edges;
the hooks only ever see valid, non-empty batches on an open backend.
"""

from __future__ import annotations

import enum
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn, cast

from pydantic import BaseModel, ConfigDict

from hicache.errors import BackendClosedError, BackendReadOnlyError
from hicache.storage.redact import redact

__all__ = [
    "API_VERSION",
    "Backend",
    "BackendConfig",
    "BackendContext",
    "Capabilities",
    "PageBuffers",
    "PageParts",
    "PageStatus",
    "StoredPage",
    "check_key",
    "check_keys",
    "check_namespace",
]

#: Version of this contract. A plugin whose ``api_version`` differs is refused at load time.
API_VERSION = 1

#: A page key is the lowercase hex of a 32-byte content hash (see ``hicache.keys``).
PAGE_KEY_LEN = 64
_KEY_RE = re.compile(r"[0-9a-f]{64}\Z")
#: One page as a caller passes it: a single buffer, or its regions in order (scatter-gather).
PageBuffers = memoryview | Sequence[memoryview]
#: One page as the hooks receive it: its regions in order, at least one, none empty, summing to
#: ``page_bytes``. The single-buffer form arrives as a one-element tuple.
PageParts = tuple[memoryview, ...]

#: A namespace is a short lowercase identifier, safe as a path or object-key component.
_NAMESPACE_RE = re.compile(r"[0-9a-z][0-9a-z_-]{0,63}\Z")


class PageStatus(enum.Enum):
    """Outcome of one page in a batch call."""

    OK = "ok"
    #: ``put`` of a key already stored: counts as stored; the stored bytes were not changed.
    ALREADY_EXISTS = "already_exists"
    #: ``get_into`` of a key that is not stored; the destination buffer was not touched.
    NOT_FOUND = "not_found"
    #: The stored bytes failed verification; never copied into the cache, counted, logged once.
    #: Because ``put`` is create-only, a damaged page left in place makes every later ``put`` of
    #: its key ``ALREADY_EXISTS``: a backend that can should delete it and report the key through
    #: ``take_evicted()``, so the cache announces its removal and the next publish repairs it.
    CORRUPT = "corrupt"
    #: This page failed for another reason (I/O error, full disk, timeout of this page).
    FAILED = "failed"

    @property
    def stored(self) -> bool:
        """True when, after a ``put``, the page is stored (``OK`` or ``ALREADY_EXISTS``)."""
        return self is PageStatus.OK or self is PageStatus.ALREADY_EXISTS


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend claims; the tiers and the conformance kit read this instead of guessing."""

    #: Pages survive ``close()`` + ``open()`` (and a process restart).
    persistent: bool = False
    #: Other processes or machines can see the same pages (so there is no negative cache).
    shared: bool = False
    #: The backend bounds its own size and evicts on its own (reported by ``take_evicted``).
    manages_capacity: bool = False
    #: Largest batch the backend wants per call; the engine splits larger ones.
    max_batch: int = 1024
    #: Required alignment, in bytes, of buffer addresses for the fastest path (1 = any).
    alignment: int = 1
    #: ``iter_pages()`` / ``iter_namespaces()`` are implemented (storage operations need them).
    listable: bool = False
    #: Medium announced in ``BlockStored`` events when the tier config does not name one.
    default_medium: str = "DISK"
    #: ``exists``/``exists_prefix`` answer from this process's memory: no I/O, and never a
    #: wait behind another call (a put in flight included). The cache then looks chains up on
    #: its serving thread, without a hand-off to a worker and back. Claim it only when true:
    #: such a call is not bounded by the tier's deadline.
    memory_lookups: bool = False


@dataclass(frozen=True, slots=True)
class BackendContext:
    """Runtime facts the cache hands to every backend constructor (the same for every kind)."""

    #: Size of every page payload in bytes; every buffer passed to ``put``/``get_into`` has it.
    page_bytes: int
    #: Namespace of every key this instance sees: pages of other namespaces are invisible.
    namespace: str
    #: When true, ``put`` and ``delete`` raise :class:`~hicache.errors.BackendReadOnlyError`.
    read_only: bool = False
    #: Tensor-parallel rank and world size of the serving process (informational).
    rank: int = 0
    world_size: int = 1
    #: Name of the tier this instance serves, for logs and metrics.
    tier_name: str = ""

    def __post_init__(self) -> None:
        if self.page_bytes <= 0:
            raise ValueError(f"page_bytes must be positive, got {self.page_bytes}")
        check_namespace(self.namespace)


@dataclass(frozen=True, slots=True)
class StoredPage:
    """One entry of :meth:`Backend.iter_pages`: a key and the bytes it occupies in storage."""

    key: str
    stored_bytes: int
    #: Payload size of the page (its ``page_bytes``) when the backend knows it; ``None`` means
    #: ``stored_bytes - pageformat.HEADER_SIZE``. Backends whose stored size is not header plus
    #: payload (fixed slots, padding) should set it: ``hicache storage verify`` reads each page
    #: back through an instance with this ``page_bytes``.
    payload_bytes: int | None = None


class BackendConfig(BaseModel):
    """Base of every backend's options model.

    Subclass it with one field per option; unknown options are rejected (``extra="forbid"``) so a
    typo in YAML is an error at its path, not a silently ignored setting.

    Secrets never leave the instance: credential fields are :class:`pydantic.SecretStr`, the
    ``repr`` passes every value through :func:`hicache.storage.redact.redact` (URL userinfo,
    secret-looking mapping keys), and validation errors never carry the rejected input.
    """

    # pydantic's own error text echoes each rejected value; callers report errors through
    # registry.validation_messages, which shows only what redact() lets through.
    # allow_inf_nan: an infinite timeout or NaN size passes `gt=0` checks and overflows later.
    model_config = ConfigDict(
        extra="forbid", frozen=True, hide_input_in_errors=True, allow_inf_nan=False
    )

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, redact(value, name)


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid page key, else raise ``ValueError`` naming it."""
    if not isinstance(key, str) or _KEY_RE.match(key) is None:
        raise ValueError(f"invalid page key {key!r}: expected {PAGE_KEY_LEN} lowercase hex chars")
    return key


_HEX_DIGITS = b"0123456789abcdef"


def _check_keys(keys: Sequence[str]) -> None:
    """``check_key`` over a batch at C speed: presence checks must cost well under a microsecond
    per key, and a per-key regex costs about two. The per-key path runs only to name a bad key."""
    try:
        for key in keys:
            if len(key) != PAGE_KEY_LEN:
                raise ValueError(key)
        joined = "".join(keys).encode("ascii")  # TypeError for a non-str, ValueError non-ASCII
    except (TypeError, ValueError):
        joined = b"!"
    if joined.translate(None, _HEX_DIGITS):
        for key in keys:
            check_key(key)


def check_keys(keys: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the first invalid key of ``keys`` (fast when all are valid)."""
    _check_keys(keys)


def check_namespace(namespace: str) -> str:
    """Return ``namespace`` if it is valid, else raise ``ValueError`` naming it."""
    if not isinstance(namespace, str) or _NAMESPACE_RE.match(namespace) is None:
        raise ValueError(
            f"invalid namespace {namespace!r}: expected 1-64 chars of [0-9a-z_-], "
            "starting with a letter or digit"
        )
    return namespace


class Backend(ABC):
    """A storage backend: one L3 tier's pages for one namespace.

    Notes for implementers
    ----------------------
    - **One constructor for every kind**: ``Backend(config, context)``. It stores its arguments
      and does no I/O; connections, files and mappings are acquired in ``_open``.
    - **Thread safety**: every hook may be called concurrently from several worker threads. Use
      your own locks; the base class holds none around the hooks.
    - **Batches**: hooks receive non-empty lists of valid keys on an open backend; the public
      methods already checked lengths, key syntax and buffer sizes.
    - **Buffers**: each page reaches ``_put``/``_get_into`` as :data:`PageParts`, a tuple of
      C-contiguous ``memoryview`` regions owned by the caller whose sizes sum to
      ``context.page_bytes`` (one region for a caller's single buffer). Store them as one page
      (one header, one checksum over the regions in order), read from ``srcs`` and write into
      ``dsts`` directly (``pwritev``/``preadv``, piecewise copies; no staging copies in Python)
      and keep no reference to any region after returning. Regions arrive as flat views of
      unsigned bytes (format ``"B"``, one dimension), whatever the caller passed: slice them by
      bytes.
    - **Per-page problems are statuses**, whole-call failures are exceptions: a missing page is
      ``NOT_FOUND``, a page that fails verification is ``CORRUPT``; an endpoint that is down or a
      disk that vanished raises :class:`~hicache.errors.BackendError` (or a subclass). Translate
      your client library's exceptions at this boundary: none of them may escape.
    - **Deadlines**: bound every blocking call with a timeout of your own; the engine stops
      waiting after the tier's deadline and counts the call as a failure.
    """

    #: Contract version this class implements; must equal :data:`API_VERSION`.
    api_version: ClassVar[int] = API_VERSION
    #: The pydantic model of this backend's ``options``.
    config_model: ClassVar[type[BackendConfig]] = BackendConfig

    def __init__(self, config: BackendConfig, context: BackendContext) -> None:
        if not isinstance(config, self.config_model):
            raise TypeError(
                f"{type(self).__name__} expects a {self.config_model.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config = config
        self.context = context
        self._state_lock = threading.Lock()
        self._is_open = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def is_open(self) -> bool:
        """True between a successful ``open()`` and the next ``close()``."""
        return self._is_open

    def open(self) -> None:
        """Acquire resources (connect, create directories, map files). Idempotent.

        Raises :class:`~hicache.errors.BackendError` with a clear message when the storage cannot
        be used at all (a missing bucket, an unwritable root), naming the resource but never
        credentials.
        """
        with self._state_lock:
            if self._is_open:
                return
            self._open()
            self._is_open = True

    def close(self) -> None:
        """Release resources. Idempotent; after it every data call raises ``BackendClosedError``."""
        with self._state_lock:
            if not self._is_open:
                return
            self._is_open = False
            self._close()

    def __enter__(self) -> Backend:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    @abstractmethod
    def capabilities(self) -> Capabilities:
        """What this backend instance claims (may depend on its options)."""

    # ------------------------------------------------------------------ data calls

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Return, for each key, whether its page is stored.

        A ``True`` is a hint, not a promise: the page may vanish (eviction, another process)
        before a ``get_into``, which then reports ``NOT_FOUND``.
        """
        self._check_call(keys)
        if not keys:
            return []
        result = self._exists(keys)
        self._check_result_len("exists", result, keys)
        return result

    def exists_prefix(self, keys: Sequence[str]) -> int:
        """Return how many leading keys are all stored: the index of the first missing key.

        Backends that can stop at the first gap cheaply should override ``_exists_prefix``.
        """
        self._check_call(keys)
        if not keys:
            return 0
        n = self._exists_prefix(keys)
        if not 0 <= n <= len(keys):
            raise RuntimeError(f"{type(self).__name__}._exists_prefix returned {n} for {len(keys)}")
        return n

    def put(self, keys: Sequence[str], srcs: Sequence[PageBuffers]) -> list[PageStatus]:
        """Store ``srcs[i]`` under ``keys[i]``; return one status per key.

        ``srcs[i]`` is one buffer or a list/tuple of buffers stored back to back as one page.

        - **Create-only and idempotent**: a key that is already stored is left unchanged and
          reported ``ALREADY_EXISTS``. Both ``OK`` and ``ALREADY_EXISTS`` mean "stored".
        - **Atomic**: a concurrent reader sees either no page or the whole page; a put that fails
          (``FAILED``) leaves no visible key behind.
        - A backend that manages capacity may evict other pages to make room; it reports them
          through ``take_evicted()``.

        Raises ``ValueError`` before any I/O for mismatched lengths, bad keys or a page whose
        buffers do not sum to ``page_bytes``, and ``BackendReadOnlyError`` on a read-only
        instance.
        """
        pages = self._put_parts(keys, srcs)
        if not keys:
            return []
        result = self._put(keys, pages)
        self._check_result_len("put", result, keys)
        return result

    def put_batches(
        self, batches: Sequence[tuple[Sequence[str], Sequence[PageBuffers]]]
    ) -> list[list[PageStatus]]:
        """Several puts in one call, made as if one after another: each ``(keys, srcs)`` is a
        :meth:`put` of its own, with its own statuses. A backend that manages capacity makes
        room batch by batch, so a later batch may evict pages an earlier one stored (reported
        through ``take_evicted()`` like any eviction), and a key in two batches is stored by
        the first (``ALREADY_EXISTS`` in the second). Raises as :meth:`put` does, before any
        I/O of any batch.

        What it is for: a caller that queued several puts hands them over at once, and a
        backend that can writes them together (one file, one request) while its capacity
        decisions stay those of the puts one by one. The default makes one ``_put`` per batch.
        """
        checked = [(keys, self._put_parts(keys, srcs)) for keys, srcs in batches]
        full = [batch for batch in checked if batch[0]]  # the hook sees no empty batch
        results = self._put_batches(full) if full else []
        if len(results) != len(full):
            raise RuntimeError(
                f"{type(self).__name__}._put_batches returned {len(results)} results "
                f"for {len(full)} batches"
            )
        for (keys, _), result in zip(full, results, strict=True):
            self._check_result_len("put", result, keys)
        done = iter(results)
        return [next(done) if keys else [] for keys, _ in checked]

    def _put_parts(self, keys: Sequence[str], srcs: Sequence[PageBuffers]) -> list[PageParts]:
        """The checks of a put (keys, lengths, read-only, page sizes) and its pages' parts."""
        self._check_call(keys)
        if self.context.read_only:
            raise BackendReadOnlyError(f"tier {self.context.tier_name!r} is read-only")
        pages = self._page_parts(keys, srcs, writable=False)
        if None in pages:
            i = pages.index(None)
            size = sum(part.nbytes for part in _as_parts(srcs[i]))
            raise ValueError(
                f"page {i} has {size} bytes, expected page_bytes={self.context.page_bytes}"
            )
        return cast("list[PageParts]", pages)

    def get_into(self, keys: Sequence[str], dsts: Sequence[PageBuffers]) -> list[PageStatus]:
        """Read the page of ``keys[i]`` into ``dsts[i]``; return one status per key.

        ``dsts[i]`` is one buffer or a list/tuple of buffers filled back to back.

        - ``OK``: ``dsts[i]`` holds exactly the stored bytes, verified.
        - ``NOT_FOUND``: ``dsts[i]`` was not touched — unless the page was evicted or replaced by
          another writer while it was being copied out, in which case its contents are undefined
          (the cache uses only ``OK`` pages).
        - ``CORRUPT`` / ``FAILED``: the contents of ``dsts[i]`` are undefined; the cache never
          uses them.
        - A destination whose buffers do not sum to ``page_bytes`` cannot hold a page of this
          namespace: ``NOT_FOUND``, untouched, the backend not asked (so a caller whose page
          geometry drifted gets misses, not a crash).

        Raises ``ValueError`` before any I/O for mismatched lengths, bad keys or read-only
        buffers.
        """
        self._check_call(keys)
        pages = self._page_parts(keys, dsts, writable=True)
        if not keys:
            return []
        if None not in pages:  # every page can be asked for: the common case, no copies
            result = self._get_into(keys, cast("list[PageParts]", pages))
            self._check_result_len("get_into", result, keys)
            return result
        asked = [(i, parts) for i, parts in enumerate(pages) if parts is not None]
        out = [PageStatus.NOT_FOUND] * len(keys)
        if asked:
            some_keys = [keys[i] for i, _ in asked]
            some = self._get_into(some_keys, [parts for _, parts in asked])
            self._check_result_len("get_into", some, some_keys)
            for (i, _), status in zip(asked, some, strict=True):
                out[i] = status
        return out

    def delete(self, keys: Sequence[str]) -> None:
        """Forget the pages of ``keys``; keys that are not stored are ignored."""
        self._check_call(keys)
        if self.context.read_only:
            raise BackendReadOnlyError(f"tier {self.context.tier_name!r} is read-only")
        if keys:
            self._delete(keys)

    def stats(self) -> dict[str, Any]:
        """Counters and gauges as plain JSON-able data (never credentials)."""
        return {"open": self._is_open, **self._stats()}

    def take_evicted(self) -> list[str]:
        """Return the keys this backend dropped on its own since the last call, and forget them.

        "On its own" covers capacity evictions and pages deleted because they failed
        verification (see ``PageStatus.CORRUPT``); never keys removed by ``delete()``. Backends
        that never drop pages on their own return ``[]`` (the default).
        """
        return []

    # ------------------------------------------------------------------ optional listing

    def iter_pages(self) -> Iterator[StoredPage]:
        """Iterate over every page stored in this instance's namespace (``capabilities.listable``).

        Used by the storage operations (``hicache storage du|verify|purge``), never on the serving
        path. Raises ``BackendClosedError`` at the call (not at the first item) when the instance
        is not open, and ``NotImplementedError`` when the backend does not list.
        """
        self._check_call([])
        return self._iter_pages()

    def iter_namespaces(self) -> Iterator[str]:
        """Iterate over every namespace present in the underlying storage (``listable``); raises
        like :meth:`iter_pages`."""
        self._check_call([])
        return self._iter_namespaces()

    # ------------------------------------------------------------------ hooks to implement

    def _iter_pages(self) -> Iterator[StoredPage]:
        """Yield the namespace's pages (optional; called on an open instance). Default: none."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its pages")

    def _iter_namespaces(self) -> Iterator[str]:
        """Yield the namespaces present (optional; called on an open instance). Default: none."""
        raise NotImplementedError(f"{type(self).__name__} cannot list namespaces")

    @abstractmethod
    def _open(self) -> None:
        """Acquire resources; called once per ``open()`` on a closed instance."""

    @abstractmethod
    def _close(self) -> None:
        """Release resources; called once per ``close()`` on an open instance."""

    @abstractmethod
    def _exists(self, keys: Sequence[str]) -> list[bool]:
        """Implement :meth:`exists` for a non-empty batch."""

    def _exists_prefix(self, keys: Sequence[str]) -> int:
        """Implement :meth:`exists_prefix`; the default asks ``_exists`` in max-batch chunks."""
        step = max(1, self.capabilities.max_batch)
        done = 0
        for start in range(0, len(keys), step):
            flags = self._exists(keys[start : start + step])
            for present in flags:
                if not present:
                    return done
                done += 1
        return done

    def _put_batches(
        self, batches: Sequence[tuple[Sequence[str], Sequence[PageParts]]]
    ) -> list[list[PageStatus]]:
        """:meth:`put_batches` after its checks: one ``_put`` per batch, in order. Override to
        write the batches together; the result must be what the puts one by one would give."""
        return [self._put(keys, pages) for keys, pages in batches]

    @abstractmethod
    def _put(self, keys: Sequence[str], srcs: Sequence[PageParts]) -> list[PageStatus]:
        """Implement :meth:`put` for a non-empty, validated batch (pages as regions)."""

    @abstractmethod
    def _get_into(self, keys: Sequence[str], dsts: Sequence[PageParts]) -> list[PageStatus]:
        """Implement :meth:`get_into` for a non-empty, validated batch (pages as regions)."""

    @abstractmethod
    def _delete(self, keys: Sequence[str]) -> None:
        """Implement :meth:`delete` for a non-empty batch."""

    def _stats(self) -> Mapping[str, Any]:
        """Backend-specific counters merged into :meth:`stats`; default none."""
        return {}

    # ------------------------------------------------------------------ validation

    def _check_call(self, keys: Sequence[str]) -> None:
        if not self._is_open:
            raise BackendClosedError(
                f"{type(self).__name__} (tier {self.context.tier_name!r}) is not open"
            )
        _check_keys(keys)

    def _page_parts(
        self, keys: Sequence[str], bufs: Sequence[PageBuffers], *, writable: bool
    ) -> list[PageParts | None]:
        """Every page as its non-empty regions, ``None`` where the sizes do not sum to
        ``page_bytes``; raises for everything else a caller can get wrong."""
        if len(keys) != len(bufs):
            raise ValueError(f"{len(keys)} keys but {len(bufs)} buffers")
        want = self.context.page_bytes
        pages: list[PageParts | None] = []
        for i, buf in enumerate(bufs):
            parts = _as_parts(buf)
            total = 0
            flat = True
            for part in parts:
                if type(part) is not memoryview or not part.c_contiguous:
                    _refuse(i, parts, writable)
                if writable and part.readonly:
                    _refuse(i, parts, writable)
                total += part.nbytes
                flat = flat and part.ndim == 1 and part.format == "B"
            if total != want:
                pages.append(None)
            elif flat and len(parts) == 1:
                pages.append(parts)  # the common form: as it came, no new object
            else:
                pages.append(tuple(_flat(p) for p in parts if p.nbytes))
        return pages

    def _check_result_len(self, call: str, result: Sequence[object], keys: Sequence[str]) -> None:
        if len(result) != len(keys):
            raise RuntimeError(
                f"{type(self).__name__}.{call} returned {len(result)} results for {len(keys)} keys"
            )


def _refuse(i: int, parts: PageParts, writable: bool) -> NoReturn:
    """Raise for the first region of page ``i`` a hook cannot take, naming it."""
    for j, part in enumerate(parts):
        where = f"buffer {i}" if len(parts) == 1 else f"buffer {i} part {j}"
        if not isinstance(part, memoryview):
            raise TypeError(f"{where} is a {type(part).__name__}, expected a memoryview")
        if not part.c_contiguous:
            raise ValueError(f"{where} is not C-contiguous")
        if writable and part.readonly:
            raise ValueError(f"{where} is read-only but get_into writes into it")
    raise RuntimeError(f"buffer {i}: every region is usable")  # callers saw one that is not


def _flat(part: memoryview) -> memoryview:
    """``part`` as a one-dimensional view of unsigned bytes (the same view when it is one)."""
    return part if part.ndim == 1 and part.format == "B" else part.cast("B")


def _as_parts(buf: PageBuffers) -> PageParts:
    """A page's buffers as a tuple; a bare memoryview is the one-region form."""
    if isinstance(buf, memoryview):
        return (buf,)
    if isinstance(buf, list | tuple) and buf:
        return tuple(buf)
    raise TypeError(
        f"a page is a memoryview or a non-empty list/tuple of memoryviews, got {buf!r:.60}"
    )
