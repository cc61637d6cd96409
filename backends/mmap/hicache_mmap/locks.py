"""Writer locks on the sets of a slot file: a thread lock plus an open-file-description lock.

Open-file-description (OFD) locks (``F_OFD_SETLK``) belong to the open file, not to the process:
unlike classic ``fcntl``/``lockf`` record locks, they are not dropped when some other descriptor
of the same file is closed in the process, and they vanish when the holder dies (the kernel
closes its files), so a writer killed with SIGKILL never leaves a set locked. Threads of one
process share the open file and therefore the OFD lock, hence the thread lock in front of it.

The locked byte ranges lie far past the end of any slot file (``LOCK_BASE``): they are names,
not data, and they cannot collide with anything that reads or maps the file.
"""

from __future__ import annotations

import errno
import fcntl
import struct
import threading
import time
from typing import Final

from hicache.errors import BackendError

__all__ = ["LockTimeoutError", "SetLocks"]

# Linux values; older Pythons do not export them.
F_OFD_SETLK: Final[int] = getattr(fcntl, "F_OFD_SETLK", 37)
F_OFD_SETLKW: Final[int] = getattr(fcntl, "F_OFD_SETLKW", 38)
#: struct flock on Linux x86_64/aarch64: l_type, l_whence, (pad), l_start, l_len, l_pid, (pad).
_FLOCK = struct.Struct("@hh4xqqi4x")
#: Offset of the init lock; set ``s`` locks the byte ``LOCK_BASE + 1 + s``.
LOCK_BASE: Final[int] = 1 << 50
_STRIPES: Final[int] = 256
#: Offset of the shared "users" lock (see ``hold_users``).
_USERS: Final[int] = LOCK_BASE - 1


class LockTimeoutError(BackendError, TimeoutError):
    """Another process held a set's lock longer than ``lock_timeout_s``."""


def _flock(kind: int, start: int) -> bytes:
    # l_pid must be 0 for OFD locks.
    return _FLOCK.pack(kind, 0, start, 1, 0)


class SetLocks:
    """Exclusive per-set writer locks shared by threads and processes."""

    def __init__(self, fd: int, timeout_s: float) -> None:
        self._fd = fd
        self._timeout_s = timeout_s
        # Striped: two sets may share a thread lock, which costs nothing but a rare wait.
        self._threads = [threading.Lock() for _ in range(_STRIPES)]

    def _ofd(self, kind: int, start: int, what: str) -> None:
        request = _flock(kind, start)
        try:
            fcntl.fcntl(self._fd, F_OFD_SETLK, request)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise BackendError(f"cannot lock {what} of the slot file: {exc}") from exc
        # Contended: poll with a growing sleep rather than F_OFD_SETLKW, which cannot time out.
        deadline = time.monotonic() + self._timeout_s
        delay = 50e-6
        while True:
            time.sleep(delay)
            try:
                fcntl.fcntl(self._fd, F_OFD_SETLK, request)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise BackendError(f"cannot lock {what} of the slot file: {exc}") from exc
            if time.monotonic() > deadline:
                raise LockTimeoutError(
                    f"{what} of the slot file stayed locked by another process for "
                    f"{self._timeout_s}s (lock_timeout_s)"
                )
            delay = min(delay * 2, 5e-3)

    def thread_lock(self, set_index: int) -> threading.Lock:
        """The in-process lock of set ``set_index`` alone (for refreshing a local view)."""
        return self._threads[set_index % _STRIPES]

    def acquire(self, set_index: int) -> None:
        """Lock set ``set_index`` for writing; ``LockTimeoutError`` past the timeout."""
        lock = self._threads[set_index % _STRIPES]
        if not lock.acquire(timeout=self._timeout_s):
            raise LockTimeoutError(f"set {set_index} stayed locked by another thread")
        try:
            self._ofd(fcntl.F_WRLCK, LOCK_BASE + 1 + set_index, f"set {set_index}")
        except BaseException:
            lock.release()
            raise

    def release(self, set_index: int) -> None:
        """Unlock set ``set_index`` (held by this thread)."""
        try:
            fcntl.fcntl(self._fd, F_OFD_SETLK, _flock(fcntl.F_UNLCK, LOCK_BASE + 1 + set_index))
        finally:
            self._threads[set_index % _STRIPES].release()

    def lock_init(self, exclusive: bool) -> None:
        """Take the init lock (exclusive to create or rebuild the file, shared to only read its
        geometry), waiting up to the timeout."""
        self._ofd(fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK, LOCK_BASE, "the init range")

    def unlock_init(self) -> None:
        """Release the init lock."""
        fcntl.fcntl(self._fd, F_OFD_SETLK, _flock(fcntl.F_UNLCK, LOCK_BASE))

    def hold_users(self) -> None:
        """Take the shared "users" lock, held by every open instance until its file closes."""
        self._ofd(fcntl.F_RDLCK, _USERS, "the users range")

    def users_idle(self) -> bool:
        """True when no other open file holds the users lock. Call with ``hold_users`` done:
        this file's shared lock is converted to exclusive to test, then back to shared."""
        try:
            fcntl.fcntl(self._fd, F_OFD_SETLK, _flock(fcntl.F_WRLCK, _USERS))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        fcntl.fcntl(self._fd, F_OFD_SETLK, _flock(fcntl.F_RDLCK, _USERS))
        return True
