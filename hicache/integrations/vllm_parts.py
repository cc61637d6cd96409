"""The engine-free parts of :mod:`hicache.integrations.vllm` (no vLLM, no torch imported).

- :class:`TierOptions`     the tier kwargs of ``"secondary_tiers": [{...}]`` that are hicache's
- :func:`page_key`         vLLM ``OffloadKey`` (block hash + 4-byte group index) -> page key
- :func:`chunk_namespace`  the namespace of one engine's chunks (model, revision, KV layout,
                           chunk bytes, dtype, parallel layout)
- :func:`hash_stability`   whether vLLM's block hashes are the same in every process, and what
                           to set when they are not
- :class:`PrimaryRows`     the primary tier's rows as zero-copy page buffers for the I/O workers
- :class:`CallsLeft`       a job's result is reported only once every backend call returned
- ``METRICS``               the vLLM metric names the tier reports, with their documentation
- ``Checked`` / ``JobDone``  what the I/O workers hand back to the scheduler's thread
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hicache.errors import ConfigError
from hicache.integrations.common import check_one_source
from hicache.keys import NamespaceSpec, engine_namespace

__all__ = [
    "METRICS",
    "CallsLeft",
    "Checked",
    "ChunkLayout",
    "HashStability",
    "JobDone",
    "PrimaryRows",
    "TierOptions",
    "chunk_namespace",
    "hash_stability",
    "page_key",
]

#: Prefix of the bytes a page key hashes: a vLLM key never collides with another engine's.
_KEY_TAG = b"hicache/vllm-offload-key/v1\x00"
#: vLLM's hash algorithms whose per-process seed is random unless PYTHONHASHSEED is set.
NON_CRYPTO_HASH_ALGOS = frozenset({"xxhash", "xxhash_cbor"})


class TierOptions(BaseModel):
    """hicache's keys in one entry of ``secondary_tiers`` (vLLM pops ``type`` and
    ``module_path`` and reads ``locality``; ``backpressure`` goes to its detector)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: A hicache YAML file whose ``storage.tiers`` are the tiers.
    hicache_config: str | None = Field(default=None, min_length=1)
    #: The same mapping inline (``{"nvme": {"backend": "localdisk", "options": {...}}}``).
    tiers: dict[str, Any] | None = None
    #: The served model's identity in the namespace (default: vLLM's model name or path).
    model_name: str | None = Field(default=None, min_length=1)
    #: A revision or weights digest: pages of another revision are never read.
    model_revision: str = ""
    #: vLLM's own tier key (``LOCAL`` / ``REMOTE``), read by its tier filter.
    locality: str | None = None
    #: I/O worker threads for loads and for stores (loads never queue behind stores).
    load_workers: int = Field(default=2, ge=1, le=64)
    store_workers: int = Field(default=2, ge=1, le=64)
    #: How long a key found absent answers MISS before the tiers are asked again.
    absent_ttl_s: float = Field(default=2.0, ge=0, le=3600)
    #: Keys remembered as present (oldest forgotten first).
    known_keys: int = Field(default=1 << 20, ge=1)

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any], *, origin: str) -> TierOptions:
        """Validate the tier kwargs; a bad one raises ``ConfigError`` naming its path."""
        try:
            options = cls.model_validate(kwargs)
        except ValidationError as exc:
            lines = []
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"])
                got = f" (got {err['input']!r})" if err["type"] != "missing" else ""
                lines.append(f"{origin}.{where}: {err['msg']}{got}")
            raise ConfigError("\n".join(lines)) from None
        check_one_source(options.hicache_config, options.tiers, origin=origin)
        return options


def page_key(offload_key: bytes) -> str:
    """The page key of a vLLM ``OffloadKey``: 64 hex chars of SHA-256 over a tag and the key.

    The key is the block hash (32 bytes with SHA-256 hashing, 16 with xxhash) followed by the
    KV-cache group index; hashing it again gives every algorithm the fixed-length key every
    backend accepts. The model is not in it: it is in the namespace."""
    if not offload_key:
        raise ValueError("empty OffloadKey")
    return hashlib.sha256(_KEY_TAG + bytes(offload_key)).hexdigest()


@dataclass(frozen=True, slots=True)
class ChunkLayout:
    """What makes one engine's chunk bytes incompatible with another's (from vLLM's
    ``OffloadingConfig`` and the primary view)."""

    model: str
    revision: str
    dtype: str
    num_layers: int
    tokens_per_chunk: int
    chunk_bytes: int
    worker_bytes_per_block: int
    kv_cache_layout: str
    canonical: bool
    world_size: int
    tp_size: int
    pp_size: int
    parallelism_agnostic: bool


def chunk_namespace(layout: ChunkLayout) -> str:
    """The namespace of ``layout``'s chunks: two engines share pages only when every field
    that changes the bytes of a chunk agrees.

    vLLM's scheduler does not know heads and head size, only bytes: the chunk size (all
    workers' shares of a block, padded) and the bytes per worker and block stand in for them,
    next to the layer count, dtype and token count. A chunk holds every worker's share, so the
    namespace names the topology rather than one rank, unless vLLM certified the bytes as
    parallelism-agnostic."""
    agnostic = layout.parallelism_agnostic
    tp = 1 if agnostic else layout.tp_size
    pp = 1 if agnostic else layout.pp_size
    world = 1 if agnostic else layout.world_size
    shape = (
        f"vllm-offload/{layout.kv_cache_layout or 'default'}/"
        f"{'canonical' if layout.canonical else 'direct'}/chunk={layout.chunk_bytes}/"
        f"worker_block={layout.worker_bytes_per_block}/world={world}"
    )
    spec = NamespaceSpec(
        dtype=layout.dtype,
        num_layers=max(1, layout.num_layers),
        num_kv_heads=1,  # not known to the scheduler: the byte sizes above stand in
        head_dim=1,
        page_size=layout.tokens_per_chunk,
        layout=shape,
        tp_rank=0,
        tp_size=tp,
    )
    return engine_namespace(
        spec,
        engine="vllm",
        model_id=layout.model,
        revision=layout.revision,
        pp_rank=0,
        pp_size=pp,
    )


class HashStability(enum.Enum):
    """Whether vLLM's block hashes (hence page keys) agree across processes."""

    STABLE = "stable"
    #: A random per-process seed: keys are valid in this process only.
    PER_PROCESS = "per_process"
    #: Not known yet (the engine has not chosen its seed).
    UNKNOWN = "unknown"


def hash_stability(
    algo: str | None, pythonhashseed: str | None, seed: str | None = None, default_seed: str = ""
) -> HashStability:
    """Decide from vLLM's hash algorithm (``--prefix-caching-hash-algo``) and
    ``PYTHONHASHSEED``, or from the seed vLLM resolved (``seed`` against its fixed
    ``default_seed``) once it has: vLLM seeds its first block hash from PYTHONHASHSEED when
    set, from a fixed string for SHA-256, and from random bytes for xxhash."""
    if pythonhashseed is not None:
        return HashStability.STABLE
    if seed is not None:
        return HashStability.STABLE if seed == default_seed else HashStability.PER_PROCESS
    if algo is None:
        return HashStability.UNKNOWN
    return HashStability.PER_PROCESS if algo in NON_CRYPTO_HASH_ALGOS else HashStability.STABLE


UNSTABLE_HASH_HELP = (
    "vLLM hashes blocks with a random per-process seed (--prefix-caching-hash-algo {algo} "
    "without PYTHONHASHSEED), so another process can never find these pages and a restart "
    "orphans them; set PYTHONHASHSEED to the same value in every vLLM process sharing the "
    "tiers, or use --prefix-caching-hash-algo sha256"
)


class PrimaryRows:
    """The rows of vLLM's primary view, as the page buffers of the hicache I/O workers.

    ``page_view(c)`` is a zero-copy byte view of chunk ``c``. vLLM pins a job's chunks for the
    whole job, so holds are no-ops: a job is reported only after every backend call using its
    rows returned (:class:`CallsLeft`)."""

    def __init__(self, primary_kv_view: memoryview) -> None:
        shape, strides = primary_kv_view.shape, primary_kv_view.strides
        if shape is None or strides is None or len(shape) != 2:
            raise ValueError(f"expected a 2-D [num_chunks, chunk_bytes] view, got shape {shape}")
        self.num_chunks = int(shape[0])
        self.chunk_bytes = int(strides[0])
        self._flat = primary_kv_view.cast("B")

    @property
    def num_pages(self) -> int:
        """The rows (pages, to the workers) of the view."""
        return self.num_chunks

    def release_view(self) -> None:
        """Let go of the primary view (vLLM closes its mmap after the tiers shut down); a row
        view still referenced keeps it (then vLLM only logs that it could not close)."""
        with contextlib.suppress(BufferError):
            self._flat.release()

    def hold(self, pages: Iterable[int]) -> None:
        return None

    def release(self, pages: Iterable[int]) -> None:
        return None

    def page_view(self, page: int) -> memoryview:
        if not 0 <= page < self.num_chunks:
            raise IndexError(f"chunk {page} outside the primary view ({self.num_chunks})")
        start = page * self.chunk_bytes
        return self._flat[start : start + self.chunk_bytes]


class CallsLeft:
    """Counts a job's backend calls still running; ``report`` runs once, when the job's body
    finished (``done``) and every call added with ``add`` has returned (``drop``)."""

    __slots__ = ("_count", "_lock", "_report")

    def __init__(self, report: Callable[[], None]) -> None:
        self._count = 1
        self._lock = threading.Lock()
        self._report = report

    def add(self) -> Callable[[], None]:
        """One more call; returns its ``on_return``."""
        with self._lock:
            self._count += 1
        return self.drop

    def drop(self) -> None:
        with self._lock:
            self._count -= 1
            last = self._count == 0
        if last:
            self._report()

    done = drop


#: vLLM metric names reported through ``get_stats`` (all labelled by hicache tier), with their
#: documentation.
METRICS: dict[str, tuple[str, str]] = {
    "stored": (
        "vllm:kv_offload_hicache_stored_chunks",
        "Chunks stored (or already present) in a hicache tier.",
    ),
    "store_failed": (
        "vllm:kv_offload_hicache_store_failed_chunks",
        "Chunks a hicache tier did not store (failed, refused or dropped).",
    ),
    "loaded": (
        "vllm:kv_offload_hicache_loaded_chunks",
        "Chunks read from a hicache tier into vLLM's primary tier.",
    ),
    "load_failed": (
        "vllm:kv_offload_hicache_load_failed_chunks",
        "Chunks vLLM asked for that no hicache tier could read (misses).",
    ),
    "lookup_hits": (
        "vllm:kv_offload_hicache_lookup_hits",
        "Chunk lookups answered present by the hicache tiers.",
    ),
    "lookup_misses": (
        "vllm:kv_offload_hicache_lookup_misses",
        "Chunk lookups answered absent by the hicache tiers.",
    ),
}


@dataclass(frozen=True, slots=True)
class Checked:
    """An existence check of one request's keys: the first ``found`` are stored."""

    keys: list[bytes]
    found: int


@dataclass(slots=True)
class JobDone:
    """A finished store or load job, per key, filled in by its worker."""

    job_id: int
    load: bool
    keys: list[bytes]
    ok: list[bool]
    nbytes: int = 0
    seconds: float = 0.0
    #: Keys newly stored per tier name, and page keys the backend evicted per tier name.
    stored: dict[str, list[bytes]] = field(default_factory=dict)
    evicted: dict[str, list[str]] = field(default_factory=dict)
    #: Chunks counted per (``METRICS`` key, tier name).
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
