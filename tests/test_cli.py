"""The ``hicache`` command: the installed console script in a subprocess, and main() in-process."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hicache import cli

_REPO = Path(__file__).resolve().parent.parent
_MEMORY_YAML = _REPO / "configs" / "memory.yaml"


def _hicache(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "hicache"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("HICACHE_")}
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("HICACHE_"):
            monkeypatch.delenv(name)


def test_backends_list_shows_memory() -> None:
    result = _hicache("backends", "list")
    assert result.returncode == 0, result.stderr
    assert "memory" in result.stdout
    assert "hicache.storage.memory:MemoryBackend" in result.stdout


def test_backends_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["backends", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    memory = next(r for r in rows if r["kind"] == "memory")
    assert memory["distribution"] == "hicache" and memory["error"] is None


def test_backends_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["backends", "schema", "memory"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False
    assert {"capacity", "shared_name"} <= set(schema["properties"])


def test_backends_schema_of_unknown_kind_fails_listing_installed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["backends", "schema", "nosuchkind"]) == 1
    err = capsys.readouterr().err
    assert "'nosuchkind'" in err and "installed kinds:" in err and "memory" in err


def test_config_check_accepts_the_shipped_memory_config() -> None:
    result = _hicache("config", "check", str(_MEMORY_YAML))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout and "ram" in result.stdout


def test_config_check_of_a_broken_copy_names_each_bad_path(tmp_path: Path) -> None:
    text = _MEMORY_YAML.read_text()
    assert "capacity: 512MiB" in text and "admission: always" in text
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        text.replace("capacity: 512MiB", "capacty: 512MiB").replace(
            "admission: always", "admission: sometimes"
        )
    )
    result = _hicache("config", "check", str(broken))
    assert result.returncode != 0
    assert "storage.tiers.ram.admission" in result.stderr
    # Phase two needs a valid envelope: fix it and the option typo is reported at its path.
    broken.write_text(text.replace("capacity: 512MiB", "capacty: 512MiB"))
    result = _hicache("config", "check", str(broken))
    assert result.returncode != 0
    assert "storage.tiers.ram.options.capacty" in result.stderr
    assert "did you mean 'capacity'" in result.stderr


def test_config_check_reports_yaml_syntax_with_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage:\n  tiers: [\n")
    assert cli.main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3:" in err and "invalid YAML" in err


def test_config_check_sees_environment_overrides(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HICACHE_STORAGE__TIERS__RAM__OPTIONS__CAPACITY", "not-a-size")
    assert cli.main(["config", "check", str(_MEMORY_YAML)]) == 2
    assert "storage.tiers.ram.options.capacity: invalid size" in capsys.readouterr().err


def test_config_check_lists_applied_and_ignored_variables(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HICACHE_CACHE__PAGE_SIZE", "32")
    monkeypatch.setenv("HICACHE_CACHEX", "1")
    assert cli.main(["config", "check", str(_MEMORY_YAML)]) == 0
    out = capsys.readouterr().out
    assert "with environment overrides: HICACHE_CACHE__PAGE_SIZE" in out
    assert "ignored (no such section): HICACHE_CACHEX" in out


def test_config_show_prints_merged_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HICACHE_CACHE__PAGE_SIZE", "32")
    assert cli.main(["config", "show", str(_MEMORY_YAML)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["cache"]["page_size"] == 32
    assert shown["storage"]["tiers"]["ram"]["backend"] == "memory"


def test_every_subcommand_is_registered() -> None:
    parser = cli.build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert sorted(sub.choices) == ["backends", "bench", "config", "replay", "storage"]
    args = parser.parse_args(["bench", "storage", "--config", "x.yaml", "--exists-batch", "8"])
    assert callable(args.func) and args.exists_batch == 8


def test_parser_requires_a_command() -> None:
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args([])
    assert exc.value.code == 2
    assert isinstance(cli.build_parser(), argparse.ArgumentParser)
