"""Test-only import stand-ins for the GPU-only packages that block importing SGLang's storage
modules on a machine without a GPU. Every stand-in raises if anything in it is used: it only
lets an ``import`` statement succeed. A real package, when installed, always wins.

- ``triton``: GPU kernel compiler (about 1 GB). ``sglang.srt.utils.common`` imports it at
  module level, and that module is on the import path of ``sglang.srt.mem_cache.hicache_storage``
  and of the storage backend factory; nothing on that path calls it.
"""

from __future__ import annotations

import importlib.util
import sys
import types

__all__ = ["StandInUsed", "install"]


class StandInUsed(RuntimeError):
    """Code reached into a test-only stand-in: the test needs the real package."""


class _RefusingModule(types.ModuleType):
    def __getattr__(self, name: str) -> object:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)  # import machinery probes (__path__, __file__, ...)
        raise StandInUsed(
            f"{self.__name__}.{name} used, but {self.__name__} is a test-only stand-in "
            "(tests/sglang_stubs.py): install the real package"
        )


#: Stand-in name -> why it is needed (see the module docstring).
STAND_INS = {"triton": "GPU-only kernel compiler imported (not called) by sglang.srt.utils"}


def install() -> list[str]:
    """Put a stand-in in ``sys.modules`` for each missing package; return their names."""
    placed = []
    for name in STAND_INS:
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        sys.modules[name] = _RefusingModule(name)
        placed.append(name)
    return placed
