"""Where pages and temporaries live on disk, who owns a temporary, and the directory scan.

Layout: ``root/<namespace>/<key[:2]>/<key>`` (one page), or the pages of one put in a pack
``root/<namespace>/<key[:2]>/<first key>.<stamp>.pack`` (see :mod:`hicache_localdisk.packs`).
Keys are 64 lowercase hex characters (checked by the contract before any path is built), so no
key can name anything outside its directory.

A temporary is ``<dir>/.tmp-<key>-<boot>-<pid>-<start>-<seq>``: the boot id, pid and process
start time name its owner, so a later ``open()`` removes exactly the temporaries whose owner is
dead (another boot, or no process with that pid and start time) and never one a live writer in
another process is still filling.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import count
from stat import S_ISREG

__all__ = [
    "FANOUT_DIRS",
    "PACK_SUFFIX",
    "TEMP_PREFIX",
    "Layout",
    "OwnerId",
    "ScanResult",
    "ScannedPack",
    "ScannedPage",
    "ScannedRecord",
    "current_owner",
    "owner_alive",
]

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
PACK_SUFFIX = ".pack"
#: Every two-hex-char fan-out directory; created at ``open()`` so puts never ``mkdir``.
FANOUT_DIRS = tuple(f"{i:02x}" for i in range(256))
_KEY_RE = re.compile(r"[0-9a-f]{64}\Z")
_HEX = b"0123456789abcdef"
#: Threads of a directory scan: enough to keep a device busy with inode reads.
_SCAN_THREADS = 8
_PACK_RE = re.compile(r"[0-9a-f]{64}\.[0-9a-f-]{1,64}\.pack\Z")
_TEMP_RE = re.compile(
    r"\.tmp-(?P<key>[0-9a-f]{64})-(?P<boot>[0-9a-f]{1,32})-(?P<pid>[0-9]+)-(?P<start>[0-9]+)-[0-9]+\Z"
)


@dataclass(frozen=True, slots=True)
class OwnerId:
    """Identity of a process that survives pid reuse: boot id, pid, start time (clock ticks)."""

    boot: str
    pid: int
    start: int


def _read_boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip().replace("-", "")[:32]
    except OSError:
        # Without /proc a boot cannot be told apart; pid liveness alone still works.
        return "0"


def _start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, ``None`` if no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return _start_time_without_proc(pid)
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])


def _start_time_without_proc(pid: int) -> int | None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return 0


_BOOT_ID = _read_boot_id()
_owner_lock = threading.Lock()
_owner: OwnerId | None = None


def current_owner() -> OwnerId:
    """This process's identity (recomputed after a fork, whose child has a new pid)."""
    global _owner
    pid = os.getpid()
    owner = _owner
    if owner is None or owner.pid != pid:
        with _owner_lock:
            start = _start_time(pid)
            owner = _owner = OwnerId(_BOOT_ID, pid, start if start is not None else 0)
    return owner


def owner_alive(owner: OwnerId) -> bool:
    """True while the process that ``owner`` names may still be writing its temporaries."""
    if owner.boot != _BOOT_ID:
        return False
    start = _start_time(owner.pid)
    if start is None:
        return False
    return start == owner.start or start == 0


@dataclass(frozen=True, slots=True)
class ScannedPage:
    """A published page found by :meth:`Layout.scan`."""

    key: str
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class ScannedPack:
    """A published pack file found by :meth:`Layout.scan` (its records are read apart)."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class ScannedRecord:
    """A sound record found in a pack by :func:`hicache_localdisk.startup.scan_packs`."""

    key: str
    path: str
    offset: int
    #: the pack's mtime less one step per record before it (a batch is recorded tail first)
    mtime_ns: int
    pack_mtime_ns: int


@dataclass(slots=True)
class ScanResult:
    """What :meth:`Layout.scan` found under a namespace directory."""

    pages: list[ScannedPage]
    packs: list[ScannedPack]
    #: Temporaries of dead owners (safe to remove) and of live ones (leave alone).
    dead_temps: list[str]
    live_temps: int
    #: Entries that are neither pages nor temporaries (left alone, reported).
    strays: list[str]


class Layout:
    """Paths of one namespace under ``root``."""

    def __init__(self, root: str, namespace: str) -> None:
        self.root = root
        self.namespace = namespace
        self.ns_dir = os.path.join(root, namespace)
        self._seq = count()

    def dir_of(self, key: str) -> str:
        """Fan-out directory of ``key``."""
        return f"{self.ns_dir}/{key[:2]}"

    def page_path(self, key: str) -> str:
        """Path of the published page of ``key``."""
        return f"{self.ns_dir}/{key[:2]}/{key}"

    def temp_path(self, key: str) -> str:
        """A fresh temporary path for ``key`` in its final directory (same filesystem)."""
        o = current_owner()
        owner = f"{o.boot}-{o.pid}-{o.start}-{next(self._seq)}"
        return f"{self.ns_dir}/{key[:2]}/{TEMP_PREFIX}{key}-{owner}"

    def pack_path(self, first_key: str, stamp: str) -> str:
        """Path of a pack whose first record is ``first_key``; ``stamp`` makes it unique."""
        return f"{self.ns_dir}/{first_key[:2]}/{first_key}.{stamp}{PACK_SUFFIX}"

    def scan(self) -> ScanResult:
        """List pages (size, mtime) and temporaries: one ``scandir`` per directory and one
        ``stat`` per file, spread over threads (``stat`` releases the GIL; on a cold cache each
        one waits for an inode read)."""
        result = ScanResult(pages=[], packs=[], dead_temps=[], live_temps=0, strays=[])
        try:
            with os.scandir(self.ns_dir) as top:
                subs = []
                for sub in top:
                    if sub.is_dir(follow_symlinks=False) and sub.name in _FANOUT_SET:
                        subs.append(sub.name)
                    elif not sub.name.startswith(".hicache-"):
                        result.strays.append(sub.path)
        except FileNotFoundError:
            return result
        with ThreadPoolExecutor(_SCAN_THREADS, thread_name_prefix="hicache-scan") as pool:
            parts = list(pool.map(self._scan_dir, subs))
        alive: dict[OwnerId, bool] = {}
        for pages, packs, temps, strays in parts:
            result.pages += pages
            result.packs += packs
            result.strays += strays
            for path in temps:
                m = _TEMP_RE.match(os.path.basename(path))
                if m is None:
                    result.strays.append(path)
                    continue
                owner = OwnerId(m["boot"], int(m["pid"]), int(m["start"]))
                live = alive.get(owner)
                if live is None:
                    live = alive[owner] = owner_alive(owner)
                if live:
                    result.live_temps += 1
                else:
                    result.dead_temps.append(path)
        return result

    def _scan_dir(
        self, sub: str
    ) -> tuple[list[ScannedPage], list[ScannedPack], list[str], list[str]]:
        path = f"{self.ns_dir}/{sub}"
        pages: list[ScannedPage] = []
        packs: list[ScannedPack] = []
        temps: list[str] = []
        strays: list[str] = []
        try:
            entries = os.scandir(path)
        except FileNotFoundError:
            return pages, packs, temps, strays
        with entries:
            for entry in entries:
                name = entry.name
                if len(name) == 64 and name.startswith(sub):
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:  # removed by another process since the listing
                        continue
                    if S_ISREG(st.st_mode):
                        pages.append(ScannedPage(name, st.st_size, st.st_mtime_ns))
                    else:
                        strays.append(entry.path)
                elif name.startswith(TEMP_PREFIX):
                    temps.append(entry.path)
                elif name.endswith(PACK_SUFFIX) and _PACK_RE.match(name):
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:  # its last page went since the listing
                        continue
                    if S_ISREG(st.st_mode):
                        packs.append(ScannedPack(entry.path, st.st_size, st.st_mtime_ns))
                    else:
                        strays.append(entry.path)
                else:
                    strays.append(entry.path)
        # Names are checked as a batch (hex digits only); the rare bad one is found one by one.
        if "".join(p.key for p in pages).encode("ascii", "replace").translate(None, _HEX):
            strays += [f"{path}/{p.key}" for p in pages if not _KEY_RE.match(p.key)]
            pages = [p for p in pages if _KEY_RE.match(p.key)]
        return pages, packs, temps, strays

    def namespaces(self) -> list[str]:
        """Namespace directories present under ``root``."""
        try:
            with os.scandir(self.root) as entries:
                return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []


_FANOUT_SET = frozenset(FANOUT_DIRS)
