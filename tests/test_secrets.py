"""Secrets never leave the process: a marker secret planted in the YAML file and in ``HICACHE_*``
variables appears in no output of the ``hicache`` command, whether it succeeds or fails, even at
``-vv`` (every log line goes to stderr)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from hicache.storage.redact import MASK, redact, redact_url
from hicache.storage.registry import load_backend_class, validate_options

MARKER = f"MARKER{uuid.uuid4().hex[:12]}"
HICACHE = [sys.executable, "-m", "hicache.cli"]


@pytest.fixture(scope="module")
def dead_port() -> Iterator[int]:
    """A port on 127.0.0.1 that is bound but never listens: every connect is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


def _config(tmp_path: Path, port: int, **s3_overrides: Any) -> Path:
    s3 = {
        "bucket": "kvs",
        "endpoint_url": f"http://ak:{MARKER}@127.0.0.1:{port}",
        "access_key_id": f"AK{MARKER}",
        "secret_access_key": MARKER,
        "connect_timeout": 0.5,
        "read_timeout": 0.5,
        "max_attempts": 1,
        **s3_overrides,
    }
    files = {
        "url": (tmp_path / "files").as_uri(),
        "storage_options": {"password": MARKER, "client_kwargs": {"token": MARKER}},
    }
    data = {
        "model": {"num_layers": 2, "num_kv_heads": 1, "head_dim": 64},
        "cache": {"page_size": 16},
        "storage": {
            "tiers": {
                "files": {"backend": "fsspec", "options": files},
                "s3": {"backend": "s3", "deadline_s": 2.0, "options": s3},
            }
        },
    }
    path = tmp_path / f"config-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HICACHE_STORAGE__TIERS__S3__OPTIONS__SESSION_TOKEN": MARKER,
        "HICACHE_STORAGE__TIERS__FILES__OPTIONS__STORAGE_OPTIONS__SECRET": MARKER,
        # boto3's chain must find nothing of the machine's own.
        "AWS_CONFIG_FILE": str(tmp_path / "absent-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "absent-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    proc = subprocess.run(
        [*HICACHE, "-vv", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env=env,
        cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert MARKER not in output, f"`hicache {' '.join(args)}` leaked the secret:\n{output}"
    return proc


def test_succeeding_commands_never_print_a_secret(tmp_path: Path, dead_port: int) -> None:
    config = str(_config(tmp_path, dead_port))
    check = _run(tmp_path, "config", "check", config)
    assert check.returncode == 0, check.stderr
    assert "2 tiers" in check.stdout

    show = _run(tmp_path, "config", "show", config)
    assert show.returncode == 0, show.stderr
    tiers = json.loads(show.stdout)["storage"]["tiers"]
    s3, files = tiers["s3"]["options"], tiers["files"]["options"]
    assert s3["secret_access_key"] == s3["session_token"] == s3["access_key_id"] == MASK
    assert s3["endpoint_url"] == f"http://***@127.0.0.1:{dead_port}"
    assert s3["bucket"] == "kvs"  # what is not secret is still shown
    assert files["storage_options"] == {
        "password": MASK,
        "secret": MASK,
        "client_kwargs": {"token": MASK},
    }

    schema = _run(tmp_path, "backends", "schema", "s3")
    assert schema.returncode == 0 and "secret_access_key" in schema.stdout

    du = _run(tmp_path, "storage", "du", "--config", config, "--tier", "files")
    assert du.returncode == 0, du.stderr

    bench = _run(
        tmp_path, "bench", "storage", "--config", config, "--tier", "files", "--quick", "--json"
    )
    assert bench.returncode == 0, bench.stderr
    json.loads(bench.stdout)  # a whole report was printed


@pytest.mark.parametrize(
    ("case", "overrides"),
    [
        ("bad endpoint scheme", {"endpoint_url": f"ftp://ak:{MARKER}@127.0.0.1:1"}),
        ("secret of the wrong type", {"secret_access_key": [MARKER]}),
        ("key without its secret", {"secret_access_key": None}),
        ("typo in a secret's name", {"secret_acess_key": MARKER}),
    ],
)
def test_config_errors_never_echo_a_secret(
    case: str, overrides: dict[str, Any], tmp_path: Path, dead_port: int
) -> None:
    config = _config(tmp_path, dead_port, **overrides)
    for command in (["config", "check"], ["config", "show"]):
        proc = _run(tmp_path, *command, str(config))
        assert proc.returncode == 2, (case, proc.stdout, proc.stderr)
        assert "storage.tiers.s3.options" in proc.stderr, (case, proc.stderr)


def test_failing_storage_commands_never_print_a_secret(tmp_path: Path, dead_port: int) -> None:
    config = str(_config(tmp_path, dead_port))
    bench = _run(tmp_path, "bench", "storage", "--config", config, "--tier", "s3", "--quick")
    assert bench.returncode != 0
    assert f"127.0.0.1:{dead_port}" in bench.stderr  # the error names the endpoint, masked
    du = _run(tmp_path, "storage", "du", "--config", config, "--tier", "s3")
    assert du.returncode != 0 and "error" in du.stderr


def test_validation_errors_and_reprs_of_every_model_hide_secrets() -> None:
    cls = load_backend_class("s3")
    bad = {"bucket": "kvs", "endpoint_url": f"ftp://u:{MARKER}@h", "access_key_id": [MARKER]}
    with pytest.raises(ValidationError) as caught:
        cls.config_model.model_validate(bad)
    assert MARKER not in str(caught.value) and MARKER not in repr(caught.value)
    with pytest.raises(ValueError) as config_error:
        validate_options("s3", bad, path="storage.tiers.s3.options")
    assert MARKER not in str(config_error.value)
    good = validate_options("s3", {"bucket": "kvs", "endpoint_url": f"http://u:{MARKER}@h:1"})
    assert MARKER not in repr(good) and MARKER not in str(good)


def test_redact_masks_by_name_type_and_url() -> None:
    value = {
        "url": f"sftp://user:{MARKER}@host:22/kv",
        "nested": {"api_key": MARKER, "count": 3, "urls": [f"http://a:{MARKER}@b/c"]},
        "plain": "http://host/path@not-userinfo",
    }
    assert redact(value) == {
        "url": "sftp://***@host:22/kv",
        "nested": {"api_key": MASK, "count": 3, "urls": ["http://***@b/c"]},
        "plain": "http://host/path@not-userinfo",
    }
    assert redact_url(f"cannot reach http://u:p@ss{MARKER}@h:1/x now") == (
        "cannot reach http://***@h:1/x now"
    )
