"""``S3Backend``: pages as objects in an S3-compatible bucket, shared by every instance using it.

Layout: one object per page at ``<prefix>/<namespace>/<page key>``, body = the 4 KiB page header
of :mod:`hicache.storage.pageformat` followed by the payload. Puts are create-only
(``If-None-Match: *``), gets stream straight into the caller's page buffer and verify the header
and the xxh3 checksum, existence checks are parallel HEADs. Every boto3 call is wrapped: no
botocore exception leaves this module.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from botocore.exceptions import ClientError

from hicache.errors import (
    BackendClosedError,
    BackendError,
    BackendUnavailableError,
    PageCorruptError,
    PageVersionError,
)
from hicache.storage import (
    HEADER_SIZE,
    Backend,
    BackendConfig,
    BackendContext,
    Capabilities,
    PageParts,
    PageStatus,
    RemoteBenchHooks,
    StoredPage,
    check_namespace,
    check_version,
    encode_header,
    redact_url,
    verify_page,
)
from hicache_s3 import errors
from hicache_s3.batch import gather, ordered_prefix
from hicache_s3.body import PageBody, read_exact
from hicache_s3.client import checksum_params, make_client, sse_params
from hicache_s3.options import ChecksumAlgorithm, ConditionalPut, S3Options

__all__ = ["S3Backend"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_EXISTS_CACHE_MAX = 100_000
_CORRUPT_LOG_MAX = 10_000


def _has_crt() -> bool:
    return importlib.util.find_spec("awscrt") is not None


class S3Backend(RemoteBenchHooks, Backend):
    """Pages in an S3 bucket (AWS, MinIO, Ceph RGW, any S3-compatible store).

    Capabilities: persistent and shared (no negative cache: other instances add pages at any
    time), listable, medium ``EXTERNAL``. It never evicts on its own; bucket lifecycle rules do
    (see ``refresh_after`` in the README for why that matters to prefix chains).
    """

    config_model = S3Options
    #: raw client calls on the same server (see ``baseline.py``), loaded only when benchmarked
    bench_baseline_ref = "hicache_s3.baseline:S3RawBaseline"

    def __init__(self, config: BackendConfig, context: BackendContext) -> None:
        super().__init__(config, context)  # checks that config is an S3Options
        self.options = cast(S3Options, config)
        endpoint = self.options.endpoint_url
        self._endpoint = redact_url(endpoint) if endpoint else "AWS S3"
        self._key_prefix = self.options.object_prefix(context.namespace)
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        # put mode; AUTO turns into NEVER the first time a server rejects If-None-Match
        self._conditional = self.options.conditional_put
        self._lock = threading.Lock()
        self._exists_cache: dict[str, float] = {}
        self._refreshing: set[str] = set()
        self._corrupt_logged: set[str] = set()
        self._counts: dict[str, int] = dict.fromkeys(
            (
                "puts",
                "put_bytes",
                "already_exists",
                "gets",
                "get_bytes",
                "not_found",
                "corrupt",
                "unknown_version",
                "heads",
                "exists_cache_hits",
                "refreshes",
                "refresh_failures",
                "deletes",
                "failed_pages",
            ),
            0,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(bucket={self.options.bucket!r}, "
            f"prefix={self.options.prefix!r}, namespace={self.context.namespace!r}, "
            f"endpoint={self._endpoint!r})"
        )

    @property
    def capabilities(self) -> Capabilities:
        # docstring inherited
        return Capabilities(
            persistent=True,
            shared=True,
            manages_capacity=False,
            # large enough to keep max_concurrency requests busy, small enough that one call
            # never monopolises the workers for long
            max_batch=256,
            alignment=1,
            listable=True,
            default_medium="EXTERNAL",
        )

    @property
    def client(self) -> Any:
        """The boto3 client of an open backend (for tooling: benchmarks, raw test hooks)."""
        client = self._client
        if client is None:
            raise BackendClosedError(f"{self!r} is not open")
        return client

    def object_key(self, key: str) -> str:
        """Object key of page ``key`` in this instance's namespace."""
        return self._key_prefix + key

    # ------------------------------------------------------------------ lifecycle

    def _open(self) -> None:
        if self.options.checksum is ChecksumAlgorithm.CRC32C and not _has_crt():
            raise BackendError(
                f"tier {self.context.tier_name!r}: checksum crc32c needs botocore's CRT "
                "extension: pip install 'hicache-s3[crt]' (or use checksum: crc32)"
            )
        try:
            client = make_client(self.options)
        except Exception as exc:  # botocore raises on e.g. an unknown region or bad config
            raise self._translate(exc, "client setup") from None
        try:
            client.head_bucket(Bucket=self.options.bucket)
        except Exception as exc:
            client.close()
            if errors.is_not_found(exc) or (
                isinstance(exc, ClientError) and errors.error_code(exc) == "NoSuchBucket"
            ):
                raise errors.S3BucketNotFoundError(
                    f"S3 bucket {self.options.bucket!r} does not exist at {self._endpoint} "
                    f"(tier {self.context.tier_name!r}); create it or fix `bucket`/`endpoint_url`"
                ) from None
            raise self._translate(exc, "open (HeadBucket)") from None
        self._client = client
        self._pool = ThreadPoolExecutor(
            max_workers=self.options.max_concurrency, thread_name_prefix="hicache-s3"
        )

    def _close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)  # lets in-place refresh copies finish (bounded by timeouts)
        client, self._client = self._client, None
        if client is not None:
            client.close()
        with self._lock:
            self._exists_cache.clear()

    # ------------------------------------------------------------------ helpers

    def _translate(self, exc: BaseException, operation: str) -> BackendError:
        return errors.translate(
            exc, operation=operation, bucket=self.options.bucket, endpoint=self._endpoint
        )

    def _call(self, operation: str, fn: Callable[..., T], **kwargs: Any) -> T:
        """Run one boto3 call; every exception leaves as a hicache error."""
        try:
            return fn(Bucket=self.options.bucket, **kwargs)
        except Exception as exc:
            raise self._translate(exc, operation) from exc

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._counts[name] += delta

    def _workers(self) -> ThreadPoolExecutor:
        pool = self._pool
        if pool is None:
            raise BackendClosedError(f"{self!r} is not open")
        return pool

    def _cached_present(self, key: str) -> bool:
        if self.options.exists_cache_ttl <= 0:
            return False
        with self._lock:
            expiry = self._exists_cache.get(key)
            if expiry is None:
                return False
            if expiry < time.monotonic():
                del self._exists_cache[key]
                return False
            self._counts["exists_cache_hits"] += 1
            return True

    def _remember_present(self, key: str) -> None:
        if self.options.exists_cache_ttl <= 0:
            return
        with self._lock:
            if len(self._exists_cache) >= _EXISTS_CACHE_MAX:
                self._exists_cache.clear()
            self._exists_cache[key] = time.monotonic() + self.options.exists_cache_ttl

    def _unknown_version(self, key: str, exc: PageVersionError) -> PageStatus:
        """A newer writer's page: a miss for this reader, counted apart and left in place."""
        self._count(unknown_version=1, not_found=1)
        with self._lock:
            first = self._counts["unknown_version"] == 1
        (log.warning if first else log.debug)(
            "page %s in %r: %s (a miss, left in place)", key, self, exc
        )
        return PageStatus.NOT_FOUND

    def _corrupt(self, key: str, why: str) -> PageStatus:
        self._count(corrupt=1)
        with self._lock:
            first = key not in self._corrupt_logged and len(self._corrupt_logged) < _CORRUPT_LOG_MAX
            if first:
                self._corrupt_logged.add(key)
        if first:
            log.warning("corrupt page %s in %r: %s (treated as a miss)", key, self, why)
        return PageStatus.CORRUPT

    # ------------------------------------------------------------------ exists

    def _head(self, key: str) -> bool:
        if self._cached_present(key):
            return True
        self._count(heads=1)
        try:
            response = self.client.head_object(Bucket=self.options.bucket, Key=self.object_key(key))
        except Exception as exc:
            if errors.is_not_found(exc):
                return False
            raise self._translate(exc, "HeadObject") from exc
        self._remember_present(key)
        self._maybe_refresh(key, response.get("LastModified"))
        return True

    def _exists(self, keys: Sequence[str]) -> list[bool]:
        return gather(
            self._workers(), self._head, [(k,) for k in keys], on_error=False, what="HEAD"
        )

    def _exists_prefix(self, keys: Sequence[str]) -> int:
        # two windows of work: the workers stay busy while the head of the chain is still in
        # flight; a gap wastes at most this many HEADs
        return ordered_prefix(
            self._workers(), self._head, keys, window=2 * self.options.max_concurrency
        )

    # ------------------------------------------------------------------ put

    def _put(self, keys: Sequence[str], srcs: Sequence[PageParts]) -> list[PageStatus]:
        return gather(
            self._workers(),
            self._put_one,
            list(zip(keys, srcs, strict=True)),
            on_error=PageStatus.FAILED,
            what="PutObject",
        )

    def _put_one(self, key: str, src: PageParts) -> PageStatus:
        if self._conditional is ConditionalPut.NEVER and self._head(key):
            self._count(already_exists=1)
            return PageStatus.ALREADY_EXISTS
        params: dict[str, Any] = {
            "Bucket": self.options.bucket,
            "Key": self.object_key(key),
            "Body": PageBody(encode_header(self.context.namespace, key, src), src),
            **sse_params(self.options),
            **checksum_params(self.options),
        }
        conditional = self._conditional is not ConditionalPut.NEVER
        if conditional:
            params["IfNoneMatch"] = "*"
        try:
            self.client.put_object(**params)
        except Exception as exc:
            if conditional and errors.is_precondition_failed(exc):
                self._count(already_exists=1)
                self._remember_present(key)
                return PageStatus.ALREADY_EXISTS
            if conditional and errors.is_conditional_unsupported(exc):
                return self._conditional_unsupported(key, src)
            if errors.is_checksum_mismatch(exc):
                log.warning("S3 rejected the checksum of page %s in %r", key, self)
                self._count(failed_pages=1)
                return PageStatus.FAILED
            error = self._translate(exc, "PutObject")
            if isinstance(error, BackendUnavailableError | BackendClosedError):
                raise error from exc
            log.warning("put of page %s failed in %r: %s", key, self, error)
            self._count(failed_pages=1)
            return PageStatus.FAILED
        self._count(puts=1, put_bytes=self.context.page_bytes)
        self._remember_present(key)
        return PageStatus.OK

    def _conditional_unsupported(self, key: str, src: PageParts) -> PageStatus:
        """The server refused ``If-None-Match``: fall back (``auto``) or fail the page."""
        if self.options.conditional_put is ConditionalPut.ALWAYS:
            log.error("%r: the server rejects conditional puts (If-None-Match)", self)
            self._count(failed_pages=1)
            return PageStatus.FAILED
        with self._lock:
            first = self._conditional is not ConditionalPut.NEVER
            self._conditional = ConditionalPut.NEVER
        if first:
            log.warning(
                "%r: the server rejects conditional puts (If-None-Match); falling back to "
                "HEAD-then-put (racing writers may both write the same bytes)",
                self,
            )
        return self._put_one(key, src)

    # ------------------------------------------------------------------ get

    def _get_into(self, keys: Sequence[str], dsts: Sequence[PageParts]) -> list[PageStatus]:
        return gather(
            self._workers(),
            self._get_one,
            list(zip(keys, dsts, strict=True)),
            on_error=PageStatus.FAILED,
            what="GetObject",
        )

    def _get_one(self, key: str, dst: PageParts) -> PageStatus:
        params: dict[str, Any] = {"Bucket": self.options.bucket, "Key": self.object_key(key)}
        if self.options.checksum is not ChecksumAlgorithm.NONE:
            params["ChecksumMode"] = "ENABLED"
        try:
            response = self.client.get_object(**params)
        except Exception as exc:
            if errors.is_not_found(exc):
                self._count(not_found=1)
                return PageStatus.NOT_FOUND
            error = self._translate(exc, "GetObject")
            if isinstance(error, BackendUnavailableError | BackendClosedError):
                raise error from exc
            log.warning("get of page %s failed in %r: %s", key, self, error)
            self._count(failed_pages=1)
            return PageStatus.FAILED
        body = response["Body"]
        try:
            status = self._stream_page(key, body, int(response.get("ContentLength", -1)), dst)
        finally:
            body.close()
        if status is PageStatus.OK:
            self._count(gets=1, get_bytes=self.context.page_bytes)
            self._remember_present(key)
            self._maybe_refresh(key, response.get("LastModified"))
        return status

    def _stream_page(self, key: str, body: Any, length: int, dst: PageParts) -> PageStatus:
        expected = HEADER_SIZE + self.context.page_bytes
        chunk = self.options.read_chunk_bytes
        if length != expected:
            # A newer writer's page may have another size: its version decides, not its size.
            newer = _newer_version(body, length, chunk)
            if newer is not None:
                return self._unknown_version(key, newer)
            return self._corrupt(key, f"object has {length} bytes, expected {expected}")
        header = bytearray(HEADER_SIZE)
        try:
            got = read_exact(body, memoryview(header), chunk)
            got += read_exact(body, dst, chunk)
            # reading past the end lets a checksumming body validate the S3-native checksum
            if body.readinto(bytearray(1)):
                return self._corrupt(key, "unexpected bytes after the page")
        except Exception as exc:
            if errors.is_checksum_mismatch(exc):
                return self._corrupt(key, "S3-native checksum mismatch")
            error = self._translate(exc, "GetObject (body)")
            if isinstance(error, BackendUnavailableError | BackendClosedError):
                raise error from exc
            log.warning("reading page %s failed in %r: %s", key, self, error)
            self._count(failed_pages=1)
            return PageStatus.FAILED
        if got != expected:
            return self._corrupt(key, f"body ended after {got} of {expected} bytes")
        try:
            verify_page(header, dst, namespace=self.context.namespace, key=key)
        except PageCorruptError as exc:
            return self._corrupt(key, str(exc))
        except PageVersionError as exc:
            return self._unknown_version(key, exc)
        return PageStatus.OK

    # ------------------------------------------------------------------ refresh

    def _maybe_refresh(self, key: str, last_modified: datetime | None) -> None:
        """Re-copy an old object in place, in the background, so lifecycle expiry restarts."""
        limit = self.options.refresh_after
        if limit is None or last_modified is None:
            return
        if (datetime.now(UTC) - last_modified).total_seconds() <= limit:
            return
        with self._lock:
            if key in self._refreshing:
                return
            self._refreshing.add(key)
        try:
            self._workers().submit(self._refresh_one, key)
        except (RuntimeError, BackendError):  # closing: skip this refresh
            with self._lock:
                self._refreshing.discard(key)

    def _refresh_one(self, key: str) -> None:
        object_key = self.object_key(key)
        try:
            # S3 refuses a copy onto itself unless something changes: replacing the metadata
            # (with the refresh time) is that change, and it gives the object a new LastModified.
            self.client.copy_object(
                Bucket=self.options.bucket,
                Key=object_key,
                CopySource={"Bucket": self.options.bucket, "Key": object_key},
                MetadataDirective="REPLACE",
                Metadata={"hicache-refreshed": datetime.now(UTC).isoformat(timespec="seconds")},
                **sse_params(self.options),
            )
            self._count(refreshes=1)
        except Exception as exc:
            self._count(refresh_failures=1)
            log.debug(
                "refresh of page %s failed in %r: %s", key, self, self._translate(exc, "Copy")
            )
        finally:
            with self._lock:
                self._refreshing.discard(key)

    # ------------------------------------------------------------------ delete

    def _delete(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._exists_cache.pop(key, None)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            chunk = keys[start : start + 1000]
            response = self._call(
                "DeleteObjects",
                self.client.delete_objects,
                Delete={"Objects": [{"Key": self.object_key(k)} for k in chunk], "Quiet": True},
            )
            failed = response.get("Errors") or []
            if failed:
                codes = sorted({str(e.get("Code")) for e in failed})
                raise BackendError(
                    f"S3 DeleteObjects on bucket {self.options.bucket!r} at {self._endpoint}: "
                    f"{len(failed)} of {len(chunk)} keys not deleted ({', '.join(codes)})"
                )
            self._count(deletes=len(chunk))

    # ------------------------------------------------------------------ listing

    def _list(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            yield from paginator.paginate(Bucket=self.options.bucket, **kwargs)
        except Exception as exc:
            raise self._translate(exc, "ListObjectsV2") from exc

    def _iter_pages(self) -> Iterator[StoredPage]:
        # docstring inherited
        start = len(self._key_prefix)
        for page in self._list(Prefix=self._key_prefix):
            for item in page.get("Contents", ()):
                key = str(item["Key"])[start:]
                if len(key) == 64 and all(c in "0123456789abcdef" for c in key):
                    yield StoredPage(key=key, stored_bytes=int(item.get("Size", 0)))

    def _iter_namespaces(self) -> Iterator[str]:
        # docstring inherited
        root = f"{self.options.prefix}/" if self.options.prefix else ""
        for page in self._list(Prefix=root, Delimiter="/"):
            for common in page.get("CommonPrefixes", ()):
                name = str(common["Prefix"])[len(root) :].rstrip("/")
                try:
                    yield check_namespace(name)
                except ValueError:
                    continue  # not ours: some other tool's folder under the same prefix

    # ------------------------------------------------------------------ stats

    def _stats(self) -> Mapping[str, Any]:
        with self._lock:
            counts = dict(self._counts)
            refreshing = len(self._refreshing)
        return {
            "bucket": self.options.bucket,
            "prefix": self.options.prefix,
            "endpoint": self._endpoint,
            "conditional_put": self._conditional.value,
            "refreshes_in_flight": refreshing,
            **counts,
        }


def _newer_version(body: Any, length: int, chunk: int) -> PageVersionError | None:
    """Why an object of the wrong size is a newer writer's page, or ``None`` if it is not."""
    start = bytearray(min(max(length, 0), HEADER_SIZE))
    try:
        check_version(start[: read_exact(body, memoryview(start), chunk)])
    except PageVersionError as exc:
        return exc
    except Exception as exc:
        log.debug("cannot read the start of an object of the wrong size: %s", exc)
    return None
