"""The helper modules beside these tests (tiny_model, observed_tier, cpu_spec) are imported by
name, here and by the engine processes the tests start (through PYTHONPATH)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
