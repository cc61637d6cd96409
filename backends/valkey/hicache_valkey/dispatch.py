"""Sending a batch of commands to the nodes that serve its keys, and reading the replies.

- ``Dispatcher.run(...)``   one batch: grouped per node, pipelined in bounded windows, replies
                            read in order; a cluster redirection re-reads the slot map and
                            retries the batch once
- ``Dispatcher.scan(pat)``  every key matching ``pat`` on every master (``SCAN``, never ``KEYS``)
- ``Dispatcher.io(op)``     the boundary: socket, protocol and availability failures leave as
                            :class:`~hicache.errors.BackendUnavailableError`
- ``raise_for_code(reply)`` error replies that fail a whole call rather than one page
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar, cast

from hicache.errors import BackendClosedError, BackendUnavailableError
from hicache_valkey.nodes import Nodes
from hicache_valkey.options import ValkeyOptions
from hicache_valkey.resp import Connection, Packer, Pool, ProtocolError, Reply, ServerError

__all__ = ["EARLY_SEND_BYTES", "AfterDrain", "Dispatcher", "raise_for_code"]

T = TypeVar("T")
Item = TypeVar("Item")

# Error replies that mean "this server cannot serve now" (loading after a restart, a failover,
# a busy script, credentials refused), as opposed to one command failing (OOM for a put).
_UNAVAILABLE_CODES = frozenset(
    {"LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOAUTH", "WRONGPASS", "NOPERM"}
)
# Redirections in a cluster: the slot map changed.
_REDIRECT_CODES = frozenset({"MOVED", "ASK"})
_SCAN_COUNT = 1000
#: Packed values at least this large leave for the socket at once instead of waiting for the
#: rest of their window: the server reads page k while page k+1 is packed (and a put's page
#: hashed), rather than idling until the whole window is ready.
EARLY_SEND_BYTES = 1 << 20


class AfterDrain(Exception):
    """An error reply that fails the whole call, raised once the window's replies are read."""


class _Unavailable(AfterDrain):
    """An error reply of :data:`_UNAVAILABLE_CODES`."""


class _Redirected(AfterDrain):
    """A ``MOVED``/``ASK`` reply."""


def raise_for_code(reply: ServerError) -> None:
    """Raise :class:`AfterDrain` when ``reply`` fails the whole call; return otherwise."""
    if reply.code in _UNAVAILABLE_CODES:
        raise _Unavailable(reply.message)
    if reply.code in _REDIRECT_CODES:
        raise _Redirected(reply.message)


class Dispatcher:
    """Batches over the nodes of one open backend."""

    def __init__(self, options: ValkeyOptions) -> None:
        self.options = options
        self.nodes: Nodes | None = None

    def live(self) -> Nodes:
        nodes = self.nodes
        if nodes is None:
            raise BackendClosedError(f"valkey tier on {self.options.address} is not open")
        return nodes

    @contextlib.contextmanager
    def io(self, operation: str, nodes: Nodes | None = None) -> Iterator[None]:
        """Turn socket, protocol and availability errors into ``BackendUnavailableError``."""
        try:
            yield
        except (OSError, ProtocolError, _Unavailable, ValueError) as exc:
            target = nodes or self.nodes
            if target is not None:
                target.discard_idle()  # they most likely point at the same dead server
            kind = "timed out" if isinstance(exc, TimeoutError) else "failed"
            raise BackendUnavailableError(
                f"valkey {operation} on {self.options.address} {kind}: {type(exc).__name__}: {exc}"
            ) from None

    def run(
        self,
        operation: str,
        items: Sequence[Item],
        send: Callable[[Packer, Item], None],
        receive: Callable[[Connection, Item], T],
        name_of: Callable[[Item], bytes],
        reply_bytes: int = 0,
    ) -> list[T]:
        """Send ``items`` to the nodes serving them and read one result per item, in order.

        Per node, ``send`` packs a window of items, the window goes out in one write (large
        values as soon as they are packed), and ``receive`` reads each reply. A window holds at
        most ``pipeline_depth`` commands and ``pipeline_bytes`` of values: the values sent plus
        ``reply_bytes`` per command for the replies, since replies waiting in the server's
        output buffer count against its ``maxmemory``. A redirection re-reads the slot map and
        retries once: every call is idempotent (a put retried finds its own page:
        ``ALREADY_EXISTS``).
        """
        nodes = self.live()
        try:
            return self._run_once(nodes, operation, items, send, receive, name_of, reply_bytes)
        except _Redirected:
            with self.io("CLUSTER SLOTS"):
                nodes.refresh()
        try:
            return self._run_once(nodes, operation, items, send, receive, name_of, reply_bytes)
        except _Redirected as exc:
            raise BackendUnavailableError(
                f"valkey {operation} on {self.options.address}: the cluster keeps redirecting "
                f"({exc})"
            ) from None

    def _run_once(
        self,
        nodes: Nodes,
        operation: str,
        items: Sequence[Item],
        send: Callable[[Packer, Item], None],
        receive: Callable[[Connection, Item], T],
        name_of: Callable[[Item], bytes],
        reply_bytes: int,
    ) -> list[T]:
        depth, max_bytes = self.options.pipeline_depth, self.options.pipeline_bytes
        groups: dict[Pool, list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(nodes.pool_for(name_of(item)), []).append(index)
        results: list[T | None] = [None] * len(items)
        pending: AfterDrain | None = None
        for pool, indices in groups.items():
            with self.io(operation), pool.connection() as conn:
                start = 0
                while start < len(indices):
                    packer = Packer()
                    end = start
                    sent = 0  # value bytes of this window already on their way
                    while end < len(indices) and end - start < depth:
                        send(packer, items[indices[end]])
                        end += 1
                        if packer.value_bytes >= EARLY_SEND_BYTES:
                            sent += packer.value_bytes
                            conn.send(packer.take())
                        window = sent + packer.value_bytes + (end - start) * reply_bytes
                        if window >= max_bytes:
                            break
                    conn.send(packer.take())
                    for index in indices[start:end]:
                        try:
                            results[index] = receive(conn, items[index])
                        except AfterDrain as exc:  # keep reading: the connection stays in step
                            pending = pending or exc
                    start = end
        if pending is not None:
            with self.io(operation):  # an _Unavailable leaves as BackendUnavailableError
                raise pending
        return cast(list[T], results)

    def scan(self, pattern: bytes) -> Iterator[bytes]:
        """Every key matching ``pattern`` on every master (a key may come twice)."""
        for pool in self.live().masters():
            cursor = b"0"
            while True:
                with self.io("SCAN"), pool.connection() as conn:
                    reply = conn.call("SCAN", cursor, "MATCH", pattern, "COUNT", _SCAN_COUNT)
                if not (isinstance(reply, list) and len(reply) == 2):
                    raise BackendUnavailableError(
                        f"valkey SCAN on {pool.options.address} answered {reply!r}"
                    )
                names = reply[1] if isinstance(reply[1], list) else []
                yield from (n for n in names if isinstance(n, bytes))
                if not isinstance(reply[0], bytes) or reply[0] == b"0":
                    break
                cursor = reply[0]

    def call(self, name: bytes, command: str, *args: bytes | str | int) -> Reply:
        """One command about key ``name``, sent to the node serving it."""
        with self.io(command), self.live().pool_for(name).connection() as conn:
            return conn.call(command, *args)
