"""A local server for tests and benchmarks: ``valkey-server`` (or ``redis-server``) on 127.0.0.1.

Nothing here is used on the serving path. The tests start their servers with :class:`DevServer`;
``python -m hicache_valkey.devserver`` starts one for ``hicache bench storage --config
configs/valkey.yaml`` and prints the environment that points the config at it::

    python -m hicache_valkey.devserver --maxmemory 8gb
    # -> export HICACHE_STORAGE__TIERS__VALKEY__OPTIONS__PORT=PORT

Each server runs in its own process, directory and port, so a test can SIGKILL it mid-batch and
restart it on the same port with the same data directory.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis

__all__ = ["DevCluster", "DevServer", "free_port", "server_binary"]

_START_TIMEOUT_S = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when the process that started it dies, so a
    killed test run leaves no server behind (Linux ``PR_SET_PDEATHSIG``)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def server_binary() -> str:
    """Path of ``valkey-server`` or ``redis-server``; a clear error when neither is installed."""
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(
        "neither valkey-server nor redis-server is on PATH: `make venv` installs Debian's "
        "redis-server (apt-get install -y redis-server)"
    )


class DevServer:
    """One server process on 127.0.0.1; restartable on the same port and data directory.

    ``appendonly`` turns on AOF persistence with ``appendfsync always`` (an acknowledged write
    survives a SIGKILL of the server); without it the server keeps nothing on disk (``save ''``).
    ``extra`` adds ``--name value`` settings (``maxmemory``, ``maxmemory-policy``, ``requirepass``).
    """

    def __init__(
        self,
        directory: Path | None = None,
        *,
        port: int | None = None,
        appendonly: bool = False,
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="hicache-valkey-")
            directory = Path(self._tmp.name)
        self.directory = directory
        self.port = port or free_port()
        self._fixed_port = port is not None
        self.appendonly = appendonly
        self.extra = list(extra)
        self.process: subprocess.Popen[bytes] | None = None
        self.password = next((v for k, v in self.extra if k == "requirepass"), None)

    def _args(self) -> list[str]:
        args = [
            server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--logfile", str(self.directory / "server.log"),
        ]  # fmt: skip
        for name, value in self.extra:
            args += [f"--{name}", value]
        return args

    def client(self) -> redis.Redis:
        """A redis-py client on this server (the tests' independent view of what is stored)."""
        return self.client_for(self.port, self.password)

    @staticmethod
    def client_for(port: int, password: str | None = None) -> redis.Redis:
        """A redis-py client on the local server at ``port``."""
        return redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=10.0)

    def start(self) -> None:
        for _ in range(5):
            self.process = subprocess.Popen(
                self._args(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,  # only a prctl before exec: fork-safe
            )
            if self._wait_ready():
                return
            self.kill()
            if self._fixed_port:
                break
            self.port = free_port()  # someone took the port between free_port() and bind
        log = self.directory / "server.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"server did not start on 127.0.0.1:{self.port}:\n{tail}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + _START_TIMEOUT_S
        client = self.client()
        try:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.exceptions.BusyLoadingError:
                    pass  # loading its AOF: wait
                except redis.exceptions.ConnectionError:
                    pass
                time.sleep(0.02)
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL the server (no shutdown save, no AOF rewrite) and reap it."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
        if process is not None:
            process.wait(timeout=30)

    def restart(self) -> None:
        self.kill()
        self.start()

    def close(self) -> None:
        self.kill()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> DevServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class DevCluster:
    """``nodes`` cluster-enabled servers on loopback ports, the 16384 slots split evenly between
    them (no replicas); ``port`` is the first node's, a seed for ``cluster: true``."""

    def __init__(self, directory: Path, nodes: int = 3) -> None:
        # explicit bus ports: the default (port + 10000) is out of range for high ports
        self.bus_ports = [free_port() for _ in range(nodes)]
        self.servers = [
            DevServer(
                directory / f"node-{i}",
                extra=[
                    ("cluster-enabled", "yes"),
                    ("cluster-config-file", "nodes.conf"),
                    ("cluster-port", str(self.bus_ports[i])),
                    ("cluster-require-full-coverage", "no"),
                ],
            )
            for i in range(nodes)
        ]

    @property
    def port(self) -> int:
        return self.servers[0].port

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.close()  # no server outlives a failed start
            raise

    def _start(self) -> None:
        for server in self.servers:
            server.directory.mkdir(parents=True, exist_ok=True)
            server.start()
        clients = [server.client() for server in self.servers]
        try:
            share = 16384 // len(clients)
            for i, client in enumerate(clients):
                last = 16383 if i == len(clients) - 1 else (i + 1) * share - 1
                client.cluster("ADDSLOTSRANGE", i * share, last)
            for client in clients[1:]:
                client.cluster("MEET", "127.0.0.1", self.port, self.bus_ports[0])
            self.wait_ok(clients)
        finally:
            for client in clients:
                client.close()

    def wait_ok(self, clients: Sequence[redis.Redis]) -> None:
        """Wait until every node sees every other and the whole slot map."""
        deadline = time.monotonic() + _START_TIMEOUT_S * 2
        while time.monotonic() < deadline:
            infos = [c.cluster("INFO") for c in clients]
            if all(
                i["cluster_state"] == "ok" and int(i["cluster_known_nodes"]) == len(self.servers)
                for i in infos
            ):
                return
            time.sleep(0.05)
        raise RuntimeError("the local cluster did not converge")

    def close(self) -> None:
        for server in self.servers:
            server.close()

    def __enter__(self) -> DevCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--maxmemory", default="8gb", help="server maxmemory (e.g. 8gb)")
    parser.add_argument("--policy", default="allkeys-lru", help="maxmemory-policy")
    parser.add_argument("--tier", default="valkey", help="tier name in the config")
    args = parser.parse_args(argv)
    extra = [("maxmemory", args.maxmemory), ("maxmemory-policy", args.policy)]
    with DevServer(port=args.port, extra=extra) as server:
        print(
            f"export HICACHE_STORAGE__TIERS__{args.tier.upper()}__OPTIONS__PORT={server.port}",
            flush=True,
        )
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the server on TERM too
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
