"""What ``open()`` does before serving: directories, the sweep of leftovers, capacity, O_DIRECT.

- ``make_dirs``          root, namespace and the 256 fan-out directories, owner-only
- ``sweep``              remove dead owners' temporaries and damaged files; keep our pages
- ``default_max_bytes``  the bound when none is configured
- ``resolve_max_bytes``  the bound this instance enforces
- ``probe_direct``       whether ``O_DIRECT`` can be used here
- ``scan_packs``         the records of the packs found (also what ``iter_pages`` lists)
- ``load_packs``         the pack files, holding the sound records found (one per key)
- ``drop_packs``         shared mode: remove what a single-process run packed
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from hicache.errors import (
    BackendCapacityError,
    BackendUnavailableError,
    PageCorruptError,
    PageVersionError,
)
from hicache.storage import HEADER_SIZE, decode_header, open_regular, stored_size
from hicache.storage import make_dirs as make_private_dir
from hicache_localdisk.fsio import DIRECT_ALIGN, O_DIRECT, fsync_dir, remove
from hicache_localdisk.layout import FANOUT_DIRS, Layout, ScannedPack, ScannedPage, ScannedRecord
from hicache_localdisk.options import DEFAULT_FREE_FRACTION, Durability, LocalDiskConfig
from hicache_localdisk.packs import ZERO_MAGIC, PackFiles, punch_records

__all__ = [
    "PackScan",
    "SweepResult",
    "default_max_bytes",
    "drop_packs",
    "load_packs",
    "make_dirs",
    "probe_direct",
    "resolve_max_bytes",
    "scan_packs",
    "sweep",
]

log = logging.getLogger(__name__)


def make_dirs(layout: Layout, mode: int, fsync: bool) -> None:
    """Create root, namespace and fan-out directories with ``mode``.

    A read-only or full filesystem is logged, not raised: what is there can still be read and
    every put will fail with a status. Anything else (the root's parent is a file...) raises
    :class:`~hicache.errors.BackendUnavailableError`.
    """
    ns_dir = layout.ns_dir
    try:
        created = not os.path.isdir(ns_dir)
        # Root and namespace are created explicitly so both get `mode` whatever the umask.
        make_private_dir(layout.root, mode)
        for path in [ns_dir, *(f"{ns_dir}/{sub}" for sub in FANOUT_DIRS)]:
            try:
                os.mkdir(path, mode)
                created = True
            except FileExistsError:
                continue
            if mode & 0o077:  # mkdir applies the umask; honour a configured wider mode
                os.chmod(path, mode)
        if created and fsync:
            fsync_dir(ns_dir)
            fsync_dir(layout.root)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC):
            log.warning("localdisk root %s is not writable (%s): puts will fail", ns_dir, exc)
            return
        raise BackendUnavailableError(f"cannot use localdisk root {ns_dir!r}: {exc}") from exc


@dataclass(slots=True)
class SweepResult:
    """Pages of our size, and what the sweep did."""

    pages: list[ScannedPage]
    dead_temps_removed: int = 0
    damaged_removed: int = 0
    other_size_pages: int = 0


def sweep(
    layout: Layout,
    pages: list[ScannedPage],
    dead_temps: list[str],
    page_bytes: int,
    writable: bool,
) -> SweepResult:
    """Remove dead owners' temporaries and damaged files; return the pages of our size."""
    result = SweepResult(pages=[])
    if writable:
        result.dead_temps_removed = sum(remove(path) for path in dead_temps)
    stored = stored_size(page_bytes)
    result.pages = [p for p in pages if p.size == stored]
    if len(result.pages) == len(pages):
        return result
    damaged = 0
    for p in pages:
        if p.size == stored:
            continue
        if _is_damaged(layout, p):
            damaged += 1
            if writable and remove(layout.page_path(p.key)):
                result.damaged_removed += 1
        else:
            # A sound page of another page size (a tool opened us with another size): not
            # ours to serve, and certainly not ours to delete.
            result.other_size_pages += 1
    log.warning(
        "localdisk %s: %d damaged page file(s) %s, %d page(s) of another page size ignored",
        layout.ns_dir,
        damaged,
        "removed" if writable else "skipped",
        result.other_size_pages,
    )
    return result


def _is_damaged(layout: Layout, page: ScannedPage) -> bool:
    """True for a file that can never be a valid page (torn, truncated, foreign header)."""
    if page.size < HEADER_SIZE:
        return True
    try:
        fd = open_regular(layout.page_path(page.key))
        if fd is None:
            return False  # replaced by a FIFO, a symlink...: not a page, and not ours to remove
        try:
            header = decode_header(os.pread(fd, HEADER_SIZE, 0))
        finally:
            os.close(fd)
    except PageCorruptError:
        return True
    except PageVersionError:
        return False  # a newer writer's page: not ours to read, nor to delete
    except OSError:
        return False  # unreadable now; a later read decides
    if header.namespace != layout.namespace or header.key != page.key:
        return True
    return stored_size(header.payload_len) != page.size


def default_max_bytes(layout: Layout, used: int) -> int:
    """Half of the filesystem's free space plus what the namespace already holds."""
    try:
        st = os.statvfs(layout.root)
    except OSError as exc:
        raise BackendUnavailableError(f"cannot size localdisk root {layout.root!r}: {exc}") from exc
    return int((st.f_bavail * st.f_frsize + used) * DEFAULT_FREE_FRACTION)


def resolve_max_bytes(
    layout: Layout, configured: int | None, used: int, stored: int, writable: bool, shared: bool
) -> int:
    """The capacity bound: ``configured``, else :func:`default_max_bytes`; raises
    :class:`~hicache.errors.BackendCapacityError` when a writable instance cannot hold a page of
    ``stored`` bytes."""
    if configured is not None:
        max_bytes = configured
    else:
        # A read-only instance never writes nor evicts: its bound only admits what is there.
        max_bytes = default_max_bytes(layout, used) if writable else max(used, 1)
        if shared and writable:
            log.warning(
                "localdisk %s: shared without max_bytes: this process bounds usage at %d "
                "bytes (from free space now); set max_bytes so all processes agree",
                layout.ns_dir,
                max_bytes,
            )
    if writable and max_bytes < stored:
        raise BackendCapacityError(
            f"max_bytes={max_bytes} cannot hold one page of {stored} bytes (root {layout.root!r})"
        )
    return max_bytes


def probe_direct(layout: Layout, page_bytes: int, writable: bool) -> bool:
    """True when ``O_DIRECT`` works for this namespace's files; logs why not otherwise."""
    if O_DIRECT == 0 or page_bytes % DIRECT_ALIGN:
        log.warning(
            "localdisk: direct_io needs O_DIRECT and page_bytes a multiple of %d "
            "(page_bytes=%d): using buffered I/O",
            DIRECT_ALIGN,
            page_bytes,
        )
        return False
    probe = os.path.join(layout.ns_dir, f".hicache-direct-probe-{os.getpid()}")
    try:
        if writable:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_DIRECT, 0o600)
            os.close(fd)
            os.unlink(probe)
        else:
            fd = os.open(layout.ns_dir, os.O_RDONLY | O_DIRECT)
            os.close(fd)
    except OSError as exc:
        # tmpfs (before Linux 6.6) and some network filesystems refuse O_DIRECT with EINVAL.
        log.warning(
            "localdisk: %s does not support O_DIRECT (%s): using buffered I/O", layout.ns_dir, exc
        )
        remove(probe)
        return False
    return True


@dataclass(slots=True)
class PackScan:
    """What :func:`scan_packs` found."""

    records: list[ScannedRecord]
    #: torn or damaged records (punched when the scan may write)
    damaged: int = 0
    #: packs of another page size or namespace, or of a newer writer: left alone
    foreign: int = 0
    #: packs without a live record (removed when the scan may write)
    empty: list[str] = field(default_factory=list)


def scan_packs(
    packs: Sequence[ScannedPack],
    namespace: str,
    page_bytes: int,
    step_ns: int,
    writable: bool,
) -> PackScan:
    """Read every record header of ``packs``: sound records are listed; punched ones (zeros)
    skipped; torn ones skipped (and punched when ``writable``). Packs with no sound record are
    returned in ``empty``."""
    stored = stored_size(page_bytes)
    result = PackScan(records=[])
    for pack in packs:
        try:
            fd = open_regular(pack.path)
        except OSError as exc:
            log.warning("cannot read pack %s: %s", pack.path, exc)
            continue
        if fd is None:
            continue
        found = 0
        torn: list[int] = []
        try:
            for off in range(0, pack.size - stored + 1, stored):
                header = os.pread(fd, HEADER_SIZE, off)
                if header[: len(ZERO_MAGIC)] == ZERO_MAGIC:
                    continue  # punched: an evicted page
                try:
                    decoded = decode_header(header)
                except PageCorruptError:
                    torn.append(off)
                    continue
                except PageVersionError:
                    found = -1  # a newer writer's: not ours to read nor to remove
                    break
                if decoded.namespace != namespace or decoded.payload_len != page_bytes:
                    found = -1  # another page size (or a copied tree): left alone
                    break
                found += 1
                mtime = pack.mtime_ns - (off // stored) * step_ns
                result.records.append(
                    ScannedRecord(decoded.key, pack.path, off, mtime, pack.mtime_ns)
                )
        except OSError as exc:
            log.warning("cannot read pack %s: %s", pack.path, exc)
        finally:
            os.close(fd)
        if writable and found >= 0 and torn:
            punch_records(pack.path, torn, stored, pack.mtime_ns)
        result.damaged += len(torn)
        if found < 0:
            result.foreign += 1
        elif found == 0:
            result.empty.append(pack.path)
    return result


def load_packs(
    layout: Layout,
    opts: LocalDiskConfig,
    found: list[ScannedPack],
    pages: list[ScannedPage],
    page_bytes: int,
    step_ns: int,
    writable: bool,
) -> tuple[PackFiles, list[ScannedPage], int]:
    """The pack files of a single-process instance, holding the records of the packs found;
    also their pages, and how many damaged records the scan punched.

    A key found twice (a crash between a pack's publish and the punch of a record it
    duplicated) keeps its page file, else its newest record; the others are punched."""
    packs = PackFiles(
        layout,
        page_bytes,
        file_mode=opts.file_mode,
        fsync=opts.durability is Durability.FSYNC,
        verify=opts.verify_checksums,
        # not with fsync: a power loss could keep the overwrite and lose the rename
        reuse=opts.durability is Durability.NONE,
    )
    if not found:
        return packs, [], 0
    scanned = scan_packs(found, layout.namespace, page_bytes, step_ns, writable)
    plain = {p.key for p in pages}
    best: dict[str, ScannedRecord] = {}
    extra: list[ScannedRecord] = []
    for rec in scanned.records:
        other = best.get(rec.key)
        if rec.key in plain:
            extra.append(rec)
        elif other is None:
            best[rec.key] = rec
        elif rec.mtime_ns > other.mtime_ns:
            extra.append(other)
            best[rec.key] = rec
        else:
            extra.append(rec)
    packs.load(list(best.values()), extra if writable else [])
    if writable:
        for path in scanned.empty:
            remove(path)
    stored = stored_size(page_bytes)
    pages = [ScannedPage(rec.key, stored, rec.mtime_ns) for rec in best.values()]
    return packs, pages, scanned.damaged if writable else 0


def drop_packs(layout: Layout, found: list[ScannedPack]) -> None:
    """Shared mode: packs a single-process run left are removed, their pages dropped
    (other processes find pages by their file names, so packed ones cannot be shared)."""
    removed = sum(remove(pack.path) for pack in found)
    log.warning(
        "localdisk %s: shared mode: %d pack file(s) of a single-process run removed "
        "(their pages are dropped from the cache)",
        layout.ns_dir,
        removed,
    )
