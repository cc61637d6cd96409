"""TEST-ONLY: :class:`~hicache.integrations.vllm.HicacheTierManager` with every backend wrapped
in a :class:`~hicache.testing.faults.FaultyBackend`, so a test outside the engine process sees
which page keys reached each backend's ``put`` and ``get_into``, and can make a tier damage the
pages it is about to read.

Extra tier kwargs (taken out before hicache validates the rest):

- ``observe_log``      a JSON file rewritten after every finished job:
                       ``{tier: {"put": [...], "get": [...], "injected": {...}}}``
- ``observe_control``  a JSON file read before every lookup and load: ``{"damage": true}``
                       makes each backend overwrite the payload of every page it is asked for
                       (once per key) before reading it: rot at rest, which only checksums can
                       tell; ``{"lookup": false}`` makes this vLLM tier answer every lookup MISS
                       (so vLLM asks its next tier)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hicache.config import HicacheConfig
from hicache.integrations.vllm import HicacheTierManager
from hicache.storage import HEADER_SIZE, Backend
from hicache.testing.faults import FaultyBackend
from hicache.tiering.tiers import Tier, Tiers

#: What a damaged payload becomes: every float of K and V a small constant, so attention over
#: the damaged blocks is uniform and the model's output changes.
DAMAGE_BYTE = 0x3C


def damage_page(backend: Backend, key: str) -> None:
    """Overwrite the stored payload of ``key`` (a raw hook: localdisk and mmap layouts)."""
    path = getattr(backend, "page_path", None)
    if path is not None:
        with open(path(key), "r+b") as f:
            f.seek(HEADER_SIZE)
            f.write(bytes([DAMAGE_BYTE]) * backend.context.page_bytes)
        return
    raise NotImplementedError(f"no raw damage hook for {type(backend).__name__}")


class ObservedTierManager(HicacheTierManager):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._log_path = Path(kwargs.pop("observe_log"))
        control = kwargs.pop("observe_control", None)
        self._control_path = Path(control) if control else None
        self._faulty: dict[str, FaultyBackend] = {}
        super().__init__(*args, **kwargs)

    def _build_tiers(self, config: HicacheConfig) -> Tiers:
        built = super()._build_tiers(config)
        tiers = []
        for t in built:
            faulty = FaultyBackend(t.backend)
            self._faulty[t.name] = faulty
            tiers.append(Tier(t.name, faulty, t.settings))
        return Tiers(tiers)

    def _control(self) -> dict[str, Any]:
        if self._control_path is None or not self._control_path.exists():
            return {}
        return dict(json.loads(self._control_path.read_text()))

    def lookup(self, key: Any, req_context: Any) -> Any:
        if self._control().get("lookup", True) is False:
            from vllm.v1.kv_offload.base import LookupResult

            return LookupResult.MISS
        return super().lookup(key, req_context)

    def submit_load(self, job_metadata: Any) -> None:
        damage = bool(self._control().get("damage"))
        for fb in self._faulty.values():
            fb.damage_on_get(damage_page if damage else None)
        super().submit_load(job_metadata)

    def get_finished_jobs(self) -> Any:
        out = list(super().get_finished_jobs())
        if out:
            self._write_log()
        return out

    def shutdown(self) -> None:
        super().shutdown()
        self._write_log()

    def _write_log(self) -> None:
        log = {
            name: {
                "put": list(fb.put_log),
                "get": list(fb.get_log),
                "injected": dict(fb.injected),
            }
            for name, fb in self._faulty.items()
        }
        log["_adapter"] = {
            "namespace": self.namespace,
            "failures": dict(self.failures.counts),
            "tiers": self.tiers.stats(),
        }
        tmp = self._log_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(log))
        os.replace(tmp, self._log_path)
