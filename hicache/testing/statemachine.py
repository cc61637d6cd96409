"""The kit's stateful test: random put/get/exists/delete/reopen sequences against a ``dict``.

``backend_state_machine(kit, options)`` builds a hypothesis ``RuleBasedStateMachine`` class for
one :class:`~hicache.testing.kit.BackendTests` subclass; ``BackendTests.test_state_machine`` runs
it. Each example uses a fresh namespace, so persistent backends start every example empty.
Evictions a capacity-managing backend reports through ``take_evicted()`` leave the model too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hicache.storage.backend import PageStatus
from hicache.testing.pages import CANARY

if TYPE_CHECKING:
    from hicache.testing.kit import BackendTests

__all__ = ["backend_state_machine"]

#: Distinct keys the machine draws from: few, so puts, gets and deletes collide often.
POOL_SIZE = 10


def backend_state_machine(
    kit: BackendTests, backend_options: dict[str, Any]
) -> type[RuleBasedStateMachine]:
    """A state machine class testing ``kit.backend_cls`` built with ``backend_options``."""
    pool = kit.keys(POOL_SIZE, "state-machine")
    index = st.integers(min_value=0, max_value=len(pool) - 1)
    batch = st.lists(index, max_size=4, unique=True)

    class BackendStateMachine(RuleBasedStateMachine):
        """Random put/get/exists/delete/reopen sequences checked against a dict."""

        def __init__(self) -> None:
            super().__init__()
            self.namespace = kit.fresh_namespace("sm")
            self.backend = kit.make_backend(backend_options, namespace=self.namespace)
            self.backend.open()
            self.model: dict[str, int] = {}

        def _drain_evicted(self) -> None:
            for key in self.backend.take_evicted():
                self.model.pop(key, None)

        @rule(idx=batch, variant=st.integers(0, 3))
        def put(self, idx: list[int], variant: int) -> None:
            keys = [pool[i] for i in idx]
            statuses = kit.put_pages(self.backend, keys, variant)
            for key, status in zip(keys, statuses, strict=True):
                if key in self.model:
                    assert status is PageStatus.ALREADY_EXISTS, (key, status)
                elif status is PageStatus.OK:
                    self.model[key] = variant
                else:
                    assert self.backend.capabilities.manages_capacity, (key, status)
            self._drain_evicted()

        @rule(idx=batch)
        def get(self, idx: list[int]) -> None:
            keys = [pool[i] for i in idx]
            statuses, bufs = kit.read_pages(self.backend, keys)
            for key, status, buf in zip(keys, statuses, bufs, strict=True):
                if key in self.model:
                    assert status is PageStatus.OK, (key, status)
                    assert buf == kit.page(key, self.model[key])
                else:
                    assert status is PageStatus.NOT_FOUND, (key, status)
                    assert buf.count(CANARY) == len(buf)

        @rule(idx=batch)
        def exists(self, idx: list[int]) -> None:
            keys = [pool[i] for i in idx]
            flags = [k in self.model for k in keys]
            assert self.backend.exists(keys) == flags
            expected = flags.index(False) if False in flags else len(flags)
            assert self.backend.exists_prefix(keys) == expected

        @rule(idx=batch)
        def delete(self, idx: list[int]) -> None:
            keys = [pool[i] for i in idx]
            self.backend.delete(keys)
            for key in keys:
                self.model.pop(key, None)
            self._drain_evicted()

        @precondition(lambda self: self.backend.capabilities.persistent)
        @rule()
        def reopen(self) -> None:
            self.backend.close()
            self.backend = kit.make_backend(backend_options, namespace=self.namespace)
            self.backend.open()

        @precondition(lambda self: self.backend.capabilities.listable)
        @rule()
        def listing(self) -> None:
            assert {p.key for p in self.backend.iter_pages()} == set(self.model)

        @invariant()
        def evictions_drained(self) -> None:
            self._drain_evicted()

        def teardown(self) -> None:
            self.backend.close()

    return BackendStateMachine
