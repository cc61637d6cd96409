"""Sizing a replay before anything is allocated: what one replay page stands for, how many pages
each level holds, whether bytes move at the model's real size or at a stated scale, and whether
the run fits this machine.

- ``ByteMode``             ``real``: pages carry the model's real KV bytes; ``scaled``: a small
                           stand-in page per trace block, real bytes computed, never moved;
                           ``auto``: real when the run fits and writes at most ``_REAL_BUDGET``
- ``plan_replay(...)``     -> ``ReplayPlan`` or ``DoesNotFit`` (one line naming the sizes and the
                           options that change them)

Units. The trace's unit is a 512-token block (a block id). In ``scaled`` mode a replay page is
one block (16 token ids, an 8 KiB stand-in page) and stands for 512 real tokens; in ``real`` mode
a block expands to 512 token ids in pages of the model's real page size, so a replay page is a
real page. Capacities given in bytes become replay pages at the real bytes a replay page stands
for; a capacity option of an L3 tier is then rewritten to hold exactly that many moved pages (and
their 4 KiB headers), so the backend and the block simulation agree on what fits.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from hicache.config import HicacheConfig
from hicache.errors import ConfigError
from hicache.replay.models import GpuClass, ModelShape, default_l1_bytes
from hicache.storage.sizes import format_size

__all__ = ["ByteMode", "Capacity", "DoesNotFit", "ReplayPlan", "SizeRequest", "plan_replay"]

TRACE_BLOCK_TOKENS = 512
#: the page header every stored page carries (hicache.storage.pageformat)
PAGE_HEADER = 4096
#: tokens ids one block expands to in scaled mode, and the stand-in page's shape
SCALED_PAGE_TOKENS = 16
#: ``auto`` moves real bytes only when the run may write at most this much
_REAL_BUDGET = 2 << 30
#: share of the available memory / free disk a run may take
_HEADROOM = 0.8
#: tier options that bound a tier's bytes (localdisk, memory, mmap) and that locate it
CAPACITY_OPTIONS = ("max_bytes", "capacity")
_PATH_OPTIONS = ("root", "path")
DEFAULT_L3 = 1 << 40


class ByteMode(StrEnum):
    AUTO = "auto"
    REAL = "real"
    SCALED = "scaled"


class DoesNotFit(ConfigError):
    """The run would not fit this machine; raised before anything is allocated."""


@dataclass(frozen=True, slots=True)
class Capacity:
    """One level's size: replay pages, the real bytes they stand for, and where it came from."""

    pages: int
    real_bytes: int
    source: str


@dataclass(frozen=True, slots=True)
class SizeRequest:
    """What the user asked for; ``None`` = not given."""

    l1: int | None = None
    l2: int | None = None
    #: per tier name; the key ``""`` means every tier (``--l3 1TiB``)
    l3: Mapping[str, int] = field(default_factory=dict)
    l1_fraction: float | None = None
    l2_fraction: float | None = None
    l3_fraction: float | None = None


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    model: ModelShape
    mode: ByteMode
    #: the model's page size (tokens per real page)
    real_page_size: int
    #: the replay cache's page size and tokens per block (token ids, as the cache sees them)
    page_size: int
    block_tokens: int
    #: trace tokens one replay page stands for
    unit_tokens: int
    moved_page_bytes: int
    l1: Capacity
    l2: Capacity
    l3: dict[str, Capacity | None]
    notes: tuple[str, ...]

    @property
    def pages_per_block(self) -> int:
        return self.block_tokens // self.page_size

    @property
    def real_bytes_per_page(self) -> int:
        return self.unit_tokens * self.model.bytes_per_token

    @property
    def scale(self) -> float:
        """Moved bytes per real byte (1.0 in real mode)."""
        return self.moved_page_bytes / self.real_bytes_per_page

    def tier_option_bytes(self, pages: int) -> int:
        return pages * (self.moved_page_bytes + PAGE_HEADER)


def _pages(nbytes: int, per_page: int) -> int:
    return max(1, nbytes // per_page)


def plan_replay(
    *,
    model: ModelShape,
    gpu: GpuClass,
    config: HicacheConfig,
    config_given: bool,
    sizes: SizeRequest,
    mode: ByteMode,
    real_page_size: int,
    scaled_page_bytes: int,
    distinct_blocks: int,
    longest_blocks: int,
    instances: int,
    memory_available: int | None = None,
) -> ReplayPlan:
    """Size the run for ``mode`` (``auto`` tries real, then scaled); raise ``DoesNotFit``."""
    if TRACE_BLOCK_TOKENS % real_page_size:
        raise ConfigError(
            f"page size {real_page_size} does not divide the trace's {TRACE_BLOCK_TOKENS}-token "
            "blocks"
        )
    avail = _memory_available() if memory_available is None else memory_available
    tries = [ByteMode.REAL, ByteMode.SCALED] if mode is ByteMode.AUTO else [mode]
    last: DoesNotFit | None = None
    for m in tries:
        plan = _plan(
            model,
            gpu,
            config,
            config_given,
            sizes,
            m,
            real_page_size,
            scaled_page_bytes,
            distinct_blocks,
            longest_blocks,
        )
        problem = _fit_problem(plan, config, instances, avail)
        written = distinct_blocks * plan.pages_per_block * plan.moved_page_bytes
        if problem is None and (mode is not ByteMode.AUTO or m is ByteMode.SCALED):
            return plan
        if problem is None and written <= _REAL_BUDGET:
            return plan
        if problem is not None:
            last = DoesNotFit(
                f"hicache replay ({m.value} bytes) does not fit this machine: {problem}"
                + "".join(f" ({note})" for note in plan.notes)
                + "; change "
                "--l1/--l2/--l3 (or the config's cache.device_pool, cache.host_pool and tier "
                "max_bytes/capacity), --limit, --model or --bytes scaled"
            )
    assert last is not None  # auto always ends with scaled, which returns or sets last
    raise last


def _plan(
    model: ModelShape,
    gpu: GpuClass,
    config: HicacheConfig,
    config_given: bool,
    sizes: SizeRequest,
    mode: ByteMode,
    real_page_size: int,
    scaled_page_bytes: int,
    distinct_blocks: int,
    longest_blocks: int,
) -> ReplayPlan:
    notes: list[str] = []
    if mode is ByteMode.REAL:
        page_size, block_tokens = real_page_size, TRACE_BLOCK_TOKENS
        unit, moved = real_page_size, model.page_bytes(real_page_size)
    else:
        page_size = block_tokens = SCALED_PAGE_TOKENS
        unit, moved = TRACE_BLOCK_TOKENS, scaled_page_bytes
    ppb = block_tokens // page_size
    per_page = unit * model.bytes_per_token
    distinct = distinct_blocks * ppb
    set_fields = config.cache.model_fields_set if config_given else set()

    def level(
        name: str,
        given: int | None,
        fraction: float | None,
        cfg: int | None,
        default: int,
        default_src: str,
    ) -> Capacity:
        if given is not None:
            return Capacity(_pages(given, per_page), given, f"--{name} {format_size(given)}")
        if fraction is not None:
            pages = max(1, int(distinct * fraction))
            return Capacity(pages, pages * per_page, f"--{name}-fraction {fraction}")
        if cfg is not None:
            return Capacity(_pages(cfg, per_page), cfg, "config")
        return Capacity(_pages(default, per_page), default, default_src)

    dev_cfg = config.cache.device_pool if "device_pool" in set_fields else None
    gpu_l1 = default_l1_bytes(model, gpu)
    if gpu_l1 <= 0 and sizes.l1 is None and sizes.l1_fraction is None and dev_cfg is None:
        raise ConfigError(
            f"{model.name}'s weights per rank do not fit a {gpu.name}: pass --gpu or --l1"
        )
    l1 = level(
        "l1", sizes.l1, sizes.l1_fraction, dev_cfg, gpu_l1, f"default: 90% of {gpu.name} - weights"
    )
    # A request must fit on the device, as in a serving engine: L1 holds two of the longest
    # prompts (its locked prefix plus its computed pages, with room to spare).
    floor = max(16, 2 * longest_blocks * ppb)
    if l1.pages < floor:
        notes.append(
            f"L1 raised from {l1.pages} to {floor} pages to hold two of the longest prompts"
        )
        l1 = Capacity(floor, floor * per_page, l1.source + " (raised)")
    host_cfg = config.cache.host_pool if "host_pool" in set_fields else None
    l2 = level("l2", sizes.l2, sizes.l2_fraction, host_cfg, 2 * l1.real_bytes, "default: 2x L1")
    if l2.pages < l1.pages + 16:
        # write-through keeps L1 inside L2, so L2 must be larger
        notes.append(f"L2 raised from {l2.pages} to {l1.pages + 16} pages (it must exceed L1)")
        l2 = Capacity(l1.pages + 16, (l1.pages + 16) * per_page, l2.source + " (raised)")
    l3: dict[str, Capacity | None] = {}
    for name, tier in config.storage.tiers.items():
        given = sizes.l3.get(name, sizes.l3.get(""))
        opt = next((o for o in CAPACITY_OPTIONS if tier.options.get(o) is not None), None)
        cfg_bytes = None
        if opt is not None and config_given:
            from hicache.storage.sizes import parse_size

            cfg_bytes = parse_size(tier.options[opt])
        if given is None and sizes.l3_fraction is None and cfg_bytes is None:
            if config_given:
                l3[name] = None  # unbounded here; the backend's own default applies
                continue
            given = DEFAULT_L3
        cap = level("l3", given, sizes.l3_fraction, cfg_bytes, 0, "")
        if cap.pages < l2.pages:
            notes.append(f"tier {name}: {cap.pages} pages, smaller than L2 ({l2.pages})")
        l3[name] = cap
    return ReplayPlan(
        model, mode, real_page_size, page_size, block_tokens, unit, moved, l1, l2, l3, tuple(notes)
    )


def _fit_problem(plan: ReplayPlan, config: HicacheConfig, instances: int, avail: int) -> str | None:
    mem_parts = [
        f"L1 {plan.l1.pages} x {format_size(plan.moved_page_bytes)}",
        f"L2 {plan.l2.pages} x {format_size(plan.moved_page_bytes)}",
    ]
    need = instances * (plan.l1.pages + plan.l2.pages) * plan.moved_page_bytes
    disk: dict[Path, int] = {}
    for name, cap in plan.l3.items():
        if cap is None:
            continue
        tier = config.storage.tiers[name]
        nbytes = plan.tier_option_bytes(cap.pages)
        medium = (tier.medium or "").upper()
        path = next((tier.options[o] for o in _PATH_OPTIONS if tier.options.get(o)), None)
        if medium == "DISK" and path is not None:
            disk[_existing(Path(str(path)))] = disk.get(_existing(Path(str(path))), 0) + nbytes
        elif tier.backend == "memory" or medium == "CPU":
            need += nbytes
            mem_parts.append(f"tier {name} {format_size(nbytes)}")
    per = f" per instance x {instances}" if instances > 1 else ""
    if need > avail * _HEADROOM:
        return (
            f"{' + '.join(mem_parts)}{per} = {format_size(need)} of memory needed, "
            f"{format_size(avail)} available"
        )
    for path, nbytes in disk.items():
        free = shutil.disk_usage(path).free
        if nbytes > free * _HEADROOM:
            return f"L3 on {path} needs {format_size(nbytes)}, {format_size(free)} free there"
    return None


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _memory_available() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
