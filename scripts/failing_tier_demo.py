"""Run two HiRadixCache instances over two tiers, one of which fails in every way, and print the
counters the storage side produced (plain JSON: what a metrics layer would export).

    .venv/bin/python scripts/failing_tier_demo.py [--requests N] [--seed S]

Tier ``shm`` is a healthy MemoryBackend. Tier ``remote`` is a MemoryBackend wrapped in
``hicache.testing.faults.FaultyBackend`` that, phase by phase: fails some pages, is down for a
while (whole calls raise ``BackendUnavailableError``: retries, then the breaker opens, then a
probe after the cool-down closes it), hangs past its deadline (the pages stay held until the
call returns), evicts pages on its own, and lets a page vanish between lookup and read.
Instance A serves requests with write-through; instance B (fresh L1/L2) prefetches them back.
Nothing reaches either cache's caller; the script checks that holds return to zero.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import uuid
from typing import Any

import torch

from hicache.config import TierSettings
from hicache.hiradix import HiRadixCache, WritePolicy
from hicache.keys import ModelIdentity, chain_hashes, seed_hash, storage_key
from hicache.pools import DevicePool, HostPool, KVLayout
from hicache.storage.backend import BackendContext, PageStatus
from hicache.storage.memory import MemoryBackend, MemoryConfig
from hicache.testing.faults import FaultOp, FaultyBackend
from hicache.tiering.tiers import Tier, Tiers
from hicache.transfer import CpuTransferEngine

PS = 16
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, page_size=PS, dtype=torch.float16)
IDENTITY = ModelIdentity("demo-model")


def build(names: dict[str, str], remote_wrapper: list[FaultyBackend]) -> HiRadixCache:
    ns = LAYOUT.namespace_spec().namespace()

    def mem(name: str, tier: str) -> MemoryBackend:
        ctx = BackendContext(page_bytes=LAYOUT.page_bytes, namespace=ns, tier_name=tier)
        return MemoryBackend(MemoryConfig(shared_name=name), ctx)

    remote = FaultyBackend(mem(names["remote"], "remote"))
    remote_wrapper.append(remote)
    tiers = Tiers(
        [
            Tier("shm", mem(names["shm"], "shm"), TierSettings(medium="CPU_SHM")),
            Tier(
                "remote",
                remote,
                TierSettings(
                    medium="EXTERNAL",
                    deadline_s=0.05,
                    breaker_failures=3,
                    breaker_cooldown_s=0.2,
                    max_inflight_bytes=24 * LAYOUT.page_bytes,
                    retry_attempts=2,
                    retry_backoff_s=0.001,
                    promote=True,
                ),
            ),
        ]
    )
    dev = DevicePool(LAYOUT, 512, "cpu")
    host = HostPool(LAYOUT, 1024, pin=False)
    cache = HiRadixCache(
        dev,
        host,
        CpuTransferEngine(dev, host),
        identity=IDENTITY,
        tiers=tiers,
        write_policy=WritePolicy.WRITE_THROUGH,
        prefetch_threshold_tokens=PS,
        gpu_events=False,
    )
    assert cache.storage is not None
    cache.storage.evict_poll_interval_s = 0.0
    return cache


def serve(cache: HiRadixCache, tokens: list[int]) -> None:
    """One request as an engine does it: reuse L1, load L2 hits back, compute and insert."""
    r = cache.match_prefix(tokens)
    if r.host_hit_pages:
        cache.load_back(r.last_host_node)
    n = len(tokens) // PS
    pages = cache.device_pool.alloc(n)
    if pages is None:
        cache.evict(n - cache.device_pool.available)
        pages = cache.device_pool.alloc(n)
        if pages is None:
            return
    dup = cache.insert(tokens, pages)
    cache.device_pool.free(pages[: dup // PS])
    cache.writing_check()


def requests(rng: random.Random, count: int) -> list[list[int]]:
    prompts = [[rng.randrange(50_000) for _ in range(4 * PS)] for _ in range(8)]
    out = []
    for _ in range(count):
        base = rng.choice(prompts)
        out.append(base + [rng.randrange(50_000) for _ in range(rng.randint(1, 4) * PS)])
    return out


def settle(cache: HiRadixCache) -> None:
    """Finish the storage work in flight (up to the deadlines of hung calls)."""
    assert cache.storage is not None
    for _ in range(3):
        cache.writing_check()
        cache.storage.wait_idle(30, holds=False)
    cache.writing_check()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    names = {t: "demo-" + uuid.uuid4().hex[:10] for t in ("shm", "remote")}
    wrappers: list[FaultyBackend] = []
    a = build(names, wrappers)
    remote = wrappers[0]
    reqs = requests(rng, args.requests)
    phases = 6
    per = max(1, len(reqs) // phases)
    t0 = time.perf_counter()
    for i, tokens in enumerate(reqs):
        phase = i // per
        if i % per == 0:
            if phase == 5:
                settle(a)  # the engine gives up on the hung puts at their deadline ...
            remote.heal()  # ... and only then do they return
            settle(a)  # each phase's faults meet that phase's publishes
            if phase == 1:  # some pages fail
                keys = [storage_key(h) for h in chain_hashes(seed_hash(IDENTITY), tokens, PS)]
                remote.fail_keys(keys[4:6], PageStatus.FAILED)
            elif phase == 2:  # an outage: whole calls fail (retried), the breaker opens
                remote.fail_calls(None)
            elif phase == 3:  # the outage ends: after the cool-down a probe closes the breaker
                time.sleep(0.25)
            elif phase == 4:  # hangs past the deadline; publishes beyond the bound are dropped
                remote.hang(ops=[FaultOp.PUT], count=2)
            elif phase == 5:  # the tier evicts on its own
                stored = [k for k in remote.put_log[:20]]
                remote.evict(stored)
        serve(a, tokens)
        if phase != 4:
            settle(a)  # one request at a time, as a lightly loaded server would see it
    remote.heal()
    settle(a)
    # a second instance, with its own (empty) shm tier, reads the remote tier back through the
    # cascade, promoting what it finds there into its shm tier; one page vanishes on the way
    b_wrappers: list[FaultyBackend] = []
    b = build({**names, "shm": "demo-" + uuid.uuid4().hex[:10]}, b_wrappers)
    b_remote = b_wrappers[0]
    for tokens in reqs[: len(reqs) // 2]:  # a page the remote tier holds, after its whole head
        chain = [storage_key(h) for h in chain_hashes(seed_hash(IDENTITY), tokens, PS)]
        if len(chain) > 4 and b_remote.inner.exists_prefix(chain) > 4:
            b_remote.vanish_on_get(chain[4:5])
            break
    prefetched = 0
    for tokens in reqs[: len(reqs) // 2]:
        handle = b.prefetch_from_storage(tokens)
        if handle is not None:
            prefetched += b.check_prefetch(handle, wait=True) or 0
        settle(b)
    settle(b)
    elapsed = time.perf_counter() - t0
    report: dict[str, Any] = {
        "requests": len(reqs),
        "seconds": round(elapsed, 3),
        "instance_a": a.stats()["storage"],
        "instance_b": b.stats()["storage"],
        "instance_b_prefetched_tokens": prefetched,
        "host_holds_after": [a.host_pool.total_holds(), b.host_pool.total_holds()],
        "remote_injected": dict(remote.injected),
    }
    print(json.dumps(report, indent=2, sort_keys=True))
    ok = report["host_holds_after"] == [0, 0]
    a.close()
    b.close()
    for n in names.values():
        MemoryBackend.drop_shared_store(n)
    for shm_tier in b.tiers or []:
        if shm_tier.name == "shm":
            shm_cfg = shm_tier.backend.config
            assert isinstance(shm_cfg, MemoryConfig) and shm_cfg.shared_name is not None
            MemoryBackend.drop_shared_store(shm_cfg.shared_name)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
