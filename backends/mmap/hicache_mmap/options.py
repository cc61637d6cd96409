"""Options of the ``mmap`` backend (the ``options:`` mapping of a tier in YAML)."""

from __future__ import annotations

import enum

from pydantic import Field, field_validator

from hicache.storage import (
    DEFAULT_DIR_MODE,
    DEFAULT_FILE_MODE,
    BackendConfig,
    DirMode,
    FileMode,
    Size,
)

__all__ = ["MmapOptions", "MsyncMode"]


class MsyncMode(enum.StrEnum):
    """When written slots are flushed to the file's backing store."""

    #: Never: pages survive a process crash (the page cache holds them), not a power loss.
    NONE = "none"
    #: On every put: the slot's odd generation, then the payload, then the header are synced in
    #: that order, so after a power loss a slot is either free or complete and verified.
    ON_PUT = "on_put"


class MmapOptions(BackendConfig):
    """Options of :class:`~hicache_mmap.MmapBackend`."""

    #: The slot file (e.g. ``/dev/shm/hicache.slots``); every process of a node that names the
    #: same file shares its pages.
    path: str = Field(min_length=1)
    #: Bytes of the file given to slots (headers included), rounded down to whole sets of
    #: ``associativity`` slots, reserved on the filesystem when the file is created. An existing
    #: file in use or holding pages must have been created with the same geometry.
    capacity: Size = Field(gt=0)
    #: Create the file when it does not exist (otherwise ``open()`` fails).
    create: bool = True
    #: See :class:`MsyncMode`.
    msync: MsyncMode = MsyncMode.NONE
    #: Slots per set: a key may live in any slot of its set and CLOCK evicts within the set.
    associativity: int = Field(default=8, ge=1, le=1024)
    #: Verify each page's xxh3 checksum on ``get_into`` (the header is always verified).
    verify_checksum: bool = True
    #: Populate the mapping at open (``MAP_POPULATE``) so puts and gets pay no page faults. (The
    #: file's blocks are reserved at creation either way.)
    prefault: bool = True
    #: Longest wait, in seconds, for another process's lock on a set; past it the put FAILS.
    lock_timeout_s: float = Field(default=5.0, gt=0, le=3600)
    #: Permission bits of a slot file this tier creates (an existing file keeps its own) and of
    #: the parent directories it creates. Owner-only by default; ``"0660"`` / ``"0770"`` let
    #: the processes of one group share the file.
    file_mode: FileMode = DEFAULT_FILE_MODE
    dir_mode: DirMode = DEFAULT_DIR_MODE

    @field_validator("path")
    @classmethod
    def _path_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(f"path must name the slot file, got {value!r}")
        return value
