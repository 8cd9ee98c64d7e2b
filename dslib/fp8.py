"""FP8 e4m3, the number format DeepSeek-V3.2 stores weights, activations and caches in: its constants and the one
quantiser every chapter uses (chapter 1).

An e4m3 number has 4 exponent and 3 mantissa bits; the largest finite one is 448. A group of values shares one
fp32 scale, chosen so that the group's largest magnitude lands on 448:

    scale = amax(group) / 448            rounded up to a power of two, 2^⌈log2(amax / 448)⌉ ("ue8m0" scales)
    q     = e4m3(x / scale)              and back: x ≈ float(q) · scale

The groups: one 128-value tile of the MLA cache (chapter 2), one indexer vector (chapter 3), one 128 x 128 block
of a weight (chapter 5). `FP8_BLOCK` (128) lives in `dslib.config`, which counts cache bytes with it.
"""
from __future__ import annotations

import torch

from dslib.config import FP8_BLOCK

__all__ = ["FP8_DTYPE", "FP8_MAX", "FP8_BLOCK", "act_quant"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value


def act_quant(x: torch.Tensor, *, pow2_scale: bool = True, min_amax: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise to e4m3 with one scale per vector (the last dim): x `[..., n]` -> (q `[..., n]` float8_e4m3fn,
    scale `[..., 1]` fp32), x ≈ float(q) · scale.

    scale = amax / 448, rounded up to a power of two with `pow2_scale` (then a multiply by it is exact);
    amax is floored at `min_amax`, so an all-zero group gets a finite scale. DeepSeek's name for it
    (`act_quant`: activations, 128 values per scale); blocks of a weight are quantised as flattened vectors.
    """
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=min_amax)
    scale = amax / FP8_MAX
    if pow2_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale
