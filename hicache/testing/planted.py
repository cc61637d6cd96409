"""Things that are not page files, planted under a page's name, for file-backed backend tests.

- ``NOT_REGULAR_KINDS``        fifo, socket, directory, symlink, device
- ``plant(kind, path, target)`` create one of them at ``path`` (``target``: where the symlink
                                points); raises ``PlantRefused`` where the system forbids it
- ``release(path)``            unblock any reader stuck on a planted FIFO (test clean-up)
- ``run_bounded(fn, timeout)`` run ``fn`` on a daemon thread: ``(finished, result)``, so a hang
                                fails the test instead of freezing the run
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import tempfile
from collections.abc import Callable
from typing import Any

from hicache.testing import wait

__all__ = ["NOT_REGULAR_KINDS", "PlantRefused", "plant", "release", "run_bounded"]

NOT_REGULAR_KINDS = ("fifo", "socket", "directory", "symlink", "device")


class PlantRefused(Exception):
    """The system does not let this process create that kind of file (no root, no mknod)."""


def plant(kind: str, path: str, target: str | None = None) -> None:
    """Create a ``kind`` (one of :data:`NOT_REGULAR_KINDS`) at ``path``, which must not exist."""
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "directory":
        os.mkdir(path, 0o700)
    elif kind == "symlink":
        if target is None:
            raise ValueError("a symlink needs a target")
        os.symlink(target, path)
    elif kind == "socket":
        # A unix socket path is limited to ~108 bytes: bind in a short directory, then move it.
        short = tempfile.mkdtemp(prefix="hc-")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.path.join(short, "s"))
            try:
                os.rename(os.path.join(short, "s"), path)
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    raise PlantRefused(f"cannot move a socket across filesystems: {exc}") from exc
                raise
        finally:
            sock.close()  # the socket file stays; nobody listens (connects get ECONNREFUSED)
            with contextlib.suppress(OSError):
                os.rmdir(short)
    elif kind == "device":
        try:
            # The numbers of /dev/null: harmless to open, and a read of it ends at once.
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
        except PermissionError as exc:
            raise PlantRefused(f"mknod is not permitted here: {exc}") from exc
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {NOT_REGULAR_KINDS}")


def release(path: str) -> None:
    """Open a planted FIFO for writing and close it, so a reader blocked on it sees EOF."""
    with contextlib.suppress(OSError):
        if stat.S_ISFIFO(os.lstat(path).st_mode):
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO when nobody reads
            os.close(fd)


def run_bounded(fn: Callable[[], Any], timeout: float = 30.0) -> tuple[bool, Any]:
    """Run ``fn()`` on a daemon thread and wait up to ``timeout`` seconds for it.

    Returns ``(finished, result)``; an exception raised by ``fn`` is re-raised here.
    """
    finished, outcome = wait.run_bounded(fn, timeout)
    if finished and isinstance(outcome, BaseException):
        raise outcome
    return finished, outcome
