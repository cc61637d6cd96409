"""Options of the ``localdisk`` backend (the ``options:`` mapping of a tier in YAML)."""

from __future__ import annotations

import enum
from pathlib import Path

from pydantic import Field, field_validator

from hicache.storage import (
    DEFAULT_DIR_MODE,
    DEFAULT_EVICTION,
    DEFAULT_FILE_MODE,
    BackendConfig,
    DirMode,
    EvictionPolicy,
    FileMode,
    Size,
)

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


class LocalDiskConfig(BackendConfig):
    """Options of a ``localdisk`` tier.

    Pages live under ``root/<namespace>/<first two hex chars of the key>/<key>``; each file is
    the 4 KiB page header followed by the payload.
    """

    root: Path = Field(description="Directory holding every namespace; created owner-only.")
    max_bytes: Size | None = Field(
        default=None,
        gt=0,
        description="Bound on the bytes this namespace keeps on disk, headers included "
        "(default: half of the free space plus what the namespace already holds).",
    )
    eviction: EvictionPolicy = Field(
        default=DEFAULT_EVICTION,
        description="Which pages go first beyond max_bytes: predicted_reuse (least likely to be "
        "read again, learned online per reuse class) or lru (least recently used).",
    )
    durability: Durability = Field(
        default=Durability.NONE,
        description="none: survives a process crash; fsync: file and directory synced before "
        "a put returns OK, so it also survives a power loss.",
    )
    io_threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Threads a batch's pages are read/written with (a 1-page call runs inline); "
        "unset: none for pages under 256 KiB (the calling thread does them: handing a small "
        "page to another thread costs more than its system calls, and the tier already runs "
        "its calls side by side), else 2 per core, at most 4.",
    )
    direct_io: bool = Field(
        default=False,
        description="O_DIRECT for page-aligned buffers when the filesystem allows it and "
        "page_bytes is a multiple of 4 KiB; buffered I/O (logged once) otherwise.",
    )
    pack_below: Size = Field(
        default=256 * 1024,
        ge=0,
        description="Pages stored smaller than this (header included) are written as one pack "
        "file per put (one pwritev, one rename) and read one open per pack; 0: one file per page. "
        "Single-process, buffered I/O only, and where the filesystem can punch holes.",
    )
    shared: bool = Field(
        default=False,
        description="Several processes use this root: index misses ask the filesystem and one "
        "process at a time (elected with flock) enforces max_bytes for all.",
    )
    verify_checksums: bool = Field(
        default=True,
        description="Verify the payload checksum on every read (the header is always verified).",
    )
    file_mode: FileMode = Field(
        default=DEFAULT_FILE_MODE,
        description="Permission bits of page and state files, octal ('0640': share with a group).",
    )
    dir_mode: DirMode = Field(
        default=DEFAULT_DIR_MODE,
        description="Permission bits of the directories it creates, octal ('0750' for a group).",
    )

    @field_validator("root", mode="before")
    @classmethod
    def _root_not_empty(cls, value: object) -> object:
        # Checked before Path() turns '' into '.': pages would land in the working directory.
        if isinstance(value, str) and value.strip() == "":
            raise ValueError(f"root must be a directory path, got {value!r}")
        return value

    @field_validator("root")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()
