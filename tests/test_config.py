"""Config: YAML + HICACHE_* environment (merged), two-phase validation, errors at YAML paths."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from hicache.config import (
    Admission,
    HicacheConfig,
    load_config,
    parse_size,
    validate_tiers,
)
from hicache.errors import ConfigError
from hicache.storage import memory
from hicache.storage.memory import MemoryConfig

_BASE = """
cache: {page_size: 16, host_pool: 64MiB}
model: {name: tiny, num_layers: 2, num_kv_heads: 2, head_dim: 64, dtype: float16}
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("HICACHE_"):
            monkeypatch.delenv(name)


def _write(tmp_path: Path, body: str, name: str = "hicache.yaml") -> Path:
    path = tmp_path / name
    path.write_text(_BASE + textwrap.dedent(body))
    return path


def _problems(exc: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    # one problem: "<origin>: <yaml.path>: <problem>" on one line; several: a header, then one
    # indented line each
    lines = str(exc.value).splitlines()
    if len(lines) == 1:
        return [lines[0].split(": ", 1)[1]]
    return [line.strip() for line in lines[1:]]


def test_valid_file_loads_with_sizes_parsed_and_tiers_in_order(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
        storage:
          tiers:
            zeta: {backend: memory, options: {capacity: 8MiB}}
            alpha: {backend: memory, admission: second_hit, max_inflight_bytes: 1.5GiB}
        """,
    )
    config = load_config(path)
    assert config.cache.host_pool == 64 << 20
    assert list(config.storage.tiers) == ["zeta", "alpha"]  # lookup order is file order
    assert config.storage.tiers["alpha"].admission is Admission.SECOND_HIT
    assert config.storage.tiers["alpha"].max_inflight_bytes == 3 << 29
    assert config.page_bytes == 2 * 2 * 2 * 64 * 16 * 2
    validated = validate_tiers(config)
    assert isinstance(validated["zeta"], MemoryConfig)
    assert validated["zeta"].capacity == 8 << 20


def test_typo_in_backend_option_is_reported_at_its_yaml_path(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
        storage:
          tiers:
            nvme: {backend: memory, options: {capacty: 8MiB, max_batch: -1}}
        """,
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    problems = _problems(exc)
    assert str(path) in str(exc.value).splitlines()[0]
    assert any(
        p.startswith("storage.tiers.nvme.options.capacty: unknown option (did you mean 'capacity'")
        for p in problems
    ), problems
    assert any(p.startswith("storage.tiers.nvme.options.max_batch:") for p in problems), problems


def test_envelope_errors_are_reported_at_their_paths_all_at_once(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
        storage:
          tiers:
            ok: {backend: memory}
            bad: {backend: memory, admission: sometimes, deadline_s: 0, pubish: true}
            Upper: {backend: memory}
        """,
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    problems = _problems(exc)
    joined = "\n".join(problems)
    assert "storage.tiers.bad.admission:" in joined
    assert "storage.tiers.bad.deadline_s:" in joined
    assert "storage.tiers.bad.pubish: unknown key" in joined
    assert "storage.tiers.Upper: invalid tier name 'Upper'" in joined
    assert len(problems) == 4


def test_unknown_backend_is_reported_at_the_backend_path(tmp_path: Path) -> None:
    path = _write(tmp_path, "storage: {tiers: {far: {backend: nosuchkind}}}\n")
    config = load_config(path, check_tiers=False)  # phase one alone accepts the envelope
    with pytest.raises(ConfigError) as exc:
        validate_tiers(config)
    [problem] = _problems(exc)
    assert problem.startswith("storage.tiers.far.backend: no storage backend of kind 'nosuchkind'")
    assert "memory" in problem  # installed kinds are listed


def test_env_override_of_one_tier_option_merges_into_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(
        tmp_path,
        """
        storage:
          tiers:
            first: {backend: memory, options: {capacity: 8MiB, max_batch: 16}}
            nvme: {backend: memory, medium: DISK, options: {capacity: 8MiB, max_batch: 32}}
        """,
    )
    monkeypatch.setenv("HICACHE_STORAGE__TIERS__NVME__OPTIONS__CAPACITY", "16MiB")
    monkeypatch.setenv("HICACHE_STORAGE__TIERS__NVME__PUBLISH", "false")
    monkeypatch.setenv("HICACHE_CACHE__PAGE_SIZE", "32")
    config = load_config(path)
    nvme = config.storage.tiers["nvme"]
    assert nvme.options == {"capacity": "16MiB", "max_batch": 32}  # sibling option kept
    assert nvme.medium == "DISK" and nvme.publish is False and nvme.backend == "memory"
    assert list(config.storage.tiers) == ["first", "nvme"]
    assert config.storage.tiers["first"].options == {"capacity": "8MiB", "max_batch": 16}
    assert config.cache.page_size == 32 and config.cache.host_pool == 64 << 20
    assert config.model.name == "tiny"
    opts = validate_tiers(config)["nvme"]
    assert isinstance(opts, MemoryConfig)
    assert opts.capacity == 16 << 20


def test_env_override_errors_name_the_yaml_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, "storage: {tiers: {ram: {backend: memory}}}\n")
    monkeypatch.setenv("HICACHE_STORAGE__TIERS__RAM__OPTIONS__CAPACITY", "lots")
    monkeypatch.setenv("HICACHE_STORAGE__TIERZ", "{}")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert _problems(exc) == ["storage.tierz: unknown key"]
    monkeypatch.delenv("HICACHE_STORAGE__TIERZ")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    [problem] = _problems(exc)
    assert problem.startswith("storage.tiers.ram.options.capacity: invalid size 'lots'")


def test_env_can_add_a_tier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "storage: {tiers: {ram: {backend: memory}}}\n")
    monkeypatch.setenv("HICACHE_STORAGE__TIERS__EXTRA__BACKEND", "memory")
    monkeypatch.setenv("HICACHE_STORAGE__TIERS__EXTRA__READ_ONLY", "true")
    config = load_config(path)
    assert list(config.storage.tiers) == ["ram", "extra"]
    extra = config.storage.tiers["extra"]
    assert extra.read_only and not extra.publish  # read-only tiers do not publish by default


def test_env_addresses_tier_names_with_underscores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, "storage: {tiers: {local_ram: {backend: memory, options: {}}}}\n")
    monkeypatch.setenv("HICACHE_STORAGE__TIERS__LOCAL_RAM__OPTIONS__MAX_BATCH", "16")
    monkeypatch.setenv("HICACHE_STORAGE__TIERS__LOCAL_RAM__ADMISSION", "second_hit")
    config = load_config(path)
    tier = config.storage.tiers["local_ram"]
    assert tier.admission is Admission.SECOND_HIT
    opts = validate_tiers(config)["local_ram"]
    assert isinstance(opts, MemoryConfig) and opts.max_batch == 16


def test_read_only_tier_cannot_be_told_to_publish(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "storage: {tiers: {ro: {backend: memory, read_only: true, publish: true}}}\n"
    )
    with pytest.raises(ConfigError, match=r"storage\.tiers\.ro: a read_only tier cannot publish"):
        load_config(path)


def test_bad_yaml_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("cache:\n  page_size: 16\nstorage:\n  tiers: {ram: {backend: memory}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    message = str(exc.value)
    assert message.startswith(f"{path}:5:1: invalid YAML")


def test_duplicate_yaml_keys_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("storage:\n  tiers:\n    ram: {backend: memory}\n    ram: {backend: memory}\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml:4:5: duplicate key 'ram'"):
        load_config(path)


def test_top_level_must_be_a_mapping_and_file_must_exist(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)
    path.write_text("1: {page_size: 4}\n")
    with pytest.raises(ConfigError, match="section names must be strings"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_defaults_without_a_file() -> None:
    config = load_config(None)
    assert config.storage.tiers == {}
    assert config.cache.host_pool == 8 << 30
    assert isinstance(config, HicacheConfig)


def test_validate_tiers_does_no_storage_io(tmp_path: Path) -> None:
    name = "config-test-no-io"
    path = _write(
        tmp_path,
        f"storage: {{tiers: {{ram: {{backend: memory, options: {{shared_name: {name}}}}}}}}}\n",
    )
    validate_tiers(load_config(path))
    # Opening a shared memory tier would have created its store; validation must not.
    assert name not in memory._shared_stores


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("8GiB", 8 << 30),
        ("512MiB", 512 << 20),
        ("512 mib", 512 << 20),
        ("1.5GiB", 3 << 29),
        ("8G", 8 << 30),
        ("100MB", 100_000_000),
        ("2kB", 2000),
        ("1TiB", 1 << 40),
        ("0", 0),
        ("7B", 7),
    ],
)
def test_sizes_parse(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "-1", -1, "1.5B", "8 GiBs", "1e3", "eight", True])
def test_bad_sizes_are_rejected_naming_the_value(text: object) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)  # type: ignore[arg-type]


def test_rejected_secret_values_are_not_echoed() -> None:
    """A bad value of a secret-looking option never appears in the error (it reaches logs)."""
    from pydantic import BaseModel, ValidationError

    from hicache.storage.registry import validation_messages

    class Opts(BaseModel):
        access_key: int
        depth: int

    try:
        Opts(access_key="AKIA-super-secret", depth="deep")  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = validation_messages(exc, "storage.tiers.s3.options")
    joined = "\n".join(lines)
    assert "storage.tiers.s3.options.access_key" in joined
    assert "super-secret" not in joined
    assert "'deep'" in joined  # ordinary values are still shown


def test_retry_and_prefetch_timeout_knobs_reach_the_tiers() -> None:
    from hicache.config import HicacheConfig
    from hicache.storage import BackendContext, MemoryBackend, MemoryConfig
    from hicache.tiering.prefetch import PrefetchRules
    from hicache.tiering.tiers import Tier

    config = HicacheConfig(
        storage={
            "prefetch": {"policy": "timeout", "timeout_s": 1.0, "timeout_per_1k_tokens_s": 0.5},
            "tiers": {
                "ram": {
                    "backend": "memory",
                    "retry_attempts": 5,
                    "retry_backoff_s": 0.1,
                    "retry_backoff_max_s": 1.0,
                }
            },
        }
    )
    backend = MemoryBackend(MemoryConfig(), BackendContext(page_bytes=64, namespace="n"))
    retry = Tier("ram", backend, config.storage.tiers["ram"]).caller.retry
    assert (retry.attempts, retry.backoff_s) == (5, 0.1)
    assert retry.delay(10) == 1.0
    rules = PrefetchRules.from_config(config.storage.prefetch)
    assert rules.timeout_per_1k_tokens_s == 0.5
    assert rules.timeout_max_s == 4.0
    assert rules.wait_budget(2000) == 2.0  # base 1.0 + 2 * 0.5
