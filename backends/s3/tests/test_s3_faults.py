"""Faults against real endpoints: a killed or frozen server, a missing bucket, wrong credentials,
addressing styles, a server without conditional writes. Each test that breaks a server starts its
own moto process, so the session server stays healthy."""

from __future__ import annotations

import http.client
import http.server
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hicache_s3 import S3AccessDeniedError, S3Backend, S3BucketNotFoundError
from hicache_s3.client import new_client
from hicache_s3.devserver import DevServer
from hicache_s3.testing import (
    PAGE_BYTES,
    fast_options,
    make_s3_backend,
    new_bucket,
    page_keys,
    page_payloads,
    raw_client,
)

from hicache.errors import BackendError, BackendUnavailableError
from hicache.storage import PageStatus
from hicache.testing.wait import run_bounded

# Hang detection only (never a speed assertion): every faulty call must come back well within
# this, given the 1 s connect / 2 s read timeouts and 2 attempts of `fast_options`.
HANG_LIMIT_S = 60.0


@pytest.fixture
def private_server(aws_env: dict[str, str], tmp_path: Path) -> Iterator[DevServer]:
    """A moto server of this test alone (it may be killed, frozen and restarted)."""
    server = DevServer(log_path=tmp_path / "moto.log").start()
    try:
        yield server
    finally:
        if server.pid is not None:
            os.kill(server.pid, signal.SIGCONT)
        server.kill()


def _get(backend: Any, keys: list[str]) -> tuple[list[PageStatus], list[bytearray]]:
    bufs = [bytearray(PAGE_BYTES) for _ in keys]
    return backend.get_into(keys, [memoryview(b) for b in bufs]), bufs


def _run_bounded(fn: Callable[[], Any]) -> Any:
    """``fn()`` on a thread, joined with a generous timeout; its result or its exception."""
    finished, outcome = run_bounded(fn, HANG_LIMIT_S)
    assert finished, "backend call hung past every deadline"
    return outcome


def test_server_killed_mid_batch_then_back(private_server: DevServer) -> None:
    bucket = new_bucket(private_server.endpoint_url)
    options = fast_options(private_server.endpoint_url, bucket, max_concurrency=4)
    keys, payloads = page_keys(400, "kill"), page_payloads(400)
    with make_s3_backend(options) as backend:
        assert isinstance(backend, S3Backend)
        assert backend.put(keys[:4], payloads[:4]) == [PageStatus.OK] * 4

        # The server dies as the batch's 16th request is about to be sent: mid-batch however
        # the threads are scheduled (a killer thread polling a counter may run too late).
        sent = [0]
        sent_lock = threading.Lock()

        def kill_before_16th(**_: Any) -> None:
            with sent_lock:
                sent[0] += 1
                if sent[0] == 16:
                    private_server.kill()

        backend.client.meta.events.register("before-send.s3.PutObject", kill_before_16th)
        outcome = _run_bounded(lambda: backend.put(keys[4:], payloads[4:]))
        backend.client.meta.events.unregister("before-send.s3.PutObject", kill_before_16th)
        assert sent[0] >= 16
        # failures are reported: an exception for the whole call or FAILED pages, never "stored"
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, BackendUnavailableError), outcome
            assert bucket in str(outcome) and private_server.endpoint_url in str(outcome)
        else:
            assert PageStatus.FAILED in outcome
        # while it is down every call fails fast with BackendUnavailableError
        for call in (
            lambda: backend.exists(keys[:3]),
            lambda: backend.exists_prefix(keys),
            lambda: _get(backend, keys[:3]),
            lambda: backend.put(keys[:2], payloads[:2]),
        ):
            error = _run_bounded(call)
            assert isinstance(error, BackendUnavailableError), error
            # nothing of botocore's (nor the worker frames holding the caller's buffers) is
            # chained to what the caller receives
            assert error.__cause__ is None and error.__context__ is None
        # back on the same port (moto keeps no state across restarts: recreate the bucket);
        # the same open backend works again without a reopen
        private_server.restart()
        raw_client(private_server.endpoint_url).create_bucket(Bucket=bucket)
        assert backend.put(keys[:3], payloads[:3]) == [PageStatus.OK] * 3
        statuses, bufs = _get(backend, keys[:3])
        assert statuses == [PageStatus.OK] * 3 and bufs == [bytearray(p) for p in payloads[:3]]


def test_frozen_server_times_out_instead_of_hanging(private_server: DevServer) -> None:
    bucket = new_bucket(private_server.endpoint_url)
    # Thawed, the server first answers the reads it queued while frozen: on a loaded machine
    # that took over 2 s, past both 1 s attempts of the read that must then succeed (2 failures
    # in 50 runs of `make stress-test`). 5 s per attempt still ends the frozen read well within
    # HANG_LIMIT_S.
    options = fast_options(private_server.endpoint_url, bucket, read_timeout=5.0)
    keys = page_keys(3, "frozen")
    with make_s3_backend(options) as backend:
        backend.put(keys, page_payloads(3))
        assert private_server.pid is not None
        os.kill(private_server.pid, signal.SIGSTOP)
        try:
            outcome = _run_bounded(lambda: _get(backend, keys))
            assert isinstance(outcome, BackendUnavailableError), outcome
        finally:
            os.kill(private_server.pid, signal.SIGCONT)
        statuses, _ = _get(backend, keys)
        assert statuses == [PageStatus.OK] * 3


def test_missing_bucket_is_a_clear_error_at_open(
    s3_server: DevServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "Secret-Not-For-Logs")
    backend = make_s3_backend(fast_options(s3_server.endpoint_url, "no-such-bucket-here"))
    with pytest.raises(S3BucketNotFoundError) as info:
        backend.open()
    message = str(info.value)
    assert "no-such-bucket-here" in message and s3_server.endpoint_url in message
    assert "Secret-Not-For-Logs" not in message
    assert isinstance(info.value, BackendUnavailableError) and isinstance(info.value, LookupError)
    assert not backend.is_open


def test_wrong_credentials_are_a_clear_error_at_open(
    aws_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """moto checks credentials once its IAM has users (the first 3 calls create one)."""
    with DevServer(
        extra_env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"}, log_path=tmp_path / "m.log"
    ) as srv:
        iam = raw_client(srv.endpoint_url).__class__  # noqa: F841 - keep flake quiet on style

        admin = new_client("iam", endpoint_url=srv.endpoint_url)
        admin.create_user(UserName="hicache")
        key = admin.create_access_key(UserName="hicache")["AccessKey"]
        admin.put_user_policy(
            UserName="hicache",
            PolicyName="s3",
            PolicyDocument='{"Version":"2012-10-17","Statement":'
            '[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}',
        )
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        monkeypatch.delenv("AWS_SESSION_TOKEN")
        bucket = new_bucket(srv.endpoint_url)
        options = fast_options(srv.endpoint_url, bucket)
        with make_s3_backend(options) as good:  # the right credentials work
            assert good.put(page_keys(1), page_payloads(1)) == [PageStatus.OK]
        for key_id, secret in (
            (key["AccessKeyId"], "Wrong-Secret-123"),
            ("AKIAUNKNOWN0", "Nope-456"),
        ):
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
            backend = make_s3_backend(options)
            with pytest.raises(S3AccessDeniedError) as info:
                backend.open()
            message = str(info.value)
            assert bucket in message and srv.endpoint_url in message
            assert secret not in message and key_id not in message
            assert isinstance(info.value, PermissionError)


@pytest.mark.parametrize("style", ["path", "virtual", "auto"])
def test_addressing_styles_on_an_ip_endpoint(s3_options: dict[str, Any], style: str) -> None:
    """botocore sends path-style requests to IP endpoints whatever the style (no DNS needed)."""
    with make_s3_backend({**s3_options, "addressing_style": style}) as backend:
        assert isinstance(backend, S3Backend)
        urls: list[str] = []
        backend.client.meta.events.register(
            "before-send.s3", lambda request, **_: urls.append(request.url)
        )
        keys, payloads = page_keys(2, style), page_payloads(2)
        assert backend.put(keys, payloads) == [PageStatus.OK] * 2
        statuses, bufs = _get(backend, keys)
        assert statuses == [PageStatus.OK] * 2 and bufs == [bytearray(p) for p in payloads]
    bucket_path = f"{s3_options['endpoint_url']}/{s3_options['bucket']}/"
    assert len(urls) >= 4 and all(url.startswith(bucket_path) for url in urls), urls[:2]


def test_virtual_addressing_needs_bucket_dns(s3_server: DevServer, bucket: str) -> None:
    """``virtual`` on a host name asks DNS for ``<bucket>.<host>``; where that does not resolve
    (no wildcard DNS for localhost here) open() fails clearly, naming bucket and endpoint."""
    endpoint = s3_server.endpoint_url.replace("127.0.0.1", "localhost")
    options = fast_options(endpoint, bucket, addressing_style="virtual", max_attempts=1)
    try:
        socket.getaddrinfo(f"{bucket}.localhost", s3_server.port)
        resolvable = True
    except OSError:
        resolvable = False
    backend = make_s3_backend(options)
    if resolvable:  # pragma: no cover - a resolver with wildcard *.localhost (systemd-resolved)
        try:
            backend.open()
        except BackendError as exc:  # the server may not route virtual hosts: still clear
            assert bucket in str(exc) and endpoint in str(exc)
        else:
            with backend:
                assert backend.put(page_keys(1), page_payloads(1)) == [PageStatus.OK]
        return
    with pytest.raises(BackendUnavailableError) as info:
        backend.open()
    assert bucket in str(info.value) and endpoint in str(info.value)
    path_style = make_s3_backend({**options, "addressing_style": "path"})
    with path_style:
        assert path_style.exists(page_keys(1)) == [False]


class _NoConditionalProxy(http.server.BaseHTTPRequestHandler):
    """An HTTP proxy to moto that answers 501 NotImplemented to If-None-Match puts, like an
    S3-compatible store without conditional writes."""

    protocol_version = "HTTP/1.1"
    upstream: tuple[str, int] = ("127.0.0.1", 0)

    def log_message(self, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if self.command == "PUT" and self.headers.get("If-None-Match"):
            error = (
                b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>NotImplemented</Code>"
                b"<Message>A header you provided implies functionality that is not "
                b"implemented</Message><Header>If-None-Match</Header></Error>"
            )
            self.send_response(501)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            self.wfile.write(error)
            return
        conn = http.client.HTTPConnection(*self.upstream, timeout=10)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
        conn.request(self.command, self.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward


@pytest.fixture
def no_conditional_endpoint(s3_server: DevServer) -> Iterator[str]:
    handler = type("Handler", (_NoConditionalProxy,), {"upstream": ("127.0.0.1", s3_server.port)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_server_without_conditional_writes_falls_back(
    no_conditional_endpoint: str, s3_server: DevServer
) -> None:
    bucket = new_bucket(s3_server.endpoint_url)
    options = fast_options(no_conditional_endpoint, bucket)
    keys, payloads = page_keys(3, "nocond"), page_payloads(3)
    with make_s3_backend(options) as backend:
        assert backend.stats()["conditional_put"] == "auto"
        assert backend.put(keys, payloads) == [PageStatus.OK] * 3
        assert backend.stats()["conditional_put"] == "never"
        assert backend.put(keys[:1], page_payloads(1, seed=5)) == [PageStatus.ALREADY_EXISTS]
        statuses, bufs = _get(backend, keys)
        assert statuses == [PageStatus.OK] * 3 and bufs == [bytearray(p) for p in payloads]
    with make_s3_backend({**options, "conditional_put": "always"}) as strict:
        outcome = strict.put(page_keys(1, "strict"), page_payloads(1))
        assert outcome == [PageStatus.FAILED]
        assert strict.exists(page_keys(1, "strict")) == [False]


def test_bucket_deleted_under_an_open_backend(backend: S3Backend, s3: Any) -> None:
    keys = page_keys(2, "gone")
    backend.put(keys, page_payloads(2))
    backend.delete(keys)
    s3.delete_bucket(Bucket=backend.options.bucket)
    for call in (
        lambda: backend.put(keys, page_payloads(2)),
        lambda: _get(backend, keys),
        lambda: list(backend.iter_pages()),
        lambda: backend.delete(keys),
    ):
        outcome = _run_bounded(call)
        assert isinstance(outcome, S3BucketNotFoundError), repr(outcome)
        assert backend.options.bucket in str(outcome)
