"""pytest plugin registered under ``pytest11``: markers the conformance kit and its users share.

It also asks pytest to rewrite the kit's asserts, so a failing conformance test shows the
compared values in any project that subclasses ``BackendTests``.
"""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("hicache.testing.kit")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running test")
    config.addinivalue_line(
        "markers", "conformance: a test of the hicache storage-backend conformance kit"
    )
