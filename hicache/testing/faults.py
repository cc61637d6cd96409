"""A backend wrapper that injects faults, for testing the cache's failure paths (no torch).

``FaultyBackend(inner)`` is a full :class:`~hicache.storage.backend.Backend` around any other
(open it, not the inner one). It is not registered as a kind: tests construct it by hand. Every
knob can be turned while calls are in flight; all are thread-safe.

- ``latency_s``                        sleep before every data call
- ``fail_keys(keys, status, ops)``     per-key ``FAILED`` / ``CORRUPT`` statuses on get and/or put
                                       (a failed put leaves no key behind, as the contract says)
- ``fail_calls(n, error, ops)``        the next ``n`` calls (``None`` = all, until cleared) raise
                                       ``error()`` (default ``BackendUnavailableError``)
- ``hang(ops, count, keys, after)``    calls block until the returned ``threading.Event`` is set
                                       (past any deadline); only the next ``count`` calls when
                                       given, only calls naming one of ``keys`` when given;
                                       ``after=True``: once the call did its work (a put stored,
                                       a get read), before it returns; ``wait_hung(n)`` waits
                                       until n are in
- ``clear_key_faults()``               forget every ``fail_keys`` fault (the other knobs stay)
- ``damage_on_get(damage)``            before a key is first read, ``damage(inner, key)`` harms
                                       the page where it rests (a raw hook such as the kit's
                                       ``corrupt_payload``): bytes rotted in storage, which only
                                       the inner backend's checksums can tell
- ``fail_open(error)``                 ``open()`` raises ``error()`` until ``fail_open(None)``
- ``evict(keys)``                      drop pages now and report them through ``take_evicted``
- ``vanish_on_get(keys)``              ``exists`` still says yes, then ``get_into`` finds the page
                                       gone (it is dropped first): a page that vanished between
                                       the lookup and the read
- ``calls``, ``put_log``, ``get_log``  what reached the wrapper (per op count; keys put/read;
                                       a call that raised an injected error logs no keys)
- ``put_counts()``                     ``put_log`` as a ``Counter``, read under the lock
- ``capabilities=``                    constructor option: report these instead of the inner's
                                       (a batch size or medium of the test's choosing)
- ``finished``, ``wait_finished(op, n)``  calls that returned (or raised), per op
"""

from __future__ import annotations

import enum
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from hicache.errors import BackendUnavailableError
from hicache.storage.backend import Backend, BackendConfig, Capabilities, PageParts, PageStatus

__all__ = ["FaultOp", "FaultyBackend"]

#: Byte written over a destination whose page is reported ``CORRUPT``/``FAILED`` (undefined bytes).
GARBAGE = 0xEE


class FaultOp(enum.StrEnum):
    """The data calls a fault can target (``exists`` covers ``exists_prefix``)."""

    EXISTS = "exists"
    GET = "get"
    PUT = "put"
    DELETE = "delete"


ALL_OPS: frozenset[FaultOp] = frozenset(FaultOp)


def _ops(ops: Iterable[FaultOp | str] | None) -> frozenset[FaultOp]:
    return ALL_OPS if ops is None else frozenset(FaultOp(o) for o in ops)


class FaultyBackend(Backend):
    """Wraps ``inner`` and injects faults (see the module docstring)."""

    config_model = BackendConfig

    def __init__(
        self,
        inner: Backend,
        *,
        latency_s: float = 0.0,
        capabilities: Capabilities | None = None,
    ) -> None:
        super().__init__(BackendConfig(), inner.context)
        self.inner = inner
        self.latency_s = latency_s
        self._capabilities = capabilities
        self._open_error: Callable[[], Exception] | None = None
        self._lock = threading.Condition()
        self._key_faults: dict[str, tuple[PageStatus, frozenset[FaultOp]]] = {}
        self._call_fail_left: int | None = 0
        self._call_fail_ops: frozenset[FaultOp] = ALL_OPS
        self._call_error: Callable[[], Exception] = _unavailable
        self._hang_event: threading.Event | None = None
        self._hang_ops: frozenset[FaultOp] = ALL_OPS
        self._hang_left: int | None = None
        self._hang_keys: frozenset[str] | None = None
        self._hang_after = False
        self._hung_now = 0
        self._vanish: set[str] = set()
        self._damage: Callable[[Backend, str], None] | None = None
        self._damaged: set[str] = set()
        self._evicted: list[str] = []
        self.calls: Counter[str] = Counter()
        self.finished: Counter[str] = Counter()
        self.put_log: list[str] = []
        self.get_log: list[str] = []
        self.injected: Counter[str] = Counter()

    # ------------------------------------------------------------------ knobs

    def fail_keys(
        self,
        keys: Iterable[str],
        status: PageStatus = PageStatus.FAILED,
        ops: Iterable[FaultOp | str] = (FaultOp.GET, FaultOp.PUT),
    ) -> None:
        """Report ``status`` for ``keys`` on the given ops (``FAILED`` on put whatever it is)."""
        if status not in (PageStatus.FAILED, PageStatus.CORRUPT):
            raise ValueError(f"fail_keys injects FAILED or CORRUPT, not {status}")
        chosen = _ops(ops)
        with self._lock:
            for key in keys:
                self._key_faults[key] = (status, chosen)

    def fail_calls(
        self,
        n: int | None = None,
        error: Callable[[], Exception] | None = None,
        ops: Iterable[FaultOp | str] | None = None,
    ) -> None:
        """Make the next ``n`` calls on ``ops`` raise ``error()``; ``n=None``: every call."""
        with self._lock:
            self._call_fail_left = n
            self._call_fail_ops = _ops(ops)
            self._call_error = error or _unavailable

    def hang(
        self,
        ops: Iterable[FaultOp | str] | None = None,
        count: int | None = None,
        keys: Iterable[str] | None = None,
        *,
        after: bool = False,
    ) -> threading.Event:
        """Block calls on ``ops`` (only the next ``count`` ones, only those naming one of
        ``keys``, when given) until the returned event is set (then they proceed). ``after``:
        block once the inner call returned (its pages stored or read), before returning it: its
        result comes after whatever the test does meanwhile."""
        event = threading.Event()
        with self._lock:
            self._hang_event = event
            self._hang_ops = _ops(ops)
            self._hang_left = count
            self._hang_keys = None if keys is None else frozenset(keys)
            self._hang_after = after
        return event

    def clear_key_faults(self) -> None:
        """Forget every fault set with :meth:`fail_keys`."""
        with self._lock:
            self._key_faults.clear()

    def fail_open(self, error: Callable[[], Exception] | None) -> None:
        """Make ``open()`` raise ``error()`` (before the inner backend is opened); ``None``
        lets it open again."""
        with self._lock:
            self._open_error = error

    def put_counts(self) -> Counter[str]:
        """How often each key was put (``put_log`` counted under the lock: workers may put)."""
        with self._lock:
            return Counter(self.put_log)

    def wait_finished(self, op: FaultOp | str, n: int, timeout: float = 30.0) -> bool:
        """Wait until ``n`` calls on ``op`` returned or raised; ``False`` on timeout."""
        name = FaultOp(op).value
        with self._lock:
            return self._lock.wait_for(lambda: self.finished[name] >= n, timeout)

    def _exit(self, op: FaultOp) -> None:
        with self._lock:
            self.finished[op.value] += 1
            self._lock.notify_all()

    def wait_hung(self, n: int = 1, timeout: float = 30.0) -> bool:
        """Wait until at least ``n`` calls are blocked in :meth:`hang`; ``False`` on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._hung_now >= n, timeout)

    @property
    def hung_now(self) -> int:
        """Calls currently blocked in a hang."""
        with self._lock:
            return self._hung_now

    def evict(self, keys: Iterable[str]) -> None:
        """Drop ``keys`` from the inner backend now and report them through ``take_evicted``."""
        keys = list(keys)
        if keys:
            self.inner.delete(keys)
        with self._lock:
            self._evicted.extend(keys)

    def vanish_on_get(self, keys: Iterable[str]) -> None:
        """Let ``exists`` see ``keys``, then drop each right before it is read."""
        with self._lock:
            self._vanish.update(keys)

    def damage_on_get(self, damage: Callable[[Backend, str], None] | None) -> None:
        """Before each key is first read, call ``damage(inner, key)`` (once per key) to harm
        the stored page in place; ``None`` stops it."""
        with self._lock:
            self._damage = damage
            self._damaged.clear()

    def heal(self) -> None:
        """Clear every fault (latency, key faults, call and open failures, vanishing keys,
        damage on get) and release any hang."""
        with self._lock:
            self.latency_s = 0.0
            self._damage = None
            self._open_error = None
            self._key_faults.clear()
            self._call_fail_left = 0
            self._vanish.clear()
            event, self._hang_event = self._hang_event, None
        if event is not None:
            event.set()

    # ------------------------------------------------------------------ the injection

    def _enter(self, op: FaultOp, keys: Sequence[str]) -> threading.Event | None:
        """Count the call and inject its faults; return the hang to wait on once the inner call
        returned (``hang(after=True)``), if any."""
        with self._lock:
            self.calls[op.value] += 1
            latency = self.latency_s
            event = self._hang_event if op in self._hang_ops else None
            if self._hang_keys is not None and self._hang_keys.isdisjoint(keys):
                event = None  # a hang for chosen keys: this call names none of them
            if event is not None and self._hang_left is not None:
                if self._hang_left <= 0:
                    event = None
                else:
                    self._hang_left -= 1
            raise_now: Exception | None = None
            if op in self._call_fail_ops and self._call_fail_left != 0:
                if self._call_fail_left is not None:
                    self._call_fail_left -= 1
                raise_now = self._call_error()
                self.injected["call_error"] += 1
            if event is not None and event.is_set():
                event = None
            after = event if self._hang_after else None
        if latency > 0:
            time.sleep(latency)
        if after is None:
            self._hold(event)
        if raise_now is not None:
            raise raise_now
        return after

    def _hold(self, event: threading.Event | None) -> None:
        """Block on a hang until it is released (``hung_now`` counts the call meanwhile)."""
        if event is None:
            return
        with self._lock:
            self._hung_now += 1
            self.injected["hang"] += 1
            self._lock.notify_all()
        try:
            event.wait()
        finally:
            with self._lock:
                self._hung_now -= 1
                self._lock.notify_all()

    def _key_fault(self, key: str, op: FaultOp) -> PageStatus | None:
        fault = self._key_faults.get(key)
        if fault is None or op not in fault[1]:
            return None
        return fault[0]

    # ------------------------------------------------------------------ Backend hooks

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities or self.inner.capabilities

    def _open(self) -> None:
        with self._lock:
            error = self._open_error
        if error is not None:
            raise error()
        self.inner.open()

    def _close(self) -> None:
        self.heal()  # never leave a worker blocked on a closed wrapper
        self.inner.close()

    def _exists(self, keys: Sequence[str]) -> list[bool]:
        try:
            after = self._enter(FaultOp.EXISTS, keys)
            found = self.inner.exists(keys)
            self._hold(after)
            return found
        finally:
            self._exit(FaultOp.EXISTS)

    def _exists_prefix(self, keys: Sequence[str]) -> int:
        try:
            after = self._enter(FaultOp.EXISTS, keys)
            found = self.inner.exists_prefix(keys)
            self._hold(after)
            return found
        finally:
            self._exit(FaultOp.EXISTS)

    def _put(self, keys: Sequence[str], srcs: Sequence[PageParts]) -> list[PageStatus]:
        try:
            return self._put_faulty(keys, srcs)
        finally:
            self._exit(FaultOp.PUT)

    def _get_into(self, keys: Sequence[str], dsts: Sequence[PageParts]) -> list[PageStatus]:
        try:
            return self._get_faulty(keys, dsts)
        finally:
            self._exit(FaultOp.GET)

    def _delete(self, keys: Sequence[str]) -> None:
        try:
            after = self._enter(FaultOp.DELETE, keys)
            self.inner.delete(keys)
            self._hold(after)
        finally:
            self._exit(FaultOp.DELETE)

    def _put_faulty(self, keys: Sequence[str], srcs: Sequence[PageParts]) -> list[PageStatus]:
        after = self._enter(FaultOp.PUT, keys)
        out: list[PageStatus | None] = [None] * len(keys)
        pass_keys: list[str] = []
        pass_srcs: list[PageParts] = []
        where: list[int] = []
        with self._lock:
            self.put_log.extend(keys)
            for i, key in enumerate(keys):
                if self._key_fault(key, FaultOp.PUT) is not None:
                    out[i] = PageStatus.FAILED
                    self.injected["put_failed"] += 1
                else:
                    pass_keys.append(key)
                    pass_srcs.append(srcs[i])
                    where.append(i)
        if pass_keys:
            for i, status in zip(where, self.inner.put(pass_keys, pass_srcs), strict=True):
                out[i] = status
        self._hold(after)
        return [s if s is not None else PageStatus.FAILED for s in out]

    def _get_faulty(self, keys: Sequence[str], dsts: Sequence[PageParts]) -> list[PageStatus]:
        after = self._enter(FaultOp.GET, keys)
        out: list[PageStatus | None] = [None] * len(keys)
        with self._lock:
            self.get_log.extend(keys)
            vanished = [k for k in keys if k in self._vanish]
            self._vanish.difference_update(vanished)
            for i, key in enumerate(keys):
                status = self._key_fault(key, FaultOp.GET)
                if status is not None:
                    out[i] = status
                    self.injected[f"get_{status.value}"] += 1
        if vanished:
            self.inner.delete(vanished)
            with self._lock:
                self.injected["vanished"] += len(vanished)
        self._damage_stored(keys)
        where = [i for i, s in enumerate(out) if s is None]
        if where:
            got = self.inner.get_into([keys[i] for i in where], [dsts[i] for i in where])
            for i, status in zip(where, got, strict=True):
                out[i] = status
        for i, status in enumerate(out):
            if status is PageStatus.CORRUPT or status is PageStatus.FAILED:
                for region in dsts[i]:  # "undefined" contents
                    region.cast("B")[:] = bytes([GARBAGE]) * region.nbytes
        self._hold(after)
        return [s if s is not None else PageStatus.FAILED for s in out]

    def _damage_stored(self, keys: Sequence[str]) -> None:
        with self._lock:
            damage = self._damage
            fresh = [k for k in keys if k not in self._damaged] if damage is not None else []
            self._damaged.update(fresh)
        if damage is None:
            return
        present = self.inner.exists(fresh) if fresh else []
        for key, there in zip(fresh, present, strict=True):
            if there:
                damage(self.inner, key)
                with self._lock:
                    self.injected["damaged"] += 1

    def take_evicted(self) -> list[str]:
        with self._lock:
            mine, self._evicted = self._evicted, []
        return mine + self.inner.take_evicted()

    def _stats(self) -> Mapping[str, Any]:
        with self._lock:
            injected = dict(self.injected)
        return {"inner": self.inner.stats(), "injected": injected}


def _unavailable() -> Exception:
    return BackendUnavailableError("injected fault: backend unavailable")
