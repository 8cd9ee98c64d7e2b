"""The experts of one MoE layer as ONE grouped FP8 computation, not a loop over 256 experts (chapter 6).

Chapter 4's `dispatch` sorts the (token, expert) pairs by expert and runs one matmul per expert: 256 launches,
and with FP8 storage each expert's weight is dequantised on every call. Here the same sort feeds three kernels
whose programs each pick their own expert (the "contiguous grouped layout" of DeepGEMM):

    group_by_expert   the N*k rows (token, slot) sorted by expert; expert e owns sorted rows bounds[e]..bounds[e+1],
                      cut into tiles of BLOCK_M rows that never straddle two experts (no padding copies)
    _gate_up_kernel   per (tile, 128 intermediate channels): gather the tile's tokens from x8 (quantised once),
                      gate and up projections against the expert's stacked [gate; up] weight [2I, d], then
                      SwiGLU silu(g)·u in fp32 and act_quant of the result (the down projection's input), fused
    _down_kernel      per (tile, BLOCK_N output channels): the down projection, times the gate's weight
    _combine_kernel   per token: the sum of its k rows (a fixed order: the same numbers every run)

The shared expert joins as expert number E with weight 1 for every token, so a token is k + 1 rows and one
decode token touches exactly its 8 + 1 experts' weights. `stack_experts` builds the stacked weights once and
points the experts' own parameters at them, so memory is not doubled and `state_dict()` is unchanged.

Numbers: as DeepSeek's inference, tokens and the intermediate are quantised to e4m3 (one power-of-two scale per
128 channels) and each 128-wide K step is scaled in fp32. `moe_experts_torch` is that maths in plain PyTorch
(the tests' oracle); with quantize=False it is chapter 4's `dispatch` in fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dslib.checkpoint import FP8_DTYPE, FP8Linear, dequantize_fp8_blocks
from dslib.kernels.fp8 import (
    BLOCK,
    TRITON_PROBLEM,
    _act_quant_2d,
    _capability,
    _empty,
    _quantize_block,
    act_quant_torch,
    dequantize_act,
    tl,
    triton,
    triton_runs_on,
    warn_once,
)
from dslib.moe import MoE, Routing, dispatch


# --------------------------------------------------------------------------------------------------- the grouping
@dataclass
class Grouping:
    """The R = N*k (token, slot) rows sorted by expert, and the tiles the kernels run over."""

    row_token: torch.Tensor  # [R] int32: the token of each sorted row
    row_weight: torch.Tensor  # [R] fp32 (or the gate's dtype): its gate weight
    position: torch.Tensor  # [N, k] int32: the sorted row of (token, slot)
    bounds: torch.Tensor | None  # [E + 1] int64: expert e owns sorted rows bounds[e] .. bounds[e+1] - 1
    tile_expert: torch.Tensor  # [T] int32 (int64 for one token): the expert of each tile, -1 for spare tiles
    tile_row: torch.Tensor  # [T] int32: first sorted row of the tile
    tile_end: torch.Tensor  # [T] int32: end of its expert's rows (the tile covers [row, min(row + BLOCK_M, end)))
    block_m: int


def group_by_expert(topk_idx: torch.Tensor, topk_weight: torch.Tensor, n_experts: int, block_m: int) -> Grouping:
    """Sort the rows by expert and cut each expert's rows into tiles of `block_m` (the last one partial).

    Everything stays on the device (no .item(), no host sync): the number of tiles is at most
    ceil(R / block_m) + min(E, R), since each expert adds at most one partial tile, so the kernels are launched
    with that many and spare tiles return at once. Experts without tokens get no tile: their weights are never read."""
    n_tokens, k = topk_idx.shape
    rows = n_tokens * k
    device = topk_idx.device
    flat = topk_idx.reshape(-1)
    sorted_expert, order = flat.sort(stable=True)  # rows grouped by expert, tokens in order within an expert
    bounds = torch.searchsorted(sorted_expert, torch.arange(n_experts + 1, device=device, dtype=flat.dtype))
    counts = bounds[1:] - bounds[:-1]  # [E] rows per expert
    tiles = (counts + block_m - 1) // block_m
    tile_stop = tiles.cumsum(0)  # tiles of experts 0..e
    t = torch.arange(-(-rows // block_m) + min(n_experts, rows), device=device)
    expert = torch.searchsorted(tile_stop, t, right=True)  # the expert tile t belongs to (E: a spare tile)
    e = expert.clamp(max=n_experts - 1)
    tile_row = bounds[e] + (t - (tile_stop[e] - tiles[e])) * block_m
    position = torch.empty_like(order)
    position[order] = torch.arange(rows, device=device)
    return Grouping(
        row_token=(order // k).to(torch.int32),
        row_weight=topk_weight.reshape(-1)[order].float(),
        position=position.view(n_tokens, k).to(torch.int32),
        bounds=bounds,
        tile_expert=torch.where(expert < n_experts, e, -1).to(torch.int32),
        tile_row=tile_row.to(torch.int32),
        tile_end=bounds[e + 1].to(torch.int32),
        block_m=block_m,
    )


_ONE_TOKEN: dict = {}  # (k, device) -> the index tensors of `one_token_grouping`, made once


def one_token_grouping(topk_idx: torch.Tensor, topk_weight: torch.Tensor, block_m: int) -> Grouping:
    """Decode of one token: each of its k rows is its own tile (the k experts of a token are distinct, so no
    expert weight is read twice). Nothing to sort; the index tensors are made once per k and device, and the
    routing is used as it is (views): no kernel launch, no host sync, the same tensors on every call (what a
    CUDA graph wants)."""
    n_tokens, k = topk_idx.shape
    if n_tokens != 1:
        raise ValueError(f"one_token_grouping takes the routing of one token, got {tuple(topk_idx.shape)}.")
    key = (k, topk_idx.device)
    if key not in _ONE_TOKEN:
        rows = torch.arange(k, dtype=torch.int32, device=topk_idx.device)
        _ONE_TOKEN[key] = (torch.zeros_like(rows), rows.view(1, k), rows, rows + 1)
    row_token, position, tile_row, tile_end = _ONE_TOKEN[key]
    return Grouping(row_token=row_token, row_weight=topk_weight.reshape(-1), position=position, bounds=None,
                    tile_expert=topk_idx.reshape(-1), tile_row=tile_row, tile_end=tile_end, block_m=block_m)


# --------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _gate_up_kernel(x8_ptr, sx_ptr, row_token_ptr, tile_expert_ptr, tile_row_ptr, tile_end_ptr,
                    w13_ptr, s13_ptr, h8_ptr, sh_ptr, d, I,
                    stride_xn, stride_sxn, stride_we, stride_wr, stride_se, stride_sr, stride_hr, stride_shr,
                    BLOCK_M: tl.constexpr):
    """h = silu(x Wgᵀ) · (x Wuᵀ) for one tile of an expert's rows and 128 intermediate channels, then act_quant.

    x8 [N, d] e4m3 + sx [N, d/128]: the tokens, quantised once and gathered here by row_token. w13 [E, 2I, d]
    e4m3 + s13 [E, 2I/128, d/128]: gate rows 0..I-1 then up rows I..2I-1 (their scale rows line up, I being a
    multiple of 128). Out: h8 [R, I] e4m3 + sh [R, I/128], the down projection's input."""
    pid = tl.program_id(0)
    j = pid % (I // 128)  # which 128 intermediate channels: a tile's programs run side by side and share its rows
    t = pid // (I // 128)  # which tile
    expert = tl.load(tile_expert_ptr + t)
    if expert < 0:  # the grid is sized for the worst case; spare tiles stop here
        return
    end = tl.load(tile_end_ptr + t)
    rows = tl.load(tile_row_ptr + t) + tl.arange(0, BLOCK_M)
    token = tl.load(row_token_ptr + tl.minimum(rows, end - 1)).to(tl.int64)  # rows past the expert's: any valid row
    channels = j * 128 + tl.arange(0, 128)
    ks = tl.arange(0, 128)

    a_ptrs = x8_ptr + token[:, None] * stride_xn + ks[None, :]  # [BLOCK_M, 128] gathered token rows
    gate_ptrs = (w13_ptr + expert.to(tl.int64) * stride_we
                 + channels.to(tl.int64)[None, :] * stride_wr + ks[:, None])  # [128 k, 128 channels]
    up_ptrs = gate_ptrs + I * stride_wr
    sa_ptrs = sx_ptr + token * stride_sxn
    s_gate_ptr = s13_ptr + expert.to(tl.int64) * stride_se + j * stride_sr
    s_up_ptr = s_gate_ptr + (I // 128) * stride_sr

    acc_gate = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
    for k0 in range(0, d, 128):  # one 128-wide K step = one scale block
        kb = k0 // 128
        a = tl.load(a_ptrs)
        sa = tl.load(sa_ptrs + kb)[:, None]
        acc_gate += tl.dot(a, tl.load(gate_ptrs)) * (sa * tl.load(s_gate_ptr + kb))  # scaled and summed in fp32
        acc_up += tl.dot(a, tl.load(up_ptrs)) * (sa * tl.load(s_up_ptr + kb))
        a_ptrs += 128
        gate_ptrs += 128
        up_ptrs += 128

    h = acc_gate * tl.sigmoid(acc_gate) * acc_up  # SwiGLU, fp32
    h8, scale = _quantize_block(h, True)  # these 128 channels are exactly one activation block
    keep = rows < end
    rows64 = rows.to(tl.int64)
    tl.store(h8_ptr + rows64[:, None] * stride_hr + channels[None, :], h8.to(tl.float8e4nv), mask=keep[:, None])
    tl.store(sh_ptr + rows64 * stride_shr + j, scale, mask=keep)


@triton.jit
def _down_kernel(h8_ptr, sh_ptr, row_weight_ptr, tile_expert_ptr, tile_row_ptr, tile_end_ptr,
                 w2_ptr, s2_ptr, y_ptr, d, I,
                 stride_hr, stride_shr, stride_we, stride_wr, stride_se, stride_sr, stride_yr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y_rows = weight · (h8 · sh)(w2[e] · s2[e])ᵀ for one tile and BLOCK_N output channels. w2 [E, d, I] e4m3,
    s2 [E, d/128, I/128]; y_rows [R, d] in expert-sorted order."""
    pid = tl.program_id(0)
    nb = pid % tl.cdiv(d, BLOCK_N)  # which output channels (fastest, as in _gate_up_kernel)
    t = pid // tl.cdiv(d, BLOCK_N)  # which tile
    expert = tl.load(tile_expert_ptr + t)
    if expert < 0:
        return
    end = tl.load(tile_end_ptr + t)
    rows = tl.load(tile_row_ptr + t) + tl.arange(0, BLOCK_M)
    rows_c = tl.minimum(rows, end - 1).to(tl.int64)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_c = tl.minimum(cols, d - 1).to(tl.int64)
    ks = tl.arange(0, 128)

    tl.static_assert(128 % BLOCK_N == 0, "a tile's columns must share one row of weight scales")
    a_ptrs = h8_ptr + rows_c[:, None] * stride_hr + ks[None, :]
    w_ptrs = w2_ptr + expert.to(tl.int64) * stride_we + cols_c[None, :] * stride_wr + ks[:, None]
    sa_ptrs = sh_ptr + rows_c * stride_shr
    sw_ptr = s2_ptr + expert.to(tl.int64) * stride_se + ((nb * BLOCK_N) // 128) * stride_sr

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, 128):  # one 128-wide K step = one scale block
        kb = k0 // 128
        scale = tl.load(sa_ptrs + kb) * tl.load(sw_ptr + kb)  # [BLOCK_M]
        acc += tl.dot(tl.load(a_ptrs), tl.load(w_ptrs)) * scale[:, None]
        a_ptrs += 128
        w_ptrs += 128
    acc = acc * tl.load(row_weight_ptr + rows_c)[:, None]  # the gate's weight of this (token, expert)

    keep = (rows[:, None] < end) & (cols[None, :] < d)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_yr + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=keep)


@triton.jit
def _combine_kernel(y_ptr, position_ptr, out_ptr, d, stride_yr, stride_on,
                    SLOTS: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[n] = Σ_j y_rows[position[n, j]] over a token's SLOTS rows, in fp32, always in slot order."""
    n = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    inside = cols < d
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in tl.static_range(SLOTS):
        row = tl.load(position_ptr + n * SLOTS + j).to(tl.int64)
        acc += tl.load(y_ptr + row * stride_yr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + n.to(tl.int64) * stride_on + cols, acc.to(out_ptr.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------------------------------- host side
@dataclass(frozen=True)
class MoEConfig:
    """Tiles and launch settings of the grouped kernels (the gate-up tile is always BLOCK_M x 128, two of them)."""

    block_m: int = 128
    up_warps: int = 8
    up_stages: int = 3
    down_block_n: int = 128
    down_warps: int = 8
    down_stages: int = 4


def default_moe_config(rows: int, n_experts: int) -> MoEConfig:
    """By rows per expert: decode (a few) wants 16-row tiles; prefill big ones. The benchmark tries others."""
    per_expert = rows / max(n_experts, 1)
    if per_expert <= 16:
        return MoEConfig(16, 4, 4, 64, 4, 4)
    if per_expert <= 96:
        return MoEConfig(64, 4, 3, 128, 4, 4)
    return MoEConfig()


def _check_moe(x, topk_idx, topk_weight, w13, s13, w2, s2, check_indices: bool) -> None:
    if x.dim() != 2:
        raise ValueError(f"moe_experts expects tokens x [N, d], got shape {tuple(x.shape)}; flatten batch and time.")
    n, d = x.shape
    if topk_idx.dim() != 2 or topk_idx.shape[0] != n or topk_weight.shape != topk_idx.shape:
        raise ValueError(f"topk_idx and topk_weight must both be [N={n}, k], got {tuple(topk_idx.shape)} and "
                         f"{tuple(topk_weight.shape)}.")
    if w13.dim() != 3 or w13.shape[2] != d or w13.shape[1] % 2:
        raise ValueError(f"w13 must be [E, 2*I, d={d}] (gate rows, then up rows), got {tuple(w13.shape)}.")
    e, two_i, _ = w13.shape
    if len({t.device for t in (x, topk_idx, topk_weight, w13, w2, *(s for s in (s13, s2) if s is not None))}) > 1:
        raise ValueError("moe_experts needs x, the routing and the stacked weights on one device.")
    if w2.shape != (e, d, two_i // 2):
        raise ValueError(f"w2 must be [E={e}, d={d}, I={two_i // 2}] to match w13 {tuple(w13.shape)}, got "
                         f"{tuple(w2.shape)}.")
    if s13 is not None:
        if d % BLOCK or (two_i // 2) % BLOCK:
            raise ValueError(f"the grouped FP8 kernels need d and I to be multiples of {BLOCK} (one activation "
                             f"scale per 128 channels); got d={d}, I={two_i // 2}.")
        for w, s, name in ((w13, s13, "s13"), (w2, s2, "s2")):
            want = (e, w.shape[1] // BLOCK, w.shape[2] // BLOCK)
            if w.dtype != FP8_DTYPE or s is None or tuple(s.shape) != want or s.dtype != torch.float32:
                raise ValueError(f"{name} must be the fp32 block scales {want} of an e4m3 weight "
                                 f"{tuple(w.shape)}; got weight {w.dtype} and {name} "
                                 f"{None if s is None else tuple(s.shape)}.")
    if check_indices and topk_idx.numel():
        lo, hi = int(topk_idx.min()), int(topk_idx.max())  # one host sync; forward() skips it (the gate's ids)
        if lo < 0 or hi >= e:
            raise ValueError(f"topk_idx holds expert ids {lo}..{hi}, outside 0..{e - 1} (E = {e} stacked experts).")


def moe_experts(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, w13: torch.Tensor,
                s13: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor, *, config: MoEConfig | None = None,
                check: bool = True) -> torch.Tensor:
    """Σ_j topk_weight[n, j] · Expert_{topk_idx[n, j]}(x[n]) for all tokens at once;
    Expert(x) = down(silu(gate x)·up x).

    x [N, d] (bf16/fp16/fp32); topk_idx, topk_weight [N, k]; w13 [E, 2I, d] e4m3 + s13 [E, 2I/128, d/128];
    w2 [E, d, I] e4m3 + s2 [E, d/128, I/128] -> [N, d] in x's dtype. d and I multiples of 128. Without Triton
    (no GPU, no interpreter) it returns `moe_experts_torch`, the same maths."""
    _check_moe(x, topk_idx, topk_weight, w13, s13, w2, s2, check)
    if not triton_runs_on(x):
        return moe_experts_torch(x, topk_idx, topk_weight, w13, s13, w2, s2)
    n_tokens, d = x.shape
    n_experts = w13.shape[0]
    rows = topk_idx.numel()
    out = _empty((n_tokens, d), x.dtype, x.device)
    if rows == 0:
        return out
    cfg = config or default_moe_config(rows, n_experts)
    if n_tokens == 1:  # decode: 4 launches in all (act_quant, gate_up, down, combine)
        g = one_token_grouping(topk_idx, topk_weight, cfg.block_m)
    else:
        g = group_by_expert(topk_idx, topk_weight, n_experts, cfg.block_m)
    x8, sx = _act_quant_2d(x)  # each token once, before the gather
    h8, sh = gate_up(x8, sx, g, w13, s13, cfg)
    y_rows = down(h8, sh, g, w2, s2, cfg, x.dtype)
    return combine(y_rows, g.position, out)


def gate_up(x8: torch.Tensor, sx: torch.Tensor, g: Grouping, w13: torch.Tensor, s13: torch.Tensor,
            cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1 of `moe_experts`: (h8 [R, I] e4m3, sh [R, I/128]) = act_quant(silu(x Wgᵀ) · x Wuᵀ) per sorted row."""
    rows, inter, d = g.row_token.shape[0], w13.shape[1] // 2, w13.shape[2]
    s13 = s13.contiguous()
    h8 = _empty((rows, inter), FP8_DTYPE, x8.device)
    sh = _empty((rows, inter // BLOCK), torch.float32, x8.device)
    _gate_up_kernel[(inter // BLOCK * g.tile_expert.shape[0],)](
        x8, sx, g.row_token, g.tile_expert, g.tile_row, g.tile_end, w13, s13, h8, sh, d, inter,
        x8.stride(0), sx.stride(0), w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(1),
        h8.stride(0), sh.stride(0),
        BLOCK_M=cfg.block_m, num_warps=cfg.up_warps, num_stages=cfg.up_stages,
    )
    return h8, sh


def down(h8: torch.Tensor, sh: torch.Tensor, g: Grouping, w2: torch.Tensor, s2: torch.Tensor, cfg: MoEConfig,
         out_dtype: torch.dtype) -> torch.Tensor:
    """Step 2: y_rows [R, d] = gate weight · down projection of each sorted row, in out_dtype."""
    rows, d, inter = h8.shape[0], w2.shape[1], w2.shape[2]
    s2 = s2.contiguous()
    y_rows = _empty((rows, d), out_dtype, h8.device)
    _down_kernel[(triton.cdiv(d, cfg.down_block_n) * g.tile_expert.shape[0],)](
        h8, sh, g.row_weight, g.tile_expert, g.tile_row, g.tile_end, w2, s2, y_rows, d, inter,
        h8.stride(0), sh.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1), y_rows.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.down_block_n, num_warps=cfg.down_warps, num_stages=cfg.down_stages,
    )
    return y_rows


def combine(y_rows: torch.Tensor, position: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Step 3: out [N, d] = the sum of each token's rows of y_rows [R, d] (position [N, k] says which)."""
    n_tokens, slots = position.shape
    if triton_runs_on(y_rows):
        block_d = 1024
        _combine_kernel[(n_tokens, triton.cdiv(out.shape[1], block_d))](
            y_rows, position, out, out.shape[1], y_rows.stride(0), out.stride(0), SLOTS=slots, BLOCK_D=block_d)
        return out
    return out.copy_(y_rows[position.long()].float().sum(dim=1))


def _dense(w: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    return w.float() if s is None else dequantize_fp8_blocks(w, s, torch.float32)


def moe_experts_torch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, w13: torch.Tensor,
                      s13: torch.Tensor | None, w2: torch.Tensor, s2: torch.Tensor | None, *,
                      quantize: bool | None = None) -> torch.Tensor:
    """The reference for `moe_experts` / `moe_experts_bf16`: fp32, one active expert at a time.

    quantize (default: when the weights are FP8) applies act_quant to the tokens and to the intermediate, as the
    kernels do; quantize=False is chapter 4's `dispatch` with the same (dequantised) weights, in fp32."""
    quantize = s13 is not None if quantize is None else quantize
    inter = w13.shape[1] // 2
    half = math.ceil(inter / BLOCK)  # scale rows of the gate half
    xs = dequantize_act(*act_quant_torch(x)) if quantize else x.float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in topk_idx.unique().tolist():
        token, slot = (topk_idx == e).nonzero(as_tuple=True)
        gate = _dense(w13[e, :inter], None if s13 is None else s13[e, :half])
        up = _dense(w13[e, inter:], None if s13 is None else s13[e, half:])
        h = F.silu(xs[token] @ gate.T) * (xs[token] @ up.T)
        if quantize:
            h = dequantize_act(*act_quant_torch(h))
        y = h @ _dense(w2[e], None if s2 is None else s2[e]).T
        out.index_add_(0, token, y * topk_weight[token, slot].float()[:, None])
    return out.to(x.dtype)


def moe_experts_bf16(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, w13: torch.Tensor,
                     w2: torch.Tensor) -> torch.Tensor:
    """The same grouping with bf16 (or fp16) weights w13 [E, 2I, d], w2 [E, d, I]: torch._grouped_mm (one grouped
    GEMM per projection, uneven groups) where torch has it; otherwise one matmul per active expert.
    No activation quantisation: this is chapter 4's maths, grouped. x [N, d] -> [N, d]."""
    _check_moe(x, topk_idx, topk_weight, w13, None, w2, None, check_indices=False)
    n_tokens, d = x.shape
    inter = w13.shape[1] // 2
    if topk_idx.numel() == 0:
        return x.new_zeros(n_tokens, d)
    g = group_by_expert(topk_idx, topk_weight, w13.shape[0], block_m=BLOCK)
    xs = x.to(w13.dtype)[g.row_token.long()]  # [R, d] gathered, expert-sorted
    ends = g.bounds[1:].to(torch.int32)
    h = _grouped_mm(xs, w13, g.bounds, ends)  # [R, 2I]
    h = (F.silu(h[:, :inter].float()) * h[:, inter:].float()).to(w13.dtype)
    y = _grouped_mm(h, w2, g.bounds, ends).mul_(g.row_weight[:, None].to(w13.dtype))  # [R, d], as dispatch
    return combine(y, g.position, _empty((n_tokens, d), x.dtype, x.device))


def _grouped_mm(a: torch.Tensor, w: torch.Tensor, bounds: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """rows bounds[e]..bounds[e+1] of a [R, K] times w[e]ᵀ (w [E, N, K]) -> [R, N]."""
    if hasattr(torch, "_grouped_mm"):
        try:
            return torch._grouped_mm(a, w.transpose(1, 2), offs=ends)
        except RuntimeError as err:  # e.g. a GPU older than Hopper
            warn_once(f"torch._grouped_mm refused {a.dtype} {tuple(a.shape)} x {tuple(w.shape)} ({err}); "
                      "looping over experts instead.")
    out = a.new_empty(a.shape[0], w.shape[1])
    b = bounds.tolist()
    for e in range(w.shape[0]):
        if b[e + 1] > b[e]:
            out[b[e]:b[e + 1]] = a[b[e]:b[e + 1]] @ w[e].T
    return out


# --------------------------------------------------------------------------------------------------- a MoE module
@dataclass
class StackedExperts:
    """One MoE layer's experts as stacked tensors (the kernels' layout). Expert `n_routed` is the shared expert
    when `with_shared`. s13 / s2 are None for bf16 experts."""

    w13: torch.Tensor  # [E', 2I, d]: gate_proj rows, then up_proj rows
    s13: torch.Tensor | None  # [E', 2I/128, d/128]
    w2: torch.Tensor  # [E', d, I]: down_proj
    s2: torch.Tensor | None  # [E', d/128, I/128]
    n_routed: int
    with_shared: bool

    @property
    def fp8(self) -> bool:
        return self.s13 is not None


def _linears(mlp):
    return mlp.gate_proj, mlp.up_proj, mlp.down_proj


def stack_experts(moe: MoE) -> StackedExperts:
    """Stack `moe`'s experts (and its shared expert, when it has the routed experts' width) ONCE, cached on the
    module. Each expert's parameters then become views into the stacked tensors: the names and values of
    `state_dict()` stay the checkpoint's, and no weight is held twice. Moving or reloading the module's
    parameters (new storage) makes the next call stack again."""
    cached = moe.__dict__.pop("_stacked_experts", None)
    first, last = moe.experts[0].gate_proj.weight, moe.experts[-1].down_proj.weight
    if (cached is not None and cached.w13.device == first.device and first.data_ptr() == cached.w13.data_ptr()
            and last.data_ptr() == cached.w2[cached.n_routed - 1].data_ptr()):
        moe.__dict__["_stacked_experts"] = cached
        return cached
    del cached  # stale (the parameters moved or were reloaded): free it before stacking again
    mlps = list(moe.experts)
    inter, d = mlps[0].gate_proj.weight.shape
    shared = moe.shared_experts
    with_shared = shared is not None and shared.gate_proj.weight.shape == (inter, d)
    if with_shared:
        mlps.append(shared)
    fp8 = isinstance(mlps[0].gate_proj, FP8Linear)
    for mlp in mlps:
        for lin in _linears(mlp):
            if isinstance(lin, FP8Linear) != fp8 or (fp8 and lin.block != BLOCK):
                raise ValueError("stack_experts needs every expert linear to be an FP8Linear with 128x128 blocks, "
                                 f"or every one a plain Linear; found {type(lin).__name__} next to others.")
    w_ref = mlps[0].gate_proj.weight
    n = len(mlps)
    w13 = torch.empty(n, 2 * inter, d, dtype=w_ref.dtype, device=w_ref.device)
    w2 = torch.empty(n, d, inter, dtype=w_ref.dtype, device=w_ref.device)
    s13 = s2 = None
    if fp8:
        half = math.ceil(inter / BLOCK)
        s13 = torch.empty(n, 2 * half, math.ceil(d / BLOCK), dtype=torch.float32, device=w_ref.device)
        s2 = torch.empty(n, math.ceil(d / BLOCK), half, dtype=torch.float32, device=w_ref.device)
    with torch.no_grad():
        for e, mlp in enumerate(mlps):  # copy, then re-point: the old storage is freed expert by expert
            gate, up, down = _linears(mlp)
            w13[e, :inter].copy_(gate.weight)
            w13[e, inter:].copy_(up.weight)
            w2[e].copy_(down.weight)
            gate.weight.data, up.weight.data, down.weight.data = w13[e, :inter], w13[e, inter:], w2[e]
            if fp8:
                s13[e, :half].copy_(gate.weight_scale_inv)
                s13[e, half:].copy_(up.weight_scale_inv)
                s2[e].copy_(down.weight_scale_inv)
                gate.weight_scale_inv.data, up.weight_scale_inv.data = s13[e, :half], s13[e, half:]
                down.weight_scale_inv.data = s2[e]
    stacked = StackedExperts(w13, s13, w2, s2, len(moe.experts), with_shared)
    moe.__dict__["_stacked_experts"] = stacked  # a plain attribute: not a parameter, buffer or state_dict entry
    return stacked


def _why_not(moe: MoE, x: torch.Tensor) -> str | None:
    """Why the grouped path cannot run this call (None when it can)."""
    if TRITON_PROBLEM is not None or tl is None:
        return TRITON_PROBLEM or "Triton is not importable"
    if not triton_runs_on(x):
        return f"the tokens are on {x.device}, and Triton runs on CUDA GPUs (or on CPU with TRITON_INTERPRET=1)"
    lin = moe.experts[0].gate_proj
    inter, d = lin.weight.shape
    if isinstance(lin, FP8Linear):
        if x.is_cuda and _capability(x.device) < (8, 9):
            return f"this GPU (compute capability {_capability(x.device)}) has no FP8 tensor cores (8.9+ needed)"
        if d % BLOCK or inter % BLOCK:
            return f"hidden_size={d} and moe_intermediate_size={inter} must be multiples of {BLOCK}"
    elif lin.weight.dtype not in (torch.bfloat16, torch.float16):
        return f"the experts are {lin.weight.dtype} (the grouped path runs FP8 or bf16 experts)"
    return None


def forward(moe: MoE, x: torch.Tensor, routing: Routing, *, config: MoEConfig | None = None) -> torch.Tensor:
    """`MoE.forward(..., backend="triton")`: routed + shared experts of x [N, d] with the gate's `routing`
    -> [N, d]. Falls back to chapter 4's torch path, with one warning, where the kernels cannot run."""
    reason = _why_not(moe, x)
    if reason is not None:
        warn_once(f"backend='triton' MoE: {reason}; using the torch path.")
        y = dispatch(x, routing.topk_idx, routing.topk_weight, moe.experts)
        return y if moe.shared_experts is None else y + moe.shared_experts(x)
    stacked = stack_experts(moe)
    idx, weight = routing.topk_idx, routing.topk_weight
    if stacked.with_shared:  # the shared expert is expert n_routed, weight 1, for every token
        idx = torch.cat([idx, idx.new_full((idx.shape[0], 1), stacked.n_routed)], dim=1)
        weight = torch.cat([weight, weight.new_ones(weight.shape[0], 1)], dim=1)
    if stacked.fp8:
        y = moe_experts(x, idx, weight, stacked.w13, stacked.s13, stacked.w2, stacked.s2, config=config, check=False)
    else:
        y = moe_experts_bf16(x, idx, weight, stacked.w13, stacked.w2)
    if moe.shared_experts is not None and not stacked.with_shared:
        y = y + moe.shared_experts(x)
    return y
