"""Top-k selection by radix select, as Triton kernels (chapter 6): which k keys scored highest, without sorting.

`torch.topk` over a `[rows, S]` score matrix with k = 2,048 is slow on a GPU (it moves ~240 GB/s on an H200 at
S = 16K), and DSA needs it for every query. Selection does not need a sort: it needs the k-th largest score t,
after which every key with a score above t is in, and enough of those equal to t. Radix select finds t digit by
digit, like looking a word up in a dictionary letter by letter:

1. **Sortable keys.** A float's bits, read as an unsigned integer, sort like the float once the bits of a negative
   number are all flipped and only the sign bit of a positive one (IEEE floats are sign and magnitude). bf16
   scores give 16-bit keys, fp32 scores 32-bit keys. -inf (a future key) is never selected.
2. **One digit per pass.** A histogram of the top 6 bits over the row (64 bins, `tl.histogram`) says which bin
   holds the k-th largest key: count from the top bin down until k is reached. Only keys in that bin stay
   candidates; the next pass takes a histogram of their next 6 bits, and so on: ceil(16 / 6) = 3 passes for bf16,
   6 for fp32. After the last pass the bin IS the threshold t, and `need` says how many keys equal to t to keep.
3. **Collect.** One more pass writes the positions of the keys above t and of the first `need` keys equal to t
   (ties go to the earlier key, as chapter 3's stable sort does) to the output, in increasing position; a
   running count and a prefix sum (`tl.cumsum`) give each kept key its slot.

Each pass is one kernel launch over (row, segment) programs: a long row (decode: one query over 131K keys) is cut
into segments so that enough programs run; each program stores its segment's histogram, and the next launch
adds them up. Nothing is sorted and no partial top-k list is kept: the work is a few streaming reads of the
scores. The selected positions come out in increasing order, not by score (attention does not care).

Tried and not kept, a "threshold select" for prefill: the indexer kernel also stored the maximum of every G
consecutive scores; the k-th largest of those maxima bounds the k-th largest score from below (k groups reach
it), so one pass collected the ~1.1-1.4 k scores above it and a `torch.topk` over those few picked k. On an H100
(one 4,096-row chunk of a 64K context, with the FP8 indexer) it took 6.31 ms against 6.20 ms for `torch.topk` on
the bf16 scores (indexer included in both): its two smaller `torch.topk` calls, over n / 8 group maxima and 2k
candidate slots per row, each still with k = 2,048, plus the collect pass cost no less than one `torch.topk` over
the whole row (commit fe51bc2, data/gpu_kernels/threshold_trial.csv).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dslib.kernels.launch import require_device, sm_count

DIGIT_BITS = 6  # bits resolved per pass
BINS = 1 << DIGIT_BITS  # 64 bins: tl.histogram needs a multiple of the warp size (32)
MAX_SEGMENTS = 64  # programs per row at most (a power of two: the histograms of a row are loaded as one tile)
RADIX_CONFIG = dict(BLOCK=2048, num_warps=8)  # elements per loop step and warps per program


def passes_for(dtype: torch.dtype) -> int:
    """Histogram passes for a score dtype: ceil(key bits / DIGIT_BITS)."""
    return -(-(16 if dtype == torch.bfloat16 else 32) // DIGIT_BITS)


# ---------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _sortable_key(x, KEY_BITS: tl.constexpr):
    """Unsigned keys with the order of the floats x (bf16 -> 16 bits, fp32 -> 32 bits, held in uint32)."""
    if KEY_BITS == 16:
        u = x.to(tl.uint16, bitcast=True).to(tl.uint32)
        negative = (u >> 15) != 0
        return tl.where(negative, u ^ 0xFFFF, u ^ 0x8000)
    else:
        u = x.to(tl.uint32, bitcast=True)
        negative = (u >> 31) != 0
        return tl.where(negative, u ^ 0xFFFFFFFF, u ^ 0x80000000)


@triton.jit
def _neg_inf_key(KEY_BITS: tl.constexpr):
    """The key of -inf: keys at or below it (also NaNs with the sign bit) are never selected."""
    if KEY_BITS == 16:
        return 0x007F  # bf16 -inf = 0xFF80, all bits flipped
    else:
        return 0x007FFFFF  # fp32 -inf = 0xFF800000, all bits flipped


@triton.jit
def _walk_passes(hist_ptr, row, n_segs, K, s_hp, s_hr, s_hs, P: tl.constexpr, KEY_BITS: tl.constexpr,
                 DIGIT: tl.constexpr, BINS: tl.constexpr, MAX_SEGS: tl.constexpr):
    """Replay passes 0..P-1 of one row from the stored per-segment histograms.

    Returns prefix (the key bits fixed so far), need (how many keys with that prefix still to take), take_all
    (the row has at most K valid keys: take them all), and per segment [MAX_SEGS]: valid keys, keys already
    known to be above the threshold, and keys in the last pass's chosen bin (= equal to the threshold when
    P covers every bit)."""
    bins = tl.arange(0, BINS)
    segs = tl.arange(0, MAX_SEGS)
    tile = hist_ptr + row * s_hr + segs[:, None] * s_hs + bins[None, :]
    seg_ok = (segs < n_segs)[:, None]
    prefix = (K * 0).to(tl.uint32)
    need = K
    take_all = K < 0
    valid_seg = tl.zeros((MAX_SEGS,), dtype=tl.int32)
    above_seg = tl.zeros((MAX_SEGS,), dtype=tl.int32)
    in_bin_seg = tl.zeros((MAX_SEGS,), dtype=tl.int32)
    for p in tl.static_range(P):
        shift = max(KEY_BITS - DIGIT * (p + 1), 0)  # the last digit may overlap bits fixed already
        h_seg = tl.load(tile + p * s_hp, mask=seg_ok, other=0)  # [MAX_SEGS, BINS]
        h = tl.sum(h_seg, axis=0)  # the row's histogram of this digit
        if p == 0:
            valid_seg = tl.sum(h_seg, axis=1)
            take_all = tl.sum(h, axis=0) <= K
        at_or_above = tl.cumsum(h, axis=0, reverse=True)  # candidates in bins >= b
        b = tl.maximum(tl.max(tl.where(at_or_above >= need, bins, -1), axis=0), 0)  # the bin of the k-th key
        above_seg += tl.sum(tl.where(bins[None, :] > b, h_seg, 0), axis=1)
        in_bin_seg = tl.sum(tl.where(bins[None, :] == b, h_seg, 0), axis=1)
        need -= tl.sum(tl.where(bins > b, h, 0), axis=0)
        prefix = prefix | (b.to(tl.uint32) << shift)
    return prefix, need, take_all, valid_seg, above_seg, in_bin_seg


@triton.jit
def _radix_hist_kernel(x_ptr, pos_ptr, hist_ptr, N, K, ROWS_T, n_segs, seg_len,
                       s_xb, s_xt, s_pb, s_pt, s_hp, s_hr, s_hs,
                       PASS: tl.constexpr, KEY_BITS: tl.constexpr, DIGIT: tl.constexpr, BINS: tl.constexpr,
                       MAX_SEGS: tl.constexpr, CAUSAL: tl.constexpr, PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Pass PASS: the histogram of digit PASS over this segment's candidates -> hist[PASS, row, seg, :].

    x [B, ROWS_T, N] scores (row = b · ROWS_T + t), pos [B, ROWS_T] query positions (CAUSAL: keys after pos
    are not candidates, and not even read). Candidates: valid keys whose bits above this digit equal the prefix
    the earlier passes fixed. PAD > 1: each row may be read up to a multiple of PAD elements (the wrapper checks
    that the memory is there), so that the loads vectorise. Grid: (rows · n_segs,)."""
    pid = tl.program_id(0)
    seg = pid % n_segs
    row = (pid // n_segs).to(tl.int64)
    b, t = row // ROWS_T, row % ROWS_T
    x_row = x_ptr + b * s_xb + t * s_xt
    n = N
    if CAUSAL:
        n = tl.minimum(tl.load(pos_ptr + b * s_pb + t * s_pt) + 1, N).to(tl.int32)
    prefix, _need, take_all, _, _, _ = _walk_passes(hist_ptr, row, n_segs, K, s_hp, s_hr, s_hs, PASS, KEY_BITS,
                                                   DIGIT, BINS, MAX_SEGS)
    prev_shift: tl.constexpr = max(KEY_BITS - DIGIT * PASS, 0)  # bits >= prev_shift are fixed by the prefix
    shift: tl.constexpr = max(KEY_BITS - DIGIT * (PASS + 1), 0)
    h = tl.zeros((BINS,), dtype=tl.int32)
    start = seg * seg_len
    stop = tl.minimum(start + seg_len, tl.where(take_all, 0, n))  # nothing left to narrow when all are taken
    stop_load = tl.cdiv(stop, PAD) * PAD  # loads of PAD aligned elements vectorise (the row is padded)
    for i in range(start, stop, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        inside = offs < stop
        key = _sortable_key(tl.load(x_row + offs, mask=offs < stop_load, other=float("-inf")), KEY_BITS)
        candidate = inside & (key > _neg_inf_key(KEY_BITS))
        if PASS > 0:
            candidate = candidate & ((key >> prev_shift) == (prefix >> prev_shift))
        digit = ((key >> shift) & (BINS - 1)).to(tl.int32)
        h += tl.histogram(digit, BINS, mask=candidate)
    tl.store(hist_ptr + PASS * s_hp + row * s_hr + seg * s_hs + tl.arange(0, BINS), h)


@triton.jit
def _radix_select_kernel(x_ptr, pos_ptr, hist_ptr, out_ptr, N, K, ROWS_T, n_segs, seg_len,
                         s_xb, s_xt, s_pb, s_pt, s_hp, s_hr, s_hs, s_ob, s_ot,
                         PASSES: tl.constexpr, KEY_BITS: tl.constexpr, DIGIT: tl.constexpr, BINS: tl.constexpr,
                         MAX_SEGS: tl.constexpr, CAUSAL: tl.constexpr, PAD: tl.constexpr, BLOCK: tl.constexpr):
    """The collect pass: positions of the keys above the threshold t and of the first `need` keys equal to t,
    in increasing position, into out [B, ROWS_T, K] (int64; slots past the row's valid keys get -1).

    A segment starts writing at the number of keys that earlier segments keep, known from their histograms."""
    pid = tl.program_id(0)
    seg = pid % n_segs
    row = (pid // n_segs).to(tl.int64)
    b, t = row // ROWS_T, row % ROWS_T
    x_row = x_ptr + b * s_xb + t * s_xt
    out_row = out_ptr + b * s_ob + t * s_ot
    n = N
    if CAUSAL:
        n = tl.minimum(tl.load(pos_ptr + b * s_pb + t * s_pt) + 1, N).to(tl.int32)
    threshold, need, take_all, valid_seg, above_seg, equal_seg = _walk_passes(
        hist_ptr, row, n_segs, K, s_hp, s_hr, s_hs, PASSES, KEY_BITS, DIGIT, BINS, MAX_SEGS)
    earlier = tl.arange(0, MAX_SEGS) < seg
    equal_seen = tl.sum(tl.where(earlier, equal_seg, 0), axis=0)  # keys equal to the threshold before us
    written = tl.where(take_all, tl.sum(tl.where(earlier, valid_seg, 0), axis=0),
                       tl.sum(tl.where(earlier, above_seg, 0), axis=0) + tl.minimum(equal_seen, need))
    start = seg * seg_len
    stop = tl.minimum(start + seg_len, n)
    stop_load = tl.cdiv(stop, PAD) * PAD
    for i in range(start, stop, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        inside = offs < stop
        key = _sortable_key(tl.load(x_row + offs, mask=offs < stop_load, other=float("-inf")), KEY_BITS)
        valid = inside & (key > _neg_inf_key(KEY_BITS))
        equal = valid & (key == threshold)
        rank = equal_seen + tl.cumsum(equal.to(tl.int32), axis=0) - 1  # among the keys equal to the threshold
        keep = tl.where(take_all, valid, valid & ((key > threshold) | (equal & (rank < need))))
        equal_seen += tl.sum(equal.to(tl.int32), axis=0)
        slot = written + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(out_row + slot, offs.to(tl.int64), mask=keep)
        written += tl.sum(keep.to(tl.int32), axis=0)
    if seg == n_segs - 1:  # the row's last segment marks the unused slots (a row with fewer than K valid keys)
        total = tl.minimum(tl.sum(valid_seg, axis=0), K)
        for j in range(total, K, BLOCK):
            offs = j + tl.arange(0, BLOCK)
            tl.store(out_row + offs, tl.full((BLOCK,), -1, dtype=tl.int64), mask=offs < K)


# ---------------------------------------------------------------------------------------------------- wrapper
def _padded(x: torch.Tensor, pad: int) -> bool:
    """Can every row of x [B, T, N] be read up to the next multiple of `pad` elements, inside x's storage and
    inside the row's own stride? (`index_topk` allocates its score rows so; then the loads vectorise.)"""
    B, T, N = x.shape
    n_pad = -(-N // pad) * pad
    if x.stride(1) < n_pad or (T > 1 and x.stride(0) < T * x.stride(1)) or B * T == 0:
        return False
    last = x.storage_offset() + (B - 1) * x.stride(0) + (T - 1) * x.stride(1) + n_pad
    return last * x.element_size() <= x.untyped_storage().nbytes()


def radix_topk(scores: torch.Tensor, k: int, q_positions: torch.Tensor | None = None, *,
               out: torch.Tensor | None = None, segments: int | None = None,
               config: dict | None = None) -> torch.Tensor:
    """The positions of the k highest scores of each row: `[B, T, k]` int64, in increasing position, -1 where a
    row has fewer than k valid (finite or +inf) scores.

    scores `[B, T, N]` bf16 or fp32 with unit last stride (-inf = not a candidate); q_positions `[B, T]` (or
    `[T]`): keys after a row's position are ignored, as if -inf (and not read). Among equal scores at the
    threshold the earlier key is kept (chapter 3's `topk_selection` rule). `out` may be a `[B, T, k]` int64
    view (e.g. a slice of a larger selection). `segments`: programs per row (default: enough to fill the GPU).
    """
    if scores.dim() != 3 or scores.dtype not in (torch.bfloat16, torch.float32) or scores.stride(-1) != 1:
        raise ValueError(f"radix_topk needs bf16 or fp32 scores [B, T, N] with unit last stride, got {scores.dtype} "
                         f"{tuple(scores.shape)} with strides {scores.stride()}.")
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    B, T, N = scores.shape
    if out is None:
        out = torch.empty(B, T, k, dtype=torch.int64, device=scores.device)
    elif tuple(out.shape) != (B, T, k) or out.dtype != torch.int64 or out.stride(-1) != 1:
        raise ValueError(f"out must be an int64 [B, T, k] = [{B}, {T}, {k}] tensor with unit last stride, got "
                         f"{out.dtype} {tuple(out.shape)}.")
    causal = q_positions is not None
    if causal:
        pos = q_positions if q_positions.dim() == 2 else q_positions.reshape(1, -1)
        if pos.shape[-1] != T or pos.shape[0] not in (1, B) or pos.dtype.is_floating_point:
            raise ValueError(f"q_positions must be integers [T] or [B, T] with B = {B}, T = {T}; got "
                             f"{q_positions.dtype} {tuple(q_positions.shape)}.")
        require_device(scores=scores, q_positions=q_positions, out=out)
        pos = pos.expand(B, T)
    else:
        require_device(scores=scores, out=out)
        pos = scores.new_zeros(1, 1, dtype=torch.int64).expand(B, T)
    if B * T == 0:
        return out
    if N == 0:
        return out.fill_(-1)
    cfg = {**RADIX_CONFIG, **(config or {})}
    rows = B * T
    if segments is None:
        segments = max(1, min(MAX_SEGMENTS, -(-2 * sm_count(scores.device) // rows), triton.cdiv(N, cfg["BLOCK"])))
    segments = max(1, min(int(segments), MAX_SEGMENTS))
    seg_len = triton.cdiv(triton.cdiv(N, segments), cfg["BLOCK"]) * cfg["BLOCK"]
    segments = triton.cdiv(N, seg_len)
    passes = passes_for(scores.dtype)
    pad = 16 if _padded(scores, 16) else 1
    hist = torch.empty(passes, rows, segments, BINS, dtype=torch.int32, device=scores.device)
    common = dict(KEY_BITS=16 if scores.dtype == torch.bfloat16 else 32, DIGIT=DIGIT_BITS, BINS=BINS,
                  MAX_SEGS=triton.next_power_of_2(segments), CAUSAL=causal, PAD=pad, BLOCK=cfg["BLOCK"],
                  num_warps=cfg["num_warps"])
    args = (N, k, T, segments, seg_len, scores.stride(0), scores.stride(1), pos.stride(0), pos.stride(1),
            hist.stride(0), hist.stride(1), hist.stride(2))
    grid = (rows * segments,)
    for p in range(passes):
        _radix_hist_kernel[grid](scores, pos, hist, *args, PASS=p, **common)
    _radix_select_kernel[grid](scores, pos, hist, out, *args, out.stride(0), out.stride(1), PASSES=passes, **common)
    return out


__all__ = ["BINS", "DIGIT_BITS", "RADIX_CONFIG", "passes_for", "radix_topk"]
