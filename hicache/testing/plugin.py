"""pytest plugin registered under ``pytest11``: what the conformance kit and its users share.

- markers ``cuda``, ``slow``, ``conformance``
- hypothesis profiles ``ci`` (bounded examples, no deadline: the Makefile sets
  ``HYPOTHESIS_PROFILE=ci``) and ``dev`` (the same for now), loaded from ``HYPOTHESIS_PROFILE``
  (default ``dev``). Registered here rather than in one ``conftest.py`` so the tests under
  ``backends/`` and ``plugins/`` get them too.
- assertion rewriting for the kit, so a failing conformance test shows the compared values
"""

from __future__ import annotations

import os

import pytest

pytest.register_assert_rewrite("hicache.testing.kit", "hicache.testing.kit_parts")

#: Examples per hypothesis test under the ``ci`` and ``dev`` profiles.
CI_MAX_EXAMPLES = 30


def load_hypothesis_profiles() -> str | None:
    """Register the ``ci`` and ``dev`` profiles and load ``$HYPOTHESIS_PROFILE``; return it.

    Returns None (and does nothing) where hypothesis is not installed: this plugin loads in
    every pytest run of an environment that has hicache, test extra or not.
    """
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:
        return None

    relaxed = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile(
        "ci",
        max_examples=CI_MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=relaxed,
        print_blob=True,
    )
    settings.register_profile(
        "dev", max_examples=CI_MAX_EXAMPLES, deadline=None, suppress_health_check=relaxed
    )
    name = os.environ.get("HYPOTHESIS_PROFILE", "dev")
    settings.load_profile(name)
    return name


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running test")
    config.addinivalue_line(
        "markers", "conformance: a test of the hicache storage-backend conformance kit"
    )
    load_hypothesis_profiles()
