"""boto3 client setup for the ``s3`` backend: one place that turns options into a botocore Config.

Credentials are passed only when the options carry them; otherwise the session resolves them
through boto3's default chain.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import boto3
import botocore.session
from botocore.config import Config

from hicache_s3.options import AddressingStyle, ChecksumAlgorithm, S3Options, strip_userinfo

__all__ = ["DEFAULT_REGION", "inject_latency", "make_client", "new_client", "sse_params"]

#: Region used for signing when neither the options nor boto3's chain name one.
DEFAULT_REGION = "us-east-1"


_loader_lock = threading.Lock()
_loader: Any = None


def new_client(service: str, **kwargs: Any) -> Any:
    """A client of a fresh session (own credential resolution) sharing one model loader.

    Parsing botocore's S3 model takes ~0.3 s per session; sharing the loader makes opening many
    backends (one per tier, namespace or test) cheap. Credentials stay per session, so each
    backend resolves the default chain as it stands when it opens.
    """
    global _loader
    # botocore's loader and client creation are not thread-safe: build clients one at a time
    with _loader_lock:
        core = botocore.session.Session()
        if _loader is None:
            _loader = core.get_component("data_loader")
        else:
            core.register_component("data_loader", _loader)
        session = boto3.session.Session(botocore_session=core)
        kwargs.setdefault("region_name", session.region_name or DEFAULT_REGION)
        return session.client(service, **kwargs)


def make_client(options: S3Options) -> Any:
    """A thread-safe S3 client configured from ``options`` (its own boto3 session)."""
    s3_config: dict[str, Any] = {}
    if options.addressing_style is not AddressingStyle.AUTO:
        s3_config["addressing_style"] = options.addressing_style.value
    config = Config(
        connect_timeout=options.connect_timeout,
        read_timeout=options.read_timeout,
        retries={"mode": options.retry_mode.value, "total_max_attempts": options.max_attempts},
        # One connection per worker thread: fewer would serialise workers on the pool, more
        # would sit idle.
        max_pool_connections=options.max_concurrency,
        s3=s3_config or None,
        # botocore >= 1.36 computes a CRC32 of every upload by default; the page header already
        # carries an xxh3 of the payload, so the S3-native checksum is opt-in (`checksum`).
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        user_agent_extra="hicache-s3",
    )
    extra: dict[str, Any] = {"region_name": options.region} if options.region else {}
    if options.access_key_id is not None and options.secret_access_key is not None:
        extra["aws_access_key_id"] = options.access_key_id.get_secret_value()
        extra["aws_secret_access_key"] = options.secret_access_key.get_secret_value()
        if options.session_token is not None:
            extra["aws_session_token"] = options.session_token.get_secret_value()
    endpoint = strip_userinfo(options.endpoint_url) if options.endpoint_url else None
    return new_client("s3", endpoint_url=endpoint, config=config, **extra)


def sse_params(options: S3Options) -> dict[str, Any]:
    """Server-side encryption arguments for ``put_object`` / ``copy_object``."""
    params: dict[str, Any] = {}
    if options.server_side_encryption is not None:
        params["ServerSideEncryption"] = options.server_side_encryption.value
    if options.sse_kms_key_id is not None:
        params["SSEKMSKeyId"] = options.sse_kms_key_id
    if options.sse_bucket_key_enabled is not None:
        params["BucketKeyEnabled"] = options.sse_bucket_key_enabled
    return params


def checksum_params(options: S3Options) -> dict[str, Any]:
    """``ChecksumAlgorithm`` argument for puts when an S3-native checksum is configured."""
    if options.checksum is ChecksumAlgorithm.NONE:
        return {}
    return {"ChecksumAlgorithm": options.checksum.value.upper()}


def inject_latency(client: Any, seconds: float) -> None:
    """Delay every request of ``client`` by ``seconds`` before it is sent (benchmarks only).

    Models a distant endpoint on a local one: the delay is per request, like a network round
    trip, and runs in the calling worker thread, so concurrency can hide it.
    """

    def _delay(**_: Any) -> None:
        time.sleep(seconds)

    client.meta.events.register("before-send.s3", _delay)
