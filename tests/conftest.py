"""Shared pytest set-up for the core tests: hypothesis profiles, ``run_python`` and a small
replay trace (``reuse_trace``).

``HYPOTHESIS_PROFILE=ci`` (the Makefile's default) bounds examples so the whole suite stays well
under 15 minutes on 2 cores; ``dev`` is the same unless a developer edits it locally. The
profiles live in the ``hicache.testing`` pytest plugin so backends' and plugins' tests get them
too; loading them here as well keeps this directory right even with ``-p no:hicache``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

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


@pytest.fixture
def reuse_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Mooncake-format trace (one 8-block prompt per conversation) whose requests hit
    every level of a replay at the usual fractions: each new conversation is followed by a
    revisit of the one 4 back (gone from L1, still in L2) and of the one 16 back (only in L3)."""
    path = tmp_path_factory.mktemp("trace") / "reuse.jsonl"
    rows = []
    for i in range(40):
        for conv in (i, i - 4, i - 16):
            if conv >= 0:
                ids = [0, *range(1 + 8 * conv, 8 + 8 * conv)]  # a shared first block
                rows.append(
                    {
                        "timestamp": len(rows),
                        "input_length": 4096,
                        "output_length": 1,
                        "hash_ids": ids,
                    }
                )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
