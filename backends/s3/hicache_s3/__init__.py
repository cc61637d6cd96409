"""hicache's ``s3`` storage backend: one shared L3 tier in any S3-compatible bucket.

Installed as the ``hicache-s3`` distribution; the cache finds it through the ``hicache.backends``
entry point ``s3 = "hicache_s3:S3Backend"``. See ``backends/s3/README.md`` for options.
"""

from __future__ import annotations

from hicache_s3.backend import S3Backend
from hicache_s3.errors import S3AccessDeniedError, S3BucketNotFoundError
from hicache_s3.options import S3Options

__all__ = ["S3AccessDeniedError", "S3Backend", "S3BucketNotFoundError", "S3Options"]
