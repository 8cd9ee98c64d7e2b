"""Chapter 6: the FP8 linear and grouped-MoE Triton kernels against the PyTorch paths, on CPU under Triton's
interpreter (tiny shapes; the same kernels run compiled on the GPU, `benchmarks/gpu_fp8_moe.py` checks them at full
width there)."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # a CPU machine: Triton's interpreter, set before triton is imported (the
    os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels are decorated at import); a GPU session stays compiled
pytest.importorskip("triton")
from dslib.kernels import triton_problem  # noqa: E402  (reads the version only; imports no Triton)

if triton_problem() is not None:  # e.g. torch 2.4, which ships Triton 3.0
    pytest.skip(f"the kernels do not run here: {triton_problem()}", allow_module_level=True)

from dslib.checkpoint import FP8_DTYPE, FP8Linear, dequantize_fp8_blocks, quantize_fp8_blocks, use_fp8_storage
from dslib.config import ModelConfig
from dslib.indexer import act_quant as indexer_act_quant
from dslib.kernels import fp8
from dslib.kernels import moe as kmoe
from dslib.moe import MoE, dispatch, moe_reference

if not fp8.interpreting() or type(fp8._fp8_gemm_kernel).__name__ != "InterpretedFunction":
    pytest.skip("these are the CPU-interpreter tests (TRITON_INTERPRET=1 before triton is imported); on a GPU, "
                "benchmarks/gpu_fp8_moe.py checks the compiled kernels at full width", allow_module_level=True)


# the interpreter runs on numpy, which warns when the NaN/inf tests divide by a non-finite scale
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def assert_same_maths(y: torch.Tensor, ref: torch.Tensor) -> None:
    """The grouped kernels against `moe_experts_torch`. Both quantise the fp32 intermediate h to e4m3, but their
    h differ in the last fp32 bit (summation order), so now and then one element of h rounds to the neighbouring
    e4m3 value (one in ~10^5 elements; ~1e-4 of that token's output). 1e-3 allows that and still sits 30x below
    the ~3% the activation quantisation itself changes (see the torch-path comparison)."""
    assert (y - ref).norm() <= 1e-3 * ref.norm()
    close = ((y - ref).norm(dim=-1) <= 1e-5 * ref.norm(dim=-1)).float().mean()
    assert close >= 0.8


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer a kernel writes starts as NaN: an element it forgets shows up as NaN."""
    monkeypatch.setattr(fp8, "POISON", True)


# --------------------------------------------------------------------------------------------------- act_quant
def hard_blocks(dtype=torch.float32) -> torch.Tensor:
    """[8, 384]: random rows plus the corner cases of e4m3 rounding, one per 128-channel block."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 384, generator=g) * 3
    x[0, :128] = 0.0  # all zero: amax floor 1e-4
    x[0, 128:256] = torch.randn(128, generator=g) * 1e-6  # below the floor: e4m3 subnormals
    x[1, :128] = torch.randn(128, generator=g) * 1e4  # large
    # ties: with amax = 448 the scale is 1, and k + 0.5 steps of 2^(e-3) sit exactly between two e4m3 values
    x[2, :128] = torch.tensor([448.0] + [(8 + k + 0.5) * 2.0 ** (e - 3) for e in range(-2, 6) for k in range(8)]
                              + [-0.0] * 63)
    x[3, :128] = -x[2, :128]
    x[4, 256:] = 448.0 * 2.0**-5 * (1 + 2.0**-22)  # amax / 448 a few ulps above a power of two
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant_bit_exact_with_the_torch_reference(dtype):
    x = hard_blocks(dtype)
    q, s = fp8.act_quant(x)
    q_ref, s_ref = fp8.act_quant_torch(x)
    assert q.dtype == FP8_DTYPE and s.shape == (8, 3) and s.dtype == torch.float32
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))  # ue8m0: powers of two
    amax = x.float().abs().unflatten(-1, (3, 128)).amax(-1).clamp(min=1e-4)
    assert (s >= amax / 448).all() and (s < amax / 224).all()  # the smallest power of two that fits


def test_act_quant_matches_the_indexer_version_and_keeps_leading_dims():
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16) * 5
    q, s = fp8.act_quant(x)
    q_ref, s_ref = indexer_act_quant(x.unflatten(-1, (2, 128)))  # chapter 3: one scale per vector
    assert q.shape == x.shape and s.shape == (2, 3, 2)
    assert torch.equal(bits(q), bits(q_ref.flatten(-2))) and torch.equal(s, s_ref.squeeze(-1))


def test_act_quant_plain_scales():
    x = hard_blocks()
    q, s = fp8.act_quant(x, pow2_scale=False)
    q_ref, s_ref = fp8.act_quant_torch(x, pow2_scale=False)
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)
    ind_q, ind_s = indexer_act_quant(x.unflatten(-1, (3, 128)), pow2_scale=False)
    assert torch.equal(s, ind_s.squeeze(-1)) and torch.equal(bits(q), bits(ind_q.flatten(-2)))


def test_act_quant_nonfinite_blocks_get_nonfinite_scales(poisoned):
    x = torch.randn(40, 256)
    x[3, 5] = float("nan")
    x[7, 200] = float("inf")
    q, s = fp8.act_quant(x)
    q_ref, s_ref = fp8.act_quant_torch(x)
    assert s[3, 0].isnan() and s_ref[3, 0].isnan() and s[7, 1].isinf() and s_ref[7, 1].isinf()
    assert not fp8.dequantize_act(q, s)[3, :128].isfinite().any()  # the whole block, like the reference
    finite = s.isfinite()
    assert finite.sum() == 78 and torch.equal(s[finite], s_ref[finite])
    rows = finite.all(-1)
    assert torch.equal(bits(q[rows]), bits(q_ref[rows]))


def test_act_quant_rejects_shapes_it_cannot_block():
    with pytest.raises(ValueError, match=r"multiple of 128.*\(4, 100\)"):
        fp8.act_quant(torch.randn(4, 100))


def test_pow2_ceil_is_exact_at_powers_of_two():
    v = torch.tensor([2.0**-9, 2.0**-9 * (1 + 2**-23), 2.0**-9 * (1 - 2**-24), 1.0, float("inf")])
    assert fp8.pow2_ceil(v).tolist() == [2.0**-9, 2.0**-8, 2.0**-9, 1.0, float("inf")]
    assert fp8.pow2_ceil(torch.tensor([float("nan")])).isnan().all()


# --------------------------------------------------------------------------------------------------- fp8_linear
def fp8_weight(n: int, k: int, seed: int = 0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    return quantize_fp8_blocks(w)


@pytest.mark.parametrize("m,n,k", [(1, 576, 256), (37, 576, 256), (130, 96, 384), (5, 100, 128)])
def test_fp8_linear_triton_matches_dequantise_and_matmul(m, n, k, poisoned):
    """576 rows: kv_a_proj_with_mqa's partial last block; M = 1 (decode) and M, N not multiples of the tile."""
    w8, ws = fp8_weight(n, k)
    x = torch.randn(m, k)
    y = fp8.fp8_linear(x, w8, ws, impl="triton")
    x8, sx = fp8.act_quant_torch(x)
    ref = fp8.dequantize_act(x8, sx) @ dequantize_fp8_blocks(w8, ws).T  # fp32
    assert y.shape == (m, n) and y.isfinite().all()
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()  # fp32 summation order only
    assert torch.allclose(fp8.fp8_linear(x, w8, ws, impl="torch"), ref, rtol=1e-5, atol=1e-6)


def test_fp8_linear_tiles_and_dtypes_agree():
    w8, ws = fp8_weight(200, 256, seed=2)
    x = torch.randn(3, 7, 256)
    ref = fp8.fp8_linear(x, w8, ws, impl="torch")
    for cfg in (fp8.GemmConfig(16, 32, 4, 2, 1), fp8.GemmConfig(32, 64, 4, 2, 2), fp8.GemmConfig(64, 128, 4, 2, 8)):
        y = fp8.fp8_linear(x, w8, ws, impl="triton", config=cfg)
        assert y.shape == (3, 7, 200) and torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    yb = fp8.fp8_linear(x.bfloat16(), w8, ws, impl="triton")
    assert yb.dtype == torch.bfloat16
    assert torch.allclose(yb.float(), fp8.fp8_linear(x.bfloat16(), w8, ws, impl="torch").float(), rtol=1e-2, atol=1e-3)
    assert fp8.fp8_linear(x, w8, ws).shape == (3, 7, 200)  # impl="auto" under the interpreter: Triton


def test_fp8_linear_poisoned_input_rows_stay_poisoned():
    w8, ws = fp8_weight(128, 256)
    x = torch.randn(20, 256)
    x[4, 3] = float("nan")
    x[9, 130] = float("inf")
    y = fp8.fp8_linear(x, w8, ws, impl="triton")
    bad = torch.zeros(20, dtype=torch.bool)
    bad[[4, 9]] = True
    assert not y[bad].isfinite().any() and y[~bad].isfinite().all()
    assert torch.allclose(y[~bad], fp8.fp8_linear(x[~bad], w8, ws, impl="torch"), rtol=1e-5, atol=1e-5)


def test_fp8_linear_rejects_bad_shapes():
    w8, ws = fp8_weight(256, 256)
    with pytest.raises(ValueError, match=r"in_features=256"):
        fp8.fp8_linear(torch.randn(2, 128), w8, ws)
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        fp8.fp8_linear(torch.randn(2, 256), w8, ws[:1])
    with pytest.raises(ValueError, match="e4m3 weight"):
        fp8.fp8_linear(torch.randn(2, 256), w8.float(), ws)
    w8b, wsb = fp8_weight(256, 200)
    with pytest.raises(ValueError, match=r"multiple of 128.*\(2, 200\)"):
        fp8.fp8_linear(torch.randn(2, 200), w8b, wsb)
    with pytest.raises(ValueError, match="impl must be"):
        fp8.fp8_linear(torch.randn(2, 256), w8, ws, impl="cuda")


def test_fp8linear_keeps_the_dequantise_path_on_cpu():
    lin = FP8Linear(256, 128)
    lin.weight.data, lin.weight_scale_inv.data = fp8_weight(128, 256)
    x = torch.randn(4, 256)
    assert fp8.linear_fast_path(x, lin.weight, lin.weight_scale_inv) is None  # not a CUDA tensor
    assert torch.equal(lin(x), x @ dequantize_fp8_blocks(lin.weight, lin.weight_scale_inv).T)


# --------------------------------------------------------------------------------------------------- grouped MoE
def test_group_by_expert_tiles_cover_each_experts_rows_once():
    idx = torch.tensor([[0, 3], [3, 0], [3, 1], [0, 3], [3, 1]])  # experts 2 and 4 idle, expert 3 busiest
    g = kmoe.group_by_expert(idx, torch.rand(5, 2), n_experts=5, block_m=2)
    assert g.bounds.tolist() == [0, 3, 5, 5, 10, 10]
    flat = idx.reshape(-1)
    assert torch.equal(flat[g.position.reshape(-1).long()].sort().values, flat.sort().values)
    assert (g.row_token.long()[g.position.long()] == torch.arange(5)[:, None]).all()  # position inverts the sort
    seen = torch.zeros(10, dtype=torch.int64)
    for e, r, end in zip(g.tile_expert.tolist(), g.tile_row.tolist(), g.tile_end.tolist()):
        if e < 0:
            continue
        assert g.bounds[e] <= r < end == g.bounds[e + 1]
        seen[r : min(r + 2, end)] += 1
    assert seen.tolist() == [1] * 10  # every row in exactly one tile
    assert sorted(set(g.tile_expert.tolist()) - {-1}) == [0, 1, 3]  # idle experts get no tile
    assert len(g.tile_expert) == 5 + 5  # launched for ceil(R / 2) + min(E, R) tiles, the worst case


def stacked_fp8(n_experts: int, d: int, inter: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    blocks13 = [quantize_fp8_blocks(torch.randn(2 * inter, d, generator=g) * 0.05) for _ in range(n_experts)]
    blocks2 = [quantize_fp8_blocks(torch.randn(d, inter, generator=g) * 0.05) for _ in range(n_experts)]
    return (torch.stack([q for q, _ in blocks13]), torch.stack([s for _, s in blocks13]),
            torch.stack([q for q, _ in blocks2]), torch.stack([s for _, s in blocks2]))


def uneven_routing(n_tokens: int, n_experts: int, k: int, seed: int = 0):
    """Each token's k distinct experts, expert 0 overloaded, the last expert idle."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n_experts - 1, generator=g)[:k] for _ in range(n_tokens)])
    idx[: n_tokens // 2, 0] = torch.where(idx[: n_tokens // 2, 1] == 0, 1, 0)
    return idx, torch.rand(n_tokens, k, generator=g)


@pytest.mark.parametrize("block_m", [16, 64])
def test_moe_experts_match_the_reference(block_m, poisoned):
    w13, s13, w2, s2 = stacked_fp8(6, 256, 128)
    idx, wt = uneven_routing(19, 6, 2)
    x = torch.randn(19, 256)
    cfg = kmoe.MoEConfig(block_m, 4, 2, 64, 4, 2)
    y = kmoe.moe_experts(x, idx, wt, w13, s13, w2, s2, config=cfg)
    ref = kmoe.moe_experts_torch(x, idx, wt, w13, s13, w2, s2)
    assert y.isfinite().all()
    assert_same_maths(y, ref)


def test_decode_reads_only_the_active_experts():
    """One token, k = 2 of 6 experts: the other experts' weights are never read (their NaN scales would show)."""
    w13, s13, w2, s2 = stacked_fp8(6, 128, 128, seed=4)
    idx, wt = torch.tensor([[4, 1]]), torch.tensor([[0.7, 0.4]])
    idle = torch.tensor([0, 2, 3, 5])
    s13_poisoned, s2_poisoned = s13.clone(), s2.clone()
    s13_poisoned[idle] = float("nan")
    s2_poisoned[idle] = float("nan")
    x = torch.randn(1, 128)
    y = kmoe.moe_experts(x, idx, wt, w13, s13_poisoned, w2, s2_poisoned)
    assert y.isfinite().all()
    assert_same_maths(y, kmoe.moe_experts_torch(x, idx, wt, w13, s13, w2, s2))


def test_one_token_path_is_the_sorted_path(poisoned):
    """Decode (N = 1) skips the sort: each of the token's rows is its own tile, built from cached index tensors
    and views of the routing. Same kernels, same rows: the same numbers, bit for bit, as the sorted grouping."""
    w13, s13, w2, s2 = stacked_fp8(6, 128, 128, seed=5)
    idx, wt = torch.tensor([[4, 1, 5]]), torch.tensor([[0.7, 0.4, 0.2]])
    x = torch.randn(1, 128)
    g1 = kmoe.one_token_grouping(idx, wt, 16)
    assert g1.tile_expert.data_ptr() == idx.data_ptr()  # a view: nothing launched to build it
    assert kmoe.one_token_grouping(idx, wt, 16).tile_row is g1.tile_row  # cached, the same tensor every call
    cfg = kmoe.MoEConfig(16, 4, 2, 64, 4, 2)
    y = kmoe.moe_experts(x, idx, wt, w13, s13, w2, s2, config=cfg)
    x8, sx = fp8._act_quant_2d(x)
    g = kmoe.group_by_expert(idx, wt, 6, 16)
    h8, sh = kmoe.gate_up(x8, sx, g, w13, s13, cfg)
    ref = kmoe.combine(kmoe.down(h8, sh, g, w2, s2, cfg, x.dtype), g.position, torch.empty_like(x))
    assert torch.equal(y, ref)
    with pytest.raises(ValueError, match="one token"):
        kmoe.one_token_grouping(idx.expand(2, 3), wt.expand(2, 3), 16)


def test_scaled_mm_shape_rule_and_padded_quantisation():
    """fp8_linear(impl="auto") decides by shape: the Triton kernel below 16 tokens, torch._scaled_mm above with
    the tokens padded to a multiple of 16 (cuBLAS refused M = 1 and M = 99 on the H200). The padded
    act_quant writes the same first rows and leaves the padding alone."""
    assert fp8.scaled_mm_rows(1) is None and fp8.scaled_mm_rows(15) is None
    assert fp8.scaled_mm_rows(16) == 16 and fp8.scaled_mm_rows(99) == 112 and fp8.scaled_mm_rows(4096) == 4096
    x = torch.randn(5, 256)
    q, s = fp8._act_quant_2d(x, col_major_scale=True)
    qp, sp = fp8._act_quant_2d(x, col_major_scale=True, rows=16)
    assert qp.shape == (16, 256) and sp.shape == (16, 2) and sp.stride() == (1, 16)
    assert torch.equal(bits(qp[:5]), bits(q)) and torch.equal(sp[:5], s)


def test_a_wrong_cublas_result_is_caught_once_per_shape(monkeypatch):
    """torch._scaled_mm returned wrong numbers without an error for K = 256 on the H200 (tests/test_gpu_backends.py).
    fp8_linear compares cuBLAS's first result for a weight shape with its Triton kernel's: a match is remembered,
    a mismatch sends that shape to the Triton kernel from then on."""
    monkeypatch.setattr(fp8, "_SCALED_MM_CHECKED", set())
    monkeypatch.setattr(fp8, "_SCALED_MM_REFUSED", {})
    monkeypatch.setattr(fp8, "_WARNED", set())
    w8, ws = fp8_weight(96, 256)
    x8, sx = fp8._act_quant_2d(torch.randn(20, 256))
    right = fp8.fp8_gemm(x8, sx, w8, ws, torch.float32)
    assert fp8._scaled_mm_agrees(right * (1 + 1e-4), x8, sx, w8, ws)
    assert (96, 256, torch.float32) in fp8._SCALED_MM_CHECKED
    assert fp8._scaled_mm_agrees(-right, x8, sx, w8, ws)  # checked already: not compared again
    monkeypatch.setattr(fp8, "_SCALED_MM_CHECKED", set())
    with pytest.warns(RuntimeWarning, match="wrong results"):
        assert not fp8._scaled_mm_agrees(-right, x8, sx, w8, ws)
    assert "wrong result" in fp8._SCALED_MM_REFUSED[(96, 256, torch.float32)]


def test_reference_without_quantisation_is_chapter_4_dispatch():
    w13, s13, w2, s2 = stacked_fp8(4, 128, 128, seed=3)
    idx, wt = uneven_routing(9, 4, 2, seed=1)
    x = torch.randn(9, 128)
    experts = [lambda t, e=e: torch.nn.functional.linear(
        torch.nn.functional.silu(t @ dequantize_fp8_blocks(w13[e, :128], s13[e, :1]).T)
        * (t @ dequantize_fp8_blocks(w13[e, 128:], s13[e, 1:]).T), dequantize_fp8_blocks(w2[e], s2[e]))
        for e in range(4)]
    ref = dispatch(x, idx, wt, experts)
    assert torch.allclose(kmoe.moe_experts_torch(x, idx, wt, w13, s13, w2, s2, quantize=False), ref, atol=1e-6)


def tiny_fp8_moe(seed: int = 0) -> MoE:
    """A MoE block whose experts are FP8Linear (d = 256, I = 128: the kernels' 128-channel blocks)."""
    cfg = ModelConfig.tiny(hidden_size=256, moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2,
                           n_group=4, topk_group=2, n_shared_experts=1)
    moe = MoE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    dense = {n: p.detach().clone() for n, p in moe.named_parameters()}
    use_fp8_storage(moe, prefix="model.layers.1.mlp.")
    for name, mod in moe.named_modules():
        if isinstance(mod, FP8Linear):
            mod.weight.data, mod.weight_scale_inv.data = quantize_fp8_blocks(dense[name + ".weight"])
    return moe


def test_moe_forward_triton_backend_matches_the_torch_path():
    moe = tiny_fp8_moe()
    x = torch.randn(2, 11, 256)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    y = moe(x, backend="triton")
    # the same maths in plain torch: routed experts + the shared one as a 9th expert with weight 1
    flat = x.reshape(-1, 256)
    routing = moe.gate.route(flat)
    st = moe._stacked_experts
    idx = torch.cat([routing.topk_idx, torch.full((22, 1), 8)], 1)
    wt = torch.cat([routing.topk_weight, torch.ones(22, 1)], 1)
    exact = kmoe.moe_experts_torch(flat, idx, wt, st.w13, st.s13, st.w2, st.s2)
    assert_same_maths(y.reshape(22, 256), exact.reshape(22, 256))
    # against chapter 4's path (weights dequantised, activations not quantised): e4m3 rounding of x and of the
    # intermediate, ~2-3% per element for Gaussian data
    torch_path = moe(x, backend="torch")
    assert torch.allclose(torch_path, moe_reference(moe, x), atol=1e-5)
    assert (y - torch_path).norm() <= 0.06 * torch_path.norm()
    # the experts' own parameters are views into the stacked tensors: same names, same values, no copy kept
    after = moe.state_dict()
    assert list(after) == list(before) and all(torch.equal(bits(after[k]) if after[k].dtype == FP8_DTYPE else after[k],
                                                           bits(v) if v.dtype == FP8_DTYPE else v)
                                               for k, v in before.items())
    assert moe.experts[3].up_proj.weight.data_ptr() == st.w13[3, 128:].data_ptr()
    assert moe.shared_experts.down_proj.weight.data_ptr() == st.w2[8].data_ptr()
    assert kmoe.stack_experts(moe) is st  # cached


def test_moe_forward_bf16_experts_use_grouped_mm():
    cfg = ModelConfig.tiny(hidden_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                           n_group=4, topk_group=2)
    moe = MoE(cfg).to(torch.bfloat16)
    x = torch.randn(1, 13, 64, dtype=torch.bfloat16)
    y = moe(x, backend="triton")
    ref = moe(x, backend="torch")
    assert y.dtype == torch.bfloat16 and (y.float() - ref.float()).norm() <= 0.02 * ref.float().norm()
    assert moe._stacked_experts.s13 is None


def test_moe_falls_back_with_one_warning_for_fp32_experts():
    cfg = ModelConfig.tiny(hidden_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                           n_group=4, topk_group=2)
    moe = MoE(cfg)
    x = torch.randn(1, 5, 64)
    fp8._WARNED.clear()
    with pytest.warns(RuntimeWarning, match="float32.*torch path"):
        y = moe(x, backend="triton")
    assert torch.equal(y, moe(x, backend="torch"))
    with pytest.raises(ValueError, match="backend must be"):
        moe(x, backend="cuda")


def test_moe_falls_back_with_one_warning_for_a_too_old_triton(monkeypatch):
    cfg = ModelConfig.tiny(hidden_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                           n_group=4, topk_group=2)
    moe = MoE(cfg).to(torch.bfloat16)
    x = torch.randn(1, 5, 64, dtype=torch.bfloat16)
    fp8._WARNED.clear()
    monkeypatch.setattr(kmoe, "TRITON_PROBLEM", "Triton 3.0.0 is older than 3.6")
    with pytest.warns(RuntimeWarning, match=r"Triton 3\.0\.0 is older than 3\.6; using the torch path"):
        y = moe(x, backend="triton")
    assert torch.equal(y, moe(x, backend="torch"))


def test_moe_nan_token_poisons_only_its_own_output(poisoned):
    w13, s13, w2, s2 = stacked_fp8(4, 128, 128, seed=5)
    idx, wt = uneven_routing(12, 4, 2, seed=2)
    x = torch.randn(12, 128)
    x[6, 17] = float("nan")
    y = kmoe.moe_experts(x, idx, wt, w13, s13, w2, s2)
    assert y[6].isnan().all() and y[torch.arange(12) != 6].isfinite().all()
    keep = torch.arange(12) != 6
    ref = kmoe.moe_experts_torch(x[keep], idx[keep], wt[keep], w13, s13, w2, s2)
    assert_same_maths(y[keep], ref)


def test_moe_experts_reject_bad_input():
    w13, s13, w2, s2 = stacked_fp8(3, 128, 128)
    x, idx, wt = torch.randn(4, 128), torch.zeros(4, 2, dtype=torch.int64), torch.ones(4, 2)
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        kmoe.moe_experts(x, idx + 3, wt, w13, s13, w2, s2)
    with pytest.raises(ValueError, match=r"w2 must be \[E=3, d=128, I=128\]"):
        kmoe.moe_experts(x, idx, wt, w13, s13, w2[:, :, :64], s2)
    with pytest.raises(ValueError, match=r"multiples of 128.*d=96"):
        w13b = torch.zeros(3, 256, 96).to(FP8_DTYPE)
        kmoe.moe_experts(torch.randn(4, 96), idx, wt, w13b, s13, torch.zeros(3, 96, 128).to(FP8_DTYPE), s2)
    with pytest.raises(ValueError, match=r"\[N=4, k\]"):
        kmoe.moe_experts(x, idx[:3], wt[:3], w13, s13, w2, s2)
