"""The layering of docs/architecture.md, checked over the source tree with :mod:`ast`.

- the core (``hicache``) never imports a backend (``hicache_*``);
- the core never imports an engine adapter (``hicache.integrations``): adapters use the core,
  never the other way round; the one exception is the benchmark that measures an adapter
  (``hicache.tools.sglang_bench``);
- ``hicache.storage`` (the plugin contract) imports neither the L3 runtime (``hicache.tiering``),
  the cache (radix, hiradix, its tables, pools, transfer), the metrics layer
  (``hicache.metrics``), the tools, the replay nor an adapter;
- nothing on the serving path imports ``hicache.tools`` or ``hicache.replay``;
- a backend or plugin package imports from hicache only the ``hicache.storage`` face and
  ``hicache.errors`` (its ``testing`` module may also use ``hicache.testing``). Its tests may
  also drive the rest of the core against it (the kit, a whole cache with the backend as a tier,
  the benchmark harness), but still reach the contract through the face only.

Every import counts, including those inside functions and ``if TYPE_CHECKING:`` blocks: a
layer that needs another only for typing still depends on it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CACHE_MODULES = (
    "hicache.radix",
    "hicache.hiradix",
    "hicache.pending_writes",
    "hicache.prefetches",
    "hicache.rank_sync",
    "hicache.cache_parts",
    "hicache.pools",
    "hicache.transfer",
)
#: Modules that may import an adapter: the adapters, and the benchmark that measures one.
INTEGRATION_USERS = ("hicache.integrations", "hicache.tools.sglang_bench")
SERVING_PATH = (
    "hicache.storage",
    "hicache.tiering",
    "hicache.hiradix",
    "hicache.pending_writes",
    "hicache.prefetches",
    "hicache.rank_sync",
    "hicache.cache_parts",
    "hicache.metrics",
    "hicache.integrations",
    "hicache.radix",
    "hicache.packed_tokens",
    "hicache.pools",
    "hicache.transfer",
    "hicache.events",
    "hicache.event_publisher",
    "hicache.config",
    "hicache.keys",
    "hicache.errors",
)
BACKEND_ALLOWED = ("hicache.storage", "hicache.errors")
STORAGE_FORBIDDEN = (
    "hicache.tiering",
    "hicache.metrics",
    "hicache.tools",
    "hicache.replay",
    "hicache.integrations",
    *CACHE_MODULES,
)


@dataclass(frozen=True, slots=True)
class Violation:
    path: str
    line: int
    module: str
    imported: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.module} imports {self.imported} ({self.rule})"


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``name`` is one of ``prefixes`` or inside it; a prefix ending in a module stem
    (``hicache.hiradix``) also covers its siblings by that stem (``hicache.hiradix_writes``)."""
    for prefix in prefixes:
        if name == prefix or name.startswith(prefix + ".") or name.startswith(prefix + "_"):
            return True
    return False


def module_name(path: Path, root: Path) -> str:
    """Dotted name of a source file: ``backends/s3/hicache_s3/perf.py`` -> ``hicache_s3.perf``;
    a test file keeps its directory (``backends/s3/tests/test_x.py`` -> ``backends.s3.tests...``).
    """
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("backends", "plugins") and len(parts) > 2 and parts[2].startswith("hicache_"):
        parts = parts[2:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """Every module ``tree`` imports, with its line; ``from a import b`` yields ``a`` and
    ``a.b`` (``b`` may be a submodule); relative imports are resolved against ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{base}.{alias.name}"


def check_file(path: Path, root: Path) -> list[Violation]:
    """The import-rule violations of one source file."""
    module = module_name(path, root)
    rel = path.relative_to(root).as_posix()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    in_core = module == "hicache" or module.startswith("hicache.")
    in_backend = module.startswith("hicache_")
    backend_test = rel.startswith(("backends/", "plugins/")) and "/tests/" in rel
    out: list[Violation] = []

    def bad(line: int, name: str, rule: str) -> None:
        out.append(Violation(rel, line, module, name, rule))

    for line, name in imported_names(tree, module, path.name == "__init__.py"):
        top = name.partition(".")[0]
        if in_core:
            if top.startswith("hicache_"):
                bad(line, name, "the core never imports a backend")
            if _within_exact(name, ("hicache.integrations",)) and not _within_exact(
                module, INTEGRATION_USERS
            ):
                bad(line, name, "the core never imports an adapter")
            if _within(module, ("hicache.storage",)) and _within(name, STORAGE_FORBIDDEN):
                bad(line, name, "the storage contract imports no runtime, cache, metrics or tools")
            if _within(module, SERVING_PATH) and _within(name, ("hicache.tools", "hicache.replay")):
                bad(line, name, "the serving path imports no tools or replay")
        elif (in_backend or backend_test) and top == "hicache":
            allowed = ("hicache",) if backend_test else BACKEND_ALLOWED
            if module.endswith(".testing"):
                allowed = (*BACKEND_ALLOWED, "hicache.testing")
            # The face only: ``hicache.storage.X`` names a private module, unless X is a name
            # the face exports (``from hicache.storage import Backend`` yields that too).
            if name.startswith("hicache.storage.") and not _face_exports(name):
                bad(line, name, "a backend imports the hicache.storage face, not its modules")
            elif not (name == "hicache" or _within_exact(name, allowed)):
                bad(line, name, f"a backend imports from hicache only {', '.join(allowed)}")
    return out


def _within_exact(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _face_exports(name: str) -> bool:
    import hicache.storage

    return name.removeprefix("hicache.storage.") in hicache.storage.__all__


def source_files(root: Path) -> list[Path]:
    """The core, every backend and plugin package and their tests."""
    files = sorted((root / "hicache").rglob("*.py"))
    for group in ("backends", "plugins"):
        files += sorted((root / group).glob("*/hicache_*/**/*.py"))
        files += sorted((root / group).glob("*/tests/**/*.py"))
    return files


def check_tree(root: Path) -> list[Violation]:
    return [v for path in source_files(root) for v in check_file(path, root)]


def test_the_source_tree_keeps_the_import_rules() -> None:
    files = source_files(ROOT)
    assert len(files) > 100  # the walk found the tree, not an empty folder
    violations = check_tree(ROOT)
    assert violations == [], "\n".join(map(str, violations))


def _plant(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_each_rule_catches_a_planted_violation(tmp_path: Path) -> None:
    _plant(tmp_path, "hicache/__init__.py", "")
    _plant(tmp_path, "hicache/storage/__init__.py", "")
    _plant(tmp_path, "hicache/hiradix_writes.py", "from hicache.tools.bench import main\n")
    _plant(
        tmp_path,
        "hicache/storage/backend.py",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..tiering import tiers\n",
    )
    _plant(tmp_path, "hicache/config.py", "def f():\n    import hicache.replay.app\n")
    _plant(tmp_path, "hicache/cli.py", "import hicache_s3\n")
    _plant(tmp_path, "hicache/tools/bench.py", "from hicache import hiradix\n")  # allowed
    # the cache's tables, the metrics layer, the tiering runtime and the adapters serve too
    _plant(tmp_path, "hicache/pending_writes.py", "import hicache.tools.ops\n")
    _plant(tmp_path, "hicache/prefetches.py", "from hicache.replay import plan\n")
    _plant(tmp_path, "hicache/rank_sync.py", "def f():\n    from hicache.tools import ops\n")
    _plant(tmp_path, "hicache/cache_parts.py", "import hicache.replay\n")
    _plant(tmp_path, "hicache/metrics.py", "from hicache.replay.app import main\n")
    _plant(
        tmp_path,
        "hicache/tiering/opening.py",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import hicache.tools.bench\n",
    )
    _plant(tmp_path, "hicache/tiering/clear.py", "from hicache import metrics\n")  # allowed
    _plant(tmp_path, "hicache/integrations/sglang.py", "import hicache.tools.ops\n")
    # the core never imports an adapter, except the benchmark that measures it
    _plant(tmp_path, "hicache/replay/app.py", "from hicache.integrations import sglang\n")
    _plant(tmp_path, "hicache/tools/sglang_bench.py", "import hicache.integrations.sglang\n")
    # the storage contract imports no metrics, cache table, replay or adapter
    _plant(tmp_path, "hicache/storage/redact.py", "def f():\n    import hicache.metrics\n")
    _plant(tmp_path, "hicache/storage/localfiles.py", "from hicache.pending_writes import P\n")
    _plant(tmp_path, "hicache/storage/sizes.py", "import hicache.integrations.sglang\n")
    _plant(tmp_path, "backends/x/hicache_x/__init__.py", "from hicache.storage import Backend\n")
    _plant(tmp_path, "backends/x/hicache_x/raw.py", "from hicache.storage.pageformat import f\n")
    _plant(tmp_path, "backends/x/hicache_x/perf.py", "from hicache.tools import benchmark\n")
    _plant(tmp_path, "backends/x/hicache_x/testing.py", "from hicache.testing import kit\n")
    _plant(tmp_path, "backends/x/tests/test_x.py", "from hicache.hiradix import HiRadixCache\n")
    _plant(tmp_path, "backends/x/tests/test_y.py", "from hicache.storage.memory import M\n")

    found = {(v.path, v.imported) for v in check_tree(tmp_path)}
    assert found == {
        ("hicache/hiradix_writes.py", "hicache.tools.bench"),
        ("hicache/hiradix_writes.py", "hicache.tools.bench.main"),
        ("hicache/storage/backend.py", "hicache.tiering"),
        ("hicache/storage/backend.py", "hicache.tiering.tiers"),
        ("hicache/config.py", "hicache.replay.app"),
        ("hicache/cli.py", "hicache_s3"),
        ("hicache/pending_writes.py", "hicache.tools.ops"),
        ("hicache/prefetches.py", "hicache.replay"),
        ("hicache/prefetches.py", "hicache.replay.plan"),
        ("hicache/rank_sync.py", "hicache.tools"),
        ("hicache/rank_sync.py", "hicache.tools.ops"),
        ("hicache/cache_parts.py", "hicache.replay"),
        ("hicache/metrics.py", "hicache.replay.app"),
        ("hicache/metrics.py", "hicache.replay.app.main"),
        ("hicache/tiering/opening.py", "hicache.tools.bench"),
        ("hicache/integrations/sglang.py", "hicache.tools.ops"),
        ("hicache/replay/app.py", "hicache.integrations"),
        ("hicache/replay/app.py", "hicache.integrations.sglang"),
        ("hicache/storage/redact.py", "hicache.metrics"),
        ("hicache/storage/localfiles.py", "hicache.pending_writes"),
        ("hicache/storage/localfiles.py", "hicache.pending_writes.P"),
        ("hicache/storage/sizes.py", "hicache.integrations.sglang"),
        ("backends/x/hicache_x/raw.py", "hicache.storage.pageformat"),
        ("backends/x/hicache_x/raw.py", "hicache.storage.pageformat.f"),
        ("backends/x/hicache_x/perf.py", "hicache.tools"),
        ("backends/x/hicache_x/perf.py", "hicache.tools.benchmark"),
        ("backends/x/tests/test_y.py", "hicache.storage.memory"),
        ("backends/x/tests/test_y.py", "hicache.storage.memory.M"),
    }
