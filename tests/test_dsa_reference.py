"""The outside oracle: transformers' `deepseek_v32` attention (MLA + indexer, eager, fp32) with the same random
weights selects the same tokens and gives the same output as `dslib.sparse.DSAttention`."""
import pytest
import torch
from oracle import need_transformers

from dslib.config import ModelConfig
from dslib.sparse import AttentionStats, DSAttention

need_transformers(module_level=True)
from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hf  # noqa: E402
from transformers.models.deepseek_v32.configuration_deepseek_v32 import DeepseekV32Config  # noqa: E402

# 8 indexer heads: with fewer, ReLU often makes index scores exactly 0, and the order among tied keys is the
# kernel's choice in transformers (torch.topk) but by key position in dslib, so the selections could differ.
SIZES = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
    qk_rope_head_dim=8, v_head_dim=8, index_n_heads=8, index_head_dim=16, index_topk=5,
    n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
    max_position_embeddings=128,
)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}


def _pair(rope_scaling):
    hf_rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
        hf_rope = {"rope_theta": 10000.0, **{("rope_type" if k == "type" else k): v for k, v in rope_scaling.items()}}
    hcfg = DeepseekV32Config(**SIZES, rope_parameters=hf_rope, attention_dropout=0.0)
    hcfg._attn_implementation = "eager"
    ref = hf.DeepseekV32Attention(hcfg, layer_idx=0).eval()
    rotary = hf.DeepseekV32RotaryEmbedding(hcfg)
    with torch.no_grad():  # random norms too (HF initialises them to ones / zeros)
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
    cfg = ModelConfig.tiny(**SIZES, rope_scaling=rope_scaling, n_shared_experts=1)
    ours = DSAttention(cfg)
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, rotary, ours


def _run_hf(ref, rotary, h):
    B, T, _ = h.shape
    pos = torch.arange(T).unsqueeze(0).expand(B, T)
    cos_sin = rotary(h, pos)
    mask = torch.full((T, T), float("-inf")).triu(1).expand(B, 1, T, T)
    captured = {}
    handle = ref.indexer.register_forward_hook(lambda m, a, out: captured.setdefault("idx", out))
    with torch.no_grad():
        out, _ = ref(h, cos_sin, mask, position_ids=pos)
    handle.remove()
    return out, captured["idx"].long()


@pytest.mark.parametrize("rope_scaling", [None, YARN], ids=["plain_rope", "yarn"])
def test_same_selection_and_output_as_transformers(rope_scaling):
    ref, rotary, ours = _pair(rope_scaling)
    B, T = 2, 19
    h = torch.randn(B, T, SIZES["hidden_size"])
    out_ref, idx_ref = _run_hf(ref, rotary, h)
    stats = AttentionStats()
    with torch.no_grad():
        out = ours(h, attention="sparse", stats=stats)
        out_naive = ours(h, attention="sparse", mode="naive")
    sel = stats.selected
    k = SIZES["index_topk"]
    for b in range(B):
        for t in range(T):
            theirs = sorted(i for i in idx_ref[b, t].tolist() if i <= t)  # HF also returns future keys for t < k
            mine = sorted(i for i in sel[b, t].tolist() if i >= 0)
            assert mine == theirs, (b, t)
            assert len(mine) == min(t + 1, k)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_naive, out_ref, rtol=1e-4, atol=1e-5)


def test_dense_when_sequence_fits_budget():
    ref, rotary, ours = _pair(None)
    h = torch.randn(1, SIZES["index_topk"], SIZES["hidden_size"])
    with torch.no_grad():
        torch.testing.assert_close(ours(h, attention="sparse"), ours(h, attention="dense"), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(h, attention="sparse"), _run_hf(ref, rotary, h)[0], rtol=1e-4, atol=1e-5)
