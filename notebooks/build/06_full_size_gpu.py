"""Writes notebooks/06_full_size_gpu.ipynb (run from the repository root; the notebook is committed without outputs).

    python notebooks/build/06_full_size_gpu.py
"""
from nbbuild import Notebook

nb = Notebook("06_full_size_gpu.ipynb", ids="ch6-{:02d}")
md, code = nb.md, nb.code


md(r"""
# 6 · The full-size DeepSeek-V3.2 on GPUs, and you watch it choose

Chapter 5 assembled DeepSeek-V3.2 and ran it small on a CPU. This chapter runs the **full-size model** — 61 layers,
7,168 wide, 256 experts per layer, 671B parameters — on whatever GPUs a machine has, and records what it decides:
which earlier tokens the lightning indexer selects for each query, and how the tokens spread over the experts.

You will learn

- how a **memory plan** made from the config alone decides between keeping all layers on the GPUs (8 H200s) and
  **streaming** them through one GPU a few at a time, and why a 128K-token prefill is cut into query chunks;
- how full-size synthetic weights are made **on the GPU, directly in the FP8 format** (no 642 GiB download);
- why layer-major streaming gives exactly the numbers of the resident model (checked here on a small model);
- what the 61 layers selected at 128K tokens: distances, a strip over all keys, overlaps between layers and between
  neighbouring queries, the share a sliding window would miss; and the expert load of 58 MoE layers, with the
  GPU-to-GPU traffic of expert parallelism with and without group-limited routing;
- how the same code loads the **real checkpoint** folder (tokenizer included), and what the serving engines
  (vLLM, SGLang) do when one machine is not enough.

Without a suitable GPU the notebook replays a recording that a GPU run shipped in `data/`, and runs a small
configuration on the CPU through the same streaming code.
""")

code(r"""
import ast
import csv
import json
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
from dslib.checkpoint import CheckpointError, SafetensorsSource, load_pretrained
from dslib.config import H200_MEMORY_BYTES, ModelConfig
from dslib.devices import (GiB, DevicePlanError, cache_bytes_per_token, fmt_bytes, held_module_bytes, plan_run,
                           serving_memory)
from dslib.exercises import ch6
from dslib.record import load_recording
from dslib.cost import core_attention_flops, indexer_flops
from dslib.streaming import (NonFiniteError, StreamedModel, encode_prompt, load_tokenizer, recorded_prefill,
                             run_layer)
from dslib.synthetic import SIGMA_Q, SyntheticFP8Source, file_checksums, train_test_tokenizer

torch.manual_seed(0)
torch.set_num_threads(1)  # small models on a CPU: one thread avoids synchronisation overhead


def suitable_gpu():
    # a CUDA GPU with FP8 tensor cores (compute capability 8.9+) and room for a few full-size layers
    if not torch.cuda.is_available():
        return None, "no CUDA GPU"
    props = torch.cuda.get_device_properties(0)
    if (props.major, props.minor) < (8, 9) or props.total_memory < 40e9:
        return None, f"{props.name} ({props.total_memory / 1e9:.0f} GB, compute capability {props.major}.{props.minor})"
    return props, props.name


GPU, gpu_name = suitable_gpu()
print(f"python {platform.python_version()} | torch {torch.__version__} | plotly {plotly.__version__} | "
      f"dslib {dslib.__version__} | {os.cpu_count()} CPU cores")
print(f"GPU: {gpu_name}: the full-size run happens here." if GPU else
      f"No suitable GPU here ({gpu_name}; needs FP8 and >= 40 GB): the views replay the GPU recording in data/, and "
      "a small configuration runs on this CPU through the same streaming code.")
""")

code(r"""
# Sizes. DSLIB_FAST=1 (CI) runs the same code on smaller sizes.
FAST = os.environ.get("DSLIB_FAST") == "1"
SEED = 0
H200_BYTES = H200_MEMORY_BYTES       # memory one H200 reports (143,771 MiB)
PEAK_LIMIT = 128 * GiB                # what the one-GPU plan may use (the goal is a peak <= 130 GiB)
LONG = 131072                         # the 128K-token prompt of the full-size run
SMALL = dict(index_n_heads=16, index_topk=32, num_hidden_layers=6, vocab_size=2048)  # the CPU model of sections 3, 6
PROMPT_LEN = 96 if FAST else 256
NEW_TOKENS = 4 if FAST else 12
RUN_FULL_SIZE = bool(GPU) and not FAST  # on a suitable GPU: run the full-size prefill here (1-3 minutes)
CHECKPOINT = os.environ.get("DSLIB_CHECKPOINT")  # the real DeepSeek-V3.2 folder, if you have it
DATA = Path("..") / "data" if Path("..", "data").is_dir() else Path("data")
RECORDING = DATA / "full_model_recording.json.gz"
""", tags=["parameters"])

md(r"""
## 1. A plan before loading anything

The FP8 weights are several times one H200's memory (chapter 5 counted them). `dslib.devices.plan_run` does the
arithmetic from the config before a byte is loaded: the bytes each layer holds on the device (FP8 blocks; chapter 5),
the hidden state `[T, 7168]` that stays on the GPU, the caches (latent + rope key + indexer key per token and layer),
and an estimate of the activations of one chunk of the prompt. If every layer fits, every layer stays **resident**;
otherwise the layers **stream** and as many as fit stay resident.
""")

code(r"""
dslib.show(plan_run)
""")

code(r"""
cfg_full = ModelConfig.deepseek_v32()
one = plan_run(cfg_full, [H200_BYTES], prompt_len=LONG, memory_limit=PEAK_LIMIT, backend="triton")
eight = plan_run(cfg_full, [H200_BYTES] * 8, prompt_len=LONG, backend="triton")
print(one, "\n")
print(eight)
assert one.mode == "streaming" and eight.mode == "resident"
assert one.peak_bytes() <= PEAK_LIMIT and all(eight.peak_bytes(d) <= H200_BYTES for d in eight.devices)
viz.memory_plan_figure(one.rows() + eight.rows()[:2], title="The plan on 1 H200 (streaming) and 2 of 8 H200s (resident)")
""")

md(r"""
The prompt is cut into chunks: `attn_chunk` queries at a time through the attention, `moe_chunk` tokens at a time
through the FFN, sized so one chunk's temporaries stay within the activation budget (20 GiB). With the fused
kernels (`backend="triton"`) the indexer never holds per-head scores, so its chunks can be much larger than with
the PyTorch path. Asking for more than the GPUs hold is refused before anything loads, with the bytes named:
""")

code(r"""
try:
    plan_run(cfg_full, [H200_BYTES], prompt_len=LONG, streaming=False)
    raise AssertionError("all 61 layers cannot be resident on one H200")
except DevicePlanError as err:
    message = str(err)
print(message)
assert "GB" in message and "streaming=True" in message
""")

code(r"""
def show_plan(gpus=1, prompt_k=128, backend="triton"):
    plan = plan_run(cfg_full, [H200_BYTES] * gpus, prompt_len=prompt_k * 1024, backend=backend,
                    memory_limit=PEAK_LIMIT if gpus == 1 else None)
    return viz.memory_plan_figure(plan.rows(), title=f"{plan.mode}: {len(plan.resident)} resident, "
                                  f"{len(plan.streamed)} streamed layers; chunks of {plan.attn_chunk:,} queries")


widgets.interact(show_plan, gpus=widgets.Dropdown(options=[1, 2, 4, 8], value=1),
                 prompt_k=widgets.IntSlider(min=4, max=160, step=4, value=128, description="prompt (K)"),
                 backend=widgets.ToggleButtons(options=["triton", "torch"]));
""")

md(r"""
## 2. Full-size weights, made on the GPU in the stored format

The release's shards fit on no disk of the machines this series runs on, so full-size runs use seeded
synthetic weights with the checkpoint's names, shapes and dtypes. `SyntheticFP8Source` writes them the way the
release stores them: **e4m3 codes** drawn once from a normal distribution (clamped to ±448: e4m3 has no infinity),
and one **power-of-two scale per 128×128 block** (DeepSeek-V3.2's `ue8m0` scale format). There is no fp32 copy and no
max-abs pass, which is what makes it fast. It is a `TensorSource`, so it loads through exactly the code that
loads a checkpoint folder.
""")

code(r"""
dslib.show(SyntheticFP8Source.make)
""")

code(r"""
big = SyntheticFP8Source(ModelConfig.small(hidden_size=1024, moe_intermediate_size=1024), seed=SEED)
name = "model.layers.1.mlp.experts.0.gate_proj.weight"
q, scale = big.make(name), big.make(name + "_scale_inv")
again = SyntheticFP8Source(big.config, seed=SEED).make(name)
assert torch.equal(q.view(torch.uint8), again.view(torch.uint8))          # seeded: the same bytes every time
assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)        # powers of two
codes = q.float()
assert abs(codes.std() / SIGMA_Q - 1) < 0.02 and codes.abs().max() <= 448
print(f"{q.dtype} codes: std {codes.std():.1f} (intended {SIGMA_Q:.0f}), |max| {codes.abs().max():.0f}; scales "
      f"{sorted(set(scale.flatten().tolist()))}; so the weight's std is {big.weight_std():.4f}")
viz.value_histogram_figure(codes.flatten()[:200_000], bins=120, title="One synthetic FP8 weight: its e4m3 codes",
                           x_title="e4m3 value (times the block's scale = the weight)")
""")

md(r"""
## 3. Layer streaming, checked on a small model

With streaming, the prompt moves through the model **layer-major**: all T tokens through layer i, then layer i+1.
Only the hidden state `[T, d]` and one streamed layer are on the GPU at a time (plus the resident layers). Inside a
layer, the queries go through the attention a chunk at a time: each chunk appends its latents and indexer keys to
the layer's cache, so later chunks still see every earlier token. Then the FFN runs over the tokens in chunks. That is
exactly the decoder layer's `x + attention(norm(x))`, then `+ FFN(norm(·))`, in pieces:
""")

code(r"""
dslib.show(run_layer)
""")

code(r"""
dslib.show(StreamedModel.forward_layers)
""")

md(r"""
On the CPU we pretend the "GPU" is three MoE layers too small for the whole small model, so the plan streams. The
streamed prefill must give the resident model's logits, and streamed generation its tokens.
""")

code(r"""
def three_layers_too_small(cfg, **plan):
    # a pretend device: what keeping everything resident needs (same prompt and chunks), minus three MoE layers
    everything = plan_run(cfg, [1e12], names=["cpu"], dtype_bytes=4, reserve_bytes=0, keep_caches="all", **plan)
    return everything.peak_bytes() - 3 * held_module_bytes(cfg)[f"model.layers.{cfg.num_hidden_layers - 1}"]


cfg = ModelConfig.small(**SMALL)
source = SyntheticFP8Source(cfg, seed=SEED)
chunks = dict(prompt_len=PROMPT_LEN, max_new_tokens=NEW_TOKENS, attn_chunk=PROMPT_LEN // 3)
plan = plan_run(cfg, [three_layers_too_small(cfg, **chunks)], names=["cpu"], dtype_bytes=4, reserve_bytes=0,
                keep_caches="all", **chunks)
print(plan)
assert plan.mode == "streaming" and plan.streamed
""")

code(r"""
resident_model = load_pretrained(source, progress=False, keep_fp8=True)
streamed = StreamedModel(source, plan, dtype=torch.float32)
prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(SEED))
t0 = time.perf_counter()
logits = streamed.prefill(prompt)
t_streamed = time.perf_counter() - t0
with torch.no_grad():
    want = resident_model(prompt)[:, -1]
diff = (logits - want).abs().max().item()
assert diff < 1e-5
tokens = streamed.generate(prompt, NEW_TOKENS)
assert torch.equal(tokens, resident_model.generate(prompt, NEW_TOKENS))
print(f"streamed prefill of {PROMPT_LEN} tokens through {cfg.num_hidden_layers} layers ({len(plan.streamed)} streamed, "
      f"attention chunks of {plan.attn_chunk}): max |logit difference| {diff:.1e} vs the resident model, "
      f"same {NEW_TOKENS} generated tokens; {t_streamed:.2f} s on this CPU")
viz.layer_time_figure([t.as_dict() for t in streamed.timings], title="The small streamed prefill, layer by layer (this CPU)")
""")

md(r"""
A layer whose output holds NaN or inf stops the run with the layer's name (every layer's output is checked; one
reduction over the hidden state). Here a corrupted norm weight in layer 2:
""")

code(r"""
class Corrupted(SyntheticFP8Source):
    def make(self, name, out=None):
        t = super().make(name, out)
        if name == "model.layers.2.post_attention_layernorm.weight":
            t[0] = float("inf")
        return t


try:
    StreamedModel(Corrupted(cfg, seed=SEED), plan, dtype=torch.float32).prefill(prompt)
    raise AssertionError("the corrupted layer should be caught")
except NonFiniteError as err:
    print(err)
    assert "layer 2" in str(err)
""")

md(r"""
## 4. The full-size run: what 61 layers chose at 128K tokens

On a suitable GPU this cell runs the full-size streamed prefill itself (`recorded_prefill`: the small model's code
above, with the 671B config, `SyntheticFP8Source` on the GPU and the Triton kernels). Everywhere else it loads the
recording that `benchmarks/gpu_full_model.py` made on an H200 and shipped in `data/`. A `SummaryRecorder` keeps
only compact summaries during the forward — histograms, a few queries' selections, counts — never a `[T, S]`
matrix, so recording 128K tokens × 61 layers costs kilobytes per layer.

The weights are random, so these views show the **mechanism**, not language: which keys a trained indexer picks
depends on the text (chapter 3's trained model, and the text model of this series, show that).
""")

code(r"""
from dslib import kernels

if RUN_FULL_SIZE and kernels.available():
    tuning = DATA / "gpu_kernels" / "gpu_kernels_best.json"  # the tiles and variants measured fastest on an H200
    if tuning.is_file():
        kernels.use_tuning(tuning)
    try:
        plan_gpu = plan_run(cfg_full, prompt_len=LONG, memory_limit=PEAK_LIMIT, backend="triton")
        full = StreamedModel(SyntheticFP8Source(cfg_full, seed=SEED, device="cuda"), plan_gpu, precision="fp8")
        full.load_resident()
        ids = torch.randint(0, cfg_full.vocab_size, (1, LONG), generator=torch.Generator().manual_seed(SEED))
        _, recording, _ = recorded_prefill(full, ids, machine=gpu_name, torch=torch.__version__,
                                           date=time.strftime("%Y-%m-%d"), weights=f"synthetic weights, seed {SEED}",
                                           label=f"this machine ({gpu_name}), synthetic weights, seed {SEED}")
        del full
    except (DevicePlanError, torch.cuda.OutOfMemoryError) as err:
        print(f"the full-size run does not fit this GPU ({err}); replaying the recording instead")
        recording = load_recording(RECORDING)
else:
    recording = load_recording(RECORDING)
print(f"recording: {recording.get('label', '')} | {recording['machine']} | torch {recording['torch']} | "
      f"{recording['date']} | {recording['weights']} | prompt: {recording.get('prompt', '')}")
if recording.get("stand_in"):
    print("NOTE: this is the stand-in recording made by a small CPU run of the same code, not the H200 run; "
          "see the README for the one command that records it on a GPU.")
sel, routing = recording["selection"], recording["routing"]
rcfg = ModelConfig.from_dict(recording["config"])
T_REC, WINDOW = recording["prompt_len"], recording["window"]
print(f"{len(sel['layers'])} DSA layers and {len(routing['layers'])} MoE layers recorded over {T_REC:,} tokens; "
      f"as compressed JSON: {len(__import__('gzip').compress(json.dumps(recording).encode())) / 1e6:.2f} MB")
""")

md(r"""
**Where the time went.** Per layer: making (or reading) its weights, the indexer + top-k, the rest of the attention,
and the FFN. The first layers stayed resident: their weights were made once, before the pass.
""")

code(r"""
res = recording.get("result", {})
timings = recording.get("timings", [])
if res:
    # wall_s: the whole prefill as the script timed it (embedding and head included); pass_s: the pass through the layers
    print(f"{res['layers']} layers x {res['tokens']:,} tokens: {res.get('wall_s', res['end_to_end_s']):.1f} s end to end, "
          f"{res.get('pass_s', res['end_to_end_s']):.1f} s of it the pass through the layers "
          f"(weights {res['load_s']:.1f} s, attention {res['attention_s']:.1f} s of which indexer + top-k "
          f"{res['indexer_s']:.1f} s, FFN {res['ffn_s']:.1f} s)"
          + (f"; peak GPU memory {res['peak_reserved_GiB']:.1f} GiB (plan: {recording['plan']['planned_peak_GiB']:.1f})"
             if "peak_reserved_GiB" in res else ""))
    assert res["layers"] == len(timings) == rcfg.num_hidden_layers
viz.layer_time_figure(timings, title=f"Prefill of {T_REC:,} tokens, layer by layer ({recording['machine']})")
""")

md(r"""
**How far back do the selected keys lie?** For every query, the distance to each of its `index_topk` selected keys,
counted in log-scale bins. A sliding window of the same budget would only ever see the distances left of the dashed
line.
""")

code(r"""
edges = sel["distance_bin_edges"]
for j, layer in enumerate(sel["layers"]):
    assert sum(sel["distance_hist"][j]) >= sel["eligible"][j] > 0   # every selected key is in one bin


def show_distances(layer=sel["layers"][len(sel["layers"]) // 2]):
    j = sel["layers"].index(layer)
    first, last = sel["layers"][0], sel["layers"][-1]
    rows = {f"layer {l}": sel["distance_hist"][sel["layers"].index(l)] for l in dict.fromkeys([first, layer, last])}
    return viz.distance_histogram_figure(edges, rows, window=WINDOW)


widgets.interact(show_distances, layer=widgets.SelectionSlider(options=sel["layers"], description="layer", continuous_update=False));
""")

md(r"""
**One query's selection, over all the keys.** Each strip is one query: its selected keys among all positions before
it, binned; the black ticks are the keys with the highest index scores; the grey band is what a sliding window of the
same budget sees.
""")

code(r"""
strip_queries = sel["strip_queries"]
assert all(len(sel["strips"][j][i]) == min(q + 1, rcfg.index_topk)
           for j in range(len(sel["layers"])) for i, q in enumerate(strip_queries))


def show_strip(layer=sel["layers"][0], query=strip_queries[-1]):
    j, i = sel["layers"].index(layer), strip_queries.index(query)
    return viz.selection_strip_figure(sel["strips"][j][i], query, window=WINDOW)


widgets.interact(show_strip, layer=widgets.SelectionSlider(options=sel["layers"], description="layer", continuous_update=False),
                 query=widgets.Dropdown(options=strip_queries, value=strip_queries[-1], description="query"));
""")

md(r"""
**What a sliding window would miss.** Per layer, the share of selected keys (of queries at positions ≥ the budget)
that lie beyond a window of the same size. With random weights the indexer's choices are spread over the whole past,
so most of them lie beyond the window (chapter 3 showed what a trained indexer picks instead).
""")

code(r"""
share = [b / e for b, e in zip(sel["beyond_window"], sel["eligible"])]
assert all(0.5 < s <= 1 for s in share)  # most selected keys lie beyond the window, in every layer
print(f"beyond the window: {min(share):.1%} .. {max(share):.1%} of the selected keys, depending on the layer")
viz.beyond_window_figure(sel["layers"], sel["beyond_window"], sel["eligible"], WINDOW)
""")

md(r"""
**Do layers agree, do neighbours agree?** Left: for sampled queries, the share of selected keys two layers have in
common. Right: the share of query p's keys that query p + D also selects (every indexer in every layer scores the
keys afresh, from its own weights).
""")

code(r"""
overlap = sel["layer_overlap"]
if overlap:
    assert all(abs(overlap[i][i] - 1) < 1e-9 for i in range(len(overlap)))
    off = [overlap[i][j] for i in range(len(overlap)) for j in range(len(overlap)) if i != j]
    print(f"two different layers share {sum(off) / len(off):.1%} of a query's keys on average")
    display(viz.layer_overlap_figure(sel["layers"], overlap))
viz.neighbour_overlap_figure(sel["layers"], sel["neighbour_mean"], sel["neighbour_offsets"])
""")

md(r"""
**Expert load.** Each MoE layer sends every token to 8 of its 256 routed experts, chosen from at most 4 of the 8
groups (group-limited routing). The heatmap shows each expert's load relative to its layer's mean; the groups are
marked. The recorder also computed, from the same router scores and the same bias, the routing **without** the group
limit, to see what the limit costs and buys.
""")

code(r"""
k_e = routing["experts_per_token"]
for j, tokens in enumerate(routing["tokens"]):
    assert sum(routing["load"][j]) == sum(routing["load_unlimited"][j]) == tokens * k_e


def show_load(routing_kind="group-limited (the model)"):
    load = routing["load"] if routing_kind.startswith("group") else routing["load_unlimited"]
    return viz.expert_load_grid_figure(load, routing["layers"], routing["n_group"],
                                       title=f"Expert load, {routing_kind}")


widgets.interact(show_load, routing_kind=widgets.ToggleButtons(options=["group-limited (the model)", "no group limit"]));
""")

code(r"""
viz.load_imbalance_figure(routing["layers"], {"group-limited": routing["load"], "no group limit": routing["load_unlimited"]})
""")

md(r"""
**Traffic between GPUs.** Under expert parallelism the 256 experts of a layer live on 8 GPUs (32 consecutive
experts, one group, per GPU), and each token is sent once to every other GPU that holds one of its experts. Group-limited
routing caps that at 4 GPUs per token; without the limit a token's 8 experts land on more GPUs.
""")

code(r"""
G = routing["ep_gpus"]
lim = [sum(h[g] * g for g in range(G + 1)) / max(sum(h), 1) for h in routing["ep_gpus_hist"]]
free = [sum(h[g] * g for g in range(G + 1)) / max(sum(h), 1) for h in routing["ep_gpus_hist_unlimited"]]
if routing["n_group"] == G:   # one group per GPU: the limit caps the GPUs a token reaches
    assert all(sum(h[routing["topk_group"] + 1:]) == 0 for h in routing["ep_gpus_hist"])
assert sum(lim) <= sum(free)
print(f"GPUs a token reaches, mean over layers: {sum(lim) / len(lim):.2f} with the group limit, "
      f"{sum(free) / len(free):.2f} without; copies sent to other GPUs per token: "
      f"{sum(routing['ep_sent']) / sum(routing['tokens']):.2f} vs {sum(routing['ep_sent_unlimited']) / sum(routing['tokens']):.2f}")
viz.ep_traffic_figure(routing["layers"], {"group-limited": routing["ep_sent"], "no group limit": routing["ep_sent_unlimited"]},
                      routing["tokens"], G)
""")

code(r"""
totals = {name: [sum(h[g] for h in routing[key]) for g in range(G + 1)]
          for name, key in (("group-limited", "ep_gpus_hist"), ("no group limit", "ep_gpus_hist_unlimited"))}
viz.nodes_touched_bars(totals, title=f"GPUs each token must reach (experts on {G} GPUs), all MoE layers")
""")

md(r"""
**The same views with trained weights.** Synthetic weights show the mechanism, not language: the indexer above
scores keys at random, so its picks spread over the whole past. Chapter 5's small DeepSeek-V3.2 was trained on
Python's standard library (`data/textlm`); run it over held-out files with the same `SummaryRecorder` and compare.
The trained indexer reaches far back mostly in its first layers and keeps most of its budget nearby in the last
ones, and its layers agree with each other far more than random ones do.
""")

code(r"""
from dslib import lm_data                  # chapter 5: the text model's data and training
from dslib.lm_train import load_textlm
from dslib.record import SummaryRecorder

TEXTLM = DATA / "textlm"
trained = None
if (TEXTLM / "config.json").is_file():
    lm, lm_tok, lm_log = load_textlm(TEXTLM)
    lcfg = lm.config
    held_out = [f for f in lm_log["corpus"]["eval_files"] if (lm_data.stdlib_root() / f).is_file()]
    text = "".join(lm_data.read_source(lm_data.stdlib_root() / f) or "" for f in held_out[:3]) or \
        "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n" * 40
    ids_t = torch.tensor([lm_tok.encode(text).ids[: lcfg.max_position_embeddings]])
    T_t = ids_t.shape[1]
    rec_t = SummaryRecorder(lcfg, prompt_len=T_t, strip_queries=[T_t - 1],
                            sample_queries=range(lcfg.index_topk, T_t, 32), ep_gpus=4)
    rec_t.watch(lm)
    with torch.no_grad():
        lm(ids_t, recorder=rec_t)
    trained = rec_t.to_dict(machine="this CPU", weights="trained on text (data/textlm)")
    tsel = trained["selection"]
    t_share = [b / e for b, e in zip(tsel["beyond_window"], tsel["eligible"])]
    t_overlap = [tsel["layer_overlap"][i][j] for i in range(len(t_share)) for j in range(len(t_share)) if i != j]
    assert min(t_share) < min(share)   # a trained indexer keeps more of its picks inside the window than a random one
    assert t_share[0] > t_share[-1]    # ... most of all in its last layer
    syn = sum(off) / len(off) if overlap else float("nan")
    print(f"{T_t:,} held-out tokens, {len(t_share)} layers: selected keys beyond a {lcfg.index_topk}-token window "
          + ", ".join(f"{x:.0%}" for x in t_share) + f" (synthetic full size: {min(share):.0%}..{max(share):.0%}); "
          f"two layers share {sum(t_overlap) / len(t_overlap):.0%} of a query's keys (synthetic: {syn:.0%})")
    display(viz.distance_histogram_figure(tsel["distance_bin_edges"],
                                          {f"layer {l}": h for l, h in zip(tsel["layers"], tsel["distance_hist"])},
                                          window=lcfg.index_topk, title="Trained on text: how far back the picks lie"))
    display(viz.expert_load_grid_figure(trained["routing"]["load"], trained["routing"]["layers"], lcfg.n_group,
                                        title="Trained on text: expert load on held-out files"))
else:
    print("data/textlm is missing (chapter 5's trained model): `python -m dslib.lm_train --out data/textlm` makes it")
""")

md(r"""
## 5. Decoding, and the step to 8 GPUs

After the prefill, the resident layers keep their 128K-token caches, and the GPU run decodes one token at a time
over them, at batch 1 and 32. A token passes the 61 layers one after another even when they sit on 8 GPUs (the
plan's pipeline placement), so the 8-GPU step time is the sum of per-layer times, which the one-GPU run measured;
the method is stated with the numbers. Those per-layer times are measured eagerly, one kernel launch after another,
and at batch 1 the launches dominate: the same resident step replayed as one CUDA graph is several times faster,
so the graph-based line below (the graph step per layer, times 61) is the better estimate of what a served model
pays, and the eager one an upper bound.
""")

code(r"""
decode = recording.get("decode")
if decode:
    for r in decode["rows"]:
        graph = f", {r['graph_step_ms']:.2f} ms with a CUDA graph" if "graph_step_ms" in r else ""
        print(f"batch {r['batch']:>2}: {r['step_ms']:.2f} ms per step over {r['layers']} resident layers with "
              f"{r['context']:,} cached tokens{graph}")
    for b, e in decode["extrapolation"].items():
        print(f"61 layers on 8 GPUs, batch {b}: ~{e['ms_per_step']:.1f} ms per step = {e['tokens_per_s']:.0f} tokens/s "
              f"(eager per-layer times; with 8 micro-batches in flight at most {e['pipelined_tokens_per_s_upper']:.0f})")
    for r in decode["rows"]:
        if "graph_step_ms" in r:  # the captured step per resident layer, times 61 (hops between GPUs: ~0.02 ms each)
            graph_61 = r["graph_step_ms"] / r["layers"] * 61
            print(f"with CUDA graphs, batch {r['batch']:>2}: ~{graph_61:.1f} ms per step for 61 layers = "
                  f"{1e3 * r['batch'] / graph_61:.0f} tokens/s")
    print("method:", decode["method"])
else:
    print("this recording has no decode measurement")
""")

md(r"""
What bounds a decode step? At batch 1 every step reads the weights of the experts the token uses, the attention
and indexer weights, and the head. The arithmetic (from the tensor table, FP8 bytes), at the H200's 4.8 TB/s:
""")

code(r"""
from dslib.checkpoint import checkpoint_tensors

table = checkpoint_tensors(cfg_full, fp8=True)
read = 0
for n, s in table.items():
    if ".mlp.experts." in n:
        read += s.nbytes * cfg_full.num_experts_per_tok / cfg_full.n_routed_experts  # 8 of 256 experts per token
    elif "embed_tokens" not in n:  # the embedding is a lookup of one row
        read += s.nbytes
print(f"weights read per decoded token at batch 1: {read / 1e9:.1f} GB -> {read / 4.8e12 * 1e3:.1f} ms on one H200's "
      f"bandwidth, {read / 4.8e12 / 8 * 1e3:.2f} ms if 8 GPUs each read their eighth at once (tensor/expert parallel); "
      "a pipeline placement reads them one GPU after another")
""")

md(r"""
## 6. The real checkpoint: tokenizer, plan, prefill, generate

With `DSLIB_CHECKPOINT=/path/to/DeepSeek-V3.2` (the official folder: `config.json`, `tokenizer.json`, the
safetensors shards), the cells below tokenize a prompt with the folder's `tokenizer.json` (the `tokenizers` library),
plan, load by the plan, prefill, generate and show the text. On one H200 the plan streams: each pass reads every
shard once (the whole checkpoint), and every generated token is another pass, so only a few tokens are generated.

Without it, the same cells run on a small synthetic checkpoint **in the official layout** written here, with a
byte-level BPE tokenizer trained here on this repository's own text. Checksums show that no file of the
checkpoint changes.
""")

code(r"""
def small_enough_for_cpu(path):
    return ModelConfig.from_pretrained(path).total_params() < 2e9


if CHECKPOINT and (GPU or small_enough_for_cpu(CHECKPOINT)):
    ckpt = Path(CHECKPOINT)
    NEW_TOKENS = min(NEW_TOKENS, 2)  # streamed, every token is a pass over every shard
    print(f"using the checkpoint at {ckpt}")
else:
    if CHECKPOINT:
        print(f"DSLIB_CHECKPOINT={CHECKPOINT} is too large for a CPU: using a small synthetic checkpoint instead")
    from dslib.synthetic import write_synthetic_fp8_checkpoint

    ckpt = write_synthetic_fp8_checkpoint(cfg, Path(tempfile.mkdtemp(prefix="dslib_ch6_")) / "DeepSeek-V3.2-small",
                                          seed=SEED, max_shard_bytes=2_000_000, progress=False)
    repo = DATA.parent
    texts = [p.read_text() for p in sorted(repo.glob("*.md")) + sorted((repo / "notebooks" / "build").glob("*.py"))]
    train_test_tokenizer(ckpt, texts, vocab_size=cfg.vocab_size)
before = file_checksums(ckpt)
print("\n".join(f"{f:40s} {(ckpt / f).stat().st_size:>14,} bytes" for f in before))
""")

code(r"""
text = ("DeepSeek Sparse Attention lets every query attend to the two thousand tokens that its lightning indexer scores "
        "highest, instead of to every earlier token. The indexer is cheap: a few small heads, one key per token, and a "
        "ReLU. The mixture of experts sends each token to eight of its experts.")
tok = load_tokenizer(ckpt)
source_ckpt = SafetensorsSource(ckpt)
ids = encode_prompt(tok, text, source_ckpt.config)
pieces = [tok.decode([i], skip_special_tokens=False) for i in ids[0].tolist()]
print(f"{ids.shape[1]} tokens: {pieces[:12]} ...")
assert ids[0, 0] == source_ckpt.config.bos_token_id
""")

code(r"""
gpus = None if GPU else [three_layers_too_small(source_ckpt.config, prompt_len=ids.shape[1], max_new_tokens=NEW_TOKENS)]
plan_ckpt = plan_run(source_ckpt.config, gpus, prompt_len=ids.shape[1], max_new_tokens=NEW_TOKENS, keep_caches="all",
                     names=None if GPU else ["cpu"], dtype_bytes=2 if GPU else 4, memory_limit=PEAK_LIMIT if GPU else None,
                     reserve_bytes=2 * GiB if GPU else 0)
print(plan_ckpt)
model_ckpt = StreamedModel(source_ckpt, plan_ckpt, dtype=torch.bfloat16 if GPU else torch.float32)
cache_ckpt = model_ckpt.new_cache(keep="all", max_len=ids.shape[1] + NEW_TOKENS)
first, rec_ckpt, _ = recorded_prefill(model_ckpt, ids, cache=cache_ckpt, ep_gpus=source_ckpt.config.n_group,
                                      machine=gpu_name if GPU else "CPU", weights=str(ckpt.name))
out = model_ckpt.generate(ids, NEW_TOKENS, cache=cache_ckpt, logits=first)  # continues the recorded prefill
print("generated:", repr(tok.decode(out[0, ids.shape[1]:].tolist())))
assert out.shape[1] == ids.shape[1] + NEW_TOKENS
""")

md(r"""
The recorder's views take the token text: the last query's selected keys, labelled with their tokens (with the
synthetic weights the choice is the mechanism's, not a language model's).
""")

code(r"""
sc = rec_ckpt["selection"]
last = sc["strip_queries"][-1]


def show_ckpt_strip(layer=sc["layers"][-1]):
    keys = sc["strips"][sc["layers"].index(layer)][sc["strip_queries"].index(last)]
    return viz.selection_strip_figure(keys, last, window=rec_ckpt["window"], tokens=pieces, bins=ids.shape[1], top=16,
                                      title=f"layer {layer}: the keys query {last} ({pieces[last]!r}) selected")


widgets.interact(show_ckpt_strip, layer=widgets.SelectionSlider(options=sc["layers"], description="layer", continuous_update=False));
""")

code(r"""
# bad input: each is refused with the reason, and no file of the checkpoint changes
try:
    encode_prompt(tok, "token " * (source_ckpt.config.max_position_embeddings + 1), source_ckpt.config)
except ValueError as err:
    print("too long:", err)
bare = Path(tempfile.mkdtemp(prefix="dslib_no_tokenizer_"))
(bare / "config.json").write_bytes((ckpt / "config.json").read_bytes())
try:
    load_tokenizer(bare)
except CheckpointError as err:
    print("no tokenizer:", err)
assert file_checksums(ckpt) == before
print(f"checksums of all {len(before)} files unchanged")
""")

md(r"""
## 7. The kernels behind `backend="triton"`

The GPU run uses Triton kernels (`dslib.kernels`) where the PyTorch path would be slow; the PyTorch code stays the
teaching path and the oracle they are tested against. Three ideas make them fast:

- **Tiling.** A program computes a tile of the output, e.g. 64 queries × 128 keys of index scores, looping over the
  indexer's 64 heads with one small matrix product per head; ReLU, the head weight and the sum over heads happen in
  registers, so the `[T, S, heads]` tensor never exists in memory.
- **Online softmax.** Attention over the selected keys is done block by block: keep the running maximum and the
  running sum of exponentials, rescale the partial output when the maximum grows; one pass, no `[T, k]` probability
  matrix stored.
- **In-kernel gather.** Each query's 2,048 selected latents (576 values each) are loaded straight from the latent cache
  by their indices inside the kernel, instead of being copied into a gathered tensor first; all 128 heads share them
  (absorbed / MQA mode), so one load serves 128 heads.
""")

code(r"""
try:
    from dslib.kernels import indexer as kernel_indexer, sparse_mla as kernel_mla
    KERNELS = True
except ImportError as err:  # no Triton on this machine: the source is in dslib/kernels/
    print(f"Triton is not installed here ({err}); read dslib/kernels/indexer.py and sparse_mla.py")
    KERNELS = False
if KERNELS:
    display(dslib.show(kernel_indexer._index_scores_kernel))
""")

code(r"""
if KERNELS:
    display(dslib.show(kernel_mla._attend_block))
""")

md(r"""
**Measured time against context.** The kernel benchmarks write CSVs into `data/` on the GPU machine; the curves
below are read from them when they exist, next to the PyTorch path's times (`data/gpu_attention.csv`, chapter 5) and
the time the FLOPs would take at the H200's peak rate (the roofline: dense attention 989 TFLOP/s bf16; DSA's indexer
at the FP8 rate, 1,979, plus its sparse attention at the bf16 rate).
""")

code(r"""
def read_rows(path):
    return [r for r in csv.DictReader(open(path))] if path.exists() else []


def series_from(rows, label_keys, x_keys=("context", "seq_len", "tokens", "L"), y_keys=("median_ms", "ms", "time_ms")):
    out = {}
    for r in rows:
        x = next((r[k] for k in x_keys if r.get(k) not in (None, "")), None)
        y = next((r[k] for k in y_keys if r.get(k) not in (None, "")), None)
        if x is None or y is None:
            continue
        label = " / ".join(str(r[k]) for k in label_keys if r.get(k))
        out.setdefault(label, []).append((float(x), float(y)))
    return out


# benchmarks/gpu_kernels.py --out data/gpu_kernels writes gpu_kernels.csv (section, variant, context, median_ms, ...)
kernel_csvs = sorted({*DATA.glob("gpu_kernels.csv"), *DATA.glob("gpu_kernels*/gpu_kernels.csv")})
series = {}
for path in kernel_csvs:
    rows = [r for r in read_rows(path) if r.get("section", r.get("phase")) == "prefill" and r.get("batch", "1") == "1"]
    series.update({f"kernels: {k}": v for k, v in series_from(rows, ("variant",)).items()})
torch_rows = [r for r in read_rows(DATA / "gpu_attention.csv") if r["phase"] == "prefill" and r["median_ms"]]
series.update({f"torch path: {k}": v for k, v in series_from(torch_rows, ("variant",)).items()})
contexts = sorted({int(x) for pts in series.values() for x, _ in pts}) or [4096, 16384, 65536, 131072]
roof = {"roofline dense (bf16)": [(L, core_attention_flops(cfg_full, L, "dense", mode="naive") / 989e12 * 1e3) for L in contexts],
        "roofline DSA (FP8 indexer)": [(L, (indexer_flops(cfg_full, L) / 1979e12 + core_attention_flops(cfg_full, L, "sparse") / 989e12) * 1e3)
                                       for L in contexts]}
print(f"kernel CSVs: {[str(p.relative_to(DATA)) for p in kernel_csvs] or 'none yet (run benchmarks/gpu_kernels.py on a GPU)'}; "
      f"PyTorch-path rows: {len(torch_rows)}" + (f" measured on {torch_rows[0]['device']}" if torch_rows else ""))
viz.kernel_time_figure(series, roofline=roof, title="One full-size attention layer, prefill: measured vs the roofline")
""")

md(r"""
**What did not help.** At 128K the sparse kernel reaches 30% of what a plain bf16 matrix product reaches on the H200
(790 TFLOP/s). One cause is visible in
`_attend_block` above: the scores feed the second product (`p` times the latents), and for such a chain Triton puts
every warp on the rows of the score tile; a tile holds 64 heads, one warpgroup's worth, so both warpgroups of a
program compute the same scores. The obvious fix computes the scores of block j+1 while summing block j, so no
product feeds another within a step and the warpgroups split the work. It was measured on the H200 (the tuning
shape: 2,048 queries at the end of a 128K cache), together with two smaller ideas:
""")

code(r"""
trials = DATA / "gpu_kernels"
for r in read_rows(trials / "lookahead_trial.csv"):
    cfg = ast.literal_eval(r["config"])
    print(f"{cfg['variant']:9s} {cfg.get('BLOCK_N', ''):>3} keys per step: {float(r['tflops']):6.1f} TFLOP/s")
for r in read_rows(trials / "gather_trial.csv"):
    print(f"one_pass, 32-bit offsets {r['offsets_32bit']:5s}, lazy rescaling {r['lazy_rescale']:5s}, "
          f"{r['BLOCK_N']} keys per step: {float(r['tflops']):6.1f} TFLOP/s")
key_rows = [r for r in read_rows(trials / "key_rows_trial.csv") if r["shape"].startswith("T=2048 S=131072")]
best = {v: max(float(r["tflops"]) for r in key_rows if f"'{v}'" in r["config"]) for v in ("one_pass", "key_rows")}
print(f"on {key_rows[0]['device']}: one_pass {best['one_pass']:.1f} TFLOP/s, key_rows at best {best['key_rows']:.1f} "
      f"({len(key_rows) - 1} tile choices)")
halves = [r for r in read_rows(trials / "vsplit_trial.csv") if r["shape"].startswith("T=2048 S=131072")]
split = {v: max(float(r["tflops"]) for r in halves if f"'VSPLIT': {v}" in r["config"]) for v in (1, 2)}
print(f"on {halves[0]['device']}: one_pass {split[1]:.1f} TFLOP/s, value columns in halves at best {split[2]:.1f} "
      f"({len(halves) - 2} tile choices)")
""")

md(r"""
Splitting the work made it slower: the two warpgroups now need each other's row maxima and exchange `p` through shared
memory at every step, and each block's rows are read twice; duplicated work without communication was cheaper.
Skipping the rescale while the maximum grows little (a branch per step) also lost. What helped was less arithmetic:
32-bit instead of 64-bit offsets for the gather, about 5%. Two later trials ran on an H100 (the two lines that name
it; compare each only with the one-pass figure on its own line). The first turned the score product around: the keys
as its rows, so each warpgroup scores keys of its own and nothing is computed twice. It lost. What it pays instead is
a softmax that sums across warps and no second pipeline stage (its 128 gathered rows fill the shared memory). The
second gave each of two one-warpgroup programs half of the 512 value columns of 64 heads, so that two programs fit an
SM and one's softmax can run while the other's products do. It lost as well; what it pays: each half still computes
every score, and each selected row is now gathered by four programs instead of two. FlashMLA gets past the duplication
with warp specialisation (one warpgroup computes scores while the others sum), which Triton 3.6 does not do for this
kernel on Hopper. (`tests/test_recorded_claims.py` checks these statements against the files.)
""")

md(r"""
**What did help: naming the layout.** Triton picks the layout of every tensor itself. Gluon, its lower-level dialect
(Triton 3.6 and newer), lets the kernel name them. The kernel below is the one-pass loop again, with both products
split over the warps as [4, 2]. In the scores, each warpgroup takes half of a block's 64 keys; in the weighted sum,
half of the 512 value columns. So no tensor-core instruction is issued twice. The softmax's maximum and sum now
cross the two warpgroups, as in the lookahead trial, but each block's rows are still gathered once, into shared
memory, while the previous block computes (`cp.async`).
""")

code(r"""
try:
    from dslib.kernels import sparse_mla_gluon
except ImportError as err:  # Gluon needs Triton >= 3.6
    sparse_mla_gluon = None
    print(f"this Triton has no Gluon ({err}); read dslib/kernels/sparse_mla_gluon.py")
if sparse_mla_gluon is not None:
    dslib.show(sparse_mla_gluon._sparse_mla_kernel)
""")

md(r"""
It was measured on an H100 against the one-pass kernel on the same card: 2,048 queries at the end of the context,
each with all 2,048 selected keys valid. The FLOPs come from the shapes, 2 · heads · (C + R + C) per query and key,
and the rate is those FLOPs over the recorded time. The trial used the tiles dslib's version has (64 keys per step,
two buffers).
""")

code(r"""
gluon_rows = {(r["shape"], r["config"]): r for r in read_rows(trials / "gluon_trial_h100.csv") if r["kind"] == "time"}
H, C, R, k = cfg_full.num_attention_heads, cfg_full.kv_lora_rank, cfg_full.qk_rope_head_dim, cfg_full.index_topk
plain = "gluon {'BLOCK_N': 64, 'NUM_BUF': 2, 'DEFER': False}"  # the version in dslib
for S in (131072, 16384):
    shape = f"T=2048 S={S} k={k}"
    one_ms, gl_ms = (float(gluon_rows[(shape, c)]["median_ms"]) for c in ("one_pass (Triton)", plain))
    flops = 2 * H * (C + R + C) * 2048 * k
    assert gluon_rows[(shape, plain)]["ok"] == "True"  # checked against fp32 PyTorch before it was timed
    print(f"{S // 1024:>3}K context: one-pass {one_ms:.2f} ms ({flops / one_ms / 1e9:.0f} TFLOP/s), "
          f"Gluon {gl_ms:.2f} ms ({flops / gl_ms / 1e9:.0f} TFLOP/s): {one_ms / gl_ms:.2f}x faster")
print("measured on", gluon_rows[(shape, plain)]["device"])
if sparse_mla_gluon is not None:
    assert (sparse_mla_gluon.BLOCK_N, sparse_mla_gluon.NUM_BUF) == (64, 2)
""")

md(r"""
In dslib it is `sparse_mla(..., variant="gluon")`, for prefill on a Hopper GPU. A decode step keeps the one-pass kernel,
which splits one query's keys over many programs; Gluon has no CPU interpreter, so CI only compiles it for Hopper.
It has not yet replaced the one-pass kernel as the default. Its trial version ran on the GPU, but the version in dslib
(batches, any k) has so far only been compiled. Until it has passed its GPU test, it runs when asked for by name, or
when the kernel benchmark's tuning file chose it (that benchmark checks every candidate against PyTorch first).
""")

md(r"""
## 8. When users outgrow one machine: vLLM and SGLang

Serving DeepSeek-V3.2 to many users is the job of an inference engine, not of this series. The two engines DeepSeek
points to both run it on one 8-GPU node in FP8, with DeepSeek's own kernels for the sparse parts (FlashMLA's sparse
attention, DeepGEMM's FP8 indexer logits and grouped MoE GEMMs). Their documented command lines
([vLLM recipe](https://docs.vllm.ai/projects/recipes/en/latest/DeepSeek/DeepSeek-V3_2.html),
[SGLang docs](https://docs.sglang.io/basic_usage/deepseek_v32.html)):

```bash
# vLLM: tensor parallel over 8 GPUs (the DeepSeek-V3.2 chat template needs its tokenizer mode)
vllm serve deepseek-ai/DeepSeek-V3.2 --tensor-parallel-size 8 --tokenizer-mode deepseek_v32
# vLLM: data-parallel attention + expert parallel (the mode its kernels are tuned for)
vllm serve deepseek-ai/DeepSeek-V3.2 -dp 8 --enable-expert-parallel

# SGLang: TP 8 with data-parallel attention (its recommended setting), or with expert parallel MoE
python -m sglang.launch_server --model deepseek-ai/DeepSeek-V3.2 --tp 8 --dp 8 --enable-dp-attention
python -m sglang.launch_server --model deepseek-ai/DeepSeek-V3.2 --tp 8 --ep 8 --dp 8 --enable-dp-attention
```

- **Tensor parallel** splits every weight matrix over the GPUs. MLA has a single latent "head", so under TP every GPU
  stores the whole latent cache of every token: the cache is replicated 8 times.
- **Data-parallel attention** gives each GPU whole requests for the attention (each request's cache lives on one GPU),
  while the routed experts are split over the GPUs (**expert parallelism**; tokens travel to their experts' GPUs
  and back, the traffic of section 4).
- Our plan is a third way, **pipeline** placement (consecutive layers per GPU), the simplest to reason about.

What does each need? The same tensor table gives the weights per GPU and how many tokens of cache fit
(`serving_memory`; each GPU fills 90% of its memory, as an engine's static memory fraction):
""")

code(r"""
dslib.show(serving_memory)
""")

code(r"""
rows = serving_memory(cfg_full, 8, H200_BYTES, cache="bf16") + serving_memory(cfg_full, 8, H200_BYTES, cache="fp8")
for r, cache in zip(rows, ["bf16"] * 3 + ["fp8"] * 3):
    print(f"{r['scheme']:16s} cache {cache}: weights {r['weights_GB']:6.1f} GB per GPU, cache {r['cache_GB']:5.1f} GB per GPU "
          f"-> {r['cache_tokens'] / 1e6:5.2f}M tokens = {r['requests']:3d} requests of 128K")
by = {r["scheme"]: r for r in rows[:3]}
assert by["tp"]["cache_tokens"] < by["dp_attention_ep"]["cache_tokens"]  # TP replicates MLA's latent on every GPU
assert by["dp_attention_ep"]["weights_GB"] > by["tp"]["weights_GB"]      # DP attention replicates the attention weights
""")

md(r"""
Reading the table: tensor parallelism holds the fewest weights per GPU but the fewest tokens of cache, because every GPU
keeps every token's latent. Data-parallel attention pays for replicated attention weights and wins the cache back
eightfold, which is why both engines recommend it for this model. Our pipeline plan holds whole layers per GPU and
spreads a token's cache over the GPUs with the layers, so it also keeps the cache once; it runs one layer at a time
per token, which is simple but leaves 7 of 8 GPUs idle unless many micro-batches are in flight. Engines add
what this series does not build: continuous batching, paged caches, CUDA graphs, multi-token prediction.

## What you built

- `dslib.devices.plan_run`: a run plan from the config and the GPUs' memory (resident or streaming, resident layers,
  chunk sizes, the bytes per purpose), with clear errors before anything loads; `serving_memory` for the engines'
  placements.
- `dslib.synthetic`: `SyntheticFP8Source` (full-size FP8 weights made on the device, seeded), synthetic checkpoints in
  the official layout, a test tokenizer trained with `tokenizers`, `file_checksums`.
- `dslib.streaming`: `StreamedModel` (layer-major streaming, chunked prefill through the caches, read-ahead of file
  layers, a NaN/inf check per layer, generation), `recorded_prefill`, `load_tokenizer` / `encode_prompt`.
- `dslib.record.SummaryRecorder`: compact summaries (distances, strips, overlaps, beyond-window shares, expert load with
  and without the group limit, expert-parallel traffic), sized for 128K tokens × 61 layers.
- `dslib.viz` (chapter 6 figures) and `benchmarks/gpu_full_model.py`, the one command that records all of it on a GPU.

## Exercises

Each cell calls a check from `dslib.exercises.ch6` that answers "correct" or "not yet, because …".

**1. Streaming's central step.** Write `my_chunked_layer(layer, x, cache, chunk)`: run the decoder layer over `x`
`[B, T, d]` with `chunk` queries at a time through `layer.self_attn(h, None, cache)` (after `layer.input_layernorm`),
each chunk's result added to its rows, then `layer.mlp` after `layer.post_attention_layernorm` on every token; return
the output. It must equal the layer on the whole prompt.
""")

code(r"""
def my_chunked_layer(layer, x, cache, chunk):
    raise NotImplementedError  # your code here


ch6.check_chunked_layer(my_chunked_layer)
""")

md(r"""
**2. Expert-parallel traffic.** 256 experts on 8 GPUs (experts `32g .. 32g + 31` on GPU g), token n at home on GPU
`n % 8`. Write `my_sends(topk_idx, n_experts, n_gpus)` returning, per token, how many copies of it must be sent to
other GPUs.
""")

code(r"""
def my_sends(topk_idx, n_experts, n_gpus):
    raise NotImplementedError  # your code here


ch6.check_ep_sends(my_sends)
""")

md(r"""
**3. The cache of one token.** How many bytes does one token add to dslib's DSA cache over all 61 layers of the 671B
model, in bf16?
""")

code(r"""
answer = None  # a number of bytes
ch6.check_cache_bytes(answer)
""")

nb.write()
