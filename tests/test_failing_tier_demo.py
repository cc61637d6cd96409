"""The failing-tier demo (``scripts/failing_tier_demo.py``) runs, and its counters show every
injected fault: retries, an opened and re-closed breaker, timeouts with late returns, drops,
evictions, promotion and a vanished page, with host holds back to zero."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "failing_tier_demo.py"


def test_failing_tier_demo_counters() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--requests", "120"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["host_holds_after"] == [0, 0]
    remote = report["instance_a"]["tiers"]["remote"]
    assert remote["retries"] > 0 and remote["failures"]["unavailable"] > 0
    assert remote["breaker"]["opened"] >= 1 and remote["breaker"]["closed_after_probe"] >= 1
    assert remote["failures"]["timeout"] >= 1 and remote["late_returns"] >= 1
    assert remote["dropped_breaker"] > 0 and remote["put_failed"] > 0
    assert remote["evicted_pages"] > 0 and remote["unannounced_pages"] > 0
    shm = report["instance_a"]["tiers"]["shm"]
    assert shm["announced_pages"] == shm["put_pages"] and shm["failures"] == {}
    b = report["instance_b"]
    assert b["promoted_pages"] > 0 and b["tiers"]["remote"]["put_pages"] == 0
    assert b["tiers"]["remote"]["get_not_found"] == 1  # the page that vanished
