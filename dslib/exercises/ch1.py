"""Exercise checks of chapter 1 (KV caching).

1. `check_kv_bytes_per_token(fn)`: the cache bytes one token adds to a dense (MHA/GQA/MQA) model.
2. `check_max_context(gqa, dsa)`: the longest context 32 concurrent requests can have on one H200.
3. `check_generation_flops(fn)`: total FLOPs of greedy generation with and without a cache.
4. `check_cached_attention(fn)`: build it — the cache append and the cached attention step.
"""
from __future__ import annotations

import math

import torch

from dslib.attention import BaselineConfig, BaselineDecoder
from dslib.config import (
    GQA_REFERENCE,
    H200_MEMORY_BYTES,
    H200_MEMORY_MARKETED,
    ModelConfig,
    dense_kv_bytes_per_token_per_layer,
)
from dslib.exercises import Verdict, attempt, attempt_own, correct, fresh_generator, not_yet, same
from dslib.kv_cache import generate

__all__ = [
    "check_kv_bytes_per_token", "solution_kv_bytes_per_token",
    "check_max_context", "solution_max_context", "SERVING_BATCH",
    "check_generation_flops", "solution_generation_flops",
    "check_cached_attention", "solution_cached_attention",
]


# ---------------------------------------------------------------------------------------------- exercise 1
def solution_kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Every layer keeps one key and one value vector of `head_dim` per KV head."""
    return num_layers * 2 * num_kv_heads * head_dim * dtype_bytes


_KV_CASES = [  # (num_layers, num_kv_heads, head_dim, dtype_bytes)
    (GQA_REFERENCE["num_layers"], GQA_REFERENCE["num_kv_heads"], GQA_REFERENCE["head_dim"], 2),
    (61, 128, 128, 2),  # MHA with DeepSeek-V3.2's head count and V width
    (61, 1, 128, 2),  # MQA
    (2, 2, 16, 4),  # the notebook's tiny GQA model in fp32
    (3, 4, 8, 1),
]


def check_kv_bytes_per_token(fn) -> Verdict:
    """`fn(num_layers, num_kv_heads, head_dim, dtype_bytes) -> int`: whole-model cache bytes per token."""
    answers = []
    for case in _KV_CASES:
        got, failure = attempt(fn, *case)
        if failure is not None:  # a Verdict that is not ok is falsy
            return failure
        if not isinstance(got, (int, float)):
            return not_yet(f"for {case} it returned {got!r}; return a number of bytes (an int).")
        answers.append(got)
    expected = [solution_kv_bytes_per_token(*case) for case in _KV_CASES]
    if answers == expected:
        layers, kv_heads, head_dim, _ = _KV_CASES[0]
        return correct(f"e.g. {layers} layers x 2 (K, V) x {kv_heads} KV heads x {head_dim} x 2 B = {expected[0]:,} "
                       "bytes per token for the GQA reference model.")
    # A typical slip explains every answer at once.
    slips = [
        (lambda L, H, D, B: L * H * D * B, "it is half the right size: every token stores a key AND a value."),
        (lambda L, H, D, B: 2 * H * D * B, "it is the size of one layer: every layer has its own cache."),
        (lambda L, H, D, B: 2 * L * H * D, "it counts elements, not bytes: multiply by dtype_bytes."),
        (lambda L, H, D, B: 16 * L * H * D * B, "it counts bits, not bytes."),
    ]
    for slip, hint in slips:
        if all(math.isclose(a, slip(*case)) for a, case in zip(answers, _KV_CASES)):
            return not_yet(hint)
    i = next(i for i, (a, e) in enumerate(zip(answers, expected)) if a != e)
    layers, kv_heads, head_dim, dtype_bytes = _KV_CASES[i]
    return not_yet(f"for num_layers={layers}, num_kv_heads={kv_heads}, head_dim={head_dim}, dtype_bytes={dtype_bytes} "
                   f"it returned {answers[i]:,} but the cache holds {expected[i]:,} bytes per token.")


# ---------------------------------------------------------------------------------------------- exercise 2
SERVING_BATCH = 32  # concurrent requests sharing one H200


def _bytes_per_token() -> tuple[int, int, ModelConfig]:
    """Whole-model cache bytes per token: the GQA reference model in bf16, and DeepSeek-V3.2 (FP8 MLA + indexer)."""
    gqa = GQA_REFERENCE
    gqa_bytes = gqa["num_layers"] * dense_kv_bytes_per_token_per_layer(gqa["num_kv_heads"], gqa["head_dim"], 2)
    v32 = ModelConfig.deepseek_v32()
    dsa_bytes = v32.kv_cache_bytes("mla_fp8", 1) + v32.kv_cache_bytes("indexer", 1)
    return gqa_bytes, dsa_bytes, v32


def solution_max_context() -> tuple[int, int]:
    """Whole tokens only: floor(memory / (batch * bytes per token)), for GQA bf16 and V3.2's DSA cache."""
    gqa, dsa, _ = _bytes_per_token()
    return int(H200_MEMORY_BYTES // (SERVING_BATCH * gqa)), int(H200_MEMORY_BYTES // (SERVING_BATCH * dsa))


def check_max_context(gqa_tokens, dsa_tokens) -> Verdict:
    """Serving 32 requests at once on one H200 (`H200_MEMORY_BYTES`, the 150.75 GB it reports; cache only,
    weights ignored): the longest context each request can have, in whole tokens, for (a) the GQA-8 baseline in
    bf16 and (b) DeepSeek-V3.2's cache (FP8 MLA latent + FP8 indexer keys)."""
    if gqa_tokens is None or dsa_tokens is None:
        return not_yet("fill in both numbers (they are still None).")
    want_gqa, want_dsa = solution_max_context()
    gqa_bytes, dsa_bytes, v32 = _bytes_per_token()
    marketed = 141e9  # the datasheet's "141 GB", recognised as a slip
    mla_fp8 = v32.kv_cache_bytes("mla_fp8", 1)
    mla_bf16 = v32.kv_cache_bytes("mla", 1)
    answers = (("GQA", gqa_tokens, want_gqa, gqa_bytes), ("DSA", dsa_tokens, want_dsa, dsa_bytes))
    for name, got, want, per_token in answers:
        if got == want:
            continue
        if not isinstance(got, (int, float)):
            return not_yet(f"the {name} answer {got!r} is not a number.")
        budget = H200_MEMORY_BYTES / SERVING_BATCH
        slips = [
            (math.ceil(budget / per_token), "it rounds up, but the last token would not fit; count whole tokens."),
            (int(marketed // (SERVING_BATCH * per_token)),
             f"it uses the marketed {H200_MEMORY_MARKETED}; the series uses what the GPU reports, "
             f"H200_MEMORY_BYTES = {H200_MEMORY_BYTES:,} bytes (143,771 MiB)."),
            (int(H200_MEMORY_BYTES // per_token),
             f"that is the context of ONE request; {SERVING_BATCH} share the memory."),
        ]
        if name == "DSA":
            slips += [
                (int(budget // mla_fp8), "that counts the FP8 latent only; V3.2 also caches the indexer keys "
                                         "(132 B per token and layer)."),
                (int(budget // mla_bf16), "that is the bf16 MLA cache (1,152 B per token and layer); use the FP8 "
                                          "format (656) + indexer keys (132)."),
            ]
        hint = next((h for value, h in slips if got == value), "")
        if hint:
            return not_yet(f"{name}: {hint}")
        return not_yet(f"{name}: {got:,} is not it. One token of one request takes {per_token:,} bytes (all layers); "
                       f"how many tokens per request fit when {SERVING_BATCH} requests share "
                       f"{H200_MEMORY_BYTES:,} bytes?")
    return correct(f"{want_gqa:,} tokens per request with GQA vs {want_dsa:,} with DeepSeek-V3.2's cache: "
                   f"{want_dsa / want_gqa:.1f}x longer contexts on the same GPU.")


# ---------------------------------------------------------------------------------------------- exercise 3
def solution_generation_flops(cfg: BaselineConfig, prompt_len: int, new_tokens: int, use_cache: bool) -> int:
    """FLOPs of `generate(model, prompt, new_tokens, use_cache=...)` for one sequence
    (see BaselineConfig.forward_flops).

    With a cache: one prefill of the prompt, then one single-token step per further new token, attending over
    all tokens so far. Without: every step runs the whole sequence so far (the last new token is never fed in).
    """
    if use_cache:
        decode = sum(cfg.forward_flops(1, prompt_len + i) for i in range(1, new_tokens))
        return cfg.forward_flops(prompt_len) + decode
    return sum(cfg.forward_flops(prompt_len + i) for i in range(new_tokens))


def _measured_generation_flops(model, prompt_len: int, new_tokens: int, use_cache: bool) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.arange(prompt_len, dtype=torch.long)[None] % model.config.vocab_size
    with FlopCounterMode(display=False) as counter:
        generate(model, ids, new_tokens, use_cache=use_cache)
    return counter.get_total_flops()


def check_generation_flops(fn) -> Verdict:
    """`fn(cfg, prompt_len, new_tokens, use_cache) -> int`: compared with FLOPs counted by
    `torch.utils.flop_counter.FlopCounterMode` while `dslib.kv_cache.generate` runs a small model."""
    cfg = BaselineConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BaselineDecoder(cfg).eval()
    for prompt_len, new_tokens in ((4, 1), (4, 5)):  # few steps: counting FLOPs slows every op down
        for use_cache in (True, False):
            got, failure = attempt(fn, cfg, prompt_len, new_tokens, use_cache)
            if failure is not None:  # a Verdict that is not ok is falsy
                return failure
            case = f"prompt_len={prompt_len}, new_tokens={new_tokens}, use_cache={use_cache}"
            if not isinstance(got, (int, float)):
                return not_yet(f"for {case} it returned {got!r}; return a number of FLOPs.")
            measured = _measured_generation_flops(model, prompt_len, new_tokens, use_cache)
            if got == measured:
                continue
            hint = ""
            final = prompt_len + new_tokens
            if use_cache and got == measured + cfg.forward_flops(1, final):
                hint = "one step too many: the last new token is returned, never fed back into the model."
            elif use_cache and got == measured - cfg.forward_flops(prompt_len):
                hint = "the prefill is missing: step 0 runs the whole prompt."
            elif not use_cache and got == measured + cfg.forward_flops(final):
                hint = "one step too many: the last new token is returned, never fed back into the model."
            elif use_cache and got == solution_generation_flops(cfg, prompt_len, new_tokens, False):
                hint = "that is the cost without a cache: with one, each decode step runs a single token."
            return not_yet(f"for {case} you get {got:,} FLOPs, but {measured:,} were counted "
                           f"(ratio {got / measured:.3f}). {hint}".strip())
    return correct("the cache turns the cost of each step from O(p^2) into O(p): total attention work becomes "
                   "quadratic instead of cubic in the length.")


# ------------------------------------------------------------------------------ build it: the cached attention step
def _attend(q, k, v, first_pos, *, causal="position", scale=True, groups="interleave"):
    """Attention of T queries at positions first_pos.. over S keys at 0..S-1, with the variants the check
    recognises: causal "position" (right), "index" (query t sees keys 0..t), None (no mask); groups
    "interleave" (head h -> KV head h // G, right) or "repeat" (h -> h % KVH)."""
    B, H, T, hd = q.shape
    KVH, S = k.shape[1], k.shape[2]
    G = H // KVH
    if groups == "interleave":
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    else:
        k, v = k.repeat(1, G, 1, 1), v.repeat(1, G, 1, 1)
    scores = q @ k.transpose(-1, -2)
    if scale:
        scores = scores * hd**-0.5
    if causal is not None:
        rows = torch.arange(T)[:, None] + (first_pos if causal == "position" else 0)
        scores = scores.masked_fill(torch.arange(S)[None, :] > rows, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def solution_cached_attention(q, k_new, v_new, k_cache, v_cache):
    """Append the new tokens' keys and values to the cache (dim 2, the tokens), then attend over all of them.
    The T new tokens sit at positions S..S+T-1 and each sees every key at or before its own position; query head
    h reads KV head h // (H // KVH)."""
    S = k_cache.shape[2]
    k_all, v_all = torch.cat([k_cache, k_new], dim=2), torch.cat([v_cache, v_new], dim=2)  # [B, KVH, S + T, hd]
    return _attend(q, k_all, v_all, S), k_all, v_all


_STEP_HINT = ("Start with the cache: k_all = torch.cat([k_cache, k_new], dim=2) (the token dimension), the same for "
              "v; then attend with the new tokens at positions S..S+T-1.")


def check_cached_attention(fn) -> Verdict:
    """Build it: `fn(q, k_new, v_new, k_cache, v_cache) -> (out, k_cache, v_cache)`, one attention step with a
    KV cache, compared with `dslib.attention.causal_attention` on fresh random inputs: a decode step (T = 1), a
    chunk of new tokens (T > 1, causal inside the chunk), the first step (empty cache), GQA and MHA heads."""
    from dslib import attention, kv_cache
    from dslib.attention import Attention, causal_attention

    g = fresh_generator()
    cases = [  # (B, H, KVH, T, S, hd)
        (2, 4, 2, 1, 6, 8),   # decode one token, GQA
        (1, 4, 2, 3, 5, 8),   # a chunk of 3 new tokens after 5 cached ones
        (2, 4, 4, 4, 0, 8),   # the first step: nothing cached yet (MHA)
        (1, 6, 2, 2, 7, 4),   # 3 query heads per KV head
    ]
    for B, H, KVH, T, S, hd in cases:
        q = torch.randn(B, H, T, hd, generator=g)
        k_new, v_new = torch.randn(B, KVH, T, hd, generator=g), torch.randn(B, KVH, T, hd, generator=g)
        k_cache, v_cache = torch.randn(B, KVH, S, hd, generator=g), torch.randn(B, KVH, S, hd, generator=g)
        args = (q, k_new, v_new, k_cache, v_cache)
        got, failure = attempt_own(fn, *(a.clone() for a in args), modules=(attention, kv_cache), stub_hint=_STEP_HINT)
        if failure is not None:
            return failure
        case = f"(B={B}, H={H} query heads, {KVH} KV heads, T={T} new tokens after S={S} cached)"
        if not (isinstance(got, tuple) and len(got) == 3 and all(isinstance(t, torch.Tensor) for t in got)):
            return not_yet(f"return three tensors: (out, k_cache, v_cache); got {type(got).__name__}.")
        out, k_all, v_all = got
        want_k, want_v = torch.cat([k_cache, k_new], dim=2), torch.cat([v_cache, v_new], dim=2)
        want_out = causal_attention(q, want_k, want_v, torch.arange(S, S + T))
        if k_all.shape[2] == S and S > 0 or torch.equal(k_all, k_cache):
            return not_yet(f"the returned cache still holds the S={S} old tokens only: append k_new and v_new "
                           "to it (torch.cat along dim 2, the token dimension) and return the grown cache.")
        if k_all.shape != want_k.shape or v_all.shape != want_v.shape:
            return not_yet(f"{case}: the returned cache has shape {list(k_all.shape)}, expected "
                           f"{list(want_k.shape)} = [B, KVH, S + T, hd]: concatenate along dim 2, the tokens.")
        if not (same(k_all, want_k, atol=0) and same(v_all, want_v, atol=0)):
            return not_yet("the returned cache is not [old tokens, then new tokens]: keep the cached ones first "
                           "and append k_new / v_new after them (keys with keys, values with values).")
        if not isinstance(out, torch.Tensor) or out.shape != want_out.shape:
            shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            return not_yet(f"{case}: the output has shape {shape}, expected {list(want_out.shape)} = [B, H, T, hd] "
                           "(one vector per query head and new token).")
        if same(out, want_out):
            continue
        kc, vc = k_cache, v_cache
        variants = [
            (S > 0 and same(out, _attend(q, kc, vc, S, causal=None)),
             "the new tokens attend to the old cache only and do not see themselves: append first, then attend "
             "over all S + T keys."),
            (T > 1 and same(out, _attend(q, want_k, want_v, S, causal=None)),
             f"with a chunk of T={T} new tokens, a token must not see the new tokens after it: mask the keys at "
             "positions after its own (S + t for new token t)."),
            (S > 0 and same(out, _attend(q, want_k, want_v, S, causal="index")),
             "the causal mask ignores the cache: new token t sits at position S + t, so it sees keys 0 .. S + t, "
             "not 0 .. t."),
            (H != KVH and same(out, _attend(q, want_k, want_v, S, groups="repeat")),
             f"query head h belongs to KV head h // (H // KVH) (consecutive query heads share one, here "
             f"{H // KVH} per KV head): repeat_interleave the KV heads, not repeat them."),
            (same(out, _attend(q, want_k, want_v, S, scale=False)),
             "the scores are missing the scale 1 / sqrt(head_dim)."),
        ]
        hint = next((h for hit, h in variants if hit), None)
        if hint:
            return not_yet(hint)
        return not_yet(f"{case}: the output differs from softmax(q·kᵀ / sqrt(hd), causal by position)·v over the "
                       "S + T cached keys; check the mask, the head grouping and the softmax dimension (the keys).")
    return correct("append, then attend: each step adds one key and value per KV head and reads all of them once. "
                   "Compare with dslib's version below.", compare=(Attention.forward, causal_attention))
