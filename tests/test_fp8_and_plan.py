"""FP8 block (de)quantisation, the checkpoint's tensor table, and the device memory plan (chapter 5)."""
from __future__ import annotations

import pytest
import torch

from dslib.checkpoint import (
    FP8_DTYPE,
    CheckpointError,
    RandomSource,
    checkpoint_tensors,
    dequantize_fp8_blocks,
    is_fp8_weight,
    quantize_fp8_blocks,
    scale_shape,
)
from dslib.config import ModelConfig
from dslib.devices import DevicePlanError, gpus_needed, module_bytes, plan_devices

H200 = 150.75e9  # bytes one project H200 reports (REFERENCE.md §8.4)


# ------------------------------------------------------------------------------------------- FP8 blocks
def test_fp8_roundtrip_576_rows_partial_block():
    """REFERENCE §9.1 #9: kv_a_proj_with_mqa has 576 rows -> 5 row blocks, the last one partial."""
    w = torch.randn(576, 300) * 0.02
    q, s = quantize_fp8_blocks(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert s.shape == (5, 3) == scale_shape((576, 300)) and s.dtype == torch.float32
    back = dequantize_fp8_blocks(q, s)
    # e4m3 keeps 3 mantissa bits: relative error per element <= 2^-4 of the block's scale range
    blockwise_max = s.repeat_interleave(128, 0)[:576].repeat_interleave(128, 1)[:, :300] * 448
    assert ((back - w).abs() <= blockwise_max / 16 + 1e-12).all()
    cos = torch.nn.functional.cosine_similarity(back.flatten(), w.flatten(), dim=0)
    assert cos > 0.999
    # the last (partial) row block has its own scale, from rows 512..575 only
    assert torch.allclose(s[4], w[512:].abs().reshape(64, -1).amax(0).new_tensor(
        [w[512:, c * 128:(c + 1) * 128].abs().max() / 448 for c in range(3)]))


def test_dequantize_is_exact_and_requantize_is_stable():
    w = torch.randn(256, 384)
    q, s = quantize_fp8_blocks(w)
    d1 = dequantize_fp8_blocks(q, s)
    assert torch.equal(d1, q.float() * s.repeat_interleave(128, 0).repeat_interleave(128, 1))
    q2, s2 = quantize_fp8_blocks(d1, scale_fmt=None)  # already on the grid: nothing changes
    assert torch.equal(dequantize_fp8_blocks(q2, s2), d1)


def test_ue8m0_scales_are_powers_of_two():
    q, s = quantize_fp8_blocks(torch.randn(200, 130), scale_fmt="ue8m0")
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    assert dequantize_fp8_blocks(q, s).abs().max() <= s.max() * 448


def test_dequantize_rejects_wrong_scale_shape():
    q, s = quantize_fp8_blocks(torch.randn(256, 256))
    with pytest.raises(CheckpointError, match="weight_scale_inv of shape"):
        dequantize_fp8_blocks(q, s[:1])


# ------------------------------------------------------------------------------------------- tensor table
def test_full_size_checkpoint_bytes_match_reference():
    """REFERENCE §7.3: 689,468,986,496 B with the MTP layer, 674.03 GB without."""
    cfg = ModelConfig.deepseek_v32()
    with_mtp = checkpoint_tensors(cfg, fp8=True, mtp=True)
    without = checkpoint_tensors(cfg, fp8=True)
    assert sum(s.nbytes for s in with_mtp.values()) == 689_468_986_496
    assert round(sum(s.nbytes for s in without.values()) / 1e9, 2) == 674.03
    t = without
    assert t["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (5, 56)
    assert t["model.layers.5.mlp.experts.17.gate_proj.weight_scale_inv"].shape == (16, 56)
    assert t["model.layers.3.mlp.gate.weight"].dtype == torch.bfloat16  # router not quantised
    assert t["model.layers.3.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert t["model.layers.9.self_attn.indexer.weights_proj.weight"].dtype == torch.bfloat16
    assert t["model.layers.9.self_attn.indexer.wk.weight"].dtype == FP8_DTYPE
    assert "model.layers.2.mlp.gate_proj.weight" in t and "model.layers.3.mlp.gate_proj.weight" not in t


def test_is_fp8_weight():
    assert is_fp8_weight("model.layers.0.self_attn.q_a_proj.weight", (1536, 7168))
    assert not is_fp8_weight("lm_head.weight", (10, 10))
    assert not is_fp8_weight("model.layers.0.input_layernorm.weight", (7168,))


def test_random_source_is_seeded_per_tensor():
    cfg = ModelConfig.tiny()
    a, b = RandomSource(cfg, seed=1), RandomSource(cfg, seed=1)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    assert torch.equal(a.read(name), b.read(name))
    assert not torch.equal(a.read(name), RandomSource(cfg, seed=2).read(name))
    fp8 = RandomSource(cfg, seed=1, fp8=True)
    assert fp8.read(name).dtype == FP8_DTYPE and fp8.read(name + "_scale_inv").shape == (1, 1)
    assert set(fp8.specs()) == set(checkpoint_tensors(fp8.config, fp8=True))


# ------------------------------------------------------------------------------------------- device plan
def test_module_bytes_reference_numbers():
    """REFERENCE §8.6: a full MoE layer is 11.53 GB in FP8, a dense one 0.60 GB."""
    mb = module_bytes(ModelConfig.deepseek_v32(), "fp8")
    assert round(mb["model.layers.3"] / 1e9, 2) == 11.53
    assert round(mb["model.layers.0"] / 1e9, 2) == 0.60
    assert len(mb) == 61 + 3


def test_plan_8_h200_fits_and_is_contiguous():
    cfg = ModelConfig.deepseek_v32()
    plan = plan_devices(cfg, [H200] * 8, storage="fp8")
    assert set(plan.placement) == set(module_bytes(cfg))
    order = [int(d.split(":")[1]) for d in plan.placement.values()]
    assert order == sorted(order)  # consecutive layers stay together
    for dev, used in plan.used.items():
        assert used <= plan.capacity[plan.devices.index(dev)]
    assert sum(plan.used.values()) == plan.total_bytes
    assert plan.placement["model.embed_tokens"] == "cuda:0" and plan.placement["lm_head"] == "cuda:7"


def test_plan_too_small_says_how_much_is_needed():
    cfg = ModelConfig.deepseek_v32()
    need = gpus_needed(cfg, H200)
    with pytest.raises(DevicePlanError, match=r"674\.03 GB.*at least %d device" % need):
        plan_devices(cfg, [H200] * 4)
    with pytest.raises(DevicePlanError, match="alone needs 11.53 GB"):
        plan_devices(cfg, [10e9] * 100)
    assert need <= 8 and gpus_needed(cfg, H200, storage="bf16") > 8


def test_plan_small_model_with_pretend_gpus():
    cfg = ModelConfig.small()
    mb = module_bytes(cfg, "fp32")
    total = sum(mb.values())
    plan = plan_devices(cfg, [total * 0.7] * 2, storage="fp32", reserve_fraction=0.0)
    assert set(plan.placement.values()) == {"cuda:0", "cuda:1"}
    assert max(plan.used.values()) <= total * 0.7
