"""Chapter 2 extras: accounting, FP8 cache format, the toy stack, figures and exercise checks."""
import plotly.graph_objects as go
import pytest
import torch

import dslib.viz as viz
from dslib.config import ModelConfig
from dslib.cost import decode_costs, decode_step_time
from dslib.exercises import ch2
from dslib.mla import MLA, MLAStack, fp8_pack_latent, fp8_unpack_latent
from dslib.rope import rope_inv_freq, yarn_correction_range


def test_decode_costs_671b_match_reference():
    """REFERENCE §3.1: per 128K sequence, 61 layers: MHA 655.0 GB, GQA-8 32.7 GB, MLA 9.21 GB, FP8 5.24 GB."""
    costs = decode_costs(ModelConfig.deepseek_v32(), 131072)
    assert round(costs["MHA"]["cache_bytes"] / 1e9, 1) == 655.0
    assert round(costs["GQA-8"]["cache_bytes"] / 1e9, 1) == 32.7
    assert round(costs["MLA"]["cache_bytes"] / 1e9, 2) == 9.21
    assert round(costs["MLA FP8"]["cache_bytes"] / 1e9, 2) == 5.24
    assert round(costs["MLA"]["vs_mha"], 1) == 71.1 and round(costs["MLA"]["vs_gqa"], 2) == 3.56
    assert costs["MLA FP8"]["bytes_per_token_per_layer"] * 61 == 40_016


def test_fp8_pack_roundtrip():
    torch.manual_seed(0)
    lat, rope = torch.randn(2, 3, 512) * 4, torch.randn(2, 3, 64)
    packed = fp8_pack_latent(lat, rope)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 656)
    lat2, rope2 = fp8_unpack_latent(packed, 512, 64)
    assert (lat2 - lat).norm() / lat.norm() < 0.05  # e4m3: 3 mantissa bits
    torch.testing.assert_close(rope2, rope.bfloat16().float())
    scales = packed[..., 512:528].contiguous().view(torch.float32)
    assert torch.equal(torch.exp2(torch.log2(scales).round()), scales)  # powers of two
    odd = fp8_pack_latent(torch.randn(1, 2, 64), torch.randn(1, 2, 16))  # a partial tile
    assert odd.shape[-1] == 64 + 4 + 32 == ModelConfig.small().kv_bytes_per_token_per_layer("mla_fp8")
    with pytest.raises(ValueError, match="uint8"):
        fp8_unpack_latent(packed, 256, 64)


def test_decode_step_time_and_stack():
    mla = MLA(ModelConfig.tiny())
    assert decode_step_time(mla, 32, "absorbed", repeats=2) > 0
    stack = MLAStack(ModelConfig.tiny(), num_layers=2)
    maps = stack.attention_maps(torch.randint(0, 128, (1, 6)))
    assert maps.shape == (2, 1, 4, 6, 6)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 1, 4, 6))
    assert maps.triu(1).abs().max() == 0  # causal


def test_figures():
    cfg = ModelConfig.deepseek_v32()
    assert isinstance(viz.low_rank_figure([3.0, 2.0, 1.0, 0.1], {"r": 2}), go.Figure)
    plain = rope_inv_freq(cfg.replace(rope_scaling=None)).tolist()
    fig = viz.rope_frequencies_figure(plain, rope_inv_freq(cfg).tolist(), *yarn_correction_range(cfg))
    assert isinstance(fig, go.Figure)
    assert isinstance(viz.decode_time_figure([16, 32], {"naive": [1e-3, 2e-3], "absorbed": [1e-4, 1e-4]}), go.Figure)
    fig = viz.mla_costs_figure(decode_costs(cfg, 4096))
    assert len(fig.data) == 2 and list(fig.data[0].x) == ["MHA", "GQA-8", "MLA", "MLA FP8"]
    assert isinstance(viz.attention_heatmap(torch.rand(4, 4).tolist()), go.Figure)


def test_exercise_1():
    assert ch2.check_absorbed_score(ch2.solution_absorbed_score)

    def stub(*args):
        raise NotImplementedError

    assert "stub" in ch2.check_absorbed_score(stub).message
    no_scale = lambda qn, qr, c, kr, w, s: c @ (w.T @ qn) + kr @ qr  # noqa: E731
    assert "scale" in ch2.check_absorbed_score(no_scale).message
    no_rope = lambda qn, qr, c, kr, w, s: (c @ (w.T @ qn)) * s  # noqa: E731
    assert "position part is missing" in ch2.check_absorbed_score(no_rope).message


def test_exercise_2():
    assert ch2.check_cache_bytes_per_token(ch2.solution_cache_bytes_per_token)
    one_layer = lambda cfg, b: (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * b  # noqa: E731
    assert "one layer" in ch2.check_cache_bytes_per_token(one_layer).message
    mha = lambda cfg, b: cfg.kv_bytes_per_token_per_layer("mha", dtype_bytes=b) * cfg.num_hidden_layers  # noqa: E731
    assert "MHA" in ch2.check_cache_bytes_per_token(mha).message
    no_rope = lambda cfg, b: cfg.kv_lora_rank * cfg.num_hidden_layers * b  # noqa: E731
    assert "rope key" in ch2.check_cache_bytes_per_token(no_rope).message


def test_exercise_3():
    assert ch2.check_merged_output_weight(ch2.solution_merged_output_weight)
    wrong_shape = lambda mla: mla.o_proj.weight  # noqa: E731
    assert "shape" in ch2.check_merged_output_weight(wrong_shape).message
    wrong = lambda mla: torch.zeros(mla.config.hidden_size, mla.num_heads * mla.kv_lora_rank)  # noqa: E731
    assert not ch2.check_merged_output_weight(wrong)
