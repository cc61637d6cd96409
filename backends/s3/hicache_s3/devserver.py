"""A local S3 endpoint for tests and benchmarks: moto's server in a child process on 127.0.0.1.

Nothing here is used on the serving path. The tests start one per session; ``python -m
hicache_s3.devserver`` starts one for ``hicache bench storage --config configs/s3.yaml`` and
prints the environment to point the config at it::

    python -m hicache_s3.devserver --bucket hicache-bench
    # -> export HICACHE_STORAGE__TIERS__S3__OPTIONS__ENDPOINT_URL=http://127.0.0.1:PORT

The server is a functional S3 implementation (conditional writes, listing, copy, checksums), not a
model of AWS speed. It runs in its own process so a test can SIGKILL it mid-batch and restart it
on the same port.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

__all__ = ["DevServer", "create_bucket", "dummy_aws_env", "free_port"]

_START_TIMEOUT_S = 60.0


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def dummy_aws_env(config_dir: Path) -> dict[str, str]:
    """Environment that keeps boto3 away from any real AWS account, config or endpoint.

    Dummy keys, a fixed region, and empty config/credential files under ``config_dir`` so a
    developer's ``~/.aws`` is never read; instance-metadata lookups are disabled.
    """
    config_dir.mkdir(parents=True, exist_ok=True)
    config = config_dir / "config"
    creds = config_dir / "credentials"
    config.write_text("")
    creds.write_text("")
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(config),
        "AWS_SHARED_CREDENTIALS_FILE": str(creds),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


class DevServer:
    """moto's S3 server in a child process; restartable on the same port.

    ``extra_env`` goes to the child only (e.g. ``INITIAL_NO_AUTH_ACTION_COUNT`` to make moto check
    credentials).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        extra_env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        self._extra_env = dict(extra_env or {})
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        """``http://host:port`` of the server."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Process id of the running child, or None."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> DevServer:
        """Start the child and wait until it answers HTTP; returns self."""
        if self._proc is not None and self._proc.poll() is None:
            return self
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(self._extra_env)
        log = open(self._log_path, "ab") if self._log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # type: ignore[union-attr]
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        url = f"{self.endpoint_url}/moto-api/"
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"moto server exited with {self._proc.returncode} on {self.endpoint_url}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1.0):
                    return
            except urllib.error.HTTPError:
                return  # any HTTP answer means it is serving
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"moto server did not answer on {self.endpoint_url}")

    def kill(self) -> None:
        """SIGKILL the child (as a crash would) and reap it. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        """Terminate the child politely, then kill it if it lingers. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.kill()

    def restart(self) -> DevServer:
        """Kill the child (if running) and start a fresh one on the same port (state is lost)."""
        self.kill()
        deadline = time.monotonic() + 10.0
        while True:
            try:
                return self.start()
            except RuntimeError:
                # the old socket can linger for a moment; moto then fails to bind
                if time.monotonic() > deadline:
                    raise

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def create_bucket(endpoint_url: str, bucket: str) -> None:
    """Create ``bucket`` on the dev server with dummy credentials."""
    import boto3  # imported lazily: the module itself must stay cheap to import

    with tempfile.TemporaryDirectory() as tmp:
        env = dummy_aws_env(Path(tmp))
        client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)


def main(argv: list[str] | None = None) -> int:
    """Run a dev server in the foreground until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--bucket", default="hicache-bench", help="bucket to create")
    parser.add_argument("--tier", default="s3", help="tier name used in the printed variable")
    args = parser.parse_args(argv)

    def _stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwinds the `with` below, which stops the child

    # a background job ignores SIGINT; `kill PID` must still take the moto child down with it
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with DevServer(port=args.port) as server:
        create_bucket(server.endpoint_url, args.bucket)
        var = f"HICACHE_STORAGE__TIERS__{args.tier.upper()}__OPTIONS__ENDPOINT_URL"
        print(f"export {var}={server.endpoint_url}", flush=True)
        print("export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing", flush=True)
        print(f"# moto server pid {server.pid}; Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
