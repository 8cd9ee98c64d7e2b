"""Rotary position embeddings (RoPE) in DeepSeek-V3.2's two layouts, with the YaRN frequency correction (chapter 2).

RoPE encodes the position p of a token by rotating pairs of query/key dimensions by angles p * freq_i. A dot
product of a rotated query (position p) and a rotated key (position s) then depends on p - s only.

DeepSeek-V3.2 rotates only `qk_rope_head_dim` = 64 dimensions per head, in two different pairings
(REFERENCE.md §2.4):

- MLA (`q_rope`, `k_rope`): **interleaved** pairs (x[2i], x[2i+1]), the layout of DeepSeek's `inference/model.py`.
- Lightning indexer (chapter 3): **half-split** pairs (x[i], x[i + d/2]), "rotate_half" / NeoX style.

Long context comes from YaRN (REFERENCE.md §2.3): the slowest-turning frequencies are divided by
`factor` (40), the fastest are kept, the ones in between are blended, and the softmax scale grows by mscale².
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dslib.config import ConfigError, ModelConfig

__all__ = [
    "rope_inv_freq",
    "yarn_correction_range",
    "yarn_mscale",
    "softmax_scale",
    "RotaryEmbedding",
    "apply_rope_interleaved",
    "apply_rope_half",
]


def _yarn_params(cfg: ModelConfig) -> dict | None:
    """The YaRN settings of `cfg` (with DeepSeek's defaults filled in), or None for plain RoPE."""
    scaling = cfg.rope_scaling
    if not scaling:
        return None
    kind = scaling.get("type", scaling.get("rope_type", "default"))
    if kind in (None, "default"):
        return None
    if kind != "yarn":
        raise ConfigError(f"rope_scaling type {kind!r} is not supported; use 'yarn' or null (plain RoPE).")
    params = {
        "factor": float(scaling.get("factor", 40.0)),
        "original_max_position_embeddings": int(scaling.get("original_max_position_embeddings", 4096)),
        "beta_fast": float(scaling.get("beta_fast") or 32),
        "beta_slow": float(scaling.get("beta_slow") or 1),
        "mscale": float(scaling.get("mscale", 1.0)),
        "mscale_all_dim": float(scaling.get("mscale_all_dim", scaling.get("mscale", 1.0))),
    }
    if params["mscale"] != params["mscale_all_dim"]:
        # transformers would then rescale cos/sin by mscale(factor, mscale) / mscale(factor, mscale_all_dim);
        # DeepSeek's reference never does. Both agree only when the two are equal (REFERENCE.md §9.2, item 3).
        raise ConfigError(
            f"rope_scaling has mscale={params['mscale']} but mscale_all_dim={params['mscale_all_dim']}: dslib "
            "follows DeepSeek's reference, which never rescales cos/sin. Set both to the same value "
            "(DeepSeek-V3.2 uses 1.0 for both)."
        )
    return params


def yarn_correction_range(cfg: ModelConfig) -> tuple[int, int]:
    """(low, high): frequency indices where YaRN's blend ramp starts and ends (REFERENCE.md §2.3).

    d(r) = dim * ln(L_orig / (2π r)) / (2 ln θ) is the index whose wavelength fits r times into the original
    context L_orig; low = floor(d(beta_fast)), high = ceil(d(beta_slow)), clamped to [0, dim - 1].
    For the 671B config: (10, 23).
    """
    params = _yarn_params(cfg)
    if params is None:
        raise ConfigError("yarn_correction_range needs a config with rope_scaling type 'yarn'.")
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    orig = params["original_max_position_embeddings"]

    def index_for(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = math.floor(index_for(params["beta_fast"]))
    high = math.ceil(index_for(params["beta_slow"]))
    return max(low, 0), min(high, dim - 1)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotation frequency of each of the `qk_rope_head_dim // 2` pairs, fp32 `[rope_dim // 2]`.

    Plain RoPE: θ_i = rope_theta^(-2i / rope_dim). Under YaRN:
    freq_i = (1 - r_i) θ_i + r_i θ_i / factor with the ramp r_i = clamp((i - low) / (high - low), 0, 1),
    so fast dims (i <= low) keep θ_i and slow dims (i >= high) are slowed down by `factor`.
    The same arithmetic (and order of fp32 operations) as transformers' `_compute_yarn_parameters`.
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    # Always on the CPU in fp32 (also under a `meta` device context): the table is tiny and must be exact.
    wavelength = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)  # [dim/2], 1 / θ_i
    theta = 1.0 / wavelength
    params = _yarn_params(cfg)
    if params is None:
        return theta
    low, high = yarn_correction_range(cfg)
    if low == high:
        high += 0.001  # avoid dividing by zero when the ramp collapses to a step
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)  # r_i
    slowed = 1.0 / (params["factor"] * wavelength)  # θ_i / factor
    keep = 1 - ramp  # share of the original frequency (written like transformers for bit-equal fp32 results)
    return slowed * (1 - keep) + theta * keep


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(cfg: ModelConfig) -> float:
    """The factor on q·k before the softmax: qk_head_dim^-1/2, times mscale² under YaRN (REFERENCE.md §2.5).

    The 671B config: 192^-1/2 * (0.1 ln 40 + 1)² = 0.135234 (0.072169 without YaRN).
    """
    scale = cfg.qk_head_dim ** -0.5
    params = _yarn_params(cfg)
    if params is not None:
        m = yarn_mscale(params["factor"], params["mscale_all_dim"])
        scale = scale * m * m
    return scale


class RotaryEmbedding(nn.Module):
    """Turns absolute positions into the (cos, sin) of every rotation angle φ[p, i] = p * freq_i.

    `forward(positions)`: positions int64 `[T]` or `[B, T]` -> (cos, sin), fp32, each `[T, rope_dim // 2]` or
    `[B, T, rope_dim // 2]`. cos/sin are not rescaled (attention_factor 1, as in DeepSeek's reference).
    The frequency table is derived from the config, so it is neither a parameter nor a buffer: it never enters a
    checkpoint, and `model.to(torch.bfloat16)` cannot round it (it stays fp32 and follows the positions' device).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.rope_dim = cfg.qk_rope_head_dim
        self.max_position_embeddings = cfg.max_position_embeddings
        self.inv_freq = rope_inv_freq(cfg)  # fp32 [rope_dim // 2], on the CPU until first used elsewhere

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dtype.is_floating_point or positions.dim() not in (1, 2):
            raise ValueError(
                f"positions must be an integer tensor [T] or [B, T], got dtype {positions.dtype} and shape "
                f"{tuple(positions.shape)}. Use torch.arange(T) for a sequence that starts at position 0."
            )
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        # fp32 even for bf16 models: angles p * freq reach 1e5 radians, where bf16 would lose every digit.
        angles = positions.float()[..., None] * self.inv_freq  # [..., T, rope_dim // 2]
        return angles.cos(), angles.sin()


def _broadcast_cos_sin(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Reshape cos/sin `[T, n]` or `[B, T, n]` so that they broadcast against x `[B, T, ..., 2n]`."""
    pairs = cos.shape[-1]
    if x.dim() < 3:
        raise ValueError(f"x must be [B, T, ..., rope_dim], got shape {tuple(x.shape)}.")
    if x.shape[-1] != 2 * pairs:
        raise ValueError(
            f"x has {x.shape[-1]} dims in its last axis but cos/sin have {pairs} angles: RoPE needs last dim == "
            f"2 * cos.shape[-1]. Pass only the rope slice of the head (qk_rope_head_dim dims)."
        )
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape.")
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]  # [1, T, n]
    if cos.dim() != 3 or cos.shape[1] != x.shape[1] or cos.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"cos/sin of shape {tuple(cos.shape)} do not fit x of shape {tuple(x.shape)}: expected [T, n] or "
            f"[B, T, n] with T = {x.shape[1]} (the positions of x's tokens) and B = {x.shape[0]}."
        )
    extra = x.dim() - 3  # dims between T and the last one, e.g. heads
    shape = (cos.shape[0], cos.shape[1]) + (1,) * extra + (pairs,)
    return cos.reshape(shape), sin.reshape(shape)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[2i], x[2i+1]) by angle φ_i (MLA's layout; sources: docs/references.md).

    x'[2i]   = x[2i] cos φ_i - x[2i+1] sin φ_i
    x'[2i+1] = x[2i] sin φ_i + x[2i+1] cos φ_i
    x: `[B, T, ..., rope_dim]`; cos, sin: `[T, rope_dim/2]` or `[B, T, rope_dim/2]`. Computed in fp32, returned
    in x's dtype and in the same interleaved layout (DeepSeek's `pe_cache` order, not transformers' [even | odd]).
    """
    cos, sin = _broadcast_cos_sin(x, cos, sin)
    xf = x.float()
    even, odd = xf[..., 0::2], xf[..., 1::2]  # [..., rope_dim/2] each
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)  # [..., rope_dim/2, 2]
    return rotated.flatten(-2).to(x.dtype)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[i], x[i + d/2]) by angle φ_i (the lightning indexer's layout, REFERENCE.md §2.4).

    x'[i]       = x[i] cos φ_i - x[i+d/2] sin φ_i
    x'[i+d/2]   = x[i] sin φ_i + x[i+d/2] cos φ_i
    Same shapes and dtype rules as `apply_rope_interleaved`.
    """
    half = x.shape[-1] // 2
    cos, sin = _broadcast_cos_sin(x, cos, sin)
    xf = x.float()
    first, second = xf[..., :half], xf[..., half:]
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1).to(x.dtype)
