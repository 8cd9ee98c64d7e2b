"""KV caches and cached greedy generation (chapter 1).

An autoregressive decoder produces token t+1 from tokens 0..t. Keys and values of tokens 0..t-1 do not change
when token t arrives (attention is causal), so they can be computed once and kept: the **KV cache**. Each decode
step then runs the model on one new token and attends over the cached keys and values.

What is here:

- `SequenceBuffer`: a tensor that grows along its sequence dimension (amortised O(1) appends, optional limit).
- `LayerKVCache` / `KVCache`: per-layer keys and values of a multi-head / grouped-query attention model.
- `prefill`, `generate`: (chunked) prefill and greedy generation for any model that follows the small protocol
  below, with or without a cache, so the two can be compared token for token.
- `kv_cache_sizes`, `memory_calculator`: whole-model cache bytes of real configurations (DeepSeek-V3.2 and a
  GQA reference), read from `dslib.config`, and the figure of the notebook's memory calculator.

Model protocol used by `prefill` / `generate`: `model(input_ids [B, T], cache=None) -> logits [B, T, V]` where
the new tokens sit at positions `len(cache) .. len(cache) + T - 1` (0 .. T-1 without a cache), and
`model.new_cache(max_len=None)` returns an empty cache that supports `len()`. An optional attribute
`model.max_position_embeddings` lets `generate` reject a too-long request before doing any work.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dslib.config import GQA_REFERENCE, H200_MEMORY_BYTES, ModelConfig, dense_kv_bytes_per_token_per_layer

__all__ = [
    "CacheFullError", "SequenceTooLongError", "SequenceBuffer", "LayerKVCache", "KVCache",
    "GenerationResult", "prefill", "generate",
    "DTYPE_BYTES", "kv_cache_sizes", "memory_calculator",
]


class CacheFullError(ValueError):
    """Appending would grow a cache past its `max_len`."""


class SequenceTooLongError(ValueError):
    """A request needs positions the model has no embedding for."""


# ---------------------------------------------------------------------------------------------- containers
class SequenceBuffer:
    """A tensor that grows along one dimension (`seq_dim`, the sequence) as chunks are appended.

    Storage is allocated with spare room and doubled when full (capped at `max_len`), so appending one token
    copies nothing in the common case; `view()` returns the filled part as a view, not a copy.
    `nbytes` counts the filled part only: the bytes the cached tokens occupy.
    """

    def __init__(self, seq_dim: int = 1, max_len: int | None = None, name: str = "buffer"):
        if max_len is not None and max_len <= 0:
            raise ValueError(f"max_len must be a positive number of tokens or None, got {max_len!r}.")
        self.seq_dim = seq_dim
        self.max_len = max_len
        self.name = name
        self._data: torch.Tensor | None = None
        self._len = 0

    def __len__(self) -> int:
        return self._len

    @property
    def capacity(self) -> int:
        return 0 if self._data is None else self._data.shape[self.seq_dim]

    def append(self, x: torch.Tensor) -> torch.Tensor:
        """Append `x` (its length along `seq_dim` = new tokens); return everything stored so far (a view)."""
        new = x.shape[self.seq_dim]
        end = self._len + new
        if self.max_len is not None and end > self.max_len:
            raise CacheFullError(
                f"{self.name}: cannot append {new} token(s) to {self._len} cached: the cache holds at most "
                f"max_len={self.max_len} tokens. Create the cache with a larger max_len (or generate fewer tokens)."
            )
        if self._data is not None:
            expected = list(self._data.shape)
            expected[self.seq_dim] = new
            if list(x.shape) != expected or x.dtype != self._data.dtype or x.device != self._data.device:
                raise ValueError(
                    f"{self.name}: appended chunk has shape {tuple(x.shape)} ({x.dtype}, {x.device}) but the cache "
                    f"holds {tuple(expected)} ({self._data.dtype}, {self._data.device}) per chunk of {new} tokens: "
                    "batch size, heads, width, dtype and device must stay the same for the whole sequence. "
                    "Start a new cache for a different batch."
                )
        if end > self.capacity:
            self._grow(x, end)
        self._data.narrow(self.seq_dim, self._len, new).copy_(x)
        self._len = end
        return self.view()

    def _grow(self, like: torch.Tensor, needed: int) -> None:
        capacity = max(needed, 2 * self.capacity, 16)
        if self.max_len is not None:
            capacity = min(capacity, self.max_len)
        shape = list(like.shape)
        shape[self.seq_dim] = capacity
        data = like.new_empty(shape)
        if self._data is not None:  # keep what is cached
            data.narrow(self.seq_dim, 0, self._len).copy_(self.view())
        self._data = data

    def view(self) -> torch.Tensor:
        """The cached tokens: the filled part of the storage (a view)."""
        if self._data is None:
            raise ValueError(f"{self.name} is empty: append to it first.")
        return self._data.narrow(self.seq_dim, 0, self._len)

    @property
    def nbytes(self) -> int:
        """Bytes of the cached tokens (the filled part, not the spare capacity)."""
        return 0 if self._data is None else self.view().numel() * self._data.element_size()

    def __repr__(self) -> str:
        shape = None if self._data is None else tuple(self.view().shape)
        return f"SequenceBuffer({self.name}, tokens={self._len}, shape={shape}, nbytes={self.nbytes})"


class LayerKVCache:
    """One attention layer's cache: keys and values `[B, num_kv_heads, S, head_dim]` of every token seen."""

    def __init__(self, max_len: int | None = None, layer_idx: int = 0):
        self.keys = SequenceBuffer(seq_dim=2, max_len=max_len, name=f"layer {layer_idx} keys")
        self.values = SequenceBuffer(seq_dim=2, max_len=max_len, name=f"layer {layer_idx} values")

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v `[B, KVH, T, head_dim]` of T new tokens -> all keys and values `[B, KVH, S, head_dim]`, S = old + T."""
        if k.dim() != 4 or k.shape[:3] != v.shape[:3]:
            raise ValueError(
                f"keys {tuple(k.shape)} and values {tuple(v.shape)} must both be [B, num_kv_heads, T, head_dim] "
                "with the same B, num_kv_heads and T."
            )
        return self.keys.append(k), self.values.append(v)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class KVCache:
    """The whole model's cache: one `LayerKVCache` per layer; `len(cache)` = tokens cached so far.

    Bytes grow linearly with the tokens: `nbytes = 2 (K and V) * layers * batch * kv_heads * head_dim * S * dtype`.
    """

    def __init__(self, num_layers: int, max_len: int | None = None):
        self.max_len = max_len
        self.layers = [LayerKVCache(max_len, i) for i in range(num_layers)]

    def __getitem__(self, layer_idx: int) -> LayerKVCache:
        return self.layers[layer_idx]

    def __len__(self) -> int:
        # Layer 0 is written first in a forward pass; read the length before the pass, never during it.
        return len(self.layers[0]) if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def __repr__(self) -> str:
        return f"KVCache(layers={len(self.layers)}, tokens={len(self)}, nbytes={self.nbytes:,})"


# ---------------------------------------------------------------------------------------------- generation
def _check_ids(input_ids: torch.Tensor) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        what = f"a {input_ids.dtype} tensor of shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) \
            else type(input_ids).__name__
        raise ValueError(f"input_ids must be an int64 tensor [batch, tokens], got {what}. Use ids[None] for one sequence.")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one prompt token.")


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, cache, chunk_size: int | None = None) -> torch.Tensor:
    """Run the prompt through the model, filling `cache`; return the last position's logits `[B, V]`.

    `chunk_size` splits the prompt into pieces of that many tokens, each attending to the cache (earlier
    chunks) and causally to itself. The result equals a one-shot prefill; chunks bound the activation memory
    (a chunk's score matrix is `[chunk, S]` instead of `[T, T]`).
    """
    _check_ids(input_ids)
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens or None, got {chunk_size!r}.")
    step = chunk_size or input_ids.shape[1]
    for start in range(0, input_ids.shape[1], step):
        logits = model(input_ids[:, start : start + step], cache=cache)  # [B, chunk, V]
    return logits[:, -1]


@dataclass
class GenerationResult:
    """Output of `generate`: the prompt followed by the new tokens, and what each step saw and cost."""

    tokens: torch.Tensor  # [B, prompt + n] int64
    logits: torch.Tensor  # [B, n, V]: the logits each new token was chosen from
    seconds: list[float] = field(default_factory=list)  # wall time of each step (step 0 includes the prefill)
    context_lens: list[int] = field(default_factory=list)  # tokens attended over by the step's last query
    cache: object = None  # the filled cache (None without caching)

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.tokens[:, self.tokens.shape[1] - self.logits.shape[1] :]


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    use_cache: bool = True,
    chunk_size: int | None = None,
) -> GenerationResult:
    """Greedy decoding: append `argmax(logits)` `max_new_tokens` times.

    use_cache=True : prefill the prompt once (in chunks of `chunk_size`), then run one token per step; the
                     step for the token at position p costs O(p) attention (it reads p cached keys).
    use_cache=False: every step re-runs the whole sequence so far; the step at position p costs O(p^2)
                     attention and p times the projections.
    Both produce the same tokens; only the work differs.
    """
    _check_ids(input_ids)
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens!r}.")
    prompt_len = input_ids.shape[1]
    limit = getattr(model, "max_position_embeddings", None)
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise SequenceTooLongError(
            f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens = {prompt_len + max_new_tokens} positions, "
            f"but the model knows only max_position_embeddings={limit} positions (0..{limit - 1}). "
            f"Generate at most {max(limit - prompt_len, 0)} new tokens or use a model with more positions."
        )
    cache = model.new_cache() if use_cache else None
    tokens, all_logits, seconds, context_lens = input_ids, [], [], []
    for i in range(max_new_tokens):
        t0 = time.perf_counter()
        if not use_cache:
            logits = model(tokens)[:, -1]  # recompute everything: [B, V]
        elif i == 0:
            logits = prefill(model, tokens, cache, chunk_size)
        else:
            logits = model(tokens[:, -1:], cache=cache)[:, -1]  # one new token, attends over the cache
        next_token = logits.argmax(dim=-1, keepdim=True)  # [B, 1]
        seconds.append(time.perf_counter() - t0)
        context_lens.append(tokens.shape[1])
        tokens = torch.cat([tokens, next_token], dim=1)
        all_logits.append(logits)
    return GenerationResult(tokens, torch.stack(all_logits, dim=1), seconds, context_lens, cache)


# ---------------------------------------------------------------------------------------------- memory of real models
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


def kv_cache_sizes(context_len: int, batch: int = 1, dtype: str = "bf16", cfg: ModelConfig | None = None) -> dict[str, int]:
    """Whole-model cache bytes for `batch` sequences of `context_len` tokens, per caching scheme.

    MHA, MQA and MLA use DeepSeek-V3.2's dimensions (`cfg`, default the 671B model; 61 layers) stored in
    `dtype`; GQA is the series' GQA baseline `dslib.config.GQA_REFERENCE` (61 layers x 8 KV heads x 128);
    MLA-FP8 is FlashMLA's fixed 656-byte format and the indexer keys are FP8 + one fp32 scale (REFERENCE §3).
    """
    if context_len <= 0 or batch <= 0:
        raise ValueError(f"context_len and batch must be positive, got {context_len!r} and {batch!r}.")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)}.")
    cfg = cfg or ModelConfig.deepseek_v32()
    b = DTYPE_BYTES[dtype]
    gqa = GQA_REFERENCE
    gqa_per_token = gqa["num_layers"] * dense_kv_bytes_per_token_per_layer(gqa["num_kv_heads"], gqa["head_dim"], b)
    mla_fp8 = cfg.kv_cache_bytes("mla_fp8", context_len, batch)
    return {
        f"MHA ({cfg.num_attention_heads} heads, {dtype})": cfg.kv_cache_bytes("mha", context_len, batch, dtype_bytes=b),
        f"GQA-{gqa['num_kv_heads']} ({gqa['num_layers']} layers, {dtype})": gqa_per_token * context_len * batch,
        f"MQA (1 KV head, {dtype})": cfg.kv_cache_bytes("mqa", context_len, batch, dtype_bytes=b),
        f"MLA ({dtype})": cfg.kv_cache_bytes("mla", context_len, batch, dtype_bytes=b),
        "MLA-FP8": mla_fp8,
        "MLA-FP8 + indexer keys (V3.2)": mla_fp8 + cfg.kv_cache_bytes("indexer", context_len, batch),
    }


def memory_calculator(context_len: int = 131072, batch: int = 1, dtype: str = "bf16"):
    """The notebook's widget callback: KV-cache GB of each scheme against one H200's memory (a plotly Figure)."""
    from dslib.viz.kv import kv_memory_figure  # plotting stays out of the module's import path

    sizes = kv_cache_sizes(context_len, batch, dtype)
    title = f"KV cache for {batch} x {context_len:,} tokens"
    return kv_memory_figure(sizes, capacity_bytes=H200_MEMORY_BYTES, capacity_name="one H200", title=title)
