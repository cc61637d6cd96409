"""``hicache storage du|verify|purge`` on MemoryBackend with planted corruption."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hicache.storage.backend import Backend, BackendContext, PageStatus
from hicache.storage.memory import MemoryBackend, MemoryConfig
from hicache.storage.pageformat import HEADER_SIZE
from hicache.tools.ops import (
    TierHandle,
    disk_usage,
    list_namespaces,
    purge_namespace,
    verify_namespace,
)

PAGE = 4096


def key_of(i: int) -> str:
    return hashlib.sha256(f"page-{i}".encode()).hexdigest()


@pytest.fixture
def store_name() -> Iterator[str]:
    name = f"ops-{uuid.uuid4().hex[:12]}"
    yield name
    MemoryBackend.drop_shared_store(name)


def make_handle(store_name: str, *, read_only: bool = False) -> TierHandle:
    def make(page_bytes: int, namespace: str, ro: bool) -> Backend:
        return MemoryBackend(
            MemoryConfig(shared_name=store_name),
            BackendContext(page_bytes=page_bytes, namespace=namespace, read_only=ro, tier_name="t"),
        )

    return TierHandle("t", "memory", read_only, make)


def plant(store_name: str, namespace: str, n: int, page_bytes: int = PAGE) -> MemoryBackend:
    """Store ``n`` pages and return the (open) writer, which keeps the shared store alive."""
    writer = MemoryBackend(
        MemoryConfig(shared_name=store_name),
        BackendContext(page_bytes=page_bytes, namespace=namespace),
    )
    writer.open()
    keys = [key_of(i) for i in range(n)]
    srcs = [memoryview(bytearray([i % 251]) * page_bytes) for i in range(n)]
    assert all(s is PageStatus.OK for s in writer.put(keys, srcs))
    return writer


def stored(writer: MemoryBackend, key: str) -> Any:
    assert writer._store is not None
    return writer._store.pages[writer.context.namespace][key]


def test_du_counts_pages_and_bytes_per_namespace(store_name: str) -> None:
    a = plant(store_name, "ns-a", 5)
    b = plant(store_name, "ns-b", 2, page_bytes=2 * PAGE)
    handle = make_handle(store_name)
    assert list_namespaces(handle) == ["ns-a", "ns-b"]
    usage = {u.namespace: u for u in disk_usage(handle, ["ns-a", "ns-b", "ns-empty"])}
    assert (usage["ns-a"].pages, usage["ns-a"].stored_bytes) == (5, 5 * (HEADER_SIZE + PAGE))
    assert (usage["ns-b"].pages, usage["ns-b"].stored_bytes) == (2, 2 * (HEADER_SIZE + 2 * PAGE))
    assert (usage["ns-empty"].pages, usage["ns-empty"].stored_bytes) == (0, 0)
    a.close()
    b.close()


def test_verify_finds_planted_corruption_and_deletes_only_it(store_name: str) -> None:
    writer = plant(store_name, "ns-a", 8)
    stored(writer, key_of(1)).payload[100] ^= 0x01  # payload bit flip -> checksum
    stored(writer, key_of(4)).header[7] ^= 0xFF  # magic
    stored(writer, key_of(6)).header[2000] ^= 0x10  # header padding -> header checksum
    handle = make_handle(store_name)

    report = verify_namespace(handle, "ns-a")
    assert report.pages == 8
    assert report.ok == 5
    assert sorted(report.corrupt) == sorted(key_of(i) for i in (1, 4, 6))
    assert report.failed == [] and report.deleted == 0
    assert writer.exists([key_of(1)]) == [True]  # plain verify never deletes

    report = verify_namespace(handle, "ns-a", delete_corrupt=True)
    assert report.deleted == 3
    assert writer.exists([key_of(i) for i in range(8)]) == [i not in (1, 4, 6) for i in range(8)]
    again = verify_namespace(handle, "ns-a")
    assert (again.pages, again.ok, again.corrupt) == (5, 5, [])
    writer.close()


def test_verify_reads_each_page_at_its_own_size(store_name: str) -> None:
    small = plant(store_name, "mixed", 3, page_bytes=PAGE)
    big = MemoryBackend(
        MemoryConfig(shared_name=store_name), BackendContext(page_bytes=3 * PAGE, namespace="mixed")
    )
    big.open()
    big.put([key_of(100)], [memoryview(bytearray(3 * PAGE))])
    report = verify_namespace(make_handle(store_name), "mixed")
    assert (report.pages, report.ok, report.corrupt) == (4, 4, [])
    # A truncated page is read at the size its stored bytes imply: it cannot verify.
    del stored(small, key_of(2)).payload[-10:]
    report = verify_namespace(make_handle(store_name), "mixed")
    assert report.corrupt == [key_of(2)]
    small.close()
    big.close()


def test_purge_removes_one_namespace_only(store_name: str) -> None:
    a = plant(store_name, "ns-a", 4)
    b = plant(store_name, "ns-b", 3)
    handle = make_handle(store_name)
    assert purge_namespace(handle, "ns-a") == 4
    assert a.exists([key_of(i) for i in range(4)]) == [False] * 4
    assert b.exists([key_of(i) for i in range(3)]) == [True] * 3
    assert list_namespaces(handle) == ["ns-b"]
    assert purge_namespace(handle, "ns-a") == 0
    a.close()
    b.close()


# ----------------------------------------------------------------------------- command line


def _config(tmp_path: Path, store_name: str, **tier: Any) -> Path:
    path = tmp_path / "hicache.yaml"
    options = json.dumps({"shared_name": store_name})
    extra = "".join(f", {k}: {json.dumps(v)}" for k, v in tier.items())
    path.write_text(
        f"storage:\n  tiers:\n    mem: {{backend: memory, options: {options}{extra}}}\n"
    )
    return path


def _cli(argv: list[str]) -> int:
    pytest.importorskip("hicache.config")
    import argparse

    from hicache.tools.ops import add_parser

    parser = argparse.ArgumentParser(prog="hicache")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


def test_cli_du_verify_purge(
    tmp_path: Path, store_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    writer = plant(store_name, "ns-a", 6)
    stored(writer, key_of(3)).payload[0] ^= 0x40
    cfg = str(_config(tmp_path, store_name))

    assert _cli(["storage", "du", "--config", cfg, "--json"]) == 0
    du = json.loads(capsys.readouterr().out)
    assert du["namespaces"] == [
        {"namespace": "ns-a", "pages": 6, "stored_bytes": 6 * (HEADER_SIZE + PAGE)}
    ]

    assert _cli(["storage", "verify", "--config", cfg]) == 1  # corruption found: exit 1
    out = capsys.readouterr().out
    assert "6 pages, 5 ok, 1 corrupt" in out and f"corrupt {key_of(3)}" in out

    assert _cli(["storage", "verify", "--config", cfg, "--delete-corrupt", "--json"]) == 1
    verify = json.loads(capsys.readouterr().out)
    assert verify["namespaces"][0]["deleted"] == 1
    assert _cli(["storage", "verify", "--config", cfg, "--namespace", "ns-a"]) == 0
    assert "5 pages, 5 ok, 0 corrupt" in capsys.readouterr().out

    assert _cli(["storage", "purge", "--config", cfg, "--namespace", "ns-a"]) == 2  # no --yes
    assert "without --yes" in capsys.readouterr().err
    assert writer.exists([key_of(0)]) == [True]
    assert _cli(["storage", "purge", "--config", cfg, "--namespace", "ns-a", "--yes"]) == 0
    assert "purged 5 pages" in capsys.readouterr().out
    assert writer.exists([key_of(i) for i in range(6)]) == [False] * 6
    writer.close()


def test_cli_refuses_writes_on_read_only_tier_and_unknown_tier(
    tmp_path: Path, store_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    writer = plant(store_name, "ns-a", 1)
    cfg = str(_config(tmp_path, store_name, read_only=True))
    assert _cli(["storage", "purge", "--config", cfg, "--namespace", "ns-a", "--yes"]) == 2
    assert "read_only" in capsys.readouterr().err
    assert _cli(["storage", "verify", "--config", cfg, "--delete-corrupt"]) == 2
    assert _cli(["storage", "du", "--config", cfg, "--tier", "nope"]) == 2
    assert "'nope'" in capsys.readouterr().err
    assert writer.exists([key_of(0)]) == [True]
    writer.close()
