"""Lightning indexer, DSA module, caches and losses on tiny configs (fp32)."""
from types import SimpleNamespace

import pytest
import torch

from dslib.attention import causal_mask
from dslib.config import ConfigError, ModelConfig
from dslib.fp8 import act_quant
from dslib.indexer import (
    IndexerKeyCache,
    LightningIndexer,
    attention_target,
    fp8_index_scores,
    hadamard,
    index_scores,
    indexer_kl_loss,
)
from dslib.kv_cache import CacheFullError
from dslib.mla import LatentCache
from dslib.sparse import AttentionStats, DSACache, DSAttention

# 8 indexer heads: with 2, ReLU often zeroes every head and exact ties (score 0) make top-k order arbitrary
CFG = ModelConfig.tiny(index_topk=4, index_n_heads=8, max_position_embeddings=64)


def _attn(cfg=CFG):
    m = DSAttention(cfg)
    with torch.no_grad():
        m.indexer.k_norm.weight.add_(0.2 * torch.randn_like(m.indexer.k_norm.weight))
        m.indexer.k_norm.bias.add_(0.2 * torch.randn_like(m.indexer.k_norm.bias))
    return m


def test_state_dict_names():
    keys = set(DSAttention(CFG).state_dict())
    mla = {f"{n}.weight" for n in ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
                                   "kv_b_proj", "o_proj")}
    idx = {"indexer.wq_b.weight", "indexer.wk.weight", "indexer.k_norm.weight", "indexer.k_norm.bias",
           "indexer.weights_proj.weight"}
    assert keys == mla | idx


def test_index_score_formula_by_hand():
    """I[t,s] = Σ_j w[t,j] ReLU(q[t,j]·k[s]) with the scales folded into w; future keys -inf."""
    idx = LightningIndexer(CFG)
    T = 6
    h, c_q = torch.randn(1, T, CFG.hidden_size), torch.randn(1, T, CFG.q_lora_rank)
    cos, sin = torch.ones(T, CFG.qk_rope_head_dim // 2), torch.zeros(T, CFG.qk_rope_head_dim // 2)  # no rotation
    scores = idx(h, c_q, cos, sin, torch.arange(T))
    q = idx.wq_b(c_q).view(1, T, CFG.index_n_heads, CFG.index_head_dim)
    k = idx.k_norm(idx.wk(h))
    w = idx.weights_proj(h) * CFG.index_n_heads**-0.5
    t, s = 4, 2
    by_hand = sum(w[0, t, j] * torch.relu(q[0, t, j] @ k[0, s]) * CFG.index_head_dim**-0.5
                  for j in range(CFG.index_n_heads))
    assert scores[0, t, s].item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert torch.isinf(scores[0, 2, 3]) and torch.isfinite(scores[0, 3, 3])


def test_chunking_does_not_change_scores():
    q, w, k = torch.randn(2, 9, 3, 8), torch.randn(2, 9, 3), torch.randn(2, 9, 8)
    torch.testing.assert_close(index_scores(q, w, k, torch.arange(9), chunk=2), index_scores(q, w, k, torch.arange(9)))


def test_hadamard_preserves_scores_and_fp8_is_close():
    Hd = hadamard(16)
    torch.testing.assert_close(Hd @ Hd.T, torch.eye(16), atol=1e-6, rtol=0)
    q, w, k = torch.randn(1, 20, 2, 16), torch.rand(1, 20, 2), torch.randn(1, 20, 16)
    pos = torch.arange(20)
    exact = index_scores(q, w, k, pos)
    finite = torch.isfinite(exact)
    rotated = fp8_index_scores(q, w, k, pos, quantize=False)
    torch.testing.assert_close(rotated[finite], exact[finite], rtol=1e-5, atol=1e-5)
    fp8 = fp8_index_scores(q, w, k, pos)
    assert torch.equal(torch.isfinite(fp8), finite)
    cos_diff = 1 - 2 * (fp8[finite] * exact[finite]).sum() / (fp8[finite] ** 2 + exact[finite] ** 2).sum()
    assert 0 < cos_diff < 1e-2
    x8, s = act_quant(torch.randn(4, 16) * 3)
    assert torch.equal(torch.log2(s), torch.log2(s).round())  # power-of-two scales
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(12)


def test_decode_with_cache_equals_prefill_sparse_and_window():
    attn = _attn()
    h = torch.randn(2, 11, CFG.hidden_size)
    with torch.no_grad():
        for attention in ("sparse", "window", "dense"):
            full = attn(h, attention=attention)
            cache = DSACache()
            parts = [attn(h[:, :5], cache=cache, attention=attention)]
            parts += [attn(h[:, t : t + 1], cache=cache, attention=attention) for t in range(5, 11)]
            torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-6)
            assert len(cache) == 11 and cache.index_keys.shape == (2, 11, CFG.index_head_dim)


def test_sparse_gather_equals_dense_masked_module():
    attn = _attn()
    h = torch.randn(2, 13, CFG.hidden_size)
    with torch.no_grad():
        for attention in ("sparse", "window"):
            torch.testing.assert_close(attn(h, attention=attention), attn(h, attention=attention, mode="naive"),
                                       rtol=1e-5, atol=1e-6)
        # and the first k rows are dense
        k = CFG.index_topk
        torch.testing.assert_close(attn(h, attention="sparse")[:, :k], attn(h, attention="dense")[:, :k],
                                   rtol=1e-5, atol=1e-6)


def test_recorder_and_stats_report_what_forward_did():
    attn = _attn()
    h = torch.randn(1, 10, CFG.hidden_size)
    seen = []
    recorder = SimpleNamespace(on_selection=lambda **kw: seen.append(kw))
    with torch.no_grad():
        out = attn(h, attention="sparse", recorder=recorder)
        absorbed = AttentionStats(need_probs=True)
        attn(h, attention="sparse", stats=absorbed)
        for mode in ("absorbed", "naive"):
            stats = AttentionStats(need_probs=True)
            torch.testing.assert_close(attn(h, attention="sparse", mode=mode, stats=stats), out, rtol=1e-5, atol=1e-6)
            assert torch.equal(stats.selected, seen[0]["selected"]) and stats.index_scores is None
            torch.testing.assert_close(stats.probs.sum(-1), torch.ones(1, 10, CFG.num_attention_heads))
            # both modes: the same probabilities of the selected keys, in the selection's order
            torch.testing.assert_close(stats.probs, absorbed.probs, rtol=1e-5, atol=1e-6)
        dense = AttentionStats(need_probs=True, need_index_scores=True)
        attn(h, attention="dense", stats=dense)
    assert seen[0]["layer_idx"] == 0 and seen[0]["selected"].shape == (1, 10, CFG.index_topk) and len(seen) == 1
    assert dense.selected is None and dense.probs.shape == (1, 10, CFG.num_attention_heads, 10)
    assert torch.equal(torch.isinf(dense.index_scores), ~causal_mask(torch.arange(10), 10))


def test_stats_rows_are_the_rows_of_the_full_stats():
    attn = _attn()
    h = torch.randn(2, 12, CFG.hidden_size)
    rows = torch.tensor([[3, 7, 11], [0, 5, 6]])
    with torch.no_grad():
        for attention in ("sparse", "dense"):
            full, part = AttentionStats(True, True), AttentionStats(True, True, rows=rows)
            attn(h, attention=attention, stats=full)
            attn(h, attention=attention, stats=part)
            take = rows.unsqueeze(-1)
            torch.testing.assert_close(part.index_scores, full.index_scores.gather(1, take.expand(-1, -1, 12)))
            want = full.probs.gather(1, take[..., None].expand(-1, -1, *full.probs.shape[2:]))
            torch.testing.assert_close(part.probs, want)


def test_indexer_input_is_detached_in_training():
    attn = _attn()
    h = torch.randn(1, 10, CFG.hidden_size, requires_grad=True)
    stats = AttentionStats(need_index_scores=True)
    out = attn(h, attention="sparse", stats=stats)
    target = torch.rand(1, 10, 10) * causal_mask(torch.arange(10), 10)
    indexer_kl_loss(target / target.sum(-1, keepdim=True), stats.index_scores).backward()
    assert h.grad is None and attn.q_a_proj.weight.grad is None  # the KL moves only the indexer
    assert attn.indexer.wq_b.weight.grad is not None
    attn.zero_grad()
    out.sum().backward()
    assert attn.indexer.wq_b.weight.grad is None  # the LM side never reaches the indexer


def test_kl_loss():
    scores = torch.tensor([[[0.0, 1.0, float("-inf")]]])
    p = torch.softmax(scores, -1)
    assert indexer_kl_loss(p, scores).item() == pytest.approx(0.0, abs=1e-7)
    q = torch.tensor([[[1.0, 0.0, 0.0]]])  # target with zeros: no NaN
    loss = indexer_kl_loss(q, scores)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(-torch.log_softmax(scores, -1)[0, 0, 0].item())
    probs = torch.softmax(torch.randn(2, 5, 3, 7), -1)
    torch.testing.assert_close(attention_target(probs).sum(-1), torch.ones(2, 5))  # REFERENCE §9.1 check 12


def test_errors():
    attn = _attn()
    h = torch.randn(1, 4, CFG.hidden_size)
    with pytest.raises(TypeError, match="DSACache"):
        attn(h, cache=LatentCache())
    cache = DSACache(max_len=5)
    attn(h, cache=cache)
    with pytest.raises(CacheFullError, match="max_len=5"):
        attn(h[:, :2], cache=cache)
    with pytest.raises(ValueError, match="one tensor per field"):  # the three fields are appended together
        cache.append(torch.randn(1, 1, CFG.kv_lora_rank), torch.randn(1, 1, CFG.qk_rope_head_dim))
    for option, value in (("attention", "local"), ("mode", "fast"), ("precision", "fp4"), ("backend", "cuda")):
        with pytest.raises(ValueError, match=f"{option} must be one of"):
            attn(h, **{option: value})
    with pytest.raises(CacheFullError, match="max_len"):
        c = IndexerKeyCache(max_len=3)
        c.append(torch.randn(1, 4, 8))
    with pytest.raises(ConfigError, match="index_topk"):
        ModelConfig.tiny(index_topk=0)
    with pytest.raises(ConfigError, match="index_topk"):
        ModelConfig.tiny(index_topk=-3)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        ModelConfig.tiny(index_topk=1000, max_position_embeddings=256)


def test_batched_positions_equal_default():
    attn = _attn()
    h = torch.randn(2, 9, CFG.hidden_size)
    pos = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        for attention in ("sparse", "window", "dense"):
            torch.testing.assert_close(attn(h, positions=pos, attention=attention), attn(h, attention=attention))


def test_triton_backend_dispatch_and_fallback(monkeypatch):
    """backend="triton" calls dslib.kernels with the contract's arguments; without usable kernels it warns once
    (naming why) and computes the same numbers with PyTorch."""
    import sys
    import types
    import warnings

    from dslib import sparse

    attn = _attn()
    h = torch.randn(2, 9, CFG.hidden_size)
    with torch.no_grad():
        want = attn(h, attention="sparse")
        monkeypatch.setattr(sparse, "_WARNED", set())
        monkeypatch.setitem(sys.modules, "dslib.kernels", None)  # not importable
        with pytest.warns(UserWarning, match="not importable.*PyTorch path"):
            torch.testing.assert_close(attn(h, attention="sparse", backend="triton"), want)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second call does not warn again
            attn(h, attention="sparse", backend="triton")
        calls = []

        def index_topk(q, w, k, q_positions, topk, *, fp8=False):
            calls.append(("index_topk", q.shape, w.shape, k.shape, topk, fp8))
            return sparse.topk_selection(index_scores(q, w, k, q_positions), topk, q_positions)

        def sparse_mla(q_absorbed, q_rope, kv_latent, k_rope, selected, scale):
            calls.append(("sparse_mla", q_absorbed.shape, selected.shape))
            return sparse.sparse_attention(q_absorbed, q_rope, kv_latent, k_rope, selected, scale)

        fake = types.SimpleNamespace(unavailable_reason=lambda: None,
                                     indexer=types.SimpleNamespace(index_topk=index_topk),
                                     sparse_mla=types.SimpleNamespace(sparse_mla=sparse_mla))
        monkeypatch.setitem(sys.modules, "dslib.kernels", fake)
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors are fine for the interpreter
        torch.testing.assert_close(attn(h, attention="sparse", backend="triton"), want)
    H_I, D_I, C = CFG.index_n_heads, CFG.index_head_dim, CFG.kv_lora_rank
    assert calls == [("index_topk", (2, 9, H_I, D_I), (2, 9, H_I), (2, 9, D_I), CFG.index_topk, False),
                     ("sparse_mla", (2, 9, CFG.num_attention_heads, C), (2, 9, CFG.index_topk))]
