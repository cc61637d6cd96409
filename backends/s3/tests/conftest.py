"""Fixtures of the S3 backend tests: a real S3 HTTP endpoint (moto's server in a child process).

Every test talks to 127.0.0.1 over HTTP with boto3, exactly as it would to AWS. Dummy credentials
and empty AWS config files are set for the whole session, so nothing ever reaches a real account.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from hicache_s3 import S3Backend
from hicache_s3.devserver import DevServer, dummy_aws_env
from hicache_s3.testing import fast_options, make_s3_backend, new_bucket, raw_client


@pytest.fixture(scope="session")
def aws_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Dummy AWS credentials and config for the session; the previous environment is restored."""
    env = dummy_aws_env(tmp_path_factory.mktemp("aws"))
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    for name in saved:
        del os.environ[name]
    os.environ.update(env)
    try:
        yield env
    finally:
        for name in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[name]
        os.environ.update(saved)


@pytest.fixture(scope="session")
def s3_server(
    aws_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DevServer]:
    """One moto S3 server for the session (tests that kill a server start their own)."""
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with DevServer(log_path=log) as server:
        yield server


@pytest.fixture
def bucket(s3_server: DevServer) -> str:
    """A fresh, empty bucket on the session server."""
    return new_bucket(s3_server.endpoint_url)


@pytest.fixture
def s3(s3_server: DevServer) -> Any:
    """A raw boto3 client on the session server."""
    return raw_client(s3_server.endpoint_url)


@pytest.fixture
def s3_options(s3_server: DevServer, bucket: str) -> dict[str, Any]:
    """Options of a backend on a fresh bucket of the session server."""
    return fast_options(s3_server.endpoint_url, bucket)


@pytest.fixture
def backend(s3_options: dict[str, Any]) -> Iterator[S3Backend]:
    """An open backend on a fresh bucket (namespace ``ns``, 16 KiB pages)."""
    with make_s3_backend(s3_options) as opened:
        assert isinstance(opened, S3Backend)
        yield opened
