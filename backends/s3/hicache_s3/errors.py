"""Translation of botocore exceptions into hicache's error tree, at the backend boundary.

Every boto3 call of the backend goes through :func:`translate` (or one of the predicates) so no
``botocore`` exception escapes. Messages name the operation, bucket and endpoint; they are built
here, never copied from botocore (whose text could one day carry request details), and never
contain credentials.
"""

from __future__ import annotations

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from hicache.errors import BackendError, BackendUnavailableError

__all__ = [
    "S3AccessDeniedError",
    "S3BucketNotFoundError",
    "error_code",
    "http_status",
    "is_checksum_mismatch",
    "is_conditional_unsupported",
    "is_not_found",
    "is_precondition_failed",
    "translate",
]

_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "403",
    }
)
_THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})


class S3BucketNotFoundError(BackendUnavailableError, LookupError):
    """The configured bucket does not exist at the configured endpoint."""


class S3AccessDeniedError(BackendUnavailableError, PermissionError):
    """The credentials boto3 found are missing, wrong, or not allowed to use the bucket."""


def error_code(exc: ClientError) -> str:
    """The S3 error code of a ``ClientError`` (e.g. ``NoSuchKey``, ``"404"`` for a HEAD)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def http_status(exc: ClientError) -> int:
    """The HTTP status of a ``ClientError`` (0 when botocore did not record one)."""
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def is_not_found(exc: BaseException) -> bool:
    """True for a missing object (``NoSuchKey``; a bare 404 on HEAD)."""
    return isinstance(exc, ClientError) and error_code(exc) in _NOT_FOUND_CODES


def is_precondition_failed(exc: BaseException) -> bool:
    """True when an ``If-None-Match: *`` put found the key already there."""
    return isinstance(exc, ClientError) and (
        error_code(exc) in ("PreconditionFailed", "412") or http_status(exc) == 412
    )


def is_conditional_unsupported(exc: BaseException) -> bool:
    """True when the server refused a put because it does not implement ``If-None-Match``."""
    if not isinstance(exc, ClientError):
        return False
    code = error_code(exc)
    if code == "NotImplemented" or http_status(exc) == 501:
        return True
    if http_status(exc) == 400 and code in ("InvalidArgument", "InvalidRequest"):
        error = exc.response.get("Error", {})
        text = f"{error.get('Message', '')} {error.get('ArgumentName', '')}".lower()
        return "if-none-match" in text
    return False


def is_checksum_mismatch(exc: BaseException) -> bool:
    """True when botocore found the S3-native checksum of a body wrong."""
    return isinstance(exc, FlexibleChecksumError) or (
        isinstance(exc, ClientError) and error_code(exc) in ("BadDigest", "InvalidDigest")
    )


def translate(exc: BaseException, *, operation: str, bucket: str, endpoint: str) -> BackendError:
    """Map a botocore (or transport) exception to the hicache error the caller should see.

    Unreachable endpoints, timeouts, 5xx and throttling (after botocore's own retries) become
    :class:`~hicache.errors.BackendUnavailableError`, so the tiers' breaker can act; a missing
    bucket and refused credentials get their own subclasses of it; anything else is a plain
    :class:`~hicache.errors.BackendError` (a per-page ``FAILED`` where a batch is concerned).
    """
    where = f"S3 {operation} on bucket {bucket!r} at {endpoint}"
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return S3AccessDeniedError(
            f"{where}: boto3's default credential chain found no usable credentials "
            f"({type(exc).__name__})"
        )
    # connection refused or reset, DNS failures, timeouts, streams cut short
    if isinstance(exc, HTTPClientError | BotoConnectionError | IncompleteReadError):
        return BackendUnavailableError(f"{where}: endpoint unreachable ({type(exc).__name__})")
    if isinstance(exc, ClientError):
        code, status = error_code(exc), http_status(exc)
        if code == "NoSuchBucket":
            return S3BucketNotFoundError(f"{where}: bucket {bucket!r} does not exist")
        if code in _ACCESS_CODES or status == 403:
            return S3AccessDeniedError(
                f"{where}: access denied ({code or status}); check the credentials boto3's "
                "default chain provides and the bucket policy"
            )
        if code in _THROTTLE_CODES or status == 429 or status >= 500:
            return BackendUnavailableError(
                f"{where}: server error or throttling after retries ({code or status})"
            )
        return BackendError(f"{where}: request failed ({code or status})")
    if isinstance(exc, BotoCoreError):
        return BackendError(f"{where}: client error ({type(exc).__name__})")
    if isinstance(exc, OSError):
        return BackendUnavailableError(f"{where}: transport error ({type(exc).__name__})")
    return BackendError(f"{where}: unexpected {type(exc).__name__}")
