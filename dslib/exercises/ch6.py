"""Exercise checks of chapter 6 (the full-size model on GPUs).

1. `check_chunked_layer(fn)`: run one decoder layer over a prompt in chunks of queries, the layer's cache holding
   the earlier chunks, then the FFN: the same numbers as the layer on the whole prompt (the heart of streaming).
2. `check_ep_sends(fn)`: under expert parallelism (E / G consecutive experts per GPU, token n at home on GPU
   n mod G), how many copies of each token must be sent to other GPUs?
3. `check_cache_bytes(answer)`: bytes one token adds to dslib's DSA cache over all 61 layers of the 671B model
   in bf16 (latent + rope key + indexer key).
"""
from __future__ import annotations

import torch

from dslib.config import ModelConfig
from dslib.devices import cache_bytes_per_token
from dslib.exercises import Verdict, attempt, correct, not_yet
from dslib.sparse import DSACache

__all__ = ["check_chunked_layer", "check_ep_sends", "check_cache_bytes", "solution_chunked_layer",
           "solution_ep_sends", "solution_cache_bytes"]


# ---------------------------------------------------------------------------------------------------- 1
def solution_chunked_layer(layer, x: torch.Tensor, cache: DSACache, chunk: int) -> torch.Tensor:
    """x `[B, T, d]` -> the layer's output, `chunk` queries at a time through the attention (the cache gives each
    chunk the earlier tokens), then the FFN on every token."""
    out = x.clone()
    for s in range(0, x.shape[1], chunk):
        h = layer.input_layernorm(out[:, s:s + chunk])
        out[:, s:s + chunk] = out[:, s:s + chunk] + layer.self_attn(h, None, cache)
    return out + layer.mlp(layer.post_attention_layernorm(out))


def _small_layer():
    from dslib.checkpoint import load_layer
    from dslib.synthetic import SyntheticFP8Source

    cfg = ModelConfig.small(index_topk=8, num_hidden_layers=2)
    return load_layer(SyntheticFP8Source(cfg, seed=1), 1), cfg  # a MoE layer


def check_chunked_layer(fn) -> Verdict:
    """fn(layer, x [B, T, d], cache (an empty DSACache), chunk) -> [B, T, d], equal to layer(x, None, DSACache())."""
    layer, cfg = _small_layer()
    x = torch.randn(1, 40, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = layer(x, None, DSACache())
        cache = DSACache()
        got, err = attempt(fn, layer, x.clone(), cache, 16)
    if err is not None:
        return err
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return not_yet(f"it should return a tensor of shape {list(want.shape)}, got "
                       f"{list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}.")
    if len(cache) != x.shape[1]:
        return not_yet(f"the cache holds {len(cache)} tokens after the prompt, not {x.shape[1]}: pass the same "
                       "cache to every chunk's attention call, so each chunk appends its latents and indexer keys.")
    diff = (got - want).abs().amax(dim=(0, 2))  # per token
    if float(diff.max()) < 1e-4:
        return correct("each chunk's queries see the earlier chunks through the cache, so chunking changes the "
                       "memory a prefill needs, not its numbers.")
    first_bad = int((diff >= 1e-4).nonzero()[0])
    if first_bad >= 16:
        return not_yet(f"the first chunk is right but token {first_bad} differs: later chunks must attend to the "
                       "earlier tokens, which the cache holds (one DSACache for the whole prompt; positions "
                       "continue from len(cache)).")
    return not_yet(f"token {first_bad} already differs: the block is x + attention(norm(x)), then + FFN(norm(.)) "
                   "of that sum (both residual steps, pre-norm).")


# ---------------------------------------------------------------------------------------------------- 2
def solution_ep_sends(topk_idx: torch.Tensor, n_experts: int, n_gpus: int) -> torch.Tensor:
    """Copies of each token sent to other GPUs: the distinct GPUs among its experts' (expert e on GPU
    e // (E / G)), minus its home GPU (token n on GPU n mod G) if one of its experts lives there. [N, k] -> [N]."""
    N = topk_idx.shape[0]
    reach = torch.zeros(N, n_gpus, dtype=torch.bool).scatter_(1, topk_idx // (n_experts // n_gpus), True)
    home = torch.arange(N) % n_gpus
    reach[torch.arange(N), home] = False
    return reach.sum(1)


def check_ep_sends(fn) -> Verdict:
    """fn(topk_idx [N, k] int64, n_experts, n_gpus) -> [N] int: copies of each token sent to other GPUs."""
    g = torch.Generator().manual_seed(3)
    E, G, k, N = 256, 8, 8, 64
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    idx[0] = torch.arange(k) + 32 * 3  # token 0: all 8 experts on GPU 3
    idx[1] = torch.arange(k) * 32 + 1  # token 1: one expert on every GPU, home GPU 1
    got, err = attempt(fn, idx.clone(), E, G)
    if err is not None:
        return err
    got = torch.as_tensor(got).reshape(-1)
    want = solution_ep_sends(idx, E, G)
    if got.shape != want.shape:
        return not_yet(f"return one count per token ({N}), got {got.numel()} numbers.")
    if torch.equal(got.long(), want):
        return correct("a token travels once to every other GPU that holds one of its experts; the group limit "
                       "(topk_group = 4 of 8 groups, a group per GPU) caps that at 4 copies.")
    if int(got[0]) == 8 or int(got[0]) == k:
        return not_yet("token 0 has all 8 experts on one GPU (GPU 3): it is sent there once, not once per expert. "
                       "Count distinct GPUs.")
    if int(got[1]) == 8:
        return not_yet("token 1 lives on GPU 1 (n mod 8) and one of its experts is there: that one needs no copy.")
    return not_yet("expert e lives on GPU e // 32; count the distinct GPUs of each token's 8 experts, minus its own.")


# ---------------------------------------------------------------------------------------------------- 3
def solution_cache_bytes(cfg: ModelConfig | None = None) -> int:
    cfg = cfg or ModelConfig.deepseek_v32()
    return cfg.num_hidden_layers * cache_bytes_per_token(cfg)


def check_cache_bytes(answer) -> Verdict:
    want = solution_cache_bytes()
    cfg = ModelConfig.deepseek_v32()
    if answer is None:
        return not_yet("answer is still None: put in a number of bytes.")
    try:
        value = int(answer)
    except (TypeError, ValueError):
        return not_yet(f"the answer should be a number of bytes, got {answer!r}.")
    if value == want:
        return correct(f"{want:,} bytes: (512 latent + 64 rope + 128 indexer values) x 2 bytes x 61 layers. A "
                       "128K-token prompt's cache is about 11 GB, which is why a one-GPU run keeps only the "
                       "resident layers' caches.")
    if value == cache_bytes_per_token(cfg):
        return not_yet("that is one layer: every one of the 61 layers keeps its own cache.")
    if value == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2:
        return not_yet("that is MLA's latent + rope key; DSA also caches one indexer key (index_head_dim values) "
                       "per token and layer.")
    if value == want // 2:
        return not_yet("bf16 is 2 bytes per value.")
    return not_yet("count the values cached per token and layer (kv_lora_rank, qk_rope_head_dim, index_head_dim), "
                   "times 2 bytes, times the layers.")
