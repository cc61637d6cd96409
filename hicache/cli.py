"""The ``hicache`` command.

- ``hicache backends list``           installed backend kinds, their distribution and version,
                                      and broken plugins with the reason
- ``hicache backends schema KIND``    JSON schema of a kind's ``options``
- ``hicache config check FILE``       both validation phases, no storage I/O; exit 0 when valid,
                                      2 with one ``yaml.path: problem`` line per error
- ``hicache config show FILE``        the merged configuration (file + ``HICACHE_*``) as JSON,
                                      each tier's options as its plugin validated them, secrets
                                      masked

``hicache.tools.bench`` (``bench``), ``hicache.tools.ops`` (``storage``) and ``hicache.replay``
(``replay``) add their subcommands, each through an ``add_parser(subparsers)`` function that
sets ``func`` (``args -> exit code``). None of them imports torch or a backend: backends load
when a command needs them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from hicache import replay
from hicache.errors import ConfigError, HicacheError
from hicache.storage import redact, redact_url
from hicache.tools import bench, ops

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)

#: Client libraries that log request headers (signed credentials, session tokens) at DEBUG:
#: ``-vv`` raises our loggers to DEBUG, never these.
_CHATTY_CLIENT_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "aiobotocore", "s3fs")


_Handler = Callable[[argparse.Namespace], int]


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output (grep, tests) should not wrap at rich's default of 80 columns.
    width = None if stream.isatty() else 200
    return Console(file=stream, width=width, soft_wrap=False, highlight=False)


# ---------------------------------------------------------------------- backends


def _backends_list(args: argparse.Namespace) -> int:
    from hicache.storage import installed_backends

    infos = installed_backends()
    if args.json:
        rows = [
            {
                "kind": i.kind,
                "distribution": i.distribution,
                "version": i.version,
                "target": i.target,
                "error": i.error,
            }
            for i in infos
        ]
        print(json.dumps(rows, indent=2))
    else:
        from rich.table import Table

        table = Table(title="hicache storage backends (entry-point group hicache.backends)")
        for column in ("kind", "distribution", "version", "entry point", "status"):
            table.add_column(column, overflow="fold")
        for info in infos:
            status = "ok" if info.ok else f"[red]broken[/red]: {info.error}"
            table.add_row(info.kind, info.distribution, info.version, info.target, status)
        if not infos:
            table.add_row("-", "-", "-", "-", "no backend installed")
        _console().print(table)
    return 1 if args.strict and not all(i.ok for i in infos) else 0


def _backends_schema(args: argparse.Namespace) -> int:
    from hicache.storage import load_backend_class

    cls = load_backend_class(args.kind)
    schema = cls.config_model.model_json_schema()
    schema.setdefault("title", f"{args.kind} options")
    print(json.dumps(schema, indent=2, sort_keys=False))
    return 0


# ---------------------------------------------------------------------- config


def _config_check(args: argparse.Namespace) -> int:
    from hicache.config import env_ignored, env_overrides, load_config

    config = load_config(args.file)
    tiers = config.storage.tiers
    print(f"{args.file}: valid ({len(tiers)} tier{'s' if len(tiers) != 1 else ''})")
    for name, tier in tiers.items():
        role = "read-only" if tier.read_only else ("publish" if tier.publish else "lookup only")
        print(f"  {name}: backend {tier.backend}, {role}, admission {tier.admission.value}")
    overrides = env_overrides()
    if overrides:
        print(f"  with environment overrides: {', '.join(sorted(overrides))}")
    ignored = env_ignored()
    if ignored:
        print(f"  ignored (no such section): {', '.join(ignored)}")
    return 0


def _config_show(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hicache.config import load_config, validate_tiers

    config = load_config(args.file, check_tiers=False)
    validated = validate_tiers(config, origin=str(Path(args.file)))
    shown = config.model_dump(mode="json")
    for name, options in validated.items():
        # The plugin's model knows which fields are secrets (SecretStr dumps masked).
        dumped = options.model_dump(mode="json", exclude_unset=True)
        shown["storage"]["tiers"][name]["options"] = dumped
    print(json.dumps(redact(shown), indent=2))
    return 0


# ---------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The full ``hicache`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="hicache", description="Hierarchical KV cache with pluggable storage backends."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    backends = sub.add_parser("backends", help="installed storage backends")
    backends_sub = backends.add_subparsers(dest="backends_command", metavar="ACTION", required=True)
    listing = backends_sub.add_parser(
        "list", help="each installed kind, its distribution and version; broken ones with why"
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument("--strict", action="store_true", help="exit 1 when a plugin is broken")
    listing.set_defaults(func=_backends_list)
    schema = backends_sub.add_parser("schema", help="JSON schema of a backend kind's options")
    schema.add_argument("kind", help="backend kind, e.g. memory")
    schema.set_defaults(func=_backends_schema)

    config = sub.add_parser("config", help="configuration files")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = config_sub.add_parser(
        "check", help="validate FILE (+ HICACHE_* variables) in both phases, no storage I/O"
    )
    check.add_argument("file", help="YAML configuration file")
    check.set_defaults(func=_config_check)
    show = config_sub.add_parser("show", help="print the merged configuration as JSON")
    show.add_argument("file", help="YAML configuration file")
    show.set_defaults(func=_config_show)

    for module in (bench, ops, replay):
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hicache`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for name in _CHATTY_CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.INFO))
    for log_handler in logging.getLogger().handlers:
        log_handler.addFilter(_redact_record)
    handler: _Handler = args.func
    try:
        return handler(args)
    except ConfigError as exc:
        # Exit status 2, as argparse uses for bad arguments: the input, not the run, is wrong.
        print(f"hicache: error: {exc}", file=sys.stderr)
        return 2
    except HicacheError as exc:
        print(f"hicache: error: {redact_url(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _redact_record(record: logging.LogRecord) -> bool:
    """Mask URL userinfo in every log line (client libraries put endpoints in messages)."""
    message = record.getMessage()
    masked = redact_url(message)
    if masked != message:
        record.msg, record.args = masked, None
    return True


if __name__ == "__main__":
    raise SystemExit(main())
