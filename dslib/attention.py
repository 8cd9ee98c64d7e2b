"""A small baseline decoder with multi-head / grouped-query attention (chapter 1).

Also holds `RMSNorm`, the normalisation every later chapter uses.
"""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm(x) = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back (REFERENCE.md §2.1)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x).to(dtype)
