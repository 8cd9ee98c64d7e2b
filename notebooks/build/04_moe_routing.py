"""Writes notebooks/04_moe_routing.ipynb (run from the repository root; the notebook is committed without outputs).

    python notebooks/build/04_moe_routing.py
"""
from nbbuild import Notebook

nb = Notebook("04_moe_routing.ipynb", ids="ch4-{:03d}")
md, code = nb.md, nb.code


md(r"""
# 4 · Mixture of experts: 671B parameters, ~37B per token

DeepSeek-V3.2 stores 671 billion parameters but each token uses only about 37 billion of them. The trick is in the
feed-forward half of 58 of its 61 layers: instead of one big MLP there are **256 small "routed" experts and one
shared expert**, and a **gate** sends each token to just **8** routed experts. This notebook builds that layer from
`dslib.moe` and measures what it costs and what it saves.

You will learn

- how a MoE layer compares with a dense feed-forward layer: **parameters stored vs parameters used per token**, and
  where the 671B / 37B figures come from (computed from the config, then measured on a small model);
- the gate **step by step**: sigmoid scores, a **correction bias used only for choosing**, **group-limited routing**
  (a token may use at most 4 of 8 groups = nodes), top-8, renormalised weights × 2.5 — each step checked;
- **dispatch**: how tokens are grouped by expert so that each expert runs one matrix product, checked against a
  per-token loop and timed;
- **load balancing**: why an uneven load hurts, and how to train — no balancing, DeepSeek-V3's sequence-wise
  **auxiliary loss** (at a strong weight and at DeepSeek's own tiny one), the same loss counted over the batch, and
  the **auxiliary-loss-free bias update** — on a small MoE language model trained on eight different tasks;
- what **group-limited routing** saves in communication between nodes, on random scores at full size and on the
  trained model.

Everything runs code from the package `dslib`; `dslib.show(...)` prints the real source.
""")

code(r"""
import math
import os
import platform
import time
from pathlib import Path

import ipywidgets as widgets
import plotly
import torch
from torch.utils.flop_counter import FlopCounterMode

import dslib
from dslib import moe_train, show, viz
from dslib.attention import FeedForward
from dslib.config import ConfigError, ModelConfig
from dslib.exercises import ch4
from dslib.paths import find_data
from dslib.moe import (
    Gate, MoE, dispatch, expert_load, expert_weights, group_scores, groups_touched, keep_top_groups,
    limit_to_groups, max_violation, moe_reference, router_scores, select_experts, sequence_aux_loss, update_bias,
)

torch.manual_seed(0)
# The models here are tiny: one thread avoids synchronisation overhead and keeps timings steady on a busy machine.
torch.set_num_threads(1)
print(f"python {platform.python_version()} | torch {torch.__version__} | plotly {plotly.__version__} | "
      f"dslib {dslib.__version__} | {os.cpu_count()} CPU cores")
""")

code(r"""
# Sizes. DSLIB_FAST=1 (CI) runs the same code on smaller sizes.
FAST = os.environ.get("DSLIB_FAST") == "1"

GATE_TOKENS = 64                            # tokens pushed through the small gate, step by step
TIMING_TOKENS = 128 if FAST else 512        # tokens for batched-vs-loop dispatch timing
BALANCE_ITERS = 150 if FAST else 400        # bias-update iterations in the toy balancing demo
NODE_TOKENS = 512 if FAST else 2048         # tokens routed by the full-size gate (random scores)
RETRAIN = False                             # True: retrain the five models here instead of loading data/moe/
RETRAIN_STEPS = 1500                        # steps per model when RETRAIN (the shipped models used 1500)
RETRAIN_JOBS = min(3, os.cpu_count() or 1)  # settings trained in parallel processes when RETRAIN
# The repository's data/ (the trained models of section 4): found here, or a clear error now that says where to
# open the notebook from.
DATA = find_data(need=[] if RETRAIN else ["moe/moe_train_log.json"])
""", tags=["parameters"])

# ---------------------------------------------------------------------------------------------------- 1
md(r"""
## 1. A dense feed-forward layer vs a mixture of experts

A transformer block is attention followed by a feed-forward network (FFN). DeepSeek's FFN is a **SwiGLU MLP**:
`down_proj(silu(gate_proj(x)) * up_proj(x))`, three matrices of `hidden × intermediate`. Its first 3 layers keep one
wide MLP (`intermediate_size` = 18432). Every later layer has a **MoE**: 256 routed experts and 1 shared expert, each
the same SwiGLU but narrow (`moe_intermediate_size` = 2048), plus a gate. Chapter 1's `FeedForward` is all three:
""")

code(r"""
show(FeedForward)
""")

code(r"""
show(FeedForward.forward)
""")

md(r"""
Estimate first, from the config alone: parameters stored in a layer, and parameters one token actually multiplies
with (its 8 routed experts, the shared expert and the gate).
""")

code(r"""
big = ModelConfig.deepseek_v32()
c = big.param_counts()
k, n_shared, E = big.num_experts_per_tok, big.n_shared_experts, big.n_routed_experts
dense_ffn = c["dense_mlp"]
moe_stored = c["moe_mlp"]
moe_active = (k + n_shared) * c["expert"] + c["router"]
print(f"dense FFN (layers 0-{big.first_k_dense_replace - 1}):  {dense_ffn / 1e6:8.1f} M parameters, all used by every token")
print(f"MoE layer:                {moe_stored / 1e9:8.2f} B stored, {moe_active / 1e6:.1f} M used per token "
      f"({k} routed + {n_shared} shared experts of {c['expert'] / 1e6:.1f} M, gate {c['router'] / 1e6:.2f} M)")
print(f"-> per token the MoE layer costs {moe_active / dense_ffn:.2f}x the dense FFN, "
      f"but holds {moe_stored / dense_ffn:.1f}x its parameters")
assert abs(moe_active / dense_ffn - 1) < 0.01 and moe_stored / dense_ffn > 28
""")

md(r"""
So a MoE layer does about the work of the dense FFN per token while holding 28× more parameters: more knowledge
for the same compute. (The price is memory for all experts and moving tokens between the GPUs that hold them —
section 5.)

Now **measure** on a small model: build a `MoE` from `ModelConfig.small()`, count its parameters, and count the
FLOPs of a forward pass with PyTorch's `FlopCounterMode`. Every matrix product a token meets is 2 FLOPs per weight
it uses, so FLOPs = 2 × tokens × (active weights).
""")

code(r"""
small = ModelConfig.small()
layer = MoE(small)
cs = small.param_counts()
assert sum(p.numel() for p in layer.parameters()) + layer.gate.e_score_correction_bias.numel() == cs["moe_mlp"]

tokens = 256
x = torch.randn(1, tokens, small.hidden_size)
with FlopCounterMode(display=False) as counter:
    layer(x)
measured_flops = counter.get_total_flops()
active_weights = (small.num_experts_per_tok + small.n_shared_experts) * cs["expert"] + small.n_routed_experts * small.hidden_size
estimated_flops = 2 * tokens * active_weights
print(f"small MoE: {cs['moe_mlp']:,} parameters; forward of {tokens} tokens: {measured_flops:,} FLOPs "
      f"(estimate {estimated_flops:,})")
assert measured_flops == estimated_flops
""")

md(r"""
The whole model: everything except the routed experts a token does not use. `ModelConfig` does the accounting;
with the indexers of chapter 3 (V3.2) and without them (the V3 architecture DeepSeek's "37B" refers to).
""")

code(r"""
rows = {
    "DeepSeek-V3 architecture": (big.total_params(indexer=False), big.active_params(indexer=False)),
    "DeepSeek-V3.2 (+ indexers)": (big.total_params(), big.active_params()),
}
for name, (total, active) in rows.items():
    print(f"{name:28s} total {total / 1e9:6.1f} B   active per token {active / 1e9:5.2f} B   ({active / total:.1%})")
assert round(rows["DeepSeek-V3 architecture"][0] / 1e9, 1) == 671.0 and round(rows["DeepSeek-V3 architecture"][1] / 1e9, 2) == 37.55
assert round(rows["DeepSeek-V3.2 (+ indexers)"][0] / 1e9, 1) == 671.9 and round(rows["DeepSeek-V3.2 (+ indexers)"][1] / 1e9, 1) == 38.4
""")

md(r"""
(DeepSeek quotes "37B activated"; our count of the V3 architecture gives 37.55B — their accounting differs
slightly from ours, see [the sources](../docs/references.md#config).)
""")

code(r"""
viz.params_bars(
    ["dense FFN layer", "MoE layer", *rows],
    [dense_ffn / 1e9, moe_stored / 1e9, *(t / 1e9 for t, _ in rows.values())],
    [dense_ffn / 1e9, moe_active / 1e9, *(a / 1e9 for _, a in rows.values())],
)
""")

# ---------------------------------------------------------------------------------------------------- 2
md(r"""
## 2. The gate, step by step

The gate decides, for each token, which experts work on it and how much each one's output counts. We follow it on
the small config: 16 experts in 4 groups of 4, each token picks 4 experts from at most 2 groups, weights scaled to
2.5. (DeepSeek-V3.2: 256 experts in 8 groups of 32, 8 experts from at most 4 groups, scale 2.5.) The gate's bias
is zero in a fresh model; we give it random values so that its effect is visible.
""")

code(r"""
gate = Gate(small)
with torch.no_grad():
    gate.e_score_correction_bias.copy_(0.05 * torch.randn(small.n_routed_experts))
h = torch.randn(GATE_TOKENS, small.hidden_size)          # GATE_TOKENS tokens, hidden_size each
G, per_group = small.n_group, small.experts_per_group
print(f"{small.n_routed_experts} experts in {G} groups of {per_group}; top-{small.num_experts_per_tok} from "
      f"<= {small.topk_group} groups; scale {small.routed_scaling_factor}")
""")

md(r"""
**Step 1 — scores.** Each expert has a learned vector (a row of `gate.weight`); a token's affinity to it is the
sigmoid of their dot product, computed in fp32. A sigmoid scores experts independently (a softmax would make them
compete): the weights are normalised later, over the chosen experts only.
""")

code(r"""
show(router_scores)
""")

code(r"""
s = router_scores(h, gate.weight)                          # [N, E]
assert s.shape == (GATE_TOKENS, small.n_routed_experts) and ((s > 0) & (s < 1)).all()
print("token 0, scores of the first 8 experts:", [round(v, 3) for v in s[0, :8].tolist()])
""")

md(r"""
**Step 2 — the correction bias, for choosing only.** `e_score_correction_bias` (one number per expert) is added to
the scores *to choose* experts. It is how DeepSeek balances the load without an auxiliary loss (section 4): a busy
expert gets a lower bias and is chosen less. It never enters the weights.
""")

code(r"""
choice = s + gate.e_score_correction_bias                  # [N, E] biased scores, used only to choose
changed = (select_experts(choice, 4).sort(-1).values != select_experts(s, 4).sort(-1).values).any(-1)
print(f"the bias changes the top-4 choice of {int(changed.sum())} of {GATE_TOKENS} tokens")
""")

md(r"""
**Step 3 — group scores.** Experts are split into `n_group` contiguous groups; in deployment one group lives on one
node. A group's score is the **sum of its 2 best** biased scores — a group that could serve two of the token's
experts beats a group with one lucky expert.
""")

code(r"""
g_scores = group_scores(choice, G)                          # [N, G]
token0 = choice[0].tolist()                                 # by hand, for token 0: each group's two best, summed
manual = [sum(sorted(token0[g * per_group:(g + 1) * per_group], reverse=True)[:2]) for g in range(G)]
assert torch.allclose(g_scores[0], torch.tensor(manual))
print("token 0, group scores:", [round(v, 3) for v in g_scores[0].tolist()])
""")

md(r"""
**Step 4 — keep the best groups.** Only the `topk_group` best groups stay; every expert of the other groups gets
−∞, so the top-k cannot pick it. This caps the number of nodes a token must be sent to.
""")

code(r"""
kept = keep_top_groups(g_scores, small.topk_group)          # bool [N, G]
limited = limit_to_groups(choice, kept)                     # [N, E], -inf outside kept groups
assert (kept.sum(-1) == small.topk_group).all()
assert (torch.isfinite(limited).sum(-1) == small.topk_group * per_group).all()
print("token 0 keeps groups", kept[0].nonzero().flatten().tolist())
""")

md(r"""
**Step 5 — top-k experts** of the biased, group-limited scores.
""")

code(r"""
topk_idx = select_experts(limited, small.num_experts_per_tok)   # [N, k]
assert kept.gather(1, topk_idx // per_group).all()              # every chosen expert is in a kept group
print("token 0 goes to experts", topk_idx[0].tolist())
""")

md(r"""
**Step 6 — weights** from the *unbiased* scores of the chosen experts, renormalised to sum to 1, times
`routed_scaling_factor`.
""")

code(r"""
topk_weight = expert_weights(s, topk_idx, small.routed_scaling_factor)    # [N, k]
assert torch.allclose(topk_weight.sum(-1), torch.full((GATE_TOKENS,), small.routed_scaling_factor))
biased_weights = expert_weights(choice, topk_idx, small.routed_scaling_factor)
assert not torch.allclose(topk_weight, biased_weights)      # the bias would change them: it is kept out
print("token 0 weights:", [round(v, 3) for v in topk_weight[0].tolist()])
""")

md(r"""
The `Gate` module runs exactly these steps; its `route` keeps every intermediate result in a `Routing`, which is
what recorders and the balancing code read. Steps 3–6 are shown here as calls, not as code: you will write the
whole route yourself in **Exercise 1**, and its check then shows dslib's `Gate.route` and the step functions.
""")

code(r"""
routing = gate.route(h)
assert torch.equal(routing.topk_idx, topk_idx) and torch.allclose(routing.topk_weight, topk_weight)
assert torch.equal(gate(h)[0], topk_idx)
viz.token_routing(routing.scores[0], gate.e_score_correction_bias, routing.group_kept[0], routing.topk_idx[0],
                  routing.topk_weight[0], G)
""")

md(r"""
The same token as a picture of groups: each box is one group of experts (one node when the model is served), with
its group score; the dropped groups are greyed out, and the chosen experts carry their weights. Whatever the
scores inside a dropped group, none of its experts can be chosen.
""")

code(r"""
viz.routing_groups_diagram(routing.scores[0], gate.e_score_correction_bias, routing.group_kept[0],
                           routing.topk_idx[0], routing.topk_weight[0], G)
""")

md(r"""
Two checks: with a single group, group-limited routing is plain top-k of the biased scores;
and configs the gate cannot run are refused with a message that says how to fix them.
""")

code(r"""
one = Gate(small.replace(n_group=1, topk_group=1))
one.load_state_dict(gate.state_dict())
assert torch.equal(one(h)[0], select_experts(choice, small.num_experts_per_tok))
for bad in [dict(n_routed_experts=18), dict(topk_group=1, num_experts_per_tok=5)]:
    try:
        small.replace(**bad)
    except ConfigError as err:
        print(f"{bad} -> ConfigError: {err}")
    else:
        raise AssertionError(f"{bad} should be rejected")
""")

# ---------------------------------------------------------------------------------------------------- 3
md(r"""
## 3. Dispatch: one matrix product per expert

With `N` tokens and `k` experts each there are `N·k` (token, expert) pairs. Looping over tokens would run `N·k`
tiny matrix products. Instead, sort the pairs by expert: each expert then processes one contiguous block of tokens
in a single product, and `index_add_` adds the weighted results back to their tokens. (Across GPUs this sort becomes
the all-to-all exchange of expert parallelism.)
""")

code(r"""
show(dispatch)
show(MoE.forward)
""")

code(r"""
moe_layer = MoE(small).eval()
with torch.no_grad():
    moe_layer.gate.e_score_correction_bias.copy_(0.05 * torch.randn(small.n_routed_experts))
x = torch.randn(1, TIMING_TOKENS, small.hidden_size)
calls = {"n": 0}   # expert forward calls: the number of separate matrix-product groups each way runs
hooks = [e.register_forward_hook(lambda *_: calls.update(n=calls["n"] + 1)) for e in moe_layer.experts]
with torch.no_grad():
    t0 = time.perf_counter(); y_batched = moe_layer(x); t_batched = time.perf_counter() - t0
    batched_calls, calls["n"] = calls["n"], 0
    t0 = time.perf_counter(); y_loop = moe_reference(moe_layer, x); t_loop = time.perf_counter() - t0
    loop_calls = calls["n"]
for h in hooks:
    h.remove()
assert torch.allclose(y_batched, y_loop, atol=1e-5)
assert batched_calls <= small.n_routed_experts and loop_calls == TIMING_TOKENS * small.num_experts_per_tok
print(f"{TIMING_TOKENS} tokens: batched dispatch {batched_calls} expert calls in {t_batched * 1e3:.1f} ms, "
      f"per-token loop {loop_calls} calls in {t_loop * 1e3:.1f} ms, same output")
""")

md(r"""
The expert loads of this batch show the problem of the next section: a random gate already loads some experts more
than others, and the busiest expert decides how long the layer takes when experts run in parallel.
""")

code(r"""
load = expert_load(moe_layer.gate(x)[0], small.n_routed_experts)
print("tokens per expert:", load.tolist(), f"| MaxVio = {max_violation(load):.2f}")
""")

# ---------------------------------------------------------------------------------------------------- 4
md(r"""
## 4. Load balancing

If the gate sends most tokens to a few experts, those experts (and their GPUs) become the bottleneck and the
others sit idle; in the worst case some experts never train. DeepSeek-V3 measures imbalance with **MaxVio**
= max load / mean load − 1 (0 = perfectly even; 1 = the busiest expert does twice its share).

Two cures:

- **Auxiliary loss** (the classic one; DeepSeek-V3 keeps a tiny *sequence-wise* version): add
  α·Σᵢ fᵢ·Pᵢ to the loss, where fᵢ is expert i's share of the routed slots in the sequence (scaled so that 1 is
  fair) and Pᵢ its mean normalised score. Its gradient pushes scores of overloaded experts down — but it also
  pulls the model away from what the language-modelling loss wants.
- **Auxiliary-loss-free balancing** (DeepSeek-V3's main method): after each step, move each expert's bias by a
  fixed small γ: down if it was overloaded, up if underloaded. No gradient, no loss term; the bias only changes who
  is chosen, never the weights.
""")

code(r"""
show(max_violation)
show(update_bias)
show(sequence_aux_loss)
""")

md(r"""
A first look, without training: a gate whose first expert is too attractive, fed the same tokens again and again,
with only the bias update running.
""")

code(r"""
toy_cfg = small.replace(n_group=1, topk_group=1)
toy = Gate(toy_cfg)
with torch.no_grad():
    toy.weight[0] += 0.01                                  # expert 0 is over-attractive
tokens_toy = torch.randn(1024, small.hidden_size) + 0.3
maxvio_toy = []
for it in range(BALANCE_ITERS):
    load_toy = expert_load(toy(tokens_toy)[0], small.n_routed_experts)
    maxvio_toy.append(max_violation(load_toy))
    update_bias(toy, load_toy, gamma=1e-3)
print(f"MaxVio {maxvio_toy[0]:.2f} -> {maxvio_toy[-1]:.2f} after {BALANCE_ITERS} bias updates (gamma = 1e-3)")
assert maxvio_toy[-1] < maxvio_toy[0] / 2 and toy.e_score_correction_bias.grad is None
viz.maxvio_curves(range(BALANCE_ITERS), {"bias update only": maxvio_toy})
""")

md(r"""
### The experiment: one small MoE language model, trained five ways

`dslib.moe_train` trains a miniature DeepSeek: 2 layers, each chapter 2's **MLA** followed by this chapter's
**MoE** (d = 64), with a routing shaped like DeepSeek-V3.2's divided by 8: **32 experts in 8 groups, 8 experts per
token from at most 4 groups**, plus one shared expert. (One addition DeepSeek does not have: a learned position
embedding, because MLA's RoPE sees only relative offsets and a task like "reverse" needs to know where the answer
starts.) Each training sequence holds one of eight tasks, named by its first token, and the loss counts only the
answer:
""")

code(r"""
g = torch.Generator().manual_seed(0)
examples, _ = moe_train.make_batch(len(moe_train.TASKS), g, torch.arange(len(moe_train.TASKS)))
for seq, name in zip(examples, moe_train.TASKS):
    print(f"{moe_train.TASK_HELP[name]:48s} {moe_train.describe(seq)}")
""")

md(r"""
The same model, data order and seed are trained with five settings:

- **none**: no balancing;
- **aux**: the sequence-wise auxiliary loss with α = 0.01. That is **100× DeepSeek-V3's α = 1e-4**, chosen because
  it visibly balances at this size;
- **aux_small**: the same loss at DeepSeek's α = 1e-4;
- **aux_batch**: the same loss at α = 0.01, but with f and P counted over the whole batch instead of each sequence;
- **bias**: the auxiliary-loss-free update with the paper's γ = 0.001.

Mind the data: **each training sequence holds one task**. That is the worst case for a sequence-wise loss, which asks
every sequence to spread its tokens over all experts; a batch mixes the tasks. Training takes a few minutes per
setting, so the repo ships the results: `python -m dslib.moe_train --out data` (seeded) wrote `data/moe/`. Set
`RETRAIN = True` in the parameters cell to redo it here.
""")

code(r"""
show(moe_train.train)
""")

code(r"""
if RETRAIN:   # the same as `python -m dslib.moe_train`, without saving
    models, logs = moe_train.train_all(steps=RETRAIN_STEPS, jobs=RETRAIN_JOBS)
else:
    models, logs = moe_train.load(DATA)
SETTINGS, LABEL = moe_train.SETTINGS, moe_train.SETTING_LABELS
mcfg = models["bias"].config
steps = logs["bias"]["eval_steps"]
n_layers = mcfg.num_hidden_layers
for s in SETTINGS:
    print(f"{LABEL[s]:20s} trained {logs[s]['config']['steps']} steps in {logs[s]['seconds']:.0f} s "
          "(on the machine that made these artifacts)")
""")

md(r"""
**Imbalance over training**, measured every few steps on a fixed evaluation set (the same sequences each time, all tasks), for
each layer:
""")

code(r"""
curves, colors, dashes = {}, {}, {}
for s in SETTINGS:
    for l in range(n_layers):
        name = f"{LABEL[s]} · layer {l}"
        curves[name] = [m[l] for m in logs[s]["eval_maxvio"]]
        colors[name], dashes[name] = viz.SETTING_COLORS[s], ("solid", "dash")[l % 2]
viz.maxvio_curves(steps, curves, colors=colors, dashes=dashes)
""")

code(r"""
final = {s: logs[s]["final"] for s in SETTINGS}
for s in SETTINGS:
    dead = sum(int(v == 0) for layer_load in final[s]["load"] for v in layer_load)   # experts with no token at all
    print(f"{LABEL[s]:20s} final MaxVio per layer {[round(m, 2) for m in final[s]['maxvio']]}, "
          f"busiest expert {max(max(l) for l in final[s]['load']) / (sum(final[s]['load'][0]) / mcfg.n_routed_experts):.2f}x "
          f"its share, experts never used: {dead}")
worst = {s: max(final[s]["maxvio"]) for s in SETTINGS}
assert worst["bias"] < worst["none"] / 4 and worst["aux"] < worst["none"] / 2
assert worst["aux_batch"] < worst["none"] / 4 and worst["aux_small"] > worst["none"] / 2  # 1e-4 barely acts here
""")

md(r"""
The bias, the batch-wise loss and the strong sequence-wise loss all balance the experts; the bias method ends the
most even with the paper's small γ (it needs a few hundred steps to get there: γ = 0.001 per step is slow but
steady). At DeepSeek's α = 1e-4 the sequence-wise loss barely changes the load: in DeepSeek-V3 it is a guard
against extreme imbalance inside one sequence, while the bias does the balancing. Without balancing the busiest
expert carries far more than its share all through training (the curves above); the last column says whether any
expert was starved completely.

**Does balancing cost quality?** Accuracy per task on the evaluation set (answer tokens), and the loss:
""")

code(r"""
for s in SETTINGS:
    print(f"{LABEL[s]:20s} eval loss {final[s]['loss']:.4f}  answer accuracy {final[s]['accuracy']:.2%}")
viz.quality_bars(moe_train.TASKS, {LABEL[s]: final[s]["task_accuracy"] for s in SETTINGS},
                 colors={LABEL[s]: viz.SETTING_COLORS[s] for s in SETTINGS})
""")

code(r"""
worst_task = {s: min(final[s]["task_accuracy"]) for s in SETTINGS}
print("weakest task per setting:", {LABEL[s]: f"{worst_task[s]:.1%}" for s in SETTINGS})
assert all(final[s]["accuracy"] > 0.95 for s in SETTINGS)
""")

md(r"""
All five learn the tasks. The differences are of the size one sees between random seeds (in trial runs with
three seeds each, the weakest task — usually "reverse" — varied more between seeds than between settings), so
this small experiment shows no quality cost of balancing either way.

**Expert load over training** — drag the slider: each row is one layer under one setting, each column an expert,
the colour its load relative to a fair share (blue below, red above). Thick lines separate the 8 groups.
""")

code(r"""
def load_heatmap(step_index=len(steps) - 1):
    rows, labels = [], []
    for s in SETTINGS:
        for l in range(n_layers):
            rows.append(logs[s]["eval_load"][step_index][l])
            labels.append(f"{LABEL[s]} · L{l}")
    return viz.expert_load_heatmap(rows, labels, mcfg.n_group, title=f"Expert load at step {steps[step_index]}")


widgets.interactive(lambda step_index: load_heatmap(step_index).show(),
                    step_index=widgets.IntSlider(value=len(steps) - 1, min=0, max=len(steps) - 1, description="eval #"))
""")

md(r"""
The bias values that produced the even load. The update moves every bias by ±γ each step, so all biases drift
together; only their differences matter, which is what the plot shows.
""")

code(r"""
viz.bias_curves(steps, [b[1] for b in logs["bias"]["bias"]], n_group=mcfg.n_group,
                title="Layer 1: each expert's bias minus the mean, over training (coloured by group)")
""")

md(r"""
### Specialisation: do experts pick up tasks?

For each task, the share of its routed slots that goes to each expert (answer and question tokens alike). A
summary number: the normalised mutual information between task and chosen expert (0 = the expert choice says
nothing about the task, 1 = it identifies the task).
""")

code(r"""
for s in SETTINGS:
    print(f"{LABEL[s]:20s} specialisation (NMI) per layer: {[round(v, 3) for v in final[s]['specialisation']]}")
nmi = {s: max(final[s]["specialisation"]) for s in SETTINGS}
assert nmi["aux"] < nmi["none"] / 3 and nmi["bias"] > nmi["none"] / 2
assert nmi["aux_batch"] > 5 * nmi["aux"] and nmi["aux_small"] > nmi["none"] / 2  # batch-wise: balanced AND specialised
""")

code(r"""
widgets.interactive(
    lambda setting, layer: viz.task_expert_heatmap(
        final[setting]["task_expert"][layer], moe_train.TASKS,
        title=f"{LABEL[setting]}, layer {layer}: share of each task's routed slots per expert").show(),
    setting=widgets.Dropdown(options=[(LABEL[s], s) for s in SETTINGS], value="bias"),
    layer=widgets.Dropdown(options=list(range(n_layers)), value=n_layers - 1),
)
""")

md(r"""
What erases specialisation here is narrower than "the auxiliary loss": it is a **strong sequence-wise** loss on
**one-task sequences**. At α = 0.01 it demands that *every sequence*, i.e. every task, spread its tokens evenly over
all experts, so no expert may be "the sorting expert", and the task–expert NMI collapses. The same loss counted
**over the batch** (which mixes the tasks) balances the load about as well and leaves each task free to prefer its
own experts, like the bias method; at DeepSeek's **α = 1e-4** the sequence-wise loss neither balances nor erases.
So this small experiment supports DeepSeek-V3's design (balance with the bias, keep the sequence-wise term tiny)
without showing that sequence-wise balancing hurts specialisation at the weight DeepSeek uses. It has one seed per
setting and tasks that are easy to tell apart; a language model's sequences mix many "tasks".

**Token inspector** — choose a setting, a task, a position in the sequence and a layer: the bars are the token's
sigmoid scores (coloured by group), black ticks the biased scores used to choose, faded groups were dropped, the
outlined bars are the chosen experts with their weights.
""")

code(r"""
inspect_seqs, inspect_tasks = moe_train.eval_set(1)          # one sequence per task
inspect_inputs, _ = moe_train.inputs_and_targets(inspect_seqs)
T = inspect_inputs.shape[1]
recorded = {}
with torch.no_grad():
    for s in SETTINGS:
        recorded[s] = moe_train.RoutingLog()
        models[s](inspect_inputs, recorder=recorded[s])


def inspect(setting, task, position, layer):
    r = recorded[setting].by_layer[layer]
    n = task * T + position                                   # token index in the flattened batch
    text = moe_train.describe(inspect_seqs[task])
    token = moe_train.describe(inspect_inputs[task, position:position + 1]).strip()
    return viz.token_routing(
        r.scores[n], models[setting].layers[layer].mlp.gate.e_score_correction_bias, r.group_kept[n],
        r.topk_idx[n], r.topk_weight[n], mcfg.n_group,
        title=f"{LABEL[setting]}, layer {layer}: token {position} '{token}' of  {text}")


widgets.interactive(
    lambda setting, task, position, layer: inspect(setting, task, position, layer).show(),
    setting=widgets.Dropdown(options=[(LABEL[s], s) for s in SETTINGS], value="bias"),
    task=widgets.Dropdown(options=[(name, i) for i, name in enumerate(moe_train.TASKS)], value=0),
    position=widgets.IntSlider(value=moe_train.N_ITEMS + 2, min=0, max=T - 1),
    layer=widgets.Dropdown(options=list(range(n_layers)), value=n_layers - 1),
)
""")

# ---------------------------------------------------------------------------------------------------- 5
md(r"""
## 5. Group-limited routing: communication saved

In expert-parallel serving, experts live on different nodes: DeepSeek-V3 spreads its 256 experts over 8 nodes, one
group per node. A token must be sent to every node that holds one of its experts, and cross-node links are much
slower than links inside a node. Limiting each token to 4 groups caps that traffic.

**Estimate.** Without the limit, if a token's 8 experts were a uniformly random 8 of the 256, a given node would be
missed with probability C(224, 8) / C(256, 8), so the expected number of nodes reached is 8 · (1 − that).
""")

code(r"""
nodes, per_node = big.n_group, big.experts_per_group
p_missed = math.comb(E - per_node, k) / math.comb(E, k)
expected_nodes = nodes * (1 - p_missed)
print(f"{k} random experts of {E} on {nodes} nodes reach {expected_nodes:.2f} nodes on average; "
      f"with the limit at most {big.topk_group}")
""")

md(r"""
**Measure** with the full-size gate (7168 → 256, random weights, random tokens), once as configured and once with
the limit lifted (`topk_group = n_group`):
""")

code(r"""
big_gate = Gate(big)
tokens_big = torch.randn(NODE_TOKENS, big.hidden_size)
with torch.no_grad():
    limited_idx = big_gate.route(tokens_big).topk_idx
    free_idx = big_gate.route(tokens_big, topk_group=big.n_group).topk_idx
reached = groups_touched(limited_idx, nodes, E)
reached_free = groups_touched(free_idx, nodes, E)
print(f"nodes per token: {reached.float().mean():.2f} with the limit (max {int(reached.max())}), "
      f"{reached_free.float().mean():.2f} without (estimate {expected_nodes:.2f})")
assert reached.max() <= big.topk_group
assert abs(reached_free.float().mean() - expected_nodes) < 0.1
""")

code(r"""
hist = lambda t: torch.bincount(t, minlength=nodes + 1).tolist()
viz.nodes_touched_bars({"random scores, limit 4 of 8": hist(reached), "random scores, no limit": hist(reached_free)},
                       title="DeepSeek-V3.2 gate (random weights): nodes each token must reach")
""")

md(r"""
And on the trained model (8 groups of 4 experts, at most 4 groups): the same count from the evaluation run, with
the limit and for the same scores without it — and the loss when the trained model is run without the limit.
""")

code(r"""
trained = {"trained, limit 4 of 8": final["bias"]["groups_touched"][1],
           "trained, no limit": final["bias"]["groups_touched_unlimited"][1]}
mean_nodes = {name: sum(i * c for i, c in enumerate(h)) / sum(h) for name, h in trained.items()}
for name, m in mean_nodes.items():
    print(f"{name:24s} {m:.2f} nodes per token (layer 1)")
saved = 1 - mean_nodes["trained, limit 4 of 8"] / mean_nodes["trained, no limit"]
print(f"-> {saved:.0%} fewer node transfers; eval loss {final['bias']['loss']:.4f} with the limit, "
      f"{final['bias']['loss_without_group_limit']:.4f} when it is lifted after training")
assert max(i for i, c in enumerate(trained["trained, limit 4 of 8"]) if c) <= mcfg.topk_group
viz.nodes_touched_bars(trained, title="Trained model (bias setting), layer 1: nodes each token must reach")
""")

md(r"""
The limit removes a large share of the cross-node sends, and lifting it after training changes the loss very
little: a model trained with the limit has learned to live within it.

## What you built

- Chapter 1's `FeedForward` (SwiGLU) as the dense FFN, each routed expert and the shared expert.
- `dslib.moe.Gate` — DeepSeek's router, in the pure steps `router_scores`, `group_scores`, `keep_top_groups`,
  `limit_to_groups`, `select_experts`, `expert_weights`; parameters `gate.weight` and
  `gate.e_score_correction_bias`, exactly as in the checkpoint; checked against transformers' `deepseek_v3` router.
- `dslib.moe.MoE` — gate + `experts.{e}` + `shared_experts` with batched `dispatch` (one product per expert),
  equal to a per-token loop and to transformers' MoE block; it reports its `Routing` to an optional recorder.
- Balancing and statistics: `update_bias` (auxiliary-loss-free), `sequence_aux_loss`, `expert_load`,
  `max_violation`, `groups_touched`.
- `dslib.moe_train` — the balancing experiment (five settings), reproducible with `python -m dslib.moe_train --out data`.

Chapter 5 puts `MoE` into every layer from `first_k_dense_replace` on and loads the real checkpoint into it.

## Exercises

**Exercise 1 — build it: the gate's route, steps 1–6.** Write the router of one MoE layer from torch operations
(no `dslib.moe` functions): sigmoid scores in fp32; the bias added for choosing only; each group scored by the sum
of its two best biased scores (groups are contiguous blocks of `E // n_group` experts); the `topk_group` best
groups kept, every other expert at −inf; the top `num_experts_per_tok` experts; their weights from the *unbiased*
scores, renormalised and scaled by `routed_scaling_factor`. The check runs your function next to `Gate.route` on
fresh random tokens, weights and biases, for two group layouts, and names the step that differs.
""")

code(r"""
def my_route(x, weight, bias, cfg):
    # x [N, d] tokens, weight [E, d] (gate.weight), bias [E] (e_score_correction_bias), cfg: a ModelConfig
    # (n_group, topk_group, num_experts_per_tok, routed_scaling_factor). Return (topk_idx [N, k], topk_weight [N, k]).
    raise NotImplementedError  # your code here


ch4.check_route(my_route)
""")

md(r"""
**Exercise 2.** Suppose DeepSeek-V3.2 routed every token to **16** experts instead of 8 (same experts, same
everything else). How many parameters would one token use? Give a number of parameters (use `big` and
`big.param_counts()` if you like).
""")

code(r"""
active_with_16_experts = ...  # your answer, e.g. 45e9
ch4.check_active_params(active_with_16_experts)
""")

nb.write()
