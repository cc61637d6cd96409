"""The servers a backend talks to: one, or the masters of a cluster with their slot map.

- ``Nodes.open()``              connect to the configured node (and read ``CLUSTER SLOTS``)
- ``Nodes.pool_for(name)``      the connection pool of the node serving key ``name``
- ``Nodes.masters()``           one pool per master (SCAN and keyspace events are per node)
- ``Nodes.refresh()``           re-read the slot map after a ``MOVED``/``ASK`` redirection

In cluster mode a key's slot is CRC16 of its hash tag (the page key in braces) modulo 16384,
so a page's header and chunks always live on one node and its scripts stay single-slot.
"""

from __future__ import annotations

import threading

from redis.crc import key_slot

from hicache_valkey.options import ValkeyOptions
from hicache_valkey.resp import Pool, ProtocolError

__all__ = ["SLOTS", "Nodes"]

SLOTS = 16384

Address = tuple[str, int]


class Nodes:
    """Connection pools per node; thread-safe."""

    def __init__(self, options: ValkeyOptions) -> None:
        self.options = options
        self._lock = threading.Lock()
        self._pools: dict[Address, Pool] = {}
        self._slots: list[Address] | None = None
        self._seed: Address = (options.host, options.port)
        #: Slot maps read after the first (each one follows a MOVED/ASK redirection).
        self.refreshes = -1

    def _pool(self, address: Address) -> Pool:
        with self._lock:
            pool = self._pools.get(address)
            if pool is None:
                node = self.options.model_copy(update={"host": address[0], "port": address[1]})
                pool = self._pools[address] = Pool(node)
            return pool

    def open(self) -> Pool:
        """Check the configured node answers (and map the cluster); return its pool."""
        seed = self._pool(self._seed)
        with seed.connection() as conn:
            if conn.call("PING") != "PONG":
                raise ProtocolError("PING did not answer PONG")
        if self.options.cluster:
            self.refresh()
        return seed

    def refresh(self) -> None:
        """Read the slot map from the first node that answers ``CLUSTER SLOTS``."""
        with self._lock:
            known = [self._seed, *(a for a in self._pools if a != self._seed)]
        error: Exception | None = None
        for address in known:
            try:
                with self._pool(address).connection() as conn:
                    reply = conn.call("CLUSTER", "SLOTS")
            except OSError as exc:
                error = exc
                continue
            table = _slot_table(reply)
            with self._lock:
                self._slots = table
                self.refreshes += 1
            for address in set(table):
                self._pool(address)
            return
        raise error or ProtocolError("no cluster node answered CLUSTER SLOTS")

    def pool_for(self, name: bytes) -> Pool:
        slots = self._slots
        if slots is None:
            return self._pool(self._seed)
        return self._pool(slots[key_slot(name)])

    def masters(self) -> list[Pool]:
        slots = self._slots
        if slots is None:
            return [self._pool(self._seed)]
        return [self._pool(address) for address in sorted(set(slots))]

    def discard_idle(self) -> None:
        with self._lock:
            pools = list(self._pools.values())
        for pool in pools:
            pool.discard_idle()

    @property
    def connects(self) -> int:
        with self._lock:
            return sum(pool.connects for pool in self._pools.values())

    def close(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
            self._slots = None
        for pool in pools:
            pool.close()


def _slot_table(reply: object) -> list[Address]:
    """``CLUSTER SLOTS`` -> the master address of every slot; every slot must be served."""
    table: list[Address | None] = [None] * SLOTS
    if not isinstance(reply, list):
        raise ProtocolError(f"CLUSTER SLOTS answered {reply!r}")
    for entry in reply:
        if not (isinstance(entry, list) and len(entry) >= 3 and isinstance(entry[2], list)):
            raise ProtocolError(f"unexpected CLUSTER SLOTS entry {entry!r}")
        start, end, master = entry[0], entry[1], entry[2]
        if not (isinstance(start, int) and isinstance(end, int) and len(master) >= 2):
            raise ProtocolError(f"unexpected CLUSTER SLOTS entry {entry!r}")
        host, port = master[0], master[1]
        if not (isinstance(host, bytes) and isinstance(port, int)):
            raise ProtocolError(f"unexpected CLUSTER SLOTS node {master!r}")
        address = (host.decode(), port)
        for slot in range(start, end + 1):
            table[slot] = address
    missing = sum(1 for a in table if a is None)
    if missing:
        raise ProtocolError(f"the cluster serves no node for {missing} of {SLOTS} slots")
    return [a for a in table if a is not None]
