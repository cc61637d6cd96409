"""Capacity policies against plain reference models, and tail-first LRU's prefix closure."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hicache.errors import BackendCapacityError
from hicache.storage.eviction import CapacityPolicy, ClockSlots, TailFirstLRU

# ----------------------------------------------------------------------------- reference model


class ListLRU:
    """The obvious O(n) model: a list of (key, size), least recent first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: list[tuple[str, int]] = []

    @property
    def used(self) -> int:
        return sum(size for _, size in self.items)

    def _pop(self, key: str) -> bool:
        for i, (k, _) in enumerate(self.items):
            if k == key:
                del self.items[i]
                return True
        return False

    def add(self, keys: Sequence[str], sizes: Sequence[int]) -> None:
        for key, size in reversed(list(zip(keys, sizes, strict=True))):
            self._pop(key)
            self.items.append((key, size))

    def touch(self, keys: Sequence[str]) -> None:
        for key in reversed(keys):
            found = [item for item in self.items if item[0] == key]
            if found:
                self._pop(key)
                self.items.append(found[0])

    def remove(self, key: str) -> bool:
        return self._pop(key)

    def evict_for(self, nbytes: int) -> list[str]:
        victims = []
        while self.items and self.used + nbytes > self.capacity:
            victims.append(self.items.pop(0)[0])
        return victims


KEYS = [f"k{i}" for i in range(12)]
key_st = st.sampled_from(KEYS)
chain_st = st.lists(key_st, min_size=1, max_size=6, unique=True)
CAPACITY = 40


class LRUMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.policy = TailFirstLRU(CAPACITY)
        self.model = ListLRU(CAPACITY)

    @rule(chain=chain_st, data=st.data())
    def add(self, chain: list[str], data: st.DataObject) -> None:
        sizes = data.draw(st.lists(st.integers(0, 9), min_size=len(chain), max_size=len(chain)))
        self.policy.add(chain, sizes)
        self.model.add(chain, sizes)

    @rule(chain=chain_st)
    def touch(self, chain: list[str]) -> None:
        self.policy.touch(chain)
        self.model.touch(chain)

    @rule(key=key_st)
    def remove(self, key: str) -> None:
        assert self.policy.remove(key) == self.model.remove(key)

    @rule(nbytes=st.integers(0, CAPACITY))
    def evict_for(self, nbytes: int) -> None:
        victims = self.policy.evict_for(nbytes)
        assert victims == self.model.evict_for(nbytes)
        assert self.policy.used_bytes + nbytes <= CAPACITY or len(self.policy) == 0
        for victim in victims:
            assert victim not in self.policy

    @precondition(lambda self: len(self.policy) > 0)
    @rule(nbytes=st.integers(CAPACITY + 1, 2 * CAPACITY))
    def evict_too_much_refused(self, nbytes: int) -> None:
        before = self.policy.keys_by_recency()
        with pytest.raises(BackendCapacityError):
            self.policy.evict_for(nbytes)
        assert self.policy.keys_by_recency() == before

    @invariant()
    def matches_model(self) -> None:
        assert self.policy.keys_by_recency() == [k for k, _ in self.model.items]
        assert self.policy.used_bytes == self.model.used
        assert len(self.policy) == len(self.model.items)
        for key in KEYS:
            assert (key in self.policy) == any(k == key for k, _ in self.model.items)


TestTailFirstLRUModel = LRUMachine.TestCase


# ----------------------------------------------------------------------------- prefix closure

# A chain is a path in a tree of pages: its key names the whole path, as a content hash would, so
# two chains share exactly their common prefix.
path_st = st.lists(st.integers(0, 2), min_size=1, max_size=6)


def chain_of(path: Sequence[int]) -> list[str]:
    return ["/".join(map(str, path[: i + 1])) for i in range(len(path))]


op_st = st.one_of(
    st.tuples(st.just("add"), path_st),
    st.tuples(st.just("touch"), path_st),
    st.tuples(st.just("evict"), st.integers(0, 30)),
)


@given(ops=st.lists(op_st, max_size=60), capacity=st.integers(1, 30))
def test_tail_first_lru_keeps_every_added_chain_prefix_closed(
    ops: list[tuple[str, object]], capacity: int
) -> None:
    policy = TailFirstLRU(capacity)
    batches: list[list[str]] = []
    for op, arg in ops:
        if op == "add":
            chain = chain_of(arg)  # type: ignore[arg-type]
            policy.add(chain, [1 + len(k) % 3 for k in chain])
            batches.append(chain)
        elif op == "touch":
            # The cache touches the matched prefix of a request's chain.
            chain = chain_of(arg)  # type: ignore[arg-type]
            stored = 0
            while stored < len(chain) and chain[stored] in policy:
                stored += 1
            policy.touch(chain[:stored])
        else:
            policy.evict_for(min(int(arg), capacity))  # type: ignore[call-overload]
        for batch in batches:
            alive = [key in policy for key in batch]
            survivors = sum(alive)
            assert alive == [True] * survivors + [False] * (len(batch) - survivors), (batch, alive)


def test_plain_lru_order_would_strand_suffixes() -> None:
    # The reason for tail-first: the head of a chain is the last victim, not the first.
    policy = TailFirstLRU(3)
    policy.add(["a", "b", "c"], [1, 1, 1])
    assert policy.keys_by_recency() == ["c", "b", "a"]
    policy.add(["x"], [1])
    assert policy.evict_for(0) == ["c"]
    assert "a" in policy and "b" in policy


def test_lru_argument_checks() -> None:
    with pytest.raises(ValueError, match="capacity_bytes"):
        TailFirstLRU(0)
    policy = TailFirstLRU(10)
    with pytest.raises(ValueError, match="sizes"):
        policy.add(["a"], [1, 2])
    with pytest.raises(ValueError, match=">= 0"):
        policy.add(["a"], [-1])
    assert isinstance(policy, CapacityPolicy)
    assert policy.capacity_bytes == 10


def test_lru_concurrent_use_keeps_accounting_exact() -> None:
    policy = TailFirstLRU(1000)
    errors: list[BaseException] = []

    def worker(tid: int) -> None:
        try:
            for i in range(2000):
                chain = [f"t{tid}-{i % 50}-{j}" for j in range(4)]
                policy.evict_for(16)
                policy.add(chain, [4, 4, 4, 4])
                policy.touch(chain[:2])
                if i % 7 == 0:
                    policy.remove(chain[3])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    keys = policy.keys_by_recency()
    assert len(keys) == len(set(keys)) == len(policy)
    assert policy.used_bytes == 4 * len(keys) <= 1000 + 16


# ----------------------------------------------------------------------------- CLOCK


class ClockModel:
    """Textbook CLOCK over Python lists, one hand per range start."""

    def __init__(self, n: int) -> None:
        self.used = [False] * n
        self.ref = [False] * n
        self.pins = [0] * n
        self.hands = list(range(n))

    def choose(self, start: int, end: int) -> int | None:
        for slot in range(start, end):
            if not self.used[slot]:
                return slot
        hand = self.hands[start] if start <= self.hands[start] < end else start
        for _ in range(2 * (end - start)):
            slot = hand
            hand = start + (hand - start + 1) % (end - start)
            if self.pins[slot]:
                continue
            if self.ref[slot]:
                self.ref[slot] = False
                continue
            self.hands[start] = hand
            return slot
        self.hands[start] = hand
        return None


NUM_SLOTS, WAYS = 12, 4  # three sets of four ways
set_st = st.integers(0, NUM_SLOTS // WAYS - 1)
slot_st = st.integers(0, NUM_SLOTS - 1)


class ClockMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = ClockSlots(NUM_SLOTS)
        self.model = ClockModel(NUM_SLOTS)

    @rule(s=set_st)
    def claim(self, s: int) -> None:
        start, end = s * WAYS, (s + 1) * WAYS
        ref_before = list(self.model.ref[start:end])
        any_free = not all(self.model.used[start:end])
        any_cold = any(
            not r and not p for r, p in zip(ref_before, self.model.pins[start:end], strict=True)
        )
        expected = self.model.choose(start, end)
        if expected is None:
            with pytest.raises(BackendCapacityError):
                self.clock.claim(start, end)
            return
        slot, was_used = self.clock.claim(start, end)
        assert slot == expected
        assert start <= slot < end
        assert was_used == (not any_free)
        if any_free:
            assert not self.model.used[slot]
        else:
            assert self.model.pins[slot] == 0  # a pinned page is never the victim
        if not any_free and any_cold:
            # Second chance: a referenced slot is never the victim while a cold one exists.
            assert not ref_before[slot - start]
        self.model.used[slot] = True
        self.model.ref[slot] = True

    @rule(slot=slot_st)
    def touch(self, slot: int) -> None:
        self.clock.touch(slot)
        if self.model.used[slot]:
            self.model.ref[slot] = True

    @rule(slot=slot_st)
    def release(self, slot: int) -> None:
        self.clock.release(slot)
        self.model.used[slot] = False
        self.model.ref[slot] = False

    @rule(slot=slot_st)
    def mark_used(self, slot: int) -> None:
        self.clock.mark_used(slot)
        self.model.used[slot] = True
        self.model.ref[slot] = True

    @rule(slot=slot_st)
    def pin(self, slot: int) -> None:
        self.clock.pin(slot)
        self.model.pins[slot] += 1

    @rule(slot=slot_st)
    def unpin(self, slot: int) -> None:
        if self.model.pins[slot] == 0:
            with pytest.raises(ValueError):
                self.clock.unpin(slot)
        else:
            self.clock.unpin(slot)
            self.model.pins[slot] -= 1

    @invariant()
    def matches_model(self) -> None:
        assert self.clock.num_used == sum(self.model.used)
        for slot in range(NUM_SLOTS):
            assert self.clock.is_used(slot) == self.model.used[slot]


TestClockSlotsModel = ClockMachine.TestCase


def test_clock_choose_prefers_free_then_cold() -> None:
    clock = ClockSlots(8)
    assert clock.choose(4, 8) == 4  # free slots first
    for slot in range(4, 8):
        clock.mark_used(slot)
    # All referenced: one sweep clears them, the hand's own slot is the victim.
    assert clock.choose(4, 8) == 4
    clock.touch(5)
    # Hand now past 4 at 5: 5 is referenced again, so 6 (cold) is chosen.
    assert clock.choose(4, 8) == 6
    clock.release(7)
    assert clock.choose(4, 8) == 7
    assert clock.choose(0, 4) == 0  # another range is independent


def test_clock_pins_and_ranges() -> None:
    clock = ClockSlots(4)
    for slot in range(4):
        clock.mark_used(slot)
        clock.pin(slot)
    with pytest.raises(BackendCapacityError, match="pinned"):
        clock.choose(0, 4)
    clock.unpin(2)
    assert clock.choose(0, 4) == 2
    with pytest.raises(IndexError):
        clock.choose(2, 5)
    with pytest.raises(IndexError):
        clock.touch(4)
    with pytest.raises(ValueError):
        ClockSlots(0)
