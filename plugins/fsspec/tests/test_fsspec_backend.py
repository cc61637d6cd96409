"""The fsspec plugin: the conformance kit on ``memory://`` and ``file://``, plus its own tests.

The kit classes are the whole of what a plugin needs to prove the contract: subclass
``BackendTests``, give it options, and (optionally) raw hooks that reach the stored bytes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fsspec.implementations.memory import MemoryFileSystem
from hicache_fsspec import FsspecBackend, FsspecConfig, WriteMode

from hicache.config import load_config
from hicache.errors import BackendUnavailableError, ConfigError
from hicache.storage import (
    HEADER_SIZE,
    Backend,
    BackendContext,
    PageStatus,
    create_backend,
    installed_backends,
    load_backend_class,
    redact_url,
)
from hicache.testing import BackendTests

PAGE = 16384
_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "fsspec-memory.yaml"


def _key(i: int) -> str:
    return f"{i:064x}"


def _page(i: int) -> memoryview:
    return memoryview(bytearray((i * 7 + j) % 251 for j in range(PAGE)))


class _RawHooks:
    """Raw hooks: edit the stored object through the backend's own filesystem, not its API."""

    def _raw(self, backend: Backend, key: str) -> tuple[Any, str]:
        assert isinstance(backend, FsspecBackend)
        return backend.filesystem, backend.page_path(key)

    def _flip(self, backend: Backend, key: str, offset: int) -> None:
        fs, path = self._raw(backend, key)
        data = bytearray(fs.cat_file(path))
        data[offset] ^= 0x5A
        fs.pipe_file(path, bytes(data))

    def corrupt_payload(self, backend: Backend, key: str) -> None:
        self._flip(backend, key, HEADER_SIZE + backend.context.page_bytes // 2)

    def corrupt_header(self, backend: Backend, key: str) -> None:
        self._flip(backend, key, 100)  # inside the key field; the header checksum covers it

    def truncate_page(self, backend: Backend, key: str) -> None:
        fs, path = self._raw(backend, key)
        data = fs.cat_file(path)
        fs.pipe_file(path, data[: HEADER_SIZE + backend.context.page_bytes // 2])


def _memory_root() -> Iterator[str]:
    root = f"kit-{uuid.uuid4().hex}"
    yield root
    # memory:// is one process-wide store: drop what the test wrote.
    with contextlib.suppress(FileNotFoundError):
        MemoryFileSystem().rm(f"/{root}", recursive=True)


@pytest.fixture
def memory_url() -> Iterator[str]:
    for root in _memory_root():
        yield f"memory://{root}"


class TestFsspecMemoryKit(_RawHooks, BackendTests):
    """The kit on ``memory://`` (rename publish, cat_file reads), 4 I/O threads."""

    backend_cls = FsspecBackend

    @pytest.fixture
    def backend_options(self, tmp_path: Path) -> Iterator[dict[str, Any]]:
        for root in _memory_root():
            yield {"url": f"memory://{root}", "io_threads": 4}


class TestFsspecFileKit(_RawHooks, BackendTests):
    """The kit on ``file://`` (hard-link publish, readinto reads), 4 I/O threads."""

    backend_cls = FsspecBackend

    @pytest.fixture
    def backend_options(self, tmp_path: Path) -> dict[str, Any]:
        return {"url": (tmp_path / "cache").as_uri(), "io_threads": 4}


class TestFsspecFileRenameSerialKit(_RawHooks, BackendTests):
    """The kit on ``file://`` publishing by ``fs.mv``, every page on the calling thread."""

    backend_cls = FsspecBackend

    @pytest.fixture
    def backend_options(self, tmp_path: Path) -> dict[str, Any]:
        return {"url": (tmp_path / "cache").as_uri(), "io_threads": 1, "write_mode": "rename"}


# ---------------------------------------------------------------------- plugin-specific tests


def _open(options: dict[str, Any], *, namespace: str = "ns", read_only: bool = False) -> Backend:
    context = BackendContext(page_bytes=PAGE, namespace=namespace, read_only=read_only)
    backend = create_backend("fsspec", options, context)
    backend.open()
    return backend


def test_entry_point_resolves_through_the_registry() -> None:
    assert load_backend_class("fsspec") is FsspecBackend
    (info,) = [i for i in installed_backends() if i.kind == "fsspec"]
    assert info.distribution == "hicache-fsspec"
    assert info.target == "hicache_fsspec:FsspecBackend"
    assert info.ok, info.error


def test_bad_option_is_reported_at_its_path() -> None:
    context = BackendContext(page_bytes=PAGE, namespace="ns")
    with pytest.raises(ConfigError) as err:
        create_backend(
            "fsspec",
            {"url": "memory://x", "io_thread": 2},
            context,
            path="storage.tiers.remote.options",
        )
    assert "storage.tiers.remote.options.io_thread" in str(err.value)
    assert "io_threads" in str(err.value)  # the close match is suggested


def _hicache(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed ``hicache`` command, as a user runs it (no HICACHE_* overrides)."""
    script = Path(sys.executable).parent / "hicache"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("HICACHE_")}
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def test_backends_list_shows_it_like_a_first_party_backend() -> None:
    result = _hicache("backends", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["kind"]: row for row in json.loads(result.stdout)}
    plugin, builtin = rows["fsspec"], rows["memory"]
    assert plugin.keys() == builtin.keys()
    assert plugin["distribution"] == "hicache-fsspec"
    assert plugin["target"] == "hicache_fsspec:FsspecBackend"
    assert plugin["error"] is None and builtin["error"] is None


def test_shipped_config_checks_and_a_typo_is_reported_at_its_yaml_path(tmp_path: Path) -> None:
    assert _hicache("config", "check", str(_CONFIG)).returncode == 0
    broken = tmp_path / "broken.yaml"
    broken.write_text(_CONFIG.read_text().replace("io_threads: 4", "io_thread: 4"))
    result = _hicache("config", "check", str(broken))
    assert result.returncode != 0
    assert "storage.tiers.fs.options.io_thread" in result.stdout + result.stderr
    with pytest.raises(ConfigError, match=r"storage\.tiers\.fs\.options\.io_thread"):
        load_config(broken)


def test_shipped_config_builds_a_working_tier(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("HICACHE_"):
            monkeypatch.delenv(name)
    tier = load_config(_CONFIG).storage.tiers["fs"]
    assert tier.backend == "fsspec"
    for root in _memory_root():
        options = {**tier.options, "url": f"memory://{root}"}  # keep the test's pages apart
        context = BackendContext(page_bytes=PAGE, namespace="ns", tier_name="fs")
        backend = create_backend(tier.backend, options, context, path="storage.tiers.fs.options")
        with backend:
            assert backend.put([_key(1)], [_page(1)]) == [PageStatus.OK]
            dst = memoryview(bytearray(PAGE))
            assert backend.get_into([_key(1)], [dst]) == [PageStatus.OK]
            assert bytes(dst) == bytes(_page(1))


def test_protocol_without_its_implementation_names_the_install_hint() -> None:
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(ValueError, match="gcsfs"):
        FsspecConfig(url="gcs://bucket/kv")
    with pytest.raises(ValueError, match="unknown fsspec protocol 'nosuch'"):
        FsspecConfig(url="nosuch://x")


@pytest.mark.parametrize("mode", list(WriteMode))
def test_every_write_mode_round_trips_on_file(tmp_path: Path, mode: WriteMode) -> None:
    if mode is WriteMode.LINK and not hasattr(os, "link"):
        pytest.skip("no hard links here")
    backend = _open({"url": tmp_path.as_uri(), "write_mode": mode.value, "io_threads": 2})
    keys = [_key(i) for i in range(3)]
    assert backend.put(keys, [_page(i) for i in range(3)]) == [PageStatus.OK] * 3
    dsts = [memoryview(bytearray(PAGE)) for _ in keys]
    assert backend.get_into(keys, dsts) == [PageStatus.OK] * 3
    assert [bytes(d) for d in dsts] == [bytes(_page(i)) for i in range(3)]
    leftovers = [p for p in Path(tmp_path).rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []
    backend.close()


@pytest.mark.parametrize(
    ("scheme", "mode"), [("file", WriteMode.LINK), ("file", WriteMode.RENAME), ("memory", None)]
)
def test_racing_puts_of_one_key_store_exactly_one_page(
    tmp_path: Path, memory_url: str, scheme: str, mode: WriteMode | None
) -> None:
    url = tmp_path.as_uri() if scheme == "file" else memory_url
    options: dict[str, Any] = {"url": url, "io_threads": 1}
    if mode is not None:
        options["write_mode"] = mode.value
    # Separate instances, as two tiers or two engines in one process would be.
    backends = [_open(options) for _ in range(8)]
    key = _key(42)
    results: dict[int, PageStatus] = {}
    barrier = threading.Barrier(len(backends))

    def writer(i: int) -> None:
        barrier.wait()
        results[i] = backends[i].put([key], [_page(i)])[0]

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(len(backends))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, s in results.items() if s is PageStatus.OK]
    assert len(winners) == 1, results
    assert all(s is PageStatus.ALREADY_EXISTS for i, s in results.items() if i not in winners)
    dst = memoryview(bytearray(PAGE))
    assert backends[0].get_into([key], [dst]) == [PageStatus.OK]
    assert bytes(dst) == bytes(_page(winners[0]))
    for b in backends:
        b.close()


def test_memory_pages_survive_reopen_in_process_but_are_not_claimed_persistent(
    memory_url: str,
) -> None:
    backend = _open({"url": memory_url})
    assert not backend.capabilities.persistent
    assert not backend.capabilities.shared
    backend.put([_key(1)], [_page(1)])
    backend.close()
    backend.open()
    assert backend.exists([_key(1)]) == [True]
    backend.close()


def test_file_tier_is_persistent_and_shared(tmp_path: Path) -> None:
    backend = FsspecBackend(
        FsspecConfig(url=tmp_path.as_uri()), BackendContext(page_bytes=PAGE, namespace="ns")
    )
    caps = backend.capabilities  # known before open(): no I/O needed
    assert caps.persistent and caps.shared and caps.listable
    assert caps.default_medium == "DISK"


def test_storage_options_reach_the_filesystem(memory_url: str) -> None:
    # global_store=False gives the instance a private store: a second instance sees nothing.
    private = {"url": memory_url, "storage_options": {"global_store": False}}
    first = _open(private)
    first.put([_key(1)], [_page(1)])
    assert first.exists([_key(1)]) == [True]
    second = _open(private)
    assert second.exists([_key(1)]) == [False]
    shared = _open({"url": memory_url})
    assert shared.exists([_key(1)]) == [False]
    for b in (first, second, shared):
        b.close()


def test_layout_is_namespace_then_shard_then_key(tmp_path: Path) -> None:
    backend = _open({"url": tmp_path.as_uri()}, namespace="kv-abc")
    key = "ab" + "0" * 62
    backend.put([key], [_page(3)])
    stored = tmp_path / "kv-abc" / "ab" / key
    assert stored.stat().st_size == HEADER_SIZE + PAGE
    assert stored.read_bytes()[HEADER_SIZE:] == bytes(_page(3))
    assert list(backend.iter_namespaces()) == ["kv-abc"]
    backend.close()


def test_temporaries_are_neither_pages_nor_listed(tmp_path: Path) -> None:
    backend = _open({"url": tmp_path.as_uri()})
    key = _key(5)
    backend.put([key], [_page(5)])
    # A writer killed between writing its temporary and publishing it leaves this behind.
    stray = tmp_path / "ns" / key[:2] / f".tmp-{_key(6)}-deadbeef"
    stray.write_bytes(b"partial")
    assert backend.exists([_key(6)]) == [False]
    assert [p.key for p in backend.iter_pages()] == [key]
    backend.close()


def test_other_namespaces_are_invisible(memory_url: str) -> None:
    a = _open({"url": memory_url}, namespace="alpha")
    b = _open({"url": memory_url}, namespace="beta")
    a.put([_key(1)], [_page(1)])
    assert b.exists([_key(1)]) == [False]
    assert sorted(b.iter_namespaces()) == ["alpha", "beta"]
    a.close()
    b.close()


def test_page_of_another_namespace_copied_in_is_corrupt(tmp_path: Path) -> None:
    a = _open({"url": tmp_path.as_uri()}, namespace="alpha")
    b = _open({"url": tmp_path.as_uri()}, namespace="beta")
    key = _key(9)
    a.put([key], [_page(9)])
    target = tmp_path / "beta" / key[:2] / key
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes((tmp_path / "alpha" / key[:2] / key).read_bytes())
    assert b.get_into([key], [memoryview(bytearray(PAGE))]) == [PageStatus.CORRUPT]
    a.close()
    b.close()


def test_corruption_is_counted_and_logged_once_per_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = _open({"url": tmp_path.as_uri(), "drop_corrupt": False})
    key = _key(7)
    backend.put([key], [_page(7)])
    _RawHooks().corrupt_payload(backend, key)
    with caplog.at_level(logging.WARNING, logger="hicache_fsspec"):
        for _ in range(3):
            dst = memoryview(bytearray(PAGE))
            assert backend.get_into([key], [dst]) == [PageStatus.CORRUPT]
    assert sum(key in r.getMessage() for r in caplog.records) == 1
    assert backend.stats()["get_corrupt"] == 3
    backend.close()


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_corrupt_page_is_dropped_so_the_next_publish_repairs_it(
    tmp_path: Path, memory_url: str, scheme: str
) -> None:
    backend = _open({"url": tmp_path.as_uri() if scheme == "file" else memory_url})
    key = _key(11)
    backend.put([key], [_page(11)])
    _RawHooks().truncate_page(backend, key)
    assert backend.get_into([key], [memoryview(bytearray(PAGE))]) == [PageStatus.CORRUPT]
    # Dropped and announced, so the cache can say BlockRemoved and publish it again.
    assert backend.take_evicted() == [key]
    assert backend.take_evicted() == []
    assert backend.exists([key]) == [False]
    assert backend.put([key], [_page(11)]) == [PageStatus.OK]
    dst = memoryview(bytearray(PAGE))
    assert backend.get_into([key], [dst]) == [PageStatus.OK]
    assert bytes(dst) == bytes(_page(11))
    backend.close()


def test_corrupt_page_kept_when_drop_corrupt_is_off(tmp_path: Path) -> None:
    backend = _open({"url": tmp_path.as_uri(), "drop_corrupt": False})
    key = _key(12)
    backend.put([key], [_page(12)])
    _RawHooks().corrupt_header(backend, key)
    assert backend.get_into([key], [memoryview(bytearray(PAGE))]) == [PageStatus.CORRUPT]
    assert backend.take_evicted() == []
    assert backend.put([key], [_page(12)]) == [PageStatus.ALREADY_EXISTS]
    assert backend.get_into([key], [memoryview(bytearray(PAGE))]) == [PageStatus.CORRUPT]
    backend.close()


def test_verify_checksum_off_still_checks_the_header(tmp_path: Path) -> None:
    backend = _open({"url": tmp_path.as_uri(), "verify_checksum": False})
    hooks = _RawHooks()
    backend.put([_key(1), _key(2)], [_page(1), _page(2)])
    hooks.corrupt_payload(backend, _key(1))
    hooks.corrupt_header(backend, _key(2))
    dsts = [memoryview(bytearray(PAGE)) for _ in range(2)]
    # The documented trade-off: payload bit rot passes unnoticed, a bad header never does.
    assert backend.get_into([_key(1), _key(2)], dsts) == [PageStatus.OK, PageStatus.CORRUPT]
    assert bytes(dsts[0]) != bytes(_page(1))
    backend.close()


def test_unusable_root_fails_open_with_backend_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a directory")
    backend = FsspecBackend(
        FsspecConfig(url=(blocker / "cache").as_uri()),
        BackendContext(page_bytes=PAGE, namespace="ns"),
    )
    with pytest.raises(BackendUnavailableError, match="cache"):
        backend.open()
    assert not backend.is_open


def test_read_only_tier_creates_nothing(tmp_path: Path) -> None:
    root = tmp_path / "absent"
    backend = _open({"url": root.as_uri()}, read_only=True)
    assert backend.exists([_key(1)]) == [False]
    assert backend.get_into([_key(1)], [memoryview(bytearray(PAGE))]) == [PageStatus.NOT_FOUND]
    assert list(backend.iter_pages()) == []
    assert not root.exists()
    backend.close()


def test_credentials_never_reach_stats_or_messages() -> None:
    assert redact_url("sftp://user:s3cret@host:22/kv") == "sftp://***@host:22/kv"
    assert redact_url("memory://plain") == "memory://plain"
    backend = FsspecBackend(
        FsspecConfig(url="memory://x", storage_options={"password": "s3cret"}),
        BackendContext(page_bytes=PAGE, namespace="ns"),
    )
    assert "s3cret" not in repr(backend.config)
    backend.open()
    assert "s3cret" not in repr(backend.stats())
    backend.close()
