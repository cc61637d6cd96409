"""The storage plugin contract: everything a backend author imports, and nothing else.

A backend imports from this face (``from hicache.storage import Backend, PageStatus, ...``) and
from :mod:`hicache.errors`, never from the private modules below it or from the L3 runtime
(:mod:`hicache.tiering`) that drives backends.

- :mod:`~hicache.storage.backend`     the ``Backend`` ABC, its config, context and statuses
- :mod:`~hicache.storage.pageformat`  the versioned on-storage page header
- :mod:`~hicache.storage.sizes`       ``8GiB``-style sizes for options
- :mod:`~hicache.storage.eviction`    capacity policies shared by backends
- :mod:`~hicache.storage.buffers`     GIL-free copies between page buffers
- :mod:`~hicache.storage.localfiles`  owner-only file creation, regular-file-only opens
- :mod:`~hicache.storage.redact`      masking of secrets in output
- :mod:`~hicache.storage.baseline`    what a backend provides to ``hicache bench storage``
- :mod:`~hicache.storage.registry`    entry-point discovery and contract checks
- :mod:`~hicache.storage.memory`      ``MemoryBackend``, the reference backend

Nothing here imports torch: a plugin author needs only this package (and pydantic).
"""

from hicache.storage.backend import (
    API_VERSION,
    PAGE_KEY_LEN,
    Backend,
    BackendConfig,
    BackendContext,
    Capabilities,
    PageBuffers,
    PageParts,
    PageStatus,
    StoredPage,
    check_key,
    check_namespace,
)
from hicache.storage.baseline import Benchmarkable, RawBaseline, RemoteBenchHooks, ToolLimit
from hicache.storage.buffers import (
    COPY_CHUNK,
    Regions,
    buffer_address,
    copy_and_hash,
    copy_bytes,
    iter_pieces,
)
from hicache.storage.eviction import (
    DEFAULT_EVICTION,
    CapacityPolicy,
    ClockSlots,
    EvictionPolicy,
    TailFirstLRU,
    make_capacity_policy,
)
from hicache.storage.localfiles import (
    DEFAULT_DIR_MODE,
    DEFAULT_FILE_MODE,
    DirMode,
    FileMode,
    create_file,
    make_dirs,
    open_regular,
)
from hicache.storage.memory import MemoryBackend, MemoryConfig
from hicache.storage.pageformat import (
    FORMAT_VERSION,
    HEADER_SIZE,
    PageHeader,
    Payload,
    check_checksum,
    check_version,
    decode_header,
    encode_header,
    encode_header_into,
    encode_headers_into,
    payload_checksum,
    payload_checksums,
    payload_hasher,
    payload_nbytes,
    stored_size,
    verify_page,
    verify_pages,
    verify_payload,
)
from hicache.storage.pageformat import MAGIC as PAGE_MAGIC
from hicache.storage.redact import (
    MASK,
    RedactedUrl,
    is_secret_name,
    redact,
    redact_url,
    reveal,
)
from hicache.storage.registry import create_backend, installed_backends, load_backend_class
from hicache.storage.sizes import Size, format_size, parse_size

__all__ = [
    "API_VERSION",
    "COPY_CHUNK",
    "DEFAULT_DIR_MODE",
    "DEFAULT_EVICTION",
    "DEFAULT_FILE_MODE",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MASK",
    "PAGE_KEY_LEN",
    "PAGE_MAGIC",
    "Backend",
    "BackendConfig",
    "BackendContext",
    "Benchmarkable",
    "Capabilities",
    "CapacityPolicy",
    "ClockSlots",
    "DirMode",
    "EvictionPolicy",
    "FileMode",
    "MemoryBackend",
    "MemoryConfig",
    "PageBuffers",
    "PageHeader",
    "PageParts",
    "PageStatus",
    "Payload",
    "RawBaseline",
    "RedactedUrl",
    "Regions",
    "RemoteBenchHooks",
    "Size",
    "StoredPage",
    "TailFirstLRU",
    "ToolLimit",
    "buffer_address",
    "check_checksum",
    "check_key",
    "check_namespace",
    "check_version",
    "copy_and_hash",
    "copy_bytes",
    "create_backend",
    "create_file",
    "decode_header",
    "encode_header",
    "encode_header_into",
    "encode_headers_into",
    "format_size",
    "installed_backends",
    "is_secret_name",
    "iter_pieces",
    "load_backend_class",
    "make_capacity_policy",
    "make_dirs",
    "open_regular",
    "parse_size",
    "payload_checksum",
    "payload_checksums",
    "payload_hasher",
    "payload_nbytes",
    "redact",
    "redact_url",
    "reveal",
    "stored_size",
    "verify_page",
    "verify_pages",
    "verify_payload",
]
