"""KV caches and cached greedy generation (chapter 1).

An autoregressive decoder produces token t+1 from tokens 0..t. Keys and values of tokens 0..t-1 do not change
when token t arrives (attention is causal), so they can be computed once and kept: the **KV cache**. Each decode
step then runs the model on one new token and attends over the cached keys and values.

What is here:

- `SequenceBuffer`: a tensor that grows along its sequence dimension (preallocated to a limit, or doubling).
- `LayerCache`: one layer's cache, one `SequenceBuffer` per cached tensor; the container every chapter fills
  (`LayerKVCache` here, MLA's `LatentCache` in chapter 2, `DSACache` in chapter 3).
- `KVCache`: the whole model's cache, one layer cache per layer.
- `prefill`, `generate`: (chunked) prefill and greedy generation for any model that follows the small protocol
  below, with or without a cache, so the two can be compared token for token.
- `kv_cache_sizes`, `memory_calculator`: whole-model cache bytes of real configurations (DeepSeek-V3.2 and a
  GQA reference), read from `dslib.config`, and the figure of the notebook's memory calculator.

Model protocol used by `prefill` / `generate`: `model(input_ids [B, T], cache=None, **options) -> logits [B, T, V]`
where the new tokens sit at positions `len(cache) .. len(cache) + T - 1` (0 .. T-1 without a cache),
`model.new_cache(max_len=None)` returns an empty cache that supports `len()`, and
`model.config.max_position_embeddings` lets `generate` reject a too-long request before doing any work.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dslib.config import GQA_REFERENCE, H200_MEMORY_BYTES, ModelConfig, dense_kv_bytes_per_token_per_layer

__all__ = [
    "CacheFullError", "SequenceTooLongError", "SequenceBuffer", "LayerCache", "LayerKVCache", "KVCache",
    "GenerationResult", "prefill", "generate",
    "DTYPE_BYTES", "kv_cache_sizes", "memory_calculator",
]


class CacheFullError(ValueError):
    """Appending would grow a cache past its `max_len` (every cache of the series raises this one)."""


class SequenceTooLongError(ValueError):
    """A request needs positions the model has no embedding for."""


# ---------------------------------------------------------------------------------------------- containers
class SequenceBuffer:
    """A tensor that grows along one dimension (`seq_dim`, the sequence) as chunks are appended.

    With `max_len` the storage for all `max_len` tokens is allocated at the first append (preallocated: appending
    never copies what is cached); without it the storage doubles when full (amortised O(1) per token).
    `view()` returns the filled part as a view, not a copy; `nbytes` counts the filled part only: the bytes the
    cached tokens occupy. Appending past `max_len` raises `CacheFullError`.
    """

    def __init__(self, seq_dim: int = 1, max_len: int | None = None, name: str = "buffer"):
        if max_len is not None and (not isinstance(max_len, int) or max_len <= 0):
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
        capacity = self.max_len if self.max_len is not None else max(needed, 2 * self.capacity, 16)
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


class LayerCache:
    """One layer's cache: one `SequenceBuffer` per kind of cached tensor (`fields`), appended together, so every
    buffer always holds the same tokens.

    The chapters keep the container and change what goes in: keys and values per KV head (`LayerKVCache`, here),
    MLA's latent and rope key (`dslib.mla.LatentCache`), plus the indexer's key (`dslib.sparse.DSACache`).
    `append(*tensors)` takes one tensor per field (T new tokens each) and returns every field's cached tokens.
    """

    fields: tuple[str, ...] = ()
    seq_dim: int = 1  # the sequence axis of every field

    def __init__(self, max_len: int | None = None, layer_idx: int = 0):
        self.max_len = max_len
        self.buffers = {f: SequenceBuffer(self.seq_dim, max_len, f"layer {layer_idx} {f}") for f in self.fields}

    def append(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lead = {tuple(t.shape[: self.seq_dim + 1]) for t in tensors}
        if len(tensors) != len(self.fields) or len(lead) != 1:
            raise ValueError(
                f"{type(self).__name__}.append takes one tensor per field ({', '.join(self.fields)}), all with the "
                f"same "
                f"sizes up to the sequence dim {self.seq_dim} (batch, ..., new tokens); got shapes "
                f"{[tuple(t.shape) for t in tensors]}."
            )
        return tuple(buf.append(t) for buf, t in zip(self.buffers.values(), tensors))

    def __len__(self) -> int:
        return len(next(iter(self.buffers.values())))

    @property
    def nbytes(self) -> int:
        """Bytes of the cached tokens, all fields."""
        return sum(buf.nbytes for buf in self.buffers.values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tokens={len(self)}, fields={self.fields}, nbytes={self.nbytes:,})"


class LayerKVCache(LayerCache):
    """One attention layer's cache: keys and values `[B, num_kv_heads, S, head_dim]` of every token seen."""

    fields = ("keys", "values")
    seq_dim = 2

    @property
    def keys(self) -> torch.Tensor:
        return self.buffers["keys"].view()

    @property
    def values(self) -> torch.Tensor:
        return self.buffers["values"].view()


class KVCache:
    """The whole model's cache: one layer cache per layer; `len(cache)` = tokens cached so far.

    Bytes grow linearly with the tokens: `nbytes = 2 (K and V) * layers * batch * kv_heads * head_dim * S * dtype`.
    `layer_cache` makes the layers' caches (chapter 5 passes `dslib.sparse.DSACache`).
    """

    def __init__(self, num_layers: int, max_len: int | None = None, layer_cache: type[LayerCache] = LayerKVCache):
        self.max_len = max_len
        self.layers = [layer_cache(max_len, i) for i in range(num_layers)]

    def __getitem__(self, layer_idx: int) -> LayerCache:
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
        raise ValueError(
            f"input_ids must be an int64 tensor [batch, tokens], got {what}. Use ids[None] for one sequence."
        )
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one prompt token.")


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, cache, chunk_size: int | None = None, **options) -> torch.Tensor:
    """Run the prompt through the model, filling `cache`; return the last position's logits `[B, V]`.

    `chunk_size` splits the prompt into pieces of that many tokens, each attending to the cache (earlier
    chunks) and causally to itself. The result equals a one-shot prefill; chunks bound the activation memory
    (a chunk's score matrix is `[chunk, S]` instead of `[T, T]`). `options` go to every model call.
    """
    _check_ids(input_ids)
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens or None, got {chunk_size!r}.")
    step = chunk_size or input_ids.shape[1]
    for start in range(0, input_ids.shape[1], step):
        logits = model(input_ids[:, start : start + step], cache=cache, **options)  # [B, chunk, V]
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
    eos_token_id: int | None = None,
    **options,
) -> GenerationResult:
    """Greedy decoding: append `argmax(logits)` `max_new_tokens` times (the one decoding loop of the series).

    use_cache=True : prefill the prompt once (in chunks of `chunk_size`), then run one token per step; the
                     step for the token at position p costs O(p) attention (it reads p cached keys). The cache
                     is allocated once for prompt + max_new_tokens tokens.
    use_cache=False: every step re-runs the whole sequence so far; the step at position p costs O(p^2)
                     attention and p times the projections.
    Both produce the same tokens; only the work differs. `eos_token_id`: a row that produced it keeps producing
    it, and decoding stops early once every row has. `options` (e.g. attention=, mode=, recorder=) go to every
    model call.
    """
    _check_ids(input_ids)
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens!r}.")
    prompt_len = input_ids.shape[1]
    limit = model.config.max_position_embeddings
    if prompt_len + max_new_tokens > limit:
        raise SequenceTooLongError(
            f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens = {prompt_len + max_new_tokens} positions, "
            f"but the model knows only max_position_embeddings={limit} positions (0..{limit - 1}). "
            f"Generate at most {max(limit - prompt_len, 0)} new tokens or use a model with more positions."
        )
    cache = model.new_cache(max_len=prompt_len + max_new_tokens) if use_cache else None
    tokens, all_logits, seconds, context_lens = input_ids, [], [], []
    done = torch.zeros(input_ids.shape[0], 1, dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        t0 = time.perf_counter()
        if not use_cache:
            logits = model(tokens, **options)[:, -1]  # recompute everything: [B, V]
        elif i == 0:
            logits = prefill(model, tokens, cache, chunk_size, **options)
        else:
            logits = model(tokens[:, -1:], cache=cache, **options)[:, -1]  # one new token, attends over the cache
        next_token = logits.argmax(dim=-1, keepdim=True).to(tokens.device)  # [B, 1]
        if eos_token_id is not None:
            next_token = next_token.masked_fill(done, eos_token_id)
            done |= next_token == eos_token_id
        seconds.append(time.perf_counter() - t0)
        context_lens.append(tokens.shape[1])
        tokens = torch.cat([tokens, next_token], dim=1)
        all_logits.append(logits)
        if eos_token_id is not None and bool(done.all()):
            break
    return GenerationResult(tokens, torch.stack(all_logits, dim=1), seconds, context_lens, cache)


# ---------------------------------------------------------------------------------------------- memory of real models
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


def kv_cache_sizes(context_len: int, batch: int = 1, dtype: str = "bf16",
                   cfg: ModelConfig | None = None) -> dict[str, int]:
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
