"""Sparse MLA prefill written in Gluon for Hopper, so that the two warpgroups of a tile compute different numbers
(chapter 6; `sparse_mla(..., variant="gluon")`).

The one-pass Triton kernel (`dslib/kernels/sparse_mla.py`) has 64 heads of one query per program and 8 warps, two
warpgroups of four. Triton lays out a product whose result feeds another product by rows only, so both warpgroups
compute the same [64 heads, BN keys] scores: the q·k product runs twice. Gluon (`triton.experimental.gluon`,
Triton >= 3.6) is Triton's lower-level dialect: the kernel names the layout of every tensor. Here both products
use warps [4, 2]:

    scores  s = q · [c | k_rope]ᵀ   [64 heads, BN keys]   warpgroup 0 scores keys 0..BN/2 - 1, warpgroup 1 the rest
    values  o += p · c              [64 heads, 512]       warpgroup 0 sums value columns 0..255, warpgroup 1 the rest

so each tensor-core instruction is issued once. What it costs instead: the softmax's row max and row sum cross the two
warpgroups (the compiler reduces through shared memory), and p changes layout before the second product (each
warpgroup needs all BN keys of p). The gather is asynchronous (cp.async) into two shared buffers: the rows of block
j + 1 arrive while block j computes. Budget of one SM: q [64, 576] bf16 = 72 KB + 2 × 64 gathered rows × 576 × 2 bytes =
144 KB: 216 KB (220 KB in the offline sm_90a compile) of the 227 KB a block may use; the accumulator [64, 512] fp32 is
128 registers per thread.

Measured on one NVIDIA H100 (data/gpu_kernels/gluon_trial_h100.csv, T = 2048 queries, k = 2048): 352 TFLOP/s at
128K context against the one-pass kernel's 253 on the same card (1.39×), the same maths within bf16 rounding.

Limits (`dslib.kernels.sparse_mla.gluon_problem` names the one that applies): a Hopper GPU (compute capability 9.x:
wgmma), Triton >= 3.6, bf16, a multiple of 64 heads, a power-of-two latent width C from 32 to 512 and rope width R
from 16 to 64, and row offsets of a sequence's cache that fit 32 bits. No split-KV: a decode step (a few queries)
keeps the one-pass kernel, which splits one query's keys over many programs. Gluon has no CPU interpreter: CI compiles
this kernel for sm_90a without a GPU (tests/test_kernels_gluon.py) and the GPU tests compare it with the one-pass
kernel.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

BLOCK_H = 64  # heads per program: the wgmma tile height (64 rows per warpgroup, 4 warps along the rows)
BLOCK_N = 64  # keys per step (BLOCK_N = 32 measured no faster than the one-pass kernel)
NUM_BUF = 2  # shared buffers of gathered rows: one computing, one in flight
NUM_WARPS = 8
LOG2E = 1.4426950408889634
# Gluon is experimental and renames things: Triton 3.6's async_copy_global_to_shared and thread_barrier are 3.9's
# async_load and barrier
_async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared
_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


def shape_problem(dtype: torch.dtype, H: int, C: int, R: int, offsets_fit_32: bool) -> str | None:
    """Why the kernel cannot take inputs of this dtype and these widths, in words; None when it can."""
    if dtype != torch.bfloat16:
        return f"the Gluon kernel takes bf16 inputs, got {dtype}"
    if H % BLOCK_H:
        return f"the Gluon kernel needs a multiple of {BLOCK_H} heads, got H = {H}"
    if C & (C - 1) or not 32 <= C <= 512:
        return f"the Gluon kernel needs a power-of-two kv_lora_rank C in [32, 512], got C = {C}"
    if R & (R - 1) or not 16 <= R <= 64:
        return f"the Gluon kernel needs a power-of-two qk_rope_head_dim R in [16, 64], got R = {R}"
    if not offsets_fit_32:
        return "the Gluon kernel gathers with 32-bit row offsets; this cache is too long for them"
    return None


# ---------------------------------------------------------------------------------------------------- kernel
@gluon.jit
def _gather_rows(kc_buf, kr_buf, kv_ptr, kr_ptr, sel_row, start, S, s_kvs, s_krs,
                 BLOCK_N: gl.constexpr, C: gl.constexpr, R: gl.constexpr, layout: gl.constexpr):
    """Start the copy of the cache rows selected[start : start + BLOCK_N] into the two shared buffers. An empty
    slot (-1, or >= S) reads row 0; its score is masked in the softmax."""
    idx = gl.load(sel_row + (start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))))
    rows = gl.where((idx >= 0) & (idx < S), idx, 0).to(gl.int32)
    offs_c = gl.arange(0, C, layout=gl.SliceLayout(0, layout))
    offs_r = gl.arange(0, R, layout=gl.SliceLayout(0, layout))
    _async_load(kc_buf, kv_ptr + (rows[:, None] * s_kvs + offs_c[None, :]))
    _async_load(kr_buf, kr_ptr + (rows[:, None] * s_krs + offs_r[None, :]))


@gluon.jit
def _sparse_mla_kernel(qc_ptr, qr_ptr, kv_ptr, kr_ptr, sel_ptr, out_ptr, S, H, TOPK, qk_scale,
                       s_qcb, s_qct, s_qch, s_qrb, s_qrt, s_qrh, s_kvb, s_kvs, s_krb, s_krs, s_selb, s_selt,
                       s_ob, s_ot, s_oh,
                       C: gl.constexpr, R: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
                       NUM_BUF: gl.constexpr, SWIZZLE_C: gl.constexpr, SWIZZLE_R: gl.constexpr,
                       num_warps: gl.constexpr):
    """q_absorbed [B, T, H, C], q_rope [B, T, H, R], caches kv [B, S, C] / k_rope [B, S, R], selected
    [B, T, TOPK] (TOPK a multiple of BLOCK_N) -> out [B, T, H, C] bf16. Grid (T · H / BLOCK_H, B)."""
    pid = gl.program_id(0)
    b = gl.program_id(1).to(gl.int64)
    n_hb = H // BLOCK_H
    hb = pid % n_hb
    t = (pid // n_hb).to(gl.int64)
    qc_ptr += b * s_qcb + t * s_qct
    qr_ptr += b * s_qrb + t * s_qrt
    kv_ptr += b * s_kvb
    kr_ptr += b * s_krb
    sel_row = sel_ptr + b * s_selb + t * s_selt
    out_ptr += b * s_ob + t * s_ot

    # layouts: ld for plain loads; the two products' accumulators, both warps [4, 2]; p as the second
    # product's left operand; swizzled shared memory that wgmma reads (rows of 128 bytes or fewer)
    ld: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[8, 1],
                                        order=[1, 0])
    mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                    instr_shape=[16, BLOCK_N // 2, 16])
    mma_o: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                    instr_shape=[16, C // 2, 16])
    p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=2)
    sl_c: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=SWIZZLE_C, element_bitwidth=16, rank=2)
    sl_r: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=SWIZZLE_R, element_bitwidth=16, rank=2)

    offs_h = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ld))
    qc = gl.load(qc_ptr + offs_h[:, None] * s_qch + gl.arange(0, C, layout=gl.SliceLayout(0, ld))[None, :])
    qr = gl.load(qr_ptr + offs_h[:, None] * s_qrh + gl.arange(0, R, layout=gl.SliceLayout(0, ld))[None, :])
    qc_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, C], sl_c, qc)  # q stays on chip for the walk
    qr_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, R], sl_r, qr)
    kc_smem = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUF, BLOCK_N, C], sl_c)
    kr_smem = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUF, BLOCK_N, R], sl_r)

    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=gl.SliceLayout(1, mma_s))  # running max (base 2)
    l_i = gl.zeros([BLOCK_H], gl.float32, layout=gl.SliceLayout(1, mma_s))  # running sum
    acc = gl.zeros([BLOCK_H, C], gl.float32, layout=mma_o)
    s_zero = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=mma_s)

    n_blocks = TOPK // BLOCK_N
    for j in gl.static_range(NUM_BUF - 1):  # prologue: the first blocks' rows in flight
        if j < n_blocks:
            _gather_rows(kc_smem.index(j), kr_smem.index(j), kv_ptr, kr_ptr, sel_row, j * BLOCK_N, S, s_kvs,
                        s_krs, BLOCK_N, C, R, ld)
        cp.commit_group()
    for j in range(n_blocks):
        kc = kc_smem.index(j % NUM_BUF)
        kr = kr_smem.index(j % NUM_BUF)
        cp.wait_group(NUM_BUF - 2)  # this thread's copies of block j have landed
        _barrier()  # everyone's have, and every warp is done with the buffer refilled next
        fence_async_shared()  # make them visible to the tensor cores (the async proxy)
        nxt = j + NUM_BUF - 1
        if nxt < n_blocks:
            _gather_rows(kc_smem.index(nxt % NUM_BUF), kr_smem.index(nxt % NUM_BUF), kv_ptr, kr_ptr, sel_row,
                         nxt * BLOCK_N, S, s_kvs, s_krs, BLOCK_N, C, R, ld)
        cp.commit_group()

        # scores: content part + position part, fp32 on the tensor cores
        s = warpgroup_mma(qc_smem, kc.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma(qr_smem, kr.permute((1, 0)), s, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))

        # online softmax (FlashAttention), base 2: qk_scale = scale · log2(e)
        idx = gl.load(sel_row + j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_s)))
        s = gl.where(((idx >= 0) & (idx < S))[None, :], s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: keep exp2 off -inf - -inf
        alpha = gl.exp2(m_i - m_ref)
        p = gl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new

        # weighted sum: the values are the gathered latents themselves
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, mma_o))[:, None]
        acc = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_op), kc, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))

    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, mma_o))
    out = acc / gl.where(l_o > 0, l_o, 1.0)[:, None]  # a query without valid keys gets 0
    offs_ho = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, mma_o))
    offs_co = gl.arange(0, C, layout=gl.SliceLayout(0, mma_o))
    gl.store(out_ptr + offs_ho[:, None] * s_oh + offs_co[None, :], out.to(gl.bfloat16))


def swizzle(width: int) -> int:
    """The shared-memory swizzle of bf16 rows `width` wide: 128 bytes, or the whole row when it is shorter."""
    return min(128, 2 * width)


def launch(q_absorbed: torch.Tensor, q_rope: torch.Tensor, kv_latent: torch.Tensor, k_rope: torch.Tensor,
           selected: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Run the kernel on checked inputs (`sparse_mla` checks shapes, dtypes and `shape_problem` first): unit last
    strides, out [B, T, H, C] bf16. A selection whose k is not a multiple of BLOCK_N is padded with -1 slots."""
    B, T, H, C = q_absorbed.shape
    R = q_rope.shape[-1]
    S = kv_latent.shape[1]
    k = selected.shape[-1]
    if k % BLOCK_N:
        selected = torch.nn.functional.pad(selected, (0, BLOCK_N - k % BLOCK_N), value=-1)
    grid = (T * (H // BLOCK_H), B)
    _sparse_mla_kernel[grid](
        q_absorbed, q_rope, kv_latent, k_rope, selected, out, S, H, selected.shape[-1], scale * LOG2E,
        *q_absorbed.stride()[:3], *q_rope.stride()[:3], kv_latent.stride(0), kv_latent.stride(1), k_rope.stride(0),
        k_rope.stride(1), selected.stride(0), selected.stride(1), out.stride(0), out.stride(1), out.stride(2),
        C=C, R=R, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, NUM_BUF=NUM_BUF, SWIZZLE_C=swizzle(C), SWIZZLE_R=swizzle(R),
        num_warps=NUM_WARPS,
    )
    return out


__all__ = ["BLOCK_H", "BLOCK_N", "NUM_BUF", "launch", "shape_problem"]
