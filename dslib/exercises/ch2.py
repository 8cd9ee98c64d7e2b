"""Exercise checks of chapter 2 (MLA). Each `check_*` takes the learner's function and returns a Verdict."""
from __future__ import annotations

import torch

from dslib.config import ModelConfig
from dslib.exercises import Verdict, attempt, correct, not_yet  # noqa: F401
from dslib.mla import MLA

__all__ = [
    "check_absorbed_score",
    "solution_absorbed_score",
    "check_cache_bytes_per_token",
    "solution_cache_bytes_per_token",
    "check_merged_output_weight",
    "solution_merged_output_weight",
]


# ------------------------------------------------------------------------------------------ exercise 1
def solution_absorbed_score(q_nope, q_rope, kv_latent, k_rope, w_uk, scale):
    """Scores of ONE head's query over S cached tokens, computed from the latents (absorbed / MQA mode).

    q_nope [nope], q_rope [rope] (rotated), kv_latent [S, c], k_rope [S, rope] (rotated), w_uk [nope, c] -> [S].
    """
    q_absorbed = w_uk.T @ q_nope  # [c]: W_UK folded into the query
    return (kv_latent @ q_absorbed + k_rope @ q_rope) * scale


def _naive_score(q_nope, q_rope, kv_latent, k_rope, w_uk, scale):
    k_nope = kv_latent @ w_uk.T  # [S, nope]: per-head keys, materialised
    return (k_nope @ q_nope + k_rope @ q_rope) * scale


def check_absorbed_score(fn) -> Verdict:
    """Exercise 1: fn(q_nope, q_rope, kv_latent, k_rope, w_uk, scale) -> scores [S] without building per-head keys."""
    g = torch.Generator().manual_seed(2)
    nope, rope, c, S, scale = 8, 4, 16, 7, 0.3
    args = (torch.randn(nope, generator=g), torch.randn(rope, generator=g), torch.randn(S, c, generator=g),
            torch.randn(S, rope, generator=g), torch.randn(nope, c, generator=g), scale)
    got, problem = attempt(fn, *args)
    if problem is not None:
        return problem
    if not isinstance(got, torch.Tensor):
        return not_yet(f"it should return a tensor of S={S} scores, got {type(got).__name__}.")
    expected = _naive_score(*args)
    if got.shape != expected.shape:
        return not_yet(f"the result has shape {tuple(got.shape)}; one score per cached token means shape ({S},).")
    if torch.allclose(got, expected, atol=1e-5):
        return correct("q·(W_UK c) = (W_UKᵀ q)·c: the per-head keys never had to exist.")
    if torch.allclose(got * scale, expected, atol=1e-5):
        return not_yet("the scores are missing the softmax scale factor `scale`.")
    if torch.allclose(got, (args[2] @ (args[4].T @ args[0])) * scale, atol=1e-5):
        return not_yet("the position part is missing: add k_rope @ q_rope (the decoupled RoPE key).")
    if torch.allclose(got, (args[3] @ args[1]) * scale, atol=1e-5):
        return not_yet("only the position part is there: add the content part kv_latent @ (W_UKᵀ q_nope).")
    return not_yet("the scores differ from q_nope·k_nope + q_rope·k_rope (times scale) with k_nope = W_UK c. "
                   "Fold W_UK into the query: a [c]-vector w_uk.T @ q_nope, then dot it with every latent.")


# ------------------------------------------------------------------------------------------ exercise 2
def solution_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """Bytes one token adds to the MLA cache of the whole model: (kv_lora_rank + qk_rope_head_dim) per layer."""
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * dtype_bytes


def check_cache_bytes_per_token(fn) -> Verdict:
    """Exercise 2: fn(cfg, dtype_bytes) -> MLA cache bytes per token for the whole model (all layers)."""
    cases = [
        (ModelConfig.deepseek_v32(), 2),
        (ModelConfig.deepseek_v32(), 1),
        (ModelConfig.small(), 4),
        (ModelConfig.tiny(kv_lora_rank=24, qk_rope_head_dim=6, num_hidden_layers=5), 2),
    ]
    for cfg, nbytes in cases:
        got, problem = attempt(fn, cfg, nbytes)
        if problem is not None:
            return problem
        want = solution_cache_bytes_per_token(cfg, nbytes)
        if got == want:
            continue
        per_layer = want // cfg.num_hidden_layers
        if got == per_layer:
            return not_yet("that is one layer's share: every one of the num_hidden_layers layers keeps its own cache.")
        if got == cfg.kv_bytes_per_token_per_layer("mha", dtype_bytes=nbytes) * cfg.num_hidden_layers:
            return not_yet("that is what MHA would cache (a K and V per head); MLA caches only the latent and k_rope.")
        if got == cfg.kv_lora_rank * cfg.num_hidden_layers * nbytes:
            return not_yet("the rope key is missing: each token also caches qk_rope_head_dim values of k_rope.")
        if got == want // nbytes:
            return not_yet("that counts values, not bytes: multiply by dtype_bytes.")
        return not_yet(f"for kv_lora_rank={cfg.kv_lora_rank}, qk_rope_head_dim={cfg.qk_rope_head_dim}, "
                       f"{cfg.num_hidden_layers} layers and {nbytes} bytes per value, got {got}.")
    return correct("576 values × 61 layers × 2 bytes = 70,272 B per token for DeepSeek-V3.2 in bf16.")


# ------------------------------------------------------------------------------------------ exercise 3
def solution_merged_output_weight(mla: MLA) -> torch.Tensor:
    """o_proj ∘ W_UV as one matrix `[hidden_size, H * kv_lora_rank]`: head i's block is W_O[:, i] @ W_UV_i."""
    H, v, c = mla.num_heads, mla.v_head_dim, mla.kv_lora_rank
    w_o = mla.o_proj.weight.view(-1, H, v)  # [d, H, v]
    return torch.einsum("dhv,hvc->dhc", w_o, mla.w_uv()).reshape(-1, H * c)


def check_merged_output_weight(fn) -> Verdict:
    """Exercise 3: fn(mla) -> W `[hidden_size, H * kv_lora_rank]` with W @ x == o_proj(W_UV x) for per-head
    latent outputs x `[H, kv_lora_rank]` (flattened)."""
    torch.manual_seed(3)
    mla = MLA(ModelConfig.tiny()).eval()
    H, c = mla.num_heads, mla.kv_lora_rank
    x = torch.randn(5, H, c)  # per-head weighted sums of latents, as in the absorbed path
    with torch.no_grad():
        expected = mla.o_proj(torch.einsum("nhc,hvc->nhv", x, mla.w_uv()).reshape(5, -1))
        got, problem = attempt(fn, mla)
    if problem is not None:
        return problem
    if not isinstance(got, torch.Tensor):
        return not_yet(f"it should return a tensor, got {type(got).__name__}.")
    want_shape = (mla.config.hidden_size, H * c)
    if tuple(got.shape) != want_shape:
        return not_yet(f"the merged weight has shape {tuple(got.shape)}; it maps H·kv_lora_rank = {H * c} inputs to "
                       f"hidden_size = {mla.config.hidden_size} outputs, so shape {want_shape}.")
    out = x.reshape(5, -1) @ got.detach().T
    if torch.allclose(out, expected, atol=1e-5):
        return correct("W_UV can live inside o_proj: decode never needs per-head values at all.")
    return not_yet("W @ x differs from o_proj(W_UV x). Split o_proj.weight into H column blocks of v_head_dim and "
                   "multiply block i by W_UV_i (mla.w_uv()[i], shape [v_head_dim, kv_lora_rank]).")
