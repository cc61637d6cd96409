"""hicache storage backend on any filesystem fsspec can open: ``memory://``, ``file://``, and,
with their fsspec implementations installed, GCS, Azure Blob, HDFS, SFTP, ...

Registered as kind ``fsspec`` in the ``hicache.backends`` entry-point group::

    storage:
      tiers:
        shared:
          backend: fsspec
          options: {url: "gcs://my-bucket/kv", storage_options: {token: cloud}, io_threads: 16}
"""

from hicache_fsspec._backend import FsspecBackend
from hicache_fsspec._config import FsspecConfig, WriteMode

__all__ = ["FsspecBackend", "FsspecConfig", "WriteMode"]
__version__ = "0.1.0"
