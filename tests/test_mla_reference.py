"""dslib.mla against transformers' deepseek_v3 / deepseek_v32 attention (the outside oracle), fp32, eager.

Same random weights on both sides (transformers' state dict loaded into dslib with `load_weights`); plain RoPE and
YaRN configs; prefill and cached decode. REFERENCE.md §9.2: HF's interleaved RoPE writes [even | odd], so cached
k_rope is a permutation of dslib's (scores are unchanged); keep mscale == mscale_all_dim for YaRN.
"""
import pytest
import torch
from oracle import need_transformers

from dslib.config import ModelConfig
from dslib.mla import MLA, LatentCache, load_weights
from dslib.rope import softmax_scale

need_transformers(module_level=True)
from transformers import DeepseekV3Config, DeepseekV32Config  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding  # noqa: E402
from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Attention, DeepseekV32RotaryEmbedding  # noqa: E402

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}
CONFIGS = {
    "rope": ModelConfig.tiny(),
    "yarn": ModelConfig.tiny(qk_rope_head_dim=16, rope_scaling=YARN),
}


def hf_config(cfg: ModelConfig, cls):
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = dict(cfg.rope_scaling, rope_theta=cfg.rope_theta)
        rope["rope_type"] = rope.pop("type")
    kw = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rope_parameters=rope, num_hidden_layers=1,
        n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2,
    )
    if cls is DeepseekV32Config:
        kw.update(index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk)
    hf = cls(**kw)
    hf._attn_implementation = "eager"
    return hf


def randomize(module: torch.nn.Module):
    """Random weights with visible effect (norm weights != 1)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2)


def causal_additive(T, S, offset=0):
    allowed = torch.arange(S)[None, :] <= (torch.arange(T) + offset)[:, None]
    return torch.zeros(T, S).masked_fill(~allowed, float("-inf"))[None, None]  # [1, 1, T, S]


def build(cfg, version="v3"):
    torch.manual_seed(0)
    if version == "v3":
        hf_cfg = hf_config(cfg, DeepseekV3Config)
        attn, rot = DeepseekV3Attention(hf_cfg, layer_idx=0), DeepseekV3RotaryEmbedding(hf_cfg)
    else:
        hf_cfg = hf_config(cfg, DeepseekV32Config)
        attn, rot = DeepseekV32Attention(hf_cfg, layer_idx=0), DeepseekV32RotaryEmbedding(hf_cfg)
    attn.eval()
    randomize(attn)
    ours = MLA(cfg).eval()
    sd = {k: v for k, v in attn.state_dict().items() if not k.startswith("indexer.")}
    load_weights(ours, sd)
    return hf_cfg, attn, rot, ours


@pytest.mark.parametrize("name", list(CONFIGS))
def test_softmax_scale_matches_transformers(name):
    _, attn, _, ours = build(CONFIGS[name])
    assert ours.softmax_scale == pytest.approx(attn.scaling, rel=1e-12)
    assert softmax_scale(CONFIGS[name]) == pytest.approx(attn.scaling, rel=1e-12)


@pytest.mark.parametrize("mode", ["absorbed", "naive"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_matches_deepseek_v3(name, mode):
    cfg = CONFIGS[name]
    _, attn, rot, ours = build(cfg)
    B, T = 2, 12
    h = torch.randn(B, T, cfg.hidden_size)
    pos = torch.arange(T)[None].expand(B, T)
    with torch.no_grad():
        expected, hf_probs = attn(h, rot(h, pos), causal_additive(T, T))
        got = ours(h, mode=mode)
        probs = ours.attention_probs(h)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs, hf_probs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decode_matches_deepseek_v3(name):
    """Prefill 6 tokens then decode 3 one by one, on both sides with their caches."""
    cfg = CONFIGS[name]
    hf_cfg, attn, rot, ours = build(cfg)
    B, T0, n = 2, 6, 3
    h = torch.randn(B, T0 + n, cfg.hidden_size)
    hf_cache, cache = DynamicCache(config=hf_cfg), LatentCache()
    outs_hf, outs = [], []
    with torch.no_grad():
        for start, end in [(0, T0)] + [(t, t + 1) for t in range(T0, T0 + n)]:
            pos = torch.arange(start, end)[None].expand(B, -1)
            mask = causal_additive(end - start, end, start)
            outs_hf.append(attn(h[:, start:end], rot(h, pos), mask, cache=hf_cache)[0])
            outs.append(ours(h[:, start:end], cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), torch.cat(outs_hf, 1), rtol=1e-5, atol=1e-5)
    # HF's cache: "keys" = latent [B, 1, S, c], "values" = k_rope in [even | odd] order (REFERENCE §9.2 item 7)
    layer = hf_cache.layers[0]
    r = cfg.qk_rope_head_dim
    perm = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2)])
    torch.testing.assert_close(cache.kv_latent, layer.keys[:, 0])
    torch.testing.assert_close(cache.k_rope[..., perm], layer.values[:, 0])
    assert not torch.allclose(cache.k_rope, layer.values[:, 0])  # genuinely permuted


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dense_deepseek_v32_attention(name):
    """DeepseekV32Attention with index_topk >= seq_len selects every causal key: equal to dslib's dense MLA."""
    cfg = CONFIGS[name].replace(index_topk=16)
    _, attn, rot, ours = build(cfg, "v32")
    B, T = 2, 12
    h = torch.randn(B, T, cfg.hidden_size)
    pos = torch.arange(T)[None].expand(B, T)
    with torch.no_grad():
        expected, _ = attn(h, rot(h, pos), causal_additive(T, T), position_ids=pos)
        got = ours(h)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
