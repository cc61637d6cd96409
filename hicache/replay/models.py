"""Real model shapes and GPU classes for the replay: what one token of KV costs in bytes, and
what one token of prefill costs in time.

- ``MODEL_PRESETS``        the preset table (data, one row per model; ``--model NAME``)
- ``GPU_PRESETS``          GPU classes: memory, dense bf16 peak (``--gpu NAME``)
- ``resolve_model(spec)``  a preset name or the path of a Hugging Face ``config.json``
- ``ModelShape.bytes_per_token`` / ``page_bytes(page_size)``  KV bytes, MLA handled
- ``prefill_tokens_per_s(model, gpu, mfu)``  the documented prefill estimate

Shapes are per tensor-parallel rank, because that is what one cache holds: Llama-3-70B at TP 8
keeps one of its 8 KV heads per rank. MLA models (DeepSeek-V3) keep one compressed latent per
token and layer (512 + 64 rope dims), the same on every rank.

The prefill estimate is ``peak_flops * mfu / (2 * active_params / tp)`` tokens/s: the matmul
FLOPs of a forward pass at a stated model-FLOPs utilisation, ignoring attention's quadratic term.
It is an estimate, labelled as one in every report; ``--prefill-tokens-per-s`` replaces it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hicache.config import DTYPE_BYTES
from hicache.errors import ConfigError

__all__ = [
    "GPU_PRESETS",
    "MODEL_PRESETS",
    "GpuClass",
    "ModelShape",
    "default_l1_bytes",
    "prefill_tokens_per_s",
    "resolve_gpu",
    "resolve_model",
]

#: Model FLOPs utilisation assumed for prefill (long prompts on Hopper reach 40-60%).
DEFAULT_MFU = 0.4
#: Share of GPU memory an engine gives to weights plus KV (SGLang's mem_fraction_static ~0.9).
_GPU_MEM_FRACTION = 0.9


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The KV shape of one cache (one tensor-parallel rank) and the compute behind it."""

    name: str
    hf_id: str
    num_layers: int
    #: KV heads this rank holds (1 for MLA: the latent is one vector)
    num_kv_heads: int
    #: per-head dim; for MLA the latent width (kv_lora_rank + rope dims)
    head_dim: int
    dtype: str
    mla: bool
    #: parameters a token passes through (MoE: the routed experts only), whole model
    active_params: float
    #: bytes of weights one rank holds
    weight_bytes_per_rank: float
    tp: int = 1

    @property
    def bytes_per_token(self) -> int:
        kv = 1 if self.mla else 2
        return kv * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]

    def page_bytes(self, page_size: int) -> int:
        return self.bytes_per_token * page_size

    def describe(self) -> dict[str, int | str]:
        return {
            "name": self.name,
            "hf_id": self.hf_id,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "mla": int(self.mla),
            "tp": self.tp,
            "bytes_per_token": self.bytes_per_token,
        }


@dataclass(frozen=True, slots=True)
class GpuClass:
    name: str
    memory_bytes: float
    #: dense bf16 tensor-core peak (no sparsity), FLOP/s
    peak_flops: float


def _m(
    name: str,
    hf_id: str,
    layers: int,
    heads: int,
    head_dim: int,
    dtype: str,
    mla: bool,
    active: float,
    total: float,
    weight_dtype_bytes: int,
    tp: int,
) -> ModelShape:
    return ModelShape(
        name,
        hf_id,
        layers,
        heads,
        head_dim,
        dtype,
        mla,
        active,
        total * weight_dtype_bytes / tp,
        tp,
    )


# One row per model: layers, KV heads per rank, head dim, KV dtype, MLA, active and total
# parameters, weight bytes per parameter, tensor parallelism. Public model cards and configs.
MODEL_PRESETS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        _m(
            "llama-3-8b",
            "meta-llama/Meta-Llama-3-8B",
            32,
            8,
            128,
            "bfloat16",
            False,
            8.03e9,
            8.03e9,
            2,
            1,
        ),
        _m(
            "llama-3-70b",
            "meta-llama/Meta-Llama-3-70B",
            80,
            1,
            128,
            "bfloat16",
            False,
            70.6e9,
            70.6e9,
            2,
            8,
        ),
        _m(
            "qwen2.5-7b",
            "Qwen/Qwen2.5-7B-Instruct",
            28,
            4,
            128,
            "bfloat16",
            False,
            7.62e9,
            7.62e9,
            2,
            1,
        ),
        _m(
            "deepseek-v3",
            "deepseek-ai/DeepSeek-V3",
            61,
            1,
            576,
            "bfloat16",
            True,
            37e9,
            671e9,
            1,
            8,
        ),
    )
}

GPU_PRESETS: dict[str, GpuClass] = {
    g.name: g
    for g in (
        GpuClass("h100", 80e9, 989e12),
        GpuClass("h200", 141e9, 989e12),
        GpuClass("a100", 80e9, 312e12),
        GpuClass("l40s", 48e9, 362e12),
        GpuClass("b200", 180e9, 2250e12),
    )
}


def resolve_gpu(name: str) -> GpuClass:
    try:
        return GPU_PRESETS[name.lower()]
    except KeyError:
        raise ConfigError(
            f"unknown --gpu {name!r}: expected one of {', '.join(GPU_PRESETS)}"
        ) from None


def resolve_model(spec: str, *, tp: int | None = None) -> ModelShape:
    """A preset name (case-insensitive) or the path of a Hugging Face ``config.json``."""
    preset = MODEL_PRESETS.get(spec.lower())
    if preset is not None:
        return preset
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"--model {spec!r}: not a preset ({', '.join(MODEL_PRESETS)}) nor a config.json file"
        )
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        return _from_hf(cfg, str(path), tp or 1)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--model {spec!r}: not a usable Hugging Face config: {exc}") from exc


def _from_hf(cfg: dict[str, Any], name: str, tp: int) -> ModelShape:
    hidden = int(cfg["hidden_size"])
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    dtype = str(cfg.get("torch_dtype") or "bfloat16")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"torch_dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    vocab = int(cfg.get("vocab_size", 0))
    mla = "kv_lora_rank" in cfg
    if mla:
        head_dim = int(cfg["kv_lora_rank"]) + int(cfg.get("qk_rope_head_dim", 0))
        rank_heads = 1
        qk = int(cfg.get("qk_nope_head_dim", 0)) + int(cfg.get("qk_rope_head_dim", 0))
        attn = hidden * (heads * qk + head_dim) + heads * int(cfg.get("v_head_dim", qk)) * hidden
    else:
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        if kv_heads % tp and tp % kv_heads:
            raise ValueError(f"{kv_heads} KV heads cannot be split over TP {tp}")
        rank_heads = max(1, kv_heads // tp)
        attn = hidden * head_dim * (2 * heads + 2 * kv_heads)
    experts = int(cfg.get("num_experts_per_tok") or 0)
    if experts:
        inter = int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
        mlp_active = 3 * hidden * inter * (experts + int(cfg.get("n_shared_experts") or 0))
        mlp_total = 3 * hidden * inter * int(cfg.get("n_routed_experts") or experts)
    else:
        mlp_active = mlp_total = 3 * hidden * int(cfg["intermediate_size"])
    embed = 2 * vocab * hidden
    active = layers * (attn + mlp_active) + embed
    total = layers * (attn + mlp_total) + embed
    return ModelShape(
        name,
        name,
        layers,
        rank_heads,
        head_dim,
        dtype,
        mla,
        active,
        total * DTYPE_BYTES[dtype] / tp,
        tp,
    )


def prefill_tokens_per_s(model: ModelShape, gpu: GpuClass, mfu: float = DEFAULT_MFU) -> float:
    """Prefill throughput of one rank's share: matmul FLOPs at ``mfu`` of the dense peak."""
    return gpu.peak_flops * mfu / (2 * model.active_params / model.tp)


def default_l1_bytes(model: ModelShape, gpu: GpuClass) -> int:
    """KV room on one GPU: 90% of its memory less the rank's weights (0 if they do not fit)."""
    return max(0, int(gpu.memory_bytes * _GPU_MEM_FRACTION - model.weight_bytes_per_rank))
