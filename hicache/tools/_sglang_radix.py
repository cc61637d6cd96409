"""SGLang's own ``RadixCache``, imported for ``hicache bench radix`` to run in the same process.

- ``load_peer()``  the imported peer (:class:`SglangPeer`), or a :class:`PeerMissing` saying why
                   it cannot run here (SGLang or what its radix module imports is not installed)

The radix module of SGLang is pure Python, but its import chain reaches SGLang's kernels (triton,
imported for real: ``make venv`` installs it, its import needs no GPU) and, through the model
configs, ``torchvision``, which has no build for a CPU-only torch on PyPI. Where torchvision is
missing, an import-only stand-in takes its place for imports made by SGLang's own modules only
(transformers' availability probes still see no torchvision); its attributes raise
:class:`StandInUsed` when called, and it leaves ``sys.modules`` once the import is done. The
radix tree never reaches it (only the multimodal image helpers name it); the bench reports every
stand-in it placed.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["PeerMissing", "SglangPeer", "StandInUsed", "load_peer"]

#: Packages an import-only stand-in may replace, and why each one is safe to stand in.
STAND_INS = {
    "torchvision": "named (never called) by SGLang's multimodal model configs on the radix "
    "module's import chain; no CPU build of it exists on PyPI",
}


class StandInUsed(RuntimeError):
    """SGLang code called into an import-only stand-in: the bench needs the real package."""


class _Refusing:
    """What a stand-in hands out: attribute access works (module-level aliases), calls raise."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> _Refusing:
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return _Refusing(f"{self._name}.{attr}")

    def __call__(self, *args: object, **kwargs: object) -> object:
        raise StandInUsed(f"{self._name} called, but it is an import-only stand-in")

    def __mro_entries__(self, bases: tuple[object, ...]) -> tuple[type, ...]:
        raise StandInUsed(f"{self._name} subclassed, but it is an import-only stand-in")


class _StandInModule(types.ModuleType):
    def __getattr__(self, attr: str) -> _Refusing:
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return _Refusing(f"{self.__name__}.{attr}")


def _imported_by_sglang() -> bool:
    """True when the import being resolved comes from one of SGLang's own modules."""
    frame: types.FrameType | None = sys._getframe(2)
    while frame is not None:
        name = str(frame.f_globals.get("__name__", ""))
        if name != __name__ and not name.startswith("importlib"):
            return name.startswith("sglang.")
        frame = frame.f_back
    return False


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: Sequence[str]) -> None:
        self.roots = set(roots)
        self.placed: set[str] = set()

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        root = fullname.partition(".")[0]
        if root not in self.roots or not _imported_by_sglang():
            return None
        self.placed.add(root)
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return


@dataclass(frozen=True, slots=True)
class SglangPeer:
    """SGLang's radix classes as imported, and the stand-ins the import needed."""

    version: str
    radix_cache: Any
    radix_key: Any
    match_params: Any
    insert_params: Any
    stand_ins: dict[str, str]


@dataclass(frozen=True, slots=True)
class PeerMissing:
    """Why SGLang's ``RadixCache`` cannot run here."""

    reason: str


def load_peer() -> SglangPeer | PeerMissing:
    """Import SGLang's ``RadixCache`` (see the module docstring)."""
    if importlib.util.find_spec("sglang") is None:
        return PeerMissing("sglang is not installed (make venv installs it)")
    missing = [name for name in STAND_INS if importlib.util.find_spec(name) is None]
    finder = _StandInFinder(missing)
    if missing:
        sys.meta_path.insert(0, finder)
    try:
        radix = importlib.import_module("sglang.srt.mem_cache.radix_cache")
        base = importlib.import_module("sglang.srt.mem_cache.base_prefix_cache")
        version = str(getattr(importlib.import_module("sglang"), "__version__", "?"))
    except Exception as exc:  # any import failure means: no peer here
        return PeerMissing(f"SGLang's radix module does not import here: {exc!r}")
    finally:
        if missing:
            sys.meta_path.remove(finder)
            for name in list(sys.modules):
                if name.partition(".")[0] in finder.placed:
                    del sys.modules[name]
    return SglangPeer(
        version,
        radix.RadixCache,
        radix.RadixKey,
        base.MatchPrefixParams,
        base.InsertParams,
        {name: STAND_INS[name] for name in sorted(finder.placed)},
    )
