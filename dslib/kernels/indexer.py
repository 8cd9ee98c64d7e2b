"""The lightning indexer as one Triton kernel, and the top-k selection built on it (chapter 6).

Same maths as `dslib.indexer.index_scores` (chapter 3):

    I[t,s] = Σ_j w[t,j] · ReLU( q[t,j] · k[s] )          j = 1..H indexer heads (64 at the 671B dims)

The PyTorch path computes q·k for every head, writes the per-head scores `[chunk, H, S]` to memory, then
reads them back for the ReLU and the weighted head sum. The kernel never writes them: one program owns a tile
of BLOCK_M queries × BLOCK_N keys, keeps the key tile `[BLOCK_N, D]` in shared memory, and loops over the
heads; each head is one `tl.dot` `[BLOCK_M, D] × [D, BLOCK_N]` whose result is ReLU'd, weighted and added to
an fp32 accumulator in registers. Only the finished score `[BLOCK_M, BLOCK_N]` is stored.

FP8 (REFERENCE §4.3): q and k are quantised to e4m3 with one power-of-two scale per 128-vector; the scales
are positive, so they leave the ReLU: I[t,s] = sk[s] · Σ_j (w[t,j]·sq[t,j]) · ReLU(q8[t,j]·k8[s]). The head
weights absorb sq, the key scale multiplies the finished tile; the dots run on FP8 tensor cores.

Budget per program (64 queries × 128 keys × D = 128, 4 warps): the key tile [128, 128] bf16 = 32 KB stays in
shared memory, the q tiles of successive heads [64, 128] (16 KB) stream through a 4-stage pipeline, the
accumulator [64, 128] fp32 is 64 registers per thread. The kernel is compute-bound: 64 dots per tile.
Pipelining the head loop by hand (start head j+1's product, then ReLU-weight head j's) measured slower on the
H200 (FP8, 128K prefill: 172 ms against 146 ms for this loop, 2026-12-03): Triton already overlaps the loads.

Top-k (`index_topk`): the scores of a chunk of queries at a time (`[B, chunk, S']` with S' the last key any
query of the chunk can see), then `torch.topk` or radix select (`dslib.kernels.topk`); the full `[T, S]`
matrix never exists for long T.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dslib.indexer import hadamard
from dslib.kernels.launch import pow2_block, require_device, require_dtype

# Tile shapes and launch settings (a full-width H200 sweep is in benchmarks/gpu_kernels.py; pass config= to try
# others). PREFILL: one program = BLOCK_M queries × BLOCK_N keys, looping over the heads. DECODE (few queries per
# sequence): one program = one query × BLOCK_N keys, all heads in one dot.
PREFILL_CONFIG = dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4)
DECODE_CONFIG = dict(BLOCK_N=128, num_warps=4, num_stages=1)
DECODE_MAX_QUERIES = 8  # queries per sequence up to which the decode kernel is used
MAX_HEADS = 128  # the decode kernel holds all heads of a query in one tile
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _index_scores_kernel(
    q_ptr, w_ptr, k_ptr, k_scale_ptr, pos_ptr, out_ptr,  # q [B,T,H,D], w [B,T,H] fp32, k [B,S,D], k_scale [B,S]
    T, S, H,  # pos [B,T] int, out [B,T,S]
    stride_qb, stride_qt, stride_qh, stride_wb, stride_wt, stride_kb, stride_ks, stride_sb, stride_pb,
    stride_ob, stride_ot,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr,
):
    """One tile of index scores: BLOCK_M queries × BLOCK_N keys, reduced over all H heads in registers."""
    pid_n = tl.program_id(0)  # key block: the fastest grid axis, so programs sharing a query block run together
    pid_m = tl.program_id(1)  # query block
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] query rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] key positions
    offs_d = tl.arange(0, BLOCK_D)
    m_ok, n_ok, d_ok = offs_m < T, offs_n < S, offs_d < D
    pos = tl.load(pos_ptr + b * stride_pb + offs_m, mask=m_ok, other=-1)  # [BM] query positions
    # Causal: a key block that starts after the last query of the tile is entirely -inf; skip its work
    # (no key loads, zero trips of the head loop).
    live = pid_n * BLOCK_N <= tl.max(pos, axis=0)
    n_live = offs_n < tl.where(live, S, 0)

    # The key tile is loaded once and reused by every head (it stays in shared memory).
    k_tile = k_ptr + b * stride_kb + offs_n[:, None].to(tl.int64) * stride_ks + offs_d[None, :]
    k = tl.load(k_tile, mask=n_live[:, None] & d_ok[None, :], other=0.0)  # [BN, D]
    q_rows = q_ptr + b * stride_qb + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :]  # head 0
    w_rows = w_ptr + b * stride_wb + offs_m.to(tl.int64) * stride_wt

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(tl.where(live, H, 0)):  # the head loop: per-head scores exist only in registers
        q = tl.load(q_rows + j * stride_qh, mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, D]
        w = tl.load(w_rows + j, mask=m_ok, other=0.0)  # [BM] head weight (fp32)
        s = tl.dot(q, tl.trans(k))  # [BM, BN] = q[t,j] · k[s], fp32 accumulation
        acc += tl.maximum(s, 0.0) * w[:, None]  # ReLU, weight, sum over heads
    if FP8:
        k_scale = tl.load(k_scale_ptr + b * stride_sb + offs_n, mask=n_ok, other=0.0)  # [BN]
        acc = acc * k_scale[None, :]

    acc = tl.where(offs_n[None, :] <= pos[:, None], acc, float("-inf"))  # future keys: -inf, as in chapter 3
    out = out_ptr + b * stride_ob + offs_m[:, None].to(tl.int64) * stride_ot + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _index_scores_decode_kernel(
    q_ptr, w_ptr, k_ptr, k_scale_ptr, pos_ptr, out_ptr,  # same tensors as _index_scores_kernel
    T, S, H,
    stride_qb, stride_qt, stride_qh, stride_wb, stride_wt, stride_kb, stride_ks, stride_sb, stride_pb,
    stride_ob, stride_ot,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr,
):
    """Decode: one query × BLOCK_N keys per program; the heads are the rows of one dot, summed along axis 0.
    The grid runs over key blocks (S / BLOCK_N programs per query), so one query still fills the GPU."""
    pid_n = tl.program_id(0)
    t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok, h_ok, d_ok = offs_n < S, offs_h < H, offs_d < D
    pos = tl.load(pos_ptr + b * stride_pb + t)
    n_live = offs_n < tl.where(pid_n * BLOCK_N <= pos, S, 0)  # no loads for a block wholly in the future

    q_row = q_ptr + b * stride_qb + t * stride_qt
    q = tl.load(q_row + offs_h[:, None] * stride_qh + offs_d[None, :], mask=h_ok[:, None] & d_ok[None, :],
                other=0.0)  # [BH, D]: every head of this query
    w = tl.load(w_ptr + b * stride_wb + t * stride_wt + offs_h, mask=h_ok, other=0.0)  # [BH]
    k_tile = k_ptr + b * stride_kb + offs_n[:, None].to(tl.int64) * stride_ks + offs_d[None, :]
    k = tl.load(k_tile, mask=n_live[:, None] & d_ok[None, :], other=0.0)  # [BN, D]
    s = tl.dot(q, tl.trans(k))  # [BH, BN]: all heads against all keys of the block
    score = tl.sum(tl.maximum(s, 0.0) * w[:, None], axis=0)  # [BN]: ReLU, weight, sum over heads
    if FP8:
        score = score * tl.load(k_scale_ptr + b * stride_sb + offs_n, mask=n_ok, other=0.0)
    score = tl.where(offs_n <= pos, score, float("-inf"))
    out = out_ptr + b * stride_ob + t * stride_ot + offs_n
    tl.store(out, score.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _quantize_kernel(x_ptr, y_ptr, scale_ptr, N, D: tl.constexpr, BLOCK_R: tl.constexpr):
    """e4m3 with one power-of-two scale per row of D values (`dslib.indexer.act_quant`): x [N, D] -> y, scale [N].
    scale = 2^⌈log2(amax/448)⌉, taken exactly from the float's bits: add an all-ones mantissa, keep the exponent."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < N
    offs = rows[:, None].to(tl.int64) * D + tl.arange(0, D)[None, :]
    x = tl.load(x_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)  # [BR, D]
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)  # [BR]
    bits = (amax / 448.0).to(tl.int32, bitcast=True)  # 448: the largest finite e4m3 value
    scale = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)  # round up to a power of two
    y = tl.minimum(tl.maximum(x / scale[:, None], -448.0), 448.0)
    tl.store(y_ptr + offs, y.to(tl.float8e4nv), mask=ok[:, None])
    tl.store(scale_ptr + rows, scale, mask=ok)


# ---------------------------------------------------------------------------------------------------- wrappers
def quantize_fp8(x: torch.Tensor, *, rotate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8 `float8_e4m3fn`, scale fp32 `x.shape[:-1]`) with x ≈ x8 · scale, one power-of-two scale per vector of
    the last dimension (the same numbers as `dslib.indexer.act_quant`). `rotate=True` first multiplies by the
    orthonormal Hadamard matrix (fp32), as the deployed indexer does; rotate q and k alike or neither."""
    require_device(x=x)
    require_dtype("x", x, (torch.bfloat16, torch.float16, torch.float32))
    D = x.shape[-1]
    if D < 16 or D & (D - 1) or D > MAX_HEAD_DIM:
        raise ValueError(f"quantize_fp8 needs a power-of-two last dimension in [16, {MAX_HEAD_DIM}], got shape "
                         f"{tuple(x.shape)}.")
    if rotate:
        x = x.float() @ hadamard(D).to(x.device)
    flat = x.reshape(-1, D).contiguous()
    y = torch.empty(flat.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(flat.shape[0], dtype=torch.float32, device=x.device)
    if flat.shape[0]:
        BLOCK_R = 32
        _quantize_kernel[(triton.cdiv(flat.shape[0], BLOCK_R),)](flat, y, scale, flat.shape[0], D=D, BLOCK_R=BLOCK_R)
    return y.view(x.shape), scale.view(x.shape[:-1])


def _check(q, w, k, q_positions, k_scale):
    """Validate the indexer's inputs; returns (B, T, H, D, S, positions [B, T] int64 contiguous)."""
    if q.dim() != 4 or w.dim() != 3 or k.dim() != 3:
        raise ValueError(f"expected q [B, T, H, D], w [B, T, H], k [B, S, D]; got {tuple(q.shape)}, "
                         f"{tuple(w.shape)}, {tuple(k.shape)}.")
    B, T, H, D = q.shape
    S = k.shape[1]
    if tuple(w.shape) != (B, T, H) or k.shape[0] != B or k.shape[2] != D:
        raise ValueError(f"shapes do not agree: q {tuple(q.shape)} needs w [{B}, {T}, {H}] and k [{B}, S, {D}]; "
                         f"got w {tuple(w.shape)}, k {tuple(k.shape)}.")
    if D < 16 or D & (D - 1) or D > MAX_HEAD_DIM:
        raise ValueError(f"the indexer kernel needs a power-of-two index_head_dim in [16, {MAX_HEAD_DIM}]; "
                         f"got D = {D} (q {tuple(q.shape)}). Use the PyTorch path for other sizes.")
    if H > MAX_HEADS:
        raise ValueError(f"the indexer kernel supports at most {MAX_HEADS} indexer heads, got H = {H} "
                         f"(q {tuple(q.shape)}).")
    pos = q_positions if q_positions.dim() == 2 else q_positions.reshape(1, -1)
    if q_positions.dim() not in (1, 2) or pos.shape[-1] != T or pos.shape[0] not in (1, B):
        raise ValueError(f"q_positions must be [T] or [B, T] with T = {T}, B = {B}; got {tuple(q_positions.shape)}.")
    if q_positions.dtype.is_floating_point:
        raise ValueError(f"q_positions must be integers, got {q_positions.dtype}.")
    if k.dtype == torch.float8_e4m3fn:
        if k_scale is None or tuple(k_scale.shape) != (B, S):
            raise ValueError(f"FP8 keys need k_scale [B, S] = [{B}, {S}] (from quantize_fp8), got "
                             f"{None if k_scale is None else tuple(k_scale.shape)}.")
    else:
        require_dtype("k", k, (torch.bfloat16, torch.float16, torch.float32))
    require_device(q=q, w=w, k=k, q_positions=q_positions)
    return B, T, H, D, S, pos.expand(B, T).to(torch.int64).contiguous()


def _prepare(q, w, k, k_scale, fp8: bool, rotate: bool):
    """The operands the kernel reads: (q, w fp32, k, k_scale or None, FP8 flag); quantises q (and k) for FP8."""
    if k.dtype == torch.float8_e4m3fn:
        fp8 = True
    if not fp8:
        require_dtype("q", q, (torch.bfloat16, torch.float16, torch.float32))
        if q.dtype != k.dtype:
            raise ValueError(f"q and k must have one dtype, got {q.dtype} and {k.dtype}.")
        return q, w.float(), k, None, False
    q8, sq = quantize_fp8(q, rotate=rotate)  # [B, T, H, D], [B, T, H]
    w = w.float() * sq  # the query scale moves into the head weight (positive: it passes the ReLU)
    if k.dtype != torch.float8_e4m3fn:
        k, k_scale = quantize_fp8(k, rotate=rotate)
    return q8, w, k, k_scale.float().contiguous(), True


def _launch_scores(q, w, k, k_scale, pos, out, FP8: bool, decode: bool, config: dict | None):
    """Scores of the queries of q [B, T, H, D] against the first S' = out.shape[-1] keys of k, into out [B, T, S'].
    Every tensor has a unit last stride (the kernels take the other strides)."""
    B, T, H, D = q.shape
    S = out.shape[-1]
    ks = k_scale if FP8 else w  # any tensor: unused when FP8 is off
    args = (q, w, k, ks, pos, out, T, S, H, q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1),
            k.stride(0), k.stride(1), ks.stride(0), pos.stride(0), out.stride(0), out.stride(1))
    block_d = pow2_block(D, least=32 if FP8 else 16)
    if decode:
        cfg = {**DECODE_CONFIG, **(config or {})}
        grid = (triton.cdiv(S, cfg["BLOCK_N"]), T, B)
        _index_scores_decode_kernel[grid](*args, D=D, BLOCK_D=block_d, BLOCK_H=pow2_block(H), FP8=FP8, **cfg)
    else:
        cfg = {**PREFILL_CONFIG, **(config or {})}
        grid = (triton.cdiv(S, cfg["BLOCK_N"]), triton.cdiv(T, cfg["BLOCK_M"]), B)
        _index_scores_kernel[grid](*args, D=D, BLOCK_D=block_d, FP8=FP8, **cfg)
    return out


def _tuned_tiles(fp8: bool, decode: bool, config: dict | None) -> dict | None:
    """The caller's tiles, else the tuned ones for this case (`dslib.kernels.use_tuning`), else None (built-in)."""
    if config is not None:
        return config
    from dslib.kernels import tuned

    return tuned(f"index_{'decode' if decode else 'prefill'}_{'fp8' if fp8 else 'bf16'}") or None


def index_scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, q_positions: torch.Tensor, *, fp8: bool = False,
                 k_scale: torch.Tensor | None = None, rotate: bool = False, out: torch.Tensor | None = None,
                 config: dict | None = None) -> torch.Tensor:
    """I[t,s] = Σ_j w[t,j] · ReLU(q[t,j] · k[s]), -inf at future keys (s > q_positions[t]): `[B, T, S]` fp32.

    q `[B, T, H, D]`, w `[B, T, H]` (scales folded in, as `LightningIndexer.head_weights` returns it),
    k `[B, S, D]` (or FP8 keys with `k_scale [B, S]` from `quantize_fp8`), q_positions `[T]` or `[B, T]`.
    Same maths as `dslib.indexer.index_scores`; `fp8=True` as `dslib.indexer.fp8_index_scores` (with
    `rotate=False` unless `rotate=True`). `out`: a `[B, T, S]` fp32 or bf16 tensor to write into.
    """
    B, T, _, _, S, pos = _check(q, w, k, q_positions, k_scale)
    q, w, k, k_scale, FP8 = _prepare(q, w, k, k_scale, fp8, rotate)
    q, w, k = q.contiguous(), w.contiguous(), k.contiguous()
    if out is None:
        out = torch.empty(B, T, S, dtype=torch.float32, device=q.device)
    elif tuple(out.shape) != (B, T, S) or out.dtype not in (torch.float32, torch.bfloat16) or out.stride(-1) != 1:
        raise ValueError(f"out must be a [B, T, S] = [{B}, {T}, {S}] fp32/bf16 tensor with unit last stride, got "
                         f"{out.dtype} {tuple(out.shape)}.")
    if B * T * S:
        config = _tuned_tiles(FP8, T <= DECODE_MAX_QUERIES, config)
        _launch_scores(q, w, k, k_scale, pos, out, FP8, T <= DECODE_MAX_QUERIES, config)
    return out


TOPK_METHODS = ("torch", "radix")


def index_topk(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, q_positions: torch.Tensor, topk: int, *,
               fp8: bool = False, k_scale: torch.Tensor | None = None, rotate: bool = False, chunk: int = 4096,
               score_dtype: torch.dtype | None = None, sorted: bool = True, method: str | None = None,
               config: dict | None = None, topk_config: dict | None = None) -> torch.Tensor:
    """The `topk` keys with the highest index score for every query: `[B, T, topk]` int64, -1 where there is none.

    Inputs as in `index_scores`. Semantics of `dslib.sparse.topk_selection`: causal, a query that sees at most
    `topk` keys keeps all of them, the other slots are -1; indices by decreasing score (`sorted=True`).
    Exact ties may be broken differently (chapter 3's stable sort prefers the earlier key; `torch.topk` leaves
    the order among equal scores to its kernel): the selections agree except where scores are exactly equal.

    The scores are computed `chunk` queries at a time, each chunk only up to the last key its queries can see
    (`[B, chunk, S']`, `score_dtype` fp32 or bf16: bf16 halves the top-k's memory traffic but rounds scores, so
    near-equal scores may swap), and reduced by `torch.topk` before the next chunk starts: peak extra memory is
    B·chunk·S·4 bytes (2 GiB at chunk 4096, S = 131,072).

    `method`: how each chunk's top-k is found. "torch": `torch.topk`. "radix": `dslib.kernels.topk.radix_topk`
    (radix select: a few histogram passes over the scores, no sort; ties at the threshold go to the earlier key,
    exactly as `topk_selection`); its positions come out in increasing order, and `sorted=True` then orders them
    by score (stable: the same order as `topk_selection`). `topk_config` sets its tiles.
    With `method` / `score_dtype` / `config` not given: the tuned choices (`dslib.kernels.use_tuning`), else
    torch.topk on fp32 scores with the built-in tiles.
    """
    if method is None and score_dtype is None:
        from dslib.kernels import tuned

        choice = tuned("topk_decode" if q.shape[1] <= DECODE_MAX_QUERIES else "topk_prefill")
        method = choice.get("method", "torch")
        score_dtype = {"torch.bfloat16": torch.bfloat16}.get(choice.get("score_dtype"), torch.float32)
    method, score_dtype = method or "torch", score_dtype or torch.float32
    if not isinstance(topk, int) or topk <= 0:
        raise ValueError(f"topk must be a positive integer, got {topk!r}.")
    if score_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"score_dtype must be torch.float32 or torch.bfloat16, got {score_dtype}.")
    if method not in TOPK_METHODS:
        raise ValueError(f"method must be one of {TOPK_METHODS}, got {method!r}.")
    B, T, _, _, S, pos = _check(q, w, k, q_positions, k_scale)
    q, w, k, k_scale, FP8 = _prepare(q, w, k, k_scale, fp8, rotate)
    q, w, k = q.contiguous(), w.contiguous(), k.contiguous()
    config = _tuned_tiles(FP8, T <= DECODE_MAX_QUERIES, config)
    selected = torch.full((B, T, topk), -1, dtype=torch.int64, device=q.device)
    if B * T * S == 0:
        return selected
    starts = list(range(0, T, chunk))
    if T <= DECODE_MAX_QUERIES:  # decode: every key up to S (no device sync to find the last visible key)
        last = [S - 1] * len(starts)
    else:  # one sync: the last position of each chunk bounds the keys its scores need
        padded = torch.nn.functional.pad(pos, (0, len(starts) * chunk - T), value=-1)
        last = padded.view(B, len(starts), chunk).amax(dim=(0, 2)).tolist()
    if method == "radix":  # rows padded to 64 scores: the radix kernels then read them in 16-byte vectors
        from dslib.kernels.topk import radix_topk

        s_pad = -(-S // 64) * 64
        buffer = torch.empty(B, min(chunk, T), s_pad, dtype=score_dtype, device=q.device)
    else:
        buffer = torch.empty(B * min(chunk, T) * S, dtype=score_dtype, device=q.device)
    for start, last_pos in zip(starts, last):
        rows = min(chunk, T - start)
        n_keys = min(S, int(last_pos) + 1)  # keys after the chunk's last position are -inf for all its queries
        if n_keys <= 0:
            continue
        sl = slice(start, start + rows)
        if method == "radix":
            scores = buffer[:, :rows, :n_keys]
            _launch_scores(q[:, sl], w[:, sl], k, k_scale, pos[:, sl], scores, FP8, T <= DECODE_MAX_QUERIES, config)
            chosen = radix_topk(scores, topk, pos[:, sl], out=selected[:, sl], config=topk_config)
            if sorted:  # by score, descending; stable, so equal scores keep the earlier key first
                values = scores.gather(-1, chosen.clamp(min=0)).float().masked_fill_(chosen < 0, float("-inf"))
                chosen.copy_(chosen.gather(-1, values.sort(dim=-1, descending=True, stable=True).indices))
            continue
        scores = buffer[: B * rows * n_keys].view(B, rows, n_keys)
        _launch_scores(q[:, sl], w[:, sl], k, k_scale, pos[:, sl], scores, FP8, T <= DECODE_MAX_QUERIES, config)
        kk = min(topk, n_keys)
        values, idx = torch.topk(scores, kk, dim=-1, sorted=sorted)  # [B, rows, kk]
        selected[:, sl, :kk] = idx.masked_fill_(values == float("-inf"), -1)  # future keys: none
    return selected
