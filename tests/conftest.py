"""Shared pytest set-up for the core tests: hypothesis profiles, and ``run_python``.

``HYPOTHESIS_PROFILE=ci`` (the Makefile's default) bounds examples so the whole suite stays well
under 15 minutes on 2 cores; ``dev`` is the same unless a developer edits it locally. The
profiles live in the ``hicache.testing`` pytest plugin so backends' and plugins' tests get them
too; loading them here as well keeps this directory right even with ``-p no:hicache``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest

from hicache.testing.plugin import load_hypothesis_profiles

load_hypothesis_profiles()


@pytest.fixture
def run_python() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_python(code, timeout=120)``: run ``code`` in a fresh interpreter of this venv and
    return the finished process (output captured, never raises on a non-zero exit), for what
    only a clean process shows: which modules an import pulls in, exit with threads alive."""

    def run(code: str, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run
