"""One serving instance of the cross-instance test, run as its own process.

    python s3_cache_peer.py publish|prefetch CONFIG.yaml NUM_PAGES

``publish`` computes NUM_PAGES pages of KV (seeded random bytes) for a fixed prompt, inserts them
in its HiRadixCache (write-through to L2, then published to the S3 tier) and waits until the
tier has them; ``prefetch`` starts cold, prefetches the same prompt from S3 into L2, loads it
back to L1 and reads the pages. Both print one JSON line: page digests and counters.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch

from hicache.config import load_config
from hicache.hiradix import HiRadixCache


def page_digests(cache: HiRadixCache, pages: list[int]) -> list[str]:
    out = []
    for p in pages:
        raw = cache.device_pool.read_page(p).contiguous().view(torch.uint8).numpy().tobytes()
        out.append(hashlib.sha256(raw).hexdigest())
    return out


def main() -> int:
    role, config_path, num_pages = sys.argv[1], sys.argv[2], int(sys.argv[3])
    config = load_config(config_path)
    cache = HiRadixCache.from_config(config, device_pages=4 * num_pages, device="cpu")
    ps = cache.page_size
    tokens = list(range(1000, 1000 + num_pages * ps))
    result: dict[str, object] = {"role": role}
    try:
        if role == "publish":
            pages = cache.device_pool.alloc(num_pages)
            assert pages is not None
            gen = torch.Generator().manual_seed(1234)
            layout = cache.device_pool.layout
            for p in pages:
                kv = torch.randn(layout.page_shape, generator=gen).to(layout.dtype)
                cache.device_pool.write_page(p, kv)
            cache.insert(tokens, pages)
            cache.writing_check()
            assert cache.storage is not None and cache.storage.wait_idle(timeout=60)
            cache.writing_check()
            result["digests"] = page_digests(cache, pages)
        else:
            handle = cache.prefetch_from_storage(tokens)
            assert handle is not None, "nothing to prefetch"
            result["inserted_tokens"] = cache.check_prefetch(handle, wait=True)
            match = cache.match_prefix(tokens)
            result["host_hit_pages"] = match.host_hit_pages
            device = cache.load_back(match.last_host_node) if match.host_hit_pages else []
            result["digests"] = page_digests(cache, list(device or []))
        result["tiers"] = cache.tiers.stats() if cache.tiers is not None else {}
    finally:
        cache.close()
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
