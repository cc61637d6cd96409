"""Read pages through a backend in another process, and plant pages a newer hicache would write.

- ``as_newer_version(page, version)``  a stored page's bytes as a writer of a later format
                                         version would have written them (version field and
                                         header checksum), for tests of mixed-version tiers
- ``read_in_other_process(...)``        open a backend in a fresh interpreter, read keys, report
                                         each status and the backend's stats

The reading process runs ``python -m hicache.testing.peer SPEC`` (SPEC is JSON), so it shares
nothing with the test process but the storage itself.
"""

from __future__ import annotations

import importlib
import json
import struct
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import xxhash

from hicache.storage.backend import Backend, BackendContext, PageStatus
from hicache.storage.pageformat import HEADER_SIZE

__all__ = ["PeerRead", "as_newer_version", "read_in_other_process"]

_VERSION_AT = 8
_CHECKSUM_AT = HEADER_SIZE - 8


def as_newer_version(page: bytes, version: int = 2) -> bytes:
    """``page`` (header and payload as stored) with its header rewritten as format ``version``:
    the version field set and the header checksum recomputed, as a newer writer would."""
    out = bytearray(page)
    struct.pack_into("<H", out, _VERSION_AT, version)
    struct.pack_into("<Q", out, _CHECKSUM_AT, xxhash.xxh3_64_intdigest(bytes(out[:_CHECKSUM_AT])))
    return bytes(out)


@dataclass(frozen=True, slots=True)
class PeerRead:
    """What the other process saw: one status per key, and its backend's stats after."""

    statuses: list[PageStatus]
    stats: dict[str, Any]


def read_in_other_process(
    backend_cls: type[Backend],
    options: dict[str, Any],
    *,
    page_bytes: int,
    namespace: str,
    keys: list[str],
    timeout_s: float = 120.0,
) -> PeerRead:
    """Open ``backend_cls(options)`` in a new interpreter, ``get_into`` each key, close."""
    spec = {
        "backend": f"{backend_cls.__module__}:{backend_cls.__qualname__}",
        "options": options,
        "page_bytes": page_bytes,
        "namespace": namespace,
        "keys": keys,
    }
    done = subprocess.run(
        [sys.executable, "-m", "hicache.testing.peer", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"peer process exited with {done.returncode}: {done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return PeerRead([PageStatus(s) for s in report["statuses"]], report["stats"])


def _main(raw_spec: str) -> None:
    spec = json.loads(raw_spec)
    module, name = spec["backend"].split(":")
    backend_cls: type[Backend] = getattr(importlib.import_module(module), name)
    config = backend_cls.config_model.model_validate(spec["options"])
    backend = backend_cls(config, BackendContext(spec["page_bytes"], spec["namespace"]))
    backend.open()
    try:
        dst = memoryview(bytearray(spec["page_bytes"]))
        statuses = [backend.get_into([key], [dst])[0].value for key in spec["keys"]]
        stats = backend.stats()
    finally:
        backend.close()
    print(json.dumps({"statuses": statuses, "stats": stats}, default=str))


if __name__ == "__main__":
    _main(sys.argv[1])
