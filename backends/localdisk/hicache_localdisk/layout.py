"""Where pages and temporaries live on disk, who owns a temporary, and the directory scan.

Layout: ``root/<namespace>/<key[:2]>/<key>``. Keys are 64 lowercase hex characters (checked by
the contract before any path is built), so no key can name anything outside its directory.

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
from dataclasses import dataclass
from itertools import count

__all__ = [
    "FANOUT_DIRS",
    "TEMP_PREFIX",
    "Layout",
    "OwnerId",
    "ScanResult",
    "ScannedPage",
    "current_owner",
    "owner_alive",
]

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
#: Every two-hex-char fan-out directory; created at ``open()`` so puts never ``mkdir``.
FANOUT_DIRS = tuple(f"{i:02x}" for i in range(256))
_KEY_RE = re.compile(r"[0-9a-f]{64}\Z")
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


@dataclass(slots=True)
class ScanResult:
    """What :meth:`Layout.scan` found under a namespace directory."""

    pages: list[ScannedPage]
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

    def scan(self) -> ScanResult:
        """List pages (size, mtime) and temporaries with one ``scandir`` per directory."""
        result = ScanResult(pages=[], dead_temps=[], live_temps=0, strays=[])
        try:
            top = list(os.scandir(self.ns_dir))
        except FileNotFoundError:
            return result
        alive: dict[OwnerId, bool] = {}
        for sub in top:
            if not sub.is_dir(follow_symlinks=False) or sub.name not in _FANOUT_SET:
                if not sub.name.startswith(".hicache-"):
                    result.strays.append(sub.path)
                continue
            with os.scandir(sub.path) as entries:
                for entry in entries:
                    self._scan_entry(sub.name, entry, result, alive)
        return result

    @staticmethod
    def _scan_entry(
        prefix: str, entry: os.DirEntry[str], result: ScanResult, alive: dict[OwnerId, bool]
    ) -> None:
        name = entry.name
        if name.startswith(TEMP_PREFIX):
            m = _TEMP_RE.match(name)
            if m is None:
                result.strays.append(entry.path)
                return
            owner = OwnerId(m["boot"], int(m["pid"]), int(m["start"]))
            live = alive.get(owner)
            if live is None:
                live = alive[owner] = owner_alive(owner)
            if live:
                result.live_temps += 1
            else:
                result.dead_temps.append(entry.path)
            return
        if not (name.startswith(prefix) and _KEY_RE.match(name)) or not entry.is_file(
            follow_symlinks=False
        ):
            result.strays.append(entry.path)
            return
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # removed by another process since the listing
            return
        result.pages.append(ScannedPage(name, st.st_size, st.st_mtime_ns))

    def namespaces(self) -> list[str]:
        """Namespace directories present under ``root``."""
        try:
            with os.scandir(self.root) as entries:
                return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []


_FANOUT_SET = frozenset(FANOUT_DIRS)
