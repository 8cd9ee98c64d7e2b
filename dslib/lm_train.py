"""A small DeepSeek-V3.2 trained on real text (Python's standard library) with the paper's indexer recipe (chapter 5).

    python -m dslib.lm_train --out data/textlm --device cuda   # one H200, ~7 min: the shipped artifact
    python -m dslib.lm_train --out /tmp/textlm --tiny                      # CPU, seconds (the CI test)

The model is `dslib.model.DeepseekV32ForCausalLM` built from a `ModelConfig` with every V3.2 mechanism: MLA with
decoupled RoPE, a lightning indexer + DSA top-k (index_topk = 64 of a 1,024-token context), MoE layers with a
shared expert, a sigmoid gate, group-limited routing (top-4 experts from at most 2 of 4 groups, so the limit
binds) and auxiliary-loss-free bias balancing; the first layer is dense.

Training (REFERENCE.md §5, as chapter 3 does on its synthetic task), one global learning-rate schedule:

  (a) dense    the whole model, dense attention, LM loss, bias balancing on (gamma).
  then three variants continue from the end of (a) for the SAME number of steps N on the same batches:
  dense        (a) continued.
  window       attention restricted to the last index_topk tokens (a sliding window of equal budget), LM loss.
  dsa          (b) indexer warm-up for the first N_b steps: main model frozen, dense attention, every layer's
                   indexer on KL(p || softmax(I)), p = head-summed, L1-normalised attention, over all positions;
               (c) sparse training for the other N - N_b steps: attention over the indexer's top-k, the main
                   model on the LM loss, the indexer (detached inputs) on the KL over its selected set.
               Its N steps count the warm-up's; the main model thus gets N - N_b updates, the others N.

Step counts follow from a wall-clock budget: a few timed steps of each kind give seconds per step, the budget is
split (a share for (a), the rest for the three variants, which train in lockstep so they always have done the same
number of steps), and a hard deadline stops early if the machine is slower than measured (the log says so).

Evaluation on the held-out files (never seen by the tokenizer or the model); everything goes to the JSON log:
loss by "distance to the previous occurrence of the same token" (`dslib.lm_data.distance_to_previous`), each model
under each attention, the indexer's recall of the dense attention mass, how often the indexer selects the previous
occurrence of an identifier that lies beyond the window, expert load / MaxVio and expert specialisation
(normalised mutual information between expert and token class).

Artifact (`--out`): config.json + model.safetensors (FP8 blocks, bf16 embeddings/head, via
`dslib.checkpoint.save_pretrained`), tokenizer.json, textlm_log.json: the DSA model, loaded with
`dslib.load_pretrained`.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dslib import lm_data
from dslib.checkpoint import load_pretrained, save_pretrained
from dslib.config import ModelConfig
from dslib.indexer import attention_target, indexer_kl_loss
from dslib.model import DeepseekV32ForCausalLM
from dslib.moe import expert_load, max_violation, update_bias
from dslib.moe_train import normalised_mutual_information
from dslib.sparse import AttentionStats, attention_recall, topk_selection, window_selection

LOG_FILE = "textlm_log.json"
VARIANTS = ("dense", "dsa", "window")
ATTENTION_OF = {"dense": "dense", "dsa": "sparse", "window": "window"}  # how each variant is trained and served
# MLA's computation order per attention (same numbers either way): dense in MHA mode (cheaper at this size), a
# selection in MQA mode, gathering only the selected latents (the real DSA path, O(T k)).
MODE_OF = {"dense": "naive", "sparse": "absorbed", "window": "absorbed"}


# ---------------------------------------------------------------------------------------------------- the model
def model_config(**overrides) -> ModelConfig:
    """The text model: 4 layers (layer 0 dense, 1-3 MoE), d = 256, 8 MLA heads (q/kv latents 128, nope 32 +
    rope 32, v 32), indexer 8 heads x 64 with top-64 of 1,024 tokens, 16 routed experts of width 128 in 4 groups
    (top-4 from <= 2 groups) + 1 shared expert, vocab 4,096 (byte-level BPE); ~9.1M parameters, ~11 MB in FP8."""
    base = dict(
        vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, first_k_dense_replace=1, num_nextn_predict_layers=0,
        num_attention_heads=8, num_key_value_heads=8, q_lora_rank=128, kv_lora_rank=128,
        qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
        index_n_heads=8, index_head_dim=64, index_topk=64,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, max_position_embeddings=1024, rope_scaling=None,
        bos_token_id=0, eos_token_id=0, torch_dtype="bfloat16",
    )
    base.update(overrides)
    return ModelConfig(**base)


def tiny_config(**overrides) -> ModelConfig:
    """The same structure at test size (CPU, seconds): 2 layers, d = 64, context 128, top-16."""
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32,
                qk_nope_head_dim=16, qk_rope_head_dim=16, index_n_heads=4, index_head_dim=32, index_topk=16,
                v_head_dim=16, n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2,
                max_position_embeddings=128)
    base.update(overrides)
    return model_config(**base)


@dataclass
class TrainSettings:
    """Everything that defines a run (saved in the log). Defaults are the shipped run's."""

    seed: int = 0
    seq_len: int = 1024
    batch_size: int = 16
    lr: float = 2e-3  # peak, main model; linear warm-up then cosine to 10% over all steps
    lr_indexer: float = 1e-3  # the paper's warm-up learning rate; kept for the sparse stage (constant)
    warmup_lr_steps: int = 100
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.1
    clip: float = 1.0
    gamma: float = 1e-3  # aux-loss-free bias update speed (the paper's value)
    minutes: float = 6.5  # wall-clock budget of the whole command (data, training, evaluation, artifact)
    dense_share: float = 0.45  # share of the training time for stage (a)
    indexer_warmup_share: float = 0.1  # N_b / N (the paper: 1,000 warm-up steps before 15,000 sparse ones)
    dense_steps: int | None = None  # fixed step counts instead of the budget
    compare_steps: int | None = None
    eval_reserve_s: float = 75.0  # wall seconds kept for evaluation and writing the artifact
    max_epochs: float = 16.0  # at most this many passes over the training tokens per model (a small corpus)
    eval_sequences: int = 128
    eval_batch: int = 8
    probe_sequences: int = 16  # held-out sequences scored during training (an overfitting check)
    vocab_size: int = 4096
    max_files: int | None = None  # the first files of each split only (tiny runs)
    log_every: int = 10
    tiny: bool = False
    model: dict = field(default_factory=dict)  # overrides of model_config()

    @classmethod
    def tiny_run(cls, **overrides) -> "TrainSettings":
        base = dict(seq_len=128, batch_size=4, dense_steps=6, compare_steps=6, eval_sequences=4, eval_batch=2,
                    probe_sequences=2,
                    vocab_size=512, max_files=12, warmup_lr_steps=2, log_every=2, tiny=True, eval_reserve_s=0.0)
        base.update(overrides)
        return cls(**base)

    def config(self) -> ModelConfig:
        make = tiny_config if self.tiny else model_config
        return make(**{"vocab_size": self.vocab_size, "max_position_embeddings": self.seq_len, **self.model})


def main_parameters(model):
    return [p for n, p in model.named_parameters() if ".indexer." not in n]


def indexer_parameters(model):
    return [p for n, p in model.named_parameters() if ".indexer." in n]


def make_optimizer(model, s: TrainSettings) -> torch.optim.Optimizer:
    """AdamW with two groups: the main model (decay on matrices, not on norms/embeddings) and the indexers."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if ".indexer." in n:
            continue
        (decay if p.dim() >= 2 and "embed_tokens" not in n else no_decay).append(p)
    return torch.optim.AdamW([
        {"params": decay, "weight_decay": s.weight_decay, "role": "main"},
        {"params": no_decay, "weight_decay": 0.0, "role": "main"},
        {"params": indexer_parameters(model), "weight_decay": 0.0, "role": "indexer"},
    ], lr=s.lr, betas=tuple(s.betas))


def lr_at(step: int, total: int, s: TrainSettings) -> float:
    """Linear warm-up, then cosine from s.lr to s.lr / 10 at `total` steps."""
    if step < s.warmup_lr_steps:
        return s.lr * (step + 1) / s.warmup_lr_steps
    progress = min(1.0, (step - s.warmup_lr_steps) / max(1, total - s.warmup_lr_steps))
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Tap:
    """A recorder that keeps, for the last forward pass only and on the model's device, each MoE layer's routing
    and each DSA layer's selection (training needs the routing for the bias update; evaluation both)."""

    def __init__(self, selections: bool = False):
        self.keep_selections = selections
        self.routing: dict[int, object] = {}
        self.selected: dict[int, torch.Tensor] = {}

    def on_selection(self, *, layer_idx: int, selected: torch.Tensor, positions: torch.Tensor) -> None:
        if self.keep_selections:
            self.selected[layer_idx] = selected

    def on_routing(self, *, layer_idx: int, routing) -> None:
        self.routing[layer_idx] = routing


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def selected_kl(s: AttentionStats) -> torch.Tensor:
    """Stage (c)'s indexer loss for one layer: KL over the selected set S_t, p = attention over S_t (head-summed,
    normalised), q = softmax of the index scores gathered at S_t (-inf at empty slots)."""
    sel = s.selected
    scores = s.index_scores.gather(-1, sel.clamp(min=0)).masked_fill(sel < 0, float("-inf"))
    return indexer_kl_loss(attention_target(s.probs), scores)


def train_step(model, opt, ids: torch.Tensor, kind: str, *, lr: float, s: TrainSettings) -> tuple[float, float]:
    """One optimiser step of `kind`: "dense" | "window" (LM loss) | "warmup" (indexer KL, model frozen) |
    "sparse" (LM loss + selected-set KL). ids `[B, T + 1]`. Returns (LM loss, indexer KL) of the batch."""
    cfg = model.config
    inputs, targets = ids[:, :-1], ids[:, 1:]
    indexer = kind in ("warmup", "sparse")
    attention = {"dense": "dense", "window": "window", "warmup": "dense", "sparse": "sparse"}[kind]
    for g in opt.param_groups:
        if g["role"] == "main":
            g["lr"] = 0.0 if kind == "warmup" else lr
        else:
            g["lr"] = s.lr_indexer if indexer else 0.0
    train_main = kind != "warmup"
    for p in main_parameters(model):
        p.requires_grad_(train_main)
    tap = Tap()
    stats = None
    if indexer:
        stats = [AttentionStats(need_probs=True, need_index_scores=True) for _ in range(cfg.num_hidden_layers)]
    with _autocast(ids.device):
        logits = model(inputs, attention=attention, mode=MODE_OF[attention],
                       window=cfg.index_topk if kind == "window" else None, stats=stats, recorder=tap)
    lm = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    kl = torch.zeros((), device=ids.device)
    if kind == "warmup":  # dense: KL over all causal keys of every position
        for st in stats:
            kl = kl + indexer_kl_loss(attention_target(st.probs), st.index_scores)
    elif kind == "sparse":
        for st in stats:
            kl = kl + selected_kl(st)
    loss = (lm if train_main else 0.0) + (kl if indexer else 0.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"] if p.grad is not None], s.clip)
    opt.step()
    if train_main:  # aux-loss-free balancing: after the step, from the load this batch put on each expert
        for i, r in tap.routing.items():
            gate = model.model.layers[i].mlp.gate
            update_bias(gate, expert_load(r.topk_idx, cfg.n_routed_experts), s.gamma)
    for p in model.parameters():
        p.requires_grad_(True)
    return float(lm.detach()), float(kl.detach())


def clone(model, opt, s: TrainSettings):
    """An independent copy of a model and its optimiser state (the variants branch off here)."""
    twin = copy.deepcopy(model)
    twin_opt = make_optimizer(twin, s)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    return twin, twin_opt


# ---------------------------------------------------------------------------------------------------- evaluation
@dataclass
class EvalSet:
    """Held-out sequences `[n, T + 1]`, the class of each target token and its distance to the previous
    occurrence of the same token within the sequence (0 = first occurrence)."""

    ids: torch.Tensor
    classes: torch.Tensor
    distance: torch.Tensor

    @classmethod
    def make(cls, stream: lm_data.TokenStream, seq_len: int, n: int) -> "EvalSet":
        ids, classes = lm_data.eval_sequences(stream, seq_len, n)
        return cls(ids, classes, lm_data.distance_to_previous(ids))

    def __len__(self) -> int:
        return len(self.ids)


@torch.no_grad()
def evaluate(model, ev: EvalSet, attention: str, *, batch: int = 8, details: bool = False) -> dict:
    """Held-out loss of `model` under `attention`; with `details` also loss per distance bucket, the identifier
    hit rate of the selection (sparse), expert load / MaxVio / class x expert counts."""
    cfg = model.config
    k = cfg.index_topk
    dev = next(model.parameters()).device
    model.eval()
    n_buckets = len(lm_data.distance_buckets(k)) + 1
    loss_sum = torch.zeros(n_buckets, dtype=torch.float64)
    count = torch.zeros(n_buckets, dtype=torch.long)
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    E, C = cfg.n_routed_experts, len(lm_data.TOKEN_CLASSES)
    class_expert = {i: torch.zeros(C, E, dtype=torch.long) for i in moe_layers}
    hits = {i: [0, 0, 0.0] for i in range(cfg.num_hidden_layers)}  # [hits, queries, chance sum]
    total, n_tok = 0.0, 0
    for a in range(0, len(ev), batch):
        ids = ev.ids[a:a + batch].to(dev)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        tap = Tap(selections=details)
        with _autocast(dev):
            logits = model(inputs, attention=attention, mode=MODE_OF[attention],
                           window=k if attention == "window" else None, recorder=tap if details else None)
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets).cpu()
        total += float(nll.sum())
        n_tok += nll.numel()
        if not details:
            continue
        dist = ev.distance[a:a + batch, 1:]  # distance of each target token
        bucket = lm_data.distance_bucket(dist, k)
        loss_sum += torch.bincount(bucket.flatten(), weights=nll.flatten().double(), minlength=n_buckets)
        count += torch.bincount(bucket.flatten(), minlength=n_buckets)
        in_cls = ev.classes[a:a + batch, :-1]  # the class of each input token (what the experts see)
        for i, r in tap.routing.items():
            idx = r.topk_idx.view(*inputs.shape, -1).cpu()
            cls = in_cls.unsqueeze(-1).expand_as(idx)
            class_expert[i].index_put_((cls.flatten(), idx.flatten()), torch.ones(idx.numel(), dtype=torch.long),
                                       accumulate=True)
        tgt_cls = ev.classes[a:a + batch, 1:]
        need = (tgt_cls == lm_data.CLASS_ID["identifier"]) & (dist > k)  # query t-1 predicts target t
        if need.any():
            b_idx, q = need.nonzero(as_tuple=True)  # query positions (the input position before the target)
            src = q + 1 - dist[b_idx, q]  # the previous occurrence of the target token
            for i, sel in tap.selected.items():
                rows = sel[b_idx.to(dev), q.to(dev)].cpu()  # [n, k]
                hits[i][0] += int((rows == src.unsqueeze(-1)).any(-1).sum())
                hits[i][1] += len(q)
                hits[i][2] += float((k / (q + 1).double()).clamp(max=1).sum())
    out = {"attention": attention, "tokens": n_tok, "loss": total / n_tok, "ppl": math.exp(total / n_tok)}
    if details:
        out["bucket_names"] = lm_data.bucket_names(k)
        out["bucket_counts"] = count.tolist()
        out["bucket_loss"] = [float(x / c) if c else None for x, c in zip(loss_sum, count)]
        out["bucket_ppl"] = [math.exp(x) if x is not None else None for x in out["bucket_loss"]]
        if moe_layers:
            load = [class_expert[i].sum(0) for i in moe_layers]
            out["moe_layers"] = moe_layers
            out["load"] = [x.tolist() for x in load]
            out["maxvio"] = [max_violation(x) for x in load]
            out["class_expert"] = [class_expert[i].tolist() for i in moe_layers]
            out["nmi_class_expert"] = [normalised_mutual_information(class_expert[i]) for i in moe_layers]
        if any(h[1] for h in hits.values()):
            layers = sorted(i for i in hits if hits[i][1])
            out["identifier_beyond_window"] = {
                "definition": ("queries t-1 whose target token t is an identifier that occurred before at s with "
                               f"t - s > {k} (outside a {k}-token window): share whose selected keys contain s"),
                "queries": hits[layers[0]][1],
                "hit_rate": [hits[i][0] / hits[i][1] for i in layers],
                "chance": [hits[i][2] / hits[i][1] for i in layers],  # k random visible keys
            }
    return out


DISTANCE_EDGES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@torch.no_grad()
def attention_analysis(model, ev: EvalSet, *, batch: int = 4, max_sequences: int = 32) -> dict:
    """A dense run: per layer, the share of the dense attention mass (head average) kept by the indexer's top-k
    and by a window of the same size, over queries at positions >= k (earlier ones keep everything); the dense
    mass on the previous occurrence of each target token beyond the window; and where the top-k keys lie
    (share of selected keys per query-key distance bin, DISTANCE_EDGES)."""
    cfg = model.config
    k, L = cfg.index_topk, cfg.num_hidden_layers
    dev = next(model.parameters()).device
    model.eval()
    acc = {name: [[] for _ in range(L)] for name in ("recall_indexer", "recall_window")}
    dist_hist = torch.zeros(L, len(DISTANCE_EDGES) - 1, dtype=torch.float64)
    edges = torch.tensor(DISTANCE_EDGES)
    for a in range(0, min(len(ev), max_sequences), batch):
        ids = ev.ids[a:a + batch, :-1].to(dev)
        B, T = ids.shape
        stats = [AttentionStats(need_probs=True, need_index_scores=True) for _ in range(L)]
        with _autocast(dev):
            model(ids, attention="dense", mode=MODE_OF["dense"], stats=stats)
        pos = torch.arange(T, device=dev)
        win = window_selection(pos, k).expand(B, -1, -1)
        rows = pos >= k
        for i, st in enumerate(stats):
            p = st.probs.float().mean(dim=2)  # [B, T, S]
            top = topk_selection(st.index_scores.float(), k, pos)
            acc["recall_indexer"][i].append(attention_recall(p, top)[:, rows].flatten().cpu())
            acc["recall_window"][i].append(attention_recall(p, win)[:, rows].flatten().cpu())
            d = (pos.view(1, T, 1) - top)[:, rows][top[:, rows] >= 0].cpu()
            dist_hist[i] += torch.histogram(d.double(), bins=edges.double()).hist
    out = {name: [float(torch.cat(v).mean()) for v in per] for name, per in acc.items()}
    out["distance_edges"] = list(DISTANCE_EDGES)
    out["selected_distance_share"] = (dist_hist / dist_hist.sum(1, keepdim=True).clamp(min=1)).tolist()
    out["queries_per_layer"] = int(sum(t.numel() for t in acc["recall_indexer"][0]))
    return out


# ---------------------------------------------------------------------------------------------------- inference
class TextInputError(ValueError):
    """A text the model cannot take (empty, or longer than its context); the message says how to fix it."""


@dataclass
class TextAnalysis:
    """One text through the model: its tokens and what the model decided for each.

    pieces      the text slice of each token (''.join(pieces) == text)
    ids         token ids [T]; classes: Python token class of each token [T] (index into TOKEN_CLASSES)
    selected    {layer: [T, k] key positions the indexer selected for each query (-1 = none)}
    experts     {moe layer: [T, num_experts_per_tok] routed experts, best first}
    surprisal   [T] next-token loss in nats (0 for the last token, which has no next token)
    """

    text: str
    pieces: list[str]
    ids: list[int]
    classes: list[int]
    selected: dict[int, list[list[int]]]
    experts: dict[int, list[list[int]]]
    surprisal: list[float]
    window: int

    def top_expert(self, layer: int) -> list[int]:
        return [e[0] for e in self.experts[layer]]

    def selected_keys(self, layer: int, query: int) -> list[int]:
        return sorted(s for s in self.selected[layer][query] if s >= 0)


def check_text(tok, text: str, max_len: int) -> list[int]:
    """The ids of `text`, or TextInputError saying what is wrong with it."""
    if not isinstance(text, str):
        raise TextInputError(f"Expected a string of code or prose, got {type(text).__name__}.")
    if not text.strip():
        raise TextInputError("The text is empty: type or paste some code or prose (at least one character).")
    ids = tok.encode(text).ids
    if len(ids) > max_len:
        cut = tok.encode(text).offsets[max_len - 1][1]
        raise TextInputError(
            f"The text is {len(ids):,} tokens long, but the model's context holds {max_len:,} tokens "
            f"(max_position_embeddings). Shorten it to about {cut:,} characters."
        )
    return ids


@torch.no_grad()
def inspect_text(model, tok, text: str) -> TextAnalysis:
    """Run `text` through the model with sparse attention (as deployed), recording selections and routing."""
    cfg = model.config
    ids = check_text(tok, text, cfg.max_position_embeddings)
    enc = tok.encode(text)
    dev = next(model.parameters()).device
    tap = Tap(selections=True)
    x = torch.tensor([ids], device=dev)
    logits = model(x, attention="sparse", recorder=tap)
    nll = F.cross_entropy(logits[0, :-1].float(), x[0, 1:], reduction="none").tolist() + [0.0]
    T = len(ids)
    return TextAnalysis(
        text=text, pieces=lm_data.token_pieces(text, enc.offsets), ids=ids,
        classes=lm_data.token_classes(text, enc.offsets).tolist(),
        selected={i: s[0].tolist() for i, s in sorted(tap.selected.items())},
        experts={i: r.topk_idx.view(T, -1).tolist() for i, r in sorted(tap.routing.items())},
        surprisal=nll, window=cfg.index_topk,
    )


def load_textlm(path: str | Path, device: str = "cpu"):
    """(model, tokenizer, log) of a folder written by this module: the DSA model through `dslib.load_pretrained`
    (FP8 blocks dequantised to fp32), its tokenizer.json and the training log."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"No text model in {path}: make it with `python -m dslib.lm_train --out {path} --device cuda` (one GPU, "
            "a few minutes), or `--tiny` for a quick CPU run at test size."
        )
    model = load_pretrained(path, device=device, progress=False)
    log = json.loads((path / LOG_FILE).read_text()) if (path / LOG_FILE).is_file() else {}
    return model, lm_data.load_tokenizer(path), log


# ---------------------------------------------------------------------------------------------------- the run
def _save_state(model, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu", torch.bfloat16 if v.is_floating_point() and "bias" not in k else v.dtype)
               .contiguous() for k, v in model.state_dict().items()}, str(path))


def _check_out(out: Path) -> None:
    """Write only into an empty folder or one this command wrote before (never over someone's checkpoint)."""
    if out.exists() and any(out.iterdir()) and not (out / LOG_FILE).exists():
        raise FileExistsError(
            f"{out} is not empty and holds no {LOG_FILE}: it is not a folder this command made. Choose a new --out."
        )


def _machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import tokenizers

        info["tokenizers"] = tokenizers.__version__
    except ImportError:
        pass
    return info


class Run:
    """Bookkeeping of one run: wall clock, the log, partial writes after each stage."""

    def __init__(self, out: Path, s: TrainSettings, device: torch.device, argv: list[str]):
        self.out, self.s, self.device = out, s, device
        self.t0 = time.perf_counter()
        self.log: dict = {"command": "python -m dslib.lm_train " + " ".join(argv), "settings": asdict(s),
                          "machine": _machine(device), "status": "running"}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def say(self, msg: str) -> None:
        print(f"[{self.elapsed():7.1f} s] {msg}", flush=True)

    def flush(self) -> None:
        self.log["wall_s"] = round(self.elapsed(), 1)
        (self.out / LOG_FILE).write_text(json.dumps(self.log, indent=1) + "\n")


def _time_steps(model, opt, stream, s: TrainSettings, device, gen, probe=None, n: int = 3) -> dict[str, float]:
    """Seconds per step, measured on throwaway copies after one untimed step each: "dense" (stage (a)), and the
    variants' lockstep steps of all three models, "lockstep_warmup" (dense + window + indexer warm-up) and
    "lockstep_sparse" (dense + window + sparse); "probe": one held-out probe."""
    twins = [clone(model, opt, s) for _ in range(3)]
    plans = {"dense": ("dense",), "lockstep_warmup": ("dense", "window", "warmup"),
             "lockstep_sparse": ("dense", "window", "sparse")}
    out = {}
    for name, kinds in plans.items():
        for i in range(n + 1):
            ids = lm_data.random_batch(stream, s.batch_size, s.seq_len, gen).to(device)
            if i == 1:
                _sync(device)
                t = time.perf_counter()
            for (m, o), kind in zip(twins, kinds):
                train_step(m, o, ids, kind, lr=s.lr * 0.1, s=s)
        _sync(device)
        out[name] = (time.perf_counter() - t) / n
    if probe is not None:
        probe(twins[0][0], "sparse")
        t = time.perf_counter()
        probe(twins[0][0], "sparse")
        out["probe"] = time.perf_counter() - t
    del twins
    return out


PROBES = 12  # held-out probes per training phase and model (about every tenth of the steps, and the last)


def run(out: str | Path, s: TrainSettings, *, device: str = "cpu", argv: list[str] | None = None,
        keep_stages: bool = False, return_model: bool = False):
    """The whole pipeline (see the module docstring); returns the log (and the trained DSA model, in memory with
    its fp32 weights, if `return_model`)."""
    out = Path(out)
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    R = Run(out, s, dev, argv or [])
    torch.manual_seed(s.seed)
    budget_s = s.minutes * 60

    # -- data and tokenizer
    corpus = lm_data.load_corpus(max_files=s.max_files)
    if len(corpus.train) < 2 or not corpus.eval:
        raise RuntimeError(f"Found only {len(corpus.train)} training and {len(corpus.eval)} held-out .py files under "
                           f"{corpus.root}: this Python's standard library is not there as source files.")
    tok = lm_data.train_tokenizer(corpus.train.values(), s.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    train_stream = lm_data.encode_stream(tok, corpus.train)
    eval_stream = lm_data.encode_stream(tok, corpus.eval, with_classes=True)
    ev = EvalSet.make(eval_stream, s.seq_len, s.eval_sequences)
    R.log["corpus"] = corpus.summary()
    R.log["tokenizer"] = {
        "kind": "byte-level BPE (tokenizers), trained on the training files only", "vocab_size": tok.get_vocab_size(),
        "tokens_train": len(train_stream), "tokens_eval": len(eval_stream),
        "chars_per_token_train": corpus.summary()["chars_train"] / len(train_stream),
        "eval_sequences": len(ev), "eval_tokens": len(ev) * s.seq_len,
    }
    R.say(f"corpus: {len(corpus.train)} training files ({len(train_stream):,} tokens), {len(corpus.eval)} held-out "
          f"({len(eval_stream):,} tokens; {len(ev)} sequences of {s.seq_len} evaluated), vocab {tok.get_vocab_size()}")

    # -- the model
    cfg = s.config()
    model = DeepseekV32ForCausalLM(cfg).to(dev)
    opt = make_optimizer(model, s)
    R.log["config"] = cfg.to_dict()
    R.log["parameters"] = sum(p.numel() for p in model.parameters())
    R.say(f"model: {R.log['parameters'] / 1e6:.2f}M parameters, {cfg.num_hidden_layers} layers, "
          f"index_topk {cfg.index_topk} of {s.seq_len}")
    gen = torch.Generator().manual_seed(s.seed)

    probe = EvalSet(ev.ids[: s.probe_sequences], ev.classes[: s.probe_sequences], ev.distance[: s.probe_sequences])

    def probe_loss(m, attention):  # held-out loss on a few sequences, to see over-fitting if it comes
        loss = evaluate(m, probe, attention, batch=s.eval_batch)["loss"]
        m.train()
        return round(loss, 4)

    # -- step counts: fixed, or from the time budget
    if s.dense_steps is not None and s.compare_steps is not None:
        n_a, n_cmp, per_step = s.dense_steps, s.compare_steps, None
        deadline = float("inf")
    else:
        per_step = _time_steps(model, opt, train_stream, s, dev, torch.Generator().manual_seed(s.seed + 99),
                               probe=probe_loss)
        train_s = budget_s - R.elapsed() - s.eval_reserve_s
        # plan for 85% of it (steps cost a little more in the loop than when timed alone), minus the probes
        plan_s = 0.85 * train_s - PROBES * 4 * per_step["probe"]
        if plan_s <= 0:
            raise RuntimeError(f"--minutes {s.minutes} leaves no time to train after {R.elapsed():.0f} s of setup.")
        f = s.indexer_warmup_share
        n_a = s.dense_steps or max(1, int(s.dense_share * plan_s / per_step["dense"]))
        per_cmp = f * per_step["lockstep_warmup"] + (1 - f) * per_step["lockstep_sparse"]  # one step of all three
        n_cmp = s.compare_steps or max(2, int((plan_s - n_a * per_step["dense"]) / per_cmp))
        deadline = R.elapsed() + train_s  # stop early if the machine turns out slower than measured
        R.say("seconds per step: " + ", ".join(f"{k} {v:.3f}" for k, v in per_step.items()))
        cap = int(s.max_epochs * len(train_stream) / (s.batch_size * s.seq_len))
        if n_a + n_cmp > cap:  # a fast machine: fewer steps, same split, rather than many passes over the corpus
            R.say(f"{n_a + n_cmp} steps would be more than {s.max_epochs:g} passes over the training tokens: "
                  f"capped at {cap}")
            n_a, n_cmp = max(1, round(n_a * cap / (n_a + n_cmp))), max(2, round(n_cmp * cap / (n_a + n_cmp)))
    n_b = max(1, round(s.indexer_warmup_share * n_cmp))
    total = n_a + n_cmp
    R.log["plan"] = {"budget_s": budget_s, "seconds_per_step": per_step, "max_epochs": s.max_epochs,
                     "epochs_per_model": (n_a + n_cmp) * s.batch_size * s.seq_len / len(train_stream),
                     "dense_steps": n_a, "compare_steps": n_cmp,
                     "dsa_warmup_steps": n_b, "dsa_sparse_steps": n_cmp - n_b, "schedule_steps": total,
                     "tokens_per_step": s.batch_size * s.seq_len}
    R.say(f"plan: (a) {n_a} dense steps, then {n_cmp} steps for each variant (dsa: {n_b} indexer warm-up + "
          f"{n_cmp - n_b} sparse)")
    R.flush()
    stages = out / "stages"

    # -- (a) dense training
    curve = {"step": [], "loss": [], "probe_step": [], "probe_loss": []}
    t = time.perf_counter()
    done_a = 0
    for step in range(n_a):
        ids = lm_data.random_batch(train_stream, s.batch_size, s.seq_len, gen).to(dev)
        lm, _ = train_step(model, opt, ids, "dense", lr=lr_at(step, total, s), s=s)
        done_a = step + 1
        if step % s.log_every == 0 or step == n_a - 1:
            curve["step"].append(step)
            curve["loss"].append(round(lm, 4))
        if step % max(1, n_a // 10) == 0 or step == n_a - 1:
            curve["probe_step"].append(step)
            curve["probe_loss"].append(probe_loss(model, "dense"))
            R.say(f"(a) dense step {step:5d}/{n_a}  loss {lm:.3f}  held-out {curve['probe_loss'][-1]:.3f}")
        if R.elapsed() > deadline:
            R.say("(a) stopped early: the time budget is spent")
            break
    R.log["stages"] = {"dense": {"steps": done_a, "wall_s": round(time.perf_counter() - t, 1), "curve": curve}}
    snapshots = {"after (a) dense training": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    _save_state(model, stages / "a_dense.safetensors")
    R.flush()

    # -- the three variants, in lockstep on the same batches
    if per_step is not None:  # if (a) ran slower than measured, fit the variants into the time that is left
        slower = max(1.0, R.log["stages"]["dense"]["wall_s"] / max(1e-9, done_a * per_step["dense"]
                                                                     + PROBES * per_step["probe"]))
        fits = int((0.95 * (deadline - R.elapsed()) - PROBES * 3 * per_step["probe"] * slower) / (per_cmp * slower))
        if fits < n_cmp:
            R.say(f"{n_cmp} steps per variant no longer fit the budget: {max(2, fits)}")
            n_cmp = max(2, fits)
            n_b = max(1, round(s.indexer_warmup_share * n_cmp))
            total = done_a + n_cmp
            R.log["plan"].update(compare_steps=n_cmp, dsa_warmup_steps=n_b, dsa_sparse_steps=n_cmp - n_b,
                                 schedule_steps=total, replanned_after_dense=True, slower_than_timed=slower)
    variants = {name: clone(model, opt, s) for name in VARIANTS}
    del model, opt
    curves = {name: {"step": [], "loss": [], "kl": [], "probe_step": [], "probe_loss": []} for name in VARIANTS}
    t = time.perf_counter()
    done = 0
    for i in range(n_cmp):
        ids = lm_data.random_batch(train_stream, s.batch_size, s.seq_len, gen).to(dev)
        lr = lr_at(done_a + i, total, s)
        for name, (m, o) in variants.items():
            kind = {"dense": "dense", "window": "window"}.get(name) or ("warmup" if i < n_b else "sparse")
            lm, kl = train_step(m, o, ids, kind, lr=lr, s=s)
            if i % s.log_every == 0 or i == n_cmp - 1 or i == n_b - 1:
                curves[name]["step"].append(done_a + i)
                curves[name]["loss"].append(round(lm, 4))
                curves[name]["kl"].append(round(kl, 4))
        done = i + 1
        if i == n_b - 1:
            snapshots["after (b) indexer warm-up"] = {k: v.detach().cpu().clone()
                                                      for k, v in variants["dsa"][0].state_dict().items()}
            _save_state(variants["dsa"][0], stages / "b_warmup.safetensors")
        if i % max(1, n_cmp // 10) == 0 or i == n_cmp - 1:
            for n, (m, _) in variants.items():
                curves[n]["probe_step"].append(done_a + i)
                curves[n]["probe_loss"].append(probe_loss(m, ATTENTION_OF[n]))
            R.say(f"variants step {i:5d}/{n_cmp}  " + "  ".join(
                f"{n} {curves[n]['loss'][-1]:.3f}/{curves[n]['probe_loss'][-1]:.3f}"
                + (f" (kl {curves[n]['kl'][-1]:.3f})" if n == "dsa" else "") for n in VARIANTS)
                + "  (train / held-out loss)")
        if R.elapsed() > deadline:
            R.say(f"variants stopped early at step {done}: the time budget is spent (all variants at {done} steps)")
            break
    R.log["stages"]["variants"] = {"steps": done, "dsa_warmup_steps": min(done, n_b),
                                   "dsa_sparse_steps": max(0, done - n_b), "wall_s": round(time.perf_counter() - t, 1),
                                   "curves": curves, "stopped_early": done < n_cmp or done_a < n_a}
    for name, (m, _) in variants.items():
        _save_state(m, stages / f"c_{name}.safetensors")
    R.flush()

    # -- evaluation on the held-out files
    R.say("evaluating")
    t = time.perf_counter()
    models = {name: m.eval() for name, (m, _) in variants.items()}
    del variants
    results: dict = {"matrix": {}, "by_variant": {}}
    # the same measure on training sequences: the gap to the held-out loss shows how much the model memorised
    train_sample = EvalSet.make(train_stream, s.seq_len, max(2, s.probe_sequences * 2))
    for name, m in models.items():
        results["matrix"][name] = {}
        for att in ("dense", "sparse", "window"):
            detailed = att == ATTENTION_OF[name] or (name == "dense" and att == "sparse")
            r = evaluate(m, ev, att, batch=s.eval_batch, details=detailed)
            results["matrix"][name][att] = {"loss": r["loss"], "ppl": r["ppl"]}
            if att == ATTENTION_OF[name]:
                results["by_variant"][name] = r
            elif detailed:  # the dense model's untrained indexer, used for selection
                results["untrained_indexer_sparse"] = r
        results.setdefault("train_sample_loss", {})[name] = evaluate(m, train_sample, ATTENTION_OF[name],
                                                                       batch=s.eval_batch)["loss"]
        R.say(f"{name:6s} " + "  ".join(f"{a} {v['loss']:.3f}" for a, v in results["matrix"][name].items())
              + f"  (training-set sample: {results['train_sample_loss'][name]:.3f})")
    dsa = models["dsa"]
    analysis = {}
    for label, state in snapshots.items():  # the indexer before training, after the warm-up
        twin = copy.deepcopy(dsa)
        twin.load_state_dict({k: v.to(dev) for k, v in state.items()})
        analysis[label] = attention_analysis(twin, ev, batch=max(1, s.eval_batch // 2))
        del twin
    analysis["after (c) sparse training"] = attention_analysis(dsa, ev, batch=max(1, s.eval_batch // 2))
    results["attention_analysis"] = analysis
    results["distance_definition"] = (
        "distance of a target token = t - s, s the last earlier position in the same 1,024-token held-out sequence "
        "holding the same token id; 'first occurrence' = none. The query predicting t sits at t - 1, so a window "
        f"of {cfg.index_topk} keys reaches the previous occurrence iff distance <= {cfg.index_topk}.")
    results["eval_wall_s"] = round(time.perf_counter() - t, 1)
    R.log["results"] = results
    R.flush()

    # -- the artifact: the DSA model in the official layout (FP8 blocks), its tokenizer, the log
    for old in out.glob("*.safetensors"):
        old.unlink()
    save_pretrained(dsa, out, fp8=True, dtype=torch.bfloat16, overwrite=True, progress=False)
    R.log["artifact"] = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    if not keep_stages:
        shutil.rmtree(stages, ignore_errors=True)
    R.log["status"] = "done"
    R.flush()
    R.log["artifact"][LOG_FILE] = (out / LOG_FILE).stat().st_size
    R.flush()
    size = sum(R.log["artifact"].values())
    R.say(f"wrote {out}: {', '.join(f'{k} {v / 1e6:.2f} MB' for k, v in R.log['artifact'].items())} "
          f"({size / 1e6:.1f} MB)")
    return (R.log, dsa) if return_model else R.log


def summary_table(log: dict) -> str:
    """The main numbers of a log as a few lines of text."""
    r = log["results"]
    lines = ["held-out loss (nats/token), rows = model, columns = attention:"]
    lines.append(f"{'':8s}" + "".join(f"{a:>10s}" for a in ("dense", "sparse", "window")))
    for name, row in r["matrix"].items():
        lines.append(f"{name:8s}" + "".join(f"{row[a]['loss']:10.3f}" for a in ("dense", "sparse", "window")))
    names = r["by_variant"]["dsa"]["bucket_names"]
    lines.append("loss by distance to the previous occurrence: " + ", ".join(names))
    for name, v in r["by_variant"].items():
        lines.append(f"  {name:7s}" + "".join(f"{x:8.3f}" if x is not None else "     n/a" for x in v["bucket_loss"]))
    a = r["attention_analysis"]["after (c) sparse training"]
    lines.append("indexer recall of dense attention mass per layer: "
                 + ", ".join(f"{x:.3f}" for x in a["recall_indexer"])
                 + " (window: " + ", ".join(f"{x:.3f}" for x in a["recall_window"]) + ")")
    idf = r["by_variant"]["dsa"].get("identifier_beyond_window")
    if idf:
        lines.append(f"identifiers beyond the window ({idf['queries']} queries): indexer selects the previous "
                     "occurrence " + ", ".join(f"{x:.1%}" for x in idf["hit_rate"]) + " (chance "
                     + ", ".join(f"{x:.1%}" for x in idf["chance"]) + ")")
    raw = r.get("untrained_indexer_sparse", {}).get("identifier_beyond_window")
    if raw:
        lines.append("  the same with the dense model's untrained indexer: "
                     + ", ".join(f"{x:.1%}" for x in raw["hit_rate"]))
    if "train_sample_loss" in r:
        lines.append("loss on a sample of training sequences (memorisation check): "
                     + ", ".join(f"{n} {v:.3f}" for n, v in r["train_sample_loss"].items()))
    dsa = r["by_variant"]["dsa"]
    if "nmi_class_expert" in dsa:
        lines.append("expert x token class NMI per MoE layer: " + ", ".join(f"{x:.3f}" for x in dsa["nmi_class_expert"])
                     + "; MaxVio " + ", ".join(f"{x:.2f}" for x in dsa["maxvio"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/textlm", help="folder for the artifact and the log")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=float, default=TrainSettings.minutes,
                        help="wall-clock budget of the whole command; step counts follow from it (default 6.5)")
    parser.add_argument("--tiny", action="store_true", help="test size, fixed few steps (CPU, seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dense-steps", type=int, help="fixed steps for stage (a) (with --compare-steps: no budget)")
    parser.add_argument("--compare-steps", type=int, help="fixed steps for each variant after (a)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--keep-stages", action="store_true", help="keep the per-stage weights in OUT/stages/")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    make = TrainSettings.tiny_run if args.tiny else TrainSettings
    fields = dict(seed=args.seed, minutes=args.minutes)
    if args.dense_steps is not None:
        fields["dense_steps"] = args.dense_steps
    if args.compare_steps is not None:
        fields["compare_steps"] = args.compare_steps
    s = make(**fields)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device: use --device cpu (slow) or run on a GPU machine.")
    log = run(args.out, s, device=args.device, argv=argv, keep_stages=args.keep_stages)
    print(summary_table(log), flush=True)


if __name__ == "__main__":
    main()
