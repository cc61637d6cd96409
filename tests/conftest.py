"""Shared pytest set-up for the core tests: hypothesis profiles.

``HYPOTHESIS_PROFILE=ci`` (the Makefile's default) bounds examples so the whole suite stays well
under 15 minutes on 2 cores; ``dev`` is the same unless a developer edits it locally.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
settings.register_profile("ci", max_examples=30, print_blob=True, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("dev", max_examples=30, **_COMMON)  # type: ignore[arg-type]
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
