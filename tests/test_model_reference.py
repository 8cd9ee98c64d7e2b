"""The outside oracle for the whole model: a random transformers `DeepseekV32ForCausalLM` saved with
`save_pretrained` loads with `dslib.load_pretrained` and gives the same logits and greedy continuation; the same
checkpoint quantised to FP8 blocks loads to exactly the dequantised weights (chapter 5)."""
from __future__ import annotations

import pytest
import torch
from oracle import need_transformers

import dslib
from dslib.checkpoint import SafetensorsSource, dequantize_fp8_blocks, write_checkpoint

need_transformers(module_level=True)
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM  # noqa: E402

# index_topk 4 < prompt length 14: DSA is really sparse. 8 indexer heads: with very few heads, ReLU makes many
# index scores exactly 0 and top-k ties would be broken differently by differently shaped calls.
SIZES = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
    qk_rope_head_dim=8, v_head_dim=8, index_n_heads=8, index_head_dim=16, index_topk=4, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
    max_position_embeddings=256,
)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
PLAIN = {"rope_type": "default", "rope_theta": 10000.0}
PROMPT = 14


def _hf_model(rope):
    torch.manual_seed(0)
    hcfg = DeepseekV32Config(**SIZES, rope_parameters=dict(rope))
    hcfg._attn_implementation = "eager"
    model = DeepseekV32ForCausalLM(hcfg).eval()
    with torch.no_grad():  # HF initialises norms to 1/0 and the router bias to 0: make them random
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model


@pytest.fixture(scope="module", params=[PLAIN, YARN], ids=["plain_rope", "yarn"])
def hf_checkpoint(request, tmp_path_factory):
    model = _hf_model(request.param)
    path = tmp_path_factory.mktemp("hf_tiny")
    model.save_pretrained(path)
    return model, path


def _prompt():
    return torch.randint(0, SIZES["vocab_size"], (2, PROMPT), generator=torch.Generator().manual_seed(1))


def test_logits_match_transformers(hf_checkpoint):
    hf, path = hf_checkpoint
    model = dslib.load_pretrained(path, progress=False)
    ids = _prompt()
    with torch.no_grad():
        ref = hf(ids).logits
        for mode in ("absorbed", "naive"):
            torch.testing.assert_close(model(ids, mode=mode), ref, rtol=1e-5, atol=2e-6)


def test_greedy_generation_matches_transformers(hf_checkpoint):
    hf, path = hf_checkpoint
    model = dslib.load_pretrained(path, progress=False)
    ids = _prompt()
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, 8)
    assert torch.equal(cached, ref)
    assert torch.equal(model.generate(ids, 8, use_cache=False), cached)


def test_cached_logits_equal_full_forward(hf_checkpoint):
    _, path = hf_checkpoint
    model = dslib.load_pretrained(path, progress=False)
    ids = torch.randint(0, SIZES["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        steps = [model(ids[:, :9], cache)] + [model(ids[:, t : t + 1], cache) for t in range(9, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=2e-6)
    assert len(cache) == 20


def test_fp8_checkpoint_loads_exact_dequantised_weights(hf_checkpoint, tmp_path):
    hf, path = hf_checkpoint
    fp8_dir = write_checkpoint(SafetensorsSource(path), tmp_path / "fp8", fp8=True, progress=False)
    stored = SafetensorsSource(fp8_dir)
    assert stored.config.quantization_config["weight_block_size"] == [128, 128]
    specs = stored.specs()
    assert specs["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert specs["lm_head.weight"].dtype == torch.float32  # not quantised
    model = dslib.load_pretrained(fp8_dir, progress=False)
    sd = model.state_dict()
    for name, spec in specs.items():
        if spec.dtype == torch.float8_e4m3fn:
            want = dequantize_fp8_blocks(stored.read(name), stored.read(name + "_scale_inv"))
            assert torch.equal(sd[name], want), name
    # transformers on the same dequantised weights (saved by dslib, read by transformers' own loader)
    deq_dir = dslib.checkpoint.save_pretrained(model, tmp_path / "dequantised", progress=False)
    hf_deq = DeepseekV32ForCausalLM.from_pretrained(deq_dir, attn_implementation="eager").eval()
    ids = _prompt()
    with torch.no_grad():
        ref = hf_deq(ids).logits
        torch.testing.assert_close(model(ids), ref, rtol=1e-5, atol=2e-6)
        # against the original (unquantised) weights: FP8 error, small in the global cosine measure of
        # FlashMLA/DeepGEMM's tests, 1 - 2 sum(x y) / sum(x^2 + y^2) (REFERENCE.md §9.1)
        x, y = model(ids).double(), hf(ids).logits.double()
    diff = float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())
    print(f"FP8 vs original weights, logits cosine difference: {diff:.2e}")
    assert 0 < diff < 1e-2
