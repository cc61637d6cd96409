"""Options of the ``localdisk`` backend (the ``options:`` mapping of a tier in YAML)."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, field_validator

from hicache.storage.backend import BackendConfig
from hicache.storage.sizes import Size

__all__ = ["DEFAULT_FREE_FRACTION", "Durability", "LocalDiskConfig"]

#: Share of the filesystem's free space (plus what this namespace already uses) taken as
#: ``max_bytes`` when none is configured: a cache must never fill the disk it shares.
DEFAULT_FREE_FRACTION = 0.5


class Durability(enum.StrEnum):
    """What a ``put`` that returned ``OK`` survives (see the README for the full statement)."""

    #: Survives a crash of the process (the kernel's page cache holds the data); a power loss
    #: may lose recent pages, but never exposes a torn one as valid (checksums catch it).
    NONE = "none"
    #: Also survives a power loss: the file and its directory entry are synced before ``OK``.
    FSYNC = "fsync"


def _mode(value: Any) -> Any:
    # YAML reads `0600` as the int 600 (decimal) or the string "0600": accept octal strings and
    # reject decimal look-alikes instead of silently creating world-writable files.
    if isinstance(value, str):
        try:
            return int(value, 8)
        except ValueError as exc:
            raise ValueError(f"invalid permission mode {value!r}: expected octal, '0600'") from exc
    return value


Mode = Annotated[int, BeforeValidator(_mode), Field(ge=0, le=0o777)]


class LocalDiskConfig(BackendConfig):
    """Options of a ``localdisk`` tier.

    Pages live under ``root/<namespace>/<first two hex chars of the key>/<key>``; each file is
    the 4 KiB page header followed by the payload.
    """

    #: Directory holding every namespace; created (owner-only) if missing.
    root: Path
    #: Bound on the bytes this namespace keeps on disk (header included). ``None``: half of the
    #: filesystem's free space at ``open()`` (plus what the namespace already holds).
    max_bytes: Size | None = None
    #: ``none`` (process-crash safe) or ``fsync`` (power-loss safe).
    durability: Durability = Durability.NONE
    #: Threads a batch's pages are read/written with (1: serially in the calling thread).
    io_threads: int = Field(default=4, ge=1, le=256)
    #: Use ``O_DIRECT`` where the filesystem and the buffers allow it (page-aligned buffers,
    #: payload a multiple of 4 KiB); falls back to buffered I/O, logged once, otherwise.
    direct_io: bool = False
    #: Several processes use this root at once: index misses look at the filesystem, and one
    #: process at a time (elected with ``flock``) enforces ``max_bytes`` for all of them.
    shared: bool = False
    #: Verify the payload checksum on every read (the header is always verified).
    verify_checksums: bool = True
    #: Permission bits of page files and directories (owner-only by default).
    file_mode: Mode = 0o600
    dir_mode: Mode = 0o700

    @field_validator("root")
    @classmethod
    def _root_not_empty(cls, value: Path) -> Path:
        if str(value).strip() == "":
            raise ValueError("root must be a directory path, got an empty string")
        return value.expanduser()
