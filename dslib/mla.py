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

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dslib.attention import RMSNorm, causal_mask
from dslib.config import FP8_BLOCK, ModelConfig
from dslib.fp8 import FP8_DTYPE, act_quant
from dslib.kv_cache import LayerCache
from dslib.rope import RotaryEmbedding, apply_rope_interleaved, softmax_scale

__all__ = [
    "LatentCache",
    "MLA",
    "dense_masked_attention",
    "load_weights",
    "WeightLoadError",
    "fp8_pack_latent",
    "fp8_unpack_latent",
    "MLAStack",
]

MODES = ("absorbed", "naive")


# --------------------------------------------------------------------------------------------- the latent cache
class LatentCache(LayerCache):
    """One layer's MLA cache, chapter 1's container with new contents: `kv_latent [B, S, kv_lora_rank]`
    (normalised c^KV) and `k_rope [B, S, rope]` (already rotated). That is all MLA ever needs from past tokens.

    `append(kv_latent, k_rope)` adds T new tokens and returns the whole cache (views, no copy); `nbytes` counts
    the bytes of the cached tokens, B * S * (kv_lora_rank + qk_rope_head_dim) * element size.
    """

    fields = ("kv_latent", "k_rope")

    @property
    def kv_latent(self) -> torch.Tensor:
        """`[B, S, kv_lora_rank]`, the normalised latents of the S cached tokens."""
        return self.buffers["kv_latent"].view()

    @property
    def k_rope(self) -> torch.Tensor:
        """`[B, S, qk_rope_head_dim]`, the rotated shared rope keys of the S cached tokens."""
        return self.buffers["k_rope"].view()


# --------------------------------------------------------------------------------------------- attention maths
def dense_masked_attention(
    q_absorbed: torch.Tensor,
    q_rope: torch.Tensor,
    kv_latent: torch.Tensor,
    k_rope: torch.Tensor,
    allowed: torch.Tensor,
    softmax_scale: float,
    *,
    return_probs: bool = False,
):
    """MQA-mode (absorbed) attention over *all* S cached latents, with a mask. Costs O(T·S).

        score[t,h,s] = (q_absorbed[t,h] · kv_latent[s] + q_rope[t,h] · k_rope[s]) · scale,  -inf where not allowed
        x[t,h]       = Σ_s softmax_s(score[t,h,:]) · kv_latent[s]

    q_absorbed `[B, T, H, C]` (= W_UK_hᵀ q_nope, C = kv_lora_rank), q_rope `[B, T, H, R]`,
    kv_latent `[B, S, C]`, k_rope `[B, S, R]`, allowed bool `[B or 1, T, S]`. One 576-wide key and value per
    token, shared by every head. Returns x `[B, T, H, C]` (latent space; W_UV comes after) and, if asked, the
    probabilities `[B, T, H, S]`. (Chapter 3 uses it as the reference its gathering sparse path must equal.)
    """
    scores = torch.einsum("bthc,bsc->bths", q_absorbed, kv_latent)  # content part
    scores = scores + torch.einsum("bthr,bsr->bths", q_rope, k_rope)  # position part
    scores = (scores * softmax_scale).float().masked_fill(~allowed.unsqueeze(2), float("-inf"))
    probs = scores.softmax(dim=-1).to(kv_latent.dtype)  # [B, T, H, S]
    x = torch.einsum("bths,bsc->bthc", probs, kv_latent)
    return (x, probs) if return_probs else x


# --------------------------------------------------------------------------------------------- the module
class MLA(nn.Module):
    """Multi-head Latent Attention of DeepSeek-V3.2 (REFERENCE.md §2), parameters named as in the checkpoint.

    forward(h [B, T, d], positions=None, cache=None, *, mode="absorbed") -> [B, T, d]
    """

    cache_type = LatentCache

    def __init__(self, config: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        d, H = config.hidden_size, config.num_attention_heads
        self.num_heads = H
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        self.softmax_scale = softmax_scale(config)

        # Queries: down to a q_lora_rank latent (normalised), then up to H heads of [nope | rope].
        # The norms use eps 1e-6 like DeepSeek's reference and transformers (not config.rms_norm_eps).
        if config.q_lora_rank:
            self.q_a_proj = nn.Linear(d, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * self.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(d, H * self.qk_head_dim, bias=False)
        # Keys/values: down to [latent | rope] (the only thing cached), then up to H heads of [k_nope | v].
        self.kv_a_proj_with_mqa = nn.Linear(d, config.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, H * (self.nope_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, d, bias=False)
        self.rotary = RotaryEmbedding(config)

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

    def _project(self, h: torch.Tensor, positions: torch.Tensor):
        """Every projection of one call: h `[B, T, d]` at `positions` -> (q_latent, q_nope, q_rope, kv_latent,
        k_rope, (cos, sin)), shapes as in `project_q` / `project_kv`; cos/sin are the positions' rotation angles
        (the chapter-3 indexer rotates with the same ones)."""
        cos, sin = self.rotary(positions)
        q_latent, q_nope, q_rope = self.project_q(h, cos, sin)
        kv_latent, k_rope = self.project_kv(h, cos, sin)
        return q_latent, q_nope, q_rope, kv_latent, k_rope, (cos, sin)

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
        mode "naive" (MHA: per-head K/V from `expand_kv`) or "absorbed" (MQA over the latents,
        `dense_masked_attention`); same result. With `return_probs=True` also returns the attention probabilities
        `[B, T, H, S]`. `check_positions=False` skips the check that every query has its own key (it reads
        q_positions back from the device, a sync per call); `forward` skips it when it made the positions itself.
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
        allowed = causal_mask(q_positions, S)  # [B or 1, T, S]
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape[-2:] != (T, S):
                raise ValueError(
                    f"mask must be bool [B, T, S] = [{B}, {T}, {S}] (True = may attend), got {mask.dtype} "
                    f"{tuple(mask.shape)}."
                )
            allowed = allowed & mask
        if mode == "naive":  # MHA mode: materialise per-head keys and values, then ordinary attention
            k, v = self.expand_kv(kv_latent, k_rope)  # [B, S, H, nope + rope], [B, S, H, v_head_dim]
            q = torch.cat([q_nope, q_rope], dim=-1)  # [B, T, H, nope + rope]
            scores = torch.einsum("bthd,bshd->bths", q, k) * self.softmax_scale
            scores = scores.float().masked_fill(~allowed.unsqueeze(2), float("-inf"))
            probs = F.softmax(scores, dim=-1).to(q_nope.dtype)  # [B, T, H, S]
            out = torch.einsum("bths,bshv->bthv", probs, v)  # [B, T, H, v_head_dim]
        else:  # MQA mode: W_UK folded into the query, attention over the shared latents, W_UV lifts the result
            q_absorbed = torch.einsum("bthd,hdc->bthc", q_nope, self.w_uk())  # [B, T, H, kv_lora_rank]
            x, probs = dense_masked_attention(q_absorbed, q_rope, kv_latent, k_rope, allowed, self.softmax_scale,
                                              return_probs=True)
            out = torch.einsum("bthc,hvc->bthv", x, self.w_uv())  # [B, T, H, v_head_dim]
        return (out, probs) if return_probs else out

    def check_input(self, h: torch.Tensor, cache, positions: torch.Tensor | None):
        """Check h `[B, T, d]` and the cache's type; default positions to len(cache) + arange(T); reject positions
        past the context.

        Returns (positions, given): `given` says whether the caller passed positions (reading them back to check
        them costs a device sync, so `attend` re-checks only those)."""
        cfg = self.config
        if h.dim() != 3 or h.shape[-1] != cfg.hidden_size:
            raise ValueError(f"h must be [B, T, hidden_size={cfg.hidden_size}], got {tuple(h.shape)}.")
        if cache is not None and not isinstance(cache, self.cache_type):
            raise TypeError(
                f"{type(self).__name__} needs a {self.cache_type.__name__} (one per layer), got "
                f"{type(cache).__name__}. Create it with {self.cache_type.__module__}.{self.cache_type.__name__}()."
            )
        start, T = (len(cache) if cache is not None else 0), h.shape[1]
        given = positions is not None
        last = int(positions.max()) if given else start + T - 1
        if last >= cfg.max_position_embeddings:
            raise ValueError(
                f"position {last} is beyond max_position_embeddings={cfg.max_position_embeddings}. Shorten the "
                "sequence or use a config with a longer context."
            )
        if not given:
            positions = torch.arange(start, start + T, device=h.device)
        return positions, given

    def forward(self, h: torch.Tensor, positions: torch.Tensor | None = None, cache: LatentCache | None = None, *,
                mode: str = "absorbed", recorder=None) -> torch.Tensor:
        """h `[B, T, d]` -> `[B, T, d]`. positions default to len(cache) + arange(T); the new tokens' latents are
        appended to `cache` when one is given (decode token by token or prefill in chunks). (`recorder`: MLA
        attends to every earlier token, it selects nothing to record.)"""
        positions, given = self.check_input(h, cache, positions)
        B, T, _ = h.shape
        _, q_nope, q_rope, kv_latent, k_rope, _ = self._project(h, positions)
        if cache is not None:
            kv_latent, k_rope = cache.append(kv_latent, k_rope)  # [B, S, kv_lora_rank], [B, S, rope]
        out = self.attend(q_nope, q_rope, kv_latent, k_rope, positions, mode=mode, check_positions=given)
        return self.o_proj(out.reshape(B, T, self.num_heads * self.v_head_dim))

    def attention_probs(self, h: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Attention probabilities `[B, H, T, T]` of a prefill of h `[B, T, d]` (for pictures; no cache)."""
        positions, _ = self.check_input(h, None, positions)
        _, q_nope, q_rope, kv_latent, k_rope, _ = self._project(h, positions)
        return self.attend(q_nope, q_rope, kv_latent, k_rope, positions, return_probs=True)[1].transpose(1, 2)


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
        cfg = getattr(module, "config", None)
        check = (
            "Check that the checkpoint was made for this architecture and that the config the module was built "
            "from matches the checkpoint's config.json (hidden_size, num_attention_heads, q_lora_rank, "
            "kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, ...), and that `prefix` is right."
        )
        if cfg is not None:
            size = getattr(cfg, "hidden_size", "?")
            check += f" The module was built with {type(cfg).__name__}(hidden_size={size}, ...)."
        raise WeightLoadError(
            f"Cannot load weights into {what}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems)
            + "\n" + check
        )
    params = dict(module.named_parameters())
    params.update(dict(module.named_buffers()))
    with torch.no_grad():
        for name in expected:
            params[name].copy_(state_dict[prefix + name])  # copy_ casts to the parameter's dtype and device
    return module


# --------------------------------------------------------------------------------------------- FP8 cache format
def fp8_pack_latent(kv_latent: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
    """FlashMLA's FP8 cache entry (docs/references.md): bytes `[B, S, c + 4·⌈c/128⌉ + 2·rope]` (656 for the 671B).

    Per token: c e4m3 latent values | one fp32 scale per 128-value tile | the rope key in bf16 (kept precise).
    scale = 2^⌈log2(amax / 448)⌉ (a power of two, "ue8m0"), stored value = x / scale (`dslib.fp8.act_quant`).
    """
    B, S, c = kv_latent.shape
    tiles = -(-c // FP8_BLOCK)
    x = F.pad(kv_latent.float(), (0, tiles * FP8_BLOCK - c)).view(B, S, tiles, FP8_BLOCK)
    q, scale = act_quant(x)  # [B, S, tiles, 128] e4m3, [B, S, tiles, 1]
    parts = [
        q.view(B, S, -1)[..., :c].contiguous().view(torch.uint8),  # [B, S, c]
        scale.view(B, S, tiles).contiguous().view(torch.uint8),  # [B, S, 4 * tiles]
        k_rope.to(torch.bfloat16).contiguous().view(torch.uint8),  # [B, S, 2 * rope]
    ]
    return torch.cat(parts, dim=-1)


def fp8_unpack_latent(packed: torch.Tensor, kv_lora_rank: int, rope_dim: int, dtype=torch.float32):
    """Inverse of `fp8_pack_latent`: bytes `[B, S, 656]` -> (kv_latent `[B, S, c]`, k_rope `[B, S, rope]`) in dtype."""
    c, tiles = kv_lora_rank, -(-kv_lora_rank // FP8_BLOCK)
    expected = c + 4 * tiles + 2 * rope_dim
    if packed.dtype != torch.uint8 or packed.shape[-1] != expected:
        raise ValueError(
            f"packed must be uint8 [B, S, {expected}] for kv_lora_rank={c}, rope={rope_dim}; got {packed.dtype} "
            f"{tuple(packed.shape)}."
        )
    q = packed[..., :c].contiguous().view(FP8_DTYPE).float()  # [B, S, c]
    scale = packed[..., c : c + 4 * tiles].contiguous().view(torch.float32)  # [B, S, tiles]
    k_rope = packed[..., c + 4 * tiles :].contiguous().view(torch.bfloat16)
    scale = scale.repeat_interleave(FP8_BLOCK, dim=-1)[..., :c]
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
        self.config = cfg
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
