"""A small baseline decoder with multi-head / grouped-query attention and a KV cache (chapter 1).

This is the "before" picture of the series: a pre-norm decoder (Llama-like blocks, learned absolute position
embeddings so that RoPE can wait for chapter 2) whose attention caches full per-head keys and values.
`num_key_value_heads` chooses the flavour: equal to `num_attention_heads` is MHA, 1 is MQA, anything between
that divides the heads is GQA (each KV head serves `num_attention_heads // num_key_value_heads` query heads).

Also holds what every later chapter reuses: `RMSNorm`, `FeedForward` (SwiGLU), the pre-norm `DecoderLayer` that
every model of the series is a stack of, and the position helpers `batched_positions` / `causal_mask`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dslib.config import ConfigError, dense_kv_bytes_per_token_per_layer
from dslib.kv_cache import KVCache, LayerKVCache, SequenceTooLongError

__all__ = [
    "RMSNorm", "BaselineConfig", "batched_positions", "causal_mask", "causal_attention", "Attention", "FeedForward",
    "DecoderLayer", "BaselineDecoder",
]


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


# ---------------------------------------------------------------------------------------------- config
@dataclass
class BaselineConfig:
    """Hyper-parameters of the baseline decoder (names as in Hugging Face configs). Small CPU defaults."""

    vocab_size: int = 256
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    num_key_value_heads: int = 8  # = num_attention_heads: MHA; 1: MQA; a divisor in between: GQA
    head_dim: int | None = None  # default hidden_size // num_attention_heads
    intermediate_size: int = 256
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if heads % kv_heads:
            divisors = [n for n in range(1, heads + 1) if heads % n == 0]
            raise ConfigError(
                f"num_attention_heads={heads} is not divisible by num_key_value_heads={kv_heads}: in GQA every KV "
                f"head serves the same number of query heads. Choose num_key_value_heads among {divisors}."
            )
        if self.head_dim is None:
            if self.hidden_size % heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={heads}; "
                    "set head_dim explicitly or change one of them."
                )
            self.head_dim = self.hidden_size // heads
        elif not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ConfigError(f"head_dim must be a positive integer or None, got {self.head_dim!r}.")

    @property
    def kind(self) -> str:
        """'MHA', 'GQA' or 'MQA'."""
        if self.num_key_value_heads == self.num_attention_heads:
            return "MHA"
        return "MQA" if self.num_key_value_heads == 1 else "GQA"

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    # ------------------------------------------------------------------ memory
    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        """Cache bytes one token adds, all layers: layers * 2 (K, V) * kv_heads * head_dim * dtype_bytes."""
        per_layer = dense_kv_bytes_per_token_per_layer(self.num_key_value_heads, self.head_dim, dtype_bytes)
        return self.num_hidden_layers * per_layer

    def kv_cache_bytes(self, seq_len: int, batch: int = 1, dtype_bytes: int = 4) -> int:
        """Whole-model cache for `batch` sequences of `seq_len` tokens: linear in seq_len."""
        return self.kv_bytes_per_token(dtype_bytes) * seq_len * batch

    # ------------------------------------------------------------------ compute
    def matmul_params(self) -> int:
        """Weights used in matrix products per token: q, k, v, o, the SwiGLU FFN of every layer, and the LM
        head (the embedding lookups are not products)."""
        d, hd = self.hidden_size, self.head_dim
        attn = d * self.num_attention_heads * hd * 2 + d * self.num_key_value_heads * hd * 2  # q, o + k, v
        ffn = 3 * d * self.intermediate_size
        return self.num_hidden_layers * (attn + ffn) + d * self.vocab_size

    def attention_flops(self, q_len: int, kv_len: int, batch: int = 1) -> int:
        """FLOPs of the score and weighted-sum products: 2 products * 2 FLOP * heads * head_dim * q_len * kv_len
        per layer (the masked-out half of a causal prefill is computed too, then masked)."""
        return batch * self.num_hidden_layers * 4 * self.num_attention_heads * self.head_dim * q_len * kv_len

    def forward_flops(self, q_len: int, kv_len: int | None = None, batch: int = 1) -> int:
        """FLOPs of one forward pass over `q_len` new tokens attending to `kv_len` tokens (default q_len):
        2 * matmul_params per token (linear in q_len) + attention (q_len * kv_len)."""
        kv_len = q_len if kv_len is None else kv_len
        return batch * 2 * q_len * self.matmul_params() + self.attention_flops(q_len, kv_len, batch)


# ---------------------------------------------------------------------------------------------- attention
def batched_positions(q_positions: torch.Tensor) -> torch.Tensor:
    """Query positions as `[B, T]` (or `[1, T]` for positions `[T]` shared by the whole batch), int64."""
    if q_positions.dim() == 1:
        return q_positions.unsqueeze(0)
    if q_positions.dim() != 2:
        raise ValueError(f"q_positions must be [T] or [B, T], got shape {tuple(q_positions.shape)}.")
    return q_positions


def causal_mask(q_positions: torch.Tensor, num_keys: int) -> torch.Tensor:
    """bool `[B, T, S]` (`[1, T, S]` for positions `[T]`): key s is visible to the query at position p iff s <= p.

    Keys are the positions 0..S-1 (a cache holds every token from the start). The one causal mask of the series."""
    keys = torch.arange(num_keys, device=q_positions.device)
    return keys.view(1, 1, -1) <= batched_positions(q_positions).unsqueeze(-1)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention of T queries over S keys, causal by position, with grouped KV heads.

    q [B, H, T, hd]; k, v [B, KVH, S, hd] (keys at positions 0..S-1); q_positions [T] or [B, T] (int64).
    Key s is visible to the query at position p iff s <= p. Query head h uses KV head h // (H // KVH).
    out[b, h, t] = sum_s softmax_s(q[b, h, t] . k[b, h // G, s] * scale) v[b, h // G, s]  ->  [B, H, T, hd]
    """
    B, H, T, hd = q.shape
    KVH, S = k.shape[1], k.shape[2]
    if H % KVH:
        raise ValueError(f"{H} query heads cannot be shared evenly by {KVH} KV heads.")
    G = H // KVH
    scale = hd**-0.5 if scale is None else scale
    # The G query heads of one group read the same K and V: fold them into the rows of one product,
    # so each cached key is read once per group rather than once per head.
    qg = q.reshape(B, KVH, G * T, hd)  # [B, KVH, G*T, hd]
    scores = (qg @ k.transpose(-1, -2)).view(B, KVH, G, T, S) * scale  # [B, KVH, G, T, S]
    visible = causal_mask(q_positions, S)[:, None, None]  # [B or 1, 1, 1, T, S]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)  # [B, KVH, G, T, S]
    out = probs.view(B, KVH, G * T, S) @ v  # [B, KVH, G*T, hd]
    return out.view(B, H, T, hd)


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with an optional KV cache (no biases, no RoPE)."""

    def __init__(self, config: BaselineConfig, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                            config.head_dim)
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cache: LayerKVCache | None = None, *,
                recorder=None) -> torch.Tensor:
        """h [B, T, d] at `positions` [T]; with a cache, the T new keys/values are appended and the queries
        attend over all S cached tokens. Returns [B, T, d]. (`recorder`: plain attention selects nothing.)"""
        B, T, _ = h.shape
        q = self.q_proj(h).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(h).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KVH, T, hd]
        v = self.v_proj(h).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KVH, T, hd]
        if cache is not None:
            k, v = cache.append(k, v)  # [B, KVH, S, hd]: everything seen so far
        out = causal_attention(q, k, v, positions)  # [B, H, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU feed-forward: down_proj(silu(gate_proj(x)) * up_proj(x)), x [..., d] -> [..., d].

    DeepSeek uses it three ways: the dense FFN of the first `first_k_dense_replace` layers, each routed expert,
    and the shared expert (chapter 4). (`recorder`: a dense FFN routes nothing.)"""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, *, recorder=None) -> torch.Tensor:
        # DeepSeek's reference computes silu and the product in fp32 (identical in fp32, steadier in bf16).
        hidden = F.silu(self.gate_proj(x).float()) * self.up_proj(x).float()  # [..., intermediate]
        return self.down_proj(hidden.to(x.dtype))


class DecoderLayer(nn.Module):
    """The pre-norm block every model of the series stacks (names as in DeepSeek's checkpoint):

        x = x + self_attn(input_layernorm(x), positions, cache)
        x = x + mlp(post_attention_layernorm(x))

    Only the two parts change from chapter to chapter: `Attention` + `FeedForward` here, `DSAttention` +
    `FeedForward` (chapter 3's recall model), `MLA` + `MoE` (chapter 4's model), `DSAttention` + `FeedForward` or
    `MoE` (chapter 5: DeepSeek-V3.2). `options` (attention=, mode=, stats=, ...) go to `self_attn`; `recorder` goes
    to both parts, and each reports what it decided (token selections, expert routing) or nothing.
    """

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache=None, *, recorder=None,
                **options) -> torch.Tensor:
        """x `[B, T, d]` at `positions` -> `[B, T, d]`; the layer's new keys/latents go into `cache`."""
        x = x + self.self_attn(self.input_layernorm(x), positions, cache, recorder=recorder, **options)
        return x + self.mlp(self.post_attention_layernorm(x), recorder=recorder)


class BaselineDecoder(nn.Module):
    """Token + learned position embeddings, `num_hidden_layers` decoder layers, final norm, LM head.

    `model(input_ids [B, T], cache=None) -> logits [B, T, vocab]`. Without a cache the tokens are positions
    0..T-1; with a `KVCache` they continue after the cached ones (positions len(cache)..len(cache)+T-1) and
    their keys/values are appended to it. This is the protocol `dslib.kv_cache.generate` uses.
    """

    def __init__(self, config: BaselineConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, d)
        self.layers = nn.ModuleList(
            DecoderLayer(Attention(config, i), FeedForward(d, config.intermediate_size), d, config.rms_norm_eps)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """An empty cache for this model (at most `max_len` tokens, default max_position_embeddings)."""
        return KVCache(self.config.num_hidden_layers, max_len or self.config.max_position_embeddings)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}.")
        T, limit = input_ids.shape[1], self.config.max_position_embeddings
        start = len(cache) if cache is not None else 0
        if start + T > limit:
            raise SequenceTooLongError(
                f"positions {start}..{start + T - 1} requested, but this model has learned embeddings only for "
                f"positions 0..{limit - 1} (max_position_embeddings={limit}). Shorten the sequence or build the "
                "model with a larger max_position_embeddings."
            )
        positions = torch.arange(start, start + T, device=input_ids.device)  # [T]
        x = self.embed_tokens(input_ids) + self.embed_positions(positions)  # [B, T, d]
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, cache[i] if cache is not None else None)
        return self.lm_head(self.norm(x))  # [B, T, vocab]
