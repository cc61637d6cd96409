"""The storage side (contract, registry, config, kit, CLI) imports no torch: checked in a fresh
interpreter, so nothing another test imported can hide a regression."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

#: The ``run_python`` fixture of tests/conftest.py.
RunPython = Callable[..., "subprocess.CompletedProcess[str]"]

_MODULES = [
    "hicache",
    "hicache.storage",
    "hicache.event_publisher",
    "hicache.storage.registry",
    "hicache.storage.memory",
    "hicache.config",
    "hicache.testing",
    "hicache.testing.kit",
    "hicache.cli",
]


@pytest.mark.parametrize("module", _MODULES)
def test_import_does_not_import_torch(module: str, run_python: RunPython) -> None:
    code = (
        "import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print(len(bad), bad[:3])\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, f"{module} imported torch: {result.stdout}{result.stderr}"


def test_loading_every_installed_backend_does_not_import_torch(run_python: RunPython) -> None:
    code = (
        "import sys\n"
        "from hicache.storage.registry import installed_backends\n"
        "infos = installed_backends()\n"
        "assert any(i.kind == 'memory' for i in infos), infos\n"
        "sys.exit(1 if 'torch' in sys.modules else 0)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stdout + result.stderr
