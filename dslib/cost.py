"""What the work costs: FLOPs and bytes of the attention variants, counted from a config, and one timer (chapter 1).

The notebooks' pattern is "estimate, then measure": these formulas are the estimates (pure arithmetic on a
`ModelConfig`), `torch.utils.flop_counter.FlopCounterMode` and tensor sizes are the measurements, and an assert
says they agree. Wall-clock times are printed and plotted, never asserted (on a shared machine a ratio of two
times can invert); `wall_seconds` is the one place that takes them.

    attention_flops, kv_bytes_read, decode_costs                     MLA, naive vs absorbed (chapter 2)
    core_attention_flops, indexer_flops, attention_flops_per_token   dense vs sparse attention, DSA (chapter 3)
    wall_seconds, decode_step_time                                   time a call (CPU or GPU)

Sizes of the model itself (parameters, cache bytes per token) are methods of `ModelConfig`.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from dslib.config import ModelConfig

__all__ = [
    "attention_flops", "kv_bytes_read", "decode_costs",
    "core_attention_flops", "indexer_flops", "attention_flops_per_token",
    "wall_seconds", "decode_step_time",
]


# --------------------------------------------------------------------------------------------- MLA (chapter 2)
def attention_flops(cfg: ModelConfig, num_queries: int, num_keys: int, mode: str) -> dict[str, int]:
    """Matmul FLOPs (2 per multiply-add) of `MLA.attend` for one sequence, per term; "total" sums them.

    naive: up-project S latents (2·S·c·H·(nope+v)), q·k (2·H·T·S·(nope+rope)), p·v (2·H·T·S·v).
    absorbed: fold W_UK into q (2·T·H·nope·c), q·[c | k_rope] (2·H·T·S·(c+rope)), p·c (2·H·T·S·c),
    W_UV after attention (2·T·H·c·v). c = kv_lora_rank. Softmax and masking are not matmuls and are not counted.
    """
    H, c, nope, rope, v = (cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim,
                           cfg.qk_rope_head_dim, cfg.v_head_dim)
    T, S = num_queries, num_keys
    if mode == "naive":
        terms = {
            "expand_kv": 2 * S * c * H * (nope + v),
            "scores": 2 * H * T * S * (nope + rope),
            "weighted_sum": 2 * H * T * S * v,
        }
    elif mode == "absorbed":
        terms = {
            "absorb_q": 2 * T * H * nope * c,
            "scores": 2 * H * T * S * (c + rope),
            "weighted_sum": 2 * H * T * S * c,
            "absorb_out": 2 * T * H * c * v,
        }
    else:
        raise ValueError(f"mode must be 'absorbed' or 'naive', got {mode!r}.")
    terms["total"] = sum(terms.values())
    return terms


def kv_bytes_read(cfg: ModelConfig, num_keys: int, mode: str, *, dtype_bytes: int = 2) -> int:
    """Bytes of keys and values one decode step's attention reads per layer.

    absorbed: the latent cache itself, S·(kv_lora_rank + rope)·bytes (1,152 B per token in bf16 for the 671B).
    naive: per-head keys and values, S·H·(nope + rope + v)·bytes (81,920 B per token): what an MHA-mode engine
    would have to cache, or rebuild from the latents at every step.
    """
    if mode == "absorbed":
        return num_keys * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes
    if mode == "naive":
        return num_keys * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * dtype_bytes
    raise ValueError(f"mode must be 'absorbed' or 'naive', got {mode!r}.")


def decode_costs(cfg: ModelConfig, context_len: int, *, gqa_groups: int = 8, dtype_bytes: int = 2) -> dict[str, dict]:
    """Cache and compute of decoding one token at `context_len`, whole model, per attention scheme.

    For each of MHA (every head caches K and V), GQA with `gqa_groups` K/V heads of v_head_dim, MLA (bf16 latent
    cache, absorbed mode) and MLA with FlashMLA's FP8 cache: bytes per token per layer, cache bytes of one sequence
    (all layers), attention FLOPs per decoded token (all layers; MHA/GQA: 2·H·S·(d_k + d_v)), and the cache ratio
    against MHA and GQA. Pure arithmetic on `cfg` (the chapter's calculator).
    """
    H, S, L = cfg.num_attention_heads, context_len, cfg.num_hidden_layers
    mla_flops = attention_flops(cfg, 1, S, "absorbed")["total"]
    rows = {
        "MHA": (
            cfg.kv_bytes_per_token_per_layer("mha", dtype_bytes=dtype_bytes),
            2 * H * S * (cfg.qk_head_dim + cfg.v_head_dim),
        ),
        f"GQA-{gqa_groups}": (
            cfg.kv_bytes_per_token_per_layer("gqa", dtype_bytes=dtype_bytes, kv_heads=gqa_groups),
            2 * H * S * 2 * cfg.v_head_dim,
        ),
        "MLA": (cfg.kv_bytes_per_token_per_layer("mla", dtype_bytes=dtype_bytes), mla_flops),
        "MLA FP8": (cfg.kv_bytes_per_token_per_layer("mla_fp8"), mla_flops),
    }
    mha_bytes, gqa_bytes = rows["MHA"][0], rows[f"GQA-{gqa_groups}"][0]
    return {
        name: {
            "bytes_per_token_per_layer": per_token,
            "cache_bytes": per_token * L * S,
            "flops_per_token": flops * L,
            "vs_mha": mha_bytes / per_token,
            "vs_gqa": gqa_bytes / per_token,
        }
        for name, (per_token, flops) in rows.items()
    }


# --------------------------------------------------------------------------------------------- DSA (chapter 3)
def core_attention_flops(cfg: ModelConfig, seq_len: int, attention: str = "dense", *, k: int | None = None,
                         mode: str = "absorbed", skip_masked: bool = True) -> int:
    """Matmul FLOPs (2 per multiply-add) of the core attention of a causal prefill of `seq_len` tokens, one layer.

    The query at position t attends n_t = t + 1 keys (dense) or min(t + 1, k) keys (sparse / window). Per
    (query, key) pair and head: absorbed (MQA mode) 2·(C + R) for the score + 2·C for the weighted sum
    (C = kv_lora_rank, R = qk_rope_head_dim; 2·1,088 at the 671B dims); naive (MHA mode) 2·(nope + R) + 2·v.
    Projections are not included (they are the same for every attention).
    skip_masked=False counts what dslib's simple implementations compute: `dense_masked_attention` scores all
    L² pairs (half of them are masked afterwards) and `sparse_attention` computes all k slots of every query.
    """
    H, C, R = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    per_pair = 2 * H * (2 * C + R) if mode == "absorbed" else 2 * H * (cfg.qk_nope_head_dim + R + cfg.v_head_dim)
    L = seq_len
    k = k or cfg.index_topk
    if attention == "dense":
        pairs = L * (L + 1) // 2 if skip_masked else L * L
    elif skip_masked:
        m = min(k, L)
        pairs = m * (m + 1) // 2 + (L - m) * k  # rows 0..k-1 see t+1 keys, later rows exactly k
    else:
        pairs = L * k
    return per_pair * pairs


def indexer_flops(cfg: ModelConfig, seq_len: int, *, skip_masked: bool = True) -> int:
    """Matmul FLOPs of the lightning indexer's scores for a causal prefill of `seq_len` tokens, one layer:
    per (query, key) pair 2·index_n_heads·index_head_dim (q·k for every indexer head) + 2·index_n_heads (the
    weighted head sum). Still O(L²), but 8,192 MACs per pair at the 671B dims instead of MLA's 139,264."""
    pairs = seq_len * (seq_len + 1) // 2 if skip_masked else seq_len * seq_len
    return pairs * (2 * cfg.index_n_heads * cfg.index_head_dim + 2 * cfg.index_n_heads)


def attention_flops_per_token(cfg: ModelConfig, position: int, attention: str = "dense", *, phase: str = "decode",
                              fp8_indexer: bool = True) -> dict[str, float]:
    """Attention FLOPs for ONE token at `position` (it sees position + 1 keys), per layer, in bf16-equivalent
    FLOPs: {"core": ..., "indexer": ..., "total": ...}.

    phase "decode": MQA (absorbed) mode, as deployed; "prefill": MHA (naive) mode for dense attention (what
    prefill uses), MQA mode for DSA (FlashMLA's sparse prefill kernel). The indexer runs in FP8, at twice the bf16
    rate on Hopper: with `fp8_indexer` its FLOPs count half. Projections and MoE are not included.
    """
    n = position + 1
    H, C, R = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    mqa = 2 * H * (2 * C + R)
    mha = 2 * H * (cfg.qk_nope_head_dim + R + cfg.v_head_dim)
    if attention == "dense":
        core = n * (mha if phase == "prefill" else mqa)
        idx = 0.0
    elif attention == "sparse":
        core = min(n, cfg.index_topk) * mqa
        idx = n * (2 * cfg.index_n_heads * cfg.index_head_dim + 2 * cfg.index_n_heads) * (0.5 if fp8_indexer else 1.0)
    else:
        raise ValueError(f"attention must be 'dense' or 'sparse', got {attention!r}.")
    return {"core": float(core), "indexer": float(idx), "total": float(core + idx)}


# --------------------------------------------------------------------------------------------- time
def wall_seconds(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, reduce: str = "median",
                 threads: int | None = None) -> float:
    """Wall time of `fn()` in seconds: `warmup` untimed calls, then the median (or "min") of `repeats` timed ones.

    The minimum is the least disturbed run on a shared machine. CUDA work is waited for before each clock read
    (kernels run asynchronously). `threads`: intra-op CPU threads during the measurement (restored afterwards).
    """
    if reduce not in ("median", "min"):
        raise ValueError(f"reduce must be 'median' or 'min', got {reduce!r}.")
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return statistics.median(times) if reduce == "median" else min(times)


@torch.no_grad()
def decode_step_time(mla, num_keys: int, mode: str, *, batch: int = 1, **timing) -> float:
    """Wall time (s) of `mla.attend` (a `dslib.mla.MLA`) for one new token over `num_keys` cached latents (random
    data, the module's dtype and device). `timing`: `wall_seconds`'s repeats / reduce / threads."""
    p, cfg = next(mla.parameters()), mla.config
    H = cfg.num_attention_heads

    def rand(*shape):
        return torch.randn(*shape, dtype=p.dtype, device=p.device)

    q_nope, q_rope = rand(batch, 1, H, cfg.qk_nope_head_dim), rand(batch, 1, H, cfg.qk_rope_head_dim)
    kv_latent, k_rope = rand(batch, num_keys, cfg.kv_lora_rank), rand(batch, num_keys, cfg.qk_rope_head_dim)
    pos = torch.tensor([num_keys - 1], device=p.device)
    return wall_seconds(lambda: mla.attend(q_nope, q_rope, kv_latent, k_rope, pos, mode=mode), **timing)
