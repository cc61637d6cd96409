"""Options of the ``fsspec`` backend: what a tier's ``options:`` mapping in YAML may contain."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import Field, SecretStr, field_validator

from hicache.storage import (
    DEFAULT_DIR_MODE,
    DEFAULT_FILE_MODE,
    BackendConfig,
    DirMode,
    FileMode,
    RedactedUrl,
    is_secret_name,
    redact_url,
)

__all__ = ["FsspecConfig", "WriteMode"]


class WriteMode(enum.StrEnum):
    """How a page becomes visible under its final name."""

    #: ``link`` on the local filesystem, ``rename`` everywhere else.
    AUTO = "auto"
    #: Write a temporary file, then hard-link it to the final name (``os.link``): atomic and
    #: create-only even between processes. Local (POSIX) filesystems only.
    LINK = "link"
    #: Write a temporary object, then ``fs.mv`` it to the final name. Atomic where ``mv`` is a
    #: rename; on object stores ``mv`` is a server-side copy plus a delete (atomic to readers,
    #: twice the cost). Create-only within this process; two processes writing one key race and
    #: the last whole page wins.
    RENAME = "rename"
    #: Write the final name directly. For object stores whose single-object upload is itself
    #: atomic (the object appears whole when the upload completes), saving the copy of
    #: ``rename``. On a filesystem a concurrent reader may see a partial page: the length and
    #: checksum checks report it ``CORRUPT``, never ``OK``.
    DIRECT = "direct"


class FsspecConfig(BackendConfig):
    """Options of one ``fsspec`` tier.

    Validation imports the protocol's fsspec implementation (to fail early with its install
    hint, e.g. "Please install gcsfs to access Google Storage") but touches no storage.
    """

    #: Where pages live: ``memory://hicache``, ``file:///var/cache/hicache``, ``gcs://bucket/kv``.
    #: Pages go to ``<url>/<namespace>/<key[:2]>/<key>``.
    url: RedactedUrl = Field(
        min_length=1, description="fsspec URL of the root: memory://hicache, file:///var/cache/kv"
    )
    #: Passed to the fsspec filesystem constructor (credentials, endpoints, ...). String values
    #: under secret-looking keys (``secret``, ``token``, ``password``, ``key``, ``credential``,
    #: at any depth) are held as ``SecretStr`` and unwrapped only for the constructor. Never
    #: logged and never reported by ``stats()``; ``hicache config show`` masks them.
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        repr=False,
        description="passed unchanged to the fsspec filesystem (credentials, endpoints)",
    )
    #: Threads one batch call fans out over (1 = do every page on the calling thread).
    io_threads: int = Field(
        default=8, ge=1, le=256, description="threads one batch call fans out over"
    )
    #: Hash every payload read and compare it with the header's checksum. Headers are always
    #: checked; turning this off trades silent payload bit rot for less CPU per read.
    verify_checksum: bool = Field(
        default=True, description="hash every payload read and compare it with its header"
    )
    #: Delete a page that fails verification and report it through ``take_evicted()``, so the
    #: next publish of that key can store a good copy (``put`` is create-only: a damaged page
    #: left in place would block it forever). Never done on a read-only tier, nor in ``direct``
    #: mode on ``file://``/``memory://``, where a page still being written reads as damaged.
    drop_corrupt: bool = Field(
        default=True, description="delete pages that fail verification (reported as evicted)"
    )
    #: How a written page becomes visible; see :class:`WriteMode`.
    write_mode: WriteMode = Field(
        default=WriteMode.AUTO,
        description="how a written page becomes visible: auto|link|rename|direct",
    )
    #: Largest batch the engine should hand over in one call.
    max_batch: int = Field(default=256, ge=1, le=65536, description="preferred batch size per call")
    #: ``file://`` only: permission bits of page files and of the directories this tier creates.
    #: Owner-only by default; widen (``"0640"`` / ``"0750"``) to share a tier with a group.
    file_mode: FileMode = Field(
        default=DEFAULT_FILE_MODE, description="file:// page files' permission bits (octal)"
    )
    dir_mode: DirMode = Field(
        default=DEFAULT_DIR_MODE, description="file:// directories' permission bits (octal)"
    )

    @field_validator("storage_options")
    @classmethod
    def _hide_secrets(cls, options: dict[str, Any]) -> dict[str, Any]:
        wrapped: dict[str, Any] = _wrap_secrets(options)
        return wrapped

    @field_validator("url")
    @classmethod
    def _known_protocol(cls, url: str) -> str:
        protocol = fsspec.utils.get_protocol(url)
        try:
            fs_cls = fsspec.get_filesystem_class(protocol)
        except ImportError as exc:
            # fsspec's message is the install hint ("Please install gcsfs to access ...").
            raise ValueError(
                f"protocol {protocol!r} of url {redact_url(url)!r} is not installed: {exc}"
            ) from None
        except ValueError:
            known = ", ".join(sorted(fsspec.available_protocols()))
            raise ValueError(
                f"unknown fsspec protocol {protocol!r} in url {redact_url(url)!r} (known: {known})"
            ) from None
        path = url.split("://", 1)[1] if "://" in url else url
        if issubclass(fs_cls, LocalFileSystem) and not path.strip():
            # fsspec resolves an empty local path to the working directory.
            raise ValueError(
                f"url {redact_url(url)!r} names no directory: pages would land in the cwd"
            )
        return url


def _wrap_secrets(value: Any, secret: bool = False) -> Any:
    """Strings under secret-looking keys (at any depth) as ``SecretStr``."""
    if isinstance(value, str) and secret:
        return SecretStr(value)
    if isinstance(value, Mapping):
        return {k: _wrap_secrets(v, secret or is_secret_name(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_wrap_secrets(v, secret) for v in value)
    return value
