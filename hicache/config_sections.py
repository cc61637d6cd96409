"""The sections of a configuration file, each a pydantic model (phase one of validation).

- ``cache:``    :class:`CacheConfig`, with :class:`WritePolicy`
- ``model:``    :class:`ModelConfig` (its dtype in ``DTYPE_BYTES``)
- ``storage:``  :class:`StorageConfig`: :class:`PrefetchConfig` and, per tier, the envelope
                :class:`TierConfig` (engine knobs in :class:`TierSettings`; ``options`` belong
                to the plugin and are validated in phase two)
- ``events:``   :class:`EventsConfig`, with :class:`EventsMode`

The whole configuration, its loading and the environment overrides are in
:mod:`hicache.config`, which re-exports every public name here: import them from there.
"""

from __future__ import annotations

import enum
import re
import socket
import string
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hicache.errors import ConfigError
from hicache.storage.sizes import Size
from hicache.tiering.admission import Admission
from hicache.tiering.prefetch import PrefetchPolicy

__all__ = [
    "DTYPE_BYTES",
    "TOPIC_FIELDS",
    "CacheConfig",
    "EventsConfig",
    "EventsMode",
    "ModelConfig",
    "PrefetchConfig",
    "StorageConfig",
    "TierConfig",
    "TierSettings",
    "WritePolicy",
]

#: Bytes per element of the KV dtypes a model section may name.
DTYPE_BYTES: Mapping[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
#: Longest wait any setting may ask for: a call, a prefetch or a backoff that may take longer
#: than an hour is a hang, and unbounded seconds overflow the timers they feed.
_MAX_WAIT_S = 3600.0
#: Longest a breaker may keep a tier out (a day).
_MAX_COOLDOWN_S = 86400.0
# Lowercase (environment names are case-insensitive), no "__" (the nesting delimiter).
_TIER_NAME_RE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*\Z")


class WritePolicy(enum.StrEnum):
    """When device pages are backed up to host memory (and from there published)."""

    WRITE_THROUGH = "write_through"
    #: Back up a node only on its second hit.
    WRITE_THROUGH_SELECTIVE = "write_through_selective"
    #: Nothing automatic: the caller decides with ``write_backup`` (tests, custom schedulers).
    #: Not offered in a config file (``cache.write_policy`` accepts the other two).
    MANUAL = "manual"


class _Section(BaseModel):
    # Infinity and NaN pass `gt=0`; refused here they cannot overflow a timer or a count later.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class CacheConfig(_Section):
    """``cache:`` the radix cache and its two in-process levels."""

    page_size: int = Field(default=64, ge=1, le=65536, description="tokens per page")
    device: str = Field(default="auto", description="'auto' (cuda when available), 'cpu', 'cuda:N'")
    device_pool: Size | None = Field(
        default=None, gt=0, description="L1 size; unset = sized by the engine"
    )
    host_pool: Size = Field(default=8 << 30, gt=0, description="L2 (host memory) size")
    write_policy: Literal[WritePolicy.WRITE_THROUGH, WritePolicy.WRITE_THROUGH_SELECTIVE] = (
        WritePolicy.WRITE_THROUGH
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:[0-9]+", value):
            return value
        raise ValueError(f"invalid device {value!r}: expected auto, cpu, cuda or cuda:N")


class ModelConfig(_Section):
    """``model:`` identity and KV shape; everything that makes KV bytes incompatible."""

    name: str = Field(default="default", min_length=1)
    revision: str = ""
    #: Salt mixed into the first page hash (LoRA adapter, cache salt): different salt, no sharing.
    tenant_salt: str = ""
    # Bounds far above any real model, low enough that a page's byte count stays a sane int.
    num_layers: int = Field(default=32, ge=1, le=4096)
    num_kv_heads: int = Field(default=8, ge=1, le=4096)
    head_dim: int = Field(default=128, ge=1, le=65536)
    dtype: str = "bfloat16"
    #: Multi-head latent attention: one latent vector per token, no separate K and V.
    mla: bool = False

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {value!r}: expected one of {', '.join(DTYPE_BYTES)}")
        return value

    def page_bytes(self, page_size: int) -> int:
        """Bytes of one page of ``page_size`` tokens: K and V (or the MLA latent), all layers."""
        kv = 1 if self.mla else 2
        per_token = kv * self.num_layers * self.num_kv_heads * self.head_dim
        return per_token * page_size * DTYPE_BYTES[self.dtype]


class PrefetchConfig(_Section):
    """``storage.prefetch:`` reading ahead from storage into host memory."""

    policy: PrefetchPolicy = PrefetchPolicy.BEST_EFFORT
    #: Prefetch only when at least this many tokens would come from storage.
    threshold_tokens: int = Field(default=256, ge=0, le=1 << 30)
    #: With policy ``timeout``: how long a request waits for its prefetch (the base) ...
    timeout_s: float = Field(default=2.0, gt=0, le=_MAX_WAIT_S)
    #: ... plus this much per 1,000 tokens to read ...
    timeout_per_1k_tokens_s: float = Field(default=0.25, ge=0, le=_MAX_WAIT_S)
    #: ... capped here (unset: 4x the base).
    timeout_max_s: float | None = Field(default=None, gt=0, le=_MAX_WAIT_S)


class TierSettings(_Section):
    """What the cache needs from a tier's configuration: :class:`TierConfig` without the
    backend and its options (tests and hand-built tiers give these alone)."""

    #: Receive published pages. A read-only tier does not publish unless told to (an error).
    publish: bool = True
    read_only: bool = False
    #: Medium announced in ``BlockStored`` events; unset = the backend's default medium.
    medium: str | None = None
    admission: Admission = Admission.ALWAYS
    #: Copy pages found here into earlier tiers (opt-in).
    promote: bool = False
    #: Stop waiting for one call (and for ``open`` at start-up) after this long; the call counts
    #: as failed.
    deadline_s: float = Field(default=5.0, gt=0, le=_MAX_WAIT_S)
    #: What a tier that cannot open at start-up (or not within ``deadline_s``) does: ``false``
    #: starts the cache without it (every lookup a miss, opened again in the background after
    #: each ``breaker_cooldown_s``); ``true`` fails the start-up with an error naming the tier.
    #: Off by default because storage is an accelerator: a store that is down should cost hits,
    #: not the serving process.
    required: bool = False
    #: Publishes beyond this many bytes in flight are dropped and counted (backpressure).
    max_inflight_bytes: Size = Field(default=1 << 30, gt=0)
    #: I/O worker threads calling this tier; unset = what this machine's cores and the tier
    #: can use (:func:`hicache.tiering.lanes.default_io_threads`: 2 per core for a local
    #: tier, 8 per core for an ``EXTERNAL`` one, at least 3, at most 32). One thread is
    #: always kept free for lookups and reads, so they never queue behind publishes.
    io_threads: int | None = Field(default=None, ge=1, le=256)
    #: Pages per backend call; unset = the backend's ``max_batch``.
    batch_pages: int | None = Field(default=None, ge=1, le=65536)
    #: Consecutive failed calls that open the circuit breaker, and how long it stays open.
    breaker_failures: int = Field(default=5, ge=1, le=1_000_000)
    breaker_cooldown_s: float = Field(default=30.0, gt=0, le=_MAX_COOLDOWN_S)
    #: Attempts per call for retryable failures (endpoint down), with exponential backoff.
    retry_attempts: int = Field(default=3, ge=1, le=20)
    retry_backoff_s: float = Field(default=0.02, ge=0, le=_MAX_WAIT_S)
    retry_backoff_max_s: float = Field(default=0.5, ge=0, le=_MAX_WAIT_S)

    @model_validator(mode="after")
    def _read_only_does_not_publish(self) -> Self:
        if self.read_only and self.publish:
            if "publish" in self.model_fields_set:
                raise ValueError("a read_only tier cannot publish: set publish: false")
            self.publish = False
        return self


class TierConfig(TierSettings):
    """One storage tier: the envelope the core validates; ``options`` belong to the plugin."""

    #: Entry-point name of the backend (``memory``, ``localdisk``, ``mmap``, ``s3``, ...).
    backend: str = Field(min_length=1)
    #: The plugin's own options, validated in phase two by its ``config_model``.
    options: dict[str, Any] = Field(default_factory=dict)


def _check_tier_name(name: str) -> str:
    if not _TIER_NAME_RE.match(name):
        raise ValueError(
            f"invalid tier name {name!r}: use lowercase letters, digits and single underscores, "
            "starting with a letter (environment variables address tiers by name, "
            "case-insensitively)"
        )
    return name


TierName = Annotated[str, AfterValidator(_check_tier_name)]


class StorageConfig(_Section):
    """``storage:`` the ordered tiers (lookup order) and prefetching."""

    prefetch: PrefetchConfig = Field(default_factory=PrefetchConfig)
    #: Tier name -> tier, in lookup order.
    tiers: dict[TierName, TierConfig] = Field(default_factory=dict)


class EventsMode(enum.StrEnum):
    """Which side of the event socket binds."""

    #: The publisher binds ``endpoint``; subscribers (routers) connect to every pod.
    BIND = "bind"
    #: The subscriber (the router, e.g. llm-d's indexer) binds ``endpoint``; every pod connects.
    CONNECT = "connect"


#: The placeholders ``events.topic`` may use.
TOPIC_FIELDS = ("instance", "model")


def _check_topic(topic: str) -> str:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(topic) if name is not None}
    except ValueError as exc:
        raise ValueError(f"invalid template {topic!r}: {exc}") from None
    unknown = sorted(names - set(TOPIC_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown placeholder {{{unknown[0]}}} in {topic!r}; use {{instance}} and {{model}}"
        )
    return topic


class EventsConfig(_Section):
    """``events:`` KV events (BlockStored / BlockRemoved / AllBlocksCleared)."""

    enabled: bool = True
    #: ``zmq``: publish batches (``HiRadixCache.publish_events()``) on a PUB socket at
    #: ``endpoint``, in vLLM's wire format (docs/events.md); unset = drain with ``take_events()``.
    publisher: Literal["zmq"] | None = None
    endpoint: str | None = None
    #: ``bind``: the PUB socket binds ``endpoint``; ``connect``: it connects to the router's.
    mode: EventsMode = EventsMode.BIND
    #: ROUTER socket answering replay requests from the last ``buffer_batches`` batches (always
    #: bound: it is this instance's service, whichever side binds ``endpoint``).
    replay_endpoint: str | None = None
    #: First frame of every message, a template: ``{instance}`` and ``{model}`` (``model.name``)
    #: are filled in. llm-d's indexer only reads ``kv@{instance}@{model}``.
    topic: Annotated[str, AfterValidator(_check_topic)] = ""
    #: This instance's name in the topic; unset = the host name (a Kubernetes pod's name).
    instance: str | None = Field(default=None, min_length=1)
    buffer_batches: int = Field(default=10_000, ge=1, le=100_000_000)
    #: Events kept between two ``take_events()``; beyond it the backlog is discarded (counted)
    #: and replaced by ``AllBlocksCleared``, so a consumer never keeps a stale block.
    max_queue: int = Field(default=100_000, ge=2, le=1_000_000_000)

    @field_validator("endpoint")
    @classmethod
    def _publisher_needs_endpoint(cls, value: str | None, info: ValidationInfo) -> str | None:
        # ``publisher`` is declared first, so it is validated (and in info.data) by now.
        if info.data.get("publisher") == "zmq" and not value:
            raise ValueError("required with publisher zmq: where to bind, e.g. tcp://*:5557")
        return value

    def topic_for(self, model: str) -> str:
        """The topic with ``{instance}`` and ``{model}`` filled in.

        Raises :class:`~hicache.errors.ConfigError` when a filled-in value contains ``@``
        while the template uses ``@`` as a separator (llm-d splits the topic on it).
        """
        instance = self.instance or socket.gethostname()
        values = {"instance": instance, "model": model}
        if "@" in self.topic:
            for name, value in values.items():
                if "@" in value and "{" + name + "}" in self.topic:
                    where = "events.instance" if name == "instance" else "model.name"
                    raise ConfigError(
                        f"events.topic: {where} {value!r} contains '@', which separates the "
                        f"fields of {self.topic!r}"
                    )
        return self.topic.format(**values)
