"""RoPE layouts and YaRN (dslib.rope) against the formulas of REFERENCE.md §2.3-2.5 and against transformers."""

import pytest
import torch
from oracle import need_transformers

from dslib.config import ConfigError, ModelConfig
from dslib.rope import (
    RotaryEmbedding,
    apply_rope_half,
    apply_rope_interleaved,
    rope_inv_freq,
    softmax_scale,
    yarn_correction_range,
)


def test_softmax_scale_671b():
    cfg = ModelConfig.deepseek_v32()
    assert softmax_scale(cfg) == pytest.approx(0.135234, abs=5e-7)
    assert softmax_scale(cfg.replace(rope_scaling=None)) == pytest.approx(0.072169, abs=5e-7)


def test_yarn_range_and_frequencies_671b():
    cfg = ModelConfig.deepseek_v32()
    assert yarn_correction_range(cfg) == (10, 23)
    theta = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    freq = rope_inv_freq(cfg).double()
    assert freq.shape == (32,) and rope_inv_freq(cfg).dtype == torch.float32
    torch.testing.assert_close(freq[:11], theta[:11], rtol=1e-6, atol=0)  # fast dims kept
    torch.testing.assert_close(freq[23:], theta[23:] / 40, rtol=1e-6, atol=0)  # slow dims slowed 40x
    r = (torch.arange(32, dtype=torch.float64) - 10) / 13
    torch.testing.assert_close(freq, (1 - r.clamp(0, 1)) * theta + r.clamp(0, 1) * theta / 40, rtol=1e-6, atol=0)


def test_frequencies_match_transformers():
    need_transformers()
    from transformers import DeepseekV32Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(ModelConfig.deepseek_v32().rope_scaling)
    rope["rope_type"] = rope.pop("type")
    hf = DeepseekV32Config(rope_parameters=dict(rope, rope_theta=10000.0))  # the 671B rope, YaRN factor 40
    inv, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    torch.testing.assert_close(rope_inv_freq(ModelConfig.deepseek_v32()), inv, rtol=0, atol=0)
    assert attention_factor == 1.0  # mscale == mscale_all_dim: cos/sin are not rescaled


def test_plain_rope_frequencies():
    cfg = ModelConfig.tiny()
    expected = 1.0 / cfg.rope_theta ** (torch.arange(0, 8, 2).float() / 8)
    torch.testing.assert_close(rope_inv_freq(cfg), expected)
    assert softmax_scale(cfg) == pytest.approx(cfg.qk_head_dim ** -0.5)


def test_mismatched_mscale_is_rejected():
    cfg = ModelConfig.deepseek_v32()
    bad = dict(cfg.rope_scaling, mscale=0.707)
    with pytest.raises(ConfigError, match="mscale_all_dim"):
        softmax_scale(cfg.replace(rope_scaling=bad))


def test_rotary_embedding_shapes_and_no_state():
    cfg = ModelConfig.small()
    rot = RotaryEmbedding(cfg)
    assert len(rot.state_dict()) == 0
    cos, sin = rot(torch.arange(5))
    assert cos.shape == sin.shape == (5, cfg.qk_rope_head_dim // 2) and cos.dtype == torch.float32
    cos_b, _ = rot(torch.arange(10).view(2, 5))
    assert cos_b.shape == (2, 5, cfg.qk_rope_head_dim // 2)
    torch.testing.assert_close(cos_b[0], cos)
    with pytest.raises(ValueError, match="integer"):
        rot(torch.arange(5).float())


def test_frequencies_survive_bf16_cast():
    """model.to(bfloat16) must not round the frequency table (angles reach 1e5 radians at long context)."""
    cfg = ModelConfig.small()
    rot = RotaryEmbedding(cfg).to(torch.bfloat16)
    assert rot.inv_freq.dtype == torch.float32
    torch.testing.assert_close(rot(torch.arange(4000, 4004))[0], RotaryEmbedding(cfg)(torch.arange(4000, 4004))[0])


def _reference_interleaved_complex(x, angles):
    """DeepSeek's reference: view pairs (2i, 2i+1) as complex numbers, multiply by e^{i φ}."""
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def test_interleaved_matches_complex_rotation():
    x = torch.randn(2, 5, 3, 8)
    angles = torch.randn(5, 4).double()
    out = apply_rope_interleaved(x, angles.cos().float(), angles.sin().float())
    reference = _reference_interleaved_complex(x, angles[None, :, None])
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-6)
    # no dims between T and rope_dim (the shared k_rope) and per-batch cos/sin
    k = torch.randn(2, 5, 8)
    ab = torch.randn(2, 5, 4)
    out = apply_rope_interleaved(k, ab.cos(), ab.sin())
    torch.testing.assert_close(out.double(), _reference_interleaved_complex(k, ab.double()), rtol=1e-5, atol=1e-6)


def test_half_split_complex_vs_rotate_half():
    """REFERENCE §9.1 check 8: half-split RoPE via complex numbers == the rotate-half form."""
    x = torch.randn(2, 5, 3, 8)
    angles = torch.randn(5, 4)
    out = apply_rope_half(x, angles.cos(), angles.sin())
    rotation = torch.polar(torch.ones(5, 4).double(), angles.double())[:, None]
    z = torch.complex(x[..., :4].double(), x[..., 4:].double()) * rotation
    torch.testing.assert_close(out.double(), torch.cat([z.real, z.imag], -1), rtol=1e-5, atol=1e-6)
    need_transformers()  # and the same with transformers' rotate-half
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb

    emb = torch.cat([angles, angles], -1)
    hf, _ = apply_rotary_pos_emb(x, x, emb.cos()[None], emb.sin()[None], unsqueeze_dim=2)
    torch.testing.assert_close(out, hf)


def test_interleaved_vs_transformers_is_a_permutation():
    """transformers writes the interleaved result as [even | odd] (REFERENCE §9.2 item 7)."""
    need_transformers()
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    x = torch.randn(1, 4, 2, 8)
    angles = torch.randn(4, 4)
    ours = apply_rope_interleaved(x, angles.cos(), angles.sin())
    emb = torch.cat([angles, angles], -1)
    hf, _ = apply_rotary_pos_emb_interleave(x, x, emb.cos()[None], emb.sin()[None], unsqueeze_dim=2)
    perm = torch.cat([torch.arange(0, 8, 2), torch.arange(1, 8, 2)])
    torch.testing.assert_close(ours[..., perm], hf)


def test_relative_position_property():
    """q(p)·k(s) after rotation depends only on p - s."""
    rot = RotaryEmbedding(ModelConfig.small())
    q, k = torch.randn(1, 1, 16), torch.randn(1, 1, 16)

    def dot(p, s):
        cq, sq = rot(torch.tensor([p]))
        ck, sk = rot(torch.tensor([s]))
        return (apply_rope_interleaved(q, cq, sq) * apply_rope_interleaved(k, ck, sk)).sum()

    torch.testing.assert_close(dot(7, 3), dot(104, 100), rtol=1e-4, atol=1e-4)


def test_dtype_kept_and_errors():
    x = torch.randn(1, 3, 8, dtype=torch.bfloat16)
    cos, sin = torch.ones(3, 4), torch.zeros(3, 4)
    assert apply_rope_interleaved(x, cos, sin).dtype == torch.bfloat16
    torch.testing.assert_close(apply_rope_half(x, cos, sin), x)  # zero angle = identity
    with pytest.raises(ValueError, match="last dim"):
        apply_rope_interleaved(torch.randn(1, 3, 6), cos, sin)
    with pytest.raises(ValueError, match="T = 3"):
        apply_rope_interleaved(x, torch.ones(4, 4), torch.zeros(4, 4))
