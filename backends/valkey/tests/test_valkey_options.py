"""Options: validation names the bad value and its YAML path; credentials never show up in
repr, errors, logs or stats; AUTH with a password and with an ACL user works on a real server."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from hicache_valkey import ValkeyOptions
from hicache_valkey.devserver import DevServer
from hicache_valkey.testing import fast_options, make_backend

from hicache.errors import BackendUnavailableError, ConfigError
from hicache.storage import BackendContext, PageStatus, create_backend
from hicache.testing import kit_key

SECRET = "hunter2-not-for-logs"
StartServer = Callable[..., DevServer]


@pytest.mark.parametrize(
    ("options", "bad"),
    [
        ({"key_prefix": "a:b"}, "a:b"),
        ({"key_prefix": "x*"}, "x*"),
        ({"port": 70000}, "70000"),
        ({"max_value_bytes": "1KiB"}, "max_value_bytes"),
        ({"ttl_s": 0}, "ttl_s"),
        ({"colour": "blue"}, "colour"),
        ({"tls_ca_file": "/ca.pem"}, "tls is false"),
        ({"username": "alice"}, "username needs a password"),
    ],
)
def test_bad_options_name_value_and_path(options: dict[str, Any], bad: str) -> None:
    context = BackendContext(page_bytes=4096, namespace="ns")
    with pytest.raises(ConfigError) as info:
        create_backend("valkey", options, context, path="storage.tiers.fleet.options")
    message = str(info.value)
    assert "storage.tiers.fleet.options" in message and bad in message, message


def test_secrets_are_never_printed(caplog: pytest.LogCaptureFixture) -> None:
    options = ValkeyOptions.model_validate(
        {"password": SECRET, "tls": True, "tls_key_password": SECRET, "username": "u"}
    )
    backend = make_backend(fast_options(1, password=SECRET, username="u"))
    shown = [repr(options), str(options), options.model_dump_json(), repr(backend)]
    shown.append(json.dumps(backend.stats()))
    assert not any(SECRET in text for text in shown)


def test_wrong_password_is_refused_without_echoing_it(
    server_factory: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = server_factory(extra=[("requirepass", SECRET)])
    caplog.set_level(logging.DEBUG)
    wrong = make_backend(fast_options(server.port, password="wrong-" + SECRET))
    with pytest.raises(BackendUnavailableError) as info:
        wrong.open()
    assert SECRET not in str(info.value) and SECRET not in caplog.text
    no_auth = make_backend(fast_options(server.port))
    with pytest.raises(BackendUnavailableError):
        no_auth.open()
    [key] = [kit_key(0, "auth")]
    with make_backend(fast_options(server.port, password=SECRET)) as backend:
        assert backend.put([key], [memoryview(bytes(16384))]) == [PageStatus.OK]
        assert backend.exists([key]) == [True]
        assert SECRET not in json.dumps(backend.stats())


def test_acl_user_authenticates(server_factory: StartServer) -> None:
    server = server_factory()
    client = server.client()
    client.acl_setuser("kvuser", enabled=True, passwords=[f"+{SECRET}"], keys=["~hicache:*"],
                       commands=["+@all"], channels=["*"])  # fmt: skip
    client.close()
    [key] = [kit_key(0, "acl")]
    opts = fast_options(server.port, username="kvuser", password=SECRET)
    # CONFIG is allowed by +@all here; the backend only needs it to enable notifications
    with make_backend(opts) as backend:
        assert backend.put([key], [memoryview(bytes(16384))]) == [PageStatus.OK]
        assert backend.exists([key]) == [True]
