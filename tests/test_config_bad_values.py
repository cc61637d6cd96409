"""Every bad configuration value is one error line at its YAML path, exit status 2, nothing made.

One row per case, run through every command that takes a configuration file. Each run starts in
an empty working directory; the test asserts that neither it nor the configuration's directory
changed (no page directory, no slot file, no replay data directory).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hicache import cli

_BASE = """\
cache: {page_size: 16, host_pool: 64MiB}
model: {name: tiny, num_layers: 2, num_kv_heads: 2, head_dim: 64, dtype: float16}
"""

#: Every command that reads a configuration file, with ``{file}`` where the file goes.
COMMANDS = {
    "config check": ["config", "check", "{file}"],
    "replay": ["replay", "--config", "{file}", "--limit", "1", "--no-progress"],
    "bench storage": ["bench", "storage", "--config", "{file}", "--quick", "--no-progress"],
    "storage du": ["storage", "du", "--config", "{file}"],
}


@dataclass(frozen=True)
class Case:
    """A bad configuration and what its one error line must name."""

    id: str
    #: The file's content below the cache and model sections (text, or raw bytes to write as is).
    body: str | bytes = ""
    #: Whether the valid cache and model sections come first.
    base: bool = True
    #: Environment variables set for the run.
    env: dict[str, str] = field(default_factory=dict)
    #: What the error line must contain: the YAML path (or file, or variable) and the value.
    expect: tuple[str, ...] = ()
    #: Builds the configuration path itself (a directory, a FIFO) instead of writing ``body``.
    make: Callable[[Path], Path] | None = None


def _tier(name: str, body: str) -> str:
    return f"storage:\n  tiers:\n    {name}: {body}\n"


def _mkfifo(where: Path) -> Path:
    path = where / "fifo.yaml"
    os.mkfifo(path)
    return path


def _mkdir(where: Path) -> Path:
    path = where / "dir.yaml"
    path.mkdir()
    return path


CASES = [
    Case(
        "localdisk empty root",
        _tier("disk", "{backend: localdisk, options: {root: ''}}"),
        expect=("storage.tiers.disk.options.root:", "''"),
    ),
    Case(
        "localdisk blank root",
        _tier("disk", "{backend: localdisk, options: {root: '  '}}"),
        expect=("storage.tiers.disk.options.root:", "'  '"),
    ),
    Case(
        "mmap blank path",
        _tier("shm", "{backend: mmap, options: {path: ' ', capacity: 1MiB}}"),
        expect=("storage.tiers.shm.options.path:", "' '"),
    ),
    Case(
        "fsspec file url without a path",
        _tier("fs", "{backend: fsspec, options: {url: 'file://'}}"),
        expect=("storage.tiers.fs.options.url:", "'file://'", "names no directory"),
    ),
    Case(
        "infinite deadline",
        _tier("ram", "{backend: memory, deadline_s: .inf}"),
        expect=("storage.tiers.ram.deadline_s:", "finite", "inf"),
    ),
    Case(
        "deadline beyond an hour",
        _tier("ram", "{backend: memory, deadline_s: 1.0e+300}"),
        expect=("storage.tiers.ram.deadline_s:", "3600", "1e+300"),
    ),
    Case(
        "int beyond any float as a deadline",
        _tier("ram", "{backend: memory, deadline_s: " + "9" * 400 + "}"),
        expect=("storage.tiers.ram.deadline_s:",),
    ),
    Case(
        "NaN cool-down",
        _tier("ram", "{backend: memory, breaker_cooldown_s: .nan}"),
        expect=("storage.tiers.ram.breaker_cooldown_s:", "finite", "nan"),
    ),
    Case(
        "infinite mmap lock timeout",
        _tier(
            "shm", "{backend: mmap, options: {path: slots, capacity: 1MiB, lock_timeout_s: .inf}}"
        ),
        expect=("storage.tiers.shm.options.lock_timeout_s:", "inf"),
    ),
    Case(
        "NaN prefetch timeout",
        "storage: {prefetch: {timeout_s: .nan}}\n",
        expect=("storage.prefetch.timeout_s:", "nan"),
    ),
    Case(
        "negative capacity",
        _tier("ram", "{backend: memory, options: {capacity: -1}}"),
        expect=("storage.tiers.ram.options.capacity:", "negative", "-1"),
    ),
    Case(
        "negative size string",
        "cache: {host_pool: -8GiB}\n",
        base=False,
        expect=("cache.host_pool:", "'-8GiB'"),
    ),
    Case(
        "zero localdisk max_bytes",
        _tier("disk", "{backend: localdisk, options: {root: pages, max_bytes: 0}}"),
        expect=("storage.tiers.disk.options.max_bytes:", "0"),
    ),
    Case(
        "capacity of 2**80 bytes",
        _tier("shm", f"{{backend: mmap, options: {{path: slots, capacity: {2**80}}}}}"),
        expect=("storage.tiers.shm.options.capacity:", str(2**80), "2**62"),
    ),
    Case(
        "1 PiB as a size string",
        _tier("ram", "{backend: memory, max_inflight_bytes: 9999999TiB}"),
        expect=("storage.tiers.ram.max_inflight_bytes:", "'9999999TiB'"),
    ),
    Case(
        "absurd model shape",
        "model: {num_layers: 1000000000000}\n",
        base=False,
        expect=("model.num_layers:", "1000000000000"),
    ),
    Case(
        "s3 infinite read timeout",
        _tier("far", "{backend: s3, options: {bucket: kv-pages, read_timeout: .inf}}"),
        expect=("storage.tiers.far.options.read_timeout:", "inf"),
    ),
    Case(
        "s3 refresh_after beyond any float",
        _tier(
            "far", "{backend: s3, options: {bucket: kv-pages, refresh_after: " + "9" * 400 + "}}"
        ),
        expect=("storage.tiers.far.options.refresh_after:", "too large"),
    ),
    Case(
        "events queue beyond a billion",
        "events: {max_queue: 99999999999999}\n",
        expect=("events.max_queue:", "99999999999999"),
    ),
    Case(
        "not UTF-8",
        _BASE.encode() + b"model: {name: caf\xe9}\n",
        expect=("hicache.yaml:3: not UTF-8", "0xe9"),
    ),
    Case(
        "nested thousands deep",
        "storage: {tiers: {ram: {backend: memory, options: " + "[" * 5000 + "]" * 5000 + "}}}\n",
        expect=("nested deeper than 64 levels", ":3:"),
    ),
    Case(
        "bad JSON in a HICACHE_ variable",
        _tier("ram", "{backend: memory}"),
        env={"HICACHE_STORAGE__TIERS__RAM__OPTIONS": "{capacity: 8MiB}"},
        expect=("HICACHE_STORAGE__TIERS__RAM__OPTIONS", "storage.tiers.ram.options", "JSON"),
    ),
    Case(
        "JSON nested thousands deep in a HICACHE_ variable",
        _tier("ram", "{backend: memory}"),
        env={"HICACHE_STORAGE__TIERS__RAM__OPTIONS": "[" * 100_000 + "]" * 100_000},
        expect=("HICACHE_STORAGE__TIERS__RAM__OPTIONS", "nested too deeply"),
    ),
    Case(
        "infinite deadline from a HICACHE_ variable",
        _tier("ram", "{backend: memory}"),
        env={"HICACHE_STORAGE__TIERS__RAM__DEADLINE_S": "inf"},
        expect=("storage.tiers.ram.deadline_s:", "'inf'"),
    ),
    Case("a directory as the config", make=_mkdir, expect=("dir.yaml", "is a directory")),
    Case("a FIFO as the config", make=_mkfifo, expect=("fifo.yaml", "not a regular file")),
]


def _tree(root: Path) -> list[tuple[str, bool, int]]:
    return sorted(
        (str(p.relative_to(root)), p.is_dir(), 0 if p.is_dir() else p.lstat().st_size)
        for p in root.rglob("*")
    )


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    for name in list(os.environ):
        if name.upper().startswith("HICACHE_"):
            monkeypatch.delenv(name)
    conf, cwd = tmp_path / "conf", tmp_path / "cwd"
    conf.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return conf, cwd


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_value_is_one_line_at_its_path_exit_2_nothing_created(
    case: Case,
    command: str,
    places: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    conf, cwd = places
    if case.make is not None:
        path = case.make(conf)
    else:
        path = conf / "hicache.yaml"
        if isinstance(case.body, bytes):
            raw = case.body
        else:
            raw = ((_BASE if case.base else "") + case.body).encode()
        path.write_bytes(raw)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    before = _tree(conf), _tree(cwd)

    status = cli.main([arg.replace("{file}", str(path)) for arg in COMMANDS[command]])

    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert status == 2, (status, out, err)
    assert len(lines) == 1, err
    for needle in case.expect:
        assert needle in lines[0], (needle, lines[0])
    assert (_tree(conf), _tree(cwd)) == before


def test_unreadable_file_is_one_line_exit_2(
    places: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Root reads any file: the command then runs in a forked child as user nobody."""
    conf, cwd = places
    path = conf / "locked.yaml"
    path.write_text(_BASE)
    path.chmod(0)
    for p in (conf.parent.parent, conf.parent, conf, cwd):  # let nobody reach them
        p.chmod(0o755)
    cli.build_parser()  # import every subcommand now: nobody cannot read the interpreter's files
    before = _tree(conf), _tree(cwd)
    for command in COMMANDS:
        status, err = _run_as_nobody(
            [arg.replace("{file}", str(path)) for arg in COMMANDS[command]]
        )
        lines = err.strip().splitlines()
        assert status == 2, err
        assert len(lines) == 1, err
        assert f"cannot read config file {path}: Permission denied" in lines[0]
        assert (_tree(conf), _tree(cwd)) == before


def _run_as_nobody(argv: list[str]) -> tuple[int, str]:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            os.close(read_end)
            sys.stderr = sys.stdout = os.fdopen(write_end, "w")
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            code = cli.main(argv)
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        err = pipe.read()  # EOF when the child exits
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err
