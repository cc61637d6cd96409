"""The replay in a serving engineer's units: model shapes, capacities in bytes, the fit check
before anything is allocated, token counting, the TTFT model and the L3 sweep."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hicache.config import load_config
from hicache.replay.app import ReplaySettings, default_config, run_replay
from hicache.replay.models import GPU_PRESETS, MODEL_PRESETS, resolve_model
from hicache.replay.plan import ByteMode, DoesNotFit, ReplayPlan, SizeRequest, plan_replay
from hicache.replay.sweep import hit_tokens, token_ratio
from hicache.replay.sweep_command import sweep_for
from hicache.replay.timing import ttft_model

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30


def test_preset_page_bytes_are_the_real_models() -> None:
    # 2 (K, V) x 32 layers x 8 heads x 128 x 2 B = 128 KiB per token: a 16-token page is 2 MiB
    assert MODEL_PRESETS["llama-3-8b"].page_bytes(16) == 2 << 20
    # 80 layers, 8 KV heads over TP 8 = 1 per rank
    assert MODEL_PRESETS["llama-3-70b"].bytes_per_token == 2 * 80 * 1 * 128 * 2
    assert MODEL_PRESETS["qwen2.5-7b"].bytes_per_token == 2 * 28 * 4 * 128 * 2
    # MLA: one latent of 512 + 64 per layer, no separate K and V
    assert MODEL_PRESETS["deepseek-v3"].bytes_per_token == 61 * 576 * 2


def test_hugging_face_config_gives_the_same_shape_as_the_preset(tmp_path: Path) -> None:
    cfg = {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = resolve_model(str(tmp_path))
    preset = MODEL_PRESETS["llama-3-8b"]
    assert m.bytes_per_token == preset.bytes_per_token
    assert m.active_params == pytest.approx(preset.active_params, rel=0.01)
    mla = {**cfg, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128}
    (tmp_path / "mla.json").write_text(json.dumps(mla))
    assert resolve_model(str(tmp_path / "mla.json")).bytes_per_token == 32 * 576 * 2


def _plan(
    config_path: Path | None, mode: ByteMode, sizes: SizeRequest, avail: int = 16 * GiB
) -> ReplayPlan:
    config = (
        load_config(config_path) if config_path else default_config(ReplaySettings(), Path("x"))
    )
    return plan_replay(
        model=MODEL_PRESETS["llama-3-8b"],
        gpu=GPU_PRESETS["h100"],
        config=config,
        config_given=config_path is not None,
        sizes=sizes,
        mode=mode,
        real_page_size=config.cache.page_size,
        scaled_page_bytes=8192,
        distinct_blocks=182_790,
        longest_blocks=5,
        instances=1,
        memory_available=avail,
    )


def test_config_capacities_are_honoured() -> None:
    plan = _plan(ROOT / "configs" / "localdisk.yaml", ByteMode.AUTO, SizeRequest(l1=GiB))
    # the whole trace at real bytes would write terabytes: auto falls back to scaled bytes
    assert plan.mode is ByteMode.SCALED
    # a replay page is one 512-token block of Llama-3-8B: 64 MiB of real KV
    assert plan.real_bytes_per_page == 64 << 20
    assert (plan.l1.pages, plan.l1.source) == (16, "--l1 1.0 GiB")
    assert (plan.l2.real_bytes, plan.l2.pages, plan.l2.source) == (2 * GiB, 32, "config")
    assert plan.l3["nvme"] is not None and plan.l3["nvme"].real_bytes == 16 * GiB
    assert plan.l3["nvme"].pages == 256


def test_sizes_in_bytes_and_fractions() -> None:
    plan = _plan(None, ByteMode.SCALED, SizeRequest(l1=8 * GiB, l2=32 * GiB, l3={"": 1 << 40}))
    assert (plan.l1.pages, plan.l2.pages, plan.l3["disk"].pages) == (128, 512, 16384)  # type: ignore[union-attr]
    frac = _plan(
        None, ByteMode.SCALED, SizeRequest(l1_fraction=0.01, l2_fraction=0.025, l3_fraction=0.05)
    )
    assert (frac.l1.pages, frac.l2.pages, frac.l3["disk"].pages) == (1827, 4569, 9139)  # type: ignore[union-attr]


def test_a_run_that_cannot_fit_says_so_before_allocating(tmp_path: Path) -> None:
    with pytest.raises(DoesNotFit, match=r"L1 .* = .* of memory needed, .* available.*--l1"):
        _plan(None, ByteMode.REAL, SizeRequest(l1=64 * GiB), avail=16 * GiB)
    data = tmp_path / "data"
    settings = ReplaySettings(
        limit=50, data_dir=data, progress=False, bytes_mode=ByteMode.REAL, l1=1 << 50
    )
    with pytest.raises(DoesNotFit):
        run_replay(settings)
    assert not data.exists(), "the run created its storage before the fit check"


def test_cli_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hicache.cli",
            "replay",
            "--config",
            str(ROOT / "configs" / "localdisk.yaml"),
            "--bytes",
            "real",
            "--l1",
            "1024TiB",
            "--data-dir",
            str(tmp_path / "d"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not fit this machine" in lines[0], proc.stderr
    assert "1024.0 TiB" in lines[0] or "TiB" in lines[0]
    assert not (tmp_path / "d").exists()


def test_tokens_count_the_partial_last_block() -> None:
    # a 3-block prompt of 1,100 tokens: its last block holds 76 tokens
    assert hit_tokens(2, 512, 1100) == 1024
    assert hit_tokens(3, 512, 1100) == 1100
    assert token_ratio([3, 0], 512, [1100, 900]) == pytest.approx(1100 / 2000)


def test_ttft_model_adds_queueing_fetch_and_prefill() -> None:
    series = ttft_model(
        prompt_tokens=[10_000, 10_000],
        hit_tokens=[0, 8_000],
        l3_bytes=[0, 2_000_000_000],
        prefill_tokens_per_s=10_000,
        read_gbps=4.0,
        read_latency_s=0.001,
        arrivals_s=[0.0, 0.5],
        instance_of=[0, 0],
    )
    assert series.prefill == pytest.approx((1.0, 0.2))
    assert series.fetch == pytest.approx((0.0, 0.501))
    # the second request arrives at 0.5 s and waits for the first until 1.0 s
    assert series.queueing == pytest.approx((0.0, 0.5))
    assert series.ttft == pytest.approx((1.0, 0.5 + 0.501 + 0.2))


def test_real_bytes_for_a_small_model(tmp_path: Path) -> None:
    """A model small enough moves its real page bytes; the report says so, hits in tokens."""
    cfg = {
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 512,
        "vocab_size": 1000,
        "torch_dtype": "float16",
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    report, _ = run_replay(
        ReplaySettings(
            limit=40,
            model=str(tmp_path / "config.json"),
            data_dir=tmp_path / "data",
            progress=False,
            l1_fraction=0.05,
            l2_fraction=0.3,
            l3_fraction=0.6,
            bytes_mode=ByteMode.REAL,
            sync_publish=True,
        )
    )
    s = report.scaling
    assert s.bytes_mode == "real" and s.scale == 1.0
    # 2 (K, V) x 2 layers x 2 heads x 64 dims x 2 B x 16 tokens
    assert s.moved_page_bytes == s.real_page_bytes == 16384
    assert s.pages_per_block == 32 and s.unit_tokens == 16
    assert report.verification.mismatches == 0
    assert report.overall.hit_tokens > 0
    assert report.overall.hit_ratio == pytest.approx(report.overall.same_policy_sim_ratio)
    assert report.time is not None and report.time.with_l3 is not None
    assert report.time.calibration[0].page_bytes == 16384


def test_sweep_point_is_confirmed_by_a_real_replay(tmp_path: Path) -> None:
    base = dict(limit=400, data_dir=tmp_path, progress=False, l1_fraction=0.02, l2_fraction=0.1)
    result, _ = sweep_for(ReplaySettings(**base), points=5)  # type: ignore[arg-type]
    assert result.points[0].hicache <= result.points[-1].hicache <= result.infinite + 1e-12
    assert all(p.lru <= p.min + 1e-12 for p in result.points)
    point = result.points[2]
    report, _ = run_replay(
        ReplaySettings(**base, l3={"": point.l3_bytes}, sync_publish=True)  # type: ignore[arg-type]
    )
    assert report.tiers[2].capacity_pages == point.l3_pages
    assert report.overall.hit_ratio == pytest.approx(point.hicache)


@pytest.mark.parametrize("value", ["-1", "two", "1.5"])
def test_prefetch_ahead_takes_a_whole_number_and_names_a_bad_one(value: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hicache.cli", "replay", "--prefetch-ahead", value],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"expected a whole number >= 0, got {value!r}" in proc.stderr, proc.stderr
