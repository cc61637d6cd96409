"""Crash safety on ``file://``: a forked writer is SIGKILLed at random moments; a fresh instance
must see every page whole or not at all, and no temporary as a page (process-crash guarantees
only: the page cache survives a SIGKILL, nothing here claims power-loss safety).

Random kill times alone rarely land inside a write (the write of one page is a small share of a
writer's time, and a key space that fills up turns puts into existence checks), so:

- after each check the parent deletes a random half of the pages and the temporaries the kill
  left, so the writer keeps writing new pages and each iteration counts only its own leftovers;
- every third iteration is *armed*: the child stops inside one of its page writes, after the
  header reached the temporary and before the payload, and tells the parent through the pipe;
  the kill then lands mid-write for certain, with a partial temporary on disk.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import signal
import time
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import pytest
from hicache_fsspec import FsspecBackend, FsspecConfig

from hicache.storage import HEADER_SIZE, BackendContext, PageStatus

PAGE = 64 * 1024
KEYSPACE = 200
ITERATIONS = int(os.environ.get("HICACHE_CRASH_ITERATIONS", "25"))
#: One iteration in this many kills a writer known to be inside a page write.
ARMED_EVERY = 3
READY, MID_WRITE = b"r", b"w"

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _key(i: int) -> str:
    return hashlib.sha256(f"fsspec-crash:{i}".encode()).hexdigest()


def _payload(key: str) -> bytes:
    return (bytes.fromhex(key) * (PAGE // 32 + 1))[:PAGE]


def _backend(root: Path, write_mode: str) -> FsspecBackend:
    config = FsspecConfig(url=root.as_uri(), io_threads=4, write_mode=write_mode)
    return FsspecBackend(config, BackendContext(page_bytes=PAGE, namespace="crash"))


class _StopAfterHeader:
    """A write handle that, on its first write (the header), flushes it to the file, reports
    ``MID_WRITE`` to the parent and waits to be killed: the payload is never written."""

    def __init__(self, handle: Any, report_fd: int) -> None:
        self._handle = handle
        self._report_fd = report_fd

    def __enter__(self) -> _StopAfterHeader:
        self._handle.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._handle.__exit__(exc_type, exc, tb)

    def write(self, data: Any) -> NoReturn:
        self._handle.write(data)
        self._handle.flush()
        os.write(self._report_fd, MID_WRITE)
        while True:  # the parent's SIGKILL ends this
            time.sleep(60)


def _arm(backend: FsspecBackend, after_writes: int, report_fd: int) -> None:
    """Make the ``after_writes``-th page write of ``backend`` stop mid-write (see above)."""
    real_open = backend._open_for_write
    opened = itertools.count()  # next() on it is atomic: the I/O threads share it

    def open_(fs: Any, path: str) -> Any:
        handle = real_open(fs, path)
        if next(opened) == after_writes:
            return _StopAfterHeader(handle, report_fd)
        return handle

    backend._open_for_write = open_  # type: ignore[method-assign]  # this instance only


def _writer(root: Path, write_mode: str, seed: int, armed: bool, report_fd: int) -> None:
    """Child body: put, delete and read pages until killed."""
    rng = random.Random(seed)
    backend = _backend(root, write_mode)
    backend.open()
    if armed:
        _arm(backend, rng.randrange(24), report_fd)
    buf = memoryview(bytearray(PAGE))
    ready = False
    while True:
        start = rng.randrange(KEYSPACE - 8)
        keys = [_key(i) for i in range(start, start + rng.randint(1, 8))]
        backend.put(keys, [memoryview(_payload(k)) for k in keys])
        if not ready:  # the parent's random delay starts once the writer is really writing
            os.write(report_fd, READY)
            ready = True
        if rng.random() < 0.2:
            backend.delete([keys[-1]])
        if rng.random() < 0.3:
            backend.get_into([keys[0]], [buf])


def _wait_for(read_fd: int, what: bytes) -> None:
    while True:
        got = os.read(read_fd, 1)
        assert got, f"the writer exited before reporting {what!r}"
        if got == what:
            return


@pytest.mark.parametrize("write_mode", ["link", "rename"])
def test_sigkill_mid_write_never_leaves_a_partial_page(tmp_path: Path, write_mode: str) -> None:
    root = tmp_path / "root"
    rng = random.Random(99)
    keys = [_key(i) for i in range(KEYSPACE)]
    armed_kills = 0
    kills_with_temporaries = 0
    for it in range(1, ITERATIONS + 1):
        armed = it % ARMED_EVERY == 1  # the first iteration is armed: any run proves something
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                os.close(read_fd)
                _writer(root, write_mode, it, armed, write_fd)
            finally:
                os._exit(0)
        os.close(write_fd)
        try:
            if armed:
                _wait_for(read_fd, MID_WRITE)
            else:
                _wait_for(read_fd, READY)
                time.sleep(rng.uniform(0.0, 0.1))
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_fd)
        temporaries = list(root.rglob(".tmp-*"))
        kills_with_temporaries += bool(temporaries)
        if armed:
            armed_kills += 1
            # The kill landed mid-write: a temporary holding the header and no payload.
            sizes = [p.stat().st_size for p in temporaries]
            assert HEADER_SIZE in sizes, f"iteration {it}: no partial temporary, sizes {sizes}"

        backend = _backend(root, write_mode)
        backend.open()
        try:
            present = [k for k, ok in zip(keys, backend.exists(keys), strict=True) if ok]
            bufs = [memoryview(bytearray(PAGE)) for _ in present]
            statuses = backend.get_into(present, bufs)
            for key, status, buf in zip(present, statuses, bufs, strict=True):
                assert status is PageStatus.OK, f"iteration {it}: {key} is present but {status}"
                # tobytes(): a memoryview compares byte by byte in a loop, 25x slower
                assert buf.tobytes() == _payload(key), f"iteration {it}: {key} read back altered"
            assert {p.key for p in backend.iter_pages()} == set(present)
            assert backend.stats().get("get_corrupt", 0) == 0
            # Make room for the next writer, and let the next count see only its own leftovers.
            backend.delete([k for k in present if rng.random() < 0.5])
        finally:
            backend.close()
        for path in temporaries:
            path.unlink()
    # The kills really landed mid-write (every armed one, and maybe some of the timed ones).
    assert armed_kills > 0
    assert kills_with_temporaries >= armed_kills
