"""Writes notebooks/03_sparse_attention.ipynb (run from the repository root: python notebooks/build/03_sparse_attention.py).

The notebook is generated so that its cells stay small and reviewable as Python; edit here, re-run, then run it
through nbval. It is written without outputs.
"""
from nbbuild import Notebook

nb = Notebook("03_sparse_attention.ipynb", ids="ch3-{:03d}")
md, code = nb.md, nb.code


# ------------------------------------------------------------------------------------------------ title
md(r"""
# Chapter 3 — Sliding window vs the lightning indexer (DeepSeek Sparse Attention)

Chapter 2 made the cache small: 576 values per token and layer. But every new token still *attends* to every
earlier token, so attention costs grow with the square of the context: at 128K tokens that is what makes long
contexts expensive. DeepSeek-V3.2's only architectural change over V3.1 is **DeepSeek Sparse Attention (DSA)**:
a small, cheap **lightning indexer** scores all earlier tokens, and MLA attends only to the
`index_topk` = 2,048 best ones.

The obvious cheaper alternative is a **sliding window**: attend to the last k tokens. Same budget, no indexer.
This chapter shows, on a task where the needed token can be far away, why a learned selector keeps what a fixed
window loses, and why attention then costs O(L·k) instead of O(L²).

**What you will learn**

1. The sliding window, and exactly where it fails (a task made to need far-away tokens).
2. The lightning indexer's score, step by step, with the checkpoint's parameter names (`dslib.indexer`).
3. Top-k selection and sparse attention that *gathers* the selected latents (`dslib.sparse`), equal to the
   dense-masked reference and to transformers' `deepseek_v32`.
4. How the indexer is trained (dense warm-up, then sparse training) and how it does against the window on a
   trained model: accuracy by distance and *attention recall*.
5. Cost: measured time and FLOPs vs length, and a cost model at the 671B dims next to the paper's figure.
""")

code(r"""
import csv
import json
import os
import time
from pathlib import Path

import ipywidgets as widgets
import plotly
import torch
from IPython.display import display
from torch.utils.flop_counter import FlopCounterMode

import dslib
from dslib import ModelConfig, show, viz
from dslib.attention import causal_mask
from dslib.cost import attention_flops_per_token, core_attention_flops, indexer_flops
from dslib.exercises import ch3 as exercises
from dslib.indexer import LightningIndexer, fp8_index_scores, index_scores, indexer_kl_loss
from dslib.mla import dense_masked_attention
from dslib.paths import find_data
from dslib.sparse import (DSACache, DSAttention, selection_mask, sparse_attention, time_attention, topk_selection,
                          window_selection)
from dslib.tasks import RecallTask, eval_set, make_batch, window_accuracy_bound, window_reach
from dslib import train

torch.manual_seed(0)
torch.set_num_threads(2)
print(f"dslib {dslib.__version__} | torch {torch.__version__} | plotly {plotly.__version__} | ipywidgets {widgets.__version__}")
""")

code(r"""
FAST = os.environ.get("DSLIB_FAST") == "1"  # CI: same code path, smaller sizes
SEED = 0
RETRAIN = False  # True: retrain the three stages here (several minutes on 2 cores) instead of loading data/
# The repository's data/ (checkpoints made by `python -m dslib.train`, the paper's cost figures): found here, or a
# clear error now (rather than a retrain and a missing file later) that says where to open the notebook from.
DATA = find_data(need=["paper_cost_per_token.csv"] + ([] if RETRAIN else ["ch3_recall.json"]))
EVAL_SEQS = 64 if FAST else 128  # sequences scored live (4,096 queries; the log scored 512 sequences)
TIME_LENGTHS = [256, 512, 1024] if FAST else [256, 512, 1024, 2048]  # CPU timing of attention vs L
TIME_REPEATS = 2 if FAST else 3
TIME_THREADS = 1  # timings on one thread: on a shared 2-core machine a second thread mostly waits and adds noise
BIG = ModelConfig.deepseek_v32()  # the 671B dims for the cost model
""", tags=["parameters"])

# ------------------------------------------------------------------------------------------------ 1. cost
md(r"""
## 1. Why attention needs a diet: O(L²)

In a causal prefill of L tokens, the query at position t attends to t + 1 keys: L(L+1)/2 (query, key) pairs. A dense
prefill runs MLA in **MHA mode** (chapter 2: per-head keys and values built once for the whole prompt): per pair
and layer, 128 heads × (192 + 128) multiply-adds. DSA attends in **MQA mode** over the k = 2,048 keys each query
keeps: 128 × (576 + 512) multiply-adds per pair, 3.4× more, but only k pairs per query. And DSA pays for the
**lightning indexer**, which still scores *every* pair, at 64 × 128 multiply-adds in FP8 (twice the bf16 rate on
Hopper GPUs, so we count its FLOPs at half cost). Count it all for one layer of a 128K prefill:
""")

code(r"""
L = 128 * 1024
pairs = L * (L + 1) // 2
dense = core_attention_flops(BIG, L, "dense", mode="naive")  # dense prefill: MHA mode over all pairs
core = core_attention_flops(BIG, L, "sparse")  # DSA: MQA mode over min(t + 1, k) keys per query
index = indexer_flops(BIG, L)  # the indexer scores all pairs (bf16-equivalent FLOPs; FP8 runs at twice the rate)
assert dense == pairs * 2 * BIG.num_attention_heads * (BIG.qk_head_dim + BIG.v_head_dim)
# The same totals, token by token, from the per-token accounting the cost model of section 6 uses:
per_token = lambda attention, fp8: sum(attention_flops_per_token(BIG, p, attention, phase="prefill", fp8_indexer=fp8)["total"]
                                       for p in range(L))
assert per_token("dense", False) == dense and per_token("sparse", False) == core + index
assert per_token("sparse", True) == core + index / 2
rows = {"dense (MHA mode)": dense, "DSA core (MQA mode, k keys)": core, "indexer (all pairs)": index}
for name, f in rows.items():
    print(f"{name:30s} {f / 1e15:6.3f} PFLOP per layer")
ratio_bf16, ratio_fp8 = dense / (core + index), dense / (core + index / 2)
print(f"dense / DSA: {ratio_bf16:.1f}x with the indexer at the bf16 rate, {ratio_fp8:.1f}x with it in FP8 at half cost")
assert index > core and ratio_fp8 > ratio_bf16 > 1  # at 128K the indexer costs more than the sparse attention itself
""")

md(r"""
The often-quoted ratio is far bigger. It prices dense attention in MQA mode, the mode DSA uses, and leaves out the
indexer — two mistakes, since a prefill runs dense attention in MHA mode and DSA cannot select without its
indexer:
""")

code(r"""
quoted = core_attention_flops(BIG, L, "dense") / core  # dense in MQA mode, no indexer
paper_rows = list(csv.DictReader(open(DATA / "paper_cost_per_token.csv")))


def paper_series(phase, model_name):
    rows = [r for r in paper_rows if r["phase"] == phase and r["model"] == model_name]
    return [int(r["position_tokens"]) for r in rows], [float(r["usd_per_million_tokens"]) for r in rows]


(x31, y31), (x32, y32) = paper_series("prefill", "V3.1-Terminus"), paper_series("prefill", "V3.2-Exp")
paper_ratio = y31[x31.index(L)] / y32[x32.index(L)]
print(f"dense in MQA mode, indexer left out: {quoted:.0f}x; honest FLOP count: {ratio_bf16:.1f}x-{ratio_fp8:.1f}x; "
      f"the paper's measured prefill cost at 128K: {paper_ratio:.2f}x")
assert quoted > 5 * ratio_fp8 and ratio_bf16 < paper_ratio < ratio_fp8
""")

md(r"""
The question is *which* k keys. The simplest answer is positional.

## 2. The sliding window, and where it fails

A sliding window keeps the last k positions for every query: keys t − k + 1 … t. `window_selection` returns
those indices (`-1` = none, before the start of the sequence) in the same `[B, T, k]` format as the indexer's
top-k below, so both can feed the same sparse attention.
""")

code(r"""
show(window_selection)
""")

code(r"""
T_DEMO, K_DEMO = 24, 6
win = window_selection(torch.arange(T_DEMO), K_DEMO)  # [1, T, k]
assert win.shape == (1, T_DEMO, K_DEMO)
assert win[0, 10].tolist() == list(range(10, 10 - K_DEMO, -1))  # the last k positions
assert (win[0, 2] == -1).sum() == K_DEMO - 3  # early rows have fewer than k keys
viz.selection_matrix_figure(selection_mask(win, T_DEMO)[0], f"Sliding window, k = {K_DEMO}: a band along the diagonal", color="window")
""")

md(r"""
A window is blind to content: whatever lies further back than k tokens is gone. To see what that costs we need a
task where the needed token can be anywhere. **Multi-query associative recall** (`dslib.tasks`): a sequence
defines key→value pairs at random places ("k v") and later asks for each key again ("k ?"); at the query the model
must output the value that followed the same key, possibly hundreds of tokens back. Filler tokens sit in between.
Loss and accuracy count only the query positions; guessing gives 1/64.
""")

code(r"""
task = RecallTask()
batch = make_batch(task, 2, torch.Generator().manual_seed(SEED))
first = int(batch.query_mask[0].nonzero()[0])
src = int(batch.source[0, first])
print(f"L = {task.seq_len}, {task.n_pairs} pairs, vocabulary {task.vocab_size} "
      f"(BOS, {task.n_filler} fillers, {task.n_keys} keys, {task.n_values} values)")
print(f"first query at position {first}: key {int(batch.tokens[0, first])}; it was defined at position {src - 1}, "
      f"value {int(batch.tokens[0, src])} at {src}; distance {int(batch.distance[0, first])}")
assert batch.tokens[0, src - 1] == batch.tokens[0, first] and batch.targets[0, first] == batch.tokens[0, src]
""")

code(r"""
ev = eval_set(task, EVAL_SEQS)
dist = ev.distance[ev.query_mask]
K = train.experiment_config(task).index_topk  # the budget of the experiment below
bound = window_accuracy_bound(dist, K, task.n_values)  # one window: perfect when reachable, chance otherwise
bound_2 = window_accuracy_bound(dist, 2 * K, task.n_values)  # two stacked windows (the model below has 2 layers)
print(f"{len(dist)} evaluation queries; distances {int(dist.min())}..{int(dist.max())}, median {int(dist.median())}")
print(f"a window of k = {K} contains the needed token for {window_reach(dist, K).float().mean():.1%} of them: "
      f"reading it directly, at most {bound:.1%} accuracy")
print(f"two stacked windows reach 2k = {2 * K} tokens back ({window_reach(dist, 2 * K).float().mean():.1%} of the "
      f"queries): no 2-layer model restricted to windows of k can beat {bound_2:.1%}")
assert 0.1 < bound < bound_2 < 0.6
""")

md(r"""
Why 2k? A layer restricted to a window can only read the last k positions, but what it writes at position p is
read by the next layer's window, which reaches k positions further back. Through two layers information can travel
about 2k positions (exactly 2k in the model below, counting its one-token shift of section 5). That is an upper
bound: relaying only helps if a token in between already knows what a later query will ask for.
""")

# ------------------------------------------------------------------------------------------------ 3. indexer
md(r"""
## 3. The lightning indexer, step by step

The whole of DSA for one query, at the 671B sizes, before we build it piece by piece:
""")

code(r"""
viz.dsa_pipeline_diagram(BIG)
""")

md(r"""

DSA replaces "the last k" by "the k most relevant", with relevance scored by a tiny attention-like module that
runs for every (query, earlier token) pair ([V3.2-Exp paper and DeepSeek's inference code](../docs/references.md#ch3)):

$$I_{t,s} = \sum_{j=1}^{H_I} w_{t,j}\,\mathrm{ReLU}\big(q_{t,j}\cdot k_s\big)$$

- $H_I$ = `index_n_heads` (64) small query heads $q_{t,j}$ of `index_head_dim` (128), made by `wq_b` from MLA's
  **query latent** $c^Q_t$ (reused, not recomputed);
- **one key per token** $k_s$ = `k_norm`(`wk` h_s) (a LayerNorm with bias), shared by all indexer heads — and
  cached for decoding, like MLA's latent;
- per-head weights $w_{t,j}$ from the token itself (`weights_proj`), with the scales
  $H_I^{-1/2}\cdot d_I^{-1/2}$ folded in;
- RoPE on the **first** `qk_rope_head_dim` dims, in the **half-split** layout (MLA uses interleaved pairs on its
  *last* dims — DeepSeek's first release got this wrong and fixed it in November 2025);
- ReLU instead of softmax: cheap, and it lets the deployed model run the whole thing in FP8.
""")

code(r"""
show(LightningIndexer)
""")

md(r"""
Build one on a tiny config and check the formula by hand for one (query, key) pair. (No rotation here: cos = 1,
sin = 0, so the check is about the score itself.)
""")

code(r"""
tiny = ModelConfig.tiny(index_n_heads=4, index_head_dim=16, index_topk=4)
idx = LightningIndexer(tiny)
T = 10
h, c_q = torch.randn(1, T, tiny.hidden_size), torch.randn(1, T, tiny.q_lora_rank)
cos, sin = torch.ones(T, tiny.qk_rope_head_dim // 2), torch.zeros(T, tiny.qk_rope_head_dim // 2)
with torch.no_grad():
    scores = idx(h, c_q, cos, sin, torch.arange(T))  # [1, T, T]
    q = idx.project_q(c_q, cos, sin)[0]  # [T, H_I, d_I]
    k = idx.project_k(h, cos, sin)[0]  # [T, d_I]
    w = idx.head_weights(h)[0]  # [T, H_I], scales folded in
t, s = 7, 3
by_hand = sum(w[t, j] * torch.relu(q[t, j] @ k[s]) for j in range(tiny.index_n_heads))
print(f"I[{t},{s}] = {scores[0, t, s]:.5f} (module) vs {by_hand:.5f} (by hand)")
assert torch.isclose(scores[0, t, s], by_hand, rtol=1e-5)
assert torch.isinf(scores[0, 3, 5]) and scores[0, 3, 5] < 0  # future keys are -inf: top-k is causal
""")

code(r"""
terms = w[t].unsqueeze(1) * torch.relu(q[t] @ k[: t + 1].T)  # [H_I, t+1]: head j's contribution per key
assert torch.allclose(terms.sum(0), scores[0, t, : t + 1], rtol=1e-5)
viz.indexer_terms_figure(terms, w[t], terms.sum(0))
""")

md(r"""
Each head votes for the keys its query matches, only positively (ReLU), with a signed, per-query weight. How much
cheaper is this than attention? Per (query, key) pair the indexer does $H_I \cdot d_I$ multiply-adds, MLA in MQA
mode $H\cdot(576 + 512)$ — and the indexer runs in FP8.
""")

code(r"""
idx_macs = BIG.index_n_heads * BIG.index_head_dim
mla_macs = BIG.num_attention_heads * (2 * BIG.kv_lora_rank + BIG.qk_rope_head_dim)
print(f"per pair: indexer {idx_macs:,} MACs vs MLA (MQA mode) {mla_macs:,} MACs -> {mla_macs / idx_macs:.1f}x cheaper")
assert idx_macs == 8192 and mla_macs == 139264
""")

# ------------------------------------------------------------------------------------------------ 4. top-k
md(r"""
## 4. Top-k selection and sparse attention over the selected latents

Each query keeps the `index_topk` keys with the highest index score — **one set per query, shared by all
attention heads** (that is what makes DSA fit MLA's MQA mode: one gathered latent serves all heads). A query with
at most k visible keys keeps all of them, so **sequences of ≤ k tokens get exactly dense attention**.
`torch.topk` would fill those short rows with masked future keys; `topk_selection` marks those slots -1 ("no
key"). You will write this selection, and the gather of the selected latents that follows it, in **Exercise 1**
(its check then shows dslib's `topk_selection`). Here we use dslib's and check its promises:
""")

code(r"""
sel = topk_selection(scores, tiny.index_topk, torch.arange(T))  # [1, T, k]
for row in range(tiny.index_topk):  # short rows: every visible key, nothing else
    assert sorted(x for x in sel[0, row].tolist() if x >= 0) == list(range(row + 1))
assert ((sel[0] <= torch.arange(T).unsqueeze(1)) | (sel[0] == -1)).all()  # never a future key
viz.selection_matrix_figure(selection_mask(sel, T)[0], f"Indexer top-{tiny.index_topk} (random weights): anywhere in the past")
""")

md(r"""
Now the point of it all: attention that **gathers** the k selected latents for every query (chunk by chunk of
queries) and attends over them in MQA mode. Nothing of size L × L is ever built; the work is L·k pairs. The
reference path computes scores for every key and masks the unselected ones with −∞ — the same numbers at O(L²)
cost (that is what transformers' eager implementation does). `sparse_attention` does the gather you will write in
Exercise 1 and then chapter 2's absorbed attention over the `[k, C]` gathered latents of each query; its listing
comes with that exercise's check. Here we check that it computes the same numbers as the masked reference:
""")

code(r"""
B, Tq, H, C, R, k_sel = 2, 300, 4, 32, 8, 16
qa, qr = torch.randn(B, Tq, H, C), torch.randn(B, Tq, H, R)
lat, kr = torch.randn(B, Tq, C), torch.randn(B, Tq, R)
pos = torch.arange(Tq)
rand_scores = torch.randn(B, Tq, Tq).masked_fill(~causal_mask(pos, Tq), float("-inf"))
sel_big = topk_selection(rand_scores, k_sel, pos)
gathered = sparse_attention(qa, qr, lat, kr, sel_big, 0.2, chunk=64)
reference = dense_masked_attention(qa, qr, lat, kr, selection_mask(sel_big, Tq) & causal_mask(pos, Tq), 0.2)
print(f"max |gather - dense-masked| = {(gathered - reference).abs().max():.2e}")
assert torch.allclose(gathered, reference, atol=1e-5)
""")

md(r"""
`DSAttention` is MLA (chapter 2) plus an `indexer` and this selection — exactly how DeepSeek describes V3.2 relative
to V3.1. Its `attention=` switch picks `"sparse"` (the real model), `"dense"` (plain MLA) or `"window"` (the
baseline), and decoding uses a `DSACache` that holds MLA's latent cache and the indexer's key cache side by side.
Its state dict has the checkpoint's names; `tests/test_dsa_reference.py` checks selection and output against
transformers' `deepseek_v32` attention with the same random weights.
""")

code(r"""
show(DSAttention.forward)
""")

code(r"""
dsa = DSAttention(tiny).eval()
print(sorted(n for n in dsa.state_dict() if n.startswith("indexer.")))
hs = torch.randn(1, 12, tiny.hidden_size)
with torch.no_grad():
    short = hs[:, : tiny.index_topk]  # a sequence of k tokens: DSA == dense MLA
    assert torch.allclose(dsa(short, attention="sparse"), dsa(short, attention="dense"), atol=1e-6)
    full = dsa(hs, attention="sparse")
    assert torch.allclose(full, dsa(hs, attention="sparse", mode="naive"), atol=1e-5)  # gather == masked MHA mode
    cache = DSACache()
    steps = [dsa(hs[:, :5], cache=cache)] + [dsa(hs[:, i : i + 1], cache=cache) for i in range(5, 12)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)  # decode token by token == prefill
print(f"sparse == dense for {tiny.index_topk} tokens; gather == dense-masked; decode with DSACache == prefill "
      f"({len(cache)} tokens cached, {cache.nbytes} bytes)")
""")

# ------------------------------------------------------------------------------------------------ 5. trained model
md(r"""
## 5. Training an indexer, and the comparison at equal budget

`python -m dslib.train --out data` (seeded) trains a 2-layer model whose attention is `DSAttention` on the recall
task, in the paper's stages ([sources](../docs/references.md#ch3)):

1. **dense training** of the model (MLA attention over everything; the indexer untouched);
2. **indexer warm-up**: main model frozen, dense attention; each layer's indexer learns
   KL(p ‖ softmax(I)), where p is that layer's attention summed over heads and L1-normalised;
3. **sparse training**: attention restricted to the indexer's top-k (k = `index_topk`); the model learns from the
   language-model loss, the indexer — whose inputs are detached — from the KL over its selected set only.

Two honest notes. The model has **token shift**: the input at position t is E[x_t] + E'[x_{t−1}], a width-2
causal convolution over embeddings, as in MQAR studies ("attention plus a short convolution"); it lets one
attention layer match "the token after key k" directly. And the warm-up's KL is averaged over the **query
positions** (the ones with a task loss), not over all positions as in the paper, where every token has a language-
model loss: here the other positions predict random filler and their attention is noise. That is a deliberate
deviation; `--kl-positions all` runs the paper's version.

Both stages use one loss function: KL(target ‖ softmax(scores)) — over all causal keys in the warm-up, over the
gathered selected keys in the sparse stage.
""")

code(r"""
show(indexer_kl_loss)
""")

code(r"""
paths = train.artifact_paths(DATA)
if RETRAIN or not paths["log"].exists():
    print("training from scratch (several minutes) ...")
    train.run_experiment(DATA, seed=SEED)
log = json.loads(paths["log"].read_text())
models = {stage: train.load_model(paths[stage]) for stage in (*train.STAGES, train.WINDOW)}
cfg = models["sparse"].config
K = cfg.index_topk
print(f"recorded command: {log['command']}" + (f"; window baseline: {log['window_command']}" if "window_command" in log else ""))
for name, st in log["stages"].items():
    print(f"  {name:7s} {st['steps']:5d} steps  {st['wall_s']:6.1f} s wall  (threads={log['threads']}, torch {log['torch']})")
print(f"model: {sum(p.numel() for p in models['sparse'].parameters()):,} parameters, index_topk = {K}")
""")

code(r"""
viz.training_curves_figure(log["stages"])
""")

md(r"""
The comparison must be fair: **the window model is trained too.** `train.WINDOW` is the dense-stage checkpoint
trained for the same 300 steps as the sparse stage (same learning rate and schedule), with a window of k keys in
every layer, so it can learn to live with its window (green curve, which branches off after the dense stage).

Score both on fresh evaluation sequences, with each kind of attention in **every layer**: the sparse model with
dense attention, the indexer's top-k and windows of k and 2k keys; the window-trained model with its window of k.
""")

code(r"""
model = models["sparse"]
t0 = time.perf_counter()
res = {
    "dense": train.evaluate(model, ev, "dense"),
    "sparse": train.evaluate(model, ev, "sparse"),
    f"window": train.evaluate(model, ev, "window", window=K),
    f"window 2k": train.evaluate(model, ev, "window", window=2 * K),
    "window trained": train.evaluate(models[train.WINDOW], ev, "window", window=K),
}
for name, r in res.items():
    hit = f"   needed token selected: {', '.join(f'{h:.1%}' for h in r['hit_rate'])} (per layer)" if "hit_rate" in r else ""
    print(f"{name:14s} accuracy {r['accuracy']:.1%}{hit}")
print(f"({len(dist)} queries, {time.perf_counter() - t0:.1f} s)")
""")

code(r"""
logged = log["results"]["sparse"]
for name, key in [("dense", "dense"), ("sparse", "sparse"), ("window", "window")]:  # the log used 512 sequences
    assert abs(res[name]["accuracy"] - logged[key]["accuracy"]) < 0.05, (name, res[name]["accuracy"], logged[key]["accuracy"])
assert abs(res["window trained"]["accuracy"] - log["results"][train.WINDOW]["window"]["accuracy"]) < 0.05
assert res["window"]["accuracy"] <= bound + 0.03 and res["window trained"]["accuracy"] <= bound_2 + 0.03
assert res["sparse"]["accuracy"] > res["window 2k"]["accuracy"] > res["window"]["accuracy"]
assert res["sparse"]["accuracy"] > res["window trained"]["accuracy"] + 0.5  # trained against trained, same budget
print(f"trained against trained, k = {K} keys per query: indexer {res['sparse']['accuracy']:.1%}, window "
      f"{res['window trained']['accuracy']:.1%} (one-window reach {bound:.1%}, two-window bound {bound_2:.1%})")
""")

code(r"""
by_dist = {name: {b: acc for b, (acc, n) in r["by_distance"].items()} for name, r in res.items()}
near, far = "≤16", "129–255"
assert by_dist["window"][near] > 0.9 and by_dist["window"][far] < 0.1  # perfect within k, chance beyond
assert by_dist["sparse"][far] > 0.9  # the indexer does not care about distance
assert by_dist["window trained"][far] < 0.1  # the trained window model: still chance beyond its reach
viz.accuracy_by_distance_figure(by_dist, chance=1 / task.n_values)
""")

md(r"""
Within k tokens the window is as good as dense attention; beyond k it is at chance, because the value to recall
is simply not among its keys. Training under the window for as long as the sparse stage did not change that: the
window-trained model stays at its one-window reach, well below what two stacked windows could reach in principle
(nothing in 300 steps taught its first layer to relay the right pair forward). The indexer's selection does not
care about distance.

**Attention recall** asks a softer question: of the attention mass that *dense* attention puts on the keys, how
much does a selection keep? Measured on a dense run at the query positions, per layer, with the selections the
indexer and the window would make there. The black diamond is the dense mass on the needed token itself, and the
right panel how often each selection contains it.
""")

code(r"""
analysis = train.attention_analysis(model, ev, k=K)
for name, values in analysis.items():
    print(f"{name:16s} " + "  ".join(f"layer {i}: {v:.3f}" for i, v in enumerate(values)))
retrieval_layer = max(range(len(model.layers)), key=lambda i: analysis["mass_on_source"][i])
assert analysis["hit_indexer"][retrieval_layer] > analysis["hit_window"][retrieval_layer]
viz.recall_by_layer_figure(analysis)
""")

code(r"""
print(f"layer {retrieval_layer} is the retrieval layer: dense attention puts "
      f"{analysis['mass_on_source'][retrieval_layer]:.1%} of its mass on the needed token; the indexer's top-{K} "
      f"keeps {analysis['recall_indexer'][retrieval_layer]:.1%} of the mass, the window {analysis['recall_window'][retrieval_layer]:.1%}.")
other = 1 - retrieval_layer
print(f"layer {other} spreads its attention (mass on the needed token {analysis['mass_on_source'][other]:.1%}): "
      f"recall there is {analysis['recall_indexer'][other]:.1%} (indexer) / {analysis['recall_window'][other]:.1%} (window)")
""")

md(r"""
### Explore: which tokens does each selection keep?

Pick a layer and a query position of an evaluation sequence. Bars: where dense attention puts its mass; triangles:
the indexer's top-k; squares: the window; dashed line: the token the query needs (at query positions). Change k and
the window to see what each budget buys.
""")

code(r"""
seq = 0
view = train.inspect_sequence(model, ev.tokens[seq])
query_positions = ev.query_mask[seq].nonzero().squeeze(1).tolist()


def explore(layer=retrieval_layer, query=query_positions[-1], k=K, window=K):
    pos = torch.arange(ev.tokens.shape[1])
    top = topk_selection(view["index_scores"][layer].unsqueeze(0), k, pos)[0, query]
    win = window_selection(pos, window)[0, query]
    return viz.selection_row_figure(view["probs"][layer][query], query=query, indexer=top.tolist(),
                                    window=win.tolist(), source=int(ev.source[seq, query]),
                                    title=f"layer {layer}, query at position {query}")


explore()
""")

code(r"""
_ = widgets.interact(
    explore,
    layer=widgets.IntSlider(value=retrieval_layer, min=0, max=len(model.layers) - 1, description="layer"),
    query=widgets.SelectionSlider(options=query_positions, value=query_positions[-1], description="query pos."),
    k=widgets.IntSlider(value=K, min=4, max=128, step=4, description="top-k"),
    window=widgets.IntSlider(value=K, min=4, max=128, step=4, description="window"),
)
""")

md(r"""
### What each stage did

The same evaluation, from the training log (512 sequences), for the checkpoint after each stage. After dense
training alone the indexer is random, so its top-k finds the needed token about as rarely as the window does;
the warm-up is where it learns
to find the needed token; the sparse stage then adapts the model to attending over the selection.
""")

code(r"""
rows = []
for stage in train.STAGES:
    r = log["results"][stage]
    rows.append(f"{stage:7s} dense {r['dense']['accuracy']:6.1%} | indexer top-{K} {r['sparse']['accuracy']:6.1%} | "
                f"window {K} {r['window']['accuracy']:6.1%} | window {2 * K} {r['window_2k']['accuracy']:6.1%}")
w = log["results"][train.WINDOW]
rows.append(f"{train.WINDOW:7s} dense {w['dense']['accuracy']:6.1%} | {'':18s} | "
            f"window {K} {w['window']['accuracy']:6.1%} | window {2 * K} {w['window_2k']['accuracy']:6.1%}   "
            "(trained under its window, from the dense checkpoint)")
print("\n".join(rows))
assert log["results"]["warmup"]["sparse"]["accuracy"] > log["results"]["dense"]["sparse"]["accuracy"]
""")

md(r"""
### The deployed precision: Hadamard rotation + FP8

The production indexer rotates q and k by an orthonormal Hadamard matrix (dot products unchanged; outliers spread
over all channels), quantises each 128-vector to FP8 e4m3 with a power-of-two scale, and accumulates in fp32
([DeepSeek's inference code](../docs/references.md#ch3)). `fp8_index_scores` simulates that. How many selections does it change on the trained model?
""")

code(r"""
with torch.no_grad():
    blk = model.layers[retrieval_layer]
    x = model.embed(ev.tokens[:8])
    for layer in model.layers[:retrieval_layer]:
        x = x + layer.self_attn(layer.input_layernorm(x), attention="dense")
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    hn = blk.input_layernorm(x)
    P = torch.arange(hn.shape[1])
    cos8, sin8 = blk.self_attn.rotary(P)
    qlat = blk.self_attn.project_q(hn, cos8, sin8)[0]
    ix = blk.self_attn.indexer
    qi, ki, wi = ix.project_q(qlat, cos8, sin8), ix.project_k(hn, cos8, sin8), ix.head_weights(hn)
    exact = index_scores(qi, wi, ki, P)
    rotated = fp8_index_scores(qi, wi, ki, P, quantize=False)
    fp8 = fp8_index_scores(qi, wi, ki, P)
fin = torch.isfinite(exact)
assert torch.allclose(rotated[fin], exact[fin], rtol=1e-4, atol=1e-4)  # the rotation alone changes nothing
sel32, sel8 = topk_selection(exact, K, P), topk_selection(fp8, K, P)
changed = 1 - (selection_mask(sel32, len(P)) & selection_mask(sel8, len(P))).sum() / (sel32 >= 0).sum()
print(f"FP8 changes {changed:.2%} of the selected keys (layer {retrieval_layer}, {sel32.shape[0]} sequences)")
assert changed < 0.2
""")

# ------------------------------------------------------------------------------------------------ 6. cost
md(r"""
## 6. Cost: O(L²) vs O(L·k), measured

Estimate first: FLOPs of one layer's core attention for a prefill of L tokens (what the simple implementations
here compute: the masked path scores all L² pairs, the gather path L·k), then measure them with PyTorch's FLOP
counter, then time both on this CPU — and the indexer, which stays O(L²) but with a small constant.
""")

code(r"""
small = ModelConfig.small()  # CPU-sized dims: 8 heads, latent 64, rope 16, index 4 x 32, k = 64
H_s, C_s, R_s, k_s = small.num_attention_heads, small.kv_lora_rank, small.qk_rope_head_dim, small.index_topk
Lm = 512
qa, qr = torch.randn(1, Lm, H_s, C_s), torch.randn(1, Lm, H_s, R_s)
lat, kr = torch.randn(1, Lm, C_s), torch.randn(1, Lm, R_s)
pos = torch.arange(Lm)
with FlopCounterMode(display=False) as fc_dense:
    dense_masked_attention(qa, qr, lat, kr, causal_mask(pos, Lm), 0.1)
with FlopCounterMode(display=False) as fc_sparse:
    sparse_attention(qa, qr, lat, kr, window_selection(pos, k_s), 0.1)
est_dense = core_attention_flops(small, Lm, "dense", skip_masked=False)
est_sparse = core_attention_flops(small, Lm, "sparse", skip_masked=False)
print(f"L = {Lm}: dense {fc_dense.get_total_flops():,} FLOPs counted vs {est_dense:,} estimated; "
      f"sparse {fc_sparse.get_total_flops():,} vs {est_sparse:,}")
assert fc_dense.get_total_flops() == est_dense and fc_sparse.get_total_flops() == est_sparse
""")

code(r"""
threads = torch.get_num_threads()
torch.set_num_threads(TIME_THREADS)
timings = time_attention(TIME_LENGTHS, heads=H_s, latent=C_s, rope=R_s, k=k_s, index_heads=small.index_n_heads,
                         index_dim=small.index_head_dim, repeats=TIME_REPEATS)
torch.set_num_threads(threads)
for i, Lt in enumerate(TIME_LENGTHS):
    print(f"L = {Lt:5d}: dense {timings['dense'][i] * 1e3:8.1f} ms   sparse {timings['sparse'][i] * 1e3:7.1f} ms   "
          f"indexer {timings['indexer'][i] * 1e3:7.1f} ms")
growth = {n: timings[n][-1] / timings[n][0] for n in timings}
span = TIME_LENGTHS[-1] / TIME_LENGTHS[0]
print(f"L grew {span:.0f}x: dense time {growth['dense']:.0f}x, sparse {growth['sparse']:.0f}x, indexer {growth['indexer']:.0f}x")
# Asserted on counted work (times on a busy laptop can invert): dense grows like L², sparse like L.
work = {a: core_attention_flops(small, TIME_LENGTHS[-1], a, k=k_s) / core_attention_flops(small, TIME_LENGTHS[0], a, k=k_s)
        for a in ("dense", "sparse")}
assert work["dense"] > span ** 2 / 2 and work["sparse"] < 2 * span
""")

code(r"""
series = {
    "dense (measured)": timings["dense"],
    "sparse (measured)": timings["sparse"],
    "indexer (measured)": timings["indexer"],
}
viz.cost_vs_length_figure(TIME_LENGTHS, series, y="seconds (CPU, one layer, batch 1)",
                          title="Core attention time vs length: dense grows like L², sparse like L")
""")

code(r"""
lengths = [2 ** i for i in range(10, 18)]
prefill_flops = {
    "dense (formula, MHA mode)": [core_attention_flops(BIG, n, "dense", mode="naive") for n in lengths],
    "sparse core (formula, MQA mode)": [core_attention_flops(BIG, n, "sparse") for n in lengths],
    "indexer (formula, FP8 at half cost)": [indexer_flops(BIG, n) / 2 for n in lengths],
}
prefill_flops["DSA = core + indexer (formula)"] = [c + i for c, i in zip(*list(prefill_flops.values())[1:])]
dense_l, dsa_l = prefill_flops["dense (formula, MHA mode)"], prefill_flops["DSA = core + indexer (formula)"]
assert dsa_l[0] > dense_l[0] and dsa_l[-1] < dense_l[-1]  # DSA costs more below some length, less above


def dsa_saves(n):  # does a DSA prefill of n tokens need fewer FLOPs than a dense (MHA-mode) one?
    return core_attention_flops(BIG, n, "sparse") + indexer_flops(BIG, n) / 2 < core_attention_flops(BIG, n, "dense", mode="naive")


lo, hi = lengths[0], lengths[-1]  # bisection: dsa_saves(lo) is False, dsa_saves(hi) is True
while hi - lo > 1:
    lo, hi = (lo, (lo + hi) // 2) if dsa_saves((lo + hi) // 2) else ((lo + hi) // 2, hi)
flop_crossover_prefill = hi
print(f"in FLOPs a DSA prefill is cheaper than a dense MHA-mode one from L = {flop_crossover_prefill:,} tokens on; "
      f"at {lengths[-1] // 1024}K it needs {dense_l[-1] / dsa_l[-1]:.1f}x fewer")
viz.cost_vs_length_figure(lengths, prefill_flops, y="FLOPs per layer (prefill)",
                          colors={"DSA = core + indexer (formula)": "black"},
                          title="At the 671B dims: prefill attention FLOPs vs L (dense in MHA mode; k = 2,048)")
""")

md(r"""
Below that length a DSA prefill *costs more* FLOPs than a dense one: for the first k tokens every query still
attends to all its keys, now in the 3.4× more expensive MQA mode, and the indexer comes on top. (DeepSeek's
production system runs short prefills in MHA mode, with a mask that emulates DSA's selection.) Keep this length in
mind for the paper's measured costs below.
""")

md(r"""
### Against the paper's cost curves

DeepSeek published the cost per million tokens of serving V3.1-Terminus (dense) and V3.2-Exp (DSA) vs token
position (H800 at $2 per GPU-hour; `data/paper_cost_per_token.csv`, values read from the figure). A crude model:
the cost of a token at position L = a + b · (attention FLOPs per token and layer), with a and b fitted to the
dense V3.1 points only. Prefill counts MHA mode for dense attention, decode MQA mode. For V3.2 we keep b, take
DSA's FLOPs (core attention over min(L + 1, k) keys in MQA mode, plus the indexer at half cost for FP8) and fit only
its constant a at position 0. It ignores memory traffic, batching and everything else.
""")

code(r"""
def fit_line(x, y):  # least squares y = a + b x
    mx, my = sum(x) / len(x), sum(y) / len(y)
    b = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y)) / sum((xi - mx) ** 2 for xi in x)
    return my - b * mx, b


def flops(position, attention, phase, part="total"):
    return attention_flops_per_token(BIG, position, attention, phase=phase)[part]


fits = {}
for phase in ("prefill", "decode"):
    x31, y31 = paper_series(phase, "V3.1-Terminus")
    x32, y32 = paper_series(phase, "V3.2-Exp")
    a, b = fit_line([flops(p, "dense", phase) for p in x31], y31)
    worst = max(abs(a + b * flops(p, "dense", phase) - y) for p, y in zip(x31, y31))
    a32 = y32[0] - b * flops(0, "sparse", phase)
    fits[phase] = dict(a=a, b=b, a32=a32, x31=x31, y31=y31, x32=x32, y32=y32, worst=worst)
    print(f"{phase:8s} V3.1 fit: a = ${a:.3f}/M, b = ${b * 1e12:.1f}/M per TFLOP; worst miss ${worst:.4f}/M")
    assert worst < 0.01  # dense cost really is linear in position
""")

code(r"""
ratios = {}
figs = {}
grid = [int(v) for v in torch.linspace(0, 131072, 65)]
for phase, f in fits.items():
    dense_at = lambda p: f["a"] + f["b"] * flops(p, "dense", phase)
    dsa_at = lambda p: f["a32"] + f["b"] * flops(p, "sparse", phase)
    ratios[phase] = (f["y31"][-1] / f["y32"][-1], dense_at(131072) / dsa_at(131072))
    figs[phase] = viz.paper_cost_figure(
        {"V3.1-Terminus": (f["x31"], f["y31"]), "V3.2-Exp": (f["x32"], f["y32"])},
        {"V3.1 (dense)": (grid, [dense_at(p) for p in grid]), "V3.2 (DSA)": (grid, [dsa_at(p) for p in grid])},
        phase=phase)
    print(f"{phase:8s} at 128K: V3.1 / V3.2 cost = {ratios[phase][0]:.2f}x in the paper, {ratios[phase][1]:.2f}x in the FLOP model")
figs["prefill"]
""")

code(r"""
figs["decode"]
""")

md(r"""
The FLOP model gets the *shape*: dense cost grows linearly with position, DSA's is nearly flat once past k. It
overestimates the saving at 128K, because DSA's real slope is steeper than its FLOPs say. How much more does the
indexer (the only part of DSA that still grows with L) cost in practice than its FP8 FLOPs at V3.1's price?
Fit that factor to V3.2's points past k:
""")

code(r"""
for phase, f in fits.items():
    far = [(p, y) for p, y in zip(f["x32"], f["y32"]) if p >= BIG.index_topk]
    x = [f["b"] * flops(p, "sparse", phase, "indexer") for p, _ in far]
    y = [yv - f["b"] * flops(p, "sparse", phase, "core") for p, yv in far]
    a_fit, factor = fit_line(x, y)
    f["indexer_factor"] = factor
    print(f"{phase:8s} the indexer costs {factor:.2f}x its FP8-FLOP estimate; model ratio at 128K "
          f"{ratios[phase][1]:.2f}x vs paper {ratios[phase][0]:.2f}x")
    assert ratios[phase][1] > ratios[phase][0] and factor > 1
""")

md(r"""
So the deployed indexer behaves as if it cost more than its FLOPs at full FP8 speed — plausible for a kernel that
writes per-query logits and runs a top-k over up to 128K scores per token (chapter 5 measures the same on an H200
with plain PyTorch: the indexer is most of DSA's prefill time). Still, V3.2's cost per token grows far more
slowly with position than V3.1's, which is the whole point.

### The price at short contexts

Look at the start of the paper's curves: there V3.2 is the **more expensive** model. Where do the curves cross?
Between two of the paper's points we interpolate linearly:
""")

code(r"""
def crossover(x, a, b):
    # the first position where b drops below a, interpolating linearly between the sample points x
    for i in range(1, len(x)):
        d0, d1 = b[i - 1] - a[i - 1], b[i] - a[i]
        if d0 >= 0 > d1:
            return x[i - 1] + (x[i] - x[i - 1]) * d0 / (d0 - d1)
    return None


crossovers = {}
for phase, f in fits.items():
    assert f["x31"] == f["x32"]
    premium = f["y32"][0] / f["y31"][0] - 1
    crossovers[phase] = crossover(f["x31"], f["y31"], f["y32"])
    print(f"{phase:8s} at position 0: V3.2 ${f['y32'][0]:.3f} vs V3.1 ${f['y31'][0]:.3f} per M tokens "
          f"({premium:+.0%}); V3.2 is cheaper only past ~{crossovers[phase] / 1024:.1f}K tokens")
    assert f["y32"][0] > f["y31"][0] and crossovers[phase] is not None and f["a32"] > f["a"]
assert BIG.index_topk < crossovers["decode"] < crossovers["prefill"] < flop_crossover_prefill
print(f"(the FLOP count alone puts the prefill crossover at {flop_crossover_prefill / 1024:.1f}K)")
viz.paper_cost_figure({"V3.1-Terminus": (fits["prefill"]["x31"], fits["prefill"]["y31"]),
                       "V3.2-Exp": (fits["prefill"]["x32"], fits["prefill"]["y32"])},
                      phase="prefill", crossover=crossovers["prefill"], max_position=32 * 1024,
                      title="Prefill cost at short positions (the paper's points): V3.2 costs more before the crossover")
""")

code(r"""
viz.paper_cost_figure({"V3.1-Terminus": (fits["decode"]["x31"], fits["decode"]["y31"]),
                       "V3.2-Exp": (fits["decode"]["x32"], fits["decode"]["y32"])},
                      phase="decode", crossover=crossovers["decode"], max_position=32 * 1024,
                      title="Decode cost at short positions (the paper's points): V3.2 costs more before the crossover")
""")

md(r"""
So DSA is not free: below about 10K tokens of prefill and 5K of decode, V3.2 costs more per token than the dense
V3.1 ([the paper's Figure 3](../docs/references.md#paper-cost)). Part of that is what the FLOP count above shows — below k
DSA attends to every key anyway, in the costlier MQA mode, and pays for the indexer on top — and part is a constant
the FLOP model does not explain (the fit needed a larger a for V3.2 at position 0, where attention costs almost
nothing): everything else that differs between the two services. The saving is real, but it is a long-context
saving.

## What you built

- `dslib.indexer.LightningIndexer` — the lightning indexer with the checkpoint's names (`wq_b`, `wk`, `k_norm`,
  `weights_proj`), half-split RoPE on its first dims, chunked scores; `IndexerKeyCache`; `fp8_index_scores`
  (Hadamard + FP8 simulation); `indexer_kl_loss` and `attention_target` for the two training stages.
- `dslib.sparse` — `topk_selection` and `window_selection`; `sparse_attention` (gather, MQA mode, O(L·k)), equal
  to chapter 2's `dense_masked_attention` (the O(L²) reference); `attention_recall`; `DSAttention` (= MLA + indexer,
  used by the whole model in chapter 5) with `DSACache`; the FLOP formulas in `dslib.cost`.
- `dslib.tasks` — the multi-query associative recall task; `dslib.train` — the small DSA model, the three
  training stages and the evaluation, reproducible with `python -m dslib.train --out data`.

## Exercises

Each check says "correct" or what is not right yet. Solutions live in `dslib.exercises.ch3`.

**1. Build it: top-k selection and the gather.** Write the step between the indexer and sparse attention, from
torch operations (not dslib's `topk_selection`): each query keeps the `k` keys with the highest
index score among the keys it can see (future keys carry −inf and are never kept; a query that sees fewer than k
keys keeps all of them and marks its other slots −1), and then every query's selected latents and rope keys are
gathered, batch element by batch element. The check compares with dslib on fresh random scores: a prefill longer
than k, one shorter than k, and a decode step.
""")

code(r"""
def my_select_and_gather(index_scores, k, q_positions, kv_latent, k_rope):
    # index_scores [B, T, S] (future keys already -inf), q_positions [T], kv_latent [B, S, C], k_rope [B, S, R].
    # Return selected [B, T, k] (int64 key positions, -1 = none), lat [B, T, k, C], rope [B, T, k, R].
    raise NotImplementedError  # your code here


exercises.check_select_and_gather(my_select_and_gather)
""")

md(r"""
**2.** Attention recall of one query: the share of its dense attention probabilities `probs` (`[S]`, sums to 1)
that falls on the `selected` key positions (a list; `-1` means "no key").
""")

code(r"""
def my_recall(probs, selected):
    raise NotImplementedError  # your code: a number in [0, 1]


exercises.check_attention_recall(my_recall)
""")

md(r"""
**3.** Counting FLOPs only (`attention_flops_per_token`, 671B dims, decode, the FP8 indexer at half cost): from
which token position on is a DSA decode step cheaper than a dense one? Compare with the paper's decode curves above.
""")

code(r"""
my_position = None  # your number

exercises.check_crossover(my_position)
""")

nb.write()
