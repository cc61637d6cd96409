"""Keys the server dropped on its own, learnt from keyspace notifications.

The server publishes ``__keyevent@<db>__:evicted`` when ``maxmemory`` evicts a key and
``__keyevent@<db>__:expired`` when a TTL runs out, if ``notify-keyspace-events`` contains ``E``
(key-event channels), ``e`` (evicted) and ``x`` (expired). A listener thread subscribes to both
and turns every key of its namespace into its page key (a chunk's eviction loses its page).

``del`` events are deliberately not followed: they also fire for this backend's own ``delete()``,
which must never be reported as an eviction.

Pub/sub is fire-and-forget: events published while the listener is disconnected are lost. It
reconnects with a capped back-off; ``dropped_while_down`` counts the reconnects so an operator
knows the announced set may be incomplete.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from hicache_valkey.layout import KeySpace
from hicache_valkey.options import ValkeyOptions
from hicache_valkey.resp import Connection, ProtocolError

__all__ = ["EVENTS", "EvictionListener", "ensure_notifications"]

log = logging.getLogger(__name__)

#: The notify-keyspace-events flags the listener needs: key-event channels, evicted, expired.
EVENTS = "Eex"
_BACKOFF_MAX_S = 2.0


def ensure_notifications(conn: Connection) -> str | None:
    """Add :data:`EVENTS` to the server's ``notify-keyspace-events``; return None on success,
    else why it could not (CONFIG refused: ACLs, a managed service, a renamed command)."""
    reply = conn.call("CONFIG", "GET", "notify-keyspace-events")
    if not isinstance(reply, list) or len(reply) != 2 or not isinstance(reply[1], bytes):
        return f"CONFIG GET notify-keyspace-events answered {reply!r}"
    current = reply[1].decode()
    # 'A' stands for every class, 'e' and 'x' included
    needed = [f for f in EVENTS if f not in current and not (f in "ex" and "A" in current)]
    if not needed:
        return None
    result = conn.call("CONFIG", "SET", "notify-keyspace-events", current + "".join(needed))
    if result != "OK":
        return f"CONFIG SET notify-keyspace-events answered {result!r}"
    return None


class EvictionListener:
    """A daemon thread subscribed to the evicted/expired key events of one database."""

    def __init__(
        self, options: ValkeyOptions, keyspace: KeySpace, on_evicted: Callable[[str], None]
    ) -> None:
        self._options = options
        self._configure = options.configure_notifications
        self._keyspace = keyspace
        self._on_evicted = on_evicted
        self._channels = [f"__keyevent@{options.db}__:{event}" for event in ("evicted", "expired")]
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="hicache-valkey-events", daemon=True)
        self.reconnects = 0

    def start(self, wait_s: float) -> bool:
        """Start listening; return whether the subscription was confirmed within ``wait_s``."""
        self._thread.start()
        return self._subscribed.wait(wait_s)

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            conn = self._conn
        if conn is not None:
            conn.interrupt()
        self._thread.join(timeout=self._options.connect_timeout_s + 5.0)

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            conn = Connection(self._options, name="hicache-events")
            try:
                conn.connect()
                with self._lock:
                    self._conn = conn
                if self._stop.is_set():
                    return
                if self._configure:
                    # a restarted server forgot a CONFIG SET: set the flags on every connect
                    problem = ensure_notifications(conn)
                    if problem is not None:
                        log.debug("notify-keyspace-events not set: %s", problem)
                self._listen(conn)
            except (OSError, ProtocolError, ValueError) as exc:
                if self._stop.is_set():
                    return
                self._subscribed.clear()
                self.reconnects += 1
                log.debug("event listener on %s disconnected: %s", self._options.address, exc)
            finally:
                with self._lock:
                    self._conn = None
                conn.close()
            self._stop.wait(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    def _listen(self, conn: Connection) -> None:
        conn.call("SUBSCRIBE", *self._channels)  # the first confirmation
        for _ in self._channels[1:]:
            conn.read_reply()
        self._subscribed.set()
        while not self._stop.is_set():
            try:
                message = conn.read_reply()
            except TimeoutError:
                continue  # idle: socket timeouts bound reads, not the subscription
            if (
                isinstance(message, list)
                and len(message) == 3
                and message[0] == b"message"
                and isinstance(message[2], bytes)
            ):
                found = self._keyspace.page_key_of(message[2])
                if found is not None:
                    self._on_evicted(found[0])
