"""Writes notebooks/01_kv_cache.ipynb (run from the repository root; the notebook is committed without outputs).

    python notebooks/build/01_kv_cache.py
"""
from nbbuild import Notebook

nb = Notebook("01_kv_cache.ipynb", ids="ch1-{:03d}")
md, code = nb.md, nb.code


md(r"""
# 1 · KV caching: what the cache saves, and what it costs

A language model writes one token at a time, and each new token looks back at every token before it. This notebook
builds a small decoder with **multi-head** and **grouped-query attention** and a **KV cache**, and measures what
caching buys and what it costs — first on a model small enough for a laptop, then for real model sizes, including
DeepSeek-V3.2.

You will learn

- why generating without a cache redoes almost all of its work, and how a cache of keys and values avoids it — and
  you will check that both give **exactly the same tokens**;
- how the time per generated token grows with the context, with and without a cache (measured);
- what actually grows with the context: the cache's **memory grows linearly**; it is the **attention compute over
  the whole prefix** that grows quadratically (both measured);
- how much memory the cache of a real model needs — MHA, GQA, MQA, DeepSeek's MLA and its FP8 format with the
  indexer keys — against one H200 GPU, in an interactive calculator;
- where DeepSeek-V3.2's "671B parameters, 37B active" come from.

Everything you see runs code from the package `dslib`; `dslib.show(...)` prints the real source.
""")

code(r"""
import os
import platform
import statistics

import numpy as np
import plotly
import torch
from torch.utils.flop_counter import FlopCounterMode

import dslib
from dslib import cost, viz
from dslib.attention import BaselineConfig, BaselineDecoder, causal_attention
from dslib.config import GQA_REFERENCE, H200_MEMORY_BYTES, ModelConfig
from dslib.exercises import ch1
from dslib.kv_cache import KVCache, generate, kv_cache_sizes, memory_calculator, prefill

torch.manual_seed(0)
# The models here are tiny: one thread avoids synchronisation overhead and keeps timings steady on a busy machine.
torch.set_num_threads(1)
print(f"python {platform.python_version()} | torch {torch.__version__} | plotly {plotly.__version__} | "
      f"dslib {dslib.__version__} | {os.cpu_count()} CPU cores")
""")

code(r"""
# Sizes. DSLIB_FAST=1 (CI) runs the same code on smaller sizes.
FAST = os.environ.get("DSLIB_FAST") == "1"

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS = 256, 128, 2, 8, 2   # the small decoder (GQA: 4 query heads per KV head)
MAX_POSITIONS = 1024
PROMPT_LEN = 16
EQ_TOKENS = 24 if FAST else 64         # tokens generated in the equality check
NEW_TOKENS = 48 if FAST else 200        # tokens generated in the timing experiment
REPEATS = 1 if FAST else 3              # timing runs
BIN = 8                                 # neighbouring steps pooled into one median
CHUNK = 5                               # chunk size for chunked prefill
SEQ_LENS = [32, 64, 128, 256] if FAST else [32, 64, 128, 256, 512, 1024]    # memory vs compute
ATTN_LENS = [64, 128, 256] if FAST else [64, 128, 256, 512, 1024]           # attention timing
ATTN_HEADS, ATTN_HEAD_DIM = 8, 64
""", tags=["parameters"])

md(r"""
## 1. A small decoder with MHA / GQA attention

The baseline is a pre-norm decoder: token + learned position embeddings, a few blocks of *attention → SwiGLU
feed-forward*, a final norm and an LM head. (Positions are learned embeddings here; chapter 2 brings RoPE.)

Attention gives each of the `H` query heads a key and a value to compare with. **MHA** stores one key/value
head per query head; **GQA** lets a group of query heads share one key/value head; **MQA** has a single one.
The number of key/value heads, `num_key_value_heads`, is all that distinguishes them — and it is exactly what the
cache has to store.
""")

code(r"""
cfg_gqa = BaselineConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, intermediate_size=2 * HIDDEN,
                         max_position_embeddings=MAX_POSITIONS)
cfg_mha = BaselineConfig(**{**cfg_gqa.__dict__, "num_key_value_heads": HEADS})
torch.manual_seed(0)
model_gqa = BaselineDecoder(cfg_gqa).eval()
model_mha = BaselineDecoder(cfg_mha).eval()
print(cfg_gqa.kind, cfg_gqa)
print(cfg_mha.kind, "query heads per KV head:", cfg_mha.group_size, "(MHA) vs", cfg_gqa.group_size, "(GQA)")
""")

md(r"""
Estimate → measure → check: the parameter count follows from the config (matrix weights + embeddings + norm
weights) and must equal what PyTorch counts.
""")

code(r"""
for cfg, model in [(cfg_mha, model_mha), (cfg_gqa, model_gqa)]:
    estimate = (cfg.matmul_params() + (cfg.vocab_size + cfg.max_position_embeddings) * cfg.hidden_size
                + (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size)
    measured = sum(p.numel() for p in model.parameters())
    assert measured == estimate
    print(f"{cfg.kind}: {measured:,} parameters")
""")

md(r"""
The attention itself: a query at position p attends to every key at position p or earlier (causal),

$$\text{out}_{h,t} = \sum_{s \le p_t} \mathrm{softmax}_s\!\Big(\frac{q_{h,t}\cdot k_{g(h),s}}{\sqrt{d}}\Big)\, v_{g(h),s},
\qquad g(h) = \lfloor h / (H / H_{KV}) \rfloor,$$

where query head h reads key/value head g(h): consecutive query heads share one. The query heads of one group can
be folded into the rows of one matrix product, so each key/value head is read once per group — that is where GQA
saves memory *traffic*, not only memory. With a cache, each layer's attention appends the new tokens' keys and
values to the cache first and then attends over everything cached: you will write exactly that step in
**Exercise 1** (its check then shows dslib's `Attention.forward` and `causal_attention`). The model around it puts
the new tokens at positions `len(cache)` and up and hands each layer its own cache:
""")

code(r"""
dslib.show(BaselineDecoder.forward)
""")

md(r"""
## 2. Generating with and without a cache

Greedy generation appends the most likely next token and repeats. **Without a cache**, each step runs the whole
sequence so far through the model, although the keys and values of the old tokens have not changed (attention is
causal: old tokens never look at new ones). **With a cache**, the prompt is run once (the *prefill*), its keys and
values are kept, and each later step runs only the newest token, appending its key and value. In one layer of
our small GQA model, one decode step looks like this:
""")

code(r"""
viz.kv_cache_step_diagram(cached=6, kv_heads=cfg_gqa.num_key_value_heads, heads=cfg_gqa.num_attention_heads,
                          head_dim=cfg_gqa.head_dim, dtype_bytes=4)
""")

code(r"""
dslib.show(generate)
""")

code(r"""
prompt = torch.randint(0, VOCAB, (2, PROMPT_LEN))   # a batch of two random prompts
results = {}
for name, model in [("MHA", model_mha), ("GQA", model_gqa)]:
    cached = generate(model, prompt, EQ_TOKENS)
    uncached = generate(model, prompt, EQ_TOKENS, use_cache=False)
    same = torch.equal(cached.tokens, uncached.tokens)
    diff = (cached.logits - uncached.logits).abs().max().item()
    print(f"{name}: tokens identical: {same}; largest logit difference {diff:.1e} (float32 rounding)")
    assert same and diff < 1e-4
    results[name] = cached
print("first new tokens of sequence 0:", results["GQA"].new_tokens[0, :12].tolist())
""")

md(r"""
The logits differ only in the last bits (the matrix products are grouped differently), and the chosen tokens are
identical. Caching changes how much work is done, not the result.

**Chunked prefill.** A long prompt can also be fed in chunks: each chunk attends to the cached earlier chunks and
causally to itself. The score matrix of a chunk is `[chunk, S]` instead of `[S, S]`, which bounds the activation
memory of a long prefill. The result must not change:
""")

code(r"""
long_prompt = torch.randint(0, VOCAB, (2, 4 * PROMPT_LEN))
one_shot = prefill(model_gqa, long_prompt, model_gqa.new_cache())
chunked = prefill(model_gqa, long_prompt, model_gqa.new_cache(), chunk_size=CHUNK)
print(f"{long_prompt.shape[1]} prompt tokens in chunks of {CHUNK}: largest difference {(one_shot - chunked).abs().max():.1e}")
torch.testing.assert_close(chunked, one_shot, rtol=1e-5, atol=1e-5)
assert torch.equal(generate(model_gqa, prompt, 8, chunk_size=CHUNK).tokens, results["GQA"].tokens[:, :PROMPT_LEN + 8])
""")

md(r"""
## 3. What the cache holds, in bytes

Every layer keeps, for every token, one key and one value vector of `head_dim` per key/value head:

$$\text{bytes} = \text{layers} \times 2 \times \text{kv\_heads} \times \text{head\_dim} \times \text{bytes per number} \times \text{tokens} \times \text{batch}$$

The formula is `BaselineConfig.kv_cache_bytes`; the measurement is the size of the cached tensors.
""")

code(r"""
for name, cfg in [("MHA", cfg_mha), ("GQA", cfg_gqa)]:
    cache = results[name].cache
    measured = cache.nbytes
    estimate = cfg.kv_cache_bytes(len(cache), batch=prompt.shape[0], dtype_bytes=4)   # float32
    print(f"{name}: {len(cache)} tokens x batch {prompt.shape[0]}: measured {measured:,} B, formula {estimate:,} B")
    assert measured == estimate
saving = results["MHA"].cache.nbytes / results["GQA"].cache.nbytes
print(f"GQA stores {saving:.0f}x less than MHA (= query heads per KV head)")
assert saving == cfg_gqa.group_size
""")

md(r"""
## 4. Time per generated token

Now the cost. We time every step of a few generation runs, with and without the cache. A busy machine interrupts
a run now and then for a few milliseconds, so each point is the **median** over the runs and over `BIN`
neighbouring steps. The first step is left out: in the cached run it is the prefill.
""")

code(r"""
one_prompt = prompt[:1]
runs = {"with cache": [], "without cache": []}
for _ in range(REPEATS):
    runs["with cache"].append(generate(model_gqa, one_prompt, NEW_TOKENS).seconds[1:])
    runs["without cache"].append(generate(model_gqa, one_prompt, NEW_TOKENS, use_cache=False).seconds[1:])
steps = NEW_TOKENS - 1
context = [PROMPT_LEN + 1 + i + BIN // 2 for i in range(0, steps, BIN)]   # tokens in the context, bin centre
median_s = {name: [statistics.median(s for run in r for s in run[i : i + BIN]) for i in range(0, steps, BIN)]
            for name, r in runs.items()}
viz.step_time_figure(context, median_s)
""")

md(r"""
Estimate first: a step without a cache re-runs all `p` tokens (and their `p × p` attention scores); a step with
a cache runs one token against `p` cached keys. The FLOP counts come from `BaselineConfig.forward_flops`;
compare their ratio at the last step with the measured time ratio of the last bin (the cached step is dominated by per-operation
overhead on a model this small, so the time ratio is smaller than the FLOP ratio). The check is on the counted
work; the time ratio is reported, not asserted, because a timing on a busy laptop can invert:
""")

code(r"""
p = PROMPT_LEN + NEW_TOKENS - 1                     # context of the last step
flop_ratio = cfg_gqa.forward_flops(p) / cfg_gqa.forward_flops(1, p)
time_ratio = median_s["without cache"][-1] / median_s["with cache"][-1]   # the last bin
print(f"at {p} tokens of context: FLOPs per step without/with cache = {flop_ratio:.0f}x; measured time ratio = {time_ratio:.1f}x")
assert flop_ratio > p / 2   # counted work; the measured time is what your machine shows
""")

md(r"""
## 5. Setting the record straight: memory grows linearly, compute quadratically

A common claim is that "the KV cache grows quadratically with the context". It does not: each token adds the same
number of bytes, so the cache grows **linearly**. What grows **quadratically** is the *attention compute over the
whole prefix*: token `p` compares its query with `p` keys, so a sequence of `L` tokens costs
`1 + 2 + … + L ≈ L²/2` query–key products (a prefill computes the full `L × L` score matrix at once).

We measure both for prefills of growing length: the bytes of the filled cache, and the FLOPs that PyTorch's
`FlopCounterMode` counts. The batched products (`bmm`) are the attention; the ordinary matrix products (`mm`)
are the projections and the feed-forward, whose cost is linear in `L`.
""")

code(r"""
cache_bytes, attn_flops, linear_flops = [], [], []
for L in SEQ_LENS:
    ids = torch.randint(0, VOCAB, (1, L))
    cache = model_gqa.new_cache()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model_gqa(ids, cache=cache)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    cache_bytes.append(cache.nbytes)
    attn_flops.append(counts["aten.bmm"])
    linear_flops.append(counts["aten.mm"])
    assert cache.nbytes == cfg_gqa.kv_cache_bytes(L)                       # linear in L
    assert counts["aten.bmm"] == cfg_gqa.attention_flops(L, L)             # quadratic in L
    assert counts["aten.mm"] == 2 * L * cfg_gqa.matmul_params()            # linear in L
for i in range(1, len(SEQ_LENS)):   # each doubling of L: 2x bytes, 4x attention FLOPs
    assert cache_bytes[i] == 2 * cache_bytes[i - 1] and attn_flops[i] == 4 * attn_flops[i - 1]
print(f"L = {SEQ_LENS[0]} -> {SEQ_LENS[-1]} ({SEQ_LENS[-1] // SEQ_LENS[0]}x): cache bytes x{cache_bytes[-1] / cache_bytes[0]:.0f}, "
      f"attention FLOPs x{attn_flops[-1] / attn_flops[0]:.0f}, other FLOPs x{linear_flops[-1] / linear_flops[0]:.0f}")
""")

code(r"""
viz.memory_vs_compute_figure(SEQ_LENS, cache_bytes, attn_flops,
                             cache_formula=[cfg_gqa.kv_cache_bytes(L) for L in SEQ_LENS],
                             flops_formula=[cfg_gqa.attention_flops(L, L) for L in SEQ_LENS],
                             flops_label="attention FLOPs of an L-token prefill")
""")

md(r"""
The same holds for time. We time the attention alone (`causal_attention` over `L` tokens), count its FLOPs, and fit
a power law `t ∝ L^k` on log–log axes: `k ≈ 1` would be linear, `k ≈ 2` quadratic. The counted FLOPs are exactly
`4·H·L²·d` (two products over the `L × L` scores, `q·kᵀ` and the weighted sum of `v`, `2·H·L²·d` each; asserted);
the measured time follows `L²` loosely, because short sequences are dominated by fixed overhead, which pulls the
time's `k` below 2.
""")

code(r"""
attn_s, attn_counted = [], []
for L in ATTN_LENS:
    q, k, v = (torch.randn(1, ATTN_HEADS, L, ATTN_HEAD_DIM) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        causal_attention(q, k, v, torch.arange(L))
    attn_counted.append(counter.get_total_flops())
    attn_s.append(cost.wall_seconds(lambda: causal_attention(q, k, v, torch.arange(L)), repeats=max(REPEATS, 3)))
assert attn_counted == [4 * ATTN_HEADS * L * L * ATTN_HEAD_DIM for L in ATTN_LENS], "counted FLOPs = 4·H·L²·d"
exponent = np.polyfit(np.log(ATTN_LENS), np.log(attn_s), 1)[0]  # reported, not asserted: times vary
print(f"counted: FLOPs = 4·H·L²·d at every L; measured: t ~ L^{exponent:.2f}")
viz.attention_time_figure(ATTN_LENS, attn_s, exponent=exponent)
""")

md(r"""
So the cache is a trade: **linear memory** to avoid recomputing keys and values. Without it each step would redo
the whole prefix (quadratic per step, cubic in total); with it each step does linear work and the total is
quadratic. At long contexts the linear memory becomes the problem — it is what limits how many requests a GPU can
serve at once. Which brings us to real models.

## 6. The cache of real models: an interactive calculator

The numbers below come from `dslib.config`: DeepSeek-V3.2's dimensions (`ModelConfig.deepseek_v32()`) and the
series' one GQA baseline (`GQA_REFERENCE`: the same 61 layers with 8 key/value heads of 128 instead of MLA; chapter 2
compares against the same one). MHA and MQA are what DeepSeek-V3.2's attention would cache with full per-head
keys/values or a single KV head; MLA caches one compressed latent plus one small RoPE key per token and layer
(chapter 2); in deployment that latent is stored in FP8, and DeepSeek Sparse Attention adds one FP8 indexer key per
token and layer (chapter 3).
""")

code(r"""
v32 = ModelConfig.deepseek_v32()
per_token = {name: b for name, b in kv_cache_sizes(1).items()}    # one token, whole model, bf16
for name, b in per_token.items():
    print(f"{name:34s} {b:>12,} bytes per token")
assert per_token["MLA (bf16)"] == v32.num_hidden_layers * (v32.kv_lora_rank + v32.qk_rope_head_dim) * 2
print(f"MHA / MLA-FP8+indexer: {per_token['MHA (128 heads, bf16)'] / per_token['MLA-FP8 + indexer keys (V3.2)']:.0f}x")
assert per_token["MQA (1 KV head, bf16)"] < per_token["MLA (bf16)"]
""")

md(r"""
MQA caches even less than MLA: one key and one value of 128 per layer, 512 bytes against MLA's 1,152. DeepSeek still
does not use it, because MQA (and GQA) cost quality: DeepSeek-V2's ablations found MHA clearly better than GQA and
MQA, and MLA better than MHA at a fraction of MHA's cache ([why not MQA](../docs/references.md#why-not-mqa)). Chapter 2 shows
how MLA gets there.
""")

md(r"""
Move the sliders: context length, batch (concurrent requests) and the number format of the cache. The dashed line
is one H200's memory, `H200_MEMORY_BYTES`: the 143,771 MiB = 150.75 GB the GPU reports (it is marketed as
"141 GB"; [one H200](../docs/references.md#h200-memory)). Everything above it does not fit on one GPU — before a single
weight is loaded. The figure
is made by `dslib.kv_cache.memory_calculator`, a plain function (the tests call it too).
""")

code(r"""
import ipywidgets as widgets

CONTEXTS = [2**i for i in range(10, 18)] + [v32.max_position_embeddings]
widgets.interact(
    memory_calculator,
    context_len=widgets.SelectionSlider(options=CONTEXTS, value=2**17, description="context"),
    batch=widgets.IntSlider(value=1, min=1, max=64, description="batch"),
    dtype=widgets.Dropdown(options=["bf16", "fp8", "fp32"], value="bf16", description="cache dtype"),
);
""")

md(r"""
The same figure for one 128K-token request, and how many such requests fit in one H200 (cache only):
""")

code(r"""
CONTEXT = 2**17
sizes = kv_cache_sizes(CONTEXT)
fits = {name: int(H200_MEMORY_BYTES // b) for name, b in sizes.items()}
for name, n in fits.items():
    print(f"{name:34s} {sizes[name] / 1e9:8.2f} GB per request -> {n:3d} requests per H200")
assert fits["MLA-FP8 + indexer keys (V3.2)"] > 5 * fits[f"GQA-8 ({GQA_REFERENCE['num_layers']} layers, bf16)"]
assert fits["MHA (128 heads, bf16)"] == 0
memory_calculator(CONTEXT, 1, "bf16")
""")

md(r"""
## 7. Where "671B parameters, 37B active" come from

The cache is one side of memory; the weights are the other. `ModelConfig` counts every tensor of the checkpoint
from the config alone. Most parameters sit in the routed experts of the mixture-of-experts layers, and a token uses
only a few of them (chapter 4), so the parameters *used per token* are a small fraction of those *stored*.
""")

code(r"""
c = v32.param_counts()
moe_layers, used = v32.num_moe_layers, v32.num_experts_per_tok
stored = {
    "embedding + LM head": c["embed_tokens"] + c["lm_head"],
    "attention (MLA)": v32.num_hidden_layers * c["attention"],
    "indexer (DSA)": v32.num_hidden_layers * c["indexer"],
    "dense FFN": v32.num_dense_layers * c["dense_mlp"],
    "routed experts": moe_layers * v32.n_routed_experts * c["expert"],
    "shared experts + routers": moe_layers * (v32.n_shared_experts * c["expert"] + c["router"]),
    "norms": v32.num_hidden_layers * c["layer_norms"] + c["final_norm"],
}
active = {**stored, "routed experts": moe_layers * used * c["expert"]}
assert sum(stored.values()) == v32.total_params() and sum(active.values()) == v32.active_params()
print(f"V3 / V3.1 architecture (no indexer): {v32.total_params(indexer=False) / 1e9:.1f}B")
print(f"V3.2 main model (with indexers):     {v32.total_params() / 1e9:.1f}B")
print(f"every tensor in the checkpoint (+MTP): {v32.total_params(mtp=True) / 1e9:.1f}B")
print(f"used per token: {v32.active_params(indexer=False) / 1e9:.1f}B without indexers, {v32.active_params() / 1e9:.1f}B with "
      f"({used} of {v32.n_routed_experts} routed experts per MoE layer)")
viz.param_accounting_figure(stored, active)
""")

md(r"""
## What you built

- `dslib.attention`: `BaselineConfig` (MHA / GQA / MQA by `num_key_value_heads`, with the cache-bytes and FLOP
  formulas), `causal_attention` (grouped KV heads, causal by position), `Attention`, `DecoderLayer` and
  `BaselineDecoder` (learned positions, KV-cache aware forward), plus `RMSNorm`, which every later chapter uses.
- `dslib.kv_cache`: `KVCache` / `LayerKVCache` on a growing `SequenceBuffer` (the container every later cache
  reuses); `prefill` (chunked) and `generate` (greedy, with or without cache — same tokens); `kv_cache_sizes` and
  `memory_calculator` for real configurations.
- `dslib.viz.kv`: the figures of this chapter.

You measured that the cache gives identical tokens, that its bytes match the formula and grow linearly, and that
the attention compute over the prefix is what grows quadratically. Chapter 2 shrinks the cache itself: Multi-head
Latent Attention stores one small latent per token instead of per-head keys and values.

## Exercises

Each exercise has a cell for your answer and a check that tells you whether it is right.

**Exercise 1 — build it: the cache append and the cached attention step.** Write one layer's attention step with
a KV cache, from torch operations (not dslib's functions). The T new tokens (T = 1 when decoding, more for a chunk
of a prompt) come after S cached ones, so they sit at positions S … S + T − 1; each attends to every key at or
before its own position, query head h reads KV head h // (H // H_KV), and the scores are scaled by 1/√head_dim.
Return the output and the caches with the new keys and values appended. The check compares your function with
dslib's on fresh random inputs (a decode step, a chunk, an empty cache, GQA and MHA) and names what is off.
""")

code(r"""
def my_cached_attention(q, k_new, v_new, k_cache, v_cache):
    # q [B, H, T, hd]: the new tokens' queries; k_new, v_new [B, KVH, T, hd]: their keys and values;
    # k_cache, v_cache [B, KVH, S, hd]: the S earlier tokens' (S may be 0).
    # Return (out [B, H, T, hd], k_cache [B, KVH, S + T, hd], v_cache [B, KVH, S + T, hd]).
    raise NotImplementedError  # your code here: append, then attend


ch1.check_cached_attention(my_cached_attention)
""")

md(r"""
**Exercise 2.** A server runs **32 requests at once** on one H200 (`H200_MEMORY_BYTES`) and, ignoring the
weights, gives all memory to the cache. What is the longest context (in whole tokens) each request can have with
**(a)** the GQA-8 baseline's bf16 cache and **(b)** DeepSeek-V3.2's cache (FP8 MLA latent + FP8 indexer keys)? The per-token
numbers of section 6 are all you need.
""")

code(r"""
gqa_tokens = None  # your answer
dsa_tokens = None  # your answer
ch1.check_max_context(gqa_tokens, dsa_tokens)
""")

md(r"""
**Exercise 3.** Total FLOPs of `generate(model, prompt, new_tokens, use_cache=...)` for one sequence. Use
`cfg.forward_flops(q_len, kv_len)` (the FLOPs of one forward pass of `q_len` new tokens attending to `kv_len`
tokens). Think about which forward passes `generate` makes in each mode. The check counts the real FLOPs with
`FlopCounterMode`.
""")

code(r"""
def my_generation_flops(cfg, prompt_len, new_tokens, use_cache):
    raise NotImplementedError  # your code here


ch1.check_generation_flops(my_generation_flops)
""")

nb.write()
