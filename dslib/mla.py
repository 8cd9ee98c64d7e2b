"""Multi-head Latent Attention (MLA), DeepSeek-V3.2's attention, with its latent KV cache (chapter 2).

Instead of caching a key and a value for every head, MLA caches one compressed vector per token:

    kv_latent = RMSNorm(W_DKV h)[:kv_lora_rank]        # c^KV, 512 values, shared by all heads
    k_rope    = RoPE(W_DKV h)[kv_lora_rank:]           # k^R, 64 values, one rotated key shared by all heads

that is 512 + 64 = 576 values per token per layer (REFERENCE.md §2, §3). The per-head keys and values are
linear images of the latent: [k_nope_i | v_i] = W_UKV[i] c^KV (`kv_b_proj`). Two ways to compute attention:

- naive / MHA mode: up-project every cached latent to per-head keys and values, then ordinary attention;
- absorbed / MQA mode: fold W_UK into the query and W_UV after attention and attend over the 576-wide latents
  directly (one shared key and value for all heads): q_nope·(W_UK c) = (W_UKᵀ q_nope)·c.

Both give the same numbers (tested); absorbed is what decoding uses, because it reads only 576 values per token.
Parameter names are the official checkpoint's (`q_a_proj`, ..., `o_proj`); `load_weights` loads any module strictly.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dslib.attention import RMSNorm
from dslib.config import ModelConfig
from dslib.rope import RotaryEmbedding, apply_rope_interleaved, softmax_scale

__all__ = [
    "LatentCache",
    "MLA",
    "load_weights",
    "WeightLoadError",
    "causal_allowed",
    "attention_flops",
    "kv_bytes_read",
    "decode_costs",
    "decode_step_time",
    "fp8_pack_latent",
    "fp8_unpack_latent",
    "MLAStack",
]

MODES = ("absorbed", "naive")


# --------------------------------------------------------------------------------------------- the latent cache
class LatentCache:
    """One layer's MLA cache: `kv_latent [B, S, kv_lora_rank]` (normalised c^KV) and `k_rope [B, S, rope]`
    (already rotated). That is all MLA ever needs from past tokens.

    `append(kv_latent, k_rope)` adds T new tokens and returns the whole cache (views, no copy). Storage grows
    by doubling (or is allocated once for `max_len` tokens); `nbytes` counts the bytes of the cached tokens.
    """

    def __init__(self, max_len: int | None = None):
        if max_len is not None and (not isinstance(max_len, int) or max_len <= 0):
            raise ValueError(f"max_len must be a positive int or None, got {max_len!r}.")
        self.max_len = max_len
        self._latent: torch.Tensor | None = None  # [B, capacity, kv_lora_rank]
        self._rope: torch.Tensor | None = None  # [B, capacity, rope]
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        if self._latent is None:
            return f"LatentCache(empty, max_len={self.max_len})"
        b, _, c = self._latent.shape
        return f"LatentCache(batch={b}, tokens={self._len}, latent={c}, rope={self._rope.shape[-1]}, nbytes={self.nbytes})"

    @property
    def kv_latent(self) -> torch.Tensor:
        """`[B, S, kv_lora_rank]`, the normalised latents of the S cached tokens."""
        self._require_data()
        return self._latent[:, : self._len]

    @property
    def k_rope(self) -> torch.Tensor:
        """`[B, S, qk_rope_head_dim]`, the rotated shared rope keys of the S cached tokens."""
        self._require_data()
        return self._rope[:, : self._len]

    @property
    def nbytes(self) -> int:
        """Bytes held for the cached tokens: B * S * (kv_lora_rank + qk_rope_head_dim) * element size."""
        if self._latent is None:
            return 0
        b = self._latent.shape[0]
        per_token = self._latent.shape[-1] * self._latent.element_size() + self._rope.shape[-1] * self._rope.element_size()
        return b * self._len * per_token

    def reset(self) -> None:
        """Forget every token (keeps nothing allocated)."""
        self._latent = self._rope = None
        self._len = 0

    def _require_data(self) -> None:
        if self._latent is None:
            raise RuntimeError("The cache is empty: append(kv_latent, k_rope) first (MLA.forward does it).")

    def append(self, kv_latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add T tokens: kv_latent `[B, T, kv_lora_rank]`, k_rope `[B, T, rope]`.
        Returns (all_latent `[B, S, kv_lora_rank]`, all_k_rope `[B, S, rope]`) with S = old length + T."""
        if kv_latent.dim() != 3 or k_rope.dim() != 3 or kv_latent.shape[:2] != k_rope.shape[:2]:
            raise ValueError(
                f"append expects kv_latent [B, T, kv_lora_rank] and k_rope [B, T, rope] with the same B and T, got "
                f"{tuple(kv_latent.shape)} and {tuple(k_rope.shape)}."
            )
        b, t = kv_latent.shape[:2]
        if self._latent is not None:
            expected = (self._latent.shape[0], self._latent.shape[2], self._rope.shape[2])
            if (b, kv_latent.shape[2], k_rope.shape[2]) != expected:
                raise ValueError(
                    f"This cache holds batch {expected[0]}, latent {expected[1]}, rope {expected[2]}; got batch {b}, "
                    f"latent {kv_latent.shape[2]}, rope {k_rope.shape[2]}. Use one LatentCache per layer and per batch."
                )
            if kv_latent.dtype != self._latent.dtype or kv_latent.device != self._latent.device:
                raise ValueError(
                    f"This cache holds {self._latent.dtype} on {self._latent.device}; got {kv_latent.dtype} on "
                    f"{kv_latent.device}. Keep the model in one dtype/device while decoding."
                )
        new_len = self._len + t
        if self.max_len is not None and new_len > self.max_len:
            raise ValueError(
                f"Appending {t} tokens to a cache of {self._len} exceeds max_len={self.max_len}. Create the cache "
                f"with a larger max_len (or None to grow freely), or shorten the sequence."
            )
        self._reserve(new_len, kv_latent, k_rope)
        self._latent[:, self._len : new_len] = kv_latent
        self._rope[:, self._len : new_len] = k_rope
        self._len = new_len
        return self.kv_latent, self.k_rope

    def _reserve(self, needed: int, kv_latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        capacity = 0 if self._latent is None else self._latent.shape[1]
        if needed <= capacity:
            return
        # Pre-allocate (max_len) or double, so decoding T tokens costs O(T) copies, not O(T²).
        new_cap = self.max_len if self.max_len is not None else max(needed, 2 * capacity, 16)
        b = kv_latent.shape[0]
        latent = kv_latent.new_empty(b, new_cap, kv_latent.shape[-1])
        rope = k_rope.new_empty(b, new_cap, k_rope.shape[-1])
        if self._latent is not None:
            latent[:, : self._len] = self._latent[:, : self._len]
            rope[:, : self._len] = self._rope[:, : self._len]
        self._latent, self._rope = latent, rope


# --------------------------------------------------------------------------------------------- masking
def causal_allowed(q_positions: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Bool `[B or 1, T, S]`: key s (at position s) is visible to a query at position p iff s <= p."""
    if q_positions.dim() == 1:
        q_positions = q_positions[None]  # [1, T]
    keys = torch.arange(num_keys, device=q_positions.device)
    return keys[None, None, :] <= q_positions[..., None]


# --------------------------------------------------------------------------------------------- the module
class MLA(nn.Module):
    """Multi-head Latent Attention of DeepSeek-V3.2 (REFERENCE.md §2), parameters named as in the checkpoint.

    forward(h [B, T, d], positions=None, cache=None, mode="absorbed", mask=None) -> [B, T, d]
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        d, H = cfg.hidden_size, cfg.num_attention_heads
        self.num_heads = H
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.softmax_scale = softmax_scale(cfg)

        # Queries: down to a q_lora_rank latent (normalised), then up to H heads of [nope | rope].
        # The norms use eps 1e-6 like DeepSeek's reference and transformers (not cfg.rms_norm_eps).
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * self.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(d, H * self.qk_head_dim, bias=False)
        # Keys/values: down to [latent | rope] (the only thing cached), then up to H heads of [k_nope | v].
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (self.nope_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, d, bias=False)
        self.rotary = RotaryEmbedding(cfg)

    # ----------------------------------------------------------------------------------- weight views
    def w_uk(self) -> torch.Tensor:
        """W_UK `[H, nope, kv_lora_rank]`: per head, the rows of kv_b_proj that make k_nope from the latent."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim]

    def w_uv(self) -> torch.Tensor:
        """W_UV `[H, v_head_dim, kv_lora_rank]`: per head, the rows of kv_b_proj that make v from the latent."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, self.nope_dim :]

    # ----------------------------------------------------------------------------------- projections
    def project_q(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """h `[B, T, d]` -> (q_latent `[B, T, q_lora_rank]`, q_nope `[B, T, H, nope]`, q_rope `[B, T, H, rope]`).

        q_latent = q_a_layernorm(q_a_proj(h)) (c^Q; the chapter-3 indexer reuses it; h itself when q_lora_rank is
        null). q = q_b_proj(q_latent) per head [nope | rope] (nope first); the rope part is rotated (interleaved).
        """
        B, T, _ = h.shape
        if self.q_lora_rank:
            q_latent = self.q_a_layernorm(self.q_a_proj(h))  # [B, T, q_lora_rank]
            q = self.q_b_proj(q_latent)
        else:
            q_latent = h
            q = self.q_proj(h)
        q = q.view(B, T, self.num_heads, self.qk_head_dim)  # [B, T, H, nope + rope]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_latent, q_nope, apply_rope_interleaved(q_rope, cos, sin)

    def project_kv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """h `[B, T, d]` -> (kv_latent `[B, T, kv_lora_rank]`, k_rope `[B, T, rope]`): what the cache stores.

        [c_raw | k_rope_raw] = kv_a_proj_with_mqa(h); kv_latent = kv_a_layernorm(c_raw); k_rope = RoPE(k_rope_raw).
        """
        kv = self.kv_a_proj_with_mqa(h)  # [B, T, kv_lora_rank + rope]
        kv_latent, k_rope = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(kv_latent), apply_rope_interleaved(k_rope, cos, sin)

    def expand_kv(self, kv_latent: torch.Tensor, k_rope: torch.Tensor):
        """Naive mode's up-projection: latents -> per-head keys `[B, S, H, nope + rope]` and values
        `[B, S, H, v_head_dim]`. k = [W_UK_i c | k_rope] (k_rope copied to every head), v = W_UV_i c."""
        B, S, _ = kv_latent.shape
        kv = self.kv_b_proj(kv_latent).view(B, S, self.num_heads, self.nope_dim + self.v_head_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_head_dim], dim=-1)
        k_rope = k_rope[:, :, None, :].expand(B, S, self.num_heads, self.rope_dim)
        return torch.cat([k_nope, k_rope], dim=-1), v

    # ----------------------------------------------------------------------------------- attention
    def attend(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        kv_latent: torch.Tensor,
        k_rope: torch.Tensor,
        q_positions: torch.Tensor,
        *,
        mode: str = "absorbed",
        mask: torch.Tensor | None = None,
        return_probs: bool = False,
        check_positions: bool = True,
    ):
        """Attention of T queries over S cached keys (keys are positions 0..S-1) -> `[B, T, H, v_head_dim]`.

        q_nope `[B, T, H, nope]`, q_rope `[B, T, H, rope]` (rotated), kv_latent `[B, S, kv_lora_rank]`,
        k_rope `[B, S, rope]` (rotated), q_positions int64 `[T]` or `[B, T]`. Causal by position (key s visible to
        the query at position p iff s <= p), AND-ed with `mask` (bool `[B, T, S]`, True = may attend) if given.
        mode "naive" (MHA: per-head K/V from `expand_kv`) or "absorbed" (MQA over the latents); same result.
        With `return_probs=True` also returns the attention probabilities `[B, H, T, S]`.
        `check_positions=False` skips the check that every query has its own key (it reads q_positions back from
        the device, a sync per call); `forward` skips it when it made the positions itself.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        B, T, H, _ = q_nope.shape
        S = kv_latent.shape[1]
        if kv_latent.shape[0] != B or k_rope.shape[:2] != kv_latent.shape[:2]:
            raise ValueError(
                f"queries have batch {B} but kv_latent {tuple(kv_latent.shape)} / k_rope {tuple(k_rope.shape)} "
                "do not match it (expected [B, S, kv_lora_rank] and [B, S, rope])."
            )
        if check_positions and q_positions.numel() and int(q_positions.max()) >= S:
            raise ValueError(
                f"A query sits at position {int(q_positions.max())} but only {S} keys (positions 0..{S - 1}) were "
                "given: append the new tokens' latents to the cache before attending (MLA.forward does it)."
            )
        allowed = causal_allowed(q_positions, S)  # [B or 1, T, S]
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape[-2:] != (T, S):
                raise ValueError(
                    f"mask must be bool [B, T, S] = [{B}, {T}, {S}] (True = may attend), got {mask.dtype} "
                    f"{tuple(mask.shape)}."
                )
            allowed = allowed & mask
        if mode == "naive":
            scores, v = self._naive_scores(q_nope, q_rope, kv_latent, k_rope)
        else:
            scores = self._absorbed_scores(q_nope, q_rope, kv_latent, k_rope)
        scores = scores.float().masked_fill(~allowed[:, None], float("-inf"))  # [B, H, T, S]
        probs = F.softmax(scores, dim=-1).to(q_nope.dtype)
        if mode == "naive":
            out = torch.einsum("bhts,bshv->bthv", probs, v)  # [B, T, H, v_head_dim]
        else:
            # Weighted sum of the shared latents per head, then W_UV lifts each head's 512-d result to v_head_dim.
            latent_out = torch.einsum("bhts,bsc->bthc", probs, kv_latent)  # [B, T, H, kv_lora_rank]
            out = torch.einsum("bthc,hvc->bthv", latent_out, self.w_uv())  # [B, T, H, v_head_dim]
        return (out, probs) if return_probs else out

    def _naive_scores(self, q_nope, q_rope, kv_latent, k_rope):
        """MHA mode: materialise per-head keys/values, then q·k. scores `[B, H, T, S]`, v `[B, S, H, v]`."""
        k, v = self.expand_kv(kv_latent, k_rope)  # [B, S, H, nope + rope], [B, S, H, v_head_dim]
        q = torch.cat([q_nope, q_rope], dim=-1)  # [B, T, H, nope + rope]
        return torch.einsum("bthd,bshd->bhts", q, k) * self.softmax_scale, v

    def _absorbed_scores(self, q_nope, q_rope, kv_latent, k_rope):
        """MQA mode: q_absorbed = W_UKᵀ q_nope per head, then one shared 576-d key [c^KV | k_rope] for all heads."""
        q_absorbed = torch.einsum("bthd,hdc->bthc", q_nope, self.w_uk())  # [B, T, H, kv_lora_rank]
        scores = torch.einsum("bthc,bsc->bhts", q_absorbed, kv_latent)  # content part
        scores = scores + torch.einsum("bthr,bsr->bhts", q_rope, k_rope)  # position part
        return scores * self.softmax_scale

    def check_input(self, h: torch.Tensor, start: int, positions: torch.Tensor | None):
        """Check h `[B, T, d]`; default positions to start + arange(T); reject positions past the context.

        Returns (positions, given): `given` says whether the caller passed positions (reading them back to check
        them costs a device sync, so `attend` re-checks only those)."""
        if h.dim() != 3 or h.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"h must be [B, T, hidden_size={self.cfg.hidden_size}], got {tuple(h.shape)}.")
        T = h.shape[1]
        given = positions is not None
        last = int(positions.max()) if given else start + T - 1
        if last >= self.cfg.max_position_embeddings:
            raise ValueError(
                f"position {last} is beyond max_position_embeddings={self.cfg.max_position_embeddings}. Shorten the "
                "sequence or use a config with a longer context."
            )
        if not given:
            positions = torch.arange(start, start + T, device=h.device)
        return positions, given

    def forward(
        self,
        h: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        mode: str = "absorbed",
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """h `[B, T, d]` -> `[B, T, d]`. positions default to len(cache) + arange(T); the new tokens' latents are
        appended to `cache` when one is given (decode token by token or prefill in chunks)."""
        positions, given = self.check_input(h, len(cache) if cache is not None else 0, positions)
        B, T, _ = h.shape
        cos, sin = self.rotary(positions)
        _, q_nope, q_rope = self.project_q(h, cos, sin)
        kv_latent, k_rope = self.project_kv(h, cos, sin)
        if cache is not None:
            kv_latent, k_rope = cache.append(kv_latent, k_rope)  # [B, S, kv_lora_rank], [B, S, rope]
        out = self.attend(q_nope, q_rope, kv_latent, k_rope, positions, mode=mode, mask=mask, check_positions=given)
        return self.o_proj(out.reshape(B, T, self.num_heads * self.v_head_dim))

    def attention_probs(self, h: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Attention probabilities `[B, H, T, T]` of a prefill of h `[B, T, d]` (for pictures; no cache)."""
        B, T, _ = h.shape
        positions = torch.arange(T, device=h.device) if positions is None else positions
        cos, sin = self.rotary(positions)
        _, q_nope, q_rope = self.project_q(h, cos, sin)
        kv_latent, k_rope = self.project_kv(h, cos, sin)
        return self.attend(q_nope, q_rope, kv_latent, k_rope, positions, return_probs=True)[1]


# --------------------------------------------------------------------------------------------- loading weights
class WeightLoadError(ValueError):
    """A state dict that does not fit a module: the message names each tensor and says what to check."""


def load_weights(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, prefix: str = "") -> nn.Module:
    """Copy `state_dict[prefix + name]` into every parameter/buffer `name` of `module.state_dict()`, strictly.

    Every expected tensor must be present with exactly the expected shape, and no key under `prefix` may be left
    over; otherwise `WeightLoadError` names the tensors (expected vs got shape) and what to check. Values are cast
    to each parameter's dtype. The given state dict is never modified. Returns `module`.
    """
    expected = module.state_dict()
    problems: list[str] = []
    missing = [name for name in expected if prefix + name not in state_dict]
    unexpected = [k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] not in expected]
    for name in missing:
        hint = ""
        elsewhere = [k for k in state_dict if k.endswith("." + name) or k == name]
        if elsewhere:
            hint = f" (found {elsewhere[0]!r}: is the prefix {elsewhere[0][: -len(name)]!r}?)"
        problems.append(f"missing tensor {prefix + name!r}, expected shape {tuple(expected[name].shape)}{hint}")
    for key in unexpected:
        problems.append(f"unexpected tensor {key!r} of shape {tuple(getattr(state_dict[key], 'shape', ()))}")
    for name, target in expected.items():
        key = prefix + name
        if key not in state_dict:
            continue
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key!r} is a {type(value).__name__}, not a tensor")
        elif value.shape != target.shape:
            problems.append(f"{key!r} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
    if problems:
        what = type(module).__name__
        cfg = getattr(module, "cfg", None)
        check = (
            "Check that the checkpoint was made for this architecture and that the config the module was built "
            "from matches the checkpoint's config.json (hidden_size, num_attention_heads, q_lora_rank, "
            "kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, ...), and that `prefix` is right."
        )
        if cfg is not None:
            check += f" The module was built with {type(cfg).__name__}(hidden_size={getattr(cfg, 'hidden_size', '?')}, ...)."
        raise WeightLoadError(
            f"Cannot load weights into {what}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems) + "\n" + check
        )
    params = dict(module.named_parameters())
    params.update(dict(module.named_buffers()))
    with torch.no_grad():
        for name in expected:
            params[name].copy_(state_dict[prefix + name])  # copy_ casts to the parameter's dtype and device
    return module


# --------------------------------------------------------------------------------------------- accounting
def attention_flops(cfg: ModelConfig, num_queries: int, num_keys: int, mode: str) -> dict[str, int]:
    """Matmul FLOPs (2 per multiply-add) of `MLA.attend` for one sequence, per term; "total" sums them.

    naive: up-project S latents (2·S·c·H·(nope+v)), q·k (2·H·T·S·(nope+rope)), p·v (2·H·T·S·v).
    absorbed: fold W_UK into q (2·T·H·nope·c), q·[c | k_rope] (2·H·T·S·(c+rope)), p·c (2·H·T·S·c),
    W_UV after attention (2·T·H·c·v). c = kv_lora_rank. Softmax and masking are not matmuls and are not counted.
    """
    H, c, nope, rope, v = (cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim,
                           cfg.qk_rope_head_dim, cfg.v_head_dim)
    T, S = num_queries, num_keys
    if mode == "naive":
        terms = {
            "expand_kv": 2 * S * c * H * (nope + v),
            "scores": 2 * H * T * S * (nope + rope),
            "weighted_sum": 2 * H * T * S * v,
        }
    elif mode == "absorbed":
        terms = {
            "absorb_q": 2 * T * H * nope * c,
            "scores": 2 * H * T * S * (c + rope),
            "weighted_sum": 2 * H * T * S * c,
            "absorb_out": 2 * T * H * c * v,
        }
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    terms["total"] = sum(terms.values())
    return terms


def kv_bytes_read(cfg: ModelConfig, num_keys: int, mode: str, *, dtype_bytes: int = 2) -> int:
    """Bytes of keys and values one decode step's attention reads per layer.

    absorbed: the latent cache itself, S·(kv_lora_rank + rope)·bytes (1,152 B per token in bf16 for the 671B).
    naive: per-head keys and values, S·H·(nope + rope + v)·bytes (81,920 B per token): what an MHA-mode engine
    would have to cache, or rebuild from the latents at every step.
    """
    if mode == "absorbed":
        return num_keys * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes
    if mode == "naive":
        return num_keys * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * dtype_bytes
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")


def decode_costs(cfg: ModelConfig, context_len: int, *, gqa_groups: int = 8, dtype_bytes: int = 2) -> dict[str, dict]:
    """Cache and compute of decoding one token at `context_len`, whole model, per attention scheme.

    For each of MHA (every head caches K and V), GQA with `gqa_groups` K/V heads of v_head_dim, MLA (bf16 latent
    cache, absorbed mode) and MLA with FlashMLA's FP8 cache: bytes per token per layer, cache bytes of one sequence
    (all layers), attention FLOPs per decoded token (all layers; MHA/GQA: 2·H·S·(d_k + d_v)), and the cache ratio
    against MHA and GQA. Pure arithmetic on `cfg` (the chapter's calculator).
    """
    H, S, L = cfg.num_attention_heads, context_len, cfg.num_hidden_layers
    mla_flops = attention_flops(cfg, 1, S, "absorbed")["total"]
    rows = {
        "MHA": (cfg.kv_bytes_per_token_per_layer("mha", dtype_bytes=dtype_bytes), 2 * H * S * (cfg.qk_head_dim + cfg.v_head_dim)),
        f"GQA-{gqa_groups}": (
            cfg.kv_bytes_per_token_per_layer("gqa", dtype_bytes=dtype_bytes, kv_heads=gqa_groups),
            2 * H * S * 2 * cfg.v_head_dim,
        ),
        "MLA": (cfg.kv_bytes_per_token_per_layer("mla", dtype_bytes=dtype_bytes), mla_flops),
        "MLA FP8": (cfg.kv_bytes_per_token_per_layer("mla_fp8"), mla_flops),
    }
    mha_bytes, gqa_bytes = rows["MHA"][0], rows[f"GQA-{gqa_groups}"][0]
    return {
        name: {
            "bytes_per_token_per_layer": per_token,
            "cache_bytes": per_token * L * S,
            "flops_per_token": flops * L,
            "vs_mha": mha_bytes / per_token,
            "vs_gqa": gqa_bytes / per_token,
        }
        for name, (per_token, flops) in rows.items()
    }


@torch.no_grad()
def decode_step_time(mla: MLA, num_keys: int, mode: str, *, batch: int = 1, repeats: int = 5,
                     reduce: str = "median", threads: int | None = None) -> float:
    """Wall time (s) of `mla.attend` for one new token over `num_keys` cached latents (random data).

    `reduce`: "median" of `repeats` runs, or "min" (best of `repeats`: on a shared machine the least disturbed).
    `threads`: run with this many intra-op threads (restored afterwards); one thread avoids waiting on a busy core.
    """
    if reduce not in ("median", "min"):
        raise ValueError(f"reduce must be 'median' or 'min', got {reduce!r}.")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _time_attend(mla, num_keys, mode, batch, repeats, reduce)
    finally:
        torch.set_num_threads(before)


def _time_attend(mla: MLA, num_keys: int, mode: str, batch: int, repeats: int, reduce: str) -> float:
    p = next(mla.parameters())
    cfg = mla.cfg
    H = cfg.num_attention_heads
    q_nope = torch.randn(batch, 1, H, cfg.qk_nope_head_dim, dtype=p.dtype, device=p.device)
    q_rope = torch.randn(batch, 1, H, cfg.qk_rope_head_dim, dtype=p.dtype, device=p.device)
    kv_latent = torch.randn(batch, num_keys, cfg.kv_lora_rank, dtype=p.dtype, device=p.device)
    k_rope = torch.randn(batch, num_keys, cfg.qk_rope_head_dim, dtype=p.dtype, device=p.device)
    pos = torch.tensor([num_keys - 1], device=p.device)
    mla.attend(q_nope, q_rope, kv_latent, k_rope, pos, mode=mode)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mla.attend(q_nope, q_rope, kv_latent, k_rope, pos, mode=mode)
        times.append(time.perf_counter() - start)
    return statistics.median(times) if reduce == "median" else min(times)


# --------------------------------------------------------------------------------------------- FP8 cache format
FP8_TILE = 128  # one fp32 scale per 128 latent values (FlashMLA)
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_pack_latent(kv_latent: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
    """FlashMLA's FP8 cache entry (docs/references.md): bytes `[B, S, c + 4·⌈c/128⌉ + 2·rope]` (656 for the 671B).

    Per token: c e4m3 latent values | one fp32 scale per 128-value tile | the rope key in bf16 (kept precise).
    scale = 2^⌈log2(amax / 448)⌉ (a power of two, "ue8m0"), stored value = x / scale.
    """
    B, S, c = kv_latent.shape
    tiles = -(-c // FP8_TILE)
    x = F.pad(kv_latent.float(), (0, tiles * FP8_TILE - c)).view(B, S, tiles, FP8_TILE)
    amax = x.abs().amax(-1, keepdim=True).clamp_min(1e-4)  # [B, S, tiles, 1]
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(B, S, -1)[..., :c]
    parts = [
        q.contiguous().view(torch.uint8),  # [B, S, c]
        scale.view(B, S, tiles).contiguous().view(torch.uint8),  # [B, S, 4 * tiles]
        k_rope.to(torch.bfloat16).contiguous().view(torch.uint8),  # [B, S, 2 * rope]
    ]
    return torch.cat(parts, dim=-1)


def fp8_unpack_latent(packed: torch.Tensor, kv_lora_rank: int, rope_dim: int, dtype=torch.float32):
    """Inverse of `fp8_pack_latent`: bytes `[B, S, 656]` -> (kv_latent `[B, S, c]`, k_rope `[B, S, rope]`) in dtype."""
    c, tiles = kv_lora_rank, -(-kv_lora_rank // FP8_TILE)
    expected = c + 4 * tiles + 2 * rope_dim
    if packed.dtype != torch.uint8 or packed.shape[-1] != expected:
        raise ValueError(
            f"packed must be uint8 [B, S, {expected}] for kv_lora_rank={c}, rope={rope_dim}; got {packed.dtype} "
            f"{tuple(packed.shape)}."
        )
    B, S, _ = packed.shape
    q = packed[..., :c].contiguous().view(torch.float8_e4m3fn).float()  # [B, S, c]
    scale = packed[..., c : c + 4 * tiles].contiguous().view(torch.float32)  # [B, S, tiles]
    k_rope = packed[..., c + 4 * tiles :].contiguous().view(torch.bfloat16)
    scale = scale.repeat_interleave(FP8_TILE, dim=-1)[..., :c]
    return (q * scale).to(dtype), k_rope.to(dtype)


# --------------------------------------------------------------------------------------------- a stack for pictures
class MLAStack(nn.Module):
    """An attention-only toy: token embeddings, then `num_layers` × (x += MLA(RMSNorm(x))). No FFN, no head.

    Chapter 5 builds the real decoder; this one only produces attention maps of several layers to look at.
    `attention_maps(ids [B, T]) -> [L, B, H, T, T]`. `init_std` redraws every projection matrix from
    N(0, init_std²): PyTorch's default init gives near-uniform random attention, a larger spread shows structure.
    """

    def __init__(self, cfg: ModelConfig, num_layers: int | None = None, init_std: float | None = None):
        super().__init__()
        self.cfg = cfg
        n = num_layers or cfg.num_hidden_layers
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"input_layernorm": RMSNorm(cfg.hidden_size, cfg.rms_norm_eps), "self_attn": MLA(cfg, i)})
            for i in range(n)
        )
        if init_std is not None:
            with torch.no_grad():
                for layer in self.layers:
                    for module in layer["self_attn"].modules():
                        if isinstance(module, nn.Linear):
                            module.weight.normal_(0.0, init_std)

    @torch.no_grad()
    def attention_maps(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.dtype.is_floating_point:
            raise ValueError(f"ids must be integer token ids [B, T], got {ids.dtype} {tuple(ids.shape)}.")
        x = self.embed_tokens(ids)  # [B, T, d]
        maps = []
        for layer in self.layers:
            h = layer["input_layernorm"](x)
            maps.append(layer["self_attn"].attention_probs(h))  # [B, H, T, T]
            x = x + layer["self_attn"](h)
        return torch.stack(maps)
