"""The attention kernels of dslib.kernels against the PyTorch path, in Triton's CPU interpreter.

TRITON_INTERPRET=1 must be set before a kernel is decorated (when its module is imported), so this file sets it
at import and reloads the kernel modules if something imported them earlier. Tiny shapes with ragged edges
(sizes not a multiple of the tiles, T < k, -1 slots, partial head blocks); outputs start poisoned (NaN / a
sentinel), so an element the kernel forgets to write fails the comparison.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
from dslib.kernels import triton_problem  # noqa: E402  (reads the version only; imports no Triton)

if triton_problem() is not None:  # e.g. torch 2.4, which ships Triton 3.0
    pytest.skip(f"the kernels do not run here: {triton_problem()}", allow_module_level=True)

for _name in ("dslib.kernels.topk", "dslib.kernels.indexer", "dslib.kernels.sparse_mla"):  # decorated earlier?
    if _name in sys.modules:
        importlib.reload(sys.modules[_name])

import dslib.kernels as kernels  # noqa: E402
from dslib import indexer as torch_indexer  # noqa: E402
from dslib.config import ModelConfig  # noqa: E402
from dslib.kernels import indexer as kidx  # noqa: E402
from dslib.kernels import sparse_mla as kmla  # noqa: E402
from dslib.kernels import topk as ktopk  # noqa: E402
from dslib.mla import MLA  # noqa: E402
from dslib.sparse import (  # noqa: E402
    DSAttention,
    causal_mask,
    dense_masked_attention,
    sparse_attention,
    topk_selection,
    window_selection,
)

SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 16}  # several tiles even at tiny sizes
DECODE_TILES = {"BLOCK_N": 16}
MLA_TILES = {"BLOCK_H": 16, "BLOCK_N": 16}
TWO_PASS_TILES = {"BLOCK_N": 16, "SCORE_BLOCK_H": 16, "VALUE_BLOCK_H": 16, "VALUE_BLOCK_C": 16, "CHUNK": 3}
RADIX_TILES = {"BLOCK": 64, "num_warps": 4}


def finite_close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """Same -inf pattern and finite values within tol (absolute, relative to the largest reference value)."""
    if not torch.equal(torch.isneginf(a), torch.isneginf(b)) or torch.isnan(a).any():
        return False
    fin = torch.isfinite(b)
    scale = b[fin].abs().max().clamp(min=1.0)
    return bool(((a[fin] - b[fin]).abs() <= tol * scale).all())


def indexer_inputs(B, T, H, D, S, *, dtype=torch.float32, tie_free=True):
    """Random q [B,T,H,D], w [B,T,H], k [B,S,D]. tie_free: head 0 has a large positive q·k and weight, so no
    score is an exact 0 from ReLU and every row's top-k is unique."""
    q, w, k = torch.randn(B, T, H, D), torch.randn(B, T, H), torch.randn(B, S, D)
    if tie_free:
        q[..., 0, 0] = 6.0 + torch.rand(B, T)
        k[..., 0] = 6.0 + torch.rand(B, S)
        w[..., 0] = 1.0 + torch.rand(B, T)
    return q.to(dtype), w, k.to(dtype)


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


# --------------------------------------------------------------------------------------------- package basics
def test_available_under_the_interpreter_and_without_triton(monkeypatch):
    assert kernels.interpreting() and kernels.available()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    assert not kernels.available() and "not installed" in kernels.unavailable_reason()


def test_a_triton_older_than_3_6_is_not_used(monkeypatch):
    """torch 2.4 ships Triton 3.0: the kernels are not tested there, so DSA takes the PyTorch path, with one warning."""
    assert kernels.triton_version() >= (3, 6)
    monkeypatch.setattr(kernels, "triton_version", lambda: (3, 0, 0))
    assert not kernels.available()
    assert kernels.unavailable_reason() == kernels.triton_problem()
    assert "Triton 3.0.0 is older than 3.6" in kernels.triton_problem()
    cfg = ModelConfig.tiny(index_topk=4)
    attn = DSAttention(cfg).eval()
    h = torch.randn(1, 6, cfg.hidden_size)
    with torch.no_grad(), pytest.warns(UserWarning, match=r"Triton 3\.0\.0 is older than 3\.6.*PyTorch path"):
        out = attn(h, backend="triton")
    with torch.no_grad():
        torch.testing.assert_close(out, attn(h), rtol=0, atol=0)


def test_cpu_tensors_without_the_interpreter_raise(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, w, k = indexer_inputs(1, 4, 2, 16, 8)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        kidx.index_scores(q, w, k, torch.arange(4))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kmla.sparse_mla(torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16), torch.randn(1, 4, 16),
                        torch.randn(1, 4, 16), torch.zeros(1, 1, 2, dtype=torch.long), 0.1)


def test_kernels_can_be_shown():
    from dslib.show import source_of

    assert "tl.dot" in source_of(kidx._index_scores_kernel)
    assert "exp2" in source_of(kmla._attend_block)
    assert "tl.dot" in source_of(kmla._mla_scores_kernel) and "tl.dot" in source_of(kmla._mla_values_kernel)
    assert "tl.histogram" in source_of(ktopk._radix_hist_kernel)


# --------------------------------------------------------------------------------------------- indexer
@pytest.mark.parametrize("B,T,S", [(2, 40, 50), (1, 19, 19)])
def test_index_scores_match_torch(B, T, S):
    H, D = 3, 32
    q, w, k = indexer_inputs(B, T, H, D, S, tie_free=False)
    pos = torch.stack([torch.arange(S - T, S), torch.arange(T) * 0 + S // 2][:B]) if B == 2 else torch.arange(T)
    out = torch.full((B, T, S), float("nan"))
    kidx.index_scores(q, w, k, pos, out=out, config=SMALL_TILES)
    assert finite_close(out, torch_indexer.index_scores(q, w, k, pos), 1e-5)


def test_index_scores_bf16_and_decode_tiles():
    B, H, D, S = 2, 4, 16, 37
    q, w, k = indexer_inputs(B, 3, H, D, S, dtype=torch.bfloat16)
    pos = torch.tensor([[S - 1, S - 3, 5], [0, S - 1, 20]])  # T = 3 <= DECODE_MAX_QUERIES: the decode kernel
    out = torch.full((B, 3, S), float("nan"))
    kidx.index_scores(q, w, k, pos, out=out, config=DECODE_TILES)
    assert finite_close(out, torch_indexer.index_scores(q.float(), w, k.float(), pos), 1e-5)
    big_t = torch.arange(S - 12, S)  # T = 12: the prefill kernel, bf16 scores out
    q, w, _ = indexer_inputs(B, 12, H, D, S, dtype=torch.bfloat16)
    out = torch.full((B, 12, S), float("nan"), dtype=torch.bfloat16)
    kidx.index_scores(q, w, k, big_t, out=out, config=SMALL_TILES)
    ref = torch_indexer.index_scores(q.float(), w, k.float(), big_t)
    assert finite_close(out.float(), ref, 1e-2)


def test_quantize_fp8_is_act_quant():
    x = torch.randn(3, 5, 64) * torch.logspace(-3, 2, 5).view(1, 5, 1)
    x8, scale = kidx.quantize_fp8(x)
    r8, rscale = torch_indexer.act_quant(x)
    assert torch.equal(x8.view(torch.uint8), r8.view(torch.uint8))
    assert torch.equal(scale, rscale.squeeze(-1))


@pytest.mark.parametrize("rotate", [False, True])
def test_fp8_index_scores_match_the_simulated_path(rotate):
    B, T, H, D, S = 1, 20, 4, 32, 30
    q, w, k = indexer_inputs(B, T, H, D, S)
    pos = torch.arange(S - T, S)
    out = kidx.index_scores(q, w, k, pos, fp8=True, rotate=rotate, config=SMALL_TILES)
    sim = torch_indexer.fp8_index_scores(q, w, k, pos, rotate=rotate)
    assert finite_close(out, sim, 1e-5)  # same quantised operands: only the summation order differs
    exact = torch_indexer.index_scores(q, w, k, pos)
    fin = torch.isfinite(exact)
    assert rel_err(out[fin], exact[fin]) < 0.05  # FP8's own error (e4m3: 3 mantissa bits)
    k8, ks = kidx.quantize_fp8(k, rotate=rotate)  # a cache of FP8 keys gives the same scores
    again = kidx.index_scores(q, w, k8, pos, k_scale=ks, rotate=rotate, config=SMALL_TILES)  # q quantised inside
    assert torch.equal(again, out)


@pytest.mark.parametrize("topk", [8, 45, 64])
def test_index_topk_matches_topk_selection(topk):
    """Chunks of 16 queries (3 chunks with different key bounds), S not a multiple of the tile, and for
    topk = 45 / 64 rows that see fewer keys than topk (all visible keys, then -1)."""
    B, T, H, D, S = 2, 40, 4, 32, 50
    q, w, k = indexer_inputs(B, T, H, D, S)
    pos = torch.stack([torch.arange(S - T, S), torch.arange(T)])
    sel = kidx.index_topk(q, w, k, pos, topk, chunk=16, config=SMALL_TILES)
    ref = topk_selection(torch_indexer.index_scores(q, w, k, pos), topk, pos)
    assert sel.dtype == torch.int64 and sel.shape == (B, T, topk)
    assert torch.equal(sel, ref)


def test_index_topk_decode_and_bf16_scores():
    B, H, D, S, topk = 3, 4, 16, 45, 16
    q, w, k = indexer_inputs(B, 1, H, D, S)
    pos = torch.tensor([[S - 1], [9], [30]])  # one new token per sequence at different cache lengths
    sel = kidx.index_topk(q, w, k, pos, topk, config=DECODE_TILES)
    assert torch.equal(sel, topk_selection(torch_indexer.index_scores(q, w, k, pos), topk, pos))
    sel16 = kidx.index_topk(q, w, k, pos, topk, score_dtype=torch.bfloat16, config=DECODE_TILES)
    scores = torch_indexer.index_scores(q, w, k, pos)
    assert_valid_topk(sel16, scores, topk, tol=2e-2)  # bf16 scores: a valid top-k up to bf16 rounding


def assert_valid_topk(sel, scores, topk, *, tol=0.0):
    """sel is *a* top-k of scores: same number of valid slots as the reference and the same sorted scores
    (within tol · max |score|), which is what "equal except ties" means."""
    ref = topk_selection(scores, topk)
    assert torch.equal((sel >= 0).sum(-1), (ref >= 0).sum(-1))
    take = lambda s: scores.gather(-1, s.clamp(min=0)).masked_fill(s < 0, float("-inf")).sort(-1).values  # noqa: E731
    a, b = take(sel), take(ref)
    fin = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), fin)
    assert ((a[fin] - b[fin]).abs() <= tol * scores[torch.isfinite(scores)].abs().max()).all()


def test_index_topk_with_exact_ties_is_a_valid_top_k():
    """All head weights 0: every visible score is exactly 0, so any visible keys are a correct choice."""
    B, T, H, D, S, topk = 1, 24, 2, 16, 24, 8
    q, w, k = indexer_inputs(B, T, H, D, S)
    w.zero_()
    pos = torch.arange(T)
    sel = kidx.index_topk(q, w, k, pos, topk, chunk=16, config=SMALL_TILES)
    assert_valid_topk(sel, torch_indexer.index_scores(q, w, k, pos), topk)
    assert ((sel <= pos.view(1, T, 1)) | (sel == -1)).all()  # causal


def test_fp8_index_topk_selects_like_the_simulated_path():
    B, T, H, D, S, topk = 1, 24, 4, 32, 40, 8
    q, w, k = indexer_inputs(B, T, H, D, S)
    pos = torch.arange(S - T, S)
    sel = kidx.index_topk(q, w, k, pos, topk, fp8=True, config=SMALL_TILES)
    sim = torch_indexer.fp8_index_scores(q, w, k, pos, rotate=False)
    assert_valid_topk(sel, sim, topk, tol=1e-5)


# --------------------------------------------------------------------------------------------- radix top-k
def causal_scores(B, T, N, pos, dtype):
    x = torch.randn(B, T, N).to(dtype)
    return x.masked_fill(torch.arange(N).view(1, 1, N) > pos.view(B, T, 1), float("-inf"))


def same_sets(sel, ref):
    return torch.equal(sel.sort(-1).values, ref.sort(-1).values)


@pytest.mark.parametrize("dtype,segments", [(torch.float32, 3), (torch.bfloat16, 1), (torch.bfloat16, None)])
def test_radix_topk_is_topk_selection(dtype, segments):
    """Exactly chapter 3's selection (ties at the threshold to the earlier key: bf16 randn has many ties), per
    row and causal: rows that see fewer than k keys keep all of them, then -1; several segments per row; the
    output starts as a sentinel, so a slot the kernel forgets shows up."""
    B, T, N = 2, 3, 300
    pos = torch.tensor([[299, 100, 3], [10, 299, 64]])
    x = causal_scores(B, T, N, pos, dtype)
    for k in (1, 64, 120):
        out = torch.full((B, T, k), 12345, dtype=torch.int64)
        ktopk.radix_topk(x, k, pos, out=out, segments=segments, config=RADIX_TILES)
        ref = topk_selection(x.float(), k, pos)
        assert same_sets(out, ref)
        assert (out.diff(dim=-1)[out[..., 1:] >= 0] > 0).all()  # increasing positions, then -1


def test_radix_topk_ties_infinities_and_padding():
    """All-equal rows (one big tie: the earliest keys win), +inf scores (selected first), rows of only -inf
    (all -1), a strided view of a padded buffer (the vectorised path reads the padding, which is NaN here)."""
    B, T, N, k = 1, 4, 70, 10
    buf = torch.full((B, T, 96), float("nan"))
    x = buf[..., :N]
    x.copy_(torch.randn(B, T, N))
    x[0, 0] = 0.5
    x[0, 1, [3, 50]] = float("inf")
    x[0, 2] = float("-inf")
    x[0, 3, 60:] = float("-inf")
    assert ktopk._padded(x, 16)
    out = ktopk.radix_topk(x, k, config=RADIX_TILES)
    assert torch.equal(out[0, 0], torch.arange(k))
    assert {3, 50} <= set(out[0, 1].tolist())
    assert (out[0, 2] == -1).all()
    assert same_sets(out, topk_selection(x.clone(), k))


def test_index_topk_radix_matches_topk_selection():
    """index_topk(method="radix"): sorted by score afterwards (then the same order as topk_selection), prefill
    chunks with different key bounds, decode rows, bf16 scores."""
    B, T, H, D, S = 2, 24, 4, 32, 50
    q, w, k = indexer_inputs(B, T, H, D, S)
    pos = torch.stack([torch.arange(S - T, S), torch.arange(T)])
    ref = topk_selection(torch_indexer.index_scores(q, w, k, pos), 45, pos)
    sel = kidx.index_topk(q, w, k, pos, 45, chunk=16, config=SMALL_TILES, method="radix", topk_config=RADIX_TILES)
    assert torch.equal(sel, ref)
    q1, w1, p1 = q[:, :1], w[:, :1], torch.tensor([[S - 1], [9]])
    sel = kidx.index_topk(q1, w1, k, p1, 16, config=DECODE_TILES, method="radix", topk_config=RADIX_TILES)
    assert torch.equal(sel, topk_selection(torch_indexer.index_scores(q1, w1, k, p1), 16, p1))
    sel16 = kidx.index_topk(q1, w1, k, p1, 16, config=DECODE_TILES, method="radix", score_dtype=torch.bfloat16,
                            topk_config=RADIX_TILES)
    assert_valid_topk(sel16, torch_indexer.index_scores(q1, w1, k, p1), 16, tol=2e-2)


def test_radix_topk_bad_input():
    with pytest.raises(ValueError, match="bf16 or fp32 scores"):
        ktopk.radix_topk(torch.randn(2, 8), 3)
    with pytest.raises(ValueError, match="k must be"):
        ktopk.radix_topk(torch.randn(1, 2, 8), 0)
    with pytest.raises(ValueError, match="q_positions"):
        ktopk.radix_topk(torch.randn(1, 2, 8), 3, torch.arange(3))
    with pytest.raises(ValueError, match="method"):
        kidx.index_topk(*indexer_inputs(1, 4, 2, 16, 8), torch.arange(4), 2, method="sort")


def test_indexer_bad_input():
    q, w, k = indexer_inputs(1, 4, 2, 16, 8)
    pos = torch.arange(4)
    with pytest.raises(ValueError, match="power-of-two index_head_dim.*D = 24"):
        kidx.index_scores(torch.randn(1, 4, 2, 24), w, torch.randn(1, 8, 24), pos)
    with pytest.raises(ValueError, match="at most 128 indexer heads"):
        kidx.index_scores(torch.randn(1, 4, 200, 16), torch.randn(1, 4, 200), k, pos)
    with pytest.raises(ValueError, match="shapes do not agree"):
        kidx.index_scores(q, w, torch.randn(2, 8, 16), pos)
    with pytest.raises(ValueError, match="k_scale"):
        kidx.index_scores(q, w, k.to(torch.float8_e4m3fn), pos)
    with pytest.raises(ValueError, match="q_positions"):
        kidx.index_scores(q, w, k, torch.arange(5))
    with pytest.raises(ValueError, match="topk"):
        kidx.index_topk(q, w, k, pos, 0)


# --------------------------------------------------------------------------------------------- sparse MLA
def mla_inputs(B, T, H, C, R, S, dtype=torch.float32):
    return (torch.randn(B, T, H, C).to(dtype), torch.randn(B, T, H, R).to(dtype), torch.randn(B, S, C).to(dtype),
            torch.randn(B, S, R).to(dtype))


def random_selection(pos, k, B):
    """[B, T, k]: k distinct random visible keys per query (all visible ones and -1 when fewer)."""
    rows = []
    for _ in range(B):
        per_t = []
        for p in pos.tolist():
            keys = torch.randperm(p + 1)[:k]
            per_t.append(torch.cat([keys, torch.full((k - len(keys),), -1)]))
        rows.append(torch.stack(per_t))
    return torch.stack(rows)


@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_sparse_mla_matches_sparse_attention(num_splits):
    """H = 20 (a full and a partial head block of 16), k = 24 (a partial key block), -1 slots, one query with
    no valid key at all (the kernel gives 0, the PyTorch softmax NaN), an index >= S (treated as none)."""
    B, T, H, C, R, S, k = 2, 4, 20, 32, 16, 40, 24
    qa, qr, lat, kr = mla_inputs(B, T, H, C, R, S)
    pos = torch.tensor([5, 17, 30, S - 1])
    sel = random_selection(pos, k, B)
    sel[0, 3, 7:] = -1
    sel[1, 2] = -1
    out = torch.full((B, T, H, C), float("nan"))
    kmla.sparse_mla(qa, qr, lat, kr, sel, 0.3, out=out, num_splits=num_splits, config=MLA_TILES)
    ref = sparse_attention(qa, qr, lat, kr, sel, 0.3)
    assert ref[1, 2].isnan().all() and (out[1, 2] == 0).all()
    ok = ~ref.isnan()
    assert (out[ok] - ref[ok]).abs().max() < 1e-5
    sel_oob = sel.clone()
    sel_oob[0, 3, 7] = S + 5  # past the cache: contributes nothing, like -1
    again = kmla.sparse_mla(qa, qr, lat, kr, sel_oob, 0.3, num_splits=num_splits, config=MLA_TILES)
    assert torch.equal(again[0, 3], out[0, 3])


def test_mla_kernels_64_bit_offsets(monkeypatch):
    """Caches too long for 32-bit offsets take the int64 address path: same results (forced here)."""
    cache = torch.empty(1, 0, 576)  # [B, S, C + R]: row stride 576, as the 671B cache
    assert kmla._offsets_fit_32(131072, cache) and not kmla._offsets_fit_32(2**22, cache)
    B, T, H, C, R, S, k = 1, 3, 16, 32, 8, 40, 24
    qa, qr, lat, kr = mla_inputs(B, T, H, C, R, S)
    sel = random_selection(torch.tensor([5, 30, S - 1]), k, B)
    fast = kmla.sparse_mla(qa, qr, lat, kr, sel, 0.3, config=MLA_TILES)
    dense = kmla.dense_mla(qa, qr, lat, kr, torch.tensor([5, 30, S - 1]), 0.3, config=MLA_TILES)
    monkeypatch.setattr(kmla, "_offsets_fit_32", lambda S, *caches: False)
    assert torch.equal(kmla.sparse_mla(qa, qr, lat, kr, sel, 0.3, config=MLA_TILES), fast)
    assert torch.equal(kmla.dense_mla(qa, qr, lat, kr, torch.tensor([5, 30, S - 1]), 0.3, config=MLA_TILES), dense)


def test_sparse_mla_bf16_window_selection_t_below_k():
    """bf16 in/out; a window of 32 > most positions (T < k: leading -1 slots), int32 indices."""
    B, T, H, C, R, S = 1, 6, 16, 64, 16, 12
    qa, qr, lat, kr = mla_inputs(B, T, H, C, R, S, dtype=torch.bfloat16)
    pos = torch.arange(S - T, S)
    sel = window_selection(pos, 32)
    out = torch.full((B, T, H, C), float("nan"), dtype=torch.bfloat16)
    kmla.sparse_mla(qa, qr, lat, kr, sel.to(torch.int32), 0.125, out=out, config=MLA_TILES)
    ref32 = sparse_attention(qa.float(), qr.float(), lat.float(), kr.float(), sel, 0.125)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref32) < 1e-2
    assert rel_err(out, ref32) <= 2 * rel_err(sparse_attention(qa, qr, lat, kr, sel, 0.125), ref32) + 1e-3


@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_two_pass_sparse_mla_matches_sparse_attention(num_splits):
    """The two-pass variant on the same ragged case: CHUNK = 3 score rows per pass pair, so B = 2, T = 4 run as
    several chunks (over sequences and queries); 20 heads in blocks of 16; k = 24 in blocks of 16; -1 slots, a
    query with no valid key (0, not NaN), an index >= S."""
    B, T, H, C, R, S, k = 2, 4, 20, 32, 16, 40, 24
    qa, qr, lat, kr = mla_inputs(B, T, H, C, R, S)
    sel = random_selection(torch.tensor([5, 17, 30, S - 1]), k, B)
    sel[0, 3, 7:] = -1
    sel[1, 2] = -1
    sel[0, 1, 2] = S + 3
    out = torch.full((B, T, H, C), float("nan"))
    kmla.sparse_mla(qa, qr, lat, kr, sel, 0.3, out=out, num_splits=num_splits, config=TWO_PASS_TILES,
                    variant="two_pass")
    ref_sel = sel.clone()
    ref_sel[0, 1, 2] = -1
    ref = sparse_attention(qa, qr, lat, kr, ref_sel, 0.3)
    assert ref[1, 2].isnan().all() and (out[1, 2] == 0).all()
    ok = ~ref.isnan()
    assert (out[ok] - ref[ok]).abs().max() < 1e-5
    one_pass = kmla.sparse_mla(qa, qr, lat, kr, sel, 0.3, num_splits=num_splits, config=MLA_TILES)
    assert (out - one_pass).abs().max() < 1e-5


def test_two_pass_sparse_mla_bf16_and_wide_tiles():
    """bf16 (p~ stored in bf16, as the one-pass kernel rounds p), value tiles of 32 columns over C = 64, 32 heads
    in one score block and two value blocks, the default chunking."""
    B, T, H, C, R, S = 1, 6, 32, 64, 16, 12
    qa, qr, lat, kr = mla_inputs(B, T, H, C, R, S, dtype=torch.bfloat16)
    pos = torch.arange(S - T, S)
    sel = window_selection(pos, 32)
    cfg = {"BLOCK_N": 16, "SCORE_BLOCK_H": 32, "VALUE_BLOCK_H": 16, "VALUE_BLOCK_C": 32}
    out = torch.full((B, T, H, C), float("nan"), dtype=torch.bfloat16)
    kmla.sparse_mla(qa, qr, lat, kr, sel.to(torch.int32), 0.125, out=out, config=cfg, variant="two_pass")
    ref32 = sparse_attention(qa.float(), qr.float(), lat.float(), kr.float(), sel, 0.125)
    assert rel_err(out, ref32) < 1e-2
    assert rel_err(out, ref32) <= 2 * rel_err(sparse_attention(qa, qr, lat, kr, sel, 0.125), ref32) + 1e-3


def test_sparse_mla_in_a_dsa_layer():
    """The whole DSA layer with backend="triton" (indexer top-k and sparse MLA kernels, here in the interpreter)
    against its PyTorch path (R = 8 < 16: padded tiles)."""
    from dslib.sparse import DSAttention

    cfg = ModelConfig.tiny()
    attn = DSAttention(cfg).eval()
    h = torch.randn(1, 10, cfg.hidden_size)
    with torch.no_grad():
        for attention in ("window", "sparse"):
            ref = attn(h, attention=attention)
            out = attn(h, attention=attention, backend="triton")
            assert (out - ref).abs().max() < 1e-5, attention


# --------------------------------------------------------------------------------------------- dense decode
@pytest.mark.parametrize("num_splits", [1, 4, None])
def test_dense_mla_matches_dense_attention(num_splits):
    B, H, C, R, S = 2, 20, 32, 16, 45
    qa, qr, lat, kr = mla_inputs(B, 2, H, C, R, S)
    pos = torch.tensor([[S - 1, 7], [0, 30]])  # per-sequence positions; one query sees only key 0
    out = torch.full((B, 2, H, C), float("nan"))
    kmla.dense_mla(qa, qr, lat, kr, pos, 0.2, out=out, num_splits=num_splits, config=MLA_TILES)
    ref = dense_masked_attention(qa, qr, lat, kr, causal_mask(pos, S), 0.2)
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("num_splits", [1, 4, None])
def test_two_pass_dense_mla_matches_dense_attention(num_splits):
    """Dense two-pass: keys 0..pos read in consecutive blocks (S = 45: a partial last block), pass 1 split over
    the keys, per-sequence positions (one query sees only key 0), several chunks (CHUNK = 3 rows)."""
    B, H, C, R, S = 2, 20, 32, 16, 45
    qa, qr, lat, kr = mla_inputs(B, 2, H, C, R, S)
    pos = torch.tensor([[S - 1, 7], [0, 30]])
    out = torch.full((B, 2, H, C), float("nan"))
    kmla.dense_mla(qa, qr, lat, kr, pos, 0.2, out=out, num_splits=num_splits, config=TWO_PASS_TILES,
                   variant="two_pass")
    ref = dense_masked_attention(qa, qr, lat, kr, causal_mask(pos, S), 0.2)
    assert (out - ref).abs().max() < 1e-5


def test_dense_mla_is_mla_absorbed_decode():
    """One decode step of a tiny MLA layer: the kernel (+ W_UV) equals MLA.attend(mode="absorbed")."""
    cfg = ModelConfig.tiny()
    mla = MLA(cfg).eval()
    B, S = 3, 21
    with torch.no_grad():
        q_nope = torch.randn(B, 1, cfg.num_attention_heads, cfg.qk_nope_head_dim)
        q_rope = torch.randn(B, 1, cfg.num_attention_heads, cfg.qk_rope_head_dim)
        kv, kr = torch.randn(B, S, cfg.kv_lora_rank), torch.randn(B, S, cfg.qk_rope_head_dim)
        pos = torch.tensor([S - 1])
        ref = mla.attend(q_nope, q_rope, kv, kr, pos, mode="absorbed")
        qa = torch.einsum("bthd,hdc->bthc", q_nope, mla.w_uk())
        x = kmla.dense_mla(qa, q_rope, kv, kr, pos, mla.softmax_scale, config=MLA_TILES)
        out = torch.einsum("bthc,hvc->bthv", x, mla.w_uv())
    assert (out - ref).abs().max() < 1e-5


def test_mla_kernels_bad_input():
    qa, qr, lat, kr = mla_inputs(1, 2, 4, 32, 16, 8)
    sel = torch.zeros(1, 2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="C <= 512"):
        kmla.sparse_mla(torch.randn(1, 2, 4, 1024), qr, torch.randn(1, 8, 1024), kr, sel, 0.1)
    with pytest.raises(ValueError, match="selected must be"):
        kmla.sparse_mla(qa, qr, lat, kr, sel[:, :1], 0.1)
    with pytest.raises(ValueError, match="int32 or int64"):
        kmla.sparse_mla(qa, qr, lat, kr, sel.float(), 0.1)
    with pytest.raises(ValueError, match="one dtype"):
        kmla.sparse_mla(qa.bfloat16(), qr, lat, kr, sel, 0.1)
    with pytest.raises(ValueError, match="shapes do not agree"):
        kmla.dense_mla(qa, qr, lat[:, :5], kr, torch.arange(2), 0.1)
    with pytest.raises(ValueError, match="q_positions"):
        kmla.dense_mla(qa, qr, lat, kr, torch.arange(3), 0.1)
    with pytest.raises(ValueError, match="variant"):
        kmla.sparse_mla(qa, qr, lat, kr, sel, 0.1, variant="three_pass")


def test_mla_kernels_with_an_empty_cache_give_zeros():
    qa, qr, _, _ = mla_inputs(1, 2, 4, 32, 16, 1)
    lat, kr = torch.empty(1, 0, 32), torch.empty(1, 0, 16)
    sel = torch.full((1, 2, 3), -1, dtype=torch.long)
    assert (kmla.sparse_mla(qa, qr, lat, kr, sel, 0.1, config=MLA_TILES) == 0).all()
    assert (kmla.dense_mla(qa, qr, lat, kr, torch.arange(2), 0.1, config=MLA_TILES) == 0).all()
    for variant in ("one_pass", "two_pass"):  # the Triton kernels (gluon has no interpreter)
        assert (kmla.sparse_mla(qa, qr, lat, kr, sel, 0.1, variant=variant, config=TWO_PASS_TILES) == 0).all()
        assert (kmla.dense_mla(qa, qr, lat, kr, torch.arange(2), 0.1, variant=variant, config=TWO_PASS_TILES)
                == 0).all()


def test_gpu_benchmark_helpers():
    """benchmarks/gpu_kernels.py's selection generator and agreement measure (the GPU run trusts both)."""
    sys.path.insert(0, str(os.path.join(os.path.dirname(__file__), "..", "benchmarks")))
    import gpu_kernels as bench

    pos = torch.tensor([0, 3, 9, 40, 41])
    sel = bench.strided_selection(pos, 8, 2, seed=1)
    assert sel.shape == (2, 5, 8) and sel.dtype == torch.int32
    visible = (sel <= pos.view(1, 5, 1)) & (sel >= 0)
    assert ((sel == -1) | visible).all()  # causal, -1 = none
    assert ((sel >= 0).sum(-1) == torch.tensor([1, 4, 8, 8, 8])).all()  # all visible keys when p + 1 <= k
    scores = torch.randn(2, 5, 42).masked_fill(torch.arange(42).view(1, 1, 42) > pos.view(1, 5, 1), float("-inf"))
    ref = topk_selection(scores, 8, pos)
    agree = bench.topk_agreement(ref.flip(-1), ref, scores)  # same sets in another order
    assert agree["same_rows"] == 1.0 and agree["common_keys"] == 1.0 and agree["same_counts"]
    assert agree["score_gap"] == 0.0
    worse = ref.clone()
    worse[..., 0] = torch.where(ref[..., 0] >= 0, 0, -1)  # swap the best key for key 0
    assert bench.topk_agreement(worse, ref, scores)["same_rows"] < 1.0
    x = torch.randn(1000, dtype=torch.float64)
    assert bench.cos_diff(x, x) == 0.0 and abs(bench.cos_diff(x, x * 1.01) - 0.01**2 / 2) < 1e-5  # ~ rel_err² / 2
    kw = bench.mla(bench.TWO_PASS_A)  # the sweep's configurations call the kernels with variant= and config=
    assert kw["variant"] == "two_pass" and "variant" not in kw["config"]
    assert set(kw["config"]) == set(kmla.TWO_PASS_CONFIG)
    assert bench.mla(None) == {"variant": "one_pass", "config": None}
    assert bench.label(bench.TWO_PASS_A) == "two_pass N64 s64 v64x512 c4096"


def test_use_tuning_sets_the_defaults(tmp_path):
    """gpu_kernels_best.json -> the variant, tiles and top-k method a call without its own choice uses."""
    import json

    import dslib.kernels as kernels

    best = {"sparse_prefill": {"variant": "two_pass", **kmla.TWO_PASS_CONFIG}, "index_prefill_fp8": None,
            "topk_prefill": {"method": "radix", "score_dtype": "torch.bfloat16"}}
    path = tmp_path / "gpu_kernels_best.json"
    path.write_text(json.dumps({"env": {}, "best": best}))
    try:
        adopted = kernels.use_tuning(path)
        assert set(adopted) == {"sparse_prefill", "topk_prefill"}  # a rejected (None) entry keeps the built-in
        assert kmla._tuned_variant("sparse_prefill", None, None) == ("two_pass", kmla.TWO_PASS_CONFIG)
        assert kmla._tuned_variant("sparse_decode", None, None) == (None, None)  # the built-in choice
        assert kmla._tuned_variant("sparse_prefill", "one_pass", None) == ("one_pass", None)  # the caller wins
        B, T, H, C, R, S = 1, 12, 4, 32, 16, 20
        qa, qr, lat, kr = mla_inputs(B, T, H, C, R, S)
        sel = window_selection(torch.arange(T), 8)
        tuned_out = kmla.sparse_mla(qa, qr, lat, kr, sel, 0.2)  # two_pass, from the table
        assert torch.allclose(tuned_out, kmla.sparse_mla(qa, qr, lat, kr, sel, 0.2, variant="one_pass",
                                                          config=MLA_TILES), atol=1e-5)
    finally:
        kernels.TUNED.clear()
