"""``LocalView``: what one process knows of a shared slot file, and how it stays current.

The file has no shared index: each process keeps its own view of it and checks it against the
file rather than trusting it.

- ``index``       key -> (slot, generation at which that slot held it), our namespace only
- ``slot_key``    slot -> our key in it, or None
- ``seen``        per set, the set version at which we last read all of its headers
- ``clock``       CLOCK over every slot, used or free whatever its namespace (the put's victim)
- ``scan(file)``              rebuild all of it from every header (on open)
- ``rescan_set(file, s)``     refresh one set, only when its version changed
- ``locate(file, key)``       slot and generation of a key, validated by one generation read
- ``exists(file, keys)``      ``locate`` for a batch, with the two common answers inline

:class:`~hicache_mmap.backend.MmapBackend` owns one and does the locking: callers hold the set's
thread lock around ``rescan_set`` and ``observe`` (``locate`` takes it itself when it must
rescan). Nothing here writes to the file.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Final

from hicache.storage import ClockSlots
from hicache_mmap.layout import BODY_OFFSET, GEN, HEADER_USED, SLOT_MAGIC, used_slot
from hicache_mmap.slotfile import SlotFile

__all__ = ["LocalView"]

_UNSEEN: Final[int] = -1


class LocalView:
    """One process's view of the slot file's used slots, for the namespace ``ns_field``.

    Empty until :meth:`scan`; ``clock`` is None until then.
    """

    __slots__ = ("clock", "index", "ns_field", "seen", "slot_key")

    def __init__(self, ns_field: bytes) -> None:
        self.ns_field = ns_field
        # key -> (slot, generation at which that slot held it): one atomic dict value, so a
        # reader never pairs a slot from one observation with a generation from another.
        self.index: dict[str, tuple[int, int]] = {}
        self.slot_key: list[str | None] = []
        self.seen: list[int] = []
        self.clock: ClockSlots | None = None

    def scan(self, file: SlotFile) -> float:
        """Rebuild the view from every slot header (torn or odd slots count as free).

        Returns the seconds the header scan took.
        """
        geo = file.geo
        self.index = {}
        self.slot_key = [None] * geo.num_slots
        self.seen = [_UNSEEN] * geo.num_sets
        self.clock = clock = ClockSlots(geo.num_slots)
        started = time.perf_counter()
        mm, payload = file.mm, geo.slot_payload
        base, size, assoc = geo.slots_offset, geo.slot_size, geo.associativity
        index, slot_key, seen, ours = self.index, self.slot_key, self.seen, self.ns_field
        set_version = file.set_version
        for s in range(geo.num_sets):
            version = set_version(s)
            for slot in range(s * assoc, (s + 1) * assoc):
                off = base + slot * size
                if mm[off + BODY_OFFSET : off + BODY_OFFSET + 8] != SLOT_MAGIC:
                    continue  # free (the common case in a fresh file): skip the full check
                found = used_slot(mm[off : off + HEADER_USED], payload)
                if found is None:
                    continue  # odd (a writer died in it) or torn: free
                clock.mark_used(slot)
                if found[2] == ours:
                    key = found[1].hex()
                    index[key] = (slot, found[0])
                    slot_key[slot] = key
            # A writer racing this scan bumps the version after it, which makes us rescan.
            seen[s] = version
        return time.perf_counter() - started

    def observe(self, slot: int, key: str | None, generation: int) -> None:
        """Record what ``slot`` holds (one of our keys, or not); set's thread lock held."""
        old = self.slot_key[slot]
        if old is not None and old != key:
            entry = self.index.get(old)
            if entry is not None and entry[0] == slot:
                del self.index[old]
        self.slot_key[slot] = key
        if key is not None:
            self.index[key] = (slot, generation)

    def rescan_set(self, file: SlotFile, s: int, *, writer: bool = False) -> None:
        """Refresh the view of set ``s`` from its headers, if the set changed.

        Called with the set's thread lock held; ``writer`` means its OFD lock is held too, so no
        writer is active anywhere and an odd generation was left by a dead one: that slot is
        free. Without the OFD lock an odd slot is someone's write in progress: left as it is.
        """
        version = file.set_version(s)
        if version == self.seen[s]:
            return
        geo = file.geo
        mm, payload, ours = file.mm, geo.slot_payload, self.ns_field
        clock = self.clock
        assert clock is not None
        base, size = geo.slots_offset, geo.slot_size
        for slot in range(s * geo.associativity, (s + 1) * geo.associativity):
            off = base + slot * size
            raw = mm[off : off + HEADER_USED]
            found = used_slot(raw, payload)
            if found is not None:
                if not clock.is_used(slot):
                    clock.mark_used(slot)
                self.observe(slot, found[1].hex() if found[2] == ours else None, found[0])
            elif writer or not GEN.unpack_from(raw, 0)[0] & 1:
                clock.release(slot)
                self.observe(slot, None, 0)
        # Only a scan no writer overlapped describes the set completely.
        if file.set_version(s) == version:
            self.seen[s] = version

    def locate(self, file: SlotFile, key: str) -> tuple[int, int] | None:
        """Slot and generation of ``key``, validated against the file; ``None`` if absent."""
        entry = self.index.get(key)
        mm = file.mm
        geo = file.geo
        if entry is not None:
            (gen,) = GEN.unpack_from(mm, geo.slots_offset + entry[0] * geo.slot_size)
            if gen == entry[1]:
                return entry
        s = int(key[:16], 16) % geo.num_sets
        if entry is None and file.set_version(s) == self.seen[s]:
            return None  # nothing changed in the set since we last saw all of it
        with file.locks.thread_lock(s):
            self.rescan_set(file, s)
        entry = self.index.get(key)
        if entry is not None:
            (gen,) = GEN.unpack_from(mm, geo.slots_offset + entry[0] * geo.slot_size)
            if gen == entry[1]:
                return entry
        return None

    def exists(self, file: SlotFile, keys: Sequence[str]) -> list[bool]:
        """Whether each of ``keys`` is in the file (``locate`` per key, common cases inline)."""
        mm, geo, index, seen = file.mm, file.geo, self.index, self.seen
        base, size, num_sets = geo.slots_offset, geo.slot_size, geo.num_sets
        table = geo.set_table_offset
        unpack = GEN.unpack_from
        out: list[bool] = []
        append = out.append
        for key in keys:
            # The two common answers inline: a validated index hit, and a miss in a set that has
            # not changed since we last read all of it.
            entry = index.get(key)
            if entry is not None:
                if unpack(mm, base + entry[0] * size)[0] == entry[1]:
                    append(True)
                    continue
            else:
                s = int(key[:16], 16) % num_sets
                if unpack(mm, table + 8 * s)[0] == seen[s]:
                    append(False)
                    continue
            append(self.locate(file, key) is not None)
        return out
