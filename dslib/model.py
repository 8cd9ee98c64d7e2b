"""DeepSeek-V3.2 assembled from the chapters' modules: decoder layer, model, causal LM and greedy decoding (chapter 5).

    x     = embed_tokens(input_ids)                                          # [B, T, d]
    x     = x + self_attn(input_layernorm(x))           for each layer       # DSA = MLA (ch. 2) + indexer (ch. 3)
    x     = x + mlp(post_attention_layernorm(x))                             # dense SwiGLU (layers < 3) or MoE (ch. 4)
    logits = lm_head(norm(x))                                                # [B, T, vocab]

The module tree mirrors the checkpoint: `state_dict()` keys are exactly the official tensor names
(`model.embed_tokens.weight`, `model.layers.N.self_attn.q_a_proj.weight`, ..., `lm_head.weight`), so
`dslib.checkpoint.load_pretrained` only has to put each stored tensor in its place.

Teaching switches, per call: attention="sparse" (the real model: indexer top-k) | "dense" (plain MLA) |
"window"; mode="absorbed" (MQA mode over the latents) | "naive" (MHA mode); window, precision (the indexer's
"fp32" | "fp8") and backend ("torch" | "triton"). A cache from `new_cache()` (one `DSACache` per layer: latents +
indexer keys) makes decoding incremental; a `dslib.record.Recorder` collects selections and routing.
"""
from __future__ import annotations

import torch
from torch import nn

from dslib.attention import DecoderLayer, FeedForward, RMSNorm
from dslib.config import ModelConfig
from dslib.kv_cache import KVCache, generate
from dslib.moe import MoE
from dslib.record import Recorder
from dslib.sparse import AttentionStats, DSACache, DSAttention

__all__ = ["decoder_layer", "DeepseekV32Model", "DeepseekV32ForCausalLM"]


def decoder_layer(config: ModelConfig, layer_idx: int) -> DecoderLayer:
    """Layer `layer_idx` of DeepSeek-V3.2: chapter 1's pre-norm `DecoderLayer` with DSA attention (chapter 3) and
    a MoE (chapter 4) in layers >= first_k_dense_replace, a dense SwiGLU `FeedForward` before."""
    d = config.hidden_size
    mlp = MoE(config, layer_idx) if config.is_moe_layer(layer_idx) else FeedForward(d, config.intermediate_size)
    return DecoderLayer(DSAttention(config, layer_idx), mlp, d, config.rms_norm_eps)


class DeepseekV32Model(nn.Module):
    """Embeddings, the decoder layers and the final norm (checkpoint prefix `model.`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(decoder_layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekV32ForCausalLM(nn.Module):
    """DeepSeek-V3.2: `model(input_ids) -> logits [B, T, vocab]` (fp32), with the checkpoint's tensor names.

    Built from a `ModelConfig`; load weights with `dslib.load_pretrained(path)` (or `load_state_dict`).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DeepseekV32Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    # ------------------------------------------------------------------------------------------ helpers
    def new_cache(self, max_len: int | None = None) -> KVCache:
        """An empty cache for incremental decoding: one `DSACache` (latents, rope keys, indexer keys) per layer,
        preallocated for `max_len` tokens (None: grows as needed)."""
        return KVCache(self.config.num_hidden_layers, max_len, layer_cache=DSACache)

    def place(self, device: str | torch.device = "cpu",
              device_map: dict[str, str] | None = None) -> DeepseekV32ForCausalLM:
        """Move every module to its device: `device_map` (module prefix -> device, e.g. a `DevicePlan`'s) or all
        to `device`. Forward moves the hidden state from device to device as it goes through the layers."""
        if not device_map:
            return self.to(device)
        for prefix, dev in device_map.items():
            self.get_submodule(prefix).to(dev)
        return self

    def _check_input(self, input_ids: torch.Tensor, cache: KVCache | None, stats) -> int:
        cfg = self.config
        tensor = isinstance(input_ids, torch.Tensor)
        if not tensor or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            got = f"{input_ids.dtype} {tuple(input_ids.shape)}" if tensor else type(input_ids).__name__
            raise ValueError(
                f"input_ids must be an integer tensor [batch, seq], got {got}. Use ids[None] for one sequence."
            )
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
            raise ValueError(
                f"token ids must lie in 0..{cfg.vocab_size - 1} (vocab_size), got {int(input_ids.min())}.."
                f"{int(input_ids.max())}. Were they made by another model's tokenizer?"
            )
        start = len(cache) if cache is not None else 0
        if start + input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"{start} cached + {input_ids.shape[1]} new tokens exceed max_position_embeddings="
                f"{cfg.max_position_embeddings}. Shorten the prompt or generate fewer tokens."
            )
        for what, given in (("cache", cache.layers if cache is not None else None), ("stats", stats)):
            if given is not None and len(given) != cfg.num_hidden_layers:
                raise ValueError(f"{what} has {len(given)} layers, the model {cfg.num_hidden_layers}: use one per layer"
                                 + (" (model.new_cache())." if what == "cache" else "."))
        return start

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, *, attention: str = "sparse",
                mode: str = "absorbed", window: int | None = None, precision: str = "fp32", backend: str = "torch",
                recorder: Recorder | None = None, stats: list[AttentionStats] | None = None) -> torch.Tensor:
        """input_ids `[B, T]` -> logits `[B, T, vocab]` (fp32, like DeepSeek's reference head).

        With a `cache` (`new_cache()`), the T tokens continue the cached sequence (positions len(cache)..
        len(cache)+T-1) and their latents/indexer keys are appended. attention / mode / window / precision /
        backend go to every layer's `DSAttention.forward`; `stats` is one `AttentionStats` per layer (or None);
        `recorder` (a `dslib.record.Recorder`) receives every layer's selections and routing.
        """
        start = self._check_input(input_ids, cache, stats)
        x = self.model.embed_tokens(input_ids.to(self.model.embed_tokens.weight.device))  # [B, T, d]
        positions = torch.arange(start, start + input_ids.shape[1], device=x.device)  # [T]
        for i, layer in enumerate(self.model.layers):
            dev = layer.input_layernorm.weight.device
            x, positions = x.to(dev), positions.to(dev)  # the next device of a multi-GPU placement
            x = layer(x, positions, cache[i] if cache is not None else None, attention=attention, mode=mode,
                      window=window, precision=precision, backend=backend, recorder=recorder,
                      stats=stats[i] if stats is not None else None)
        x = self.model.norm(x.to(self.model.norm.weight.device))
        return self.lm_head(x.to(self.lm_head.weight.device)).float()  # [B, T, vocab]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, use_cache: bool = True,
                 attention: str = "sparse", mode: str = "absorbed", window: int | None = None,
                 precision: str = "fp32", backend: str = "torch", eos_token_id: int | None = None,
                 recorder: Recorder | None = None) -> torch.Tensor:
        """Greedy decoding, `[B, T]` -> `[B, T + n]`, n <= max_new_tokens: chapter 1's `dslib.kv_cache.generate`
        (it stops early once every row produced `eos_token_id`). use_cache=True: one prefill, then one token per
        step through the latent + indexer caches (the way the model is served); use_cache=False recomputes the
        whole sequence every step (the slow reference). The other options as in `forward`."""
        return generate(self, input_ids, max_new_tokens, use_cache=use_cache, eos_token_id=eos_token_id,
                        attention=attention, mode=mode, window=window, precision=precision, backend=backend,
                        recorder=recorder).tokens
