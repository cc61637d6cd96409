"""Find, load and check storage backends installed as entry points (group ``hicache.backends``).

- ``load_backend_class(kind)``  import the one backend class registered as ``kind``, checked
- ``installed_backends()``      every registered kind, its distribution, version, and whether it
                                loads (for ``hicache backends list``)
- ``validate_options(kind, options, path=...)``  the plugin's options model, errors at YAML paths
- ``create_backend(kind, options, context, path=...)``  validate options, construct (no I/O)

Only the configured kind is ever imported (through stevedore's ``DriverManager``): a broken
plugin that nobody configured cannot break the cache. Which kinds exist, and which distribution
registers each, comes from the installed metadata (``importlib.metadata``), which stays right
even when stevedore's on-disk entry-point cache is stale. After loading, this module checks
what stevedore does not: the object is a concrete :class:`~hicache.storage.backend.Backend`
subclass, its ``api_version`` matches, and its ``config_model`` is a
:class:`~hicache.storage.backend.BackendConfig`. Every failure is a
:class:`~hicache.errors.PluginError` whose message names the kind, the entry point and the
installed kinds. Two distributions registering the same kind is an error, never a silent pick.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from pydantic import BaseModel, ValidationError

from hicache.errors import (
    BackendConflictError,
    BackendContractError,
    BackendLoadError,
    BackendNotFoundError,
    ConfigError,
    PluginError,
)
from hicache.storage.backend import API_VERSION, Backend, BackendConfig, BackendContext
from hicache.storage.redact import is_secret_name, redact

__all__ = [
    "ENTRY_POINT_GROUP",
    "KNOWN_DISTRIBUTIONS",
    "PluginInfo",
    "clear_caches",
    "create_backend",
    "installed_backends",
    "load_backend_class",
    "validate_options",
    "validation_messages",
]

logger = logging.getLogger(__name__)

#: The entry-point group every backend registers under: ``kind = "module:Class"``.
ENTRY_POINT_GROUP = "hicache.backends"

#: Distributions known to provide a kind, named in the error when that kind is not installed.
KNOWN_DISTRIBUTIONS: Mapping[str, str] = {
    "localdisk": "hicache-localdisk",
    "mmap": "hicache-mmap",
    "s3": "hicache-s3",
    "fsspec": "hicache-fsspec",
}


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """One registration of a backend kind, as ``hicache backends list`` shows it."""

    kind: str
    #: ``module:attribute`` the entry point names.
    target: str
    #: Distribution that registers it (``"?"`` when the metadata cannot tell).
    distribution: str
    version: str
    #: Why the kind cannot be used (import failure, contract violation, conflict), else None.
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the kind loads and passes the contract checks."""
        return self.error is None


@dataclass(frozen=True, slots=True)
class _Registration:
    kind: str
    target: str
    distribution: str
    version: str

    def describe(self) -> str:
        return f"'{self.kind} = {self.target}' (from {self.distribution} {self.version})"


def clear_caches() -> None:
    """Forget cached entry points (stevedore's and importlib's), e.g. after ``sys.path`` changed."""
    from stevedore import ExtensionManager

    ExtensionManager.ENTRY_POINT_CACHE.pop(ENTRY_POINT_GROUP, None)
    importlib.invalidate_caches()


def _stevedore_entry_points() -> list[importlib.metadata.EntryPoint]:
    # Imported here so `import hicache.storage.registry` stays cheap for the CLI's --help.
    from stevedore import NamedExtensionManager

    # An empty name list loads nothing; it is stevedore's cached listing of the group we want.
    manager: NamedExtensionManager[Any] = NamedExtensionManager(
        ENTRY_POINT_GROUP, names=(), on_missing_entrypoints_callback=None
    )
    return list(manager.list_entry_points())


def _registrations() -> dict[str, list[_Registration]]:
    """Every registration of every kind, grouped by kind, in ``sys.path`` order."""
    # stevedore's entry points carry no distribution, so the owning distribution comes from
    # importlib.metadata (which keeps only the first copy of a distribution found twice on
    # sys.path, as the import system would). The metadata is also the authority on what exists:
    # stevedore's on-disk cache is keyed by float32 mtimes, so a plugin reinstalled within about
    # two minutes can be missing from (or stale in) its listing; see _load.
    found: dict[str, list[_Registration]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        name = dist.metadata["Name"] if dist is not None else None
        version = dist.version if dist is not None else None
        reg = _Registration(ep.name, ep.value, name or "?", version or "?")
        regs = found.setdefault(ep.name, [])
        if reg not in regs:
            regs.append(reg)
    return found


def _installed_summary(found: Mapping[str, list[_Registration]]) -> str:
    if not found:
        return "no backends are installed"
    return "installed kinds: " + ", ".join(sorted(found))


def _resolve(kind: str) -> tuple[_Registration, dict[str, list[_Registration]]]:
    found = _registrations()
    regs = found.get(kind)
    if not regs:
        hint = ""
        if kind in KNOWN_DISTRIBUTIONS:
            hint = (
                f"; it is provided by the distribution {KNOWN_DISTRIBUTIONS[kind]!r} (install it)"
            )
        else:
            close = difflib.get_close_matches(kind, list(found), n=1)
            if close:
                hint = f"; did you mean {close[0]!r}?"
        raise BackendNotFoundError(
            f"no storage backend of kind {kind!r} is installed "
            f"(entry-point group {ENTRY_POINT_GROUP!r}){hint}; {_installed_summary(found)}"
        )
    dists = {(reg.distribution, reg.target) for reg in regs}
    if len(dists) > 1:
        claims = "; ".join(reg.describe() for reg in regs)
        raise BackendConflictError(
            f"backend kind {kind!r} is registered by {len(regs)} distributions: {claims}. "
            "Uninstall all but one; hicache never picks one silently. "
            f"{_installed_summary(found)}"
        )
    return regs[0], found


def _check_class(obj: object, reg: _Registration, found: Mapping[str, Any]) -> type[Backend]:
    where = f"backend kind {reg.kind!r}: entry point {reg.describe()}"
    installed = _installed_summary(found)
    if not isinstance(obj, type):
        raise BackendContractError(
            f"{where} refers to a {type(obj).__name__}, not a Backend subclass; {installed}"
        )
    if not issubclass(obj, Backend):
        raise BackendContractError(
            f"{where} refers to class {obj.__qualname__}, which does not subclass "
            f"hicache.storage.Backend; {installed}"
        )
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(getattr(obj, "__abstractmethods__", ())))
        raise BackendContractError(
            f"{where} refers to abstract class {obj.__qualname__} "
            f"(unimplemented: {missing}); {installed}"
        )
    version = getattr(obj, "api_version", None)
    if version != API_VERSION:
        raise BackendContractError(
            f"{where} implements storage API version {version!r}, but this hicache speaks "
            f"version {API_VERSION}; install a matching release of {reg.distribution}; {installed}"
        )
    model = getattr(obj, "config_model", None)
    if not (isinstance(model, type) and issubclass(model, BackendConfig)):
        raise BackendContractError(
            f"{where}: config_model must be a hicache.storage.BackendConfig subclass, "
            f"got {model!r}; {installed}"
        )
    return obj


def load_backend_class(kind: str) -> type[Backend]:
    """Import and check the backend class registered as ``kind``; import nothing else.

    Raises :class:`~hicache.errors.BackendNotFoundError` (unknown kind),
    :class:`BackendConflictError` (several distributions claim it),
    :class:`~hicache.errors.BackendLoadError` (the import failed; the cause is chained) or
    :class:`~hicache.errors.BackendContractError` (not a concrete ``Backend`` subclass, wrong
    ``api_version``, bad ``config_model``).
    """
    reg, found = _resolve(kind)

    def on_failure(_manager: object, _ep: object, err: BaseException) -> NoReturn:
        raise BackendLoadError(
            f"backend kind {kind!r}: importing entry point {reg.describe()} failed: "
            f"{type(err).__name__}: {err}; {_installed_summary(found)}"
        ) from err

    listed = {(ep.name, ep.value) for ep in _stevedore_entry_points()}
    if (kind, reg.target) in listed:
        from stevedore import DriverManager

        manager: DriverManager[Any] = DriverManager(
            ENTRY_POINT_GROUP,
            kind,
            on_load_failure_callback=on_failure,
            on_missing_entrypoints_callback=None,
        )
        obj = manager.driver
    else:
        # stevedore's cached listing is stale (see _registrations): load what is installed.
        logger.warning(
            "stevedore's entry-point cache does not list %s; loading it from the installed "
            "metadata (clear ~/.cache/python-entrypoints to refresh the cache)",
            reg.describe(),
        )
        entry_point = importlib.metadata.EntryPoint(kind, reg.target, ENTRY_POINT_GROUP)
        try:
            obj = entry_point.load()
        except Exception as exc:
            on_failure(None, entry_point, exc)
    return _check_class(obj, reg, found)


def installed_backends() -> list[PluginInfo]:
    """Every registered kind (sorted), loaded and checked; broken ones carry their reason.

    Unlike :func:`load_backend_class` this imports every registered plugin: it is meant for
    ``hicache backends list``, not for the serving path.
    """
    infos: list[PluginInfo] = []
    for kind, regs in sorted(_registrations().items()):
        error: str | None = None
        try:
            load_backend_class(kind)
        except PluginError as exc:
            error = str(exc)
        for reg in regs:
            infos.append(PluginInfo(kind, reg.target, reg.distribution, reg.version, error))
    return infos


def _format_loc(path: str, loc: tuple[int | str, ...]) -> str:
    out = path
    for part in loc:
        if part == "[key]":  # pydantic's marker for a failing mapping key: the key is the path
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else str(part)
    return out


def _show_input(value: object, where: str = "") -> str:
    # Scalars only: echoing a whole mapping back buries the problem. Never echo what may be a
    # secret (by name, type or URL userinfo): the message reaches logs and terminals.
    if any(is_secret_name(part) for part in re.split(r"[.\[\]]", where)):
        return ""
    if isinstance(value, str | int | float | bool) or value is None:
        text = repr(redact(value))
        if len(text) <= 80:
            return f" (got {text})"
    return ""


def validation_messages(
    err: ValidationError, path: str, model: type[BaseModel] | None = None
) -> list[str]:
    """Turn a pydantic error into ``"<yaml.path>: <problem>"`` lines, one per problem.

    ``path`` is the YAML path of the validated mapping (``storage.tiers.nvme.options``). With
    ``model``, an unknown key is reported with the known ones and the closest match.
    """
    lines: list[str] = []
    for item in err.errors(include_url=False):
        loc = tuple(item["loc"])
        where = _format_loc(path, loc)
        kind = item["type"]
        if kind == "extra_forbidden":
            known = sorted(model.model_fields) if model is not None and len(loc) == 1 else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            listing = f"; known options: {', '.join(known)}" if known else ""
            lines.append(f"{where}: unknown {'option' if known else 'key'}{hint}{listing}")
        elif kind == "missing":
            lines.append(f"{where}: required but missing")
        elif kind == "value_error" and "error" in item.get("ctx", {}):
            lines.append(f"{where}: {item['ctx']['error']}{_show_input(item.get('input'), where)}")
        else:
            lines.append(f"{where}: {item['msg']}{_show_input(item.get('input'), where)}")
    return lines


def validate_options(
    kind: str, options: Mapping[str, Any], *, path: str = "options"
) -> BackendConfig:
    """Validate ``options`` with the ``config_model`` of ``kind``; return the model instance.

    Raises :class:`~hicache.errors.ConfigError` whose message has one ``path.field: problem``
    line per problem (``storage.tiers.nvme.options.root: required but missing``), plus the
    plugin errors of :func:`load_backend_class`.
    """
    cls = load_backend_class(kind)
    return _validate_with(cls, kind, options, path)


def _validate_with(
    cls: type[Backend], kind: str, options: Mapping[str, Any], path: str
) -> BackendConfig:
    if not isinstance(options, Mapping):
        raise ConfigError(
            f"{path}: expected a mapping of {kind} options, got {type(options).__name__}"
        )
    try:
        return cls.config_model.model_validate(dict(options))
    except ValidationError as exc:
        lines = validation_messages(exc, path, cls.config_model)
        raise ConfigError("\n".join(lines)) from exc


def create_backend(
    kind: str,
    options: Mapping[str, Any],
    context: BackendContext,
    *,
    path: str = "options",
) -> Backend:
    """Build a backend of ``kind`` from raw ``options`` (validated at YAML path ``path``).

    The instance is not opened: construction does no I/O. Raises
    :class:`~hicache.errors.ConfigError` for bad options and :class:`~hicache.errors.PluginError`
    subclasses when the kind cannot be loaded.
    """
    cls = load_backend_class(kind)
    config = _validate_with(cls, kind, options, path)
    return cls(config, context)
