"""DeepSeek-V3.2 assembled from the chapters' modules: decoder layer, model, causal LM and greedy decoding (chapter 5).

    x     = embed_tokens(input_ids)                                          # [B, T, d]
    x     = x + self_attn(input_layernorm(x))           for each layer       # DSA = MLA (ch. 2) + indexer (ch. 3)
    x     = x + mlp(post_attention_layernorm(x))                             # dense SwiGLU (layers < 3) or MoE (ch. 4)
    logits = lm_head(norm(x))                                                # [B, T, vocab]

The module tree mirrors the checkpoint: `state_dict()` keys are exactly the official tensor names
(`model.embed_tokens.weight`, `model.layers.N.self_attn.q_a_proj.weight`, ..., `lm_head.weight`), so
`dslib.checkpoint.load_pretrained` only has to put each stored tensor in its place.

Teaching switches, per call: attention="sparse" (the real model: indexer top-k) | "dense" (plain MLA) |
"window"; mode="absorbed" (MQA mode over the latents) | "naive" (MHA mode). A `ModelCache` (one `DSACache` per
layer: latents + indexer keys) makes decoding incremental; a `dslib.record.Recorder` collects selections and routing.
"""
from __future__ import annotations

import torch
from torch import nn

from dslib.attention import RMSNorm
from dslib.config import ModelConfig
from dslib.moe import MLP, MoE
from dslib.record import Recorder
from dslib.sparse import DSACache, DSAttention

__all__ = ["DecoderLayer", "DeepseekV32Model", "DeepseekV32ForCausalLM", "ModelCache"]


class ModelCache:
    """The whole model's decoding state: one `DSACache` (MLA latents + indexer keys) per layer."""

    def __init__(self, num_layers: int, max_len: int | None = None):
        self.layers = [DSACache(max_len=max_len) for _ in range(num_layers)]

    def __len__(self) -> int:
        return len(self.layers[0]) if self.layers else 0

    def __getitem__(self, i: int) -> DSACache:
        return self.layers[i]

    @property
    def nbytes(self) -> int:
        """Bytes held by every layer's latents, rope keys and indexer keys."""
        return sum(c.nbytes for c in self.layers)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + self_attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DSAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoE(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: DSACache | None = None, *,
                attention: str = "sparse", mode: str = "absorbed", recorder: Recorder | None = None,
                window: int | None = None) -> torch.Tensor:
        """x `[B, T, d]` -> `[B, T, d]`; the new tokens' latents and indexer keys go into `cache`."""
        h = self.input_layernorm(x)
        record = recorder.on_selection if recorder is not None else None
        x = x + self.self_attn(h, positions, cache, mode=mode, attention=attention, record=record, window=window)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            route = recorder.routing_hook(self.layer_idx, len(self.mlp.experts)) if recorder is not None else None
            return x + self.mlp(h, record=route)
        return x + self.mlp(h)


class DeepseekV32Model(nn.Module):
    """Embeddings, the decoder layers and the final norm (checkpoint prefix `model.`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV32ForCausalLM(nn.Module):
    """DeepSeek-V3.2: `model(input_ids) -> logits [B, T, vocab]` (fp32), with the checkpoint's tensor names.

    Built from a `ModelConfig`; load weights with `dslib.load_pretrained(path)` (or `load_state_dict`).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DeepseekV32Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    # ------------------------------------------------------------------------------------------ helpers
    def new_cache(self, max_len: int | None = None) -> ModelCache:
        """An empty cache for incremental decoding (one DSACache per layer)."""
        return ModelCache(self.config.num_hidden_layers, max_len)

    def place(self, device: str | torch.device = "cpu", device_map: dict[str, str] | None = None) -> "DeepseekV32ForCausalLM":
        """Move every module to its device: `device_map` (module prefix -> device, e.g. a `DevicePlan`'s) or all
        to `device`. Forward moves the hidden state from device to device as it goes through the layers."""
        if not device_map:
            return self.to(device)
        for prefix, dev in device_map.items():
            self.get_submodule(prefix).to(dev)
        return self

    def _check_input(self, input_ids: torch.Tensor, start: int) -> None:
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            got = f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {got}. Use ids[None] for one sequence.")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
            raise ValueError(
                f"token ids must lie in 0..{cfg.vocab_size - 1} (vocab_size), got {int(input_ids.min())}.."
                f"{int(input_ids.max())}. Were they made by another model's tokenizer?"
            )
        if start + input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"{start} cached + {input_ids.shape[1]} new tokens exceed max_position_embeddings="
                f"{cfg.max_position_embeddings}. Shorten the prompt or generate fewer tokens."
            )

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, cache: ModelCache | None = None, *, attention: str = "sparse",
                mode: str = "absorbed", recorder: Recorder | None = None, window: int | None = None) -> torch.Tensor:
        """input_ids `[B, T]` -> logits `[B, T, vocab]` (fp32, like DeepSeek's reference head).

        With a `cache`, the T tokens continue the cached sequence (positions len(cache)..len(cache)+T-1) and their
        latents/indexer keys are appended. attention / mode / recorder / window: see the module docstring.
        """
        start = len(cache) if cache is not None else 0
        self._check_input(input_ids, start)
        if cache is not None and len(cache.layers) != len(self.model.layers):
            raise ValueError(f"cache has {len(cache.layers)} layers, the model {len(self.model.layers)}: use model.new_cache().")
        x = self.model.embed_tokens(input_ids.to(self.model.embed_tokens.weight.device))  # [B, T, d]
        positions = torch.arange(start, start + input_ids.shape[1], device=x.device)  # [T]
        for i, layer in enumerate(self.model.layers):
            dev = layer.input_layernorm.weight.device
            x, positions = x.to(dev), positions.to(dev)  # the next device of a multi-GPU placement
            x = layer(x, positions, cache[i] if cache is not None else None, attention=attention, mode=mode,
                      recorder=recorder, window=window)
        x = self.model.norm(x.to(self.model.norm.weight.device))
        return self.lm_head(x.to(self.lm_head.weight.device)).float()  # [B, T, vocab]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, use_cache: bool = True,
                 attention: str = "sparse", mode: str = "absorbed", eos_token_id: int | None = None,
                 recorder: Recorder | None = None) -> torch.Tensor:
        """Greedy decoding: `[B, T]` -> `[B, T + n]`, n <= max_new_tokens (stops early once every row hit `eos_token_id`).

        use_cache=True: one prefill, then one token per step through the latent + indexer caches (the way the model
        is served). use_cache=False recomputes the whole sequence every step (the slow reference)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
        seq = input_ids
        cache = self.new_cache() if use_cache else None
        done = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
        step_input = seq
        for _ in range(max_new_tokens):
            logits = self(step_input if use_cache else seq, cache, attention=attention, mode=mode, recorder=recorder)
            nxt = logits[:, -1].argmax(-1).to(seq.device)  # [B]
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            step_input = nxt[:, None]
            if eos_token_id is not None and bool(done.all()):
                break
        return seq
