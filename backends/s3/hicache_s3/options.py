"""Options of the ``s3`` backend: the ``options:`` mapping of a tier with ``backend: s3``."""

from __future__ import annotations

import enum
import re
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from hicache.storage import BackendConfig, RedactedUrl, redact_url

__all__ = [
    "AddressingStyle",
    "ChecksumAlgorithm",
    "ConditionalPut",
    "RetryMode",
    "S3Options",
    "ServerSideEncryption",
    "strip_userinfo",
]

# S3's own rules for bucket names (the strict, DNS-compatible set every S3-compatible store takes).
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*\Z")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
#: Longest network timeout: a request silent for an hour is a hang.
_MAX_TIMEOUT_S = 3600.0
#: Longest age an option may name (ten years): beyond it a duration is a typo.
_MAX_AGE_S = 3650 * 86400.0


class AddressingStyle(enum.StrEnum):
    """How the bucket appears in request URLs (botocore's ``s3.addressing_style``)."""

    #: botocore decides: virtual-hosted where the bucket name allows, path style for IP endpoints.
    AUTO = "auto"
    #: ``http://endpoint/bucket/key``: what most self-hosted stores (MinIO, Ceph RGW) expect.
    PATH = "path"
    #: ``http://bucket.endpoint/key``: needs DNS for ``bucket.<endpoint host>``.
    VIRTUAL = "virtual"


class RetryMode(enum.StrEnum):
    """botocore retry modes."""

    STANDARD = "standard"
    ADAPTIVE = "adaptive"


class ChecksumAlgorithm(enum.StrEnum):
    """S3-native integrity checksum sent with every put, on top of the page header's xxh3."""

    NONE = "none"
    CRC32 = "crc32"
    #: Needs ``botocore[crt]`` (awscrt) installed.
    CRC32C = "crc32c"


class ConditionalPut(enum.StrEnum):
    """How create-only puts are made."""

    #: ``If-None-Match: *``; if the server rejects the header, fall back to ``never`` for good.
    AUTO = "auto"
    #: Always ``If-None-Match: *``; a server that rejects it fails the put.
    ALWAYS = "always"
    #: HEAD first and skip keys known to exist (two racing writers may both write: harmless,
    #: since a page key names its content).
    NEVER = "never"


class ServerSideEncryption(enum.StrEnum):
    """Passed through as ``ServerSideEncryption`` on every put and refresh copy."""

    AES256 = "AES256"
    KMS = "aws:kms"
    KMS_DSSE = "aws:kms:dsse"


def parse_duration(value: object) -> float | None:
    """``"12h"``, ``"7d"``, ``"30s"``, ``"250ms"`` or a number of seconds -> seconds."""
    if value is None or isinstance(value, int | float):
        try:
            return None if value is None else float(value)
        except OverflowError:  # an int beyond any float
            raise ValueError(f"invalid duration {value!r}: too large") from None
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise ValueError(f"invalid duration {value!r}: use seconds or e.g. '250ms', '30s', '12h', '7d'")


def strip_userinfo(url: str) -> str:
    """``url`` without its ``user:password@`` part: what botocore gets (S3 signs requests with
    keys; userinfo would only end up in botocore's error messages)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class S3Options(BackendConfig):
    """Options of an S3 tier.

    Credentials come from boto3's default chain (environment, shared config and credential
    files, SSO, container or instance roles) unless ``access_key_id`` and ``secret_access_key``
    are set. Those are ``SecretStr``: they never appear in a log line, an error, ``stats()``,
    ``repr`` or ``hicache config show``; nor does userinfo in ``endpoint_url``.
    """

    bucket: str = Field(
        description="bucket holding the pages; it must exist (open() checks it and names it)"
    )
    prefix: str = Field(
        default="", description="key prefix: objects are <prefix>/<namespace>/<page key>"
    )
    endpoint_url: RedactedUrl | None = Field(
        default=None,
        description="S3-compatible endpoint (MinIO, Ceph RGW, a local server); null = AWS",
    )
    access_key_id: SecretStr | None = Field(
        default=None, description="access key id; null = boto3's credential chain"
    )
    secret_access_key: SecretStr | None = Field(
        default=None, description="secret access key, set together with access_key_id"
    )
    session_token: SecretStr | None = Field(
        default=None, description="session token of temporary credentials (optional)"
    )
    region: str | None = Field(
        default=None, description="signing region; null = boto3's chain, else us-east-1"
    )
    addressing_style: AddressingStyle = Field(
        default=AddressingStyle.AUTO,
        description="auto | path (most self-hosted stores) | virtual (needs bucket DNS)",
    )
    max_concurrency: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="requests in flight: sizes the worker threads and botocore's pool together",
    )
    connect_timeout: float = Field(
        default=2.0, gt=0, le=_MAX_TIMEOUT_S, description="seconds to connect"
    )
    read_timeout: float = Field(
        default=10.0,
        gt=0,
        le=_MAX_TIMEOUT_S,
        description="seconds to wait for the next bytes of a response",
    )
    retry_mode: RetryMode = Field(
        default=RetryMode.STANDARD, description="botocore retry mode: standard | adaptive"
    )
    max_attempts: int = Field(
        default=3, ge=1, le=20, description="attempts per request, the first included"
    )
    server_side_encryption: ServerSideEncryption | None = Field(
        default=None, description="passed through: AES256 | aws:kms | aws:kms:dsse"
    )
    sse_kms_key_id: str | None = Field(default=None, description="KMS key for aws:kms")
    sse_bucket_key_enabled: bool | None = Field(
        default=None, description="S3 Bucket Key for SSE-KMS"
    )
    checksum: ChecksumAlgorithm = Field(
        default=ChecksumAlgorithm.NONE,
        description="S3-native checksum on top of the page header's xxh3: none | crc32 | crc32c",
    )
    conditional_put: ConditionalPut = Field(
        default=ConditionalPut.AUTO,
        description="auto: If-None-Match, HEAD-then-put if refused | always | never",
    )
    exists_cache_ttl: float = Field(
        default=0.0,
        ge=0,
        le=_MAX_AGE_S,
        description="seconds a positive exists answer is trusted (0 = off); never negatives",
    )
    refresh_after: float | None = Field(
        default=None,
        le=_MAX_AGE_S,
        description="re-copy an object in place when a hit finds it older than this "
        "(seconds or e.g. '3d'), so expiry by creation time spares hot prefixes; null = off",
    )
    read_chunk_bytes: int = Field(
        default=1 << 20,
        ge=4096,
        le=1 << 30,
        description="bytes per read when streaming into a page",
    )

    @field_validator("bucket")
    @classmethod
    def _check_bucket(cls, value: str) -> str:
        if _BUCKET_RE.match(value) is None or ".." in value:
            raise ValueError(
                f"invalid bucket name {value!r}: 3-63 chars of [a-z0-9.-], "
                "starting and ending with a letter or digit"
            )
        return value

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        value = value.strip("/")
        if any(part in ("", ".", "..") for part in value.split("/")) and value:
            raise ValueError(f"invalid prefix {value!r}: empty, '.' or '..' path segments")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"invalid endpoint_url {redact_url(value)!r}: expected http(s)://host[:port]"
            )
        return value

    @model_validator(mode="after")
    def _keys_come_in_pairs(self) -> S3Options:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError(
                "access_key_id and secret_access_key are set together (or neither: boto3's "
                "credential chain)"
            )
        if self.session_token is not None and self.access_key_id is None:
            raise ValueError("session_token needs access_key_id and secret_access_key")
        return self

    @field_validator("refresh_after", mode="before")
    @classmethod
    def _check_refresh_after(cls, value: object) -> float | None:
        seconds = parse_duration(value)
        if seconds is not None and seconds <= 0:
            raise ValueError(f"refresh_after must be positive, got {value!r}")
        return seconds

    @field_validator("exists_cache_ttl", mode="before")
    @classmethod
    def _check_ttl(cls, value: object) -> float:
        seconds = parse_duration(value)
        return 0.0 if seconds is None else seconds

    def object_prefix(self, namespace: str) -> str:
        """Key prefix of every page of ``namespace`` (ends with ``/``)."""
        return f"{self.prefix}/{namespace}/" if self.prefix else f"{namespace}/"
