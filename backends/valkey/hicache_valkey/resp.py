"""A small RESP2 connection for the data path: scatter-gather sends, replies read into caller views.

Why not redis-py's connection here: its parsers (hiredis or Python) turn every bulk reply into a
new ``bytes`` object, which the backend would then copy into the page buffer, and its command
packer joins a value into one buffer before sending. This connection sends a page's header and
payload as separate buffers (no join) and receives a bulk value straight into the destination
(``recv_into``: the kernel's copy is the only one), so a get costs one copy and a put none.

- ``Connection.connect()``        TCP (``TCP_NODELAY``) or TLS, then ``AUTH`` and ``SELECT``
- ``Packer``                      commands as a list of buffers: small parts joined, big ones kept
- ``Connection.send(parts)``      write the buffers in order
- ``Connection.read_reply()``     one reply as plain data (a server error comes back as a value)
- ``Connection.read_bulk_len()``  the length line of a bulk reply; ``read_into`` / ``skip`` its body
- ``Pool``                        at most ``max_connections`` connections handed out at once

Every socket call is bounded by the options' timeouts; any I/O or protocol failure closes the
connection (its pipeline state is unknown) and surfaces as ``OSError``/``ProtocolError``.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from hicache_valkey.options import ValkeyOptions

__all__ = [
    "Connection",
    "Packer",
    "Pool",
    "PoolExhaustedError",
    "ProtocolError",
    "Reply",
    "ServerError",
]

_CRLF = b"\r\n"
# Values at least this large are sent from the caller's buffer instead of being joined.
_SEPARATE_BYTES = 16 << 10
_READ_CHUNK = 64 << 10
# Buffers per sendmsg (Linux's UIO_MAXIOV is 1024).
_IOV_MAX = 1024


class ProtocolError(OSError):
    """The server sent something that is not RESP (or not what the command returns)."""


class PoolExhaustedError(TimeoutError):
    """No connection came free within the socket timeout."""


@dataclass(frozen=True, slots=True)
class ServerError:
    """An error reply (``-ERR ...``, ``-OOM ...``): a value, so a pipeline keeps its order."""

    message: str

    @property
    def code(self) -> str:
        return self.message.split(" ", 1)[0]


#: A decoded reply: nil, an integer, a bulk value, a status line, an error, or an array of them.
Reply: TypeAlias = int | bytes | str | ServerError | list["Reply"] | None

Buffer: TypeAlias = bytes | bytearray | memoryview
#: A command argument: text, an integer, a buffer, or a tuple of buffers sent as one value.
Arg: TypeAlias = Buffer | str | int | tuple[Buffer, ...]


class Packer:
    """Builds RESP commands into a list of buffers, joining small parts and keeping big ones."""

    def __init__(self) -> None:
        self.parts: list[Buffer] = []
        self._small = bytearray()
        self.value_bytes = 0

    def command(self, *args: Arg) -> None:
        """Append one command; an argument given as a tuple of buffers is sent as one value
        made of those buffers in order (a page header and its payload, never joined)."""
        small = self._small
        small += b"*%d\r\n" % len(args)
        for arg in args:
            pieces: tuple[Buffer, ...]
            if isinstance(arg, tuple):
                pieces = arg
            elif isinstance(arg, str):
                pieces = (arg.encode(),)
            elif isinstance(arg, int):
                pieces = (b"%d" % arg,)
            else:
                pieces = (arg,)
            sizes = [memoryview(piece).nbytes for piece in pieces]
            small += b"$%d\r\n" % sum(sizes)
            for piece, n in zip(pieces, sizes, strict=True):
                if n >= _SEPARATE_BYTES:
                    self.parts.append(bytes(small))
                    small.clear()
                    self.parts.append(piece)
                    self.value_bytes += n
                else:
                    small += piece
            small += _CRLF

    def take(self) -> list[Buffer]:
        """The buffers of every command packed so far; the packer starts over."""
        if self._small:
            self.parts.append(bytes(self._small))
            self._small.clear()
        parts, self.parts = self.parts, []
        self.value_bytes = 0
        return parts


class Connection:
    """One RESP2 connection (not thread-safe: the pool hands it to one thread at a time)."""

    def __init__(self, options: ValkeyOptions, *, name: str = "hicache") -> None:
        self.options = options
        self.name = name
        self._sock: socket.socket | None = None
        self._buf = bytearray(_READ_CHUNK)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    # ------------------------------------------------------------------ lifecycle

    def connect(self) -> None:
        opts = self.options
        sock = socket.create_connection((opts.host, opts.port), timeout=opts.connect_timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if opts.tls:
                sock = _tls_context(opts).wrap_socket(sock, server_hostname=opts.host)
            sock.settimeout(opts.socket_timeout_s)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._start = self._end = 0
        try:
            if opts.password is not None:
                auth: list[str] = ["AUTH"]
                if opts.username is not None:
                    auth.append(opts.username)
                auth.append(opts.password.get_secret_value())
                self._expect_ok(self.call(*auth), "AUTH")
            if opts.db:
                self._expect_ok(self.call("SELECT", opts.db), "SELECT")
            self._expect_ok(self.call("CLIENT", "SETNAME", self.name), "CLIENT SETNAME")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _expect_ok(reply: Reply, what: str) -> None:
        if isinstance(reply, ServerError):
            # the reply never echoes the password, but name only its code to stay certain
            raise ConnectionRefusedError(f"{what} refused by the server: {reply.code}")

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def interrupt(self) -> None:
        """Wake a thread blocked reading this connection (it then sees an error)."""
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # ------------------------------------------------------------------ sending

    def send(self, parts: Sequence[Buffer]) -> None:
        sock = self._live()
        if isinstance(sock, ssl.SSLSocket):  # TLS has no sendmsg: one record stream per part
            for part in parts:
                sock.sendall(part)
            return
        # One gathered sendmsg for the whole window instead of a send per part: a put of one
        # page was three system calls, and the server woke up for its first few bytes alone.
        views: list[memoryview] = []
        for part in parts:
            view = memoryview(part)
            if view.nbytes:
                views.append(view if view.format == "B" else view.cast("B"))
        while views:
            sent = sock.sendmsg(views[:_IOV_MAX])
            while sent and views:
                first = views[0]
                if sent >= first.nbytes:
                    sent -= first.nbytes
                    views.pop(0)
                else:
                    views[0] = first[sent:]
                    sent = 0

    def call(self, *args: Arg) -> Reply:
        """Send one command and return its reply (a ``ServerError`` value on an error reply)."""
        packer = Packer()
        packer.command(*args)
        self.send(packer.take())
        return self.read_reply()

    # ------------------------------------------------------------------ receiving

    def _live(self) -> socket.socket:
        if self._sock is None:
            raise ConnectionResetError("connection is closed")
        return self._sock

    def _fill(self) -> None:
        """Read more bytes into the buffer (compacting it first); EOF is an error."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            remaining = self._end - self._start
            self._buf[:remaining] = self._buf[self._start : self._end]
            self._start, self._end = 0, remaining
        if self._end == len(self._buf):  # a line longer than the buffer: grow it
            self._buf.extend(bytes(len(self._buf)))
            self._view = memoryview(self._buf)
        n = self._live().recv_into(self._view[self._end :])
        if n == 0:
            raise ConnectionResetError("server closed the connection")
        self._end += n

    def _readline(self) -> bytes:
        while True:
            at = self._buf.find(_CRLF, self._start, self._end)
            if at >= 0:
                line = bytes(self._buf[self._start : at])
                self._start = at + 2
                return line
            self._fill()

    def read_reply(self) -> Reply:
        line = self._readline()
        if not line:
            raise ProtocolError("empty reply line")
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode("utf-8", "replace")
        if kind == b"-":
            return ServerError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            out = bytearray(n)
            self.read_into(memoryview(out))
            self.read_crlf()
            return bytes(out)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read_reply() for _ in range(n)]
        raise ProtocolError(f"unexpected reply type {kind!r}")

    def read_head(self) -> bytes:
        """The first line of the next reply (``$123``, ``*3``, ``+OK``, ``-ERR ...``)."""
        line = self._readline()
        if not line:
            raise ProtocolError("empty reply line")
        return line

    def read_into(self, view: memoryview) -> None:
        """Fill ``view`` with the next ``view.nbytes`` bytes: buffered ones first, then straight
        from the socket into ``view``."""
        want = view.nbytes
        have = min(want, self._end - self._start)
        if have:
            view[:have] = self._view[self._start : self._start + have]
            self._start += have
        sock = self._live()
        while have < want:
            n = sock.recv_into(view[have:])
            if n == 0:
                raise ConnectionResetError("server closed the connection")
            have += n

    def skip(self, nbytes: int) -> None:
        """Discard the next ``nbytes`` bytes (the body of a value nobody wants)."""
        while nbytes > 0:
            if self._start == self._end:
                self._fill()
            take = min(nbytes, self._end - self._start)
            self._start += take
            nbytes -= take

    def read_crlf(self) -> None:
        while self._end - self._start < 2:
            self._fill()
        if self._buf[self._start : self._start + 2] != _CRLF:
            raise ProtocolError("bulk value not followed by CRLF")
        self._start += 2


def _tls_context(opts: ValkeyOptions) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=opts.tls_ca_file)
    context.check_hostname = opts.tls_check_hostname
    if opts.tls_cert_file is not None and opts.tls_key_file is not None:
        password = opts.tls_key_password.get_secret_value() if opts.tls_key_password else None
        context.load_cert_chain(opts.tls_cert_file, opts.tls_key_file, password=password)
    return context


class Pool:
    """Hands out at most ``max_connections`` connections; a failed one is closed, never reused."""

    def __init__(self, options: ValkeyOptions) -> None:
        self.options = options
        self._slots = threading.BoundedSemaphore(options.max_connections)
        self._lock = threading.Lock()
        self._idle: list[Connection] = []
        self._closed = False
        self.connects = 0

    @contextlib.contextmanager
    def connection(self) -> Iterator[Connection]:
        if not self._slots.acquire(timeout=self.options.socket_timeout_s):
            raise PoolExhaustedError(
                f"all {self.options.max_connections} connections stayed busy for "
                f"{self.options.socket_timeout_s}s"
            )
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = Connection(self.options)
                conn.connect()
                with self._lock:
                    self.connects += 1
            try:
                yield conn
            except BaseException:
                conn.close()  # mid-pipeline: replies may still be on the way
                raise
            with self._lock:
                if self._closed:
                    conn.close()
                else:
                    self._idle.append(conn)
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def discard_idle(self) -> None:
        """Close every idle connection (after a failure: they may point at a dead server)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
