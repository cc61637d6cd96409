"""``hicache storage du|verify|purge``: inspect and maintain a tier through the contract alone.

- ``du``      pages and bytes per namespace
- ``verify``  read every stored page back (header and checksum checked by the backend); report
              the corrupt ones and, with ``--delete-corrupt``, delete them
- ``purge``   delete every page of one namespace (asks for ``--yes``)

Works for any backend that claims ``capabilities.listable`` (``iter_namespaces`` /
``iter_pages``). Each page is read back with ``get_into`` through an instance whose
``page_bytes`` is the page's ``StoredPage.payload_bytes`` (or its stored size minus the 4 KiB
header), so pages of several sizes in one namespace are each verified at their own size.
Instances are opened read-only unless the command deletes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from hicache.errors import BackendError, ConfigError, HicacheError
from hicache.storage.backend import Backend, BackendContext, PageStatus, StoredPage
from hicache.storage.pageformat import HEADER_SIZE
from hicache.storage.redact import redact_url

__all__ = [
    "LISTING_NAMESPACE",
    "NamespaceUsage",
    "TierHandle",
    "VerifyReport",
    "add_parser",
    "disk_usage",
    "list_namespaces",
    "purge_namespace",
    "tier_handle",
    "verify_namespace",
]

logger = logging.getLogger(__name__)

#: Namespace of the instance that only lists namespaces (it never reads or writes pages).
LISTING_NAMESPACE = "hicache-ops"
#: Bytes of scratch buffers one verify batch may use.
SCRATCH_BYTES = 64 << 20

#: ``make(page_bytes, namespace, read_only)``: a fresh, unopened backend of the tier.
BackendFactory = Callable[[int, str, bool], Backend]


@dataclass(frozen=True, slots=True)
class TierHandle:
    """A configured tier, ready to build backend instances for any page size and namespace."""

    name: str
    kind: str
    read_only: bool
    make: BackendFactory
    #: The cache's page size in bytes as the config describes it, when it can be derived.
    page_bytes_hint: int | None = None


def tier_handle(config_path: str, tier_name: str | None) -> TierHandle:
    """Build the :class:`TierHandle` of ``tier_name`` (default: the first tier) of a config file."""
    # Imported here: the config stack is needed only by these commands.
    from hicache.config import load_config
    from hicache.storage.registry import create_backend

    config = load_config(config_path)
    tiers = config.storage.tiers
    if not tiers:
        raise ConfigError(f"{config_path}: storage.tiers is empty")
    name = tier_name if tier_name is not None else next(iter(tiers))
    if name not in tiers:
        raise ConfigError(f"{config_path}: no tier {name!r} in storage.tiers (have {list(tiers)})")
    tier = tiers[name]

    def make(page_bytes: int, namespace: str, read_only: bool) -> Backend:
        context = BackendContext(
            page_bytes=page_bytes,
            namespace=namespace,
            read_only=read_only or tier.read_only,
            tier_name=name,
        )
        return create_backend(
            tier.backend, tier.options, context, path=f"storage.tiers.{name}.options"
        )

    return TierHandle(name, tier.backend, tier.read_only, make, _page_bytes_hint(config))


def _page_bytes_hint(config: Any) -> int | None:
    """The cache's page size in bytes from ``cache.page_size`` and ``model``, if derivable."""
    try:
        model, cache = config.model, config.cache
        itemsize = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}
        size = itemsize.get(str(getattr(model, "dtype", "")).lower().removeprefix("torch."))
        mla = bool(getattr(model, "mla", False))
        dims = (cache.page_size, model.num_layers, model.num_kv_heads, model.head_dim, size)
        total = 1 if mla else 2
        for d in dims:
            if not isinstance(d, int) or d <= 0:
                return None
            total *= d
        return total
    except AttributeError:
        return None


def _payload_bytes(page: StoredPage) -> int:
    if page.payload_bytes is not None:
        return page.payload_bytes
    return page.stored_bytes - HEADER_SIZE


class _Opened:
    """Context manager: an opened instance, closed on exit."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def __enter__(self) -> Backend:
        self.backend.open()
        return self.backend

    def __exit__(self, *exc_info: object) -> None:
        self.backend.close()


def _require_listable(backend: Backend, tier: str) -> None:
    if not backend.capabilities.listable:
        raise BackendError(
            f"tier {tier!r} ({type(backend).__name__}) cannot list its pages "
            "(capabilities.listable is false): storage operations need iter_pages"
        )


def list_namespaces(handle: TierHandle, listing_page_bytes: int | None = None) -> list[str]:
    """Every namespace with pages in the tier, sorted."""
    page_bytes = listing_page_bytes or handle.page_bytes_hint or HEADER_SIZE
    with _Opened(handle.make(page_bytes, LISTING_NAMESPACE, True)) as backend:
        _require_listable(backend, handle.name)
        return sorted(set(backend.iter_namespaces()))


def _pages(handle: TierHandle, namespace: str, page_bytes: int) -> list[StoredPage]:
    with _Opened(handle.make(page_bytes, namespace, True)) as backend:
        _require_listable(backend, handle.name)
        return list(backend.iter_pages())


@dataclass(frozen=True, slots=True)
class NamespaceUsage:
    """``du`` of one namespace."""

    namespace: str
    pages: int
    stored_bytes: int


def disk_usage(
    handle: TierHandle, namespaces: Sequence[str], page_bytes: int | None = None
) -> list[NamespaceUsage]:
    """Pages and stored bytes of each namespace."""
    hint = page_bytes or handle.page_bytes_hint or HEADER_SIZE
    out = []
    for ns in namespaces:
        pages = _pages(handle, ns, hint)
        out.append(NamespaceUsage(ns, len(pages), sum(p.stored_bytes for p in pages)))
    return out


@dataclass(slots=True)
class VerifyReport:
    """``verify`` of one namespace."""

    namespace: str
    pages: int = 0
    ok: int = 0
    #: Keys whose stored bytes failed verification (or whose stored size cannot hold a page).
    corrupt: list[str] = field(default_factory=list)
    #: Keys listed but gone by the time they were read (evicted or deleted meanwhile).
    vanished: int = 0
    #: Keys that could not be read (I/O error): not known to be corrupt.
    failed: list[str] = field(default_factory=list)
    deleted: int = 0


def _batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def verify_namespace(
    handle: TierHandle,
    namespace: str,
    *,
    delete_corrupt: bool = False,
    listing_page_bytes: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Read back every page of ``namespace`` and sort it into ok / corrupt / vanished / failed.

    With ``delete_corrupt`` the corrupt pages are deleted (never the failed ones: an I/O error
    says nothing about the bytes).
    """
    hint = listing_page_bytes or handle.page_bytes_hint or HEADER_SIZE
    pages = _pages(handle, namespace, hint)
    report = VerifyReport(namespace, pages=len(pages))
    by_size: dict[int, list[str]] = {}
    for page in pages:
        size = _payload_bytes(page)
        if size <= 0:
            report.corrupt.append(page.key)  # too short to hold a header and any payload
            if progress is not None:
                progress(1)
        else:
            by_size.setdefault(size, []).append(page.key)
    for size, keys in sorted(by_size.items()):
        _verify_size(handle, namespace, size, keys, report, progress)
    if delete_corrupt and report.corrupt:
        with _Opened(handle.make(hint, namespace, False)) as backend:
            for chunk in _batches(report.corrupt, 256):
                backend.delete(chunk)
        report.deleted = len(report.corrupt)
        logger.info("deleted %d corrupt pages of %s/%s", report.deleted, handle.name, namespace)
    return report


def _verify_size(
    handle: TierHandle,
    namespace: str,
    page_bytes: int,
    keys: list[str],
    report: VerifyReport,
    progress: Callable[[int], None] | None,
) -> None:
    try:
        backend = handle.make(page_bytes, namespace, True)
        backend.open()
    except BackendError as exc:
        logger.warning("cannot open %s at page_bytes=%d: %s", namespace, page_bytes, exc)
        report.failed.extend(keys)
        return
    try:
        batch = max(1, min(backend.capabilities.max_batch, SCRATCH_BYTES // page_bytes))
        scratch = [memoryview(bytearray(page_bytes)) for _ in range(min(batch, len(keys)))]
        for chunk in _batches(keys, batch):
            try:
                statuses = backend.get_into(chunk, scratch[: len(chunk)])
            except BackendError as exc:
                logger.warning("reading %d pages of %s failed: %s", len(chunk), namespace, exc)
                report.failed.extend(chunk)
                continue
            for key, status in zip(chunk, statuses, strict=True):
                if status is PageStatus.OK:
                    report.ok += 1
                elif status is PageStatus.CORRUPT:
                    report.corrupt.append(key)
                elif status is PageStatus.NOT_FOUND:
                    report.vanished += 1
                else:
                    report.failed.append(key)
            if progress is not None:
                progress(len(chunk))
    finally:
        backend.close()


def purge_namespace(
    handle: TierHandle, namespace: str, listing_page_bytes: int | None = None
) -> int:
    """Delete every page of ``namespace``; return how many were listed and deleted."""
    hint = listing_page_bytes or handle.page_bytes_hint or HEADER_SIZE
    with _Opened(handle.make(hint, namespace, False)) as backend:
        _require_listable(backend, handle.name)
        keys = [page.key for page in backend.iter_pages()]  # listed first: never delete mid-walk
        for chunk in _batches(keys, 256):
            backend.delete(chunk)
    return len(keys)


# ----------------------------------------------------------------------------- command line


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``storage du|verify|purge`` on ``subparsers`` (from ``add_subparsers``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "storage", help="inspect and maintain a storage tier: du, verify, purge"
    )
    sub = parser.add_subparsers(dest="storage_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, help="hicache YAML configuration file")
        p.add_argument("--tier", help="tier name in storage.tiers (default: the first)")
        p.add_argument("--namespace", help="only this namespace (default: every namespace)")
        p.add_argument(
            "--page-bytes",
            type=int,
            help="page size used to open the tier for listing (default: from the config)",
        )
        p.add_argument("--json", action="store_true", help="print machine-readable JSON")

    du = sub.add_parser("du", help="pages and bytes per namespace")
    common(du)
    du.set_defaults(func=_run_du)

    verify = sub.add_parser(
        "verify", help="read back every page; report corrupt ones (exit status 1 if any)"
    )
    common(verify)
    verify.add_argument(
        "--delete-corrupt", action="store_true", help="delete the pages that fail verification"
    )
    verify.set_defaults(func=_run_verify)

    purge = sub.add_parser("purge", help="delete every page of a namespace")
    common(purge)
    purge.add_argument("--yes", action="store_true", help="do it (required)")
    purge.set_defaults(func=_run_purge)
    return parser


def _namespaces(handle: TierHandle, args: argparse.Namespace) -> list[str]:
    if args.namespace:
        return [args.namespace]
    return list_namespaces(handle, args.page_bytes)


def _human(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _guarded(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (HicacheError, ValueError) as exc:
            print(f"error: {redact_url(str(exc))}", file=sys.stderr)
            return 2

    return wrapper


@_guarded
def _run_du(args: argparse.Namespace) -> int:
    handle = tier_handle(args.config, args.tier)
    usage = disk_usage(handle, _namespaces(handle, args), args.page_bytes)
    if args.json:
        print(json.dumps({"tier": handle.name, "namespaces": [asdict(u) for u in usage]}, indent=2))
        return 0
    print(f"tier {handle.name!r} (backend {handle.kind})")
    print(f"  {'namespace':<40} {'pages':>10} {'bytes':>12}")
    for u in usage:
        print(f"  {u.namespace:<40} {u.pages:>10} {_human(u.stored_bytes):>12}")
    total_pages = sum(u.pages for u in usage)
    total_bytes = sum(u.stored_bytes for u in usage)
    print(f"  {'total':<40} {total_pages:>10} {_human(total_bytes):>12}")
    return 0


@_guarded
def _run_verify(args: argparse.Namespace) -> int:
    handle = tier_handle(args.config, args.tier)
    if args.delete_corrupt and handle.read_only:
        raise ConfigError(f"tier {handle.name!r} is read_only: cannot --delete-corrupt")
    reports = [
        verify_namespace(
            handle, ns, delete_corrupt=args.delete_corrupt, listing_page_bytes=args.page_bytes
        )
        for ns in _namespaces(handle, args)
    ]
    if args.json:
        print(
            json.dumps({"tier": handle.name, "namespaces": [asdict(r) for r in reports]}, indent=2)
        )
    else:
        print(f"tier {handle.name!r} (backend {handle.kind})")
        for r in reports:
            print(
                f"  {r.namespace}: {r.pages} pages, {r.ok} ok, {len(r.corrupt)} corrupt, "
                f"{r.vanished} vanished, {len(r.failed)} failed"
                + (f", {r.deleted} deleted" if r.deleted else "")
            )
            for key in r.corrupt:
                print(f"    corrupt {key}")
            for key in r.failed:
                print(f"    failed  {key}")
    bad = any(r.corrupt or r.failed for r in reports)
    return 1 if bad else 0


@_guarded
def _run_purge(args: argparse.Namespace) -> int:
    if not args.namespace:
        raise ConfigError("purge needs --namespace (one namespace at a time)")
    if not args.yes:
        print(f"refusing to purge namespace {args.namespace!r} without --yes", file=sys.stderr)
        return 2
    handle = tier_handle(args.config, args.tier)
    if handle.read_only:
        raise ConfigError(f"tier {handle.name!r} is read_only: cannot purge")
    deleted = purge_namespace(handle, args.namespace, args.page_bytes)
    if args.json:
        print(json.dumps({"tier": handle.name, "namespace": args.namespace, "deleted": deleted}))
    else:
        print(f"tier {handle.name!r}: purged {deleted} pages of namespace {args.namespace!r}")
    return 0
