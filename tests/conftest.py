"""Shared pytest set-up for the core tests: hypothesis profiles.

``HYPOTHESIS_PROFILE=ci`` (the Makefile's default) bounds examples so the whole suite stays well
under 15 minutes on 2 cores; ``dev`` is the same unless a developer edits it locally. The
profiles live in the ``hicache.testing`` pytest plugin so backends' and plugins' tests get them
too; loading them here as well keeps this directory right even with ``-p no:hicache``.
"""

from __future__ import annotations

from hicache.testing.plugin import load_hypothesis_profiles

load_hypothesis_profiles()
