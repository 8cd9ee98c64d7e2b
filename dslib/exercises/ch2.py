"""Exercise checks of chapter 2 (MLA). Each `check_*` takes the learner's function and returns a Verdict."""
from __future__ import annotations

import torch

from dslib.config import ModelConfig
from dslib.exercises import Verdict, attempt, attempt_own, correct, fresh_generator, not_yet, same  # noqa: F401
from dslib.mla import MLA

__all__ = [
    "check_absorbed_score",
    "solution_absorbed_score",
    "check_cache_bytes_per_token",
    "solution_cache_bytes_per_token",
    "check_merged_output_weight",
    "solution_merged_output_weight",
    "check_absorbed_attention",
    "solution_absorbed_attention",
    "check_heads_at_ridge",
    "solution_heads_at_ridge",
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


# ---------------------------------------------------------------------------------- build it: absorbed attention
def _absorbed(mla: MLA, q_nope, q_rope, kv_latent, k_rope, q_positions, *, scale=True, rope=True, mask="position",
              out="o_proj"):
    """Absorbed attention from torch operations, with the variants the check recognises."""
    B, T, H, _ = q_nope.shape
    S = kv_latent.shape[1]
    q_abs = torch.einsum("bthd,hdc->bthc", q_nope, mla.w_uk())  # W_UK folded into the query
    scores = torch.einsum("bthc,bsc->bhts", q_abs, kv_latent)
    if rope:
        scores = scores + torch.einsum("bthr,bsr->bhts", q_rope, k_rope)
    if scale:
        scores = scores * mla.softmax_scale
    if mask is not None:
        rows = q_positions if mask == "position" else torch.arange(T)
        scores = scores.masked_fill(torch.arange(S)[None, :] > rows[:, None], float("-inf"))
    probs = scores.softmax(-1)
    x = torch.einsum("bhts,bsc->bthc", probs, kv_latent)  # [B, T, H, c]: weighted sum of the shared latents
    if out == "latent":
        return x
    o = torch.einsum("bthc,hvc->bthv", x, mla.w_uv())  # [B, T, H, v]
    if out == "heads":
        return o
    return mla.o_proj(o.reshape(B, T, -1))


def solution_absorbed_attention(mla: MLA, q_nope, q_rope, kv_latent, k_rope, q_positions):
    """MQA mode through to the output: q̃ = W_UKᵀ q_nope per head; scores q̃·c + q_rope·k_rope (scaled, causal by
    position); x = Σ_s p_s c_s per head; o = W_UV x; out = o_proj([o_1 | … | o_H]). `[B, T, hidden_size]`."""
    return _absorbed(mla, q_nope, q_rope, kv_latent, k_rope, q_positions)


_ABSORBED_HINT = ("Start by folding W_UK into the query: q_absorbed = torch.einsum('bthd,hdc->bthc', q_nope, "
                  "mla.w_uk()), then score it against every cached latent.")


def check_absorbed_attention(fn) -> Verdict:
    """Build it: `fn(mla, q_nope, q_rope, kv_latent, k_rope, q_positions) -> [B, T, hidden_size]`, MLA's absorbed
    attention through `o_proj`, compared with the naive (MHA-mode) path of `dslib.mla.MLA` on fresh random inputs
    (a prefill and a decode step). Per-head keys and values must never be built (kv_b_proj must not run)."""
    from dslib import mla as mla_module
    from dslib.config import ModelConfig
    from dslib.mla import dense_masked_attention

    g = fresh_generator()
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        layer = MLA(ModelConfig.tiny()).eval()
    H, nope, rope, c = layer.num_heads, layer.nope_dim, layer.rope_dim, layer.kv_lora_rank
    expanded = []
    hook = layer.kv_b_proj.register_forward_hook(lambda *_: expanded.append(True))
    try:
        for B, T, S in ((2, 5, 5), (2, 1, 9)):  # a prefill (queries at 0..4) and a decode step (at position 8)
            q_nope, q_rope = torch.randn(B, T, H, nope, generator=g), torch.randn(B, T, H, rope, generator=g)
            kv_latent, k_rope = torch.randn(B, S, c, generator=g), torch.randn(B, S, rope, generator=g)
            pos = torch.arange(S - T, S)
            args = (q_nope, q_rope, kv_latent, k_rope, pos)
            with torch.no_grad():
                want = layer.o_proj(layer.attend(*args, mode="naive").reshape(B, T, -1))
                expanded.clear()  # the reference ran kv_b_proj; only the learner's calls count
                got, failure = attempt_own(fn, layer, *(a.clone() for a in args), modules=(mla_module,),
                                           allow=(MLA.w_uk, MLA.w_uv), stub_hint=_ABSORBED_HINT)
            if failure is not None:
                return failure
            if expanded:
                return not_yet("it runs mla.kv_b_proj on the latents, which builds every head's keys and values "
                               "(the naive mode). Absorb instead: W_UK into the query, W_UV after the weighted sum.")
            case = "a decode step" if T == 1 else f"a prefill of {T} tokens"
            if not isinstance(got, torch.Tensor):
                return not_yet(f"it should return a tensor [B, T, hidden_size], got {type(got).__name__}.")
            if got.shape == (B, T, H, layer.v_head_dim):
                return not_yet("that is the per-head output o_i [B, T, H, v_head_dim]; finish with mla.o_proj over "
                               "each token's H·v_head_dim values (reshape to [B, T, H * v_head_dim] first).")
            if got.shape == (B, T, H, c):
                return not_yet("that is the weighted sum of latents per head [B, T, H, kv_lora_rank]; lift it with "
                               "W_UV (mla.w_uv(), [H, v_head_dim, kv_lora_rank]) and then apply mla.o_proj.")
            if got.shape != want.shape:
                return not_yet(f"for {case} the result has shape {list(got.shape)}, expected {list(want.shape)} = "
                               "[B, T, hidden_size].")
            got = got.detach()
            if same(got, want):
                continue
            with torch.no_grad():
                variants = [
                    (dict(scale=False), "the scores are missing mla.softmax_scale."),
                    (dict(rope=False), "the position part of the score is missing: add q_rope · k_rope (the decoupled "
                                       "RoPE key, one shared by all heads)."),
                    (dict(mask=None), "nothing stops a query from attending to later keys: mask key s for a query at "
                                      "position p when s > p (causal)."),
                    (dict(mask="index"), "the mask uses the query's index t instead of its position q_positions[t]: "
                                         "when decoding, the one query sits at the last position and sees every key."),
                ]
                hint = next((h for kw, h in variants if same(got, _absorbed(layer, *args, **kw))), None)
            if hint:
                return not_yet(hint)
            return not_yet(f"for {case} the output differs from the naive path's. Check each step: W_UK folded into "
                           "the query, scores over the latents plus the rope part, scale, causal mask, softmax over "
                           "the keys, weighted sum of the latents, W_UV, o_proj.")
    finally:
        hook.remove()
    return correct("the per-head keys and values never existed: one 576-wide latent per token served all heads. "
                   "Compare with dslib's version below.", compare=(MLA.attend, dense_masked_attention))


# --------------------------------------------------------------------------------- exercise: heads at the ridge
def solution_heads_at_ridge(context: int = 131_072) -> int:
    """The fewest query heads at which one absorbed decode step at `context` cached tokens does more FLOPs per byte
    of (bf16) latent cache than the H200's bf16 ridge (datasheet peaks): then it is compute-bound."""
    from dslib.config import H200_BF16_FLOPS, H200_HBM_BYTES_PER_S, ModelConfig
    from dslib.cost import attention_flops, kv_bytes_read

    big = ModelConfig.deepseek_v32()
    ridge = H200_BF16_FLOPS / H200_HBM_BYTES_PER_S
    for heads in range(1, 1025):
        cfg = big.replace(num_attention_heads=heads, num_key_value_heads=heads)
        if attention_flops(cfg, 1, context, "absorbed")["total"] / kv_bytes_read(cfg, context, "absorbed") > ridge:
            return heads
    raise AssertionError("unreachable")


def check_heads_at_ridge(answer) -> Verdict:
    """answer: the fewest query heads (DeepSeek-V3.2's other sizes, 128K cached tokens, bf16 cache) at which an
    absorbed decode step is compute-bound on an H200 (intensity above the bf16 ridge)."""
    if answer is None:
        return not_yet("no answer yet: replace None by a number of heads.")
    try:
        n = int(answer)
    except (TypeError, ValueError):
        return not_yet(f"the answer should be a whole number of heads, got {answer!r}.")
    from dslib.config import H200_BF16_FLOPS, H200_HBM_BYTES_PER_S, ModelConfig

    want = solution_heads_at_ridge()
    big = ModelConfig.deepseek_v32()
    ridge = H200_BF16_FLOPS / H200_HBM_BYTES_PER_S
    c, r = big.kv_lora_rank, big.qk_rope_head_dim
    if n == want:
        per_head = 2 * (c + r) + 2 * c
        return correct(f"{want} heads: a cached token costs each head 2·({c}+{r}) + 2·{c} = {per_head:,} FLOPs on "
                       f"{(c + r) * 2:,} bytes, {per_head / ((c + r) * 2):.2f} FLOP/B per head, against a ridge of "
                       f"{ridge:.0f}. DeepSeek-V3.2's 128 heads are above it; split over 8 GPUs (16 each) they are "
                       "far below.")
    if n == want - 1:
        return not_yet(f"at {n} heads the intensity is still just below the ridge ({ridge:.1f} FLOP/B): the step "
                       "must do MORE FLOPs per byte than the ridge.")
    if abs(n - ridge) <= 1.5:
        return not_yet(f"that is about the ridge itself ({ridge:.0f} FLOP/B): the head count if each head did one FLOP "
                       f"per byte. But per cached token a head does a {c + r}-wide score AND a {c}-wide weighted sum "
                       f"(2 FLOPs per multiply-add) on {(c + r) * 2} bytes: about "
                       f"{2 * (2 * c + r) / ((c + r) * 2):.2f} FLOP/B per head.")
    if abs(n - 2 * want) <= 2:
        return not_yet("that counts multiply-adds as one FLOP each; a multiply-add is 2 FLOPs.")
    if n == big.num_attention_heads:
        return not_yet("128 is the model's head count, already above the ridge; find the smallest count that is.")
    return not_yet(f"{n} is off. Intensity = attention_flops(cfg, 1, S, 'absorbed')['total'] / kv_bytes_read(cfg, "
                   "S, 'absorbed') with cfg = big.replace(num_attention_heads=h); compare with H200_BF16_FLOPS / "
                   "H200_HBM_BYTES_PER_S for growing h.")
