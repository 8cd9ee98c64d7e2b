"""A small DSA language model, its three training stages and the recall experiment (chapter 3).

    python -m dslib.train --out data          # seeded; writes data/ch3_recall_*.safetensors + data/ch3_recall.json

1. Dense training: a 2-layer model whose attention is `DSAttention` (MLA + indexer) run with
   attention="dense" learns the multi-query recall task (`dslib.tasks`). The indexer is not trained yet.
2. Indexer warm-up (the paper's dense stage): main model frozen, dense attention; every layer's indexer learns
   KL( p ‖ softmax(I) ), p = that layer's attention summed over heads and L1-normalised.
3. Sparse training (the paper's sparse stage): attention restricted to the indexer's top-k; the model learns
   from the language-model loss, the indexer (inputs detached) from the KL over its selected set only.

Honest notes (also in the notebook):
- The model has *token shift*: the input at position t is E[x_t] + E'[x_{t-1}] (a width-2 causal convolution
  over embeddings, as in MQAR studies). A 2-layer attention-only model without it barely learns the task on a CPU
  budget; with it one attention layer can match "key followed by value" pairs directly.
- By default the KL of stage 1 is averaged over the positions that carry the task loss (the 16 query positions
  per sequence), not over all positions as in the paper, where every token has a language-model loss. Here the
  other positions predict random filler and their attention is noise the indexer would waste capacity on.
  `--kl-positions all` runs the paper's version.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dslib.attention import DecoderLayer, FeedForward, RMSNorm
from dslib.config import ModelConfig
from dslib.indexer import attention_target, indexer_kl_loss, take_rows
from dslib.sparse import AttentionStats, DSAttention, attention_recall, topk_selection, window_selection
from dslib.tasks import IGNORE, RecallBatch, RecallTask, accuracy_by_distance, eval_set, make_batch

ARTIFACT = "ch3_recall"  # data/ch3_recall_{stage}.safetensors and data/ch3_recall.json
STAGES = ("dense", "warmup", "sparse")
WINDOW = "window"  # the baseline variant: the dense checkpoint trained as long as the sparse stage, with a window


def experiment_config(task: RecallTask | None = None, **overrides) -> ModelConfig:
    """The experiment's model: 2 layers, d = 64, 2 MLA heads (latent 64, nope 32 + rope 16, v 32), SwiGLU 128,
    4 indexer heads x 32 dims, index_topk 32, plain RoPE (~200k parameters). task: default `RecallTask()`."""
    task = task or RecallTask()
    base = dict(
        vocab_size=task.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        first_k_dense_replace=2, num_nextn_predict_layers=0, num_attention_heads=2, num_key_value_heads=2,
        q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        index_n_heads=4, index_head_dim=32, index_topk=32, max_position_embeddings=1024, rope_scaling=None,
        bos_token_id=0, eos_token_id=None, torch_dtype="float32",
    )
    base.update(overrides)
    return ModelConfig(**base)


# -------------------------------------------------------------------------------------------------- the model
class RecallModel(nn.Module):
    """A tiny causal LM: token-shift embeddings -> `num_hidden_layers` decoder layers (chapter 1's `DecoderLayer`
    with `DSAttention` and a SwiGLU `FeedForward`) -> RMSNorm -> lm_head."""

    def __init__(self, config: ModelConfig, *, token_shift: bool = True):
        super().__init__()
        self.config = config
        self.token_shift = token_shift
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        # E'[x_{t-1}]: a width-2 causal convolution over the embeddings (see the module docstring)
        self.embed_previous = nn.Embedding(config.vocab_size, d) if token_shift else None
        self.layers = nn.ModuleList(
            DecoderLayer(DSAttention(config, i), FeedForward(d, config.intermediate_size), d, config.rms_norm_eps)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(d, config.rms_norm_eps)
        # PyTorch's default initialisation (unit-variance embeddings, fan-in-scaled linears): with GPT-style
        # std 0.02 the stacked MLA projections start with near-zero scores and the task takes far longer to learn.
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)  # [B, T, d]
        if self.embed_previous is not None:
            prev = F.pad(tokens[:, :-1], (1, 0), value=self.config.bos_token_id or 0)  # x_{t-1}, BOS before the start
            x = x + self.embed_previous(prev)
        return x

    def forward(self, tokens: torch.Tensor, attention: str = "dense", *, mode: str = "absorbed",
                window: int | None = None, stats: list[AttentionStats] | None = None, recorder=None) -> torch.Tensor:
        """tokens `[B, T]` -> logits `[B, T, vocab]`; every layer runs `DSAttention.forward` with these options.
        `stats`: one `AttentionStats` per layer (what the indexer's training and the analyses read)."""
        x = self.embed(tokens)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, attention=attention, mode=mode, window=window, recorder=recorder,
                      stats=stats[i] if stats is not None else None)
        return self.lm_head(self.norm(x))

    def stats(self, **request) -> list[AttentionStats]:
        """One `AttentionStats(**request)` per layer, for `forward(..., stats=)`."""
        return [AttentionStats(**request) for _ in self.layers]

    def indexer_parameters(self):
        return [p for n, p in self.named_parameters() if ".indexer." in n]

    def main_parameters(self):
        return [p for n, p in self.named_parameters() if ".indexer." not in n]


def query_rows(batch: RecallBatch) -> torch.Tensor:
    """`[B, n_pairs]` positions of the queries of each sequence (every sequence has the same number)."""
    B = len(batch)
    return batch.query_mask.nonzero()[:, 1].view(B, -1)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the positions with a target (the query positions)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def query_correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """bool per query position (1-D): did the argmax hit the target."""
    mask = targets != IGNORE
    return logits.argmax(-1)[mask] == targets[mask]


# ------------------------------------------------------------------------------------------------ training
@dataclass
class StageLog:
    """What a training stage did: per-step numbers (every `every` steps) and its cost."""

    stage: str
    steps: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    every: int = 10
    loss: list = field(default_factory=list)
    acc: list = field(default_factory=list)
    kl: list = field(default_factory=list)


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def train_stage(
    model: RecallModel,
    task: RecallTask,
    stage: str,
    *,
    steps: int,
    lr: float = 3e-3,
    lr_indexer: float = 1e-3,
    batch_size: int = 32,
    warmup: int = 100,
    seed: int = 0,
    target_acc: float | None = None,
    kl_positions: str = "task",
    window: int | None = None,
    progress: bool = True,
) -> StageLog:
    """Run one stage. stage:

    "dense":   attention="dense", all main parameters on the LM loss (the indexer is left alone);
    "warmup":  main model frozen, attention="dense", indexers on the dense KL (lr);
    "sparse":  attention="sparse", main model on the LM loss (lr), indexers on the selected-set KL (lr_indexer);
    "window":  attention="window", main model on the LM loss (can a model learn to live with a window?).

    AdamW (0.9, 0.98), weight decay 0.01, linear warm-up then cosine, gradient clipping 1.0, fresh random batches
    from a seeded generator. Stops early once the moving average of query accuracy reaches `target_acc`.
    """
    if stage not in ("dense", "warmup", "sparse", "window"):
        raise ValueError(f"unknown stage {stage!r}")
    if kl_positions not in ("task", "all"):
        raise ValueError(f"kl_positions must be 'task' or 'all', got {kl_positions!r}")
    gen = torch.Generator().manual_seed(seed)
    train_main = stage in ("dense", "sparse", "window")
    train_index = stage in ("warmup", "sparse")
    for p in model.main_parameters():
        p.requires_grad_(train_main)
    for p in model.indexer_parameters():
        p.requires_grad_(train_index)
    groups = []
    if train_main:
        groups.append({"params": model.main_parameters(), "lr": lr})
    if train_index:
        groups.append({"params": model.indexer_parameters(), "lr": lr if stage == "warmup" else lr_indexer})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=0.01)
    base_lrs = [g["lr"] for g in groups]
    attention = {"dense": "dense", "warmup": "dense", "sparse": "sparse", "window": "window"}[stage]
    log = StageLog(stage)
    t0, c0 = time.perf_counter(), time.process_time()
    model.train()
    avg_acc = None
    for step in _progress(range(steps), progress, f"stage {stage}"):
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * _schedule(step, steps, warmup)
        batch = make_batch(task, batch_size, gen)
        # the task's KL only needs the query rows: score just those (each sequence has n_pairs of them)
        rows = query_rows(batch) if train_index and kl_positions == "task" else None
        stats = model.stats(need_probs=train_index, need_index_scores=train_index, rows=rows)
        logits = model(batch.tokens, attention, window=window, stats=stats)
        loss = lm_loss(logits, batch.targets)
        kl = torch.zeros(())
        for s in stats if train_index else ():
            if stage == "warmup":  # dense: KL over all causal keys
                kl = kl + indexer_kl_loss(attention_target(s.probs), s.index_scores)
            else:  # sparse: KL over the selected set only
                sel = s.selected if rows is None else take_rows(s.selected, rows)  # [B, T or P, k]
                scores_sel = s.index_scores.gather(-1, sel.clamp(min=0)).masked_fill(sel < 0, float("-inf"))
                kl = kl + indexer_kl_loss(attention_target(s.probs), scores_sel)
        total = (loss if train_main else 0) + (kl if train_index else 0)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        acc = query_correct(logits.detach(), batch.targets).float().mean().item()
        avg_acc = acc if avg_acc is None else 0.95 * avg_acc + 0.05 * acc
        if step % log.every == 0:
            log.loss.append(round(loss.item(), 5))
            log.acc.append(round(acc, 5))
            log.kl.append(round(kl.item(), 5))
        log.steps = step + 1
        if not progress and step % 50 == 0:
            print(f"  {stage} step {step:5d}  loss {loss.item():.4f}  acc {acc:.3f} (avg {avg_acc:.3f})  "
                  f"kl {kl.item():.4f}"
                  f"  {time.perf_counter() - t0:6.1f} s", flush=True)
        if target_acc is not None and step >= warmup and avg_acc >= target_acc:
            break
    log.wall_s, log.cpu_s = time.perf_counter() - t0, time.process_time() - c0
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return log


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: RecallModel, batch: RecallBatch, attention: str, *, window: int | None = None,
             batch_size: int = 64) -> dict:
    """Accuracy at the query positions with the given attention in every layer, overall and by distance;
    for selections also the hit rate: how often the token to recall (the value) was among the selected keys."""
    model.eval()
    correct, dist, hits = [], [], [[] for _ in model.layers]
    for start in range(0, len(batch), batch_size):
        b = batch.slice(start, start + batch_size)
        stats = model.stats()
        logits = model(b.tokens, attention, window=window, stats=stats)
        correct.append(query_correct(logits, b.targets))
        qm = b.query_mask
        dist.append(b.distance[qm])
        for layer, s in enumerate(stats):
            if s.selected is not None:
                hit = (s.selected == b.source.unsqueeze(-1)).any(-1)  # [B, T]
                hits[layer].append(hit[qm])
    correct, dist = torch.cat(correct), torch.cat(dist)
    out = {
        "attention": attention,
        "k": (window or model.config.index_topk) if attention != "dense" else None,
        "accuracy": float(correct.float().mean()),
        "queries": int(correct.numel()),
        "by_distance": accuracy_by_distance(correct, dist),
    }
    if hits[0]:
        out["hit_rate"] = [float(torch.cat(h).float().mean()) for h in hits]
    return out


@torch.no_grad()
def attention_analysis(model: RecallModel, batch: RecallBatch, *, k: int | None = None, window: int | None = None,
                       batch_size: int = 32) -> dict:
    """Per layer, at the query positions of a *dense* run: the share of the dense attention mass kept by the
    indexer's top-k and by the window (attention recall), the dense mass on the token to recall, and how often
    each selection contains that token."""
    k = k or model.config.index_topk
    window = window or k
    L = len(model.layers)
    acc = {name: [[] for _ in range(L)] for name in ("recall_indexer", "recall_window", "mass_on_source",
                                                    "hit_indexer", "hit_window")}
    for start in range(0, len(batch), batch_size):
        b = batch.slice(start, start + batch_size)
        rows = query_rows(b)  # [B, P]: only the query rows are analysed
        stats = model.stats(need_probs=True, need_index_scores=True, rows=rows)
        model(b.tokens, "dense", stats=stats)
        src = b.source.gather(1, rows).unsqueeze(-1)  # [B, P, 1]
        win = window_selection(rows, window)  # [B, P, window]
        for layer, s in enumerate(stats):
            p = s.probs.float().mean(dim=2)  # [B, P, S] head average
            top = topk_selection(s.index_scores, k, rows)
            acc["recall_indexer"][layer].append(attention_recall(p, top).flatten())
            acc["recall_window"][layer].append(attention_recall(p, win).flatten())
            acc["mass_on_source"][layer].append(p.gather(-1, src).flatten())
            acc["hit_indexer"][layer].append((top == src).any(-1).flatten())
            acc["hit_window"][layer].append((win == src).any(-1).flatten())
    return {name: [float(torch.cat(v).float().mean()) for v in per_layer] for name, per_layer in acc.items()}


@torch.no_grad()
def inspect_sequence(model: RecallModel, tokens: torch.Tensor) -> dict:
    """For one sequence `[T]` (or `[1, T]`): per layer the dense attention (head average) `[T, S]` and the index
    scores `[T, S]`, for the interactive views."""
    tokens = tokens.view(1, -1)
    stats = model.stats(need_probs=True, need_index_scores=True)
    model(tokens, "dense", stats=stats)
    return {
        "probs": [s.probs[0].float().mean(dim=1) for s in stats],  # [T, S] per layer
        "index_scores": [s.index_scores[0] for s in stats],
    }


# --------------------------------------------------------------------------------------------- checkpoints
def save_model(model: RecallModel, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": json.dumps(model.config.to_dict()), "token_shift": str(model.token_shift)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return path


def load_model(path: str | Path) -> RecallModel:
    """A `RecallModel` from a file written by `save_model` (config stored in the file's metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No checkpoint at {path}. Make it with `python -m dslib.train --out {path.parent}` (a few minutes on CPU)."
        )
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path} has no config in its metadata: it was not written by dslib.train.save_model.")
    cfg = ModelConfig.from_dict(json.loads(meta["config"]), source=str(path))
    model = RecallModel(cfg, token_shift=meta.get("token_shift", "True") == "True")
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def artifact_paths(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    paths = {stage: out / f"{ARTIFACT}_{stage}.safetensors" for stage in (*STAGES, WINDOW)}
    paths["log"] = out / f"{ARTIFACT}.json"
    return paths


def train_window_variant(out: str | Path, *, seed: int = 0, task: RecallTask | None = None, steps: int = 300,
                         eval_size: int = 512, progress: bool = True) -> tuple[StageLog, dict]:
    """The fair baseline: the dense-stage checkpoint trained `steps` more steps with a sliding window of
    `index_topk` keys in every layer (the sparse stage's budget and schedule), saved as `ch3_recall_window`, and
    evaluated like the sparse model (dense, window k, window 2k, attention analysis)."""
    task = task or RecallTask()
    paths = artifact_paths(out)
    model = load_model(paths["dense"])
    k = model.config.index_topk
    log = train_stage(model, task, "window", steps=steps, lr=3e-4, seed=seed + 3, warmup=30, window=k,
                      progress=progress)
    save_model(model, paths[WINDOW])
    ev = eval_set(task, eval_size)
    m = load_model(paths[WINDOW])
    result = {
        "dense": evaluate(m, ev, "dense"),
        "window": evaluate(m, ev, "window", window=k),
        "window_2k": evaluate(m, ev, "window", window=2 * k),
        "analysis": attention_analysis(m, ev, k=k),
    }
    return log, result


# ---------------------------------------------------------------------------------------------- experiment
def run_experiment(out: str | Path, *, seed: int = 0, task: RecallTask | None = None, dense_steps: int = 2000,
                   warmup_steps: int = 300, sparse_steps: int = 300, kl_positions: str = "task",
                   eval_size: int = 512, progress: bool = True) -> dict:
    """The whole pipeline: dense training, indexer warm-up, sparse training, evaluation; writes into `out`."""
    task = task or RecallTask()
    torch.manual_seed(seed)
    paths = artifact_paths(out)
    cfg = experiment_config(task)
    model = RecallModel(cfg)
    logs, results = {}, {}
    logs["dense"] = train_stage(model, task, "dense", steps=dense_steps, lr=3e-3, seed=seed, target_acc=0.985,
                                progress=progress)
    save_model(model, paths["dense"])
    logs["warmup"] = train_stage(model, task, "warmup", steps=warmup_steps, lr=3e-3, seed=seed + 1,
                                 kl_positions=kl_positions, progress=progress)
    save_model(model, paths["warmup"])
    logs["sparse"] = train_stage(model, task, "sparse", steps=sparse_steps, lr=3e-4, lr_indexer=1e-3, seed=seed + 2,
                                 warmup=30, kl_positions=kl_positions, progress=progress)
    save_model(model, paths["sparse"])
    logs[WINDOW], window_result = train_window_variant(out, seed=seed, task=task, steps=sparse_steps,
                                                       eval_size=eval_size, progress=progress)
    ev = eval_set(task, eval_size)
    k = cfg.index_topk
    t0 = time.perf_counter()
    for stage in STAGES:
        m = load_model(paths[stage])
        results[stage] = {
            "dense": evaluate(m, ev, "dense"),
            "sparse": evaluate(m, ev, "sparse"),
            "window": evaluate(m, ev, "window", window=k),
            "window_2k": evaluate(m, ev, "window", window=2 * k),
            "analysis": attention_analysis(m, ev, k=k),
        }
    results[WINDOW] = window_result
    eval_s = time.perf_counter() - t0
    record = {
        "command": f"python -m dslib.train --out {out} --seed {seed} --threads {torch.get_num_threads()}"
                   + (" --kl-positions all" if kl_positions == "all" else ""),
        "seed": seed,
        "task": asdict(task),
        "config": cfg.to_dict(),
        "kl_positions": kl_positions,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "stages": {name: asdict(log) for name, log in logs.items()},
        "eval_seconds": eval_s,
        "results": results,
    }
    paths["log"].write_text(json.dumps(record, indent=1))
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train the chapter-3 recall model (dense, indexer warm-up, sparse).")
    parser.add_argument("--out", default="data", help="folder for the checkpoints and the JSON log (default: data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dense-steps", type=int, default=2000, help="upper bound; stops at 98.5%% moving accuracy")
    parser.add_argument("--warmup-steps", type=int, default=300)
    parser.add_argument("--sparse-steps", type=int, default=300)
    parser.add_argument("--kl-positions", choices=("task", "all"), default="task")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--window-only", action="store_true",
                        help="only (re)train the window baseline from the dense checkpoint in --out and add it to the "
                             "JSON log (the other stages are left as they are)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.window_only:
        paths = artifact_paths(args.out)
        record = json.loads(paths["log"].read_text())
        log, result = train_window_variant(args.out, seed=args.seed, steps=args.sparse_steps,
                                           progress=not args.no_progress)
        record["stages"][WINDOW] = asdict(log)
        record["results"][WINDOW] = result
        record["window_command"] = (f"python -m dslib.train --out {args.out} --seed {args.seed} "
                                    f"--threads {torch.get_num_threads()} --window-only")
        paths["log"].write_text(json.dumps(record, indent=1))
        print(f"window  {log.steps:5d} steps  {log.wall_s:6.1f} s wall; window accuracy "
              f"{result['window']['accuracy']:.4f}, window 2k {result['window_2k']['accuracy']:.4f}")
        return
    rec = run_experiment(args.out, seed=args.seed, dense_steps=args.dense_steps, warmup_steps=args.warmup_steps,
                         sparse_steps=args.sparse_steps, kl_positions=args.kl_positions, progress=not args.no_progress)
    for name, st in rec["stages"].items():
        print(f"{name:7s} {st['steps']:5d} steps  {st['wall_s']:6.1f} s wall  {st['cpu_s']:6.1f} s CPU")
    final = rec["results"]["sparse"]
    for att in ("dense", "sparse", "window", "window_2k"):
        print(f"{att:10s} accuracy {final[att]['accuracy']:.4f}")


if __name__ == "__main__":
    main()
