"""Settings: one YAML file plus ``HICACHE_*`` environment overrides, validated in two phases.

- ``load_config(path)``        read YAML, merge the environment, validate both phases
- ``validate_tiers(config)``   phase two alone: each tier's ``options`` against its plugin's model
- ``parse_size("8GiB")``       sizes as people write them (see :mod:`hicache.storage.sizes`)

Phase one is the models of the sections ``cache``, ``model``, ``storage``, ``events``
(:mod:`hicache.config_sections`, every public name re-exported here), and for each tier its
envelope (``backend``, ``publish``, ``read_only``, ``medium``, ``admission``, engine knobs).
Phase two asks the registry for each tier's backend class and validates
``options`` with its ``config_model``; no storage is touched. Every problem becomes one
``<yaml.path>: <problem>`` line of a :class:`~hicache.errors.ConfigError`, all problems at once.

Environment variables address any value with ``__`` between levels, and merge into the file
instead of replacing whole sections: ``HICACHE_STORAGE__TIERS__NVME__OPTIONS__ROOT=/mnt/x``
changes one option of tier ``nvme`` and keeps the rest of that tier as the file wrote it. Names
are case-insensitive, which is why tier names are lowercase identifiers.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from hicache.config_sections import (
    DTYPE_BYTES,
    TOPIC_FIELDS,
    CacheConfig,
    EventsConfig,
    EventsMode,
    ModelConfig,
    PrefetchConfig,
    StorageConfig,
    TierConfig,
    TierSettings,
    WritePolicy,
)
from hicache.errors import ConfigError, PluginError
from hicache.storage.backend import BackendConfig
from hicache.storage.sizes import parse_size
from hicache.tiering.admission import Admission
from hicache.tiering.prefetch import PrefetchPolicy

__all__ = [
    "DTYPE_BYTES",
    "TOPIC_FIELDS",
    "Admission",
    "CacheConfig",
    "EventsConfig",
    "EventsMode",
    "HicacheConfig",
    "ModelConfig",
    "PrefetchConfig",
    "PrefetchPolicy",
    "StorageConfig",
    "TierConfig",
    "TierSettings",
    "WritePolicy",
    "env_ignored",
    "env_overrides",
    "load_config",
    "parse_size",
    "validate_tiers",
]

ENV_PREFIX = "HICACHE_"
ENV_DELIMITER = "__"

#: Nesting a configuration file may have. Real ones stay under ten levels; the limit keeps a
#: hostile or generated file from exhausting the recursion of the YAML composer.
MAX_YAML_DEPTH = 64
#: Largest configuration file read.
MAX_FILE_BYTES = 16 << 20


class HicacheConfig(BaseSettings):
    """The whole configuration. Build it with :func:`load_config`.

    Constructed directly, keyword arguments play the file's role: ``HICACHE_*`` environment
    variables still override (and merge into) them.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        case_sensitive=False,
        extra="forbid",
        validate_default=True,
        allow_inf_nan=False,
        nested_model_default_partial_update=False,
    )

    cache: CacheConfig = Field(default_factory=CacheConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file arrives as init keywords; the environment wins over it (and the sources are
        # deep-merged, so a variable replaces one value, not its section).
        return (env_settings, init_settings)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page (what every tier's ``BackendContext.page_bytes`` holds)."""
        return self.model.page_bytes(self.cache.page_size)


def _yaml_error(path: Path, exc: Exception) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    detail = f"{context}, {problem}" if context else problem
    return ConfigError(f"{where}: invalid YAML: {detail}")


def _read_text(path: Path) -> str:
    # O_NONBLOCK: a FIFO under the config's name is refused below instead of blocking the open.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"cannot read config file {path}: it is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"cannot read config file {path}: not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise ConfigError(
                f"cannot read config file {path}: {info.st_size} bytes, "
                f"more than the {MAX_FILE_BYTES} a configuration may have"
            )
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


def _check_depth(path: Path, text: str) -> None:
    import yaml

    # The parser is a state machine (the composer that builds objects is what recurses), so
    # walking its events bounds the nesting before anything deep is built.
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                mark = event.start_mark
                where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
                raise ConfigError(f"{where}: nested deeper than {MAX_YAML_DEPTH} levels")
        elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            depth -= 1


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml  # only needed when a file is read

    class _StrictLoader(yaml.SafeLoader):
        """SafeLoader that refuses duplicate keys (YAML would silently keep the last one)."""

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)
            if key in seen:
                mark = key_node.start_mark
                raise ConfigError(
                    f"{path}:{mark.line + 1}:{mark.column + 1}: duplicate key {key!r}"
                )
            seen.add(key)
        return dict(loader.construct_mapping(node))

    _StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    text = _read_text(path)
    try:
        _check_depth(path, text)
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"
        )
    odd = [key for key in data if not isinstance(key, str)]
    if odd:
        raise ConfigError(f"{path}: section names must be strings, got {odd[0]!r}")
    return data


def _messages(exc: ValidationError, prefix: str = "") -> list[str]:
    from hicache.storage.registry import validation_messages

    return validation_messages(exc, prefix)


def _raise_all(problems: list[str], origin: str) -> None:
    if len(problems) == 1:
        raise ConfigError(f"{origin}: {problems[0]}")
    if problems:
        body = "\n".join(f"  {line}" for line in problems)
        raise ConfigError(f"{len(problems)} problems in {origin}:\n{body}")


def validate_tiers(config: HicacheConfig, *, origin: str = "config") -> dict[str, BackendConfig]:
    """Phase two: validate each tier's ``options`` with its plugin's model (no storage I/O).

    Returns tier name -> validated options model. Raises :class:`~hicache.errors.ConfigError`
    listing every problem at its YAML path (unknown backend kinds and broken plugins included,
    at ``storage.tiers.<name>.backend``).
    """
    from hicache.storage import registry

    problems: list[str] = []
    validated: dict[str, BackendConfig] = {}
    for name, tier in config.storage.tiers.items():
        base = f"storage.tiers.{name}"
        try:
            validated[name] = registry.validate_options(
                tier.backend, tier.options, path=f"{base}.options"
            )
        except PluginError as exc:
            problems.append(f"{base}.backend: {exc}")
        except ConfigError as exc:
            problems.extend(str(exc).splitlines())
    _raise_all(problems, origin)
    return validated


def load_config(path: str | Path | None = None, *, check_tiers: bool = True) -> HicacheConfig:
    """Load ``path`` (YAML; ``None`` = defaults only), merge ``HICACHE_*`` variables, validate.

    With ``check_tiers`` (the default) phase two runs too (:func:`validate_tiers`). Every problem
    is reported in one :class:`~hicache.errors.ConfigError`, each line naming its YAML path;
    YAML syntax errors name the file, line and column.
    """
    data: dict[str, Any] = {}
    origin = "environment/defaults"
    if path is not None:
        file = Path(path)
        data = _read_yaml(file)
        origin = str(file)
    try:
        config = HicacheConfig(**data)
    except ValidationError as exc:
        _raise_all(_messages(exc), origin)
        raise  # unreachable: _raise_all raised
    except (SettingsError, RecursionError) as exc:
        # pydantic-settings decodes variables of structured settings as JSON and names only the
        # section when one fails: find the variable, so the message says what to fix.
        raise _env_json_error(exc) from None
    if check_tiers:
        validate_tiers(config, origin=origin)
    return config


def _env_json_error(exc: Exception) -> ConfigError:
    # Variables are never echoed: one may hold a credential.
    for name, value in sorted(env_overrides().items()):
        if not value.lstrip().startswith(("{", "[")):
            continue
        where = f"{name} ({_env_yaml_path(name)})"
        try:
            json.loads(value)
        except json.JSONDecodeError as err:
            return ConfigError(f"{where}: invalid JSON: {err.msg} at character {err.pos}")
        except RecursionError:
            return ConfigError(f"{where}: JSON nested too deeply")
    return ConfigError(f"HICACHE_* environment: {exc}")


def _env_yaml_path(name: str) -> str:
    return ".".join(name[len(ENV_PREFIX) :].lower().split(ENV_DELIMITER))


def env_overrides() -> dict[str, str]:
    """The ``HICACHE_*`` variables that address a setting (for ``hicache config check``)."""
    return {k: v for k, v in os.environ.items() if _env_section(k) in HicacheConfig.model_fields}


def env_ignored() -> list[str]:
    """``HICACHE_*`` variables that address no section (typos, or other tools' variables)."""
    return sorted(
        k
        for k in os.environ
        if _env_section(k) is not None and _env_section(k) not in HicacheConfig.model_fields
    )


def _env_section(name: str) -> str | None:
    if not name.upper().startswith(ENV_PREFIX):
        return None
    return name[len(ENV_PREFIX) :].split(ENV_DELIMITER, 1)[0].lower()
