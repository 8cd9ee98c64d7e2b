"""Writes notebooks/02_mla.ipynb (run from the repository root: python notebooks/build/02_mla.py).

The notebook is generated so that its cells stay small and reviewable as Python; edit here, re-run, then run it
through nbval. It is written without outputs.
"""
from nbbuild import Notebook

nb = Notebook("02_mla.ipynb", ids="mla-{:02d}")
md, code = nb.md, nb.code


# ------------------------------------------------------------------------------------------------ title
md(r"""
# Chapter 2 — Multi-head Latent Attention (MLA)

Chapter 1 ended at the **memory wall**: a classic multi-head attention (MHA) cache stores a key and a value for
every head, every layer and every token, and at DeepSeek-V3.2's size that is far more memory than a GPU has.
DeepSeek's answer, kept unchanged from V2 to V3.2, is **Multi-head Latent Attention**: cache one small *latent*
vector per token and layer, and recover every head's keys and values from it.

**What you will learn**

1. Why the keys and values of all heads can share one compressed latent (a low-rank argument you can measure).
2. MLA's down- and up-projections, with the official checkpoint's parameter names (`dslib.mla.MLA`).
3. Why rotary position embeddings (RoPE) break the trick that makes MLA cheap, and the *decoupled* 64-dim rope key that fixes it (`dslib.rope`, incl. YaRN).
4. The two ways to compute MLA — **naive** (MHA mode) and **absorbed** (MQA mode) — and why decoding uses the absorbed one: equality, time, FLOPs and bytes.
5. The measured cache size per token, in bf16 and in DeepSeek's FP8 cache format, against MHA and GQA.
""")

code(r"""
import math
import os

import ipywidgets as widgets
import plotly
import torch
from IPython.display import display
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

import dslib
from dslib import ModelConfig, show, viz
from dslib.config import GQA_REFERENCE, H200_BF16_FLOPS, H200_HBM_BYTES_PER_S
from dslib.exercises import ch2 as exercises
from dslib.cost import attention_flops, decode_costs, decode_step_time, kv_bytes_read
from dslib.mla import MLA, LatentCache, MLAStack, dense_masked_attention, fp8_pack_latent, fp8_unpack_latent
from dslib.rope import (RotaryEmbedding, apply_rope_interleaved, rope_inv_freq, softmax_scale,
                        yarn_correction_range)

torch.manual_seed(0)
torch.set_num_threads(2)
print(f"dslib {dslib.__version__} | torch {torch.__version__} | plotly {plotly.__version__} | ipywidgets {widgets.__version__}")
""")

code(r"""
FAST = os.environ.get("DSLIB_FAST") == "1"  # CI: same code path, smaller sizes
SEED = 0
LOWRANK_TOKENS = 512 if FAST else 1024  # tokens (rows) in the low-rank demo
SPECTRUM_DECAY = 1.0  # simulated hidden states: singular values fall like i^-SPECTRUM_DECAY
PREFILL_TOKENS = 12  # a short sequence for equality checks
DECODE_STEPS = 4  # tokens decoded one by one after the prefill
CONTEXTS = [256, 1024, 4096] if FAST else [128, 256, 512, 1024, 2048, 4096]  # decode timing
TIME_REPEATS = 5 if FAST else 7
TIME_THREADS = 1  # one decode step is too small to split; on a busy machine a 2nd thread mostly waits
FLOP_CONTEXT = 256  # cached tokens for the FLOP / byte count
CACHE_TOKENS = 8  # tokens pushed through 61 layers to measure cache bytes
LONG_CONTEXT = 128 * 1024  # "128K"
GQA_GROUPS = GQA_REFERENCE["num_kv_heads"]  # the series' GQA-8 baseline (chapter 1): 8 K/V heads of 128 dims
HEATMAP_TOKENS, HEATMAP_PERIOD, HEATMAP_INIT_STD = 24, 6, 0.15
""", tags=["parameters"])

# ------------------------------------------------------------------------------------------------ 1. memory wall
md(r"""
## 1. The memory wall, once more

`ModelConfig.deepseek_v32()` is the 671B model. With plain MHA, each of its heads would cache a key of
`qk_head_dim` values and a value of `v_head_dim` values per token, in bf16 (2 bytes):
""")

code(r"""
big = ModelConfig.deepseek_v32()
mha_per_layer = big.kv_bytes_per_token_per_layer("mha")
estimate = big.num_attention_heads * (big.qk_head_dim + big.v_head_dim) * 2
assert mha_per_layer == estimate
mha_128k = big.kv_cache_bytes("mha", LONG_CONTEXT)
print(f"MHA: {big.num_attention_heads} heads x ({big.qk_head_dim} + {big.v_head_dim}) values x 2 B = "
      f"{mha_per_layer:,} B per token per layer")
print(f"x {big.num_hidden_layers} layers x {LONG_CONTEXT:,} tokens = {mha_128k / 1e9:,.0f} GB for ONE 128K sequence")
""")

# ------------------------------------------------------------------------------------------------ 2. low rank
md(r"""
## 2. The low-rank idea: keys and values share a few directions

Every head's key and value are linear functions of the *same* hidden state h: $k_i = W_{K,i} h$, $v_i = W_{V,i} h$.
Stack the keys and values of all heads for N tokens into one matrix `[N, H·(d_k + d_v)]`: whatever its width,
its rank is at most the hidden size d. And when the hidden states themselves concentrate in fewer directions
(their singular values decay, as activations of trained models do), a rank-r approximation with r ≪ d loses
little. MLA builds this in: a learned **down-projection** to an r = `kv_lora_rank` latent, cached, and learned
**up-projections** that turn the latent back into every head's key and value.

We measure it on the notebooks' small config with simulated hidden states whose spectrum decays like
$i^{-1}$ (random weights: this shows the linear algebra, not what training learns).
""")

code(r"""
small = ModelConfig.small()
d, H = small.hidden_size, small.num_attention_heads
g = torch.Generator().manual_seed(SEED)
spectrum = torch.arange(1, d + 1, dtype=torch.float32) ** -SPECTRUM_DECAY  # importance of each hidden direction
basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
hidden = (torch.randn(LOWRANK_TOKENS, d, generator=g) * spectrum) @ basis.T  # [N, d]
w_kv = torch.randn(d, H * (small.qk_head_dim + small.v_head_dim), generator=g) / d**0.5  # W_K | W_V, all heads
kv = hidden @ w_kv  # [N, H·(d_k + d_v)]: what an MHA cache would hold
U, sigma, Vh = torch.linalg.svd(kv, full_matrices=False)  # singular values, largest first
rank = int((sigma > sigma[0] * max(kv.shape) * torch.finfo(kv.dtype).eps).sum())  # numerical rank
assert rank <= d < kv.shape[1]
print(f"[K | V] is {tuple(kv.shape)} but has rank {rank} <= hidden size {d}")
""")

md(r"""
The best rank-r approximation (truncated SVD) loses exactly the energy of the singular values it drops,
$\sum_{i>r}\sigma_i^2 / \sum_i \sigma_i^2$ (Eckart–Young). Estimate that from the spectrum, then measure it:
""")

code(r"""
r = small.kv_lora_rank
estimate = float((sigma[r:] ** 2).sum() / (sigma**2).sum())
kv_r = U[:, :r] @ torch.diag(sigma[:r]) @ Vh[:r]  # the best rank-r approximation
measured = float((kv - kv_r).norm() ** 2 / kv.norm() ** 2)
assert abs(estimate - measured) < 1e-4
print(f"rank r = kv_lora_rank = {r}: relative error² {measured:.4f} (estimated {estimate:.4f}); "
      f"the cache would shrink from {kv.shape[1]} to {r} values per token")
viz.low_rank_figure(sigma.tolist(), {"kv_lora_rank": r, "hidden size d": d})
""")

# ------------------------------------------------------------------------------------------------ 3. projections
md(r"""
## 3. MLA's down- and up-projections

For each token, MLA computes ([DeepSeek-V2's MLA](../docs/references.md#ch2); names are the checkpoint's):

| step | formula | parameter |
|---|---|---|
| KV down | $[c_{raw} \,\|\, k^R_{raw}] = W_{DKV} h$ | `kv_a_proj_with_mqa` |
| latent | $c^{KV} = \mathrm{RMSNorm}(c_{raw})$ — **cached** | `kv_a_layernorm` |
| rope key | $k^R = \mathrm{RoPE}(k^R_{raw})$, one for all heads — **cached** | — |
| KV up | $[k^C_i \,\|\, v_i] = W_{UKV,i}\, c^{KV}$ per head | `kv_b_proj` (= $W_{UK}$, $W_{UV}$) |
| query | $c^Q = \mathrm{RMSNorm}(W_{DQ} h)$, $[q^C_i \,\|\, q^R_i] = W_{UQ,i} c^Q$ | `q_a_proj`, `q_a_layernorm`, `q_b_proj` |
| output | $u = W_O [o_1 \| \dots \| o_H]$ | `o_proj` |

The whole cache is what `project_kv` returns:
""")

code(r"""
show(MLA.project_kv)
""")

md(r"""
The 671B model's attention, built on PyTorch's `meta` device (shapes only, no memory), has exactly the
checkpoint's tensors; its parameter count matches the config's accounting from chapter 1:
""")

code(r"""
with torch.device("meta"):
    big_mla = MLA(big)
for name, p in big_mla.named_parameters():
    print(f"{name:28s} {str(tuple(p.shape)):>14s}")
n_params = sum(p.numel() for p in big_mla.parameters())
assert n_params == big.param_counts()["attention"]
print(f"{n_params:,} parameters per layer")
""")

md(r"""
Now a real (small) one. Run a prefill with a `LatentCache`: the cache holds the latent and the rope key per
token, `kv_lora_rank + qk_rope_head_dim` values, no matter how many heads there are.
""")

code(r"""
mla = MLA(small).eval()
h = torch.randn(2, PREFILL_TOKENS, small.hidden_size)
cache = LatentCache()
with torch.no_grad():
    out = mla(h, cache=cache)
per_token = cache.nbytes // (2 * PREFILL_TOKENS)
assert out.shape == h.shape and per_token == (small.kv_lora_rank + small.qk_rope_head_dim) * 4  # fp32
print(cache)
print(f"kv_latent {tuple(cache.kv_latent.shape)}, k_rope {tuple(cache.k_rope.shape)}: {per_token} B per token (fp32)")
""")

# ------------------------------------------------------------------------------------------------ 4. rope
md(r"""
## 4. The RoPE problem, and the decoupled rope key

The reason the latent cache is *cheap to use* is **absorption**: the score of head i is
$q^C_i \cdot k^C_i = q^C_i \cdot (W_{UK,i}\, c) = (W_{UK,i}^\top q^C_i) \cdot c$, so we can fold $W_{UK,i}$ into the
query once and dot it with the cached latents directly — the per-head keys never need to exist.

RoPE breaks this. It rotates the query by its position p and the key by its position s, so if RoPE were applied
to the whole key, $k_s = R_s W_{UK} c_s$ and the score becomes
$(R_p q)^\top R_s W_{UK} c_s = q^\top R_{s-p} W_{UK} c_s$: the matrix between the query and the latent depends on the
key's position. No single absorbed query works for all keys. Let us check that numerically, for one head of our
small model, with RoPE (hypothetically) on all of its content dimensions:
""")

code(r"""
w_uk = mla.w_uk()[0].detach()  # head 0: [nope, kv_lora_rank]
rotate_all = RotaryEmbedding(small.replace(qk_rope_head_dim=small.qk_nope_head_dim))  # thought experiment only
S, p = PREFILL_TOKENS, PREFILL_TOKENS - 1


def rope_at(x, positions):
    cos, sin = rotate_all(positions)
    return apply_rope_interleaved(x, cos, sin)


q = rope_at(torch.randn(1, 1, small.qk_nope_head_dim), torch.tensor([p]))  # rotated query [1, 1, nope]
latents = torch.randn(1, S, small.kv_lora_rank)
true_scores = (q * rope_at(latents @ w_uk.T, torch.arange(S))).sum(-1)  # rotate every full key
absorbed = latents @ (w_uk.T @ q[0, 0])  # fold W_UK into the query once
error = (true_scores - absorbed).abs()[0]
assert error[0] < 1e-4 and error[1:].min() > 1e-3  # only the key at position 0 (no rotation) agrees
print("|true - absorbed| per key position:", [f"{e:.2f}" for e in error.tolist()])
""")

md(r"""
DeepSeek's fix (**decoupled RoPE**): keep the content part $q^C, k^C$ free of rotation (absorbable) and add a
separate, small positional part: per head a rope query $q^R_i$ (`qk_rope_head_dim` dims, from `q_b_proj`) and
**one rope key $k^R$ shared by all heads**, computed straight from h by `kv_a_proj_with_mqa` and cached next to the
latent. Score $= (q^C_i\cdot k^C_i + q^R_i \cdot k^R)\cdot$ scale. `project_q` splits each head as `[nope | rope]`
and rotates only the rope part:
""")

code(r"""
show(MLA.project_q)
""")

md(r"""
MLA rotates **interleaved** pairs $(x_{2i}, x_{2i+1})$, like DeepSeek's reference code (the chapter-3 indexer uses
the half-split pairing, `apply_rope_half`). Each pair turns at its own frequency:
""")

code(r"""
show(apply_rope_interleaved)
""")

md(r"""
**YaRN** stretches the context the model was pre-trained for (`original_max_position_embeddings`) to
`max_position_embeddings`: pairs that turn slowly (whose wavelength exceeds the
original context) are slowed down by `factor`, fast ones keep their frequency, the ones in between are blended;
and the softmax scale grows by $m^2$ with $m = 0.1\ln(\text{factor}) + 1$ ([YaRN, as DeepSeek configures it](../docs/references.md#ch2)).
""")

code(r"""
low, high = yarn_correction_range(big)
plain = rope_inv_freq(big.replace(rope_scaling=None))
yarn = rope_inv_freq(big)
factor = big.rope_scaling["factor"]
assert torch.allclose(yarn[: low + 1], plain[: low + 1]) and torch.allclose(yarn[high:], plain[high:] / factor)
m = 0.1 * big.rope_scaling["mscale_all_dim"] * math.log(factor) + 1
scale = softmax_scale(big)
assert abs(scale - big.qk_head_dim**-0.5 * m**2) < 1e-12
print(f"context {big.rope_scaling['original_max_position_embeddings']:,} -> {big.max_position_embeddings:,} tokens "
      f"(factor {factor:g})")
print(f"blend range: pairs {low}..{high}; mscale {m:.6f}; softmax scale {scale:.6f} "
      f"(vs {big.qk_head_dim ** -0.5:.6f} without YaRN)")
viz.rope_frequencies_figure(plain.tolist(), yarn.tolist(), low, high)
""")

# ------------------------------------------------------------------------------------------------ 5. naive vs absorbed
md(r"""
## 5. Naive (MHA mode) vs absorbed (MQA mode)

Both paths start from the same cache. **Naive**: up-project every cached latent to per-head keys `[S, H, nope+rope]`
and values `[S, H, v]` (`expand_kv`), then ordinary attention. **Absorbed**: fold $W_{UK}$ into the query
($\tilde q_i = W_{UK,i}^\top q^C_i$, `kv_lora_rank` wide), attend over the latents with one shared key
$[c^{KV} \| k^R]$ and one shared value $c^{KV}$ for all heads (that is MQA), then apply $W_{UV}$ after the weighted sum:
$o_i = W_{UV,i} \sum_s p_s c_s$. Exact, because $\sum_s p_s (W_{UV} c_s) = W_{UV} \sum_s p_s c_s$. At the 671B sizes:
""")

code(r"""
viz.mla_dataflow_diagram(big)
""")

md(r"""
The naive path, as `MLA` computes it: every cached latent is up-projected by `kv_b_proj` into per-head keys
(`[k^C_i | k^R]`, the rope key copied to every head) and values, then ordinary attention.
""")

code(r"""
show(MLA.expand_kv)
""")

md(r"""
The absorbed path you will write yourself in **Exercise 1**, from the four formulas above:
$\tilde q_i = W_{UK,i}^\top q^C_i$; score $= (\tilde q_i \cdot c_s + q^R_i \cdot k^R_s)\cdot$scale, causal;
$x_i = \sum_s p_s c_s$; $o_i = W_{UV,i} x_i$, then `o_proj`. Its check compares your function with the naive path
and then shows dslib's `MLA.attend` and `dense_masked_attention`. Here, `mla(..., mode=...)` runs both:
""")

md(r"""
Same numbers, for a prefill and for token-by-token decoding with the cache (which also equals one full forward):
""")

code(r"""
T = PREFILL_TOKENS + DECODE_STEPS
x = torch.randn(2, T, small.hidden_size)
with torch.no_grad():
    full = {mode: mla(x, mode=mode) for mode in ("naive", "absorbed")}
    steps = {}
    for mode in ("naive", "absorbed"):
        c = LatentCache()
        outs = [mla(x[:, :PREFILL_TOKENS], cache=c, mode=mode)]
        outs += [mla(x[:, t : t + 1], cache=c, mode=mode) for t in range(PREFILL_TOKENS, T)]
        steps[mode] = torch.cat(outs, dim=1)
gap = (full["naive"] - full["absorbed"]).abs().max().item()
assert torch.allclose(full["naive"], full["absorbed"], atol=1e-5)
assert all(torch.allclose(steps[m], full["absorbed"], atol=1e-5) for m in steps)
print(f"max |naive - absorbed| = {gap:.1e}; cached decode == full forward in both modes")
""")

md(r"""
**Time.** One decode step's attention over S cached tokens, both modes, on this CPU (the small config; best of
`TIME_REPEATS` runs, since on a shared machine the fastest run is the least disturbed one; look at the trend more
than at the absolute numbers):
""")

code(r"""
times = {mode: [decode_step_time(mla, n, mode, repeats=TIME_REPEATS, reduce="min", threads=TIME_THREADS)
                for n in tqdm(CONTEXTS, desc=mode)]
         for mode in ("naive", "absorbed")}
speedup = times["naive"][-1] / times["absorbed"][-1]   # reported, not asserted: the counted work is checked below
print(f"at {CONTEXTS[-1]:,} cached tokens: naive {times['naive'][-1] * 1e3:.2f} ms, "
      f"absorbed {times['absorbed'][-1] * 1e3:.2f} ms per token ({speedup:.1f}x)")
viz.decode_time_figure(CONTEXTS, times)
""")

md(r"""
**FLOPs and bytes.** The formulas (`attention_flops`, `kv_bytes_read`) against what actually runs: PyTorch's
`FlopCounterMode` counts the matmul FLOPs of one decode step, and the bytes are the key/value tensors each mode
attends over (the per-head K/V that `expand_kv` builds vs the cached latents).
""")

code(r"""
show(attention_flops)
""")

code(r"""
H = small.num_attention_heads
q_nope = torch.randn(1, 1, H, small.qk_nope_head_dim)
q_rope = torch.randn(1, 1, H, small.qk_rope_head_dim)
lat = torch.randn(1, FLOP_CONTEXT, small.kv_lora_rank)
k_r = torch.randn(1, FLOP_CONTEXT, small.qk_rope_head_dim)
pos = torch.tensor([FLOP_CONTEXT - 1])
flops = {}
for mode in ("naive", "absorbed"):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        mla.attend(q_nope, q_rope, lat, k_r, pos, mode=mode)
    flops[mode] = counter.get_total_flops()
    assert flops[mode] == attention_flops(small, 1, FLOP_CONTEXT, mode)["total"]
with torch.no_grad():
    k_heads, v_heads = mla.expand_kv(lat, k_r)
measured_bytes = {"naive": k_heads.nbytes + v_heads.nbytes, "absorbed": lat.nbytes + k_r.nbytes}
for mode in flops:
    assert measured_bytes[mode] == kv_bytes_read(small, FLOP_CONTEXT, mode, dtype_bytes=4)
    print(f"{mode:9s}: {flops[mode] / FLOP_CONTEXT:>9,.0f} FLOP and {measured_bytes[mode] / FLOP_CONTEXT:>6,.0f} B "
          f"of keys/values per cached token (fp32, small config)")
""")

md(r"""
At the 671B model's sizes the same formulas give the trade-off that decides which mode runs where. Per cached
token, the absorbed path does more arithmetic than MHA over ready-made per-head K/V (a `kv_lora_rank`-wide dot
product per head instead of `qk_head_dim`), but it reads far fewer bytes; naive MLA without a per-head cache must
re-expand every latent at every step, which costs the most of all:
""")

code(r"""
f_abs = attention_flops(big, 1, LONG_CONTEXT, "absorbed")
f_naive = attention_flops(big, 1, LONG_CONTEXT, "naive")
mha_flops = f_naive["scores"] + f_naive["weighted_sum"]  # MHA over a cache of per-head K/V
rows = {
    "MHA, per-head K/V cached": (mha_flops, kv_bytes_read(big, LONG_CONTEXT, "naive")),
    "MLA naive (re-expand)": (f_naive["total"], kv_bytes_read(big, LONG_CONTEXT, "absorbed")),
    "MLA absorbed": (f_abs["total"], kv_bytes_read(big, LONG_CONTEXT, "absorbed")),
}
for name, (f, b) in rows.items():
    print(f"{name:26s} {f / LONG_CONTEXT:>12,.0f} FLOP  {b / LONG_CONTEXT:>7,.0f} B  per cached token per layer  "
          f"({f / b:,.0f} FLOP/B)")
mha_row, naive_row, absorbed_row = rows.values()
assert absorbed_row[1] < mha_row[1] and absorbed_row[0] > mha_row[0] and naive_row[0] > absorbed_row[0]
print(f"absorbed vs MHA: {absorbed_row[0] / mha_row[0]:.1f}x the FLOPs, {mha_row[1] / absorbed_row[1]:.1f}x fewer bytes")
""")

md(r"""
**Memory-bound or compute-bound?** A GPU reads `bandwidth` bytes and does `peak` FLOPs per second. A kernel that does
fewer than peak / bandwidth FLOPs per byte it reads — the *ridge* — waits for memory; one that does more waits for
arithmetic. For an H200 in bf16 (datasheet peaks, `dslib.config`; [sources](../docs/references.md#h200-roofline)):
""")

code(r"""
ridge = H200_BF16_FLOPS / H200_HBM_BYTES_PER_S  # FLOP per byte where memory time = compute time
print(f"H200 bf16 ridge: {H200_BF16_FLOPS / 1e12:,.1f} TFLOP/s / {H200_HBM_BYTES_PER_S / 1e12:.1f} TB/s = {ridge:.0f} FLOP/B")
for name, (f, b) in rows.items():
    t_compute, t_memory = f / H200_BF16_FLOPS, b / H200_HBM_BYTES_PER_S
    bound = "compute-bound" if t_compute > t_memory else "memory-bound"
    print(f"{name:26s} {f / b:>7,.0f} FLOP/B vs ridge {ridge:.0f}: {bound:13s} "
          f"{max(t_compute, t_memory) / LONG_CONTEXT * 1e12:6.2f} ps per cached token per layer at the roofline")
intensity = absorbed_row[0] / absorbed_row[1]
assert intensity > ridge > mha_row[0] / mha_row[1]   # absorbed decode with 128 heads is compute-bound
tp8 = attention_flops(big.replace(num_attention_heads=big.num_attention_heads // 8), 1, LONG_CONTEXT, "absorbed")
print(f"with the heads split over 8 GPUs (16 per GPU, each reading the whole latent cache): "
      f"{tp8['total'] / absorbed_row[1]:.0f} FLOP/B, memory-bound again")
""")

md(r"""
So the usual rule "decoding is memory-bound" does not hold for MLA's absorbed decode: with 128 heads sharing one
576-value latent, a decode step does about 242 FLOPs per byte of cache it reads, above the H200's bf16 ridge of
about 206. At batch 1 it is already compute-bound, by a little (the FP8 cache of section 6 reads 43% fewer
bytes and pushes it further). MLA traded bytes for FLOPs until the FLOPs became the limit, and that is exactly why DeepSeek
Sparse Attention (chapter 3) pays off in decoding: it cuts the **FLOPs** — each query attends to 2,048 latents
instead of all of them — not only the bytes.

Why the absorbed mode for decode and the naive one for prefill, then? At the roofline the absorbed path is still
far cheaper per decoded token than reading per-head K/V (MHA cache, 1 FLOP per byte) or re-expanding every latent
at every step (naive). In a prefill every key is used by many queries: the per-head K/V are built once for the
whole prompt, and per (query, key) pair MHA mode does 3.4x fewer FLOPs than MQA mode, so DeepSeek's reference
code prefills in MHA mode. DSA in chapter 3 builds on the absorbed mode.
""")

# ------------------------------------------------------------------------------------------------ 6. cache bytes
md(r"""
## 6. Measured cache size per token

The cache depends only on `kv_lora_rank`, `qk_rope_head_dim`, the number of layers and the dtype — not on the
hidden size or head count. So we measure the 671B model's cache with a cheap probe: the real latent widths, a
tiny hidden size, 61 bf16 layers (one set of random weights reused; the bytes do not depend on the weights).
""")

code(r"""
probe_cfg = big.replace(hidden_size=128, num_attention_heads=2, q_lora_rank=32)
probe = MLA(probe_cfg).to(torch.bfloat16).eval()
caches = [LatentCache() for _ in range(big.num_hidden_layers)]
tokens = torch.randn(1, CACHE_TOKENS, probe_cfg.hidden_size, dtype=torch.bfloat16)
with torch.no_grad():
    for layer_cache in caches:
        probe(tokens, cache=layer_cache)
bf16_per_token = sum(c.nbytes for c in caches) // CACHE_TOKENS
assert bf16_per_token == (big.kv_lora_rank + big.qk_rope_head_dim) * big.num_hidden_layers * 2
print(f"bf16 latent cache: {bf16_per_token:,} B per token "
      f"= ({big.kv_lora_rank} + {big.qk_rope_head_dim}) x {big.num_hidden_layers} layers x 2 B")
""")

md(r"""
DeepSeek-V3.2 deploys an **FP8 cache** ([FlashMLA's layout](../docs/references.md#ch1)): per token the `kv_lora_rank` latent values
in e4m3 (1 byte each), one fp32 scale per 128 of them, and the rope key kept in bf16 because it is precision-sensitive.
""")

code(r"""
show(fp8_pack_latent)
""")

code(r"""
packed = [fp8_pack_latent(c.kv_latent, c.k_rope) for c in caches]  # uint8 [1, S, 656] per layer
fp8_per_token = sum(p.nbytes for p in packed) // CACHE_TOKENS
assert fp8_per_token == big.kv_bytes_per_token_per_layer("mla_fp8") * big.num_hidden_layers
lat8, rope8 = fp8_unpack_latent(packed[0], big.kv_lora_rank, big.qk_rope_head_dim)
rel_err = ((lat8 - caches[0].kv_latent.float()).norm() / caches[0].kv_latent.float().norm()).item()
assert rel_err < 0.05
print(f"FP8 cache: {fp8_per_token:,} B per token ({packed[0].shape[-1]} B per layer); latent round-trip error {rel_err:.1%}")
""")

md(r"""
Against the baselines, for one 128K-token sequence (all computed by `decode_costs` from the config). GQA-8 is
chapter 1's baseline: the same 61 layers, 8 key/value heads of 128.
""")

code(r"""
costs = decode_costs(big, LONG_CONTEXT, gqa_groups=GQA_GROUPS)
assert costs["MLA"]["bytes_per_token_per_layer"] * big.num_hidden_layers == bf16_per_token
assert costs["MLA FP8"]["bytes_per_token_per_layer"] * big.num_hidden_layers == fp8_per_token
gqa = f"GQA-{GQA_GROUPS}"
print(f"{'scheme':8s} {'B/token':>10s} {'GB/sequence':>12s} {'MHA ÷ it':>9s} {gqa + ' ÷ it':>10s}")
for name, c in costs.items():
    print(f"{name:8s} {c['bytes_per_token_per_layer'] * big.num_hidden_layers:>10,} {c['cache_bytes'] / 1e9:>12.2f} "
          f"{c['vs_mha']:>8.1f}x {c['vs_gqa']:>9.2f}x")
viz.mla_costs_figure(costs, title=f"DeepSeek-V3.2 shapes, {LONG_CONTEXT:,}-token context")
""")

md(r"""
**Why not MQA?** A single shared key/value head of 128 would cache even less than MLA. In GQA terms, MLA's 576
values per token and layer are what GQA with 2.25 groups would cache:
""")

code(r"""
mqa_bytes, mla_bytes = big.kv_bytes_per_token_per_layer("mqa"), big.kv_bytes_per_token_per_layer("mla")
groups_equivalent = (big.kv_lora_rank + big.qk_rope_head_dim) / (2 * big.v_head_dim)
assert mqa_bytes < mla_bytes and groups_equivalent == 2.25
print(f"MQA: {mqa_bytes} B per token and layer, MLA: {mla_bytes} B = GQA with {groups_equivalent} groups")
""")

md(r"""
DeepSeek chose MLA anyway because the smaller caches cost quality. DeepSeek-V2 (the paper that introduced MLA)
rates MHA strong, GQA moderate, MQA weak and MLA stronger than MHA, and its ablations back it: 7B dense models with
GQA or MQA did worse than MHA on hard benchmarks, and MoE models with MLA did better than with MHA while caching a
fraction of it ([why not MQA](../docs/references.md#why-not-mqa)). Sharing one latent is not sharing one head: every head
still gets its own keys and values, up-projected from the latent.
""")

# ------------------------------------------------------------------------------------------------ 7. interactive
md(r"""
## 7. Explore

Change the latent width, the rope width and the context length; the calculator recomputes cache size,
attention FLOPs per decoded token and the ratios against MHA and GQA (all other sizes are DeepSeek-V3.2's).
""")

code(r"""
def explore(kv_lora_rank=big.kv_lora_rank, qk_rope_head_dim=big.qk_rope_head_dim, context_k=LONG_CONTEXT // 1024):
    cfg = big.replace(kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim)
    title = f"kv_lora_rank {kv_lora_rank}, rope {qk_rope_head_dim}, context {context_k}K"
    return viz.mla_costs_figure(decode_costs(cfg, context_k * 1024, gqa_groups=GQA_GROUPS), title=title)


assert len(explore().data) == 2
_ = widgets.interact(
    explore,
    kv_lora_rank=widgets.IntSlider(value=big.kv_lora_rank, min=64, max=2048, step=64),
    qk_rope_head_dim=widgets.IntSlider(value=big.qk_rope_head_dim, min=16, max=128, step=16),
    context_k=widgets.IntSlider(value=LONG_CONTEXT // 1024, min=4, max=160, step=4, description="context (K)"),
)
""")

md(r"""
And what attention looks like inside a small stack of MLA layers (`MLAStack`: embeddings and attention only,
random weights, so the patterns mean nothing beyond their mechanics). The input repeats a random pattern of
`HEATMAP_PERIOD` tokens, so in the first layer the cached latents repeat too: a query scores the copies of a token
alike except for the rope part, which depends on the distance. Look for structure that repeats along the key axis
with the pattern's period and fades or shifts with distance; deeper layers mix in context. Every row is a
probability distribution over the keys at or before the query (causal): the upper triangle is empty.
""")

code(r"""
torch.manual_seed(SEED)
stack = MLAStack(small, init_std=HEATMAP_INIT_STD).eval()
ids = torch.randint(0, small.vocab_size, (HEATMAP_PERIOD,)).repeat(HEATMAP_TOKENS // HEATMAP_PERIOD)[None]
maps = stack.attention_maps(ids)  # [layers, 1, heads, T, T]
assert torch.allclose(maps.sum(-1), torch.ones(())) and maps.triu(1).abs().max() == 0  # rows sum to 1, causal


def heatmap(layer=0, head=0):
    return viz.attention_heatmap(maps[layer, 0, head].tolist(), title=f"layer {layer}, head {head}")


_ = widgets.interact(heatmap, layer=(0, maps.shape[0] - 1), head=(0, maps.shape[2] - 1))
""")

# ------------------------------------------------------------------------------------------------ end
md(r"""
## What you built

- `dslib.rope`: `RotaryEmbedding`, `apply_rope_interleaved` (MLA) and `apply_rope_half` (the indexer, chapter 3),
  YaRN frequencies `rope_inv_freq` and `softmax_scale` — matching transformers bit for bit on the 671B config.
- `dslib.mla.MLA`: DeepSeek-V3.2's attention with the checkpoint's parameter names, `project_q` / `project_kv` /
  `attend` in **naive** and **absorbed** mode (tested equal, and equal to transformers' `deepseek_v3` /
  `deepseek_v32` attention with the same weights), and `LatentCache`, which holds only
  `kv_lora_rank + qk_rope_head_dim` values per token and layer.
- `dslib.mla.load_weights`: strict loading that names every missing, unexpected or mis-shaped tensor.
- Accounting in `dslib.cost`: `attention_flops`, `kv_bytes_read`, `decode_costs`; the FP8 cache layout `fp8_pack_latent`.

Chapter 3 adds the lightning indexer and lets each query attend to only 2048 of these cached latents.

## Exercises

**Exercise 1 — build it: absorbed attention, through to the output.** Write MLA's MQA-mode attention from torch
operations: fold $W_{UK}$ into the queries (`mla.w_uk()`, `[H, nope, kv_lora_rank]`), score them against the
cached latents and add the rope part, scale by `mla.softmax_scale`, mask causally (key s is visible to a query at
position p iff s ≤ p), softmax over the keys, take the weighted sum of the latents, lift it with $W_{UV}$
(`mla.w_uv()`, `[H, v_head_dim, kv_lora_rank]`) and finish with `mla.o_proj`. Never build per-head keys or values
(`mla.kv_b_proj` must not run, and neither may `mla.attend`). The check runs a prefill and a decode step on fresh
random inputs against the naive path.
""")

code(r"""
def my_absorbed_attention(mla, q_nope, q_rope, kv_latent, k_rope, q_positions):
    # q_nope [B, T, H, nope], q_rope [B, T, H, rope] (rotated), kv_latent [B, S, c], k_rope [B, S, rope] (rotated),
    # q_positions [T]: the queries' positions (key s sits at position s). Return [B, T, hidden_size].
    raise NotImplementedError  # your code here


exercises.check_absorbed_attention(my_absorbed_attention)
""")

md(r"""
**Exercise 2 — when does decoding become compute-bound?** Section 5 found that DeepSeek-V3.2's absorbed decode, with
128 heads sharing one latent, does more FLOPs per byte than the H200's bf16 ridge. Keeping every other size of
`big` and a 128K-token bf16 cache, what is the **fewest** query heads at which one decode step is compute-bound
(intensity above the ridge)? `attention_flops`, `kv_bytes_read`, `big.replace(num_attention_heads=...)` and the
ridge of section 5 are all you need.
""")

code(r"""
heads = None  # your answer
exercises.check_heads_at_ridge(heads)
""")

md(r"""
**Exercise 3 — absorb $W_{UV}$ into `o_proj`.** In the absorbed path each head ends with a `kv_lora_rank`-wide
vector $x_i$, then $o_i = W_{UV,i} x_i$ and the output is `o_proj` of all $o_i$. Return one matrix
`[hidden_size, H * kv_lora_rank]` that maps the flattened $[x_1 \| \dots \| x_H]$ straight to the output
(use `mla.o_proj.weight` and `mla.w_uv()`).
""")

code(r"""
def merged_output_weight(mla):
    raise NotImplementedError  # your code here


exercises.check_merged_output_weight(merged_output_weight)
""")

nb.write()
