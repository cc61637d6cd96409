"""Random interleavings of insert / match / write_backup / partial acks / storage completions
(with injected failures) / evictions / prefetches / load backs, checked against a plain model
after every step.

The first tier ("flaky") also goes down (``BackendUnavailableError``: retried, then its circuit
breaker opens; a fake clock lets a probe close it) and hangs past its deadline (the engine stops
waiting, the pages stay held until the call returns); the fragment invariants still hold, no
tail is announced on a tier without its head, and every acked page reaches each tier at most
once per residency there (a page a tier lost, or never announced, may be republished ahead of a
fragment below it, never one announced on the tier and still there) and every page offered to
a tier is either handed over or counted as dropped."""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from collections.abc import Sequence

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hicache.config import TierSettings
from hicache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, Medium
from hicache.hiradix import HiRadixCache, PrefetchHandle, WritePolicy
from hicache.keys import ModelIdentity, block_id, chain_hashes, seed_hash, storage_key
from hicache.pools import DevicePool, HostPool, KVLayout
from hicache.radix import TreeNode
from hicache.storage.backend import Capabilities, PageStatus
from hicache.storage.memory import MemoryBackend
from hicache.testing.backends import faulty_memory, shared_store_name
from hicache.testing.clock import ManualClock
from hicache.testing.faults import FaultOp, FaultyBackend
from hicache.tiering.engine import EnginePoll, PublishGroup, PublishPage
from hicache.tiering.tiers import Tier, Tiers
from hicache.transfer import ManualTransferEngine

PS = 2
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, page_size=PS, dtype=torch.float32)
IDENTITY = ModelIdentity("sm-model")
SEED = seed_hash(IDENTITY)
NS = LAYOUT.namespace_spec().namespace()
DEVICE_PAGES = 8
HOST_PAGES = 10
#: Deadline of the flaky tier's calls: only ever reached by calls the machine makes hang.
FLAKY_DEADLINE_S = 0.05
BREAKER_COOLDOWN_S = 10.0


def kv_for(prefix: Sequence[int]) -> torch.Tensor:
    """The KV a model computes for the last page of ``prefix``: a function of the whole prefix."""
    h = hash(tuple(prefix)) & 0xFFFF_FFFF_FFFF_FFFF
    vals = [float((h >> (4 * i)) & 0xFFFF) for i in range(16)]
    return torch.tensor(vals, dtype=torch.float32).view(LAYOUT.page_shape)


def stored_keys(backend: FaultyBackend) -> set[str]:
    """Keys the tier holds now (its store is this tier's alone: put and not dropped since)."""
    return {page.key for page in backend.inner.iter_pages()}


class Spy(HiRadixCache):
    """Records finished acks (their pages in order) for the model."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.submitted: dict[int, list[int]] = {}  # ack -> original tokens (full prefix)
        self.finished: list[tuple[int, list[bytes], int | None]] = []  # ack, hashes, parent id
        self.finish_count: Counter[int] = Counter()
        self.prefetch_events: list[tuple[int, int | None]] = []
        self._in_prefetch = False
        # what the model sees of the storage side, recorded on the cache's thread as it happens
        #: medium -> block ids announced on that tier and not removed since
        self.tier_resident: dict[str, set[int]] = {}
        self.acked_keys: set[str] = set()
        #: keys of pages inserted into L2 by a prefetch (read from a tier, not acked here)
        self.read_keys: set[str] = set()
        #: (tier, key) -> publishes handed to the engine
        self.tier_publishes: Counter[tuple[str, str]] = Counter()
        #: publishes of pages not acked (nor read in) at that moment: must stay empty
        self.early_publishes: list[str] = []
        #: republishes of an ancestor to a tier that announced it and still holds it: must stay
        #: empty (an ack's own pages go to every tier, once per ack: a page acked again after
        #: an L2 eviction is put again, and a tier that holds it answers ALREADY_EXISTS)
        self.resident_publishes: list[tuple[str, str]] = []
        #: (tier, block id) -> page a tier acknowledged (a put result with a stored status,
        #: in time or after the deadline) whose announcement the model still waits for: its
        #: parent's is undecided, or its parent is not announced on the tier (yet)
        self.awaiting_announce: dict[tuple[str, int], PublishPage] = {}
        #: acknowledged pages still on the tier whose parent is announced there but which are
        #: not: empty
        self.unannounced_acks: list[tuple[str, int]] = []
        assert self.storage is not None
        storage = self.storage
        real_publish, real_poll = storage.publish, storage.poll
        announcer = storage.announcer
        real_record, real_late, real_removed = (
            announcer.record,
            announcer.acked_late,
            announcer.removed,
        )
        #: what the announcer was told, in order: (tier, pages, statuses, mark) for an ack (on
        #: time or late; mark: how many removals of the tier the announcer had been told of
        #: when the put was handed out), (tier, block ids, None, 0) for pages that left the tier
        recorded: list[tuple[str, list[PublishPage] | list[int], list[PageStatus] | None, int]] = []
        #: tier -> the block ids of each removal the announcer was told of, in order
        removals: dict[str, list[set[int]]] = {t.name: [] for t in storage.tiers.tiers}

        def record(group: int, tier: str, batch: int, statuses: list[PageStatus]) -> None:
            g = announcer.groups[group]
            recorded.append((tier, g.batches[batch], statuses, g.marks.get((tier, batch), 0)))
            real_record(group, tier, batch, statuses)

        def acked_late(
            tier: str,
            pages: list[PublishPage],
            statuses: list[PageStatus],
            events: list[KVEvent],
            mark: int,
        ) -> None:
            recorded.append((tier, pages, statuses, mark))
            real_late(tier, pages, statuses, events, mark)

        def removed(tier: str, block_ids: list[int]) -> None:
            recorded.append((tier, block_ids, None, 0))
            removals[tier].append(set(block_ids))
            real_removed(tier, block_ids)
            # a mark counts the removals told before it
            assert announcer.evictions[tier].seq == len(removals[tier])

        def check_acks_announced() -> None:
            """After a poll: every page a tier acknowledged (and did not drop since) is
            announced there in this residency once its parent is (in prefix order)."""
            for tier, items, statuses, mark in recorded:
                if statuses is None:
                    for bid in items:
                        assert isinstance(bid, int)
                        self.awaiting_announce.pop((tier, bid), None)
                    continue
                # a page the tier reported removed after this put was handed out: that removal
                # may have taken what this put stored (its report raced ahead of this result),
                # so the ack does not announce it (the safe side: never announced while gone)
                gone = set().union(*removals[tier][mark:])
                for p, status in zip(items, statuses, strict=False):
                    assert isinstance(p, PublishPage)
                    if status.stored and p.block_id not in gone:
                        self.awaiting_announce[(tier, p.block_id)] = p
            recorded.clear()
            medium = {t.name: t.medium for t in storage.tiers.tiers}
            for (tier, bid), p in list(self.awaiting_announce.items()):
                resident = self.tier_resident.get(medium[tier], set())
                parent = p.parent_block_id
                if bid not in resident:
                    if parent is not None and announcer.unresolved[tier][parent] > 0:
                        continue  # the parent's own publish is undecided: so is this page
                    if parent is not None and parent not in resident:
                        continue  # announced once its parent is, if still there then
                    self.unannounced_acks.append((tier, bid))
                del self.awaiting_announce[(tier, bid)]

        def publish(
            group: PublishGroup,
            pages: Sequence[PublishPage],
            *,
            targets: Sequence[Tier] | None = None,
            admit: bool = True,
        ) -> list[Tier]:
            for t in storage.tiers.publishing if targets is None else targets:
                resident = self.tier_resident.get(t.medium, set())
                for p in pages:
                    self.tier_publishes[(t.name, p.key)] += 1
                    if targets is not None and p.block_id in resident:
                        self.resident_publishes.append((t.name, p.key))
            self.early_publishes += [
                p.key for p in pages if p.key not in self.acked_keys | self.read_keys
            ]
            return real_publish(group, pages, targets=targets, admit=admit)

        def poll() -> EnginePoll:
            out = real_poll()
            for e in out.events:
                if isinstance(e, BlockStored):
                    self.tier_resident.setdefault(e.medium, set()).update(e.block_hashes)
                elif isinstance(e, BlockRemoved):
                    self.tier_resident.setdefault(e.medium, set()).difference_update(e.block_hashes)
            check_acks_announced()
            return out

        storage.publish = publish  # type: ignore[method-assign]
        storage.poll = poll  # type: ignore[method-assign]
        announcer.record = record  # type: ignore[method-assign]
        announcer.acked_late = acked_late  # type: ignore[method-assign]
        announcer.removed = removed  # type: ignore[method-assign]

    def _insert_prefetched(self, handle: PrefetchHandle, ok: int) -> int:
        self._in_prefetch = True
        try:
            return super()._insert_prefetched(handle, ok)
        finally:
            self._in_prefetch = False

    def _emit_stored(self, node: TreeNode, medium: str) -> None:
        if self._in_prefetch and medium == Medium.CPU_PINNED:
            ids = [block_id(h) for h in self.node_hashes(node)]
            self.prefetch_events += zip(ids, [self.parent_block_hash(node), *ids[:-1]], strict=True)
            self.read_keys.update(storage_key(h) for h in self.node_hashes(node))
        super()._emit_stored(node, medium)

    def _full_prefix(self, node: TreeNode) -> list[int]:
        out: list[int] = []
        cur: TreeNode | None = node
        while cur is not None and cur is not self.root:
            out[:0] = cur.key
            cur = cur.parent
        return out

    def write_backup(self, node: TreeNode) -> int | None:
        ack = super().write_backup(node)
        if ack is not None:
            self.submitted[ack] = self._full_prefix(node)
        return ack

    def _finish_write_through_ack(self, ack_id: int) -> None:
        rec = self.ongoing_write_through[ack_id]
        frags = rec.publish_nodes
        # fragments are a chain and concatenate to the original range
        for a, b in itertools.pairwise(frags):
            assert b.parent is a
        assert self._full_prefix(frags[-1]) == self.submitted[ack_id]
        assert sum(len(f.key) for f in frags) == rec.pages
        hashes = [h for f in frags for h in self.node_hashes(f)]
        self.finished.append((ack_id, hashes, self.parent_block_hash(frags[0])))
        self.finish_count[ack_id] += 1
        self.acked_keys.update(storage_key(h) for h in hashes)
        super()._finish_write_through_ack(ack_id)


tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=5).map(
    lambda pages: [t for p in pages for t in (p, p + 10)]
)


class HiRadixMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.names = [shared_store_name("sm") for _ in range(2)]
        self.flaky, self.steady = (
            faulty_memory(
                LAYOUT.page_bytes,
                namespace=NS,
                shared=name,
                capabilities=Capabilities(max_batch=2, default_medium=medium),
            )
            for name, medium in zip(self.names, ("DISK", "EXTERNAL"), strict=True)
        )
        # the faults the rules turned on for the flaky tier (the model's view of them)
        #: every call but deletes raises BackendUnavailableError before reaching storage
        self.flaky_down = False
        #: puts raise ConnectionError (an untranslated error: counted, never retried)
        self.flaky_raise_calls = False
        #: keys whose puts fail
        self.flaky_fail_keys: set[str] = set()
        #: while set, puts (and reads, when the rule said so) block past the tier's deadline
        self.flaky_hang: threading.Event | None = None
        #: every key the flaky tier dropped on its own
        self.flaky_evicted: set[str] = set()
        dev = DevicePool(LAYOUT, DEVICE_PAGES, "cpu")
        host = HostPool(LAYOUT, HOST_PAGES, pin=False)
        self.engine = ManualTransferEngine(dev, host)
        self.clock = ManualClock()
        self.flaky_tier = Tier(
            "flaky",
            self.flaky,
            TierSettings(
                deadline_s=FLAKY_DEADLINE_S,
                breaker_failures=2,
                breaker_cooldown_s=BREAKER_COOLDOWN_S,
                retry_attempts=2,
                retry_backoff_s=0.0,
            ),
            clock=self.clock,
        )
        self.cache = Spy(
            dev,
            host,
            self.engine,
            identity=IDENTITY,
            tiers=Tiers([self.flaky_tier, Tier("steady", self.steady)]),
            write_policy=WritePolicy.MANUAL,
            prefetch_threshold_tokens=PS,
            gpu_events=True,
            io_workers=2,
        )
        assert self.cache.storage is not None
        self.cache.storage.evict_poll_interval_s = 0.0  # learn the tiers' evictions at every poll
        self.events: list[KVEvent] = []
        self.handles: list[PrefetchHandle] = []
        self.seen: list[list[int]] = []

    def teardown(self) -> None:
        cache = getattr(self, "cache", None)
        if cache is None:
            return
        self.flaky_raise_calls = False
        self.heal_flaky()
        self.engine.complete_all()
        for h in self.handles:
            cache.check_prefetch(h, wait=True)
        self.handles.clear()
        # a finished prefetch walks its path, which backs up any device node there that an
        # earlier insert left without host pages (L2 was held by hung calls): that copy is
        # submitted only now, so it is completed before the checks
        self.engine.complete_all()
        self.settle()
        self.final_checks()
        cache.close()
        for n in self.names:
            MemoryBackend.drop_shared_store(n)

    # ------------------------------------------------------------------ helpers

    def pick(self, data: st.DataObject) -> list[int]:
        """Mostly a cut of an earlier sequence plus new pages (splits!), sometimes fresh."""
        if self.seen and data.draw(st.integers(0, 3)):
            base = data.draw(st.sampled_from(self.seen))
            cut = data.draw(st.integers(1, len(base) // PS))
            tail = data.draw(st.one_of(st.just([]), tokens_st))
            return (base[: cut * PS] + tail)[: 6 * PS]
        return data.draw(tokens_st)

    def drain(self) -> None:
        self.events += self.cache.take_events()

    def settle(self) -> None:
        self.cache.writing_check()
        assert self.cache.storage is not None
        # with a hang in place the holds of hung calls stay: wait for the jobs only
        assert self.cache.storage.wait_idle(timeout=30, holds=self.flaky_hang is None)
        self.cache.writing_check()
        self.drain()

    def heal_flaky(self) -> None:
        """End every outage and hang; let the breaker probe again."""
        self.flaky_down = False
        self.apply_call_faults()
        hang, self.flaky_hang = self.flaky_hang, None
        if hang is not None:
            hang.set()
        self.clock.advance(BREAKER_COOLDOWN_S)

    def apply_call_faults(self) -> None:
        """Hand the flaky tier the whole-call fault the flags ask for (an outage first: its
        calls never reach storage)."""
        if self.flaky_down:
            self.flaky.fail_calls(None, ops=[FaultOp.EXISTS, FaultOp.GET, FaultOp.PUT])
        elif self.flaky_raise_calls:
            self.flaky.fail_calls(None, lambda: ConnectionError("injected"), [FaultOp.PUT])
        else:
            self.flaky.fail_calls(0)

    def faults_active(self) -> bool:
        return bool(
            self.flaky_down
            or self.flaky_hang is not None
            or self.flaky_fail_keys
            or self.flaky_raise_calls
            or self.flaky_tier.breaker.would_refuse()
        )

    # ------------------------------------------------------------------ rules

    @rule(data=st.data())
    def insert(self, data: st.DataObject) -> None:
        tokens = self.pick(data)
        if tokens not in self.seen:
            self.seen.append(tokens)
        n = len(tokens) // PS
        pages = self.cache.device_pool.alloc(n)
        if pages is None:
            self.cache.evict(n - self.cache.device_pool.available)
            pages = self.cache.device_pool.alloc(n)
            if pages is None:
                return
        for j, p in enumerate(pages):
            self.cache.device_pool.write_page(p, kv_for(tokens[: (j + 1) * PS]))
        dup = self.cache.insert(tokens, pages)
        self.cache.device_pool.free(pages[: dup // PS])

    @rule(data=st.data())
    def match(self, data: st.DataObject) -> None:
        self.check_match(self.pick(data))

    def check_match(self, tokens: list[int]) -> None:
        r = self.cache.match_prefix(tokens)
        for j, p in enumerate(r.device_pages):
            assert torch.equal(self.cache.device_pool.read_page(p), kv_for(tokens[: (j + 1) * PS]))

    @rule(data=st.data())
    def write_backup(self, data: st.DataObject) -> None:
        r = self.cache.match_prefix(self.pick(data))
        # back up the whole matched device path, parents first
        path = []
        node = r.last_node
        while node is not self.cache.root:
            path.append(node)
            assert node.parent is not None
            node = node.parent
        for node in reversed(path):
            self.cache.write_backup(node)

    @precondition(lambda self: bool(self.engine.pending()))
    @rule(data=st.data())
    def complete_one_ack(self, data: st.DataObject) -> None:
        self.engine.complete(data.draw(st.sampled_from(self.engine.pending())))

    @rule(settle=st.booleans())
    def writing_check(self, settle: bool) -> None:
        if settle:
            self.settle()
        else:
            self.cache.writing_check()
            self.drain()

    @rule(data=st.data(), keys=st.booleans(), calls=st.booleans())
    def inject_failures(self, data: st.DataObject, keys: bool, calls: bool) -> None:
        """Failing puts on the first tier: some keys, or whole calls, or neither."""
        self.flaky_raise_calls = calls
        self.apply_call_faults()
        self.flaky.clear_key_faults()
        self.flaky_fail_keys = set()
        if keys:
            known = {storage_key(h) for _, hs, _ in self.cache.finished for h in hs}
            for toks in self.cache.submitted.values():
                known |= {storage_key(h) for h in chain_hashes(SEED, toks, PS)}
            if known:
                self.flaky_fail_keys = data.draw(st.sets(st.sampled_from(sorted(known))))
                self.flaky.fail_keys(self.flaky_fail_keys, PageStatus.FAILED, [FaultOp.PUT])

    @rule(down=st.booleans())
    def outage(self, down: bool) -> None:
        """The flaky tier goes down (whole calls fail, retried, then its breaker opens), or
        comes back."""
        self.flaky_down = down
        self.apply_call_faults()

    @precondition(lambda self: self.flaky_hang is None)
    @rule(gets=st.booleans(), after=st.booleans())
    def hang_flaky(self, gets: bool, after: bool) -> None:
        """The flaky tier's puts (and reads) hang past their deadline until released: a read
        that timed out keeps its host pages held until it returns. ``after``: the hung calls
        did their work first (pages stored or read), so ``tier_evicts`` can drop those pages
        and the eviction be polled before the held result comes."""
        ops = [FaultOp.PUT, FaultOp.GET] if gets else [FaultOp.PUT]
        self.flaky_hang = self.flaky.hang(ops, after=after)

    @precondition(lambda self: self.flaky_hang is not None)
    @rule(data=st.data())
    def publish_while_hung(self, data: st.DataObject) -> None:
        """A write-through acked while the flaky tier's puts hang: its put there outlives the
        deadline (counted failed), and ``release_hang`` lets the tier store it after all: a
        late ack, announced then, after its parent."""
        self.insert(data)
        self.write_backup(data)
        for ack in list(self.engine.pending()):
            self.engine.complete(ack)
        self.cache.writing_check()
        self.drain()

    @precondition(lambda self: self.flaky_hang is not None)
    @rule()
    def release_hang(self) -> None:
        hang, self.flaky_hang = self.flaky_hang, None
        assert hang is not None
        hang.set()

    @precondition(lambda self: bool(stored_keys(self.flaky)))
    @rule(data=st.data())
    def tier_evicts(self, data: st.DataObject) -> None:
        """The flaky tier ages pages out on its own (a head hot in L1/L2 is never touched
        there): chains published below them later get the lost pages republished first."""
        stored = sorted(stored_keys(self.flaky))
        keys = data.draw(st.lists(st.sampled_from(stored), min_size=1, max_size=3, unique=True))
        self.flaky.evict(keys)
        self.flaky_evicted.update(keys)

    @rule()
    def cooldown_passes(self) -> None:
        """Time passes: an open breaker lets its next call through as a probe."""
        self.clock.advance(BREAKER_COOLDOWN_S)

    @rule(n=st.integers(1, 20))
    def evict_l1(self, n: int) -> None:
        self.cache.evict(n)

    @rule(n=st.integers(1, 20))
    def evict_l2(self, n: int) -> None:
        self.cache.evict_host(n)

    @rule(data=st.data(), wait=st.booleans())
    def prefetch(self, data: st.DataObject, wait: bool) -> None:
        tokens = self.pick(data)
        if wait:
            self.settle()  # so the stores are exactly what the model says
        handle = self.cache.prefetch_from_storage(tokens)
        if handle is None:
            return
        if not wait:
            self.handles.append(handle)
            return
        keys = [storage_key(h) for h in handle.hashes]
        n = 0
        flaky_stored, steady_stored = stored_keys(self.flaky), stored_keys(self.steady)
        while n < len(keys) and keys[n] in flaky_stored:
            n += 1
        while n < len(keys) and keys[n] in steady_stored:
            n += 1
        base_backed = handle.base is self.cache.root or handle.base.host_value is not None
        faulty = self.faults_active()
        got = self.cache.check_prefetch(handle, wait=True)
        assert got is not None
        if faulty:
            # an outage of the first tier sends the cascade to the second (which holds at least
            # what the first does) or fails a read: never more than the stores hold
            assert got % PS == 0 and 0 <= got <= n * PS
        elif base_backed:
            assert got == n * PS
        else:
            assert got in (0, n * PS)
        self.drain()

    @precondition(lambda self: bool(self.handles))
    @rule(data=st.data(), wait=st.booleans())
    def check_prefetch(self, data: st.DataObject, wait: bool) -> None:
        handle = data.draw(st.sampled_from(self.handles))
        got = self.cache.check_prefetch(handle, wait=wait)
        if got is not None:
            self.handles.remove(handle)
        self.drain()

    @rule(data=st.data())
    def load_back(self, data: st.DataObject) -> None:
        tokens = self.pick(data)
        r = self.cache.match_prefix(tokens)
        if r.host_hit_pages:
            self.cache.load_back(r.last_host_node)
            self.check_match(tokens)

    # ------------------------------------------------------------------ invariants

    def quiesce(self) -> None:
        """Let storage workers finish without collecting: results (and the page holds they
        release) wait for the next poll by the cache, so every run of a step sequence sees
        the same state (hypothesis needs determinism)."""
        assert self.cache.storage is not None
        assert self.cache.storage.wait_idle(timeout=30, holds=self.flaky_hang is None)

    @invariant()
    def tree_is_consistent(self) -> None:
        if not hasattr(self, "cache"):
            return
        self.quiesce()
        cache = self.cache
        dev_pages: list[int] = []
        host_pages: list[int] = []
        evictable = protected = 0
        locks: Counter[int] = Counter()
        for rec in cache.ongoing_write_through.values():
            node: TreeNode | None = rec.lock_node
            while node is not None and node is not cache.root:
                locks[node.id] += 1
                node = node.parent

        def walk(node: TreeNode, prefix: list[int]) -> None:
            nonlocal evictable, protected
            for first, child in node.children.items():
                assert child.parent is node and cache.first_page(child) == first
                assert child.key and len(child.key) % PS == 0
                full = prefix + child.key
                npages = len(child.key) // PS
                assert child.value is not None or child.host_value is not None
                if child.value is not None:
                    # device nodes are ancestor-closed
                    assert node is cache.root or node.value is not None
                    assert len(child.value) == npages
                    dev_pages.extend(child.value)
                    if child.lock_ref:
                        protected += npages
                    else:
                        evictable += npages
                    for j, p in enumerate(child.value):
                        want = kv_for(full[: len(prefix) + (j + 1) * PS])
                        assert torch.equal(cache.device_pool.read_page(p), want)
                if child.host_value is not None:
                    # host copies are prefix-closed
                    assert node is cache.root or node.host_value is not None
                    assert len(child.host_value) == npages
                    host_pages.extend(child.host_value)
                    if child.write_through_pending_id is None:
                        for j, p in enumerate(child.host_value):
                            want = kv_for(full[: len(prefix) + (j + 1) * PS])
                            assert torch.equal(cache.host_pool.page_tensor(p), want)
                else:
                    assert child.write_through_pending_id is None
                # a node is locked exactly by the pending writes below it
                assert child.lock_ref == locks[child.id]
                walk(child, full)

        walk(cache.root, [])
        # host eviction's candidates hold every L2-only leaf, locked or not (so evict_host
        # picks what a walk of the whole tree would)
        l2_leaves = {
            n
            for n in cache.iter_nodes()
            if n.value is None and n.host_value is not None and not n.children
        }
        assert l2_leaves <= cache._host_leaves.nodes()
        # and L1 eviction's every device leaf
        l1_leaves = {
            n
            for n in cache.iter_nodes()
            if n.value is not None and all(c.value is None for c in n.children.values())
        }
        assert l1_leaves <= cache._device_leaves.nodes()
        # host locks: exactly the paths of the prefetches in flight
        pins: Counter[int] = Counter()
        for h in self.handles:
            pin: TreeNode | None = h.base
            while pin is not None and pin is not cache.root:
                pins[pin.id] += 1
                pin = pin.parent
        assert all(n.host_lock_ref == pins[n.id] for n in cache.iter_nodes())
        assert len(dev_pages) == len(set(dev_pages))
        assert len(host_pages) == len(set(host_pages))
        assert cache.evictable_pages == evictable and cache.protected_pages == protected
        # every allocated device page is in the tree
        assert DEVICE_PAGES - cache.device_pool.available == len(dev_pages)
        # every allocated host page is in the tree, in a prefetch, or waiting for its free
        in_prefetch = sum(len(h.host_pages) for h in self.handles)
        allocated = HOST_PAGES - cache.host_pool.available
        assert allocated == len(host_pages) + in_prefetch + cache.host_pool.pending_frees()

    @invariant()
    def events_follow_acks(self) -> None:
        if not hasattr(self, "cache"):
            return
        self.quiesce()
        self.drain()
        cache = self.cache
        # CPU_PINNED events: exactly the pages of finished acks and of inserted prefetches
        expected: Counter[tuple[int, int | None]] = Counter(cache.prefetch_events)
        for _, hashes, parent in cache.finished:
            ids = [block_id(h) for h in hashes]
            expected.update(zip(ids, [parent, *ids[:-1]], strict=True))
        # (a prefetched page below a pending write is announced after its ack: count it now)
        got: Counter[tuple[int, int | None]] = Counter()
        for e in [*self.events, *cache.ongoing_write_through.deferred_events()]:
            if isinstance(e, BlockStored) and e.medium == Medium.CPU_PINNED:
                ids = e.block_hashes  # a node's pages come as one event, chained in it
                got.update(zip(ids, [e.parent_block_hash, *ids[:-1]], strict=True))
        assert got == expected
        assert all(c == 1 for c in cache.finish_count.values())
        # nothing is published before its ack (or, as a republished ancestor, before it was
        # read in from a tier); each acked page is published once per ack, and again to a
        # tier only as a republished ancestor, never while announced on it and still there
        assert cache.early_publishes == []
        assert cache.resident_publishes == []
        acked = Counter(storage_key(h) for _, hs, _ in cache.finished for h in hs)
        assert cache.storage is not None
        counters = cache.storage.counters
        assert counters["published_pages"] == sum(acked.values())
        tiers = {t.name: t for t in cache.storage.tiers.tiers}
        for name, t in tiers.items():
            offered = sum(c for (tn, _), c in cache.tier_publishes.items() if tn == name)
            assert offered == sum(acked.values()) + t.stats.republished_pages
        assert counters["republished_pages"] == sum(
            t.stats.republished_pages for t in tiers.values()
        )
        for b in (self.flaky, self.steady):
            assert set(b.put_counts()) <= set(acked) | cache.read_keys
        # the healthy tier never loses a page: it never gets a republish
        assert self.steady.put_counts() - acked == Counter()
        assert tiers["steady"].stats.republished_pages == 0
        # a tier announces only pages it stored, never twice, and never a tail without its
        # head: inside an ack the parent was announced before; an ack's first page chains to a
        # page announced before or stored there before (read back from that tier)
        firsts = {block_id(hs[0]) for _, hs, _ in cache.finished}
        for b, evicted in ((self.flaky, self.flaky_evicted), (self.steady, set[str]())):
            stored = {block_id(k) for k in stored_keys(b) | evicted}  # ever stored
            medium = b.capabilities.default_medium
            announced: set[int] = set()  # announced on the tier and not removed since
            for e in self.events:
                if isinstance(e, BlockRemoved) and e.medium == medium:
                    announced.difference_update(e.block_hashes)
                if isinstance(e, BlockStored) and e.medium == medium:
                    bid = e.block_hashes[0]
                    assert bid in stored
                    assert bid not in announced
                    parent = e.parent_block_hash
                    if bid not in firsts:
                        assert parent in announced
                    elif parent is not None:
                        assert parent in announced or parent in stored
                    announced.add(bid)

    @invariant()
    def events_in_prefix_order_once_per_residency(self) -> None:
        """On every medium a block is announced only after its parent (an earlier event of the
        same batch included) and not removed since, and never twice in one residency."""
        if not hasattr(self, "cache"):
            return
        self.quiesce()
        self.drain()
        resident: dict[str, set[int]] = {}
        for e in self.events:
            if isinstance(e, AllBlocksCleared):
                resident.clear()
            elif isinstance(e, BlockRemoved):
                resident.setdefault(e.medium, set()).difference_update(e.block_hashes)
            elif isinstance(e, BlockStored):
                on = resident.setdefault(e.medium, set())
                parent = e.parent_block_hash
                for bid in e.block_hashes:
                    assert parent is None or parent in on, (e.medium, bid, parent)
                    assert bid not in on, (e.medium, bid)
                    on.add(bid)
                    parent = bid

    @invariant()
    def tier_acks_announced_once_per_residency(self) -> None:
        """Every page a tier acknowledged, in time or after its put's deadline (a hang
        released), is announced there once its parent is, unless the tier dropped it first
        (once per residency: see the invariant above)."""
        if not hasattr(self, "cache"):
            return
        assert self.cache.unannounced_acks == []

    def final_checks(self) -> None:
        cache = self.cache
        assert not cache.ongoing_write_through
        assert cache.protected_pages == 0
        assert cache.host_pool.total_holds() == 0
        assert cache.host_pool.pending_frees() == 0
        acked = Counter(storage_key(h) for _, hs, _ in cache.finished for h in hs)
        # the healthy tier got every acked page exactly once
        assert self.steady.put_counts() == acked
        # the flaky one at most as often plus its republishes (a call refused by an outage
        # never reached it), and every page offered to it (acked or republished) was either
        # handed to it or counted as dropped
        t = self.flaky_tier.stats.as_dict()
        assert sum(self.flaky.put_counts().values()) <= sum(acked.values()) + t["republished_pages"]
        dropped = t["dropped_breaker"] + t["dropped_backpressure"] + t["dropped_admission"]
        assert t["put_pages"] + dropped == sum(acked.values()) + t["republished_pages"]
        removed = [e for e in self.events if isinstance(e, BlockRemoved)]
        assert all(e.medium in (Medium.GPU, Medium.CPU_PINNED, "DISK") for e in removed)
        # the flaky tier's removals are exactly the pages it dropped on its own
        dropped_ids = {block_id(k) for k in self.flaky_evicted}
        assert {i for e in removed if e.medium == "DISK" for i in e.block_hashes} == dropped_ids
        # everything polled (the tiers' evictions too): no page is left announced on a tier
        # that no longer holds it (an eviction polled before the result of the put or read
        # that stored or found the page must not be followed by its announcement)
        for b in (self.flaky, self.steady):
            medium = b.capabilities.default_medium
            announced: set[int] = set()
            for e in self.events:
                if isinstance(e, BlockRemoved) and e.medium == medium:
                    announced.difference_update(e.block_hashes)
                elif isinstance(e, BlockStored) and e.medium == medium:
                    announced.update(e.block_hashes)
            held = {block_id(k) for k in stored_keys(b)}
            assert announced <= held, (medium, sorted(announced - held))


HiRadixMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestHiRadixStateMachine = HiRadixMachine.TestCase
