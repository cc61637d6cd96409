"""Files on a local filesystem, for backends that keep pages or state in them.

- ``FileMode`` / ``DirMode``  option types for permission bits: octal strings (``"0640"``) or
                              ints, checked so the owner keeps access; defaults owner-only
- ``make_dirs(path, mode)``   create a directory and its missing parents with exactly ``mode``
- ``create_file(path, flags, mode)``  ``os.open`` with ``O_CREAT`` that ends with exactly ``mode``
- ``open_regular(path)``      open an existing file for reading only if it is a regular file;
                              never blocks (FIFO), never follows a final symlink

Files a backend creates are owner-only (0600, directories 0700) unless a deployment widens
them on purpose (a tier shared between users of one group). ``open(2)`` and ``mkdir(2)`` apply
the process umask, which can only narrow: a configured wider mode is set explicitly, so the
result is the configured mode whatever the umask.
"""

from __future__ import annotations

import os
import stat
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, PlainSerializer, WithJsonSchema

__all__ = [
    "DEFAULT_DIR_MODE",
    "DEFAULT_FILE_MODE",
    "DirMode",
    "FileMode",
    "create_file",
    "make_dirs",
    "open_regular",
]

DEFAULT_FILE_MODE = 0o600
DEFAULT_DIR_MODE = 0o700
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


def _parse_mode(value: Any) -> Any:
    # YAML 1.1 reads an unquoted 0640 as octal already; a quoted "0640" (or an environment
    # variable) arrives as a string, which is octal too: "640" never means decimal 640.
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("0o")
        try:
            return int(text, 8)
        except ValueError:
            raise ValueError(
                f"invalid permission mode {value!r}: expected octal digits, e.g. '0640'"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"invalid permission mode {value!r}: expected an octal string like '0640'")
    return value


def _checker(owner_bits: int, what: str) -> Any:
    def check(mode: int) -> int:
        if not 0 <= mode <= 0o777:
            raise ValueError(f"invalid {what} mode {mode:#o}: permission bits are 0000-0777")
        if mode & owner_bits != owner_bits:
            raise ValueError(
                f"invalid {what} mode {mode:04o}: the owner needs {owner_bits:04o} "
                "(the backend itself reads and writes them)"
            )
        return mode

    return check


def _mode_type(owner_bits: int, what: str) -> Any:
    return Annotated[
        int,
        BeforeValidator(_parse_mode),
        AfterValidator(_checker(owner_bits, what)),
        PlainSerializer(lambda mode: f"{mode:04o}", return_type=str, when_used="json"),
        WithJsonSchema({"type": "string", "pattern": "^0?[0-7]{3}$", "examples": ["0600"]}),
    ]


#: Permission bits of files a backend creates: ``"0600"`` (owner-only) by default.
FileMode = _mode_type(0o600, "file")
#: Permission bits of directories a backend creates: ``"0700"`` (owner-only) by default.
DirMode = _mode_type(0o700, "directory")


def make_dirs(path: str, mode: int = DEFAULT_DIR_MODE) -> None:
    """Create ``path`` and its missing parents, each with exactly ``mode``; existing ones are
    left as they are (they are not ours to change)."""
    missing: list[str] = []
    head = os.path.abspath(path)
    while not os.path.isdir(head):
        missing.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue  # created by a concurrent opener
        if mode & 0o077:  # mkdir applied the umask: give the configured mode back
            os.chmod(directory, mode)


def create_file(path: str, flags: int, mode: int = DEFAULT_FILE_MODE) -> int:
    """``os.open(path, flags | O_CREAT, mode)``, with ``mode`` set exactly if this call created
    the file (``O_EXCL`` in ``flags`` makes that every successful call)."""
    created = False
    if not flags & os.O_EXCL:
        try:
            fd = os.open(path, flags & ~os.O_CREAT)
        except FileNotFoundError:
            pass
        else:
            return fd
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode)
        created = True
    except FileExistsError:
        if flags & os.O_EXCL:
            raise
        fd = os.open(path, flags & ~os.O_CREAT)  # another opener created it meanwhile
    if created and mode & 0o077:
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            raise
    return fd


def open_regular(path: str, flags: int = 0) -> int | None:
    """Open ``path`` read-only; ``None`` when it is anything but a regular file.

    ``O_NOFOLLOW`` refuses a symlink in place of the file (it could lead out of the backend's
    root) and ``O_NONBLOCK`` keeps a FIFO from blocking the open; the ``fstat`` of the opened
    descriptor then rejects FIFOs, sockets, devices and directories before a byte is read (a
    read from a FIFO would wait forever for a writer). ``FileNotFoundError`` and other errors
    propagate. ``flags`` adds to ``O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK``.
    """
    try:
        fd = os.open(path, _READ_FLAGS | flags)
    except FileNotFoundError:
        raise
    except OSError:
        # ELOOP (a symlink), ENXIO (a unix socket), EPERM (a device the cgroup denies), EINVAL
        # (O_DIRECT on a FIFO)...: what is there decides whether this is a miss or a failure.
        if _is_other_type(path):
            return None
        raise
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    if not regular:
        os.close(fd)
        return None
    return fd


def _is_other_type(path: str) -> bool:
    try:
        return not stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
