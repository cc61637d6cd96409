"""Fixtures of the valkey backend tests: a real server (valkey-server or redis-server) on
127.0.0.1, started by the tests in a temporary directory and SIGKILLed at the end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hicache_valkey import ValkeyBackend
from hicache_valkey.devserver import DevCluster, DevServer
from hicache_valkey.testing import fast_options, make_backend


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    """One server for the session, no persistence (tests that kill a server start their own)."""
    with DevServer(tmp_path_factory.mktemp("valkey")) as server:
        yield server


@pytest.fixture(scope="session")
def valkey_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCluster]:
    """A three-node cluster for the session (started only by the tests that ask for it)."""
    with DevCluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Any]:
    """Start extra servers for one test (each in its own directory); all killed afterwards."""
    started: list[DevServer] = []

    def start(**kwargs: Any) -> DevServer:
        server = DevServer(tmp_path / f"server-{len(started)}", **kwargs)
        server.directory.mkdir()
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def options(valkey_server: DevServer) -> dict[str, Any]:
    return fast_options(valkey_server.port)


@pytest.fixture
def backend(options: dict[str, Any]) -> Iterator[ValkeyBackend]:
    """An open backend on the session server (namespace ``ns``, 16 KiB pages)."""
    with make_backend(options) as opened:
        assert isinstance(opened, ValkeyBackend)
        yield opened
