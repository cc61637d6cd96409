"""Entry-point registry: fake installed distributions on sys.path, real stevedore discovery."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hicache.errors import (
    BackendConflictError,
    BackendContractError,
    BackendLoadError,
    BackendNotFoundError,
    ConfigError,
    PluginError,
)
from hicache.storage import registry
from hicache.storage.backend import BackendContext
from hicache.storage.memory import MemoryBackend

_GOOD_BACKEND = """
from hicache.storage.backend import Backend, BackendConfig, Capabilities, PageStatus


class GoodConfig(BackendConfig):
    root: str
    depth: int = 2


class GoodBackend(Backend):
    config_model = GoodConfig

    @property
    def capabilities(self):
        return Capabilities()

    def _open(self):
        pass

    def _close(self):
        pass

    def _exists(self, keys):
        return [False] * len(keys)

    def _put(self, keys, srcs):
        return [PageStatus.FAILED] * len(keys)

    def _get_into(self, keys, dsts):
        return [PageStatus.NOT_FOUND] * len(keys)

    def _delete(self, keys):
        pass
"""


@dataclass
class FakeSite:
    """A directory on sys.path holding fake ``*.dist-info`` folders and their modules."""

    root: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    modules: list[str] = field(default_factory=list)

    def module(self, stem: str, source: str) -> str:
        """Write a plugin module; return its (unique per test) import name."""
        name = f"fakeplugin_{stem}_{self.tag}"
        (self.root / f"{name}.py").write_text(textwrap.dedent(source))
        self.modules.append(name)
        return name

    def dist(self, name: str, version: str, entry_points: dict[str, str]) -> None:
        """Install a fake distribution registering ``kind = target`` entry points."""
        info = self.root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        lines = [f"[{registry.ENTRY_POINT_GROUP}]"]
        lines += [f"{kind} = {target}" for kind, target in entry_points.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        registry.clear_caches()

    def kind(self, stem: str) -> str:
        return f"{stem}{self.tag}"


def _clear_stevedore() -> None:
    from stevedore import ExtensionManager

    ExtensionManager.ENTRY_POINT_CACHE.clear()
    registry.clear_caches()


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSite]:
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    _clear_stevedore()
    fake = FakeSite(root)
    yield fake
    for name in fake.modules:
        sys.modules.pop(name, None)
    _clear_stevedore()


def _ctx() -> BackendContext:
    return BackendContext(page_bytes=4096, namespace="kit")


def test_memory_backend_is_registered_like_any_other() -> None:
    assert registry.load_backend_class("memory") is MemoryBackend
    infos = {info.kind: info for info in registry.installed_backends()}
    assert infos["memory"].ok
    assert infos["memory"].distribution == "hicache"
    assert infos["memory"].target == "hicache.storage.memory:MemoryBackend"


def test_good_plugin_loads_validates_and_constructs(site: FakeSite) -> None:
    mod = site.module("good", _GOOD_BACKEND)
    kind = site.kind("good")
    site.dist("fake-good", "1.2.3", {kind: f"{mod}:GoodBackend"})

    cls = registry.load_backend_class(kind)
    assert cls.__name__ == "GoodBackend" and cls.__module__ == mod
    info = next(i for i in registry.installed_backends() if i.kind == kind)
    assert (info.distribution, info.version, info.error) == ("fake-good", "1.2.3", None)

    backend = registry.create_backend(kind, {"root": "/x", "depth": "3"}, _ctx())
    assert isinstance(backend, cls)
    assert backend.config.model_dump() == {"root": "/x", "depth": 3}
    assert not backend.is_open  # construction does no I/O

    path = "storage.tiers.nvme.options"
    with pytest.raises(ConfigError) as exc:
        registry.create_backend(kind, {"rot": "/x"}, _ctx(), path=path)
    message = str(exc.value)
    assert "storage.tiers.nvme.options.root: required but missing" in message
    assert "storage.tiers.nvme.options.rot: unknown option (did you mean 'root'?)" in message


def test_import_failure_is_a_load_error_with_the_cause_chained(site: FakeSite) -> None:
    mod = site.module("broken", "import hicache_no_such_dependency_xyz\n")
    kind = site.kind("broken")
    site.dist("fake-broken", "0.1", {kind: f"{mod}:Whatever"})

    with pytest.raises(BackendLoadError) as exc:
        registry.load_backend_class(kind)
    assert isinstance(exc.value.__cause__, ModuleNotFoundError)
    assert exc.value.__cause__.name == "hicache_no_such_dependency_xyz"
    message = str(exc.value)
    assert repr(kind) in message
    assert f"{kind} = {mod}:Whatever" in message
    assert "fake-broken 0.1" in message
    assert "installed kinds:" in message and "memory" in message
    assert isinstance(exc.value, ImportError)  # the natural built-in still catches it

    info = next(i for i in registry.installed_backends() if i.kind == kind)
    assert info.error is not None and "hicache_no_such_dependency_xyz" in info.error


def test_missing_attribute_is_a_load_error(site: FakeSite) -> None:
    mod = site.module("noattr", "X = 1\n")
    kind = site.kind("noattr")
    site.dist("fake-noattr", "0.1", {kind: f"{mod}:Missing"})
    with pytest.raises(BackendLoadError) as exc:
        registry.load_backend_class(kind)
    assert isinstance(exc.value.__cause__, AttributeError)


@pytest.mark.parametrize(
    ("source", "target", "expected"),
    [
        ("def make():\n    return None\n", "make", "refers to a function, not a Backend"),
        ("class Plain:\n    pass\n", "Plain", "does not subclass hicache.storage.Backend"),
        (
            "from hicache.storage.backend import Backend\nclass Half(Backend):\n    pass\n",
            "Half",
            "abstract class Half (unimplemented: _close, _delete, _exists, _get_into, _open,",
        ),
        (
            "from hicache.storage.memory import MemoryBackend\n"
            "class Future(MemoryBackend):\n    api_version = 2\n",
            "Future",
            "implements storage API version 2, but this hicache speaks version 1",
        ),
        (
            "from pydantic import BaseModel\n"
            "from hicache.storage.memory import MemoryBackend\n"
            "class Opts(BaseModel):\n    pass\n"
            "class BadModel(MemoryBackend):\n    config_model = Opts\n",
            "BadModel",
            "config_model must be a hicache.storage.BackendConfig subclass",
        ),
    ],
    ids=["not-a-class", "not-a-backend", "abstract", "wrong-api-version", "bad-config-model"],
)
def test_contract_violations(site: FakeSite, source: str, target: str, expected: str) -> None:
    mod = site.module("contract", source)
    kind = site.kind("contract")
    site.dist("fake-contract", "0.2", {kind: f"{mod}:{target}"})
    with pytest.raises(BackendContractError) as exc:
        registry.load_backend_class(kind)
    message = str(exc.value)
    assert expected in message
    assert f"backend kind {kind!r}" in message
    assert f"{kind} = {mod}:{target}" in message
    assert "installed kinds:" in message and "memory" in message
    info = next(i for i in registry.installed_backends() if i.kind == kind)
    assert info.error is not None and expected in info.error


def test_two_distributions_claiming_one_kind_is_an_error(site: FakeSite) -> None:
    mod_a = site.module("a", _GOOD_BACKEND)
    mod_b = site.module("b", _GOOD_BACKEND)
    kind = site.kind("twice")
    site.dist("fake-a", "1.0", {kind: f"{mod_a}:GoodBackend"})
    site.dist("fake-b", "2.0", {kind: f"{mod_b}:GoodBackend"})

    with pytest.raises(BackendConflictError) as exc:
        registry.load_backend_class(kind)
    message = str(exc.value)
    assert "fake-a 1.0" in message and "fake-b 2.0" in message
    assert isinstance(exc.value, PluginError)
    # Refused before importing either candidate.
    assert mod_a not in sys.modules and mod_b not in sys.modules
    infos = [i for i in registry.installed_backends() if i.kind == kind]
    assert {i.distribution for i in infos} == {"fake-a", "fake-b"}
    assert all(i.error is not None for i in infos)


def test_same_distribution_twice_on_sys_path_is_not_a_conflict(
    site: FakeSite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = site.module("dup", _GOOD_BACKEND)
    kind = site.kind("dup")
    site.dist("fake-dup", "1.0", {kind: f"{mod}:GoodBackend"})
    again = FakeSite(tmp_path / "again", tag=site.tag)
    again.root.mkdir()
    again.dist("fake-dup", "1.0", {kind: f"{mod}:GoodBackend"})
    monkeypatch.syspath_prepend(str(again.root))
    _clear_stevedore()
    assert registry.load_backend_class(kind).__name__ == "GoodBackend"


def test_unknown_kind_lists_installed_kinds_and_the_providing_distribution(
    site: FakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = site.module("other", _GOOD_BACKEND)
    other = site.kind("other")
    site.dist("fake-other", "1.0", {other: f"{mod}:GoodBackend"})

    with pytest.raises(BackendNotFoundError) as exc:
        registry.load_backend_class("nosuchkind")
    message = str(exc.value)
    assert "'nosuchkind'" in message
    assert "installed kinds:" in message and "memory" in message and other in message
    assert isinstance(exc.value, LookupError)

    monkeypatch.setitem(registry.KNOWN_DISTRIBUTIONS, "warpdrive", "hicache-warpdrive")
    with pytest.raises(BackendNotFoundError, match="'hicache-warpdrive'"):
        registry.load_backend_class("warpdrive")
    with pytest.raises(BackendNotFoundError, match="did you mean 'memory'"):
        registry.load_backend_class("memroy")


def test_only_the_configured_kind_is_imported(site: FakeSite) -> None:
    good = site.module("only", _GOOD_BACKEND)
    broken = site.module("exploding", "raise RuntimeError('imported a plugin nobody asked for')\n")
    site.dist(
        "fake-pair",
        "1.0",
        {site.kind("only"): f"{good}:GoodBackend", site.kind("exploding"): f"{broken}:X"},
    )
    assert registry.load_backend_class(site.kind("only")).__name__ == "GoodBackend"
    assert broken not in sys.modules
    with pytest.raises(BackendLoadError, match="imported a plugin nobody asked for"):
        registry.load_backend_class(site.kind("exploding"))


def test_stale_stevedore_listing_falls_back_to_installed_metadata(
    site: FakeSite, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # stevedore's on-disk cache keys on float32 mtimes: a plugin reinstalled within ~2 minutes
    # can be missing from its listing. The installed metadata stays the authority.
    mod = site.module("stale", _GOOD_BACKEND)
    kind = site.kind("stale")
    site.dist("fake-stale", "1.0", {kind: f"{mod}:GoodBackend"})
    monkeypatch.setattr(registry, "_stevedore_entry_points", lambda: [])
    with caplog.at_level("WARNING", logger=registry.__name__):
        assert registry.load_backend_class(kind).__name__ == "GoodBackend"
    assert "stevedore's entry-point cache does not list" in caplog.text
    broken = site.module("stalebroken", "raise ImportError('boom')\n")
    site.dist("fake-stalebroken", "1.0", {site.kind("sb"): f"{broken}:X"})
    with pytest.raises(BackendLoadError) as exc:
        registry.load_backend_class(site.kind("sb"))
    assert isinstance(exc.value.__cause__, ImportError)
