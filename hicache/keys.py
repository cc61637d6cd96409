"""Content hashes, storage namespaces and event ids for KV pages (no torch).

Primitives, one line each:

- ``seed_hash(identity)`` - the 32-byte hash that seeds every chain of one model identity.
- ``chain_hashes(parent, tokens, page_size)`` - ``h_i = sha256(h_{i-1} || page_i tokens as
  little-endian uint32)``, one 32-byte digest per page.
- ``block_id(h)`` - the event block id: the first 8 bytes of ``h`` as a signed big-endian int64.
- ``block_ids(hashes)`` - ``block_id`` of each 32-byte content hash, in one pass.
- ``storage_key(h)`` - the page key handed to backends: ``h.hex()`` (64 lowercase hex chars).
- ``NamespaceSpec.namespace()`` - the storage namespace: a fingerprint of everything that makes
  KV bytes incompatible (dtype, shape, page size, host layout, tensor-parallel rank and size).

Everything here is defined byte-exactly (golden vectors in ``tests/data/keys_golden.json``) and is
deterministic across processes and machines: no Python ``hash()``, no native byte order.

Byte-exact definitions (``u32`` is an unsigned 32-bit little-endian integer, ``str`` is UTF-8
encoded and prefixed with its byte length as ``u32``):

- seed: ``sha256(b"hicache/seed\\x00" || u32(hash_version) || str(model_id) || str(revision)
  || str(tenant_salt))``
- namespace: ``"kv-" + sha256(b"hicache/namespace\\x00" || u32(1) || str(dtype) ||
  u32(num_layers) || u32(num_kv_heads) || u32(head_dim) || u32(page_size) || str(layout) ||
  u32(mla) || u32(tp_rank) || u32(tp_size)).hexdigest()[:16]``, with ``tp_rank = 0`` and
  ``tp_size = 1`` for MLA models (their ranks hold identical KV, so they share pages).
- engine namespace (``engine_namespace``), for engines whose page keys carry no model identity
  (SGLang's): ``"kv-" + sha256(b"hicache/engine-namespace\x00" || u32(1) || str(base) ||
  str(engine) || str(model_id) || str(revision) || u32(pp_rank) || u32(pp_size)).hexdigest()[:16]``
  where ``base`` is ``NamespaceSpec.namespace()``.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "HASH_LEN",
    "HASH_VERSION",
    "ModelIdentity",
    "NamespaceSpec",
    "block_id",
    "block_ids",
    "chain_hashes",
    "engine_namespace",
    "parent_block_id",
    "seed_hash",
    "storage_key",
    "tokens_to_bytes",
]

HASH_LEN = 32
"""Length in bytes of every content hash (sha256)."""

HASH_VERSION = 1
"""The only hash format this module implements; part of the seed, so a new format never
collides with pages stored under an old one."""

_SEED_TAG = b"hicache/seed\x00"
_NAMESPACE_TAG = b"hicache/namespace\x00"
_NAMESPACE_FORMAT = 1
_ENGINE_NAMESPACE_TAG = b"hicache/engine-namespace\x00"
_U32_MAX = 0xFFFFFFFF
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}

# array('I') is the fastest stdlib path from Python ints to packed uint32 (a C loop with range
# checks); it uses native byte order, so big-endian hosts swap once per call.
_ARRAY_CODE = "I" if array("I").itemsize == 4 else "L"
if array(_ARRAY_CODE).itemsize != 4:
    raise ImportError("hicache.keys needs a 4-byte unsigned array type on this platform")
_BIG_ENDIAN = sys.byteorder == "big"


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


def _str(value: str) -> bytes:
    raw = value.encode("utf-8")
    return _u32(len(raw)) + raw


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """What seeds a hash chain: pages of different identities never share keys.

    ``tenant_salt`` separates tenants of one model (a LoRA adapter name, a cache salt); keep it
    empty for the shared base model.
    """

    model_id: str
    revision: str = ""
    tenant_salt: str = ""
    hash_version: int = HASH_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError(f"model_id must be a non-empty string, got {self.model_id!r}")
        for name in ("revision", "tenant_salt"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.hash_version != HASH_VERSION:
            raise ValueError(
                f"unsupported hash_version {self.hash_version!r}: this build implements "
                f"version {HASH_VERSION}"
            )


def seed_hash(identity: ModelIdentity) -> bytes:
    """Return the 32-byte seed (``h_{-1}``) of every chain for ``identity``."""
    payload = b"".join(
        (
            _SEED_TAG,
            _u32(identity.hash_version),
            _str(identity.model_id),
            _str(identity.revision),
            _str(identity.tenant_salt),
        )
    )
    return hashlib.sha256(payload).digest()


def tokens_to_bytes(tokens: Sequence[int]) -> bytes:
    """Pack token ids as little-endian uint32; raise ``ValueError`` for ids outside that range.

    Accepts any sequence of ints; numpy integer arrays take a vectorised path.
    """
    if type(tokens).__module__ == "numpy":
        return _numpy_tokens_to_bytes(tokens)
    try:
        packed = array(_ARRAY_CODE, tokens)
    except OverflowError as exc:
        bad = next((t for t in tokens if not 0 <= int(t) <= _U32_MAX), None)
        raise ValueError(f"token id {bad!r} is outside the uint32 range [0, {_U32_MAX}]") from exc
    if _BIG_ENDIAN:
        packed.byteswap()
    return packed.tobytes()


def _numpy_tokens_to_bytes(tokens: object) -> bytes:
    import numpy as np  # only reached when the caller already holds a numpy array

    arr = np.asarray(tokens)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"token ids must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > _U32_MAX):
        bad = arr[(arr < 0) | (arr > _U32_MAX)][0]
        raise ValueError(f"token id {int(bad)} is outside the uint32 range [0, {_U32_MAX}]")
    return bytes(arr.astype("<u4").tobytes())


def chain_hashes(parent: bytes, tokens: Sequence[int], page_size: int) -> list[bytes]:
    """Return one 32-byte content hash per page of ``tokens``, chained from ``parent``.

    ``parent`` is ``seed_hash(identity)`` for the first page of a sequence, else the hash of the
    page before ``tokens``. ``len(tokens)`` must be a multiple of ``page_size``. Hashing a
    sequence in pieces gives the same hashes as hashing it at once, which is why a split node
    only slices its hash list.
    """
    if len(parent) != HASH_LEN:
        raise ValueError(f"parent hash must be {HASH_LEN} bytes, got {len(parent)}")
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    if len(tokens) % page_size:
        raise ValueError(f"{len(tokens)} tokens is not a multiple of page_size {page_size}")
    raw = tokens_to_bytes(tokens)
    step = 4 * page_size
    out: list[bytes] = []
    prev = bytes(parent)
    sha256 = hashlib.sha256
    # One concatenation and one-shot sha256 per page: measurably cheaper than update() calls.
    for start in range(0, len(raw), step):
        prev = sha256(prev + raw[start : start + step]).digest()
        out.append(prev)
    return out


def block_id(h: bytes | str) -> int:
    """Return the event block id of a content hash, or of its page key (the hash in hex, see
    :func:`storage_key`): the hash's first 8 bytes as a signed int64."""
    if isinstance(h, str):
        h = bytes.fromhex(h[:16])
    if len(h) < 8:
        raise ValueError(f"content hash too short for a block id: {len(h)} bytes")
    return int.from_bytes(h[:8], "big", signed=True)


@functools.lru_cache(maxsize=64)
def _ids_struct(n: int) -> struct.Struct:
    # one signed big-endian int64 from the head of each of n 32-byte hashes
    return struct.Struct(">" + "q24x" * n)


def block_ids(hashes: Sequence[bytes]) -> list[int]:
    """``[block_id(h) for h in hashes]`` for 32-byte content hashes, decoded in one call."""
    if not hashes:
        return []
    raw = b"".join(hashes)
    if len(raw) != HASH_LEN * len(hashes):
        raise ValueError(f"content hashes must be {HASH_LEN} bytes each")
    return list(_ids_struct(len(hashes)).unpack(raw))


def parent_block_id(parent: bytes | None, seed: bytes) -> int | None:
    """Return the event parent id: ``None`` when ``parent`` is the chain seed (or absent)."""
    if parent is None or parent == seed:
        return None
    return block_id(parent)


def storage_key(h: bytes) -> str:
    """Return the page key a backend stores ``h`` under (64 lowercase hex chars)."""
    if len(h) != HASH_LEN:
        raise ValueError(f"content hash must be {HASH_LEN} bytes, got {len(h)}")
    return h.hex()


@dataclass(frozen=True, slots=True)
class NamespaceSpec:
    """Everything that makes stored KV bytes incompatible; ``namespace()`` fingerprints it.

    ``dtype`` is a torch dtype name (``"bfloat16"``, ``"torch.float16"`` and the aliases
    ``bf16``/``fp16`` normalise to the same namespace). ``layout`` names the host layout of a
    page's bytes. For MLA models ``tp_rank``/``tp_size`` do not enter the namespace: every rank
    holds the same latent KV, so one rank's pages serve all of them.
    """

    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    layout: str = "page_first"
    tp_rank: int = 0
    tp_size: int = 1
    mla: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "page_size", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 < value <= _U32_MAX:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.tp_rank, int) or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(
                f"tp_rank must be in [0, tp_size={self.tp_size}), got {self.tp_rank!r}"
            )
        if not self.dtype or not self.layout:
            raise ValueError(
                f"dtype and layout must be non-empty (got {self.dtype!r}, {self.layout!r})"
            )

    @property
    def canonical_dtype(self) -> str:
        """The dtype name as it enters the fingerprint (``torch.`` prefix and aliases removed)."""
        name = self.dtype.removeprefix("torch.").lower()
        return _DTYPE_ALIASES.get(name, name)

    def namespace(self) -> str:
        """Return ``"kv-<16 hex>"``, a valid backend namespace unique to this spec."""
        rank, size = (0, 1) if self.mla else (self.tp_rank, self.tp_size)
        payload = b"".join(
            (
                _NAMESPACE_TAG,
                _u32(_NAMESPACE_FORMAT),
                _str(self.canonical_dtype),
                _u32(self.num_layers),
                _u32(self.num_kv_heads),
                _u32(self.head_dim),
                _u32(self.page_size),
                _str(self.layout),
                _u32(int(self.mla)),
                _u32(rank),
                _u32(size),
            )
        )
        return "kv-" + hashlib.sha256(payload).hexdigest()[:16]


def engine_namespace(
    spec: NamespaceSpec,
    *,
    engine: str,
    model_id: str,
    revision: str = "",
    pp_rank: int = 0,
    pp_size: int = 1,
) -> str:
    """The namespace of pages whose keys an engine hashed without any model identity.

    SGLang's page keys are hashes of tokens alone, so the model (and its revision or weights
    digest) and the pipeline stage must enter the namespace instead: two models never read
    each other's pages, and neither do two stages holding different layers.
    """
    if not 0 <= pp_rank < pp_size <= _U32_MAX:
        raise ValueError(f"pp_rank must be in [0, pp_size={pp_size}), got {pp_rank!r}")
    payload = b"".join(
        (
            _ENGINE_NAMESPACE_TAG,
            _u32(1),
            _str(spec.namespace()),
            _str(engine),
            _str(model_id),
            _str(revision),
            _u32(pp_rank),
            _u32(pp_size),
        )
    )
    return "kv-" + hashlib.sha256(payload).hexdigest()[:16]
