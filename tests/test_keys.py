"""Content hashes, namespaces and block ids: golden vectors, byte-exact definition, determinism."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hicache.keys import (
    HASH_LEN,
    ModelIdentity,
    NamespaceSpec,
    block_id,
    chain_hashes,
    parent_block_id,
    seed_hash,
    storage_key,
)
from hicache.storage.backend import check_key, check_namespace

GOLDEN = json.loads((Path(__file__).parent / "data" / "keys_golden.json").read_text("utf-8"))
IDENTITY = ModelIdentity("meta-llama/Llama-3.1-8B-Instruct")


def _ref_str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<I", len(raw)) + raw


def _ref_seed(identity: ModelIdentity) -> bytes:
    """The seed as the module docstring defines it, written independently with struct."""
    payload = (
        b"hicache/seed\x00"
        + struct.pack("<I", identity.hash_version)
        + _ref_str(identity.model_id)
        + _ref_str(identity.revision)
        + _ref_str(identity.tenant_salt)
    )
    return hashlib.sha256(payload).digest()


def _ref_chain(parent: bytes, tokens: list[int], page_size: int) -> list[bytes]:
    out = []
    for i in range(0, len(tokens), page_size):
        page = tokens[i : i + page_size]
        parent = hashlib.sha256(parent + struct.pack(f"<{len(page)}I", *page)).digest()
        out.append(parent)
    return out


def _identity(row: dict[str, object]) -> ModelIdentity:
    return ModelIdentity(
        str(row["model_id"]),
        str(row["revision"]),
        str(row["tenant_salt"]),
        int(row["hash_version"]),  # type: ignore[call-overload]
    )


@pytest.mark.parametrize("row", GOLDEN["seeds"], ids=lambda r: r["model_id"][:12])
def test_seed_matches_golden_and_definition(row: dict[str, object]) -> None:
    identity = _identity(row)
    assert seed_hash(identity).hex() == row["seed"]
    assert seed_hash(identity) == _ref_seed(identity)


@pytest.mark.parametrize("row", GOLDEN["chains"], ids=lambda r: f"ps{r['page_size']}")
def test_chain_matches_golden_and_definition(row: dict[str, object]) -> None:
    identity = _identity(GOLDEN["seeds"][row["identity"]])
    tokens: list[int] = row["tokens"]  # type: ignore[assignment]
    page_size: int = row["page_size"]  # type: ignore[assignment]
    hashes = chain_hashes(seed_hash(identity), tokens, page_size)
    assert [h.hex() for h in hashes] == row["hashes"]
    assert [block_id(h) for h in hashes] == row["block_ids"]
    assert hashes == _ref_chain(seed_hash(identity), tokens, page_size)


@pytest.mark.parametrize("row", GOLDEN["namespaces"], ids=lambda r: r["namespace"])
def test_namespace_matches_golden(row: dict[str, object]) -> None:
    fields = {k: v for k, v in row.items() if k != "namespace"}
    spec = NamespaceSpec(**fields)  # type: ignore[arg-type]
    assert spec.namespace() == row["namespace"]
    assert check_namespace(spec.namespace()) == spec.namespace()


def test_hashes_are_deterministic_across_processes() -> None:
    code = (
        "from hicache.keys import *;"
        "s = seed_hash(ModelIdentity('m', 'r', 'salt'));"
        "print(s.hex(), *[h.hex() for h in chain_hashes(s, list(range(12)), 4)],"
        " NamespaceSpec('bfloat16', 2, 2, 8, 4, tp_rank=1, tp_size=2).namespace())"
    )
    # Different hash seeds would expose any use of Python's randomised hash().
    outs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": str(seed), "PATH": ""},
        ).stdout.split()
        for seed in (1, 2)
    ]
    seed = seed_hash(ModelIdentity("m", "r", "salt"))
    here = [seed.hex(), *[h.hex() for h in chain_hashes(seed, list(range(12)), 4)]]
    here.append(NamespaceSpec("bfloat16", 2, 2, 8, 4, tp_rank=1, tp_size=2).namespace())
    assert outs[0] == outs[1] == here


@pytest.mark.parametrize("bad", [-1, 2**32, 2**40])
def test_tokens_out_of_uint32_range_raise(bad: int) -> None:
    seed = seed_hash(IDENTITY)
    with pytest.raises(ValueError, match=str(bad)):
        chain_hashes(seed, [1, bad], 2)
    with pytest.raises(ValueError, match=str(bad)):
        chain_hashes(seed, np.array([1, bad], dtype=np.int64), 2)


def test_uint32_extremes_are_accepted() -> None:
    seed = seed_hash(IDENTITY)
    assert chain_hashes(seed, [0, 2**32 - 1], 2) == _ref_chain(seed, [0, 2**32 - 1], 2)


def test_bad_arguments_raise() -> None:
    seed = seed_hash(IDENTITY)
    with pytest.raises(ValueError, match="multiple of page_size"):
        chain_hashes(seed, [1, 2, 3], 2)
    with pytest.raises(ValueError, match="32 bytes"):
        chain_hashes(seed[:16], [1, 2], 2)
    with pytest.raises(ValueError, match="page_size"):
        chain_hashes(seed, [1, 2], 0)
    with pytest.raises(ValueError, match="hash_version"):
        ModelIdentity("m", hash_version=2)
    with pytest.raises(ValueError, match="model_id"):
        ModelIdentity("")
    with pytest.raises(ValueError, match="tp_rank"):
        NamespaceSpec("bfloat16", 2, 2, 8, 4, tp_rank=2, tp_size=2)
    with pytest.raises(ValueError, match="num_layers"):
        NamespaceSpec("bfloat16", 0, 2, 8, 4)
    with pytest.raises(ValueError, match="32 bytes"):
        storage_key(b"\x00" * 8)


def test_empty_tokens_give_no_hashes() -> None:
    assert chain_hashes(seed_hash(IDENTITY), [], 4) == []


@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=48),
    page_size=st.sampled_from([1, 2, 4, 8]),
    cut=st.integers(0, 48),
)
def test_hashing_in_pieces_equals_hashing_at_once(
    tokens: list[int], page_size: int, cut: int
) -> None:
    tokens = tokens[: len(tokens) - len(tokens) % page_size]
    cut = min(cut, len(tokens)) // page_size * page_size
    seed = seed_hash(IDENTITY)
    whole = chain_hashes(seed, tokens, page_size)
    head = chain_hashes(seed, tokens[:cut], page_size)
    tail = chain_hashes(head[-1] if head else seed, tokens[cut:], page_size)
    assert head + tail == whole
    assert whole == _ref_chain(seed, tokens, page_size)
    assert chain_hashes(seed, np.array(tokens, dtype=np.uint32), page_size) == whole


def test_identity_fields_all_change_the_seed() -> None:
    base = ModelIdentity("m", "r", "s")
    variants = [
        ModelIdentity("m2", "r", "s"),
        ModelIdentity("m", "r2", "s"),
        ModelIdentity("m", "r", "s2"),
        ModelIdentity("m", "", "rs"),
        ModelIdentity("mr", "", "s"),
    ]  # length prefixes keep field boundaries apart
    seeds = {seed_hash(v) for v in variants} | {seed_hash(base)}
    assert len(seeds) == len(variants) + 1


def test_namespace_separates_incompatible_kv() -> None:
    base = NamespaceSpec("bfloat16", 4, 2, 8, 4)
    different = [
        NamespaceSpec("float16", 4, 2, 8, 4),
        NamespaceSpec("bfloat16", 5, 2, 8, 4),
        NamespaceSpec("bfloat16", 4, 3, 8, 4),
        NamespaceSpec("bfloat16", 4, 2, 16, 4),
        NamespaceSpec("bfloat16", 4, 2, 8, 8),
        NamespaceSpec("bfloat16", 4, 2, 8, 4, layout="layer_first"),
        NamespaceSpec("bfloat16", 4, 2, 8, 4, tp_rank=1, tp_size=2),
        NamespaceSpec("bfloat16", 4, 2, 8, 4, tp_rank=0, tp_size=2),
        NamespaceSpec("bfloat16", 4, 2, 8, 4, mla=True),
    ]
    names = {s.namespace() for s in different} | {base.namespace()}
    assert len(names) == len(different) + 1
    for name in names:
        check_namespace(name)


def test_mla_namespace_ignores_tp_rank_and_dtype_aliases_normalise() -> None:
    mla = [
        NamespaceSpec("bfloat16", 4, 1, 576, 64, tp_rank=r, tp_size=8, mla=True) for r in range(8)
    ]
    assert len({s.namespace() for s in mla}) == 1
    assert mla[0].namespace() == NamespaceSpec("bfloat16", 4, 1, 576, 64, mla=True).namespace()
    names = {
        NamespaceSpec(d, 4, 2, 8, 4).namespace() for d in ("bfloat16", "torch.bfloat16", "bf16")
    }
    assert len(names) == 1


def test_block_id_and_storage_key() -> None:
    assert block_id(b"\x00" * 7 + b"\x01" + b"\xff" * 24) == 1
    assert block_id(b"\xff" * 8 + b"\x00" * 24) == -1
    assert block_id(b"\x80" + b"\x00" * 31) == -(2**63)
    h = chain_hashes(seed_hash(IDENTITY), [1, 2], 2)[0]
    assert len(h) == HASH_LEN
    assert check_key(storage_key(h)) == h.hex()
    seed = seed_hash(IDENTITY)
    assert parent_block_id(seed, seed) is None
    assert parent_block_id(None, seed) is None
    assert parent_block_id(h, seed) == block_id(h)
