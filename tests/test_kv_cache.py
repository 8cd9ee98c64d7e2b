"""Chapter 1: the baseline decoder's KV cache. Cached == uncached, chunked == one-shot, bytes == formula, errors."""
import pytest
import torch
import torch.nn.functional as F

from dslib.attention import BaselineConfig, BaselineDecoder, causal_attention
from dslib.config import ConfigError, ModelConfig
from dslib.kv_cache import (
    CacheFullError,
    KVCache,
    SequenceBuffer,
    SequenceTooLongError,
    generate,
    kv_cache_sizes,
    memory_calculator,
    prefill,
)

KINDS = {"MHA": 4, "GQA": 2, "MQA": 1}


def tiny(kv_heads=2, **kw):
    cfg = BaselineConfig(**{**dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=kv_heads, intermediate_size=48,
                                   max_position_embeddings=64), **kw})
    return cfg, BaselineDecoder(cfg).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_config_kind(kind):
    cfg, _ = tiny(KINDS[kind])
    assert cfg.kind == kind and cfg.group_size == 4 // KINDS[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_cached_generation_equals_uncached(kind):
    cfg, model = tiny(KINDS[kind])
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    cached = generate(model, ids, 12)
    uncached = generate(model, ids, 12, use_cache=False)
    assert torch.equal(cached.tokens, uncached.tokens)
    torch.testing.assert_close(cached.logits, uncached.logits, rtol=1e-5, atol=1e-5)
    assert cached.tokens.shape == (2, 19) and cached.new_tokens.shape == (2, 12)
    assert len(cached.cache) == 18  # the last new token is never fed back
    assert cached.context_lens == list(range(7, 19))


@pytest.mark.parametrize("kind", KINDS)
def test_token_by_token_decode_equals_full_forward(kind):
    """REFERENCE §9.1 check 1: prefill n tokens, decode the rest one at a time; logits equal at every position."""
    cfg, model = tiny(KINDS[kind])
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        parts = [model(ids[:, :5], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(5, 16)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 7, 13, 100])
def test_chunked_prefill_equals_one_shot(chunk):
    cfg, model = tiny()
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    one_cache, chunk_cache = model.new_cache(), model.new_cache()
    one = prefill(model, ids, one_cache)
    chunked = prefill(model, ids, chunk_cache, chunk_size=chunk)
    torch.testing.assert_close(chunked, one, rtol=1e-5, atol=1e-5)
    for a, b in zip(one_cache.layers, chunk_cache.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(model, ids, 8, chunk_size=chunk).tokens, generate(model, ids, 8).tokens)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_matches_torch_sdpa(kv_heads):
    q = torch.randn(2, 4, 9, 8)
    k, v = torch.randn(2, kv_heads, 9, 8), torch.randn(2, kv_heads, 9, 8)
    ours = causal_attention(q, k, v, torch.arange(9))
    group = q.shape[1] // kv_heads  # each KV head serves `group` query heads (SDPA's enable_gqa, torch >= 2.5)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                         is_causal=True)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_attention_with_per_batch_positions():
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    pos = torch.tensor([[3, 4, 5], [0, 1, 2]])
    out = causal_attention(q, k, v, pos)
    for b in range(2):
        torch.testing.assert_close(out[b : b + 1], causal_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], pos[b]))
    # row b=1, t=0 sees only key 0: its output is value 0 of its KV head
    torch.testing.assert_close(out[1, :, 0], v[1].repeat_interleave(2, 0)[:, 0])


@pytest.mark.parametrize("dtype,nbytes", [(torch.float32, 4), (torch.bfloat16, 2)])
@pytest.mark.parametrize("kind", KINDS)
def test_cache_bytes_equal_formula(kind, dtype, nbytes):
    cfg, model = tiny(KINDS[kind])
    model = model.to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (3, 11))
    out = generate(model, ids, 6)
    assert out.cache.nbytes == cfg.kv_cache_bytes(len(out.cache), batch=3, dtype_bytes=nbytes)
    assert out.cache.nbytes == 3 * 16 * 2 * 2 * KINDS[kind] * 8 * nbytes  # B * S * layers * (K,V) * KVH * hd * bytes


def test_flop_formula_matches_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    cfg, model = tiny()
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    cache = model.new_cache()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, cache=cache)
    assert counter.get_total_flops() == cfg.forward_flops(10, batch=2)
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert counts["aten.bmm"] == cfg.attention_flops(10, 10, batch=2)  # the batched products are attention
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids[:, :1], cache=cache)
    assert counter.get_total_flops() == cfg.forward_flops(1, 11, batch=2)


def test_sequence_buffer_grows_and_keeps_data():
    buf = SequenceBuffer(seq_dim=1, max_len=100)
    chunks = [torch.randn(2, n, 3) for n in (5, 1, 20, 1, 40)]
    for c in chunks:
        out = buf.append(c)
    torch.testing.assert_close(out, torch.cat(chunks, 1))
    assert len(buf) == 67 and buf.capacity >= 67 and buf.nbytes == 2 * 67 * 3 * 4
    assert out.data_ptr() == buf.view().data_ptr()  # a view, not a copy


# ---------------------------------------------------------------------------------------------- errors
def test_generation_past_max_positions_is_rejected_before_work():
    cfg, model = tiny(max_position_embeddings=32)
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    too_long = r"20 tokens \+ 13 new tokens = 33 .*max_position_embeddings=32.*at most 12"
    with pytest.raises(SequenceTooLongError, match=too_long):
        generate(model, ids, 13)
    assert generate(model, ids, 12).tokens.shape == (1, 32)  # exactly fills the positions


def test_forward_past_max_positions():
    cfg, model = tiny(max_position_embeddings=16)
    with pytest.raises(SequenceTooLongError, match=r"positions 0..16 requested.*0..15"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = model.new_cache()
    model(torch.zeros(1, 15, dtype=torch.long), cache=cache)
    with pytest.raises(SequenceTooLongError, match=r"positions 15..16"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("heads,kv_heads", [(6, 4), (8, 3), (4, 8)])
def test_gqa_heads_must_divide(heads, kv_heads):
    message = rf"num_attention_heads={heads} is not divisible by num_key_value_heads={kv_heads}.*among \["
    with pytest.raises(ConfigError, match=message):
        BaselineConfig(hidden_size=48, num_attention_heads=heads, num_key_value_heads=kv_heads)


def test_bad_config_values():
    with pytest.raises(ConfigError, match="num_hidden_layers must be a positive integer"):
        BaselineConfig(num_hidden_layers=0)
    with pytest.raises(ConfigError, match="hidden_size=100 is not divisible by num_attention_heads=8"):
        BaselineConfig(hidden_size=100)
    assert BaselineConfig(hidden_size=100, head_dim=16).head_dim == 16


def test_cache_overflow_and_mismatch():
    cache = KVCache(num_layers=1, max_len=4)
    layer = cache[0]
    layer.append(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
    with pytest.raises(CacheFullError, match="cannot append 2 token.*max_len=4"):
        layer.append(torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8))
    with pytest.raises(ValueError, match="batch size, heads, width, dtype and device must stay the same"):
        layer.append(torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8))
    with pytest.raises(ValueError, match="same sizes up to the sequence dim"):
        layer.append(torch.zeros(1, 2, 1, 8), torch.zeros(1, 3, 1, 8))


def test_bad_input_ids():
    _, model = tiny()
    with pytest.raises(ValueError, match="int64 tensor"):
        generate(model, torch.zeros(5), 3)
    with pytest.raises(ValueError, match="max_new_tokens must be positive"):
        generate(model, torch.zeros(1, 5, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="chunk_size must be"):
        prefill(model, torch.zeros(1, 5, dtype=torch.long), model.new_cache(), chunk_size=0)


# ---------------------------------------------------------------------------------------------- real configs
def test_kv_cache_sizes_match_reference():
    """DeepSeek-V3.2's shapes at 128K tokens, bf16 (GQA-8: the same 61 layers with 8 KV heads)."""
    sizes = list(kv_cache_sizes(131_072).values())
    gb = [round(s / 1e9, 2) for s in sizes]
    assert gb == [654.98, 32.75, 4.09, 9.21, 5.24, 6.30]
    v32 = ModelConfig.deepseek_v32()
    assert sizes[-1] == (656 + 132) * 61 * 131_072
    mla_fp8 = list(kv_cache_sizes(1000, batch=4, dtype="fp8").values())[3]
    assert mla_fp8 == v32.kv_cache_bytes("mla", 4000, dtype_bytes=1)
    with pytest.raises(ValueError, match="dtype 'int4' is not one of"):
        kv_cache_sizes(10, dtype="int4")


def test_memory_calculator_is_a_plain_callback():
    fig = memory_calculator(context_len=32_768, batch=8, dtype="fp8")
    bars = fig.data[0]
    assert len(bars.x) == 6 and "8 x 32,768" in fig.layout.title.text
    assert bars.y[3] == pytest.approx(ModelConfig.deepseek_v32().kv_cache_bytes("mla", 8 * 32_768, dtype_bytes=1) / 1e9)


def test_one_gqa_baseline_and_one_h200():
    """Chapters 1 and 2 compare against the same GQA-8 and size against the same H200 memory."""
    from dslib.config import GQA_REFERENCE, H200_MEMORY_BYTES
    from dslib.cost import decode_costs

    v32 = ModelConfig.deepseek_v32()
    ch1 = kv_cache_sizes(4096)[f"GQA-8 ({GQA_REFERENCE['num_layers']} layers, bf16)"]
    ch2 = decode_costs(v32, 4096, gqa_groups=GQA_REFERENCE["num_kv_heads"])["GQA-8"]["cache_bytes"]
    assert ch1 == ch2 == 4096 * 61 * 4096
    assert H200_MEMORY_BYTES == 143_771 * 2**20  # what an H200 reports (150.75e9 B), not the marketed 141 GB
    from dslib.exercises import ch5
    assert ch5.H200_MEASURED == H200_MEMORY_BYTES
