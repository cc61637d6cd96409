"""Options of the ``valkey`` backend: the ``options:`` mapping of a tier with ``backend: valkey``.

Credentials (``password``, ``tls_key_password``) are pydantic ``SecretStr``: they print as
``**********`` in ``repr``, errors, logs and ``stats()``; only the connection code reads them.
"""

from __future__ import annotations

import re

from pydantic import Field, SecretStr, field_validator, model_validator

from hicache.storage import BackendConfig, Size

__all__ = ["ValkeyOptions"]

# A key prefix becomes the head of every key and of every SCAN pattern: keep glob characters,
# hash-tag braces and our own ':' separator out of it.
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_HOST_RE = re.compile(r"[A-Za-z0-9_.:-]{1,253}\Z")


class ValkeyOptions(BackendConfig):
    """Options of :class:`~hicache_valkey.ValkeyBackend`.

    Timeouts bound every blocking socket call: keep ``connect_timeout_s`` and
    ``socket_timeout_s`` below the tier's ``deadline_s`` so a server that is down or hung turns
    into a failed call well before the engine gives up on it.
    """

    host: str = Field(default="127.0.0.1", description="server host name or address")
    cluster: bool = Field(
        default=False,
        description="host:port is a seed node of a cluster; the slot map comes from CLUSTER SLOTS",
    )
    port: int = Field(default=6379, ge=1, le=65535)
    db: int = Field(default=0, ge=0, le=10_000, description="logical database (SELECT)")
    username: str | None = Field(
        default=None, min_length=1, max_length=256, description="ACL user (AUTH user password)"
    )
    password: SecretStr | None = Field(default=None, description="AUTH password (a secret)")
    tls: bool = Field(default=False, description="connect with TLS")
    tls_ca_file: str | None = Field(default=None, description="CA bundle to verify the server")
    tls_cert_file: str | None = Field(default=None, description="client certificate (mTLS)")
    tls_key_file: str | None = Field(default=None, description="client key (mTLS)")
    tls_key_password: SecretStr | None = Field(default=None, description="client key passphrase")
    tls_check_hostname: bool = Field(default=True, description="match the certificate's name")
    key_prefix: str = Field(
        default="hicache",
        description="head of every key: <key_prefix>:<namespace>:{<page key>}[:<chunk>]",
    )
    connect_timeout_s: float = Field(default=1.0, gt=0, le=60)
    socket_timeout_s: float = Field(
        default=2.0, gt=0, le=600, description="longest wait for one send or receive"
    )
    max_connections: int = Field(
        default=16, ge=1, le=1024, description="connections, hence batch calls, in flight at once"
    )
    pipeline_depth: int = Field(
        default=32, ge=1, le=4096, description="commands sent before their replies are read"
    )
    pipeline_bytes: Size = Field(
        default=64 << 20,
        ge=1 << 16,
        le=1 << 32,
        description="bytes of values in flight per connection (sent, or asked for by gets)",
    )
    max_value_bytes: Size = Field(
        default=32 << 20,
        ge=8 << 10,
        le=512 << 20,
        description="largest value written; bigger pages are split into chunks (Lua, atomic)",
    )
    ttl_s: float | None = Field(
        default=None, ge=0.001, le=10 * 365 * 86400.0, description="expire pages after this"
    )
    max_batch: int = Field(default=256, ge=1, le=65_536, description="pages per backend call")
    notify_evictions: bool = Field(
        default=True,
        description="subscribe to evicted/expired key events and report them as BlockRemoved",
    )
    configure_notifications: bool = Field(
        default=True,
        description="add the 'Eex' flags to notify-keyspace-events at open (CONFIG SET)",
    )

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        if _HOST_RE.match(value) is None:
            raise ValueError(f"invalid host {value!r}: expected a host name or an IP address")
        return value

    @field_validator("key_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if _PREFIX_RE.match(value) is None:
            raise ValueError(
                f"invalid key_prefix {value!r}: 1-64 chars of [A-Za-z0-9_.-] "
                "(no ':', braces or glob characters)"
            )
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> ValkeyOptions:
        tls_files = (self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        if not self.tls and any(f is not None for f in tls_files):
            raise ValueError("tls_ca_file/tls_cert_file/tls_key_file given but tls is false")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together (client certificate)")
        if self.cluster and self.db:
            raise ValueError(f"db {self.db} with cluster: true (a cluster has database 0 only)")
        if self.username is not None and self.password is None:
            raise ValueError("username needs a password (ACL users authenticate with both)")
        return self

    @property
    def address(self) -> str:
        """``host:port`` for messages (never credentials)."""
        return f"{self.host}:{self.port}"
