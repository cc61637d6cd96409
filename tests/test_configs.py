"""Every YAML in configs/ loads and passes both validation phases, so examples cannot rot.

A config whose backend kind is not installed fails here (it does not skip): `make venv` installs
every backend and plugin of the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hicache.config import load_config, validate_tiers

_CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.y*ml"))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("HICACHE_"):
            monkeypatch.delenv(name)


def test_configs_exist() -> None:
    assert any(p.name == "memory.yaml" for p in _CONFIGS), _CONFIGS


@pytest.mark.parametrize("path", _CONFIGS, ids=[p.name for p in _CONFIGS])
def test_config_loads_and_validates(path: Path) -> None:
    config = load_config(path)
    assert config.storage.tiers, f"{path.name} configures no storage tier"
    validated = validate_tiers(config)
    assert set(validated) == set(config.storage.tiers)
    assert config.page_bytes > 0
