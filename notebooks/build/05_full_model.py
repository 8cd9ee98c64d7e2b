"""Writes notebooks/05_full_model.ipynb (run from the repository root; the notebook is committed without outputs).

    python notebooks/build/05_full_model.py
"""
from nbbuild import Notebook

nb = Notebook("05_full_model.ipynb", ids="ch5-{:02d}")
md, code = nb.md, nb.code


md(r"""
# 5 · The whole model: DeepSeek-V3.2 from our modules, and its checkpoint format

Chapters 1–4 built the pieces: RMSNorm, Multi-head Latent Attention with its latent cache, the lightning indexer
and top-k sparse attention, and the mixture of experts. This notebook assembles them into **DeepSeek-V3.2** with
the official tensor names, and reads and writes the **official checkpoint format**: sharded safetensors with
FP8 weights in 128×128 blocks.

You will learn

- how the decoder layer is put together, and why our module tree's `state_dict()` names are exactly the 671B
  checkpoint's tensor names;
- what the full-size checkpoint holds: shapes, bytes in FP8, where the bytes are, and **how many GPUs** it needs
  (a memory plan made from the config before anything is loaded);
- how FP8 block quantisation stores a weight, including the one matrix whose rows do not fill the last block;
- how to write a small synthetic checkpoint in the official layout and load it back with `dslib.load_pretrained`,
  **the same code path a GPU run uses** (only the config is smaller), using host memory for about one tensor at a time;
- three checks on the loaded model: cached == uncached, sparse == dense for short prompts, naive == absorbed;
- what the model decided, recorded during a forward pass: **which tokens the indexer selects** for each query and
  layer, and **how the load spreads over the experts**;
- what one full-size layer costs on an H200 GPU (measured).
""")

code(r"""
import csv
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import ipywidgets as widgets
import plotly
import torch

import dslib
from dslib import viz
from dslib.attention import DecoderLayer
from dslib.checkpoint import (RandomSource, SafetensorsSource, bytes_by_component, checkpoint_tensors,
                              dequantize_fp8_blocks, quantize_fp8_blocks, write_synthetic_checkpoint)
from dslib.config import H200_MEMORY_BYTES, ModelConfig
from dslib.devices import DevicePlanError, gpus_needed, module_bytes, plan_devices
from dslib.exercises import ch5
from dslib.model import DeepseekV32ForCausalLM
from dslib.paths import find_data
from dslib.record import Recorder

torch.manual_seed(0)
# Small models on a CPU: one thread avoids synchronisation overhead on a busy machine.
torch.set_num_threads(1)
print(f"python {platform.python_version()} | torch {torch.__version__} | plotly {plotly.__version__} | "
      f"dslib {dslib.__version__} | {os.cpu_count()} CPU cores")
""")

code(r"""
# Sizes. DSLIB_FAST=1 (CI) runs the same code on smaller sizes.
FAST = os.environ.get("DSLIB_FAST") == "1"

H200_BYTES = H200_MEMORY_BYTES  # memory one H200 reports: 143,771 MiB = 150.75 GB (marketed as 141 GB)
N_GPUS = 8                     # the machine the 671B model is served on
SEED = 0
# The CPU model: DeepSeek-V3.2's structure at a small size. 16 indexer heads: see section 5.
SMALL = dict(index_n_heads=16, index_topk=32 if FAST else 64)
SHARD_BYTES = 1_000_000        # small shards, so the small checkpoint has several
PROMPT_LEN = 80 if FAST else 160        # longer than index_topk: attention is really sparse
SHORT_LEN = SMALL["index_topk"]         # not longer than index_topk: sparse must equal dense
NEW_TOKENS = 8 if FAST else 24
DATA = find_data()              # the repository's data/ (measured CSVs), or an error that says where to open this from
""", tags=["parameters"])

md(r"""
## 1. The module tree: chapters 1–4, assembled

A decoder layer is two residual steps, each after an RMSNorm (chapter 1):

    x = x + self_attn(input_layernorm(x))           # DSA = MLA (chapter 2) + lightning indexer (chapter 3)
    x = x + mlp(post_attention_layernorm(x))        # dense SwiGLU in the first layers, mixture of experts after (chapter 4)

`num_hidden_layers` such layers sit between the token embedding and the final norm + LM head. The attributes are named like the
checkpoint's tensors, so the module tree *is* the checkpoint's table of contents.
""")

code(r"""
dslib.show(DecoderLayer)
""")


code(r"""
dslib.show(DeepseekV32ForCausalLM.forward)
""")

md(r"""
The module tree as a picture, with each part's parameters counted from the config:
""")

code(r"""
viz.model_diagram(ModelConfig.deepseek_v32())
""")

md(r"""
Build the full 671B model on PyTorch's **meta device**: every tensor gets its shape and dtype but no memory, so
the 671B module tree fits on a laptop. We count its parameters: the estimate is the config's arithmetic from
chapter 1 (`total_params`), the measurement is the tensors of the module tree.
""")

code(r"""
cfg_full = ModelConfig.deepseek_v32()
t0 = time.perf_counter()
with torch.device("meta"):
    full = DeepseekV32ForCausalLM(cfg_full)
state = full.state_dict()   # parameters + the routers' bias buffers: what a checkpoint stores
measured = sum(t.numel() for t in state.values())
estimate = cfg_full.total_params()
assert measured == estimate
print(f"built in {time.perf_counter() - t0:.1f} s: {len(state):,} tensors, {measured / 1e9:.1f}B parameters "
      f"(config arithmetic: {estimate / 1e9:.1f}B)")
""")

md(r"""
The official checkpoint's tensor table can also be written down from the config alone ([sources](../docs/references.md#ch5)):
`dslib.checkpoint.checkpoint_tensors`. It must list exactly the module tree's names with the same shapes. In the
FP8 release, every linear weight except the embedding, the head, the router and the indexer's `weights_proj` is
stored as `float8_e4m3fn`, and each comes with a `weight_scale_inv` tensor of float32 block scales.
""")

code(r"""
table = checkpoint_tensors(cfg_full, fp8=True)
weights = {n: s for n, s in table.items() if not n.endswith("_scale_inv")}
assert {n: s.shape for n, s in weights.items()} == {n: tuple(t.shape) for n, t in state.items()}
n_scales = len(table) - len(weights)
print(f"{len(weights):,} weights, {n_scales:,} of them FP8 with a weight_scale_inv; the first MoE layer's attention:")
for name, spec in table.items():
    if name.startswith("model.layers.3.self_attn."):
        print(f"  {name:60s} {str(list(spec.shape)):15s} {str(spec.dtype).removeprefix('torch.')}")
""")

md(r"""
**How many bytes?** Estimate: an FP8 weight costs 1 byte per parameter plus one 4-byte scale per 128×128 block
(≈ 4/16384 byte per parameter); the rest is bf16 (2 bytes) and the routers' bias fp32 (4 bytes). Measure: the sum
over the tensor table, which counts every partial edge block exactly.
""")

code(r"""
n_fp8 = sum(s.numel for s in weights.values() if s.dtype == torch.float8_e4m3fn)
n_fp32 = sum(s.numel for s in weights.values() if s.dtype == torch.float32)
n_bf16 = measured - n_fp8 - n_fp32
estimate_bytes = n_fp8 * (1 + 4 / 128**2) + 2 * n_bf16 + 4 * n_fp32
table_bytes = sum(s.nbytes for s in table.values())
assert abs(table_bytes - estimate_bytes) / table_bytes < 1e-4
print(f"estimate {estimate_bytes / 1e9:.2f} GB, tensor table {table_bytes / 1e9:.2f} GB "
      f"({n_fp8 / measured:.1%} of the parameters are FP8)")
""")

code(r"""
breakdown = {
    "FP8 checkpoint": {k: v / 1e9 for k, v in bytes_by_component(table).items()},
    "all bf16": {k: v / 1e9 for k, v in bytes_by_component(checkpoint_tensors(cfg_full, fp8=False)).items()},
}
experts_share = breakdown["FP8 checkpoint"]["routed experts"] / sum(breakdown["FP8 checkpoint"].values())
assert experts_share > 0.9
print(f"the routed experts hold {experts_share:.1%} of the FP8 bytes")
viz.checkpoint_bytes_figure(breakdown)
""")

md(r"""
## 2. A memory plan before loading anything

The FP8 weights alone are far larger than one GPU. `dslib.devices.plan_devices` places consecutive layers on
devices of given sizes (pretend sizes work on a CPU), keeping a share of each free for the KV cache and
activations, and balances the split so the fullest device is as light as possible. Its `device_map` is what
`load_pretrained(..., device_map=...)` follows.
""")

code(r"""
plan = plan_devices(cfg_full, [H200_BYTES] * N_GPUS, storage="fp8")
print(plan)
assert sum(plan.used.values()) == plan.total_bytes
assert all(plan.used[d] <= c for d, c in zip(plan.devices, plan.capacity))
need_fp8 = gpus_needed(cfg_full, H200_BYTES)
print(f"fewest H200s for the FP8 weights: {need_fp8} (and with bf16 weights? Exercise 3)")
viz.device_plan_figure(plan.rows(), title=f"{cfg_full.num_hidden_layers} layers of FP8 weights on {N_GPUS} H200s")
""")

md(r"""
Too few devices give a clear error that says how much is needed, before a single byte is read:
""")

code(r"""
try:
    plan_devices(cfg_full, [H200_BYTES] * (need_fp8 - 2))
    raise AssertionError("this plan should not fit")
except DevicePlanError as err:
    message = str(err)
print(message)
assert f"at least {need_fp8} device" in message
""")

md(r"""
## 3. FP8 blocks

Each FP8 weight is stored as e4m3 numbers (4 exponent bits, 3 mantissa bits, largest value 448) plus one float32
scale per 128×128 block: `W[i, j] = float(q[i, j]) · weight_scale_inv[i // 128, j // 128]`. A block's scale is
its largest magnitude divided by 448, so each block uses the whole e4m3 range. `kv_a_proj_with_mqa` has
512 + 64 = 576 rows, so its last row block is only 64 rows tall: quantisation pads it with zeros, and
dequantisation crops it ([DeepSeek-V3's weight format](../docs/references.md#ch5)).
""")

code(r"""
g = torch.Generator().manual_seed(SEED)
w = torch.randn(576, cfg_full.hidden_size, generator=g) * 0.02
q, scale_inv = quantize_fp8_blocks(w)
back = dequantize_fp8_blocks(q, scale_inv)
rel = ((back - w).norm() / w.norm()).item()
assert scale_inv.shape == (math.ceil(576 / 128), cfg_full.hidden_size // 128) == (5, 56)
assert torch.equal(dequantize_fp8_blocks(*quantize_fp8_blocks(back)), back)   # a dequantised weight is a fixed point
print(f"q {tuple(q.shape)} {q.dtype}, scale_inv {tuple(scale_inv.shape)}: {q.numel() + 4 * scale_inv.numel():,} bytes "
      f"instead of {2 * w.numel():,} in bf16; relative error {rel:.2%}")
""")

md(r"""
`dequantize_fp8_blocks` turns `q` and `scale_inv` back into numbers, partial blocks included; you will write it
yourself in **Exercise 1** (its check then shows dslib's version).
""")

md(r"""
## 4. A small checkpoint in the official format, loaded back

A notebook that would need a GPU runs a small configuration on the CPU through the same code. We write a
synthetic checkpoint of a small DeepSeek-V3.2 (random weights, FP8 blocks, several shards and an index) with
`write_synthetic_checkpoint`, then load it with `dslib.load_pretrained`: this is the function that loads the real
671B checkpoint, and its source can be a folder of safetensors shards or a seeded random generator with the same
names, shapes and dtypes (`RandomSource`, which is how a full-size model is made on a GPU whose disk is too small).
""")

code(r"""
cfg = ModelConfig.small(**SMALL)
workdir = Path(tempfile.mkdtemp(prefix="dslib_ch5_"))
path = write_synthetic_checkpoint(cfg, workdir / "small_fp8", seed=SEED, fp8=True, max_shard_bytes=SHARD_BYTES)
files = sorted(p.name for p in path.iterdir())
print("\n".join(f"{f:40s} {(path / f).stat().st_size:>10,} bytes" for f in files))
""")

md(r"""
The index lists every tensor's shard and the tensors' total size. Each shard adds only its header (8 bytes of
length + a JSON table of contents) to the tensor bytes: check that the file sizes add up exactly.
""")

code(r"""
index = json.loads((path / "model.safetensors.index.json").read_text())
shards = sorted(set(index["weight_map"].values()))
headers = sum(8 + int.from_bytes((path / f).read_bytes()[:8], "little") for f in shards)
on_disk = sum((path / f).stat().st_size for f in shards)
small_table = checkpoint_tensors(cfg, fp8=True)
assert index["metadata"]["total_size"] == sum(s.nbytes for s in small_table.values())
assert on_disk == index["metadata"]["total_size"] + headers
print(f"{len(shards)} shards: {index['metadata']['total_size']:,} bytes of tensors + {headers:,} bytes of headers")
""")

code(r"""
model = dslib.load_pretrained(path)
direct = dslib.load_pretrained(RandomSource(cfg, seed=SEED, fp8=True), progress=False)
sd_file, sd_direct = model.state_dict(), direct.state_dict()
assert sd_file.keys() == sd_direct.keys() and all(torch.equal(sd_file[k], sd_direct[k]) for k in sd_file)
print(f"{sum(t.numel() for t in sd_file.values()) / 1e6:.2f}M parameters; the shards and the random source give "
      "identical weights")
""")

md(r"""
**How a weight is stored vs how a layer computes.** The model above holds dequantised fp32 weights. With
`keep_fp8=True` the FP8 linears stay as stored (`FP8Linear`: e4m3 weight + block scales, dequantised inside each
call), which is how the 671B model fits on the GPUs of section 2. The layers' code does not change, and neither do
the numbers:
""")

code(r"""
stored = dslib.load_pretrained(path, keep_fp8=True, progress=False)
ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(SEED))
with torch.no_grad():
    assert torch.equal(stored(ids), model(ids))
held = {name: sum(t.numel() * t.element_size() for t in m.state_dict().values())
        for name, m in (("fp32 weights", model), ("FP8 storage", stored))}
assert held["FP8 storage"] < held["fp32 weights"] / 2
print(", ".join(f"{k}: {v / 1e6:.1f} MB" for k, v in held.items()), "| identical logits")
print(stored.model.layers[1].mlp.experts[0])
""")

code(r"""
dslib.show(dslib.checkpoint._fill)
""")

md(r"""
The loader gives every parameter its final storage first, then reads one tensor at a time from its shard (no
memory map), dequantises it on the target device and copies it into place. So it needs host memory for about one
tensor beyond the model itself, however large the checkpoint. `benchmarks/load_memory.py` measures this on a
~1 GB synthetic FP8 checkpoint in a fresh process (numbers from `data/load_memory.csv`). The row marked
`safe_open` loads the largest-shard checkpoint through `safetensors.safe_open` instead, which memory-maps each
shard: the pages it reads count in the process while the shard is open, which is why dslib reads with plain file reads.
""")

code(r"""
load_csv = DATA / "load_memory.csv"
if load_csv.exists():
    load_rows = list(csv.DictReader(open(load_csv)))
    ours = [r for r in load_rows if r.get("reader", "dslib") == "dslib"]
    worst = max(float(r["extra_over_largest_shard"]) for r in ours)
    for r in load_rows:
        print(f"{r.get('reader', 'dslib'):9s} {int(r['n_shards']):3d} shards of up to "
              f"{float(r['largest_shard_bytes']) / 1e6:5.0f} MB: extra host memory {float(r['extra_bytes']) / 1e6:5.1f} MB "
              f"for a {float(r['model_bytes']) / 1e9:.2f} GB model ({r['machine']})")
    assert worst < 1.5
    display(viz.load_memory_figure(ours))
else:
    print("not measured yet: run `python benchmarks/load_memory.py` (writes data/load_memory.csv)")
""")

md(r"""
## 5. Checks on the loaded model

**Cached == uncached.** Generating with the latent + indexer caches (one prefill, then one token per step) must give
the same tokens as recomputing the whole sequence at every step. The prompt is longer than `index_topk`, so the
indexer really drops keys.
""")

code(r"""
prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(SEED))
t0 = time.perf_counter()
cached = model.generate(prompt, NEW_TOKENS)
t_cached = time.perf_counter() - t0
t0 = time.perf_counter()
uncached = model.generate(prompt, NEW_TOKENS, use_cache=False)
t_uncached = time.perf_counter() - t0
assert torch.equal(cached, uncached)
print(f"{NEW_TOKENS} tokens after a {PROMPT_LEN}-token prompt (index_topk = {cfg.index_topk}): identical; "
      f"{t_cached:.2f} s with the cache, {t_uncached:.2f} s without")
""")

md(r"""
Logits agree position by position, and the cache holds exactly what the formula says: per token and layer, the
normalised latent (`kv_lora_rank`), the rotated rope key (`qk_rope_head_dim`) and the indexer key
(`index_head_dim`), here in fp32.
""")

code(r"""
seq = cached
with torch.no_grad():
    full_logits = model(seq)
    cache = model.new_cache()
    steps = [model(seq[:, :PROMPT_LEN], cache)] + [model(seq[:, t:t + 1], cache) for t in range(PROMPT_LEN, seq.shape[1])]
diff = (torch.cat(steps, 1) - full_logits).abs().max().item()
per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.index_head_dim) * 4
assert diff < 1e-4 and cache.nbytes == len(cache) * per_token
print(f"max |logit difference| {diff:.1e}; cache {cache.nbytes:,} bytes = {len(cache)} tokens x {per_token:,} B")
""")

md(r"""
**Ties.** An index score is a weighted sum of ReLUs. With very few indexer heads it is often *exactly* zero
(every head's ReLU clipped), so many keys tie. `torch.topk` leaves the order of equal scores to the kernel, and a
cached run (one query at a time) and an uncached one (all queries at once) could then select different keys.
`dslib.sparse.topk_selection` breaks ties by key position (a stable sort), so the selection never depends on the
shape of the call. The real model has 64 indexer heads, where exact ties are rare; here 4 heads make them common,
and cached still equals uncached:
""")

code(r"""
few = dslib.load_pretrained(RandomSource(cfg.replace(index_n_heads=4), seed=SEED, fp8=True), progress=False)
with torch.no_grad():
    whole = few(seq)
    c4 = few.new_cache()
    split = torch.cat([few(seq[:, :PROMPT_LEN], c4)] + [few(seq[:, t:t + 1], c4) for t in range(PROMPT_LEN, seq.shape[1])], 1)
tie_diff = (split - whole).abs().max().item()
assert tie_diff < 1e-4
print(f"4 indexer heads: max |logit difference| cached vs uncached = {tie_diff:.1e} (16 heads: {diff:.1e})")
""")

md(r"""
**Sparse == dense for short prompts.** A query at position p sees p + 1 keys; if that is at most `index_topk`,
top-k keeps all of them and DSA *is* dense attention. Beyond that, the outputs must differ, or
the indexer would select nothing. **Naive == absorbed**: MLA's two computation orders (MHA mode and MQA mode) give
the same numbers, with the sparse selection too.
""")

code(r"""
short = prompt[:, :SHORT_LEN]
with torch.no_grad():
    d_short = (model(short, attention="sparse") - model(short, attention="dense")).abs().max().item()
    d_long = (model(prompt, attention="sparse") - model(prompt, attention="dense")).abs().max().item()
    d_mode = (model(prompt, mode="naive") - model(prompt, mode="absorbed")).abs().max().item()
assert d_short < 1e-4 and d_long > 1e-3 and d_mode < 1e-4
print(f"{SHORT_LEN} tokens: sparse vs dense {d_short:.1e} | {PROMPT_LEN} tokens: sparse vs dense {d_long:.2e} | "
      f"naive vs absorbed {d_mode:.1e}")
""")

md(r"""
## 6. What the model decided: a recorder

Pass a `Recorder` to a forward pass and every DSA layer reports the keys its indexer selected for each query, and
every MoE layer the experts its gate chose for each token. The views below only read those records. (The weights
are random, so the patterns show the mechanism, not language.)
""")

code(r"""
dslib.show(Recorder.on_selection)
""")

code(r"""
rec = Recorder()
with torch.no_grad():
    model(prompt, recorder=rec)
k = cfg.index_topk
for layer in rec.selection_layers:
    m = rec.selection_matrix(layer)
    counts = m.sum(1)
    assert torch.equal(counts[:k], torch.arange(1, k + 1)) and bool((counts[k:] == k).all())
print(f"layers {rec.selection_layers}: queries 0..{k - 1} keep every earlier key; later queries keep exactly {k}")
""")

md(r"""
**Which tokens does the indexer select?** Pick a layer and a query position. Dark cells are the selected keys,
light cells are visible keys the indexer skipped, white is the future. Below position `index_topk` everything
visible is selected.
""")

code(r"""
positions = sorted(set(rec.query_positions(0)))


def show_selection(layer=0, query=PROMPT_LEN - 1):
    return viz.selection_figure(rec.selection_matrix(layer), positions, query=query)


widgets.interact(show_selection,
                 layer=widgets.IntSlider(min=0, max=cfg.num_hidden_layers - 1, value=0, description="layer"),
                 query=widgets.IntSlider(min=0, max=PROMPT_LEN - 1, value=PROMPT_LEN - 1, description="query"));
""")

md(r"""
**How does the load spread over the experts?** Each MoE layer's gate sends every token to
`num_experts_per_tok` experts. The heatmap shows each expert's load relative to its fair share (1 = mean), one row per
layer. Compare a prompt of random tokens with one token repeated: identical tokens route identically, so a few
experts get everything, the imbalance that chapter 4's balancing fights.
""")

code(r"""
def expert_load(prompt_kind="random tokens"):
    ids = prompt if prompt_kind == "random tokens" else torch.full_like(prompt, int(prompt[0, 0]))
    r = Recorder(selections=False)
    with torch.no_grad():
        model(ids, recorder=r)
    layers, load = r.expert_load_matrix()
    assert bool((load.sum(1) == ids.numel() * cfg.num_experts_per_tok).all())
    return layers, load


layers, load = expert_load()
print(f"MoE layers {layers}: {load.sum(1).tolist()} routed (token, expert) pairs each "
      f"= {PROMPT_LEN} tokens x {cfg.num_experts_per_tok} experts")


def show_load(prompt_kind="random tokens"):
    layers, load = expert_load(prompt_kind)
    return viz.expert_load_heatmap(load, [f"layer {l}" for l in layers], cfg.n_group,
                                   title=f"Expert load, {prompt_kind} ({PROMPT_LEN} tokens)")


widgets.interact(show_load, prompt_kind=widgets.ToggleButtons(options=["random tokens", "one token repeated"]));
""")

md(r"""
## 7. One full-size layer on an H200 (measured)

`benchmarks/gpu_layer.py` builds one decoder layer with the **671B model's exact shapes** from a `RandomSource`
(FP8 blocks generated on the GPU and dequantised to bf16 by `load_layer`, the same loading code), then times
dslib's own PyTorch code: attention prefill and decode at several context lengths (dense vs DSA), and the MoE
block vs the dense FFN. It checks itself (finite outputs, sparse == dense where it must be). The cells below read
its CSVs from `data/` if they are there.
""")

code(r"""
att_csv, ffn_csv = DATA / "gpu_attention.csv", DATA / "gpu_moe.csv"
GPU = att_csv.exists() and ffn_csv.exists()
if GPU:
    att_rows, ffn_rows = list(csv.DictReader(open(att_csv))), list(csv.DictReader(open(ffn_csv)))
    print(f"measured on {att_rows[0]['device']} with torch {att_rows[0]['torch']}, {att_rows[0]['dtype']}, "
          f"index_topk {att_rows[0]['index_topk']}, indexer matmuls in {att_rows[0]['indexer_matmul']}")
else:
    print("not measured yet: run `python benchmarks/gpu_layer.py --out data/` on a GPU machine")
""")

code(r"""
def ms(phase, variant, context, batch=1):
    for r in att_rows:
        if (r["phase"], r["variant"], int(r["context"]), int(r["batch"])) == (phase, variant, context, batch):
            return float(r["median_ms"]) if r["median_ms"] else None  # blank: the case did not fit
    return None


if GPU:
    batches = sorted({int(r["batch"]) for r in att_rows if r["phase"] == "decode"})
    decode_ctx = max(int(r["context"]) for r in att_rows if r["phase"] == "decode")
    b = max(batches)
    dense, sparse = ms("decode", "dense_absorbed", decode_ctx, b), ms("decode", "sparse", decode_ctx, b)
    speedup = dense / sparse
    # what each step reads per layer and sequence, counted from the config (the times are recorded, not asserted)
    dense_read = decode_ctx * cfg_full.kv_bytes_per_token_per_layer("mla")
    sparse_read = (decode_ctx * cfg_full.kv_bytes_per_token_per_layer("indexer")
                   + cfg_full.index_topk * cfg_full.kv_bytes_per_token_per_layer("mla"))
    assert sparse_read < dense_read / 5
    print(f"cache read per step and layer: dense {dense_read / 1e6:.0f} MB, DSA {sparse_read / 1e6:.0f} MB "
          f"({dense_read / sparse_read:.1f}x less)")
    print(f"decode, batch {b}, {decode_ctx:,} cached tokens: dense MLA {dense:.2f} ms, DSA {sparse:.2f} ms "
          f"per step ({speedup:.1f}x)")
    # batch 1: the time hardly follows the bytes of cache read (roofline: bytes / HBM bandwidth)
    small_ctx = min(int(r["context"]) for r in att_rows if r["phase"] == "decode")
    t_small, t_big = ms("decode", "dense_absorbed", small_ctx, 1), ms("decode", "dense_absorbed", decode_ctx, 1)
    cache_read = decode_ctx * cfg_full.kv_bytes_per_token_per_layer("mla")  # bf16 latent + rope key per token
    roofline_ms = cache_read / 4.8e12 * 1e3
    print(f"batch 1: {t_small:.2f} ms at {small_ctx:,} tokens, {t_big:.2f} ms at {decode_ctx:,} "
          f"({decode_ctx // small_ctx}x the cache); reading {cache_read / 1e6:.0f} MB of cache takes "
          f"{roofline_ms * 1e3:.0f} us at 4.8 TB/s, so at batch 1 eager PyTorch is bound by launching kernels "
          "from Python, not by the cache")


def show_attention(phase="decode", batch=max(batches) if GPU else 1):
    return viz.gpu_attention_figure(att_rows, phase, batch=batch if phase == "decode" else None)


if GPU:
    widgets.interact(show_attention, phase=widgets.ToggleButtons(options=["decode", "prefill"]),
                     batch=widgets.Dropdown(options=batches, value=max(batches)));
""")

md(r"""
Reading the curves: at decode, dense MLA reads the whole latent cache for every new token, so its time grows with
the context once the batch is large enough to leave the overhead floor; DSA reads one small indexer key per token
plus `index_topk` selected latents, so it grows much more slowly (bytes per token and layer below). At prefill our DSA is **slower** than dense attention: the dense baseline runs PyTorch's fused
FlashAttention kernel, while our indexer writes a full `[T, S]` fp32 score matrix and our sparse attention gathers
latents with plain tensor operations. DeepSeek's production kernels (FlashMLA's sparse kernels, DeepGEMM's FP8
indexer) fuse these steps; that is where the paper's prefill savings come from ([FlashMLA, DeepGEMM](../docs/references.md#ch5)).
""")

code(r"""
for scheme in ("mla", "mla_fp8", "indexer"):
    print(f"{scheme:8s} {cfg_full.kv_bytes_per_token_per_layer(scheme):5,} bytes per token per layer")
print(f"DSA attends to index_topk = {cfg_full.index_topk:,} latents per query")
""")

code(r"""
if GPU:
    longest = max(int(r["context"]) for r in att_rows if r["phase"] == "prefill")
    t_sparse, t_index, t_sdpa = (ms("prefill", v, longest) for v in ("sparse", "indexer", "dense_sdpa"))
    print(f"prefill of {longest:,} tokens: DSA {t_sparse:.0f} ms (of which the indexer {t_index:.0f} ms) vs "
          f"fused dense attention {t_sdpa:.0f} ms")
    display(viz.gpu_ffn_figure(ffn_rows))
    moe = {int(r["tokens"]): r for r in ffn_rows if r["block"] == "moe"}
    one, many = moe[min(moe)], moe[max(moe)]
    print(f"MoE layer: {float(one['median_ms']):.2f} ms for {min(moe)} token ({one['experts_touched']} experts "
          f"touched), {float(many['median_ms']):.1f} ms for {max(moe):,} tokens ({float(many['tflops']):.0f} TFLOP/s)")
""")

md(r"""
## 8. The assembled model, trained on text

The views of section 6 ran on random weights, so their patterns showed the mechanism, not language. Here is the
same class, `DeepseekV32ForCausalLM`, at a small size with every mechanism of V3.2 (MLA with decoupled RoPE, the
lightning indexer with top-k selection, MoE layers with a shared expert, sigmoid gate, group-limited routing and
the auxiliary-loss-free bias; the first layer dense), **trained on real text**: the `.py` files of Python's
standard library, which every machine with Python already has. About 5% of the files, picked by a hash of their
path, were held out: the tokenizer (byte-level BPE from the `tokenizers` library) and the model never saw them.

`python -m dslib.lm_train --out data/textlm --device cuda` trained it on one GPU, with the paper's recipe for the
indexer (as chapter 3 did on its synthetic task): (a) dense training of the whole model; then, from the end of (a),
three variants for the same number of steps on the same batches: **dense** attention continued, a **sliding window**
of `index_topk` tokens, and **DSA**: (b) the indexer warm-up (main model frozen, each indexer learns the dense
attention by a KL loss), then (c) sparse training over the indexer's top-k. The DSA model ships in `data/textlm` in
the official layout (config.json, FP8 blocks, tokenizer.json) and loads with `dslib.load_pretrained`, the path the
671B checkpoint takes.
""")

code(r"""
import functools

from dslib import lm_data
from dslib.lm_train import TextInputError, inspect_text, load_textlm, summary_table

TEXTLM = DATA / "textlm"
HAVE_TEXTLM = (TEXTLM / "config.json").is_file()
if HAVE_TEXTLM:
    t0 = time.perf_counter()
    lm, lm_tok, lm_log = load_textlm(TEXTLM)
    t_load = time.perf_counter() - t0
    lm_cfg = lm.config
    stored = SafetensorsSource(TEXTLM).specs()
    n_fp8 = sum(s.dtype == torch.float8_e4m3fn for s in stored.values())
    on_disk = {p.name: p.stat().st_size for p in sorted(TEXTLM.iterdir()) if p.is_file()}
    assert n_fp8 > 0 and lm_cfg.index_topk < lm_cfg.max_position_embeddings and sum(on_disk.values()) < 25e6
    assert lm_cfg.topk_group < min(lm_cfg.n_group, lm_cfg.num_experts_per_tok)   # the group limit can bind
    assert not lm_cfg.is_moe_layer(0) and lm_cfg.n_shared_experts >= 1
    corpus, machine = lm_log["corpus"], lm_log["machine"]
    print(f"loaded in {t_load:.1f} s: {sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M parameters, "
          f"{n_fp8} FP8 weights; {sum(on_disk.values()) / 1e6:.1f} MB on disk")
    print(f"{lm_cfg.num_hidden_layers} layers, d = {lm_cfg.hidden_size}, context {lm_cfg.max_position_embeddings}, "
          f"index_topk {lm_cfg.index_topk}, {lm_cfg.n_routed_experts} experts in {lm_cfg.n_group} groups, "
          f"top-{lm_cfg.num_experts_per_tok} from <= {lm_cfg.topk_group} groups")
    print(f"trained with `{lm_log['command']}` on {machine.get('gpu', machine['device'])} in "
          f"{lm_log['wall_s'] / 60:.1f} min: Python {corpus['python']}'s standard library, "
          f"{corpus['files_train']} files for training, {corpus['files_eval']} held out")
else:
    print("The trained text model is not in data/textlm yet. Make it on a GPU machine with\n"
          "    python -m dslib.lm_train --out data/textlm --device cuda\n"
          "(a few minutes on one GPU); the cells of this section then use it.")
""")

md(r"""
**What the training log measured** on the held-out files (numbers from `data/textlm/textlm_log.json`, computed by
the training command). Rows are the three trained models, columns the attention each is run with. The distance of a
token is how far back the previous occurrence of the same token is in its held-out sequence: a token that
occurred before can be copied from there, and a window of `index_topk` keys reaches that occurrence only if the
distance is at most `index_topk`. Compare the variants bucket by bucket, in particular beyond the window.
""")

code(r"""
if HAVE_TEXTLM:
    res = lm_log["results"]
    print(summary_table(lm_log))
    by = res["by_variant"]
    plan = lm_log["stages"]["variants"]
    dense_stage = lm_log["stages"]["dense"]
    print(f"\neach variant: {plan['steps']} steps after {dense_stage['steps']} dense steps "
          f"(DSA: {plan['dsa_warmup_steps']} indexer warm-up + {plan['dsa_sparse_steps']} sparse)")
    display(viz.lm_training_figure({"dense (a)": dense_stage["curve"], **plan["curves"]},
                                   branch=dense_stage["steps"]))
    display(viz.loss_by_distance_figure(
        by["dsa"]["bucket_names"], {"dense": by["dense"]["bucket_loss"], "DSA top-k": by["dsa"]["bucket_loss"],
                                    "window": by["window"]["bucket_loss"]},
        by["dsa"]["bucket_counts"], window=lm_cfg.index_topk))
""")

md(r"""
**The indexer.** Run the DSA model with dense attention and ask how much of each query's attention mass (head
average) falls on the `index_topk` keys its indexer would pick, before the indexer was trained, after the warm-up,
and after sparse training; a window of the same size keeps the mass on the nearest keys. The line plot shows
where the selected keys lie: the window's are all within `index_topk` tokens, the indexer's need not be.
""")

code(r"""
if HAVE_TEXTLM:
    ana = res["attention_analysis"]
    final = ana["after (c) sparse training"]
    display(viz.recall_stages_figure({name.split(" ", 2)[-1]: a["recall_indexer"] for name, a in ana.items()},
                                     final["recall_window"]))
    edges = final["distance_edges"]
    display(viz.selection_distance_figure(edges, {f"layer {i}": row for i, row in
                                                  enumerate(final["selected_distance_share"])}))
    beyond = [sum(row[j] for j in range(len(row)) if edges[j] >= lm_cfg.index_topk)
              for row in final["selected_distance_share"]]
    print("share of the selected keys farther back than the window reaches, per layer: "
          + ", ".join(f"{b:.1%}" for b in beyond))
""")

md(r"""
**The experts.** Every MoE layer's routing of the held-out tokens, by token class (Python's own `tokenize`:
keyword, identifier, whitespace, string, number, operator, comment, other). Normalised mutual information 0 means
the expert choice says nothing about the class, 1 that it reveals it; MaxVio is chapter 4's imbalance measure.
""")

code(r"""
if HAVE_TEXTLM:
    dsa_ev = by["dsa"]
    moe_layers = dsa_ev["moe_layers"]
    print("normalised MI(expert; token class) per MoE layer: "
          + ", ".join(f"layer {l}: {v:.3f}" for l, v in zip(moe_layers, dsa_ev["nmi_class_expert"]))
          + " | MaxVio: " + ", ".join(f"{v:.2f}" for v in dsa_ev["maxvio"]))
    display(viz.expert_load_heatmap(torch.tensor(dsa_ev["load"]), [f"layer {l}" for l in moe_layers],
                                    lm_cfg.n_group, title="Expert load on the held-out files"))


def show_class_experts(layer=moe_layers[0] if HAVE_TEXTLM else 1):
    counts = dsa_ev["class_expert"][moe_layers.index(layer)]
    return viz.task_expert_heatmap(torch.tensor(counts), lm_data.TOKEN_CLASSES,
                                   title=f"Which experts each token class uses (layer {layer})")


if HAVE_TEXTLM:
    widgets.interact(show_class_experts, layer=widgets.Dropdown(options=moe_layers, value=moe_layers[0]));
""")

md(r"""
**Your own text.** Type or paste code or prose into the box (the model knows Python best). The text is tokenised,
run through the model with sparse attention as deployed, and drawn as its tokens. Pick a token: the view colours, in
the text itself, the keys the indexer selected for it in the chosen layer, against the last `index_topk` tokens a
window would keep. Or colour every token by the expert that served it most in that layer, or by its token class.
Hover a character to see its token's index. The default text is the start of a held-out file of *your* Python's
standard library.
""")

code(r"""
@functools.lru_cache(maxsize=4)
def analyse_text(text):
    return inspect_text(lm, lm_tok, text)   # moving a slider re-draws, it does not re-run the model


if HAVE_TEXTLM:
    held_out = [f for f in corpus["eval_files"] if (lm_data.stdlib_root() / f).is_file()]
    pick = "json/encoder.py" if "json/encoder.py" in held_out else (held_out[0] if held_out else None)
    source = lm_data.read_source(lm_data.stdlib_root() / pick) if pick else None
    source = source or "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
    lines = source.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines) if line.startswith(("def ", "class "))), 0)
    sample = ""
    for line in lines[first:first + 36]:   # whole lines, as many as the context holds
        if len(lm_tok.encode(sample + line).ids) > lm_cfg.max_position_embeddings:
            break
        sample += line
    t0 = time.perf_counter()
    sample_view = analyse_text(sample)
    t_text = time.perf_counter() - t0
    k = lm_cfg.index_topk
    for layer, rows in sample_view.selected.items():   # causal, and exactly min(q + 1, k) keys per query
        assert all(sum(s >= 0 for s in row) == min(q + 1, k) and max(row) <= q for q, row in enumerate(rows))
    last = len(sample_view.ids) - 1
    far = {layer: sum(s < last - k + 1 for s in sample_view.selected_keys(layer, last)) for layer in sample_view.selected}
    print(f"{pick or 'a built-in snippet'}: {len(sample_view.ids)} tokens through the model in {t_text:.2f} s; the last "
          f"token's selected keys outside the {k}-token window, per layer: {far}")
""")

code(r"""
def show_text(text="", view="indexer selection", layer=0, token=0):
    try:
        analysis = analyse_text(text)
    except TextInputError as err:
        return viz.message_figure(str(err), title="this text cannot run")
    return viz.text_view_figure(analysis, view, layer, token, n_experts=lm_cfg.n_routed_experts,
                                n_group=lm_cfg.n_group, class_names=lm_data.TOKEN_CLASSES)


if HAVE_TEXTLM:
    widgets.interact(
        show_text,
        text=widgets.Textarea(value=sample, rows=6, continuous_update=False, layout=widgets.Layout(width="95%")),
        view=widgets.ToggleButtons(options=["indexer selection", "experts", "token classes"]),
        layer=widgets.IntSlider(min=0, max=lm_cfg.num_hidden_layers - 1, value=lm_cfg.num_hidden_layers - 1),
        token=widgets.IntSlider(min=0, max=last, value=last, description="token"));
""")

md(r"""
Text the model cannot take gets a message, not a traceback: an empty text, or one longer than the context. Any
character can be typed: byte-level BPE encodes every UTF-8 text (a character it never saw becomes its bytes), so
nothing is ever replaced by an "unknown" token.
""")

code(r"""
if HAVE_TEXTLM:
    messages = {}
    for name, bad in (("empty", "   "), ("too long", "x = 1\n" * lm_cfg.max_position_embeddings)):
        try:
            inspect_text(lm, lm_tok, bad)
        except TextInputError as err:
            messages[name] = str(err)
    assert "empty" in messages["empty"] and "context" in messages["too long"]
    print("\n".join(f"{k}: {v}" for k, v in messages.items()))
    odd = "s = '🙂 naïve 中文'"
    assert lm_tok.decode(lm_tok.encode(odd).ids) == odd
    print(f"{odd!r} -> {len(lm_tok.encode(odd).ids)} tokens, decoded back exactly")
    prompt_ids = torch.tensor([lm_tok.encode("def read_lines(path):\n").ids])
    with torch.no_grad():
        out_ids = lm.generate(prompt_ids, NEW_TOKENS)
    print("greedy continuation of 'def read_lines(path):':\n" + lm_tok.decode(out_ids[0].tolist()))
""")

md(r"""
## What you built

- `dslib.model`: `decoder_layer` (chapter 1's `DecoderLayer` with DSA and a dense FFN or MoE),
  `DeepseekV32ForCausalLM` (logits, `new_cache` with one `DSACache` per layer, greedy `generate`, placement on
  several devices), with per-call switches `attention="sparse" | "dense" | "window"`, `mode="absorbed" | "naive"`,
  `window`, `precision` and `backend`; its `state_dict()` names are the official checkpoint's.
- `dslib.checkpoint`: the tensor table from a config, FP8 block (de)quantisation, `FP8Linear` storage, tensor sources (safetensors
  shards read one tensor at a time, a seeded random generator, a state dict), `write_checkpoint` /
  `save_pretrained` / `write_synthetic_checkpoint`, and `load_pretrained` / `load_layer` with clear errors for
  missing, corrupt or mismatched files. The loaded model matches transformers' `DeepseekV32ForCausalLM` (tests).
- `dslib.devices`: a memory plan from the config, with a clear error when the GPUs are too small.
- `dslib.record.Recorder`: token selections and expert routing recorded during a forward pass.
- `benchmarks/load_memory.py` and `benchmarks/gpu_layer.py`: host memory of loading, and one full-size layer on a GPU.

## Exercises

Each cell calls a check from `dslib.exercises.ch5` that answers "correct" or "not yet, because …".

**1. Build it: the FP8 block dequantisation.** Write `my_dequantize(q, scale_inv)` from torch operations (not
dslib's `dequantize_fp8_blocks`): `q` is an e4m3 weight `[out, in]`, `scale_inv` its float32 block scales
`[ceil(out/128), ceil(in/128)]`; return the fp32 weight, `W[i, j] = float(q[i, j]) · scale_inv[i // 128, j // 128]`.
It must handle partial edge blocks (576 rows, like `kv_a_proj_with_mqa`). The check runs it on fresh random
weights next to dslib's.
""")

code(r"""
def my_dequantize(q, scale_inv):
    raise NotImplementedError  # your code here


ch5.check_dequantize(my_dequantize)
""")

md(r"""
**2. The price of fine-grained scales.** How many bytes do all `weight_scale_inv` tensors of the 671B FP8
checkpoint take (layers 0–60, embeddings and head; not the MTP layer 61)? Work it out from the shapes in
the checkpoint's tensor table (`checkpoint_tensors`).
""")

code(r"""
answer = None  # a number of bytes
ch5.check_scale_bytes(answer)
""")

md(r"""
**3. How many GPUs in bf16?** Section 2 found the fewest H200s for the FP8 weights. How many would the weights
need **dequantised to bf16** (`H200_BYTES` each, 10% of each kept free, every layer whole on one GPU)? Reason
with the layer sizes from `module_bytes(cfg_full, "bf16")`.
""")

code(r"""
answer = None  # a number of GPUs
ch5.check_gpus_needed(answer, storage="bf16")
""")

nb.write()
