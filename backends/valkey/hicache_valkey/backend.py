"""``ValkeyBackend``: pages in a Valkey or Redis (>= 7) server that a fleet of serving nodes shares.

Every page carries the 4 KiB header of :mod:`hicache.storage.pageformat` and is verified on read.
Puts are create-only (``SETNX key value``; ``SET key value NX PX ms`` with a TTL; one Lua script
for a page split into chunks); exists, get and put of a batch go down one connection as
pipelines of at most ``pipeline_depth`` commands / ``pipeline_bytes`` bytes before their replies
are read. A page of several regions (scatter-gather) is one value, one header, one checksum:
puts send the regions as they are and gets read values straight into them (see
:mod:`hicache_valkey.resp` and :mod:`hicache_valkey.pagereader`); no page is staged in a buffer
of its own. Keys the server
evicts or expires come back through ``take_evicted()`` (see :mod:`hicache_valkey.notify`).
No socket or protocol exception leaves this module: a server that is down, restarting or hung
raises :class:`~hicache.errors.BackendUnavailableError` within the configured timeouts.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

from hicache.errors import BackendUnavailableError, PageCorruptError
from hicache.storage import (
    HEADER_SIZE,
    Backend,
    BackendConfig,
    BackendContext,
    Capabilities,
    PageParts,
    PageStatus,
    RemoteBenchHooks,
    StoredPage,
    check_checksum,
    check_namespace,
    decode_header,
    encode_header,
    payload_hasher,
    verify_page,
)
from hicache_valkey.dispatch import Dispatcher, raise_for_code
from hicache_valkey.layout import (
    DELETE_SCRIPT,
    GET_CHUNKED_SCRIPT,
    PUT_CHUNKED_SCRIPT,
    KeySpace,
    chunk_layout,
    chunk_regions,
)
from hicache_valkey.nodes import Nodes
from hicache_valkey.notify import EvictionListener, ensure_notifications
from hicache_valkey.options import ValkeyOptions
from hicache_valkey.pagereader import read_page_parts
from hicache_valkey.resp import Connection, Packer, Pool, ProtocolError, ServerError

__all__ = ["ValkeyBackend"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Item = TypeVar("Item")

_CORRUPT_LOG_MAX = 10_000
_EVICTED_MAX = 1_000_000


class ValkeyBackend(RemoteBenchHooks, Backend):
    """Pages in a Valkey/Redis server, shared by every instance pointing at it.

    Capabilities: persistent (pages outlive this process; the server's own persistence decides
    whether they outlive a server restart), shared, manages capacity (the server's ``maxmemory``
    policy evicts; evictions are reported), listable, medium ``EXTERNAL``.
    """

    config_model = ValkeyOptions
    #: raw client calls on the same server (see ``baseline.py``), loaded only when benchmarked
    bench_baseline_ref = "hicache_valkey.baseline:ValkeyRawBaseline"

    def __init__(self, config: BackendConfig, context: BackendContext) -> None:
        super().__init__(config, context)  # checks that config is a ValkeyOptions
        self.options = cast(ValkeyOptions, config)
        self.keyspace = KeySpace(self.options.key_prefix, context.namespace)
        self._chunks, self._chunk_bytes = chunk_layout(
            context.page_bytes, self.options.max_value_bytes
        )
        self._ttl_ms = round(self.options.ttl_s * 1000) if self.options.ttl_s else 0
        self._dispatch = Dispatcher(self.options)
        self._listeners: list[EvictionListener] = []
        self._lock = threading.Lock()
        self._evicted: dict[str, None] = {}  # insertion-ordered set
        self._corrupt_logged: set[str] = set()
        self._logged_codes: set[str] = set()
        self._damaged: set[str] = set()  # proven damaged or incomplete, deleted after the call
        self._counts: dict[str, int] = dict.fromkeys(
            (
                "puts",
                "put_bytes",
                "already_exists",
                "gets",
                "get_bytes",
                "not_found",
                "corrupt",
                "failed_pages",
                "deletes",
                "evicted",
            ),
            0,
        )
        self._notifications = "off"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(server={self.options.address!r}, db={self.options.db}, "
            f"namespace={self.context.namespace!r})"
        )

    @property
    def capabilities(self) -> Capabilities:
        # docstring inherited
        return Capabilities(
            persistent=True,
            shared=True,
            manages_capacity=True,
            max_batch=self.options.max_batch,
            alignment=1,
            listable=True,
            default_medium="EXTERNAL",
        )

    # ------------------------------------------------------------------ lifecycle

    def _open(self) -> None:
        nodes = Nodes(self.options)
        notifications = "off"
        try:
            with self._dispatch.io("open", nodes):
                nodes.open()
                if self.options.notify_evictions and self.options.configure_notifications:
                    problems = [p for p in map(self._configure_events, nodes.masters()) if p]
                    notifications = "not configured" if problems else "configured"
                    if problems:
                        log.warning(
                            "%r: cannot enable keyspace notifications (%s); evictions are "
                            "reported only if the server has notify-keyspace-events 'Eex'",
                            self,
                            problems[0],
                        )
        except BaseException:
            nodes.close()
            raise
        self._dispatch.nodes = nodes
        if self.options.notify_evictions:
            # keyspace events are local to a node: one listener per master
            wait_s = self.options.connect_timeout_s + self.options.socket_timeout_s
            for pool in nodes.masters():
                listener = EvictionListener(pool.options, self.keyspace, self._record_evicted)
                if not listener.start(wait_s):
                    log.warning("%r: eviction listener not subscribed yet; retrying", self)
                self._listeners.append(listener)
            if notifications == "off":
                notifications = "assumed"
        self._notifications = notifications

    @staticmethod
    def _configure_events(pool: Pool) -> str | None:
        with pool.connection() as conn:
            return ensure_notifications(conn)

    def _close(self) -> None:
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.stop()
        nodes, self._dispatch.nodes = self._dispatch.nodes, None
        if nodes is not None:
            nodes.close()

    # ------------------------------------------------------------------ plumbing

    def _error_reply(self, reply: ServerError, key: str, operation: str) -> PageStatus:
        raise_for_code(reply)
        self._count(failed_pages=1)
        with self._lock:  # one warning per error code: an OOM server fails every put alike
            first = reply.code not in self._logged_codes
            self._logged_codes.add(reply.code)
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "%s of page %s failed in %r: %s",
            operation,
            key,
            self,
            reply.message,
        )
        return PageStatus.FAILED

    def _name(self, item: tuple[Any, ...]) -> bytes:
        """Header key of a put or get item (its first field is the page key)."""
        return self.keyspace.page(item[0])

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._counts[name] += delta

    def _corrupt(self, key: str, why: str) -> PageStatus:
        self._count(corrupt=1)
        with self._lock:
            first = key not in self._corrupt_logged and len(self._corrupt_logged) < _CORRUPT_LOG_MAX
            if first:
                self._corrupt_logged.add(key)
        if first:
            log.warning("corrupt page %s in %r: %s (treated as a miss)", key, self, why)
        return PageStatus.CORRUPT

    def _record_evicted(self, key: str) -> None:
        with self._lock:
            if len(self._evicted) < _EVICTED_MAX:
                self._evicted[key] = None
            self._counts["evicted"] += 1

    # ------------------------------------------------------------------ exists

    def _exists(self, keys: Sequence[str]) -> list[bool]:
        def send(packer: Packer, key: str) -> None:
            packer.command("EXISTS", self.keyspace.page(key))

        def receive(conn: Connection, key: str) -> bool:
            reply = conn.read_reply()
            if isinstance(reply, ServerError):
                self._error_reply(reply, key, "EXISTS")
                raise ProtocolError(f"EXISTS failed: {reply.message}")
            return reply == 1

        return self._dispatch.run("EXISTS", keys, send, receive, self.keyspace.page)

    # ------------------------------------------------------------------ put

    def _put(self, keys: Sequence[str], srcs: Sequence[PageParts]) -> list[PageStatus]:
        items = [(key, _flat(parts)) for key, parts in zip(keys, srcs, strict=True)]
        statuses = self._dispatch.run("put", items, self._send_put, self._receive_put, self._name)
        ok = sum(1 for s in statuses if s is PageStatus.OK)
        self._count(
            puts=ok,
            put_bytes=ok * self.context.page_bytes,
            already_exists=sum(1 for s in statuses if s is PageStatus.ALREADY_EXISTS),
        )
        return statuses

    def _send_put(self, packer: Packer, item: tuple[str, PageParts]) -> None:
        # The page is hashed as it is packed, not the whole batch first: the dispatcher sends a
        # large value at once, so the server reads page k while page k+1 is hashed (the GIL is
        # released while hashing). One checksum over the regions in order, whatever the split.
        # The packer writes one bulk value from several buffers: the regions go out as they
        # are, never joined into one page-sized buffer.
        key, regions = item
        payload = regions[0] if len(regions) == 1 else regions
        header = encode_header(self.context.namespace, key, payload)
        page_key = self.keyspace.page(key)
        if not self._chunks:
            if not self._ttl_ms:
                # SETNX, not SET ... NX: the value must be the command's last argument. A
                # server whose first read of a command takes in the whole value (usual when
                # several clients keep it busy) keeps that read buffer as the stored value only
                # when nothing follows the value in it; a trailing NX made it copy every value
                # once more (Redis 7.0 networking.c; ~0.2 ms per 2 MiB page, measured: puts at
                # 2 MiB x 4 threads 0.78x the raw SET with NX after the value, 1.0x with SETNX).
                packer.command("SETNX", page_key, (header, *regions))
                return
            # no create-only command with an expiry takes the value last: this one pays the copy
            packer.command("SET", page_key, (header, *regions), "NX", "PX", self._ttl_ms)
            return
        chunks: list[tuple[memoryview, ...]] = chunk_regions(regions, self._chunk_bytes)
        # the script pairs KEYS with ARGV: a page always sends as many chunks as it has keys
        chunks += [()] * (self._chunks - len(chunks))
        packer.command(
            "EVAL",
            PUT_CHUNKED_SCRIPT,
            1 + self._chunks,
            page_key,
            *self.keyspace.chunks(page_key, self._chunks),
            header,
            *chunks,
            self._ttl_ms,
        )

    def _receive_put(self, conn: Connection, item: tuple[str, PageParts]) -> PageStatus:
        reply = conn.read_reply()
        if isinstance(reply, ServerError):
            return self._error_reply(reply, item[0], "put")
        if reply == "OK" or reply == 1:
            return PageStatus.OK
        if reply is None or reply == 0:
            return PageStatus.ALREADY_EXISTS
        raise ProtocolError(f"unexpected reply to a put: {reply!r}")

    # ------------------------------------------------------------------ get

    def _get_into(self, keys: Sequence[str], dsts: Sequence[PageParts]) -> list[PageStatus]:
        # each reply is read straight into the page's regions (see pagereader): no staging
        items = [(key, _flat(parts)) for key, parts in zip(keys, dsts, strict=True)]
        send = self._send_get_chunked if self._chunks else self._send_get
        size = HEADER_SIZE + self.context.page_bytes
        statuses = self._dispatch.run("get", items, send, self._receive_get, self._name, size)
        # a page another writer split into chunks (a smaller max_value_bytes) needs the script
        retry = [i for i, s in enumerate(statuses) if s is None]
        if retry:
            again = self._dispatch.run(
                "get",
                [items[i] for i in retry],
                self._send_get_chunked,
                self._receive_get,
                self._name,
                size,
            )
            for i, status in zip(retry, again, strict=True):
                statuses[i] = status
        final = [PageStatus.NOT_FOUND if s is None else s for s in statuses]
        ok = sum(1 for s in final if s is PageStatus.OK)
        self._count(
            gets=ok,
            get_bytes=ok * self.context.page_bytes,
            not_found=sum(1 for s in final if s is PageStatus.NOT_FOUND),
        )
        self._drop_damaged(keys, final)
        return final

    def _send_get(self, packer: Packer, item: tuple[str, PageParts]) -> None:
        packer.command("GET", self.keyspace.page(item[0]))

    def _send_get_chunked(self, packer: Packer, item: tuple[str, PageParts]) -> None:
        packer.command("EVAL", GET_CHUNKED_SCRIPT, 1, self.keyspace.page(item[0]))

    def _receive_get(self, conn: Connection, item: tuple[str, PageParts]) -> PageStatus | None:
        """Read one GET or script reply into the page's regions; None: a header-only value
        (chunked)."""
        key, dst = item
        head = conn.read_head()
        kind, rest = head[:1], head[1:]
        if kind == b"-":
            return self._error_reply(ServerError(rest.decode("utf-8", "replace")), key, "get")
        if (kind == b"$" and int(rest) < 0) or (kind == b"*" and int(rest) <= 0):
            return PageStatus.NOT_FOUND
        if kind == b"$":
            return self._read_page(conn, key, dst, kind, 1, int(rest))
        if kind != b"*":
            raise ProtocolError(f"unexpected reply to a get: {head[:20]!r}")
        first = conn.read_head()
        if first[:1] != b"$" or int(first[1:]) < 0:
            raise ProtocolError(f"unexpected part of a page reply: {first[:20]!r}")
        return self._read_page(conn, key, dst, kind, int(rest), int(first[1:]))

    def _read_page(
        self, conn: Connection, key: str, dst: PageParts, kind: bytes, parts: int, first: int
    ) -> PageStatus | None:
        """Read ``parts`` bulk values (the first of ``first`` bytes, its length line already
        read) as one stream: 4 KiB of header, then the payload straight into ``dst``'s regions;
        the checksum covers the regions in order."""
        header = bytearray(HEADER_SIZE)
        expected = HEADER_SIZE + self.context.page_bytes
        # Verified while it lands: each piece is hashed as soon as it is received (one pass).
        digest = payload_hasher()
        total, overflow = read_page_parts(conn, parts, first, memoryview(header), dst, digest)
        if total == HEADER_SIZE and not overflow:
            if kind == b"$":
                return None  # the header of a chunked page: read it again with the script
            return self._incomplete(key, header)
        if overflow or total != expected:
            return self._corrupt(key, f"stored value has {total}+ bytes, expected {expected}")
        try:
            payload = dst[0] if len(dst) == 1 else dst
            decoded = verify_page(
                header, payload, namespace=self.context.namespace, key=key, check_payload=False
            )
            check_checksum(decoded, digest.intdigest())
        except PageCorruptError as exc:
            status = self._corrupt(key, str(exc))
            if exc.field == "checksum":
                self._mark_damaged(key)
            return status
        return PageStatus.OK

    def _incomplete(self, key: str, header: bytearray) -> PageStatus:
        """A chunked page whose chunk is gone (evicted, expired): a miss, removed and reported."""
        try:
            decode_header(header)
        except PageCorruptError as exc:
            return self._corrupt(key, str(exc))
        self._mark_damaged(key)
        return PageStatus.NOT_FOUND

    def _mark_damaged(self, key: str) -> None:
        with self._lock:
            self._damaged.add(key)

    def _drop_damaged(self, keys: Sequence[str], statuses: Sequence[PageStatus]) -> None:
        """Delete pages proven damaged or incomplete, and report them as dropped: create-only
        puts would otherwise answer ALREADY_EXISTS for them forever."""
        with self._lock:
            damaged = [k for k in keys if k in self._damaged]
            self._damaged.difference_update(damaged)
        if not damaged or self.context.read_only:
            return
        try:
            self._delete(damaged)
        except BackendUnavailableError as exc:
            log.warning("%r: could not remove %d damaged pages: %s", self, len(damaged), exc)
            return
        for key in damaged:
            self._record_evicted(key)

    # ------------------------------------------------------------------ delete

    def _delete(self, keys: Sequence[str]) -> None:
        def send(packer: Packer, key: str) -> None:
            packer.command("EVAL", DELETE_SCRIPT, 1, self.keyspace.page(key), self._chunks)

        def receive(conn: Connection, key: str) -> None:
            reply = conn.read_reply()
            if isinstance(reply, ServerError):
                self._error_reply(reply, key, "delete")
                raise ProtocolError(f"delete failed: {reply.message}")

        self._dispatch.run("delete", keys, send, receive, self.keyspace.page)
        self._count(deletes=len(keys))

    # ------------------------------------------------------------------ evictions

    def take_evicted(self) -> list[str]:
        # docstring inherited
        with self._lock:
            keys, self._evicted = list(self._evicted), {}
        return keys

    # ------------------------------------------------------------------ listing

    def _iter_pages(self) -> Iterator[StoredPage]:
        # docstring inherited
        seen: set[str] = set()
        for name in self._dispatch.scan(self.keyspace.pattern):
            found = self.keyspace.page_key_of(name)
            if found is None or not found[1] or found[0] in seen:
                continue  # SCAN may return a key twice; chunks are counted with their header
            seen.add(found[0])
            page = self._describe(found[0])
            if page is not None:
                yield page

    def _describe(self, key: str) -> StoredPage | None:
        """Size of a listed page from its header (None when it vanished meanwhile)."""
        name = self.keyspace.page(key)
        reply = self._dispatch.call(name, "GETRANGE", name, 0, HEADER_SIZE - 1)
        if not isinstance(reply, bytes) or not reply:
            return None
        try:
            header = decode_header(reply)
        except PageCorruptError:
            return StoredPage(key=key, stored_bytes=len(reply))  # verify reports it
        return StoredPage(
            key=key,
            stored_bytes=HEADER_SIZE + header.payload_len,
            payload_bytes=header.payload_len,
        )

    def _iter_namespaces(self) -> Iterator[str]:
        # docstring inherited
        seen: set[str] = set()
        for name in self._dispatch.scan(self.keyspace.root + b"*"):
            namespace = self.keyspace.namespace_of(name)
            if namespace is None or namespace in seen:
                continue
            seen.add(namespace)
            with contextlib.suppress(ValueError):  # another tool's keys under the same prefix
                yield check_namespace(namespace)

    # ------------------------------------------------------------------ stats

    def _stats(self) -> Mapping[str, Any]:
        with self._lock:
            counts = dict(self._counts)
            pending = len(self._evicted)
        listeners = list(self._listeners)
        nodes = self._dispatch.nodes
        return {
            "server": self.options.address,
            "db": self.options.db,
            "chunks_per_page": self._chunks,
            "notifications": self._notifications,
            "nodes": 0 if nodes is None else len(nodes.masters()),
            "slot_map_refreshes": 0 if nodes is None else max(0, nodes.refreshes),
            "listener_subscribed": bool(listeners) and all(x.subscribed for x in listeners),
            "listener_reconnects": sum(x.reconnects for x in listeners),
            "evicted_pending": pending,
            "connects": 0 if nodes is None else nodes.connects,
            **counts,
        }


def _flat(parts: PageParts) -> PageParts:
    """A page's regions as flat byte views (regions may arrive typed, e.g. a uint16 tensor's)."""
    return tuple(p if p.format == "B" and p.ndim == 1 else p.cast("B") for p in parts)
