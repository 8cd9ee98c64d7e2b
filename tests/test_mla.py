"""MLA (dslib.mla): parameter names, naive == absorbed, cached decode == full forward, cache and loading errors."""
import pytest
import torch

from dslib.config import ModelConfig
from dslib.cost import attention_flops, kv_bytes_read
from dslib.mla import MLA, LatentCache, WeightLoadError, load_weights

EXPECTED_KEYS = {
    "q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight",
    "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight",
}


def make_mla(cfg=None, seed=0):
    torch.manual_seed(seed)
    cfg = cfg or ModelConfig.tiny()
    mla = MLA(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights so a wrong norm placement shows
        if cfg.q_lora_rank:
            mla.q_a_layernorm.weight.uniform_(0.5, 1.5)
        mla.kv_a_layernorm.weight.uniform_(0.5, 1.5)
    return mla


def test_parameter_names_and_shapes():
    cfg = ModelConfig.tiny()
    sd = MLA(cfg).state_dict()
    assert set(sd) == EXPECTED_KEYS
    H = cfg.num_attention_heads
    assert sd["kv_a_proj_with_mqa.weight"].shape == (cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.hidden_size)
    assert sd["kv_b_proj.weight"].shape == (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    assert sd["q_b_proj.weight"].shape == (H * cfg.qk_head_dim, cfg.q_lora_rank)
    assert sd["o_proj.weight"].shape == (cfg.hidden_size, H * cfg.v_head_dim)
    no_q_lora = set(MLA(cfg.replace(q_lora_rank=None)).state_dict())
    low_rank_q = {"q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"}
    assert no_q_lora == EXPECTED_KEYS - low_rank_q | {"q_proj.weight"}
    # parameter count agrees with the config's accounting (REFERENCE §1.2)
    assert sum(p.numel() for p in MLA(cfg).parameters()) == cfg.param_counts()["attention"]


def test_weight_views():
    mla = make_mla()
    cfg = mla.config
    w = mla.kv_b_proj.weight.view(cfg.num_attention_heads, -1, cfg.kv_lora_rank)
    assert mla.w_uk().shape == (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank)
    assert mla.w_uv().shape == (cfg.num_attention_heads, cfg.v_head_dim, cfg.kv_lora_rank)
    torch.testing.assert_close(torch.cat([mla.w_uk(), mla.w_uv()], 1), w)


@pytest.mark.parametrize("cfg", [ModelConfig.tiny(), ModelConfig.small(num_attention_heads=4),
                                 ModelConfig.tiny(q_lora_rank=None)],
                         ids=["tiny", "small-yarn", "no-q-lora"])
def test_naive_equals_absorbed_prefill(cfg):
    mla = make_mla(cfg)
    h = torch.randn(2, 12, cfg.hidden_size)
    torch.testing.assert_close(mla(h, mode="absorbed"), mla(h, mode="naive"), rtol=1e-5, atol=1e-5)


def test_naive_equals_absorbed_with_mask():
    mla = make_mla()
    h = torch.randn(2, 10, mla.config.hidden_size)
    mask = torch.rand(2, 10, 10) < 0.5
    mask[..., 0] = True  # keep one visible key per row
    pos = torch.arange(10)
    _, q_nope, q_rope, lat, kr, _ = mla._project(h, pos)
    absorbed = mla.attend(q_nope, q_rope, lat, kr, pos, mask=mask)
    torch.testing.assert_close(absorbed, mla.attend(q_nope, q_rope, lat, kr, pos, mode="naive", mask=mask),
                               rtol=1e-5, atol=1e-5)
    # the mask really changes the result
    assert not torch.allclose(absorbed, mla.attend(q_nope, q_rope, lat, kr, pos))


def test_mask_equals_dropping_keys():
    """Masking out all keys but a subset == attending only over that subset of latents."""
    mla = make_mla()
    h = torch.randn(1, 9, mla.config.hidden_size)
    pos = torch.arange(9)
    cos, sin = mla.rotary(pos)
    _, q_nope, q_rope = mla.project_q(h, cos, sin)
    lat, kr = mla.project_kv(h, cos, sin)
    keep = torch.tensor([0, 2, 3, 7])
    mask = torch.zeros(1, 1, 9, dtype=torch.bool)
    mask[..., keep] = True
    out = mla.attend(q_nope[:, -1:], q_rope[:, -1:], lat, kr, pos[-1:], mask=mask)
    # same thing with only the kept keys, queried at a position after all of them
    sub = mla.attend(q_nope[:, -1:], q_rope[:, -1:], lat[:, keep], kr[:, keep], torch.tensor([3]))
    torch.testing.assert_close(out, sub, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["absorbed", "naive"])
def test_incremental_decode_equals_full_forward(mode):
    cfg = ModelConfig.small(num_attention_heads=4)
    mla = make_mla(cfg)
    h = torch.randn(2, 11, cfg.hidden_size)
    full = mla(h, mode=mode)
    cache = LatentCache()
    steps = [mla(h[:, :5], cache=cache, mode=mode)]  # prefill 5 tokens
    steps += [mla(h[:, t : t + 1], cache=cache, mode=mode) for t in range(5, 9)]  # decode one by one
    steps.append(mla(h[:, 9:], cache=cache, mode=mode))  # a chunk of 2
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert len(cache) == 11


def test_cached_latent_is_what_project_kv_gives():
    mla = make_mla()
    h = torch.randn(1, 6, mla.config.hidden_size)
    cache = LatentCache()
    mla(h, cache=cache)
    cos, sin = mla.rotary(torch.arange(6))
    lat, kr = mla.project_kv(h, cos, sin)
    torch.testing.assert_close(cache.kv_latent, lat)
    torch.testing.assert_close(cache.k_rope, kr)


def test_cache_bytes_per_token():
    cfg = ModelConfig.tiny()
    mla = make_mla(cfg)
    cache = LatentCache()
    mla(torch.randn(3, 7, cfg.hidden_size), cache=cache)
    per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert cache.nbytes == 3 * 7 * per_token * 4 == cache.kv_latent.nbytes + cache.k_rope.nbytes
    assert cache.nbytes // (3 * 7) == cfg.kv_bytes_per_token_per_layer("mla", dtype_bytes=4)
    mla16 = make_mla(cfg).to(torch.bfloat16)
    c16 = LatentCache()
    mla16(torch.randn(1, 5, cfg.hidden_size, dtype=torch.bfloat16), cache=c16)
    assert c16.nbytes == 5 * cfg.kv_bytes_per_token_per_layer("mla")


def test_cache_growth_and_limits():
    cache = LatentCache(max_len=4)
    a, b = cache.append(torch.randn(1, 3, 16), torch.randn(1, 3, 8))
    assert a.shape == (1, 3, 16) and b.shape == (1, 3, 8) and len(cache) == 3
    with pytest.raises(ValueError, match="max_len=4"):
        cache.append(torch.randn(1, 2, 16), torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match="batch"):
        cache.append(torch.randn(2, 1, 16), torch.randn(2, 1, 8))
    free = LatentCache()
    chunks = [torch.randn(1, 1, 4) for _ in range(40)]
    for c in chunks:
        lat, _ = free.append(c, c[..., :2])
    torch.testing.assert_close(lat, torch.cat(chunks, 1))
    with pytest.raises(ValueError, match="empty"):
        _ = LatentCache().kv_latent


def test_attend_errors():
    mla = make_mla()
    h = torch.randn(1, 4, mla.config.hidden_size)
    with pytest.raises(ValueError, match="mode"):
        mla(h, mode="fast")
    with pytest.raises(ValueError, match="hidden_size"):
        mla(torch.randn(1, 4, 3))
    with pytest.raises(ValueError, match="append the new tokens"):
        mla(h, positions=torch.arange(10, 14))  # positions beyond the keys without a cache
    with pytest.raises(ValueError, match="max_position_embeddings"):
        mla(h, positions=torch.arange(1000, 1004))
    _, q_nope, q_rope, lat, kr, _ = mla._project(h, torch.arange(4))
    with pytest.raises(ValueError, match="bool"):
        mla.attend(q_nope, q_rope, lat, kr, torch.arange(4), mask=torch.ones(1, 4, 4))


def test_load_weights_roundtrip_and_errors():
    src, dst = make_mla(seed=1), make_mla(seed=2)
    sd = {f"model.layers.0.self_attn.{k}": v.clone() for k, v in src.state_dict().items()}
    before = {k: v.clone() for k, v in sd.items()}
    load_weights(dst, sd, prefix="model.layers.0.self_attn.")
    h = torch.randn(1, 5, src.config.hidden_size)
    torch.testing.assert_close(dst(h), src(h))
    assert all(torch.equal(sd[k], before[k]) for k in sd)  # the caller's dict is untouched

    bad = dict(src.state_dict())
    bad["kv_b_proj.weight"] = bad["kv_b_proj.weight"][:-1]
    with pytest.raises(WeightLoadError, match=r"'kv_b_proj.weight' has shape \(63, 16\), expected \(64, 16\)"):
        load_weights(dst, bad)
    missing = {k: v for k, v in src.state_dict().items() if k != "o_proj.weight"}
    with pytest.raises(WeightLoadError, match="missing tensor 'o_proj.weight'"):
        load_weights(dst, missing)
    with pytest.raises(WeightLoadError, match="is the prefix 'model.layers.0.self_attn.'"):
        load_weights(dst, sd)  # forgot the prefix
    extra = dict(src.state_dict(), **{"indexer.wk.weight": torch.zeros(2, 2)})
    with pytest.raises(WeightLoadError, match="unexpected tensor 'indexer.wk.weight'"):
        load_weights(dst, extra)


def test_load_weights_generic_module():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    load_weights(other, {k: v.double() for k, v in net.state_dict().items()})  # cast to fp32
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    assert other[0].weight.dtype == torch.float32


@pytest.mark.parametrize("mode", ["absorbed", "naive"])
def test_flop_formula_matches_counted(mode):
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig.tiny()
    mla = make_mla(cfg)
    T, S = 3, 9
    q_nope = torch.randn(1, T, cfg.num_attention_heads, cfg.qk_nope_head_dim)
    q_rope = torch.randn(1, T, cfg.num_attention_heads, cfg.qk_rope_head_dim)
    lat, kr = torch.randn(1, S, cfg.kv_lora_rank), torch.randn(1, S, cfg.qk_rope_head_dim)
    with FlopCounterMode(display=False) as counter:
        mla.attend(q_nope, q_rope, lat, kr, torch.arange(S - T, S), mode=mode)
    assert counter.get_total_flops() == attention_flops(cfg, T, S, mode)["total"]


def test_bytes_read_671b():
    cfg = ModelConfig.deepseek_v32()
    assert kv_bytes_read(cfg, 1, "naive") == 81_920 == cfg.kv_bytes_per_token_per_layer("mha")
    assert kv_bytes_read(cfg, 1, "absorbed") == 1_152
    assert kv_bytes_read(cfg, 1, "absorbed") * cfg.num_hidden_layers == 70_272
    # REFERENCE §2.6/2.7: MACs per (query, key) pair, without the up-projection
    f_abs = attention_flops(cfg, 1, 1, "absorbed")
    f_nai = attention_flops(cfg, 1, 1, "naive")
    assert (f_abs["scores"] + f_abs["weighted_sum"]) // 2 == 139_264
    assert (f_nai["scores"] + f_nai["weighted_sum"]) // 2 == 40_960
