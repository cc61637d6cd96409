"""``hicache bench sglang``: SGLang's zero-copy storage calls through the hicache adapter, beside
the same tier's raw ``put``/``get_into`` and SGLang's own ``HiCacheFile``, in one run.

Every round writes the same host pages three ways, each into a fresh directory, then drops
the written files from the OS page cache and reads them back (cold get), then reads them again
from the page cache (hot get: hicache verifies every page's checksum, ``HiCacheFile`` does not).
Hot gets are also given per CPU second of the process: on cores shared with other work the
wall clock says what share of them each side got, the CPU time what each side costs.

- ``adapter``     ``batch_set_v1`` / ``batch_get_v1`` of :class:`hicache.integrations.sglang.
                  HicacheStorage`, built by SGLang's ``StorageBackendFactory`` (``dynamic``)
                  over one localdisk tier, moving each page's K and V regions in place
- ``raw tier``    the same localdisk backend's ``put`` / ``get_into`` of the same K and V
                  regions, without the adapter, tiers, deadlines or breaker
- ``HiCacheFile`` SGLang's ``file`` backend: ``batch_set`` / ``batch_get`` of whole-page tensors
                  (its generic path; the page copies SGLang adds around it are not timed)
- ``machine limit`` what the filesystem gives for the same bytes with no storage logic: each
                  page's K and V regions ``pwritev``-ed into a fresh file (the tier's durability:
                  none, no fsync), then ``preadv``-ed back into the same host slots the other sides
                  read into, on as many threads as the tier has I/O threads, in the tier's file
                  layout (a 4 KiB header block, then the payload) and piece sizes, no checksum

Every side's cold get starts from the same state: its files written back and dropped from the
page cache with ``fdatasync`` + ``POSIX_FADV_DONTNEED`` file by file, and every side starts after
an ``os.sync()`` (so the previous side's deletes and writeback are not on its clock). Figures
divided by the machine limit show how close each side gets to what the machine allows; when
``limit / HiCacheFile`` is below 2, no implementation can reach 2x ``HiCacheFile`` here.

The order of the sides rotates every round and runs backwards in odd rounds, so no side always
follows the same one (a plain rotation keeps every side's predecessor); figures are medians
over the rounds, and each ratio is the median of the rounds' ratios (the sides of one round ran
back to back). The page defaults to Llama-3-8B at page size 64: 32 layers x 64 tokens x 8 KV
heads x 128 dims x bf16 = 4 MiB per region, K + V = 8 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hicache.storage import HEADER_SIZE, iter_pieces
from hicache.storage.backend import Backend, BackendContext, PageStatus
from hicache.storage.registry import create_backend
from hicache.testing.sglang_pool import PageFirstHostPool, host_indices, page_keys

__all__ = ["SideFigures", "add_arguments", "run"]

SIDES = ("adapter", "raw tier", "HiCacheFile")
LIMIT = "machine limit"


@dataclass(frozen=True, slots=True)
class SideFigures:
    """Median GB/s of one side over the rounds (and every round's figures)."""

    put_gbps: float
    cold_get_gbps: float
    hot_get_gbps: float
    #: Hot get GB per CPU second of the whole process (every thread; see ``_hot``).
    hot_get_cpu_gbps: float
    rounds_put: list[float]
    rounds_cold_get: list[float]
    rounds_hot_get: list[float]
    rounds_hot_get_cpu: list[float]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``hicache bench sglang``."""
    parser.add_argument("--root", help="directory for the tiers (default: a fresh temp dir)")
    parser.add_argument("--pages", type=int, default=32, help="pages written per side and round")
    parser.add_argument("--batch", type=int, default=16, help="pages per storage call")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; figures are medians")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--page-size", type=int, default=64, help="tokens per page")
    parser.add_argument("--heads", type=int, default=8, help="KV heads (this rank)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--quick", action="store_true", help="tiny pages and rounds (smoke test)")


def _drop_files(root: Path) -> None:
    """Write back and drop the files under ``root`` from the page cache, the way localdisk's
    ``drop_page_cache`` hook does for the hicache sides (HiCacheFile and the machine limit have
    no hook)."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fdatasync(fd)  # DONTNEED skips dirty pages
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _drop_backend(backend: Backend) -> None:
    hook = getattr(backend, "drop_page_cache", None)
    if hook is None or not hook():
        raise RuntimeError(f"{type(backend).__name__} cannot drop its pages: no cold reads")


#: Put, cold get and hot get GB/s of one side in one round, and its hot get GB per CPU second.
Round = tuple[float, float, float, float]


def _gbps(nbytes: int, fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return nbytes / max(time.perf_counter() - started, 1e-9) / 1e9


def _hot(nbytes: int, fn: Callable[[], object]) -> tuple[float, float]:
    """GB/s of ``fn`` and its bytes per CPU second of this process (all threads, user and
    system time): on a machine shared with other work the wall clock says how much CPU the
    scheduler gave each side, the CPU time what each side costs."""
    cpu = time.process_time()
    gbps = _gbps(nbytes, fn)
    return gbps, nbytes / max(time.process_time() - cpu, 1e-9) / 1e9


def _check(ok: bool, side: str, what: str) -> None:
    if not ok:
        raise RuntimeError(f"{side}: {what} did not store/read every page")


class _Bench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        n = args.pages
        self.pool = PageFirstHostPool(
            pages=2 * n,
            page_size=args.page_size,
            layer_num=args.layers,
            head_num=args.heads,
            head_dim=args.head_dim,
        )
        raw = self.pool.kv_buffer.view(torch.uint8).numpy().reshape(-1)
        raw[:] = np.random.default_rng(0).integers(0, 256, raw.size, dtype=np.uint8)
        self.src, self.dst = list(range(n)), list(range(n, 2 * n))
        self.page_bytes = 2 * self.pool.region_bytes
        self.total = n * self.page_bytes
        # HiCacheFile's generic path hands it one tensor per page (copied out beforehand).
        self.flat = [torch.frombuffer(bytearray(self.pool.page_bytes_of(p)), dtype=torch.uint8)
                     for p in self.src]  # fmt: skip
        self.flat_dst = [torch.empty(self.page_bytes, dtype=torch.uint8) for _ in self.src]
        # the tier's own I/O thread count (its default): the limit moves a batch's pages on as
        # many threads as the tier does
        context = BackendContext(page_bytes=self.page_bytes, namespace="bench", tier_name="raw")
        unopened = create_backend("localdisk", {"root": str(root)}, context)
        self.io_threads = int(getattr(unopened, "io_threads", 1))

    def _batches(self) -> range:
        return range(0, self.args.pages, self.args.batch)

    def regions(self, pages: list[int]) -> list[tuple[memoryview, ...]]:
        """The K and V regions of host pages ``pages``, as SGLang's pool hands them out."""
        from hicache.integrations.sglang import address_view

        ptrs, sizes = self.pool.get_page_buffer_meta(host_indices(self.pool, pages))
        return [
            tuple(address_view(ptrs[j], sizes[j]) for j in (2 * k, 2 * k + 1))
            for k in range(len(pages))
        ]

    def _storage_config(self, extra: dict[str, Any] | None) -> Any:
        from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

        return HiCacheStorageConfig(
            tp_rank=0,
            tp_size=1,
            pp_rank=0,
            pp_size=1,
            attn_cp_rank=0,
            attn_cp_size=1,
            is_mla_model=False,
            enable_storage_metrics=False,
            is_page_first_layout=True,
            model_name="meta-llama/Meta-Llama-3-8B-Instruct",
            extra_config=extra,
        )

    def adapter(self, where: Path, keys: list[str]) -> Round:
        from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

        extra = {
            "backend_name": "hicache",
            "module_path": "hicache.integrations.sglang",
            "class_name": "HicacheStorage",
            "interface_v1": 1,
            "tiers": {"nvme": {"backend": "localdisk", "options": {"root": str(where)}}},
        }
        config = self._storage_config(extra)
        storage = StorageBackendFactory.create_backend("dynamic", config, self.pool)
        storage.register_mem_pool_host(self.pool)
        b = self.args.batch
        try:

            def put() -> None:
                for i in self._batches():
                    idx = host_indices(self.pool, self.src[i : i + b])
                    _check(all(storage.batch_set_v1(keys[i : i + b], idx)), "adapter", "put")

            def get() -> None:
                for i in self._batches():
                    idx = host_indices(self.pool, self.dst[i : i + b])
                    _check(all(storage.batch_get_v1(keys[i : i + b], idx)), "adapter", "get")

            put_gbps = _gbps(self.total, put)
            _drop_backend(storage.tiers["nvme"].backend)
            get_gbps = _gbps(self.total, get)
            hot = _hot(self.total, get)
        finally:
            storage.close()
        return put_gbps, get_gbps, *hot

    def raw_tier(self, where: Path, keys: list[str]) -> Round:
        context = BackendContext(page_bytes=self.page_bytes, namespace="bench", tier_name="raw")
        backend: Backend = create_backend("localdisk", {"root": str(where)}, context)
        backend.open()
        b = self.args.batch
        regions = self.regions
        try:

            def put() -> None:
                for i in self._batches():
                    got = backend.put(keys[i : i + b], regions(self.src[i : i + b]))
                    _check(all(s.stored for s in got), "raw tier", "put")

            def get() -> None:
                for i in self._batches():
                    got = backend.get_into(keys[i : i + b], regions(self.dst[i : i + b]))
                    _check(all(s is PageStatus.OK for s in got), "raw tier", "get")

            put_gbps = _gbps(self.total, put)
            _drop_backend(backend)
            get_gbps = _gbps(self.total, get)
            hot = _hot(self.total, get)
        finally:
            backend.close()
        return put_gbps, get_gbps, *hot

    def hicache_file(self, where: Path, keys: list[str]) -> Round:
        from sglang.srt.mem_cache.hicache_storage import HiCacheFile

        where.mkdir(parents=True, exist_ok=True)
        storage = HiCacheFile(self._storage_config(None), file_path=str(where))
        b = self.args.batch

        def put() -> None:
            for i in self._batches():
                ok = storage.batch_set(keys[i : i + b], self.flat[i : i + b])
                _check(bool(ok), "HiCacheFile", "put")

        def get() -> None:
            for i in self._batches():
                got = storage.batch_get(keys[i : i + b], self.flat_dst[i : i + b])
                _check(all(t is not None for t in got), "HiCacheFile", "get")

        put_gbps = _gbps(self.total, put)
        _drop_files(where)
        get_gbps = _gbps(self.total, get)
        return put_gbps, get_gbps, *_hot(self.total, get)

    def machine_limit(self, where: Path, keys: list[str]) -> Round:
        where.mkdir(parents=True, exist_ok=True)
        paths = [str(where / f"{key}.page") for key in keys]
        b = self.args.batch
        with ThreadPoolExecutor(self.io_threads, thread_name_prefix="bench-limit") as pool:

            def each(fn: Callable[[str, Sequence[memoryview]], None], pages: list[int]) -> None:
                for i in self._batches():
                    regions = self.regions(pages[i : i + b])
                    list(pool.map(fn, paths[i : i + b], regions))

            put_gbps = _gbps(self.total, lambda: each(_write_file, self.src))
            _drop_files(where)
            get_gbps = _gbps(self.total, lambda: each(_read_file, self.dst))
            hot = _hot(self.total, lambda: each(_read_file, self.dst))
        return put_gbps, get_gbps, *hot

    def run(self) -> dict[str, SideFigures]:
        measure = {
            "adapter": self.adapter,
            "raw tier": self.raw_tier,
            "HiCacheFile": self.hicache_file,
            LIMIT: self.machine_limit,
        }
        sides = (*SIDES, LIMIT)
        figures: dict[str, list[Round]] = {side: [] for side in sides}
        for r in range(self.args.rounds):
            order = sides[r % len(sides) :] + sides[: r % len(sides)]
            if r % 2:
                order = order[::-1]
            for side in order:
                where = self.root / f"round{r}-{side.replace(' ', '-')}"
                keys = page_keys(self.args.pages, f"{r}:{side}")
                # the previous side's writeback and deletes stay off this side's clock
                os.sync()
                try:
                    figures[side].append(measure[side](where, keys))
                finally:
                    shutil.rmtree(where, ignore_errors=True)
        return {
            side: SideFigures(
                put_gbps=statistics.median(row[0] for row in rows),
                cold_get_gbps=statistics.median(row[1] for row in rows),
                hot_get_gbps=statistics.median(row[2] for row in rows),
                hot_get_cpu_gbps=statistics.median(row[3] for row in rows),
                rounds_put=[row[0] for row in rows],
                rounds_cold_get=[row[1] for row in rows],
                rounds_hot_get=[row[2] for row in rows],
                rounds_hot_get_cpu=[row[3] for row in rows],
            )
            for side, rows in figures.items()
        }


#: Piece sizes of the limit's system calls, localdisk's own (its ``IO_CHUNK``/``READ_CHUNK``):
#: one 8 MiB buffered ``pwritev`` is several times slower than the same bytes in 1 MiB calls,
#: and cold reads of large pages run faster in pieces too.
_WRITE_PIECE = 1 << 20
_READ_PIECE = 256 << 10
#: The limit's files have the tier's layout: a header block, then the payload. Where the payload
#: starts matters on its own: measured here, 8 MiB written from offset 0 of a fresh file ran
#: several times slower than the same writes from offset 4096.
_HEADER = bytes(HEADER_SIZE)


def _write_file(path: str, regions: Sequence[memoryview]) -> None:
    """A page's regions into a fresh file as the tier lays it out (payload in ``pwritev``
    pieces after a header block, the header last), nothing hashed, no fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        for offset, piece in iter_pieces(regions, _WRITE_PIECE):
            _pwrite_all(fd, piece, HEADER_SIZE + offset)
        _pwrite_all(fd, memoryview(_HEADER), 0)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < view.nbytes:  # a short write: resume where it stopped
        done += os.pwritev(fd, [view[done:]], offset + done)


def _read_file(path: str, regions: Sequence[memoryview]) -> None:
    """A page file straight into its regions in ``preadv`` pieces, the header block with the
    first piece as the tier reads it (a 4 KiB read of its own first ran 3x slower cold here),
    no checksum."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pieces = list(iter_pieces(regions, _READ_PIECE))
        header = memoryview(bytearray(HEADER_SIZE))
        first = pieces[0][1]
        got = os.preadv(fd, [header, first], 0)
        if got < HEADER_SIZE:
            raise RuntimeError(f"machine limit: {path} ends at {got} bytes")
        _pread_all(fd, first[got - HEADER_SIZE :], got, path)
        for offset, piece in pieces[1:]:
            _pread_all(fd, piece, HEADER_SIZE + offset, path)
    finally:
        os.close(fd)


def _pread_all(fd: int, view: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < view.nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            raise RuntimeError(f"machine limit: {path} ends at {offset + done} bytes")
        done += got


def _paired(ours: list[float], theirs: list[float]) -> float:
    """Median of the rounds' ratios: each round measures every side back to back, so pairing
    within a round cancels the drift between rounds that a ratio of medians keeps."""
    return statistics.median(o / t for o, t in zip(ours, theirs, strict=True) if t > 0)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print a table (or JSON) of medians and same-run ratios."""
    if args.quick:
        args.pages, args.batch, args.rounds = 4, 2, 1
        args.layers, args.page_size, args.heads, args.head_dim = 2, 8, 2, 64
    made = args.root is None
    root = Path(tempfile.mkdtemp(prefix="hicache-bench-sglang-") if made else args.root)
    try:
        bench = _Bench(args, root)
        figures = bench.run()
    finally:
        if made:
            shutil.rmtree(root, ignore_errors=True)
    a, raw, hf = figures["adapter"], figures["raw tier"], figures["HiCacheFile"]
    lim = figures[LIMIT]
    ratios = {
        "adapter/raw put": _paired(a.rounds_put, raw.rounds_put),
        "adapter/raw cold get": _paired(a.rounds_cold_get, raw.rounds_cold_get),
        "adapter/HiCacheFile put": _paired(a.rounds_put, hf.rounds_put),
        "adapter/HiCacheFile cold get": _paired(a.rounds_cold_get, hf.rounds_cold_get),
        "adapter/HiCacheFile hot get": _paired(a.rounds_hot_get, hf.rounds_hot_get),
        "raw tier/HiCacheFile hot get": _paired(raw.rounds_hot_get, hf.rounds_hot_get),
        # The same per CPU second: what a hot get costs, whatever share of the cores it got.
        "adapter/HiCacheFile hot get CPU": _paired(a.rounds_hot_get_cpu, hf.rounds_hot_get_cpu),
        "raw tier/HiCacheFile hot get CPU": _paired(raw.rounds_hot_get_cpu, hf.rounds_hot_get_cpu),
    }
    # Each side against what the machine gives for the same bytes in the same rounds.
    for side, fig in (("adapter", a), ("raw tier", raw), ("HiCacheFile", hf)):
        ratios[f"{side}/limit put"] = _paired(fig.rounds_put, lim.rounds_put)
        ratios[f"{side}/limit cold get"] = _paired(fig.rounds_cold_get, lim.rounds_cold_get)
    # The best adapter/HiCacheFile any implementation could show here.
    ratios["limit/HiCacheFile put"] = _paired(lim.rounds_put, hf.rounds_put)
    ratios["limit/HiCacheFile cold get"] = _paired(lim.rounds_cold_get, hf.rounds_cold_get)
    shape = {
        "page_bytes": bench.page_bytes,
        "pages": args.pages,
        "batch": args.batch,
        "rounds": args.rounds,
        "root": str(root),
        # The machine's load while measuring: a shared machine's figures mean little without it.
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "io_threads": bench.io_threads,
    }
    limit_note = (
        f"pwritev of each page's K and V into a fresh file laid out as the tier's (4 KiB header "
        f"block + payload, 1 MiB pieces, no fsync), preadv back into the host slots (256 KiB "
        f"pieces), {bench.io_threads} threads, no checksum"
    )
    if args.json:
        sides = {k: asdict(v) for k, v in figures.items() if k != LIMIT}
        limit = {**asdict(lim), "method": limit_note}
        print(
            json.dumps({"shape": shape, "sides": sides, "limit": limit, "ratios": ratios}, indent=2)
        )
        return 0
    mib = bench.page_bytes / (1 << 20)
    print(
        f"hicache bench sglang: {args.pages} pages of {mib:g} MiB (K+V) per side and round, "
        f"{args.batch} per call, median of {args.rounds} rounds, localdisk at {root} "
        f"(verifying checksums), load average {shape['load_avg_1m']}"
    )
    print(f"machine limit: {limit_note}")
    print("cold gets: every side's files written back and dropped (fdatasync + FADV_DONTNEED)")
    print(
        f"{'side':<13} {'put GB/s':>9} {'cold get GB/s':>14} {'hot get GB/s':>13} "
        f"{'hot get GB/CPU-s':>17}"
    )
    for side, fig in figures.items():
        print(
            f"{side:<13} {fig.put_gbps:>9.2f} {fig.cold_get_gbps:>14.2f} {fig.hot_get_gbps:>13.2f} "
            f"{fig.hot_get_cpu_gbps:>17.2f}"
        )
    for name, value in ratios.items():
        print(f"{name:<34} {value:5.2f}x")
    print(
        "limit/HiCacheFile is the most any side could show over HiCacheFile with these calls on "
        f"this machine ({bench.io_threads} threads, buffered I/O)"
    )
    return 0


def main() -> int:
    """Run standalone: ``python -m hicache.tools.sglang_bench``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
