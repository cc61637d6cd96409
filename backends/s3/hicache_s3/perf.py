"""S3 performance run: ``hicache bench storage`` figures plus an injected-latency sweep.

``python -m hicache_s3.perf`` starts a local S3 server in a child process (or uses
``--endpoint``), then

1. runs ``hicache bench storage`` (in a child process: this module imports no benchmark code)
   on the tier of ``--config``, against the raw boto3 baseline
   (:meth:`~hicache_s3.backend.S3Backend.bench_baseline`), with ``exists_prefix`` asked over
   512-page chains and a HEAD budget a local Python server can serve in minutes;
2. injects a fixed per-request delay (a botocore ``before-send`` hook, like a distant endpoint)
   and reports get GB/s of one large ``get_into`` batch against ``max_concurrency``: the delay is
   hidden when throughput grows with concurrency.

The local server is a functional S3, not a model of AWS speed: the ratios are what count.
``--server sink`` swaps moto for :mod:`hicache_s3.sinkserver`, a minimal in-memory endpoint that
spends almost nothing per request, so the ratios show the client-side overhead of the backend
(header, verification, conditional write) against raw boto3.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hicache.storage import BackendContext, PageStatus, redact_url
from hicache_s3.backend import S3Backend
from hicache_s3.client import inject_latency
from hicache_s3.devserver import DevServer, create_bucket, dummy_aws_env
from hicache_s3.options import S3Options

MIB = 1 << 20


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _hicache(*argv: str, env: dict[str, str] | None = None, capture: bool = False) -> str:
    """Run the ``hicache`` command in a child process (this module imports none of its code)."""
    done = subprocess.run(
        [sys.executable, "-m", "hicache.cli", *argv],
        env=env,
        stdout=subprocess.PIPE if capture else None,
        text=True,
        check=True,
    )
    return done.stdout or ""


def _tier_options(config: str, tier: str | None) -> tuple[str, dict[str, Any]]:
    """The tier's name and options from ``config`` merged with ``HICACHE_*`` variables."""
    tiers = json.loads(_hicache("config", "show", config, capture=True))["storage"]["tiers"]
    name = tier or next(iter(tiers))
    return name, dict(tiers[name]["options"])


def storage_figures(
    config: str, options: dict[str, Any], tier: str, args: argparse.Namespace
) -> None:
    """``hicache bench storage`` on this tier; its report goes straight to stdout."""
    # The endpoint (a local server's port) reaches the child as a config override.
    variable = f"HICACHE_STORAGE__TIERS__{tier.upper()}__OPTIONS__ENDPOINT_URL"
    env = {**os.environ, variable: options["endpoint_url"]}
    _hicache(
        "bench",
        "storage",
        "--config",
        config,
        "--tier",
        tier,
        "--page-mib",
        ",".join(repr(m) for m in args.page_mib),
        "--total-gib",
        repr(args.total_mib / 1024),
        "--threads",
        ",".join(str(t) for t in args.threads),
        "--batch",
        str(args.batch),
        "--exists-batch",
        str(args.exists_chain),
        "--exists-keys",
        str(args.exists_keys),
        "--repeat",
        "1",
        "--no-progress",
        env=env,
    )


def latency_sweep(options: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """get GB/s of one batch of ``--sweep-pages`` pages per max_concurrency, with a delay."""
    page_bytes = int(args.sweep_page_mib * MIB)
    lines = [
        f"injected latency {args.latency_ms:g} ms per request; one get_into of "
        f"{args.sweep_pages} x {args.sweep_page_mib:g} MiB pages per row",
        f"  {'max_concurrency':>15} {'get GB/s':>10} {'s/batch':>9} {'x of c=1':>9}",
    ]
    payloads = [memoryview(os.urandom(page_bytes)) for _ in range(args.sweep_pages)]
    keys = [f"{i:064x}" for i in range(args.sweep_pages)]
    base: float | None = None
    namespace = f"sweep-{os.getpid()}"
    # the last row repeats the highest concurrency without the delay: the latency is hidden when
    # the delayed rows reach it
    rows = [(c, args.latency_ms) for c in args.concurrency]
    rows.append((max(args.concurrency), 0.0))
    for concurrency, delay_ms in rows:
        context = BackendContext(page_bytes=page_bytes, namespace=namespace, tier_name="sweep")
        backend = S3Backend(S3Options(**{**options, "max_concurrency": concurrency}), context)
        with backend:
            if base is None:
                assert all(s.stored for s in backend.put(keys, payloads))
            if delay_ms:
                inject_latency(backend.client, delay_ms / 1000)
            dsts = [memoryview(bytearray(page_bytes)) for _ in keys]
            start = time.perf_counter()
            statuses = backend.get_into(keys, dsts)
            elapsed = time.perf_counter() - start
            assert statuses == [PageStatus.OK] * len(keys), statuses
        gbps = page_bytes * len(keys) / elapsed / 1e9
        base = base or gbps
        label = f"{concurrency}" + ("" if delay_ms else " (no delay)")
        lines.append(f"  {label:>15} {gbps:>10.3f} {elapsed:>9.2f} {gbps / base:>9.1f}")
    context = BackendContext(page_bytes=page_bytes, namespace=namespace, tier_name="sweep")
    with S3Backend(S3Options(**options), context) as cleanup:
        cleanup.delete(keys)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/s3.yaml")
    parser.add_argument("--tier", default=None)
    parser.add_argument("--endpoint", default=None, help="use this endpoint, start no server")
    parser.add_argument(
        "--server",
        choices=("moto", "sink"),
        default="moto",
        help="local server to start: moto (a full S3) or sink (minimal, for client overhead)",
    )
    parser.add_argument("--page-mib", type=_floats, default=[8.0, 2.0])
    parser.add_argument("--total-mib", type=float, default=256.0)
    parser.add_argument("--threads", type=_ints, default=[1, 4])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--exists-chain", type=int, default=512, help="keys per exists call")
    parser.add_argument("--exists-keys", type=int, default=2048, help="HEADs per figure")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--concurrency", type=_ints, default=[1, 4, 16, 64])
    parser.add_argument("--sweep-pages", type=int, default=128)
    parser.add_argument("--sweep-page-mib", type=float, default=2.0)
    parser.add_argument("--skip-bench", action="store_true", help="only the latency sweep")
    args = parser.parse_args(argv)

    tier, options = _tier_options(args.config, args.tier)
    with tempfile.TemporaryDirectory() as tmp:
        server: DevServer | None = None
        sink: subprocess.Popen[str] | None = None
        if args.endpoint is not None:
            options["endpoint_url"] = args.endpoint
        elif args.server == "sink":
            os.environ.update(dummy_aws_env(Path(tmp)))
            sink = subprocess.Popen(
                [sys.executable, "-m", "hicache_s3.sinkserver"], stdout=subprocess.PIPE, text=True
            )
            assert sink.stdout is not None
            options["endpoint_url"] = sink.stdout.readline().strip()
        else:
            os.environ.update(dummy_aws_env(Path(tmp)))
            server = DevServer(log_path=Path(tmp) / "moto.log").start()
            options["endpoint_url"] = server.endpoint_url
            create_bucket(server.endpoint_url, options["bucket"])
        try:
            endpoint = redact_url(options["endpoint_url"])
            print(f"endpoint {endpoint}, bucket {options['bucket']!r}", flush=True)
            if not args.skip_bench:
                storage_figures(args.config, options, tier, args)
                print(flush=True)
            print("\n".join(latency_sweep(options, args)), flush=True)
        finally:
            if server is not None:
                server.stop()
            if sink is not None:
                sink.kill()
                sink.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
