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
Two ways around it were measured on the H200 and lost (T = 2048 queries at 128K, k = 2048): a "lookahead"
kernel that computes the scores of block j+1 while summing block j (no product feeds another within a step, so
Triton splits both over the warpgroups) ran at 105–150 TFLOP/s against this kernel's 244: the softmax then needs
cross-warpgroup reductions and a layout change through shared memory every step, and block j's rows are read
twice (commit 4615d13, data/gpu_kernels/lookahead_trial.csv). Rescaling the accumulator only when a running
maximum grew by more than 8 (base 2: a factor 256; a branch per step) lost too (200 against 244), and walking
the keys in position order instead of top-k order changes nothing (215 TFLOP/s both ways at 16K–128K:
data/gpu_kernels/gather_trial.csv, selection_order.csv). What helped: 32-bit gather offsets (`_load_rows`),
244 -> 256. A third way lost as well: the score product transposed, sᵀ = [c | k_rope] · qᵀ of shape [128 keys, 64
heads], so that each warpgroup scores its own 64 keys (2,176 tensor FLOPs per key and head instead of 3,328;
offline sm_90a compile: warps 8x1 for the scores, 4x2 for the weighted sum). Measured on an H100 against this
kernel on the same card, six tile choices: at best 217 TFLOP/s against 253 at 128K and 248 against 262 at 16K.
What it pays instead (not measured apart): a softmax that reduces across warps, and no second pipeline stage,
since q (72 KB) + 128 gathered rows (144 KB) fill shared memory (commit 38e6f3a,
data/gpu_kernels/key_rows_trial.csv). A fourth way lost, again on an H100 against this kernel on the same card
(2026-12-07): two programs of one warpgroup per head block, each with half of the 512 value columns (108 KB,
213-255 registers in the offline sm_90a compile: two programs share an SM, so one's softmax can overlap the
other's products), at best 180.5 against 255.0 TFLOP/s at 128K, 195.9 against 266.0 at 16K, a whole causal 128K
prefill 389 against 280 ms. Each half still scores with all 576 columns, so the score product is still done twice,
and every selected row is gathered by four programs instead of two (commit fe51bc2,
data/gpu_kernels/vsplit_trial.csv). Triton 3.6's automatic warp specialisation, `tl.range(...,
warp_specialize=True)`, is no way out either: in an offline sm_90a compile of this loop it changes nothing with 8
warps and stops on an assertion in its Hopper pass with 4.
What does work is to leave Triton's layout choice: the same loop written in Gluon, Triton's lower-level dialect,
with warps [4, 2] in both products, ran at 352 against 253 TFLOP/s at 128K on an H100
(`variant="gluon"`, dslib/kernels/sparse_mla_gluon.py; Hopper only, no interpreter).

**Two-pass softmax** (`variant="two_pass"`): the same maths in two kernels, each with ONE matrix product per
step, so no dot feeds another and every warp computes different numbers:

    pass 1 (`_mla_scores_kernel`)  per query: s = q · [c | k_rope] for every selected key, block by block;
                                   stores p~ = exp2(s - m_b) in bf16 ([rows, H, k], m_b the running max after
                                   block b, stored too) and the softmax's max and sum per head
    pass 2 (`_mla_values_kernel`)  per query and block of value columns: lse = log2 Σ exp2(s) from pass 1;
                                   x = Σ_b exp2(m_b - lse) · (p~_b · c_b), a weighted sum

The scores make a round trip through memory (2 bytes per query, head and key: 512 KB per query at k = 2048),
in exchange for no duplicated q·k and small accumulators ([64, BN] in pass 1, [64, 512] or [128, 256] in pass 2).
Budget of pass 1: q of 64 (128) heads stays in shared memory, 72 (144) KB, beside two stages of gathered rows;
with 64 heads and 8 warps each warpgroup takes half of a block's keys, with 128 heads 64 rows each (the offline
sm_90a report, benchmarks/kernel_resources.py, shows the layouts: warps 4x2 and 8x1).
p~ is exactly what the one-pass kernel feeds its second dot (exp2 of the score minus a running max, rounded to
bf16), and pass 2 rescales its accumulator as the one-pass kernel does, so both variants round alike. Queries are
processed in chunks, so the score buffer stays bounded.
"""
from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from dslib.kernels import interpreting
from dslib.kernels.launch import pow2_block, require_device, require_dtype, sm_count

# Tiles and launch settings; benchmarks/gpu_kernels.py sweeps alternatives on the GPU (pass config= to try them).
# 64 heads per program with 8 warps: the [64, 512] fp32 accumulator is 128 registers per thread; 32 keys per step
# keep shared memory at ~145 KB (q 72 KB + 2 × 36 KB of gathered rows) and register spills small.
SPARSE_CONFIG = dict(BLOCK_H=64, BLOCK_N=32, num_warps=8, num_stages=3)
DENSE_CONFIG = dict(BLOCK_H=64, BLOCK_N=32, num_warps=8, num_stages=3)
# The two-pass variant: BLOCK_N keys per step in both passes (the granularity of the stored running max);
# pass 1 SCORE_BLOCK_H heads per program, pass 2 VALUE_BLOCK_H heads × VALUE_BLOCK_C value columns (the fp32
# accumulator: 64 × 512 or 128 × 256 = 128 registers per thread at 8 warps); CHUNK query rows per pass pair
# (the score buffer: CHUNK × H × k × 2 bytes, 2 GiB at 4096 × 128 × 2048).
TWO_PASS_CONFIG = dict(BLOCK_N=64, SCORE_BLOCK_H=64, SCORE_WARPS=8, SCORE_STAGES=2, VALUE_BLOCK_H=64,
                       VALUE_BLOCK_C=512, VALUE_WARPS=8, VALUE_STAGES=2, CHUNK=4096)
VARIANTS = ("one_pass", "two_pass", "gluon")  # gluon: prefill on Hopper, dslib/kernels/sparse_mla_gluon.py
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
def _load_rows(base, rows, stride, offs, n: tl.constexpr, BLOCK: tl.constexpr, OFF32: tl.constexpr):
    """The cache rows `rows` [BN] of a [*, n] matrix at base, columns offs [BLOCK]: the in-kernel gather. OFF32:
    the wrapper found that every offset fits in 32 bits, which saves address arithmetic (~5% faster at the 671B
    dims on the H200); no column mask when BLOCK == n."""
    if OFF32:
        ptrs = base + (rows.to(tl.int32)[:, None] * stride + offs[None, :])
    else:
        ptrs = base + rows.to(tl.int64)[:, None] * stride + offs[None, :]
    if BLOCK == n:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=(offs < n)[None, :], other=0.0)


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
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, OFF32: tl.constexpr,
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
        rows = tl.where(valid, idx, 0)
        kc = _load_rows(kv_base, rows, s_kvs, offs_c, C, BLOCK_C, OFF32)  # [BN, C]
        kr = _load_rows(kr_base, rows, s_krs, offs_r, R, BLOCK_R, OFF32)  # [BN, R]
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
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, OFF32: tl.constexpr,
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
        rows = tl.minimum(offs_s, end - 1)  # the tail re-reads the last key (masked in the scores)
        kc = _load_rows(kv_base, rows, s_kvs, offs_c, C, BLOCK_C, OFF32)  # [BN, C]
        kr = _load_rows(kr_base, rows, s_krs, offs_r, R, BLOCK_R, OFF32)  # [BN, R]
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


@triton.jit
def _mla_scores_kernel(
    qc_ptr, qr_ptr, kv_ptr, kr_ptr, keys_ptr, p_ptr, mb_ptr, ms_ptr, ls_ptr,
    T, S, H, N_SLOTS, NUM_SPLITS, slots_per_split, qk_scale,
    s_qcb, s_qct, s_qch, s_qrb, s_qrt, s_qrh, s_kvb, s_kvs, s_krb, s_krs, s_keyb, s_keyt,
    s_pr, s_ph, s_mbr, s_mbh, s_sr, s_ssp,
    C: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, GATHER: tl.constexpr,
):
    """Pass 1 of the two-pass softmax: scores only, one dot per step (no accumulator of values).

    GATHER: the keys of query t are the cache rows selected[t, :N_SLOTS] (sparse); otherwise rows 0..pos[t]
    (dense, causal; keys_ptr holds the positions). For each block b of BLOCK_N key slots it stores
    p~ = exp2(s - m_b) [BH, BN] into p [rows, H, slots] and m_b into mb [rows, H, slots / BLOCK_N], with m_b the
    running max of the scores up to block b (0 while no key was valid); at the end the running max and sum of
    this program's slots into ms, ls [rows, NUM_SPLITS, H]. Grid: (T · NUM_SPLITS · head blocks, B)."""
    pid = tl.program_id(0)  # head block fastest: the head blocks of one query gather the same rows (L2 hits)
    b = tl.program_id(1).to(tl.int64)
    n_hb = tl.cdiv(H, BLOCK_H)
    hb = pid % n_hb
    split = (pid // n_hb) % NUM_SPLITS
    t = (pid // n_hb // NUM_SPLITS).to(tl.int64)
    row = b * T + t  # the query's row in the score buffers
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    h_ok, c_ok, r_ok = offs_h < H, offs_c < C, offs_r < R

    q_c = tl.load(qc_ptr + b * s_qcb + t * s_qct + offs_h[:, None] * s_qch + offs_c[None, :],
                  mask=h_ok[:, None] & c_ok[None, :], other=0.0)  # [BH, C], stays in shared memory
    q_r = tl.load(qr_ptr + b * s_qrb + t * s_qrt + offs_h[:, None] * s_qrh + offs_r[None, :],
                  mask=h_ok[:, None] & r_ok[None, :], other=0.0)  # [BH, R]
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)

    key_row = keys_ptr + b * s_keyb + t * s_keyt
    if GATHER:
        n_slots = N_SLOTS
    else:
        n_slots = tl.minimum(tl.load(key_row) + 1, S).to(tl.int32)  # causal: keys 0..pos
    start = split * slots_per_split
    end = tl.minimum(start + slots_per_split, n_slots)
    kv_base = kv_ptr + b * s_kvb
    kr_base = kr_ptr + b * s_krb
    p_rows = p_ptr + row * s_pr + offs_h[:, None] * s_ph
    mb_rows = mb_ptr + row * s_mbr + offs_h * s_mbh
    for i in range(start, end, BLOCK_N):
        offs_i = i + tl.arange(0, BLOCK_N)
        if GATHER:  # in-kernel gather of the selected rows (an empty slot reads row 0, masked below)
            idx = tl.load(key_row + offs_i, mask=offs_i < end, other=-1)
            valid = (idx >= 0) & (idx < S)
            rows = tl.where(valid, idx, 0).to(tl.int64)
        else:  # consecutive rows; the tail re-reads the last key
            valid = offs_i < end
            rows = tl.minimum(offs_i, end - 1).to(tl.int64)
        kc = tl.load(kv_base + rows[:, None] * s_kvs + offs_c[None, :], mask=c_ok[None, :], other=0.0)  # [BN, C]
        kr = tl.load(kr_base + rows[:, None] * s_krs + offs_r[None, :], mask=r_ok[None, :], other=0.0)  # [BN, R]
        # [BH, BN], the only matrix products of this pass. Rope part first: a dot whose result feeds another dot
        # gets all warps on its rows (with 64 heads the two warpgroups then duplicate it), so let that be the
        # small one (R = 64); the content part (C = 512) is split between the warpgroups by key.
        s = tl.dot(q_r, tl.trans(kr))
        s = tl.dot(q_c, tl.trans(kc), s)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))  # base-2 scores (qk_scale = scale · log2 e)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])  # in [0, 1]: safe in bf16
        l_i = l_i * tl.exp2(m_i - m_ref) + tl.sum(p, axis=1)
        m_i = m_new
        tl.store(p_rows + offs_i[None, :], p.to(p_ptr.dtype.element_ty), mask=h_ok[:, None])
        tl.store(mb_rows + i // BLOCK_N, m_ref, mask=h_ok)
    tl.store(ms_ptr + row * s_sr + split * s_ssp + offs_h, m_i, mask=h_ok)
    tl.store(ls_ptr + row * s_sr + split * s_ssp + offs_h, l_i, mask=h_ok)


@triton.jit
def _mla_values_kernel(
    kv_ptr, keys_ptr, p_ptr, mb_ptr, ms_ptr, ls_ptr, out_ptr,
    T, S, H, N_SLOTS, SCORE_SPLITS, NUM_SPLITS, slots_per_split,
    s_kvb, s_kvs, s_keyb, s_keyt, s_pr, s_ph, s_mbr, s_mbh, s_sr, s_ssp, s_ob, s_ot, s_osp, s_oh,
    C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    GATHER: tl.constexpr, SPLIT: tl.constexpr,
):
    """Pass 2 of the two-pass softmax: x[h, cols] = Σ_i p[h, i] · c[s_i, cols], one dot per step.

    First the log2-sum-exp of each head from pass 1's per-split (max, sum) pairs: lse = m + log2 Σ_j l_j 2^(m_j-m).
    Then block by block, p~_b (as stored: bf16, straight into the tensor cores) times the gathered value columns
    c[s_i, cols] [BN, BLOCK_C], into an fp32 accumulator [BH, BLOCK_C] kept in units of the current block's max:
    acc = acc · 2^(m_{b-1} - m_b) + p~_b · c_b (the one-pass kernel's rescaling, with its numbers); at the end
    x = acc · 2^(m_last - lse) = acc / l. With SPLIT, this program's slots give a partial sum (fp32, already
    divided by the whole l) that `_sum_splits_kernel` adds up. Grid: (T · NUM_SPLITS · head blocks · column
    blocks, B)."""
    pid = tl.program_id(0)  # column block fastest, then head block: neighbours share key rows or scores in L2
    b = tl.program_id(1).to(tl.int64)
    n_cb = tl.cdiv(C, BLOCK_C)
    n_hb = tl.cdiv(H, BLOCK_H)
    cb = pid % n_cb
    hb = (pid // n_cb) % n_hb
    split = (pid // n_cb // n_hb) % NUM_SPLITS
    t = (pid // n_cb // n_hb // NUM_SPLITS).to(tl.int64)
    row = b * T + t
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    h_ok, c_ok = offs_h < H, offs_c < C

    stats = row * s_sr + offs_h  # the softmax normaliser over all of pass 1's splits
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    for j in range(SCORE_SPLITS):
        m = tl.maximum(m, tl.load(ms_ptr + stats + j * s_ssp, mask=h_ok, other=float("-inf")))
    m = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in range(SCORE_SPLITS):
        l += tl.load(ls_ptr + stats + j * s_ssp, mask=h_ok, other=0.0) * tl.exp2(
            tl.load(ms_ptr + stats + j * s_ssp, mask=h_ok, other=float("-inf")) - m)
    has_keys = l > 0  # a query without a valid key gets 0 (no division by an empty sum)
    lse = m + tl.log2(tl.where(has_keys, l, 1.0))

    key_row = keys_ptr + b * s_keyb + t * s_keyt
    if GATHER:
        n_slots = N_SLOTS
    else:
        n_slots = tl.minimum(tl.load(key_row) + 1, S).to(tl.int32)
    start = split * slots_per_split
    end = tl.minimum(start + slots_per_split, n_slots)
    kv_base = kv_ptr + b * s_kvb
    p_rows = p_ptr + row * s_pr + offs_h[:, None] * s_ph
    mb_rows = mb_ptr + row * s_mbr + offs_h * s_mbh
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    # this split's first block max (in the buffer even when the split is empty; then unwritten, so not used)
    m_prev = tl.where(start < end, tl.load(mb_rows + start // BLOCK_N, mask=h_ok, other=0.0), 0.0)
    for i in range(start, end, BLOCK_N):
        offs_i = i + tl.arange(0, BLOCK_N)
        if GATHER:
            idx = tl.load(key_row + offs_i, mask=offs_i < end, other=-1)
            rows = tl.where((idx >= 0) & (idx < S), idx, 0).to(tl.int64)
        else:
            rows = tl.minimum(offs_i, end - 1).to(tl.int64)
        v = tl.load(kv_base + rows[:, None] * s_kvs + offs_c[None, :], mask=c_ok[None, :], other=0.0)  # [BN, BC]
        p_blk = tl.load(p_rows + offs_i[None, :], mask=h_ok[:, None] & (offs_i < end)[None, :], other=0.0)
        m_b = tl.load(mb_rows + i // BLOCK_N, mask=h_ok, other=0.0)
        # pass 1's running max of this split only grows once a key was valid (before, acc is 0: any factor will do)
        alpha = tl.exp2(tl.minimum(m_prev - m_b, 0.0))
        acc = tl.dot(p_blk, v, acc * alpha[:, None])
        m_prev = m_b
    acc = acc * tl.where(has_keys, tl.exp2(m_prev - lse), 0.0)[:, None]  # = acc / l (this split's share)

    ptrs = out_ptr + b * s_ob + t * s_ot + split * s_osp + offs_h[:, None] * s_oh + offs_c[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & c_ok[None, :])


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, H, NUM_SPLITS, s_pb, s_pt, s_psp, s_ph, s_ob, s_ot, s_oh,
                       C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    """out = Σ_j part_j: pass 2's partial sums over key splits (already normalised: a plain sum, fixed order)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_hb = tl.cdiv(H, BLOCK_H)
    hb = pid % n_hb
    t = (pid // n_hb).to(tl.int64)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    ok = (offs_h < H)[:, None] & (offs_c < C)[None, :]
    rows = part_ptr + b * s_pb + t * s_pt + offs_h[:, None] * s_ph + offs_c[None, :]
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    for j in range(NUM_SPLITS):
        acc += tl.load(rows + j * s_psp, mask=ok, other=0.0)
    tl.store(out_ptr + b * s_ob + t * s_ot + offs_h[:, None] * s_oh + offs_c[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=ok)


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


def _offsets_fit_32(S: int, *caches: torch.Tensor) -> bool:
    """Whether every row offset into the caches (per sequence) fits in int32: then the kernels gather with 32-bit
    address arithmetic (`_load_rows`). True at the 671B dims up to 3.7M cached tokens (stride 576)."""
    return all(S * c.stride(1) < 2**31 for c in caches)


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
        C=C, R=R, BLOCK_C=pow2_block(C), BLOCK_R=pow2_block(R), SPLIT=splits > 1,
        OFF32=_offsets_fit_32(S, kv_latent, k_rope), **cfg,
    )
    if splits > 1:
        n_cb = triton.cdiv(H, COMBINE_BLOCK_H)
        _combine_kernel[(T * n_cb, B)](
            part, lse, out, H, splits, part.stride(0), part.stride(1), part.stride(2), part.stride(3),
            *lse_strides, out.stride(0), out.stride(1), out.stride(2),
            C=C, BLOCK_C=pow2_block(C), BLOCK_H=COMBINE_BLOCK_H, num_warps=4,
        )
    return out


def _launch_two_pass(keys, gather: bool, q_absorbed, q_rope, kv_latent, k_rope, scale, n_slots: int, cfg: dict,
                     out, num_splits: int | None):
    """The two-pass softmax over chunks of queries: pass 1 writes the scores of a chunk into a buffer, pass 2
    reads them back for the weighted sum. keys: selected [B, T, k] (gather) or positions [B, T] (dense, causal
    over n_slots = S cache rows). Decode (few queries) splits each query's key slots over several programs, the
    same splits in both passes: pass 2 merges pass 1's per-split (max, sum) itself, and its partial sums are
    added up after."""
    B, T, H, C = q_absorbed.shape
    R = q_rope.shape[-1]
    S = kv_latent.shape[1]
    BN, HB1, HB2 = cfg["BLOCK_N"], cfg["SCORE_BLOCK_H"], cfg["VALUE_BLOCK_H"]
    CB2 = min(cfg["VALUE_BLOCK_C"], pow2_block(C))
    blocks = triton.cdiv(n_slots, BN)
    slots = blocks * BN
    dev = q_absorbed.device
    bc = min(B, max(1, cfg["CHUNK"]))  # sequences and queries per pass pair: bc · tc score rows
    tc = max(1, min(T, cfg["CHUNK"] // bc))
    n_hb1, n_hb2, n_cb2 = triton.cdiv(H, HB1), triton.cdiv(H, HB2), triton.cdiv(C, CB2)

    # Both passes split a query's key slots alike: within a split the stored running max only grows, which is
    # what pass 2's rescaling relies on. Enough splits for the GPU in pass 1 (the fewer programs of the two).
    per = -(-blocks // _num_splits(bc * tc * min(n_hb1, n_hb2 * n_cb2), blocks, dev, num_splits))
    ns1 = ns2 = triton.cdiv(blocks, per)
    sps1 = sps2 = per * BN
    p_buf = torch.empty(bc * tc, H, slots, dtype=kv_latent.dtype, device=dev)  # p~, rounded like the one pass
    mb_buf = torch.empty(bc * tc, H, blocks, dtype=torch.float32, device=dev)
    ms_buf = torch.empty(bc * tc, ns1, H, dtype=torch.float32, device=dev)
    ls_buf = torch.empty_like(ms_buf)
    part = torch.empty(bc, tc, ns2, H, C, dtype=torch.float32, device=dev) if ns2 > 1 else None
    buf_strides = (p_buf.stride(0), p_buf.stride(1), mb_buf.stride(0), mb_buf.stride(1), ms_buf.stride(0),
                   ms_buf.stride(1))
    for b0 in range(0, B, bc):
        for t0 in range(0, T, tc):
            bs, ts = slice(b0, b0 + bc), slice(t0, t0 + tc)
            qa, qr, kv, kr = q_absorbed[bs, ts], q_rope[bs, ts], kv_latent[bs], k_rope[bs]
            ky, o = keys[bs, ts], out[bs, ts]
            nb, nt = qa.shape[0], qa.shape[1]
            _mla_scores_kernel[(nt * ns1 * n_hb1, nb)](
                qa, qr, kv, kr, ky, p_buf, mb_buf, ms_buf, ls_buf, nt, S, H, n_slots, ns1, sps1, scale * LOG2E,
                *qa.stride()[:3], *qr.stride()[:3], kv.stride(0), kv.stride(1), kr.stride(0), kr.stride(1),
                ky.stride(0), ky.stride(1), *buf_strides,
                C=C, R=R, BLOCK_C=pow2_block(C), BLOCK_R=pow2_block(R), BLOCK_H=HB1, BLOCK_N=BN, GATHER=gather,
                num_warps=cfg["SCORE_WARPS"], num_stages=cfg["SCORE_STAGES"],
            )
            target = part[:nb, :nt] if part is not None else o
            t_strides = (target.stride()[:4] if part is not None else (o.stride(0), o.stride(1), 0, o.stride(2)))
            _mla_values_kernel[(nt * ns2 * n_hb2 * n_cb2, nb)](
                kv, ky, p_buf, mb_buf, ms_buf, ls_buf, target, nt, S, H, n_slots, ns1, ns2, sps2,
                kv.stride(0), kv.stride(1), ky.stride(0), ky.stride(1), *buf_strides, *t_strides,
                C=C, BLOCK_H=HB2, BLOCK_C=CB2, BLOCK_N=BN, GATHER=gather, SPLIT=part is not None,
                num_warps=cfg["VALUE_WARPS"], num_stages=cfg["VALUE_STAGES"],
            )
            if part is not None:
                _sum_splits_kernel[(nt * triton.cdiv(H, COMBINE_BLOCK_H), nb)](
                    target, o, H, ns2, *target.stride()[:4], o.stride(0), o.stride(1), o.stride(2),
                    C=C, BLOCK_C=pow2_block(C), BLOCK_H=COMBINE_BLOCK_H, num_warps=4,
                )
    return out


def _tuned_variant(name: str, variant: str | None, config: dict | None) -> tuple[str | None, dict | None]:
    """The variant and tiles to use: the caller's, else the tuned entry `name` (`dslib.kernels.use_tuning`),
    else (None, None): the built-in choice (`_auto_variant`)."""
    if variant is None and config is None:
        from dslib.kernels import tuned

        entry = tuned(name)
        return entry.pop("variant", None), entry or None
    return variant or "one_pass", config


def _variant_config(variant: str, base: dict, config: dict | None) -> dict:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    if variant == "gluon":
        if config:
            raise ValueError(f"variant='gluon' has fixed tiles (see dslib/kernels/sparse_mla_gluon.py), got "
                             f"config={config}.")
        return {}
    return {**(TWO_PASS_CONFIG if variant == "two_pass" else base), **(config or {})}


def gluon_problem(q_absorbed: torch.Tensor, kv_latent: torch.Tensor, k_rope: torch.Tensor) -> str | None:
    """Why `variant="gluon"` cannot run these inputs here (device, Triton, dtype, widths), in words; None if it can."""
    from dslib.kernels import triton_version

    version = triton_version()
    if version is None or version[:2] < (3, 6):
        return f"Gluon needs Triton >= 3.6, found {'.'.join(map(str, version or ())) or 'none'}"
    if interpreting():
        return "Gluon has no CPU interpreter (TRITON_INTERPRET=1 is set)"
    dev = q_absorbed.device
    if dev.type != "cuda":
        return f"the Gluon kernel needs a CUDA device, got {dev}"
    major, minor = torch.cuda.get_device_capability(dev)
    if major != 9:
        return f"the Gluon kernel uses Hopper's wgmma (compute capability 9.x); this GPU is {major}.{minor}"
    try:
        from dslib.kernels import sparse_mla_gluon
    except (ImportError, AttributeError) as e:
        return f"this Triton's Gluon lacks what the kernel uses ({type(e).__name__}: {e})"
    _, _, H, C = q_absorbed.shape
    return sparse_mla_gluon.shape_problem(q_absorbed.dtype, H, C, k_rope.shape[-1],
                                          _offsets_fit_32(kv_latent.shape[1], kv_latent, k_rope))


# Whether a call that names no variant (and has no tuning entry) takes the Gluon kernel for prefill where it runs.
# Its trial version measured 1.39x faster than one_pass on an H100 (data/gpu_kernels/gluon_trial_h100.csv), but
# this wired-in version (batches, int64 selections, padded k) has been compiled for sm_90a, not yet run on a GPU:
# no GPU was lent after it was written (2026-12-08). Until tests/test_kernels_gluon.py has passed on a Hopper GPU it
# runs only when asked for by name, or when a tuning file chose it: benchmarks/gpu_kernels.py checks every
# candidate against PyTorch on the GPU before it times it.
GLUON_BY_DEFAULT = False
_GLUON_FAILED: list[str] = []  # why the first Gluon launch not asked for by name failed (then one_pass is used)
_GLUON_CHECKED: list[bool] = []  # the first such launch went well


def _auto_variant(T: int, q_absorbed, kv_latent, k_rope) -> str:
    """The built-in choice: one_pass, or with GLUON_BY_DEFAULT the Gluon kernel for prefill (T > 8) where it runs;
    decode keeps one_pass, whose split-KV the Gluon kernel lacks."""
    if not GLUON_BY_DEFAULT or T <= 8 or _GLUON_FAILED:
        return "one_pass"
    return "gluon" if gluon_problem(q_absorbed, kv_latent, k_rope) is None else "one_pass"


def _launch_gluon(explicit: bool, q_absorbed, q_rope, kv_latent, k_rope, selected, scale, out):
    """The Gluon kernel. Not asked for by name (a tuning file's or the built-in choice), a failure of its first
    launch (an untested Triton's Gluon, say) is reported once and the one-pass kernel runs instead (returns None);
    asked for by name, the error is raised."""
    from dslib.kernels import sparse_mla_gluon

    if explicit or _GLUON_CHECKED:
        return sparse_mla_gluon.launch(q_absorbed, q_rope, kv_latent, k_rope, selected, scale, out)
    try:
        result = sparse_mla_gluon.launch(q_absorbed, q_rope, kv_latent, k_rope, selected, scale, out)
    except Exception as e:  # noqa: BLE001  (compilation or launch: fall back to a kernel that runs everywhere)
        _GLUON_FAILED.append(f"{type(e).__name__}: {e}")
        warnings.warn(f"sparse_mla: the Gluon kernel failed ({_GLUON_FAILED[0][:300]}); using variant='one_pass' "
                      "from now on.", RuntimeWarning, stacklevel=3)
        return None
    _GLUON_CHECKED.append(True)
    return result


def _output(out, B, T, H, C, dtype, device, name):
    if out is None:
        return torch.empty(B, T, H, C, dtype=dtype, device=device)
    if tuple(out.shape) != (B, T, H, C) or out.stride(-1) != 1:
        raise ValueError(f"{name}: out must be [B, T, H, C] = [{B}, {T}, {H}, {C}] with unit last stride, got "
                         f"{tuple(out.shape)}.")
    return out


def sparse_mla(q_absorbed: torch.Tensor, q_rope: torch.Tensor, kv_latent: torch.Tensor, k_rope: torch.Tensor,
               selected: torch.Tensor, scale: float, *, out: torch.Tensor | None = None,
               num_splits: int | None = None, config: dict | None = None,
               variant: str | None = None) -> torch.Tensor:
    """DSA core attention over the selected keys: x `[B, T, H, C]` in the dtype of q_absorbed.

    q_absorbed `[B, T, H, C]` (= W_UKᵀ q_nope), q_rope `[B, T, H, R]`, kv_latent `[B, S, C]`, k_rope `[B, S, R]`,
    selected `[B, T, k]` integer key positions (-1 = none; >= S is treated as none), scale the softmax scale.
    The maths of `dslib.sparse.sparse_attention`, with fp32 scores, softmax and accumulation (the probabilities
    enter the weighted sum in the inputs' dtype, as there). A query with no valid key gets 0 instead of NaN.
    `num_splits` overrides how many programs share one query's keys (default: chosen from the GPU's size).
    `variant`: "one_pass" (online softmax, `_sparse_mla_kernel`), "two_pass" (`_mla_scores_kernel` then
    `_mla_values_kernel`) or "gluon" (Hopper only, fixed tiles: `dslib/kernels/sparse_mla_gluon.py`; `gluon_problem`
    says why it cannot run); same maths, `config` keys as in SPARSE_CONFIG / TWO_PASS_CONFIG. With neither given,
    the tuned choice for decode (T <= 8) or prefill (`dslib.kernels.use_tuning`), else one_pass (`GLUON_BY_DEFAULT`
    says when gluon will take prefill).
    """
    B, T, H, C, _, _ = _check_mla(q_absorbed, q_rope, kv_latent, k_rope, "sparse_mla")
    if selected.dim() != 3 or tuple(selected.shape[:2]) != (B, T):
        raise ValueError(f"sparse_mla: selected must be [B, T, k] = [{B}, {T}, k], got {tuple(selected.shape)}.")
    if selected.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"sparse_mla: selected must be int32 or int64, got {selected.dtype}.")
    require_device(q_absorbed=q_absorbed, q_rope=q_rope, kv_latent=kv_latent, k_rope=k_rope, selected=selected)
    explicit = variant is not None
    variant, config = _tuned_variant("sparse_decode" if T <= 8 else "sparse_prefill", variant, config)
    if variant is None:  # tiles without a variant (a tuning entry) are one_pass tiles
        variant = _auto_variant(T, q_absorbed, kv_latent, k_rope) if config is None else "one_pass"
    elif variant == "gluon" and (problem := gluon_problem(q_absorbed, kv_latent, k_rope)) is not None:
        if explicit:
            raise ValueError(f"sparse_mla(variant='gluon'): {problem}. Use variant='one_pass' (any CUDA GPU).")
        variant, config = "one_pass", None  # a tuning file from a Hopper GPU, used elsewhere
    cfg = _variant_config(variant, SPARSE_CONFIG, config)
    out = _output(out, B, T, H, C, q_absorbed.dtype, q_absorbed.device, "sparse_mla")
    topk = selected.shape[-1]
    if B * T * H == 0:
        return out
    if kv_latent.shape[1] == 0 or topk == 0:  # no keys at all: every query gets 0
        return out.zero_()
    q_absorbed, q_rope, kv_latent, k_rope, selected = _unit_last(q_absorbed, q_rope, kv_latent, k_rope, selected)
    if variant == "gluon":
        result = _launch_gluon(explicit, q_absorbed, q_rope, kv_latent, k_rope, selected, scale, out)
        if result is not None:
            return result
        variant, cfg = "one_pass", _variant_config("one_pass", SPARSE_CONFIG, None)
    if variant == "two_pass":
        return _launch_two_pass(selected, True, q_absorbed, q_rope, kv_latent, k_rope, scale, topk, cfg, out,
                                num_splits)
    blocks = triton.cdiv(max(topk, 1), cfg["BLOCK_N"])
    splits = _num_splits(B * T * triton.cdiv(H, cfg["BLOCK_H"]), blocks, q_absorbed.device, num_splits)
    keys_of = (selected, (topk,), (selected.stride(0), selected.stride(1)))
    return _launch(_sparse_mla_kernel, keys_of, q_absorbed, q_rope, kv_latent, k_rope, scale,
                   max(topk, 1), splits, cfg, out)


def dense_mla(q_absorbed: torch.Tensor, q_rope: torch.Tensor, kv_latent: torch.Tensor, k_rope: torch.Tensor,
              q_positions: torch.Tensor, scale: float, *, out: torch.Tensor | None = None,
              num_splits: int | None = None, config: dict | None = None,
              variant: str | None = None) -> torch.Tensor:
    """Dense absorbed (MQA-mode) attention, causal by position: x `[B, T, H, C]`; the decode baseline.

    Same inputs as `sparse_mla` with q_positions `[T]` or `[B, T]` instead of a selection: the query at position
    p attends to every cached key 0..p (the maths of `MLA.attend(mode="absorbed")` before W_UV, and of
    `dslib.sparse.dense_masked_attention` with a causal mask). Built for decode (few queries, long caches:
    the keys are split over programs, flash-decoding); it runs any T but has no prefill tiling.
    `variant` as in `sparse_mla` ("two_pass": the keys are read once for the scores, once for the values).
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
    variant, config = _tuned_variant("dense_decode", variant, config)
    variant = variant or "one_pass"
    if variant == "gluon":
        raise ValueError("dense_mla has no Gluon kernel (variant='gluon' is sparse_mla's prefill); use 'one_pass' or "
                         "'two_pass'.")
    cfg = _variant_config(variant, DENSE_CONFIG, config)
    out = _output(out, B, T, H, C, q_absorbed.dtype, q_absorbed.device, "dense_mla")
    if B * T * H == 0:
        return out
    q_absorbed, q_rope, kv_latent, k_rope = _unit_last(q_absorbed, q_rope, kv_latent, k_rope)
    if variant == "two_pass":
        if S == 0:
            return out.zero_()
        return _launch_two_pass(pos, False, q_absorbed, q_rope, kv_latent, k_rope, scale, S, cfg, out, num_splits)
    blocks = triton.cdiv(max(S, 1), cfg["BLOCK_N"])
    splits = _num_splits(B * T * triton.cdiv(H, cfg["BLOCK_H"]), blocks, q_absorbed.device, num_splits)
    return _launch(_dense_mla_kernel, (pos, (), (pos.stride(0),)), q_absorbed, q_rope, kv_latent, k_rope, scale,
                   max(S, 1), splits, cfg, out)


def sparse_mla_flops(selected: torch.Tensor, num_heads: int, kv_lora_rank: int, rope_dim: int) -> int:
    """Matmul FLOPs of `sparse_mla` for a selection: 2·H·(C + R) for the scores + 2·H·C for the weighted sum,
    per valid selected key (REFERENCE §8.2's accounting)."""
    valid = int((selected >= 0).sum())
    return valid * 2 * num_heads * (2 * kv_lora_rank + rope_dim)


__all__ = ["DENSE_CONFIG", "GLUON_BY_DEFAULT", "SPARSE_CONFIG", "TWO_PASS_CONFIG", "VARIANTS", "dense_mla",
           "gluon_problem", "sparse_mla", "sparse_mla_flops"]
