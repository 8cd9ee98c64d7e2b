"""Sparse MLA attention over the selected latents, and dense absorbed decode, as Triton kernels (chapter 6).

Same maths as `dslib.sparse.sparse_attention` (chapter 3), in MLA's absorbed (MQA) mode: every head of a query
attends to the same k selected cache entries, each entry the 576 values [c^KV (512) | k_rope (64)]:

    score[h,i] = (q_absorbed[h] · c[s_i] + q_rope[h] · k_rope[s_i]) · scale        s_i = selected[i]
    x[h]       = Σ_i softmax_i(score[h,:]) · c[s_i]                                  (the values are the latents)

One program owns one query and a block of BLOCK_H heads (64: the tensor cores' tile height; 128 heads would
need 128 × 512 fp32 accumulators = the whole register file). It walks the query's k indices BLOCK_N at a time:

1. **In-kernel gather.** Load BLOCK_N indices, then the BLOCK_N latent rows they name straight from the cache
   `[S, 576]` into on-chip memory (the PyTorch path copies them into a `[chunk, k, 576]` tensor first).
2. **Scores.** Two `tl.dot`s, `[BH, 512] × [512, BN]` + `[BH, 64] × [64, BN]`, fp32 accumulation.
3. **Online softmax** (FlashAttention): keep a running max m and sum l per head; when a block raises the max,
   rescale what was accumulated by exp(m_old - m_new). No `[H, k]` probability matrix is ever stored.
4. **Weighted sum.** `[BH, BN] × [BN, 512]` into an fp32 accumulator `[BH, 512]` in registers, with the same
   gathered latents as values.

Decode has one query per sequence, too few programs to fill the GPU: the k keys (or, for dense decode, the S
cached keys) are split over several programs ("split-KV", flash-decoding) that each write a partial result
and its log-sum-exp; `_combine_kernel` merges them. Invalid indices (-1, or >= S) contribute nothing; a query
with no valid key gets 0 (where the PyTorch softmax over nothing gives NaN).

The budget of one Hopper SM (228 KB shared memory, 64K 32-bit registers) at the 671B dims: q of 64 heads
[64, 576] bf16 = 72 KB stays in shared memory for the whole walk; a block of 32 gathered rows × 576 = 36 KB,
double-buffered so the next rows arrive while this block computes; the accumulator [64, 512] fp32 = 32K
registers, half the register file, hence 8 warps (128 registers each for it). Triton gives all warps of a dot
whose result feeds another dot to the row axis, so with 64 heads both warpgroups compute the same scores: the
q·k part runs twice, the weighted sum once (FlashMLA's hand-written kernel gives each warpgroup its own keys).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dslib.kernels.launch import pow2_block, require_device, require_dtype, sm_count

# Tiles and launch settings; benchmarks/gpu_kernels.py sweeps alternatives on the GPU (pass config= to try them).
# 64 heads per program with 8 warps: the [64, 512] fp32 accumulator is 128 registers per thread; 32 keys per step
# keep shared memory at ~145 KB (q 72 KB + 2 × 36 KB of gathered rows) and register spills small.
SPARSE_CONFIG = dict(BLOCK_H=64, BLOCK_N=32, num_warps=8, num_stages=3)
DENSE_CONFIG = dict(BLOCK_H=64, BLOCK_N=32, num_warps=8, num_stages=3)
MAX_LATENT = 512  # C: the fp32 accumulator [BLOCK_H, C] lives in registers
MAX_ROPE = 128
COMBINE_BLOCK_H = 16  # the merge holds [16, C] fp32 per program: no register spills at C = 512
LOG2E = 1.4426950408889634  # 1 / ln 2: exp(x) = exp2(x · log2(e))


# ---------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _attend_block(q_c, q_r, kc, kr, valid, m_i, l_i, acc, qk_scale):
    """One block of BLOCK_N keys for BLOCK_H heads of one query, FlashAttention's online softmax.
    q_c [BH, C], q_r [BH, R], kc [BN, C] (keys AND values), kr [BN, R], valid [BN];
    running max m_i [BH] and sum l_i [BH] (base 2), accumulator acc [BH, C] fp32. Returns the updated three."""
    s = tl.dot(q_c, tl.trans(kc))  # [BH, BN] content part: q_absorbed · c^KV
    s = tl.dot(q_r, tl.trans(kr), s)  # + position part: q_rope · k_rope
    s = tl.where(valid[None, :], s * qk_scale, float("-inf"))  # qk_scale = scale · log2(e): exp2 below
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: keep exp2 away from -inf - -inf
    alpha = tl.exp2(m_i - m_ref)  # rescales the old sum and accumulator to the new max
    p = tl.exp2(s - m_ref[:, None])  # [BH, BN] unnormalised probabilities
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(kc.dtype), kc)  # the values are the gathered latents themselves
    return m_new, l_i, acc


@triton.jit
def _store_result(acc, m_i, l_i, out_ptr, lse_ptr, offs_h, offs_c, h_ok, c_ok, stride_oh, SPLIT: tl.constexpr):
    """Final output acc / l (0 for a query without valid keys), or, when the keys were split over programs,
    this program's normalised partial result (fp32) and its log2-sum-exp (-inf when it saw no valid key)."""
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    ptrs = out_ptr + offs_h[:, None] * stride_oh + offs_c[None, :]
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & c_ok[None, :])
    if SPLIT:
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + offs_h, lse, mask=h_ok)


@triton.jit
def _sparse_mla_kernel(
    qc_ptr, qr_ptr, kv_ptr, kr_ptr, sel_ptr, out_ptr, lse_ptr,
    T, S, H, TOPK, NUM_SPLITS, keys_per_split, qk_scale,
    s_qcb, s_qct, s_qch, s_qrb, s_qrt, s_qrh, s_kvb, s_kvs, s_krb, s_krs, s_selb, s_selt,
    s_ob, s_ot, s_osp, s_oh, s_lb, s_lt, s_lsp,
    C: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
):
    """q_absorbed [B,T,H,C], q_rope [B,T,H,R], kv_latent [B,S,C], k_rope [B,S,R], selected [B,T,TOPK] ->
    out [B,T,NUM_SPLITS,H,C] (+ lse [B,T,NUM_SPLITS,H] when SPLIT). Grid: (T · NUM_SPLITS · head blocks, B)."""
    pid = tl.program_id(0)  # head block fastest: the head blocks of one query gather the same rows (L2 hits)
    b = tl.program_id(1).to(tl.int64)
    n_hb = tl.cdiv(H, BLOCK_H)
    hb = pid % n_hb
    split = (pid // n_hb) % NUM_SPLITS
    t = (pid // n_hb // NUM_SPLITS).to(tl.int64)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    h_ok, c_ok, r_ok = offs_h < H, offs_c < C, offs_r < R

    q_c = tl.load(qc_ptr + b * s_qcb + t * s_qct + offs_h[:, None] * s_qch + offs_c[None, :],
                  mask=h_ok[:, None] & c_ok[None, :], other=0.0)  # [BH, C]
    q_r = tl.load(qr_ptr + b * s_qrb + t * s_qrt + offs_h[:, None] * s_qrh + offs_r[None, :],
                  mask=h_ok[:, None] & r_ok[None, :], other=0.0)  # [BH, R]
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)

    sel_row = sel_ptr + b * s_selb + t * s_selt
    kv_base = kv_ptr + b * s_kvb
    kr_base = kr_ptr + b * s_krb
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, TOPK)
    for i in range(start, end, BLOCK_N):
        offs_i = i + tl.arange(0, BLOCK_N)
        idx = tl.load(sel_row + offs_i, mask=offs_i < end, other=-1)  # [BN] selected key positions
        valid = (idx >= 0) & (idx < S)
        # The gather: the BN cache rows named by the indices, loaded straight into the tile. An empty slot
        # reads row 0 (as the PyTorch path does) and is masked in the scores: unmasked loads save registers.
        rows = tl.where(valid, idx, 0).to(tl.int64)
        kc = tl.load(kv_base + rows[:, None] * s_kvs + offs_c[None, :], mask=c_ok[None, :], other=0.0)  # [BN, C]
        kr = tl.load(kr_base + rows[:, None] * s_krs + offs_r[None, :], mask=r_ok[None, :], other=0.0)  # [BN, R]
        m_i, l_i, acc = _attend_block(q_c, q_r, kc, kr, valid, m_i, l_i, acc, qk_scale)

    _store_result(acc, m_i, l_i, out_ptr + b * s_ob + t * s_ot + split * s_osp, lse_ptr + b * s_lb + t * s_lt
                  + split * s_lsp, offs_h, offs_c, h_ok, c_ok, s_oh, SPLIT)


@triton.jit
def _dense_mla_kernel(
    qc_ptr, qr_ptr, kv_ptr, kr_ptr, pos_ptr, out_ptr, lse_ptr,
    T, S, H, NUM_SPLITS, keys_per_split, qk_scale,
    s_qcb, s_qct, s_qch, s_qrb, s_qrt, s_qrh, s_kvb, s_kvs, s_krb, s_krs, s_pb,
    s_ob, s_ot, s_osp, s_oh, s_lb, s_lt, s_lsp,
    C: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
):
    """Dense absorbed attention: as `_sparse_mla_kernel`, but the keys are every cached position s <= pos[t],
    read contiguously (no index list). Each program takes keys_per_split consecutive keys."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_hb = tl.cdiv(H, BLOCK_H)
    hb = pid % n_hb
    split = (pid // n_hb) % NUM_SPLITS
    t = (pid // n_hb // NUM_SPLITS).to(tl.int64)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    h_ok, c_ok, r_ok = offs_h < H, offs_c < C, offs_r < R

    q_c = tl.load(qc_ptr + b * s_qcb + t * s_qct + offs_h[:, None] * s_qch + offs_c[None, :],
                  mask=h_ok[:, None] & c_ok[None, :], other=0.0)  # [BH, C]
    q_r = tl.load(qr_ptr + b * s_qrb + t * s_qrt + offs_h[:, None] * s_qrh + offs_r[None, :],
                  mask=h_ok[:, None] & r_ok[None, :], other=0.0)  # [BH, R]
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)

    n_keys = tl.minimum(tl.load(pos_ptr + b * s_pb + t) + 1, S).to(tl.int32)  # causal: keys 0..pos
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, n_keys)
    kv_base = kv_ptr + b * s_kvb
    kr_base = kr_ptr + b * s_krb
    for i in range(start, end, BLOCK_N):
        offs_s = i + tl.arange(0, BLOCK_N)
        valid = offs_s < end
        rows = tl.minimum(offs_s, end - 1).to(tl.int64)  # the tail re-reads the last key (masked in the scores)
        kc = tl.load(kv_base + rows[:, None] * s_kvs + offs_c[None, :], mask=c_ok[None, :], other=0.0)  # [BN, C]
        kr = tl.load(kr_base + rows[:, None] * s_krs + offs_r[None, :], mask=r_ok[None, :], other=0.0)  # [BN, R]
        m_i, l_i, acc = _attend_block(q_c, q_r, kc, kr, valid, m_i, l_i, acc, qk_scale)

    _store_result(acc, m_i, l_i, out_ptr + b * s_ob + t * s_ot + split * s_osp, lse_ptr + b * s_lb + t * s_lt
                  + split * s_lsp, offs_h, offs_c, h_ok, c_ok, s_oh, SPLIT)


@triton.jit
def _combine_kernel(part_ptr, lse_ptr, out_ptr, H, NUM_SPLITS,
                    s_pb, s_pt, s_psp, s_ph, s_lb, s_lt, s_lsp, s_ob, s_ot, s_oh,
                    C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    """Merge the partial results of one query's key splits: out = Σ_j 2^(lse_j - M) · o_j / Σ_j 2^(lse_j - M)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_hb = tl.cdiv(H, BLOCK_H)
    hb = pid % n_hb
    t = (pid // n_hb).to(tl.int64)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    h_ok, c_ok = offs_h < H, offs_c < C
    lse_row = lse_ptr + b * s_lb + t * s_lt + offs_h
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    for j in range(NUM_SPLITS):
        m = tl.maximum(m, tl.load(lse_row + j * s_lsp, mask=h_ok, other=float("-inf")))
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    den = tl.zeros((BLOCK_H,), dtype=tl.float32)
    part_rows = part_ptr + b * s_pb + t * s_pt + offs_h[:, None] * s_ph + offs_c[None, :]
    for j in range(NUM_SPLITS):
        wj = tl.exp2(tl.load(lse_row + j * s_lsp, mask=h_ok, other=float("-inf")) - m_ref)  # [BH]
        acc += wj[:, None] * tl.load(part_rows + j * s_psp, mask=h_ok[:, None] & c_ok[None, :], other=0.0)
        den += wj
    out = acc / tl.where(den > 0, den, 1.0)[:, None]
    tl.store(out_ptr + b * s_ob + t * s_ot + offs_h[:, None] * s_oh + offs_c[None, :],
             out.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & c_ok[None, :])


# ---------------------------------------------------------------------------------------------------- wrappers
def _check_mla(q_absorbed, q_rope, kv_latent, k_rope, name):
    if q_absorbed.dim() != 4 or q_rope.dim() != 4 or kv_latent.dim() != 3 or k_rope.dim() != 3:
        raise ValueError(f"{name}: expected q_absorbed [B, T, H, C], q_rope [B, T, H, R], kv_latent [B, S, C], "
                         f"k_rope [B, S, R]; got {tuple(q_absorbed.shape)}, {tuple(q_rope.shape)}, "
                         f"{tuple(kv_latent.shape)}, {tuple(k_rope.shape)}.")
    B, T, H, C = q_absorbed.shape
    R = q_rope.shape[-1]
    S = kv_latent.shape[1]
    if tuple(q_rope.shape[:3]) != (B, T, H) or tuple(kv_latent.shape) != (B, S, C) or tuple(k_rope.shape) != (B, S, R):
        raise ValueError(f"{name}: shapes do not agree: q_absorbed {tuple(q_absorbed.shape)}, q_rope "
                         f"{tuple(q_rope.shape)}, kv_latent {tuple(kv_latent.shape)}, k_rope {tuple(k_rope.shape)}.")
    if C > MAX_LATENT or R > MAX_ROPE:
        raise ValueError(f"{name}: the kernel supports kv_lora_rank C <= {MAX_LATENT} and qk_rope_head_dim R <= "
                         f"{MAX_ROPE} (the fp32 accumulator [heads, C] lives in registers); got C = {C}, R = {R}.")
    for n, t in (("q_absorbed", q_absorbed), ("q_rope", q_rope), ("kv_latent", kv_latent), ("k_rope", k_rope)):
        require_dtype(n, t, (torch.bfloat16, torch.float16, torch.float32))
    if len({q_absorbed.dtype, q_rope.dtype, kv_latent.dtype, k_rope.dtype}) != 1:
        raise ValueError(f"{name}: all four tensors need one dtype, got {q_absorbed.dtype}, {q_rope.dtype}, "
                         f"{kv_latent.dtype}, {k_rope.dtype}.")
    return B, T, H, C, R, S


def _unit_last(*ts):
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def _num_splits(work: int, blocks: int, device: torch.device, num_splits: int | None) -> int:
    """How many programs share one query's keys: enough programs for ~2 waves on the GPU, never more splits
    than key blocks. Prefill (many queries) gets 1: no partial results, no combine step."""
    if num_splits is not None:
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}.")
        return min(num_splits, max(1, blocks))
    target = 2 * sm_count(device)
    return max(1, min(blocks, -(-target // max(1, work))))


def _launch(kernel, keys_of, q_absorbed, q_rope, kv_latent, k_rope, scale, keys, splits, cfg, out):
    """Run kernel over (query, split, head block) programs; with splits > 1, then merge the partial results.
    keys_of: (tensor, its scalar args, its strides) that say which keys a query sees (selection or positions)."""
    index, index_scalars, index_strides = keys_of
    B, T, H, C = q_absorbed.shape
    R = q_rope.shape[-1]
    S = kv_latent.shape[1]
    BLOCK_H, BLOCK_N = cfg["BLOCK_H"], cfg["BLOCK_N"]
    blocks_per_split = -(-triton.cdiv(keys, BLOCK_N) // splits)
    keys_per_split = blocks_per_split * BLOCK_N
    splits = max(1, triton.cdiv(keys, keys_per_split))
    dev = q_absorbed.device
    if splits == 1:
        part, lse = out.unsqueeze(2), out.new_empty(1, dtype=torch.float32)  # [B, T, 1, H, C]; no lse
        lse_strides = (0, 0, 0)
    else:
        part = torch.empty(B, T, splits, H, C, dtype=torch.float32, device=dev)
        lse = torch.empty(B, T, splits, H, dtype=torch.float32, device=dev)
        lse_strides = (lse.stride(0), lse.stride(1), lse.stride(2))
    n_hb = triton.cdiv(H, BLOCK_H)
    grid = (T * splits * n_hb, B)
    kernel[grid](
        q_absorbed, q_rope, kv_latent, k_rope, index, part, lse, T, S, H, *index_scalars, splits,
        keys_per_split, scale * LOG2E,
        *q_absorbed.stride()[:3], *q_rope.stride()[:3], kv_latent.stride(0), kv_latent.stride(1), k_rope.stride(0),
        k_rope.stride(1), *index_strides,
        part.stride(0), part.stride(1), part.stride(2), part.stride(3), *lse_strides,
        C=C, R=R, BLOCK_C=pow2_block(C), BLOCK_R=pow2_block(R), SPLIT=splits > 1, **cfg,
    )
    if splits > 1:
        n_cb = triton.cdiv(H, COMBINE_BLOCK_H)
        _combine_kernel[(T * n_cb, B)](
            part, lse, out, H, splits, part.stride(0), part.stride(1), part.stride(2), part.stride(3),
            *lse_strides, out.stride(0), out.stride(1), out.stride(2),
            C=C, BLOCK_C=pow2_block(C), BLOCK_H=COMBINE_BLOCK_H, num_warps=4,
        )
    return out


def _output(out, B, T, H, C, dtype, device, name):
    if out is None:
        return torch.empty(B, T, H, C, dtype=dtype, device=device)
    if tuple(out.shape) != (B, T, H, C) or out.stride(-1) != 1:
        raise ValueError(f"{name}: out must be [B, T, H, C] = [{B}, {T}, {H}, {C}] with unit last stride, got "
                         f"{tuple(out.shape)}.")
    return out


def sparse_mla(q_absorbed: torch.Tensor, q_rope: torch.Tensor, kv_latent: torch.Tensor, k_rope: torch.Tensor,
               selected: torch.Tensor, scale: float, *, out: torch.Tensor | None = None,
               num_splits: int | None = None, config: dict | None = None) -> torch.Tensor:
    """DSA core attention over the selected keys: x `[B, T, H, C]` in the dtype of q_absorbed.

    q_absorbed `[B, T, H, C]` (= W_UKᵀ q_nope), q_rope `[B, T, H, R]`, kv_latent `[B, S, C]`, k_rope `[B, S, R]`,
    selected `[B, T, k]` integer key positions (-1 = none; >= S is treated as none), scale the softmax scale.
    The maths of `dslib.sparse.sparse_attention`, with fp32 scores, softmax and accumulation (the probabilities
    enter the weighted sum in the inputs' dtype, as there). A query with no valid key gets 0 instead of NaN.
    `num_splits` overrides how many programs share one query's keys (default: chosen from the GPU's size).
    """
    B, T, H, C, _, _ = _check_mla(q_absorbed, q_rope, kv_latent, k_rope, "sparse_mla")
    if selected.dim() != 3 or tuple(selected.shape[:2]) != (B, T):
        raise ValueError(f"sparse_mla: selected must be [B, T, k] = [{B}, {T}, k], got {tuple(selected.shape)}.")
    if selected.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"sparse_mla: selected must be int32 or int64, got {selected.dtype}.")
    require_device(q_absorbed=q_absorbed, q_rope=q_rope, kv_latent=kv_latent, k_rope=k_rope, selected=selected)
    cfg = {**SPARSE_CONFIG, **(config or {})}
    out = _output(out, B, T, H, C, q_absorbed.dtype, q_absorbed.device, "sparse_mla")
    topk = selected.shape[-1]
    if B * T * H == 0:
        return out
    if kv_latent.shape[1] == 0:  # no keys at all: every query gets 0
        return out.zero_()
    q_absorbed, q_rope, kv_latent, k_rope, selected = _unit_last(q_absorbed, q_rope, kv_latent, k_rope, selected)
    blocks = triton.cdiv(max(topk, 1), cfg["BLOCK_N"])
    splits = _num_splits(B * T * triton.cdiv(H, cfg["BLOCK_H"]), blocks, q_absorbed.device, num_splits)
    keys_of = (selected, (topk,), (selected.stride(0), selected.stride(1)))
    return _launch(_sparse_mla_kernel, keys_of, q_absorbed, q_rope, kv_latent, k_rope, scale,
                   max(topk, 1), splits, cfg, out)


def dense_mla(q_absorbed: torch.Tensor, q_rope: torch.Tensor, kv_latent: torch.Tensor, k_rope: torch.Tensor,
              q_positions: torch.Tensor, scale: float, *, out: torch.Tensor | None = None,
              num_splits: int | None = None, config: dict | None = None) -> torch.Tensor:
    """Dense absorbed (MQA-mode) attention, causal by position: x `[B, T, H, C]`; the decode baseline.

    Same inputs as `sparse_mla` with q_positions `[T]` or `[B, T]` instead of a selection: the query at position
    p attends to every cached key 0..p (the maths of `MLA.attend(mode="absorbed")` before W_UV, and of
    `dslib.sparse.dense_masked_attention` with a causal mask). Built for decode (few queries, long caches:
    the keys are split over programs, flash-decoding); it runs any T but has no prefill tiling.
    """
    B, T, H, C, _, S = _check_mla(q_absorbed, q_rope, kv_latent, k_rope, "dense_mla")
    pos = q_positions if q_positions.dim() == 2 else q_positions.reshape(1, -1)
    if q_positions.dim() not in (1, 2) or pos.shape[-1] != T or pos.shape[0] not in (1, B):
        raise ValueError(f"dense_mla: q_positions must be [T] or [B, T] with T = {T}, B = {B}; got "
                         f"{tuple(q_positions.shape)}.")
    if q_positions.dtype.is_floating_point:
        raise ValueError(f"dense_mla: q_positions must be integers, got {q_positions.dtype}.")
    require_device(q_absorbed=q_absorbed, q_rope=q_rope, kv_latent=kv_latent, k_rope=k_rope, q_positions=q_positions)
    pos = pos.expand(B, T).to(torch.int64).contiguous()
    cfg = {**DENSE_CONFIG, **(config or {})}
    out = _output(out, B, T, H, C, q_absorbed.dtype, q_absorbed.device, "dense_mla")
    if B * T * H == 0:
        return out
    q_absorbed, q_rope, kv_latent, k_rope = _unit_last(q_absorbed, q_rope, kv_latent, k_rope)
    blocks = triton.cdiv(max(S, 1), cfg["BLOCK_N"])
    splits = _num_splits(B * T * triton.cdiv(H, cfg["BLOCK_H"]), blocks, q_absorbed.device, num_splits)
    return _launch(_dense_mla_kernel, (pos, (), (pos.stride(0),)), q_absorbed, q_rope, kv_latent, k_rope, scale, max(S, 1), splits,
                   cfg, out)


def sparse_mla_flops(selected: torch.Tensor, num_heads: int, kv_lora_rank: int, rope_dim: int) -> int:
    """Matmul FLOPs of `sparse_mla` for a selection: 2·H·(C + R) for the scores + 2·H·C for the weighted sum,
    per valid selected key (REFERENCE §8.2's accounting)."""
    valid = int((selected >= 0).sum())
    return valid * 2 * num_heads * (2 * kv_lora_rank + rope_dim)


__all__ = ["DENSE_CONFIG", "SPARSE_CONFIG", "dense_mla", "sparse_mla", "sparse_mla_flops"]
