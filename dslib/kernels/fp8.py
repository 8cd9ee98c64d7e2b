"""FP8 linears as DeepSeek-V3.2 runs them: e4m3 activations and weights, block scales, fp32 sums (chapter 6).

The checkpoint stores a linear's weight W [N, K] as e4m3 values w8 with one fp32 scale per 128 x 128 block,
`weight_scale_inv` [ceil(N/128), ceil(K/128)] (REFERENCE.md §7.2). At inference the activations are quantised on
the fly, per token and per 128 channels (`activation_scheme: dynamic`, `scale_fmt: ue8m0`):

    act_quant(x):  s = 2^ceil(log2(max(amax, 1e-4) / 448))      one power-of-two scale per 128 channels of a token
                   x8 = round_e4m3(clamp(x / s, -448, 448))      x ≈ x8 · s

and the matmul never rebuilds W in bf16. Each 128-wide step of K multiplies e4m3 tiles on the tensor cores and
applies both scales to the fp32 partial sum before adding it up:

    y[m, n] = Σ_kb  sx[m, kb] · sw[n // 128, kb] · Σ_{k in block kb} x8[m, k] · w8[n, k]

(DeepSeek-V3 adds each 128-wide partial sum to an fp32 accumulator for the same reason: the FP8 tensor cores keep
fewer bits than fp32 inside one product.) Three implementations of `fp8_linear`, one maths:

    "scaled_mm"   torch._scaled_mm with 1x128 activation / 128x128 weight scales (cuBLAS, Hopper)
    "triton"      `_fp8_gemm_kernel` below: the same loop, readable (any GPU with FP8 tensor cores, and the tests)
    "torch"       dequantise both operands, fp32 matmul: the reference (CPU)

`FP8Linear.forward` (dslib.checkpoint) calls `linear_fast_path` on a GPU, so a model with FP8 storage uses this
file without a new switch. fp32 activations keep the exact dequantise path (fp32 runs are exactness tests).
"""
from __future__ import annotations

import math
import os
import types
import warnings
from dataclasses import dataclass

import torch

from dslib.checkpoint import FP8_DTYPE, FP8_MAX, dequantize_fp8_blocks, scale_shape
from dslib.kernels import triton_problem

try:
    import triton
    import triton.language as tl
except ImportError:  # PyTorch's CPU wheels ship without Triton: the torch paths and the kernels' source still work
    triton = types.SimpleNamespace(jit=lambda fn: fn)
    tl = None

TRITON_PROBLEM = triton_problem()  # checked once, off the hot path: None, or why this Triton is not used

BLOCK = 128  # channels per activation scale, rows and columns per weight scale (`weight_block_size`)
AMAX_FLOOR = 1e-4  # an all-zero block still gets a finite scale (as DeepSeek's act_quant)
POISON = False  # tests set True: every output buffer starts as NaN, so an element a kernel forgets shows up


# --------------------------------------------------------------------------------------------------- torch reference
def pow2_ceil(v: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2 v) for fp32 v > 0, read off the exponent bits (exact; NaN and inf pass through).

    A float is 2^e · 1.m: if the mantissa bits m are all zero it is a power of two already, else the next one up
    is 2^(e+1). (exp2(ceil(log2 v)) in floating point can round log2 of a value just above a power of two down to
    the integer and return a scale one step too small; the bits cannot.)"""
    bits = v.float().contiguous().view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    out = (exponent << 23).view(torch.float32)
    return torch.where(torch.isfinite(v), out, v.float())


def act_quant_torch(x: torch.Tensor, *, pow2_scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference act_quant: x [..., K] (K a multiple of 128) -> (x8 [..., K] e4m3, scale [..., K/128] fp32).

    Per token and 128 channels: scale = max(amax, 1e-4) / 448, rounded up to a power of two when pow2_scale
    (ue8m0); x8 = e4m3(clamp(x / scale, ±448)), rounded to nearest, ties to even. A block holding NaN gets a NaN
    scale, one holding inf an inf scale, so x8 · scale is non-finite there, as x is."""
    _check_act(x)
    blocks = x.float().unflatten(-1, (x.shape[-1] // BLOCK, BLOCK))  # [..., K/128, 128]
    scale = blocks.abs().amax(dim=-1).clamp(min=AMAX_FLOOR) / FP8_MAX  # [..., K/128]
    if pow2_scale:
        scale = pow2_ceil(scale)
    x8 = (blocks / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x8.flatten(-2), scale


def dequantize_act(x8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x8 [..., K] e4m3, scale [..., K/128] -> x8 · scale in fp32 (exact: an e4m3 value times a power of two)."""
    return (x8.float().unflatten(-1, (scale.shape[-1], BLOCK)) * scale.float().unsqueeze(-1)).flatten(-2)


def fp8_linear_torch(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> torch.Tensor:
    """The reference fp8_linear: act_quant x, dequantise both operands, one fp32 matmul. x [..., K] -> [..., N]."""
    x8, sx = act_quant_torch(x)
    w = dequantize_fp8_blocks(weight, weight_scale_inv, torch.float32)
    return (dequantize_act(x8, sx) @ w.T).to(x.dtype)


# --------------------------------------------------------------------------------------------------- Triton pieces
@triton.jit
def _pow2_ceil(v):
    """2^ceil(log2 v) for fp32 v > 0 from the exponent bits, as `pow2_ceil` (inf stays inf)."""
    bits = v.to(tl.uint32, bitcast=True)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + ((bits & 0x7FFFFF) != 0).to(tl.uint32)
    return (exponent << 23).to(tl.float32, bitcast=True)


@triton.jit
def _round_to_e4m3(y):
    """fp32 y (|y| <= 448) rounded to the nearest e4m3 value, ties to even, still as fp32.

    e4m3 keeps 3 mantissa bits: in [2^e, 2^(e+1)) its values are 2^(e-3) apart, and below the smallest normal
    2^-6 they stay 2^-9 apart (subnormals). Adding then subtracting 2^23 rounds y / step to an integer with
    fp32's own round-to-nearest-even. Rounding here, before the cast, makes the cast exact on every backend:
    the GPU's conversion rounds the same way, the CPU interpreter's does not."""
    bits = y.to(tl.uint32, bitcast=True)
    sign = (bits >> 31) << 31
    magnitude = (bits & 0x7FFFFFFF).to(tl.float32, bitcast=True)
    exponent = tl.maximum((bits >> 23) & 0xFF, 127 - 6)  # biased exponent of y, at least that of 2^-6
    step = ((exponent - 3) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3)
    inv_step = ((254 - (exponent - 3)) << 23).to(tl.float32, bitcast=True)  # 2^(3 - e), exact
    rounded = ((magnitude * inv_step + 8388608.0) - 8388608.0) * step
    return (rounded.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_block(x, POW2: tl.constexpr):
    """x [ROWS, 128] fp32 -> (x8 [ROWS, 128] e4m3 values held in fp32, scale [ROWS]): `act_quant_torch` on one
    128-channel block. Rows with a NaN get a NaN scale explicitly (GPU max-reductions skip NaN)."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)
    scale = tl.math.div_rn(amax, 448.0)  # IEEE division, as torch (plain `/` may be approximate on the GPU)
    if POW2:
        scale = _pow2_ceil(scale)
    has_nan = tl.max((x != x).to(tl.int32), axis=1) > 0
    scale = tl.where(has_nan, float("nan"), scale)
    y = tl.math.div_rn(x, scale[:, None])
    y = tl.minimum(tl.maximum(y, -448.0, tl.PropagateNan.ALL), 448.0, tl.PropagateNan.ALL)
    return _round_to_e4m3(y), scale


@triton.jit
def _act_quant_kernel(x_ptr, x8_ptr, s_ptr, M, stride_xm, stride_qm, stride_sm, stride_sk,
                      POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """x [M, K] -> x8 [M, K] e4m3 and scale [M, K/128]; one program = BLOCK_M tokens x one 128-channel block.
    The scale's strides are arguments: fp8_linear asks for them column-major, the layout cuBLAS reads."""
    pid_m = tl.program_id(0)
    kb = tl.program_id(1)  # which 128-channel block
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = kb * 128 + tl.arange(0, 128)
    in_range = rows < M
    rows64 = rows.to(tl.int64)  # M * K can pass 2^31
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=in_range[:, None], other=0.0)
    x8, scale = _quantize_block(x.to(tl.float32), POW2)
    tl.store(x8_ptr + rows64[:, None] * stride_qm + cols[None, :], x8.to(tl.float8e4nv), mask=in_range[:, None])
    tl.store(s_ptr + rows64 * stride_sm + kb * stride_sk, scale, mask=in_range)


@triton.jit
def _fp8_gemm_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, M, N, K,
                     stride_am, stride_sam, stride_sak, stride_bn, stride_sbn, stride_cm,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """c [M, N] = (a8 · sa) (b8 · sb)ᵀ: a8 [M, K] e4m3 with sa [M, K/128], b8 [N, K] e4m3 (the weight as stored)
    with sb [ceil(N/128), K/128]. One program = one BLOCK_M x BLOCK_N tile of c, K walked 128 at a time.

    Programs run GROUP_M row-tiles at a time per column of tiles, so a weight tile read from memory is reused
    from L2 by GROUP_M programs. Edge tiles (M or N not a multiple of the tile, e.g. kv_a_proj's 576 rows) read
    clamped, valid rows and store only inside c."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    tl.static_assert(128 % BLOCK_N == 0, "a tile's columns must share one row of weight scales")
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.minimum(rows, M - 1).to(tl.int64)
    cols_c = tl.minimum(cols, N - 1).to(tl.int64)
    ks = tl.arange(0, 128)
    a_ptrs = a_ptr + rows_c[:, None] * stride_am + ks[None, :]  # [BLOCK_M, 128]
    b_ptrs = b_ptr + cols_c[None, :] * stride_bn + ks[:, None]  # [128, BLOCK_N]: W [N, K] read K-major
    sa_ptrs = sa_ptr + rows_c * stride_sam  # [BLOCK_M]: one scale per token and K step ...
    sb_ptr = sb_ptr + ((pid_n * BLOCK_N) // 128) * stride_sbn  # ... one per K step for the whole tile

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, 128):  # one 128-wide K step = one scale block
        kb = k0 // 128
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        scale = tl.load(sa_ptrs + kb * stride_sak) * tl.load(sb_ptr + kb)  # [BLOCK_M]
        acc += tl.dot(a, b) * scale[:, None]  # e4m3 x e4m3 on the tensor cores, scaled and summed in fp32
        a_ptrs += 128
        b_ptrs += 128

    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


# --------------------------------------------------------------------------------------------------- host side
@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch settings of `_fp8_gemm_kernel`. BLOCK_K is always 128 (one scale per K step) and
    block_n divides 128 (a tile's columns share one weight scale)."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 4
    group_m: int = 8


def default_gemm_config(M: int, N: int) -> GemmConfig:
    """A starting point by M (the benchmark tries others): decode is memory-bound and wants many small tiles;
    prefill is compute-bound and wants big ones (128 x 128 fills a Hopper warpgroup's MMA)."""
    if M <= 16:
        return GemmConfig(16, 64, 4, 5)
    if M <= 64:
        return GemmConfig(64, 64, 4, 4)
    if M <= 512:
        return GemmConfig(64, 128, 4, 4)
    return GemmConfig(128, 128, 8, 4)


def interpreting() -> bool:
    """Is Triton's CPU interpreter on? (TRITON_INTERPRET=1, set before triton was imported.)"""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(t: torch.Tensor) -> bool:
    """Can the Triton kernels take this tensor: a CUDA tensor, or a CPU tensor under the interpreter."""
    return tl is not None and (t.is_cuda or (interpreting() and t.device.type == "cpu"))


def _require_triton(t: torch.Tensor, what: str) -> None:
    if not triton_runs_on(t):
        why = "Triton is not installed" if tl is None else f"the tensor is on {t.device}"
        raise RuntimeError(f"{what} needs Triton on a CUDA GPU (or TRITON_INTERPRET=1 on CPU), but {why}. "
                           "Use impl='torch' (the reference) instead.")


def _empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer; NaN-filled when POISON is set (for e4m3, the NaN byte 0x7F)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        (out.view(torch.uint8).fill_(0x7F) if dtype == FP8_DTYPE else out.fill_(float("nan")))
    return out


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _check_act(x: torch.Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] % BLOCK or x.shape[-1] == 0:
        raise ValueError(f"act_quant quantises 128 channels per scale, so the last dimension must be a positive "
                         f"multiple of {BLOCK}; got x of shape {tuple(x.shape)}.")
    if not x.is_floating_point() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"act_quant needs a bf16/fp16/fp32 tensor, got {x.dtype}.")


def _act_quant_2d(x: torch.Tensor, pow2_scale: bool = True, col_major_scale: bool = False, rows: int | None = None):
    """Triton act_quant of x [M, K] -> (x8 [rows, K], scale [rows, K/128]), rows = M unless more are asked for
    (then rows M.. are left as allocated); col_major_scale stores the scale as the transpose of a contiguous
    [K/128, rows] tensor (stride 1 along the rows), as torch._scaled_mm wants it."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    M, K = x.shape
    rows = M if rows is None else rows
    x8 = _empty((rows, K), FP8_DTYPE, x.device)
    if col_major_scale:
        scale = _empty((K // BLOCK, rows), torch.float32, x.device).t()
    else:
        scale = _empty((rows, K // BLOCK), torch.float32, x.device)
    if M:
        block_m = 32
        grid = (triton.cdiv(M, block_m), K // BLOCK)
        _act_quant_kernel[grid](x, x8, scale, M, x.stride(0), x8.stride(0), scale.stride(0), scale.stride(1),
                                POW2=pow2_scale, BLOCK_M=block_m)
    return x8, scale


def act_quant(x: torch.Tensor, *, pow2_scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (x8 [..., K] e4m3, scale [..., K/128] fp32): `act_quant_torch`, bit for bit, in one Triton
    kernel where Triton runs (CUDA, or the CPU interpreter); elsewhere the torch reference itself."""
    _check_act(x)
    if not triton_runs_on(x):
        return act_quant_torch(x, pow2_scale=pow2_scale)
    x8, scale = _act_quant_2d(x.reshape(-1, x.shape[-1]), pow2_scale)
    return x8.view(x.shape), scale.view(*x.shape[:-1], x.shape[-1] // BLOCK)


def fp8_gemm(x8: torch.Tensor, sx: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, config: GemmConfig | None = None) -> torch.Tensor:
    """The Triton block-scaled GEMM: x8 [M, K] e4m3 with sx [M, K/128] (any strides), weight [N, K] e4m3 with
    weight_scale_inv [ceil(N/128), K/128] -> [M, N] in out_dtype. `config` overrides the tile choice."""
    _require_triton(x8, "fp8_gemm")
    M, K = x8.shape
    N = weight.shape[0]
    cfg = config or default_gemm_config(M, N)
    out = _empty((M, N), out_dtype, x8.device)
    if M == 0 or N == 0:
        return out
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _fp8_gemm_kernel[grid](
        x8, sx, weight, weight_scale_inv, out, M, N, K,
        x8.stride(0), sx.stride(0), sx.stride(1), weight.stride(0), weight_scale_inv.stride(0), out.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def scaled_mm(x8: torch.Tensor, sx: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
              out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """cuBLAS's block-scaled FP8 GEMM through torch._scaled_mm (Hopper, torch >= 2.9 with CUDA >= 12.9).

    Its layout rules: a row-major [M, K]; b column-major [K, N], which is the stored [N, K] weight transposed (a
    view, no copy); scale_a [M, K/128] with stride 1 along M ("outer-dim-major": `_act_quant_2d(...,
    col_major_scale=True)` writes it so); scale_b [K/128, N/128] = weight_scale_inv transposed (again a view)."""
    if not hasattr(torch, "_scaled_mm"):
        raise RuntimeError(f"torch {torch.__version__} has no torch._scaled_mm; use impl='triton'.")
    return torch._scaled_mm(x8, weight.t(), scale_a=sx, scale_b=weight_scale_inv.t(), out_dtype=out_dtype)


def _check_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> None:
    if weight.dim() != 2 or weight.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_linear needs an e4m3 weight [out_features, in_features], got {weight.dtype} of shape "
                         f"{tuple(weight.shape)}.")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 'no'} features (shape {tuple(x.shape)}) but the weight "
                         f"{tuple(weight.shape)} expects in_features={weight.shape[1]}.")
    if x.device != weight.device or weight_scale_inv.device != weight.device:
        raise ValueError(f"x ({x.device}), weight ({weight.device}) and weight_scale_inv ({weight_scale_inv.device}) "
                         "must be on one device.")
    want = scale_shape(tuple(weight.shape), BLOCK)
    if tuple(weight_scale_inv.shape) != want or weight_scale_inv.dtype != torch.float32:
        raise ValueError(f"weight {tuple(weight.shape)} needs an fp32 weight_scale_inv of shape {want} (one scale "
                         f"per 128x128 block), got {weight_scale_inv.dtype} {tuple(weight_scale_inv.shape)}.")
    _check_act(x)


_SCALED_MM_REFUSED: dict[tuple, str] = {}
SCALED_MM_MIN_M = 16  # below: the Triton kernel (cuBLAS refuses block-scaled FP8 for M = 1, measured on an H200)
SCALED_MM_M_MULTIPLE = 16  # cuBLAS also refused M = 99: M is padded up to a multiple of 16 (the extra rows are
#                            computed from uninitialised activations and dropped; rows of a matmul are independent)


def scaled_mm_rows(m: int) -> int | None:
    """How many rows `fp8_linear` hands torch._scaled_mm for m tokens (padded), or None: use the Triton kernel."""
    if m < SCALED_MM_MIN_M:
        return None
    return -(-m // SCALED_MM_M_MULTIPLE) * SCALED_MM_M_MULTIPLE


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor, *, impl: str = "auto",
               config: GemmConfig | None = None) -> torch.Tensor:
    """y = x · Wᵀ with W kept as stored (weight [N, K] e4m3 + weight_scale_inv [ceil(N/128), K/128] fp32) and x
    [..., K] quantised by act_quant; y [..., N] in x's dtype. K must be a multiple of 128; N need not be.

    impl="auto": decided by shape, up front: the Triton kernel for fewer than SCALED_MM_MIN_M tokens (decode),
    torch._scaled_mm on Hopper otherwise, with the tokens padded to a multiple of SCALED_MM_M_MULTIPLE (shapes
    cuBLAS refuses unpadded). The first time a weight shape (N, K) goes to cuBLAS, its result is checked
    against the Triton kernel's (`_scaled_mm_agrees`): cuBLAS returned wrong numbers, without an error, for
    every K that is not a multiple of 512 on an H200 (torch 2.11, CUDA 13; data/gpu_fp8_checks.txt).
    A shape cuBLAS refuses or gets wrong runs the Triton kernel
    from then on (one warning per process, the shapes and reasons in `_SCALED_MM_REFUSED`). The Triton kernel
    on other FP8 GPUs and under the interpreter, the torch reference elsewhere. "scaled_mm" / "triton" /
    "torch" force one ("scaled_mm" unpadded and unchecked: the benchmark probes which shapes cuBLAS takes)."""
    _check_linear(x, weight, weight_scale_inv)
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    chosen = impl == "auto"
    rows = M
    if chosen:
        rows = scaled_mm_rows(M)
        if not triton_runs_on(x):
            impl = "torch"
        elif (rows is not None and x.is_cuda and _capability(x.device) >= (9, 0) and hasattr(torch, "_scaled_mm")
              and N % 16 == 0 and (rows, N, K, x.dtype) not in _SCALED_MM_REFUSED
              and (N, K, x.dtype) not in _SCALED_MM_REFUSED):
            impl = "scaled_mm"
        else:
            impl = "triton"
    if impl == "torch":
        return fp8_linear_torch(x2, weight, weight_scale_inv).view(*x.shape[:-1], N)
    if impl not in ("scaled_mm", "triton"):
        raise ValueError(f"impl must be 'auto', 'scaled_mm', 'triton' or 'torch', got {impl!r}.")
    _require_triton(x, f"fp8_linear(impl={impl!r})")
    if impl == "scaled_mm":
        x8, sx = _act_quant_2d(x2, col_major_scale=True, rows=rows)  # rows >= M: the extra ones unwritten
        try:
            y = scaled_mm(x8, sx, weight, weight_scale_inv, x.dtype)[:M]
        except RuntimeError as err:
            if not chosen:  # asked for by name: report, do not hide
                raise
            _SCALED_MM_REFUSED[(rows, N, K, x.dtype)] = str(err).splitlines()[0]
            warn_once("torch._scaled_mm refused block-scaled FP8 for some shapes; the Triton kernel runs those "
                      f"(first: x {tuple(x8.shape)} · W {tuple(weight.shape)}: {str(err).splitlines()[0][:120]}).")
            x8, sx = x8[:M], sx[:M]
        else:
            if not chosen or _scaled_mm_agrees(y, x8[:M], sx[:M], weight, weight_scale_inv):
                return y.view(*x.shape[:-1], N)
            x8, sx = x8[:M], sx[:M]
    else:
        x8, sx = _act_quant_2d(x2)
    return fp8_gemm(x8, sx, weight, weight_scale_inv, x.dtype, config).view(*x.shape[:-1], N)


_SCALED_MM_CHECKED: set[tuple] = set()  # weight shapes (N, K, dtype) whose cuBLAS result matched the Triton kernel
SCALED_MM_TOLERANCE = 1e-2  # the same maths in both (e4m3 products, fp32 sums): they differ by bf16 rounding, ~1e-3


def _scaled_mm_agrees(y: torch.Tensor, x8: torch.Tensor, sx: torch.Tensor, weight: torch.Tensor,
                      weight_scale_inv: torch.Tensor) -> bool:
    """Once per weight shape: is cuBLAS's y the Triton kernel's result, up to rounding? A shape that is not goes
    into `_SCALED_MM_REFUSED` (the Triton kernel runs it from then on). Skipped while a CUDA graph is being
    captured (the comparison reads a number back to the host); the warm-up before a capture does it."""
    N, K = weight.shape
    key = (N, K, y.dtype)
    if key in _SCALED_MM_CHECKED or (y.is_cuda and torch.cuda.is_current_stream_capturing()):
        return True
    ref = fp8_gemm(x8, sx, weight, weight_scale_inv, y.dtype).float()
    norm = float(ref.norm())
    if not math.isfinite(norm):  # a NaN or inf token: nothing to compare this time
        return True
    err = float((y.float() - ref).norm()) / max(norm, 1e-30)
    if err <= SCALED_MM_TOLERANCE:
        _SCALED_MM_CHECKED.add(key)
        return True
    _SCALED_MM_REFUSED[key] = f"wrong result: relative difference {err:.2e} from the Triton kernel"
    warn_once(f"torch._scaled_mm gave wrong results for W {tuple(weight.shape)} (relative difference {err:.2e} from "
              "the Triton kernel, no error raised); the Triton kernel runs that shape from now on.")
    return False


_FAST_PATH_BROKEN: list[str] = []


def linear_fast_path(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                     block: int = BLOCK) -> torch.Tensor | None:
    """What `FP8Linear.forward` calls on a GPU: fp8_linear(x, ...) when it applies, else None (the caller then
    dequantises as before). It applies to bf16/fp16 activations outside autograd on a GPU with FP8 tensor cores
    (compute capability >= 8.9), with 128 x 128 weight blocks and in_features a multiple of 128. If the fast path
    ever fails (a Triton or cuBLAS version it was not tested with), it warns once and stays off."""
    if (_FAST_PATH_BROKEN or tl is None or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16)
            or weight.device != x.device
            or block != BLOCK or x.shape[-1] % BLOCK or (x.requires_grad and torch.is_grad_enabled())
            or _capability(x.device) < (8, 9)):
        return None
    if TRITON_PROBLEM is not None:
        warn_once(f"FP8Linear: {TRITON_PROBLEM}; the weight is dequantised instead (same numbers, slower).")
        return None
    try:
        return fp8_linear(x, weight, weight_scale_inv)
    except Exception as err:  # any failure of the fast path must leave the model working
        _FAST_PATH_BROKEN.append(repr(err))
        warn_once(f"the FP8 fast path failed ({err!r}); FP8Linear dequantises its weight from now on.")
        return None
