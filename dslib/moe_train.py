"""The chapter-4 experiment: a small MoE language model trained on a mixture of tasks, five ways (chapter 4).

    python -m dslib.moe_train --out data          # seeded; writes data/moe/ (one checkpoint per setting + one log)
    python -m dslib.moe_train --out data --settings aux_small aux_batch   # just those, merged into the log

(~3 CPU-minutes per setting; the settings run in parallel processes, one per core.)

The same model is trained once per balancing setting:

    none       no balancing: the router is free to overload a few experts
    aux        DeepSeek-V3's sequence-wise auxiliary loss  alpha * sum_i f_i P_i  added to the LM loss, alpha 0.01
    aux_small  the same with DeepSeek-V3's own alpha = 1e-4
    aux_batch  the same loss with f and P counted over the whole batch instead of each sequence, alpha 0.01
    bias       auxiliary-loss-free balancing: after each step  b_i += gamma * sign(mean load - load_i)

Data: eight distinct sequence-to-sequence tasks (copy, reverse, sort, ...), one per sequence, named by a task token;
the loss counts only the answer tokens. A fixed evaluation set measures, every `eval_every` steps, the load of each
expert and its MaxVio; at the end, quality (loss, accuracy per task), which experts each task uses, and how many
expert groups ("nodes") tokens reach with and without the group limit.

The model is a miniature DeepSeek: each layer is chapter 1's `DecoderLayer` with chapter 2's `dslib.mla.MLA` and
`dslib.moe.MoE`, unchanged.
One addition: a learned absolute position embedding (DeepSeek has none), because MLA's RoPE sees only relative
offsets and tasks like "reverse" need to know where the answer starts.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dslib.attention import DecoderLayer, RMSNorm
from dslib.config import ModelConfig
from dslib.mla import MLA
from dslib.moe import (
    MoE,
    Routing,
    expert_load,
    groups_touched,
    max_violation,
    select_experts,
    sequence_aux_loss,
    update_bias,
)

IGNORE = -100  # targets that carry no loss (cross_entropy's ignore_index)

# ---------------------------------------------------------------------------------------------------- the tasks
TASKS = ("copy", "reverse", "shift", "swap_pairs", "sort", "running_max", "complement", "bracket_depth")
TASK_HELP = {
    "copy": "letters -> the same letters",
    "reverse": "letters -> reversed",
    "shift": "letters -> each letter + 3 (Caesar)",
    "swap_pairs": "letters -> neighbours swapped (ab cd -> ba dc)",
    "sort": "digits -> sorted",
    "running_max": "digits -> maximum so far",
    "complement": "digits -> 9 - digit",
    "bracket_depth": "brackets -> nesting depth after each",
}
N_ITEMS = 15  # input and answer length: [task] x_1..x_15 [SEP] y_1..y_15 = 32 tokens
SEQ_LEN = 2 * N_ITEMS + 2
PAD, SEP = 0, 1
TASK0 = 2  # task tokens 2..9
DIGIT0 = TASK0 + len(TASKS)  # digits 10..19
LETTER0 = DIGIT0 + 10  # letters 20..45
OPEN, CLOSE = LETTER0 + 26, LETTER0 + 27  # '(' and ')'
VOCAB = CLOSE + 1
MAX_DEPTH = 9


def _answer(task: str, x: torch.Tensor) -> torch.Tensor:
    """The answer tokens of one task for a batch of inputs x [n, N_ITEMS] (token ids)."""
    if task == "copy":
        return x.clone()
    if task == "reverse":
        return x.flip(-1)
    if task == "shift":
        return LETTER0 + (x - LETTER0 + 3) % 26
    if task == "swap_pairs":
        y = x.clone()
        y[:, 0:-1:2], y[:, 1::2] = x[:, 1::2], x[:, 0:-1:2]  # the 15th item stays in place
        return y
    d = x - DIGIT0
    if task == "sort":
        return DIGIT0 + d.sort(-1).values
    if task == "running_max":
        return DIGIT0 + d.cummax(-1).values
    if task == "complement":
        return DIGIT0 + 9 - d
    if task == "bracket_depth":
        step = torch.where(x == OPEN, 1, -1)
        return DIGIT0 + step.cumsum(-1)
    raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")


def _inputs(task: str, n: int, g: torch.Generator) -> torch.Tensor:
    if task in ("copy", "reverse", "shift", "swap_pairs"):
        return LETTER0 + torch.randint(0, 26, (n, N_ITEMS), generator=g)
    if task == "bracket_depth":  # a random walk of opens and closes that stays within depth 0..MAX_DEPTH
        coins = torch.rand(n, N_ITEMS, generator=g) < 0.5
        x = torch.empty(n, N_ITEMS, dtype=torch.long)
        depth = torch.zeros(n, dtype=torch.long)
        for i in range(N_ITEMS):  # a loop over 15 positions, vectorised over the batch
            opens = (coins[:, i] | (depth == 0)) & (depth < MAX_DEPTH)
            x[:, i] = torch.where(opens, OPEN, CLOSE)
            depth += torch.where(opens, 1, -1)
        return x
    return DIGIT0 + torch.randint(0, 10, (n, N_ITEMS), generator=g)


def make_batch(n: int, g: torch.Generator, tasks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n sequences [n, SEQ_LEN] and their task ids [n]; tasks drawn uniformly unless given."""
    if tasks is None:
        tasks = torch.randint(0, len(TASKS), (n,), generator=g)
    seqs = torch.empty(n, SEQ_LEN, dtype=torch.long)
    for t, name in enumerate(TASKS):
        rows = (tasks == t).nonzero().flatten()
        if len(rows):
            x = _inputs(name, len(rows), g)
            seqs[rows] = torch.cat(
                [torch.full((len(rows), 1), TASK0 + t), x, torch.full((len(rows), 1), SEP), _answer(name, x)], 1
            )
    return seqs, tasks


def inputs_and_targets(seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token prediction on the answer only: inputs seqs[:, :-1], targets seqs[:, 1:] with IGNORE before SEP."""
    inputs, targets = seqs[:, :-1], seqs[:, 1:].clone()
    targets[:, : N_ITEMS + 1] = IGNORE  # positions 0..N_ITEMS predict the task's input: no loss
    return inputs, targets


def describe(seq: torch.Tensor) -> str:
    """A sequence of token ids as text, e.g. 'reverse: abc | cba'."""
    def tok(i: int) -> str:
        if i == SEP:
            return " | "
        if TASK0 <= i < DIGIT0:
            return TASKS[i - TASK0] + ": "
        if DIGIT0 <= i < LETTER0:
            return str(i - DIGIT0)
        if LETTER0 <= i < OPEN:
            return chr(ord("a") + i - LETTER0)
        return {OPEN: "(", CLOSE: ")", PAD: "_"}[i]
    return "".join(tok(int(i)) for i in seq)


# ---------------------------------------------------------------------------------------------------- the model
def model_config(**overrides) -> ModelConfig:
    """The experiment's model: 2 layers of MLA + MoE, d = 64, 32 routed experts in 8 groups, 8 per token from
    <= 4 groups, 1 shared expert. The routing shape is DeepSeek-V3.2's divided by 8; MLA has `ModelConfig.tiny`'s
    sizes (4 heads, q/kv latent ranks 32/16, plain RoPE)."""
    base = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, first_k_dense_replace=0, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=16,
        n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
        routed_scaling_factor=1.0, max_position_embeddings=SEQ_LEN,
        index_topk=SEQ_LEN,
    )
    base.update(overrides)
    return ModelConfig.tiny(**base)


class MoELM(nn.Module):
    """Token + position embedding, `num_hidden_layers` decoder layers (chapter 1's `DecoderLayer` with MLA and MoE),
    final norm, LM head.

    forward(tokens [B, T], recorder=None) -> logits [B, T, vocab]; `recorder.on_routing(layer_idx=, routing=)` per
    MoE layer (e.g. a `RoutingLog`).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        # Learned absolute positions, also with MLA: its RoPE sees only relative offsets, and tasks such as
        # "reverse" need to know where the answer is (DeepSeek itself has no position embedding).
        self.embed_positions = nn.Embedding(config.max_position_embeddings, d)
        self.layers = nn.ModuleList(
            DecoderLayer(MLA(config, i), MoE(config, i), d, config.rms_norm_eps)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        for emb in (self.embed_tokens, self.embed_positions):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, recorder=None) -> torch.Tensor:
        T = tokens.shape[1]
        if T > self.config.max_position_embeddings:
            limit = self.config.max_position_embeddings
            raise ValueError(f"sequence of {T} tokens is longer than max_position_embeddings={limit}.")
        positions = torch.arange(T, device=tokens.device)
        x = self.embed_tokens(tokens) + self.embed_positions(positions)
        for layer in self.layers:
            x = layer(x, positions, mode="naive", recorder=recorder)  # MHA mode: the cheaper one for training
        return self.lm_head(self.norm(x))

    def gates(self):
        return [layer.mlp.gate for layer in self.layers]


# ---------------------------------------------------------------------------------------------------- training
SETTINGS = ("none", "aux", "bias", "aux_small", "aux_batch")
SETTING_LABELS = {"none": "no balancing", "aux": "sequence aux loss", "bias": "aux-loss-free bias",
                  "aux_small": "sequence aux, α = 1e-4", "aux_batch": "batch-wise aux loss"}
# The auxiliary-loss weight of each aux setting: "aux" is this experiment's 0.01 (0.001 barely reduced MaxVio in a
# trial run), "aux_small" DeepSeek-V3's own 1e-4, "aux_batch" the same 0.01 with f and P taken over the whole batch.
SETTING_ALPHA = {"aux": 1e-2, "aux_small": 1e-4, "aux_batch": 1e-2}


@dataclass
class TrainConfig:
    """Everything that defines one run (saved with its log). Defaults reproduce the shipped artifacts."""

    setting: str = "bias"
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-2
    warmup: int = 100
    weight_decay: float = 0.01
    clip: float = 1.0
    alpha: float | None = None  # aux loss weight; None: the setting's SETTING_ALPHA (the paper uses 1e-4)
    gamma: float = 1e-3  # bias update speed, the paper's value (1e-2 reacts faster but settled noisier in trial runs)
    eval_every: int = 25
    eval_per_task: int = 64
    seed: int = 0
    threads: int = 1  # tiny matmuls gain nothing from a second thread, and lose a lot when cores are shared
    model: dict = field(default_factory=dict)  # overrides of model_config()

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"setting={self.setting!r}: choose one of {SETTINGS}.")
        if self.alpha is None:
            self.alpha = SETTING_ALPHA.get(self.setting, 0.0)


def eval_set(per_task: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed evaluation set: `per_task` sequences of every task (task-major order)."""
    g = torch.Generator().manual_seed(seed)
    tasks = torch.arange(len(TASKS)).repeat_interleave(per_task)
    return make_batch(len(tasks), g, tasks)


class RoutingLog:
    """A recorder for `MoELM.forward(recorder=...)`: keeps each layer's Routing of the last forward pass."""

    def __init__(self):
        self.by_layer: dict[int, Routing] = {}

    def on_routing(self, *, layer_idx: int, routing: Routing) -> None:
        self.by_layer[layer_idx] = routing


@torch.no_grad()
def evaluate(model: MoELM, seqs: torch.Tensor, tasks: torch.Tensor, *, full: bool = False) -> dict:
    """Loss, accuracy and expert load on a fixed set. `full` adds per-task numbers, routing by task, node counts."""
    was_training = model.training
    model.eval()
    cfg = model.config
    inputs, targets = inputs_and_targets(seqs)
    log = RoutingLog()
    logits = model(inputs, recorder=log)
    answer = targets != IGNORE
    loss = F.cross_entropy(logits[answer], targets[answer]).item()
    correct = (logits.argmax(-1) == targets) & answer
    out = {
        "loss": loss,
        "accuracy": correct.sum().item() / answer.sum().item(),
        "load": [expert_load(log.by_layer[i].topk_idx, cfg.n_routed_experts).tolist() for i in sorted(log.by_layer)],
    }
    out["maxvio"] = [max_violation(torch.tensor(load)) for load in out["load"]]
    if full:
        n_tasks = len(TASKS)
        out["task_accuracy"] = [
            (correct[tasks == t].sum() / answer[tasks == t].sum()).item() for t in range(n_tasks)
        ]
        out["sequence_accuracy"] = [
            (correct[tasks == t].sum(-1) == N_ITEMS).float().mean().item() for t in range(n_tasks)
        ]
        task_of_token = tasks[:, None].expand_as(inputs).reshape(-1)  # [B*T]
        out["task_expert"], out["groups_touched"], out["groups_touched_unlimited"] = [], [], []
        for i in sorted(log.by_layer):
            r = log.by_layer[i]
            counts = torch.zeros(n_tasks, cfg.n_routed_experts, dtype=torch.long)
            counts.index_put_((task_of_token[:, None].expand_as(r.topk_idx), r.topk_idx), torch.ones_like(r.topk_idx),
                              accumulate=True)
            out["task_expert"].append(counts.tolist())
            bias = model.layers[i].mlp.gate.e_score_correction_bias
            free = select_experts(r.scores + bias, cfg.num_experts_per_tok)  # the same scores, no group limit
            touched = groups_touched(r.topk_idx, cfg.n_group, cfg.n_routed_experts)
            touched_free = groups_touched(free, cfg.n_group, cfg.n_routed_experts)
            out["groups_touched"].append(torch.bincount(touched, minlength=cfg.n_group + 1).tolist())
            out["groups_touched_unlimited"].append(torch.bincount(touched_free, minlength=cfg.n_group + 1).tolist())
        out["specialisation"] = [normalised_mutual_information(torch.tensor(c)) for c in out["task_expert"]]
        out["loss_without_group_limit"] = _loss_without_group_limit(model, inputs, targets)
    model.train(was_training)
    return out


def _loss_without_group_limit(model: MoELM, inputs, targets) -> float:
    """The same trained model evaluated with every group allowed (topk_group = n_group)."""
    kept = [g.topk_group for g in model.gates()]
    try:
        for g in model.gates():
            g.topk_group = g.n_group
        logits = model(inputs)
    finally:
        for g, k in zip(model.gates(), kept):
            g.topk_group = k
    answer = targets != IGNORE
    return F.cross_entropy(logits[answer], targets[answer]).item()


def normalised_mutual_information(counts: torch.Tensor) -> float:
    """I(task; expert) / H(task) from a [tasks, experts] count table: 0 = experts ignore the task, 1 = the
    expert choice reveals the task."""
    p = counts.double() / counts.sum()
    pt, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = (p[nz] * (p[nz] / (pt @ pe)[nz]).log()).sum()
    h = -(pt[pt > 0] * pt[pt > 0].log()).sum()
    return float(mi / h)


def lr_at(step: int, tcfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < tcfg.warmup:
        return tcfg.lr * (step + 1) / tcfg.warmup
    progress = (step - tcfg.warmup) / max(1, tcfg.steps - tcfg.warmup)
    return tcfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(tcfg: TrainConfig, *, progress: bool = True) -> tuple[MoELM, dict]:
    """Train one model under `tcfg.setting`; returns the model and its log (a JSON-ready dict)."""
    torch.manual_seed(tcfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(tcfg.threads)
    cfg = model_config(**tcfg.model)
    model = MoELM(cfg)
    g = torch.Generator().manual_seed(tcfg.seed)
    ev_seqs, ev_tasks = eval_set(tcfg.eval_per_task)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tcfg.lr, betas=(0.9, 0.98),
    )
    log = {"config": asdict(tcfg), "model_config": cfg.to_dict(), "steps": [], "train_loss": [],
           "eval_steps": [], "eval_loss": [], "eval_load": [], "eval_maxvio": [], "bias": []}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tcfg.steps, desc=f"{tcfg.setting:>4}", leave=False)
    start = time.perf_counter()
    for step in range(tcfg.steps + 1):
        if step % tcfg.eval_every == 0 or step == tcfg.steps:
            ev = evaluate(model, ev_seqs, ev_tasks)
            log["eval_steps"].append(step)
            log["eval_loss"].append(ev["loss"])
            log["eval_load"].append(ev["load"])
            log["eval_maxvio"].append(ev["maxvio"])
            log["bias"].append([[round(b, 6) for b in gt.e_score_correction_bias.tolist()] for gt in model.gates()])
        if step == tcfg.steps:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tcfg)
        seqs, _ = make_batch(tcfg.batch_size, g)
        inputs, targets = inputs_and_targets(seqs)
        routing = RoutingLog()
        logits = model(inputs, recorder=routing)
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1), ignore_index=IGNORE)
        total = loss
        if tcfg.setting in ("aux", "aux_small", "aux_batch"):
            # sequence-wise: every sequence balanced on its own; batch-wise: the batch as one long sequence
            B, T = inputs.shape
            shape = (1, B * T, -1) if tcfg.setting == "aux_batch" else (B, T, -1)
            for r in routing.by_layer.values():
                total = total + sequence_aux_loss(r.scores.view(*shape), r.topk_idx.view(*shape), tcfg.alpha)
        opt.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_(model.parameters(), tcfg.clip)
        opt.step()
        if tcfg.setting == "bias":  # after the step, from the load this batch put on each expert
            for i, r in routing.by_layer.items():
                update_bias(model.layers[i].mlp.gate, expert_load(r.topk_idx, cfg.n_routed_experts), tcfg.gamma)
        log["steps"].append(step)
        log["train_loss"].append(round(loss.item(), 5))
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", maxvio=f"{max(log['eval_maxvio'][-1]):.2f}")
    if bar is not None:
        bar.close()
    log["seconds"] = time.perf_counter() - start
    log["final"] = evaluate(model, ev_seqs, ev_tasks, full=True)
    torch.set_num_threads(threads)
    return model, log


# ---------------------------------------------------------------------------------------------------- artifacts
def checkpoint_path(out: str | Path, setting: str) -> Path:
    return Path(out) / "moe" / f"moe_lm_{setting}.safetensors"


def log_path(out: str | Path) -> Path:
    return Path(out) / "moe" / "moe_train_log.json"


def save(out: str | Path, models: dict[str, MoELM], logs: dict[str, dict]) -> None:
    """Write the checkpoints and the log. Settings already in an existing log and not retrained now are kept, so
    `--settings a b` adds or replaces just those two."""
    from safetensors.torch import save_file

    folder = Path(out) / "moe"
    folder.mkdir(parents=True, exist_ok=True)
    for setting, model in models.items():
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(checkpoint_path(out, setting)), metadata={"setting": setting})
    old = json.loads(log_path(out).read_text()) if log_path(out).is_file() else {}
    merged = {s: (logs[s] if s in logs else old[s]) for s in SETTINGS if s in logs or s in old}
    log_path(out).write_text(json.dumps(merged, separators=(",", ":")) + "\n")


def load(out: str | Path = "data") -> tuple[dict[str, MoELM], dict[str, dict]]:
    """The shipped (or regenerated) models and logs: ({setting: model}, {setting: log})."""
    from safetensors.torch import load_file

    path = log_path(out)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing. Regenerate it with `python -m dslib.moe_train --out {out}` (about 5 minutes on "
            "2 CPU cores)."
        )
    logs = json.loads(path.read_text())
    models = {}
    for setting, log in logs.items():
        model = MoELM(model_config(**log["config"]["model"]))
        model.load_state_dict(load_file(str(checkpoint_path(out, setting))))
        models[setting] = model.eval()
    return models, logs


def _train_one(tcfg: TrainConfig) -> tuple[str, dict, dict]:
    model, log = train(tcfg, progress=False)
    return tcfg.setting, model.state_dict(), log


def train_all(settings=SETTINGS, *, steps: int = TrainConfig.steps, seed: int = TrainConfig.seed, jobs: int = 1,
              progress: bool = True, **overrides) -> tuple[dict[str, MoELM], dict[str, dict]]:
    """Train one model per setting (`overrides`: other TrainConfig fields). `jobs` > 1 trains settings in parallel
    processes, one thread each, so the results are the same as with jobs = 1."""
    configs = [TrainConfig(setting=s, steps=steps, seed=seed, **overrides) for s in settings]
    models, logs = {}, {}
    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(jobs, len(configs))) as pool:
            for setting, state, log in pool.imap(_train_one, configs):
                models[setting] = MoELM(model_config(**log["config"]["model"]))
                models[setting].load_state_dict(state)
                logs[setting] = log
                _report(setting, log)
    else:
        for tcfg in configs:
            models[tcfg.setting], logs[tcfg.setting] = train(tcfg, progress=progress)
            _report(tcfg.setting, logs[tcfg.setting])
    return models, logs


def _report(setting: str, log: dict) -> None:
    f = log["final"]
    print(f"{setting:>5}: {log['seconds']:.0f} s, eval loss {f['loss']:.4f}, accuracy {f['accuracy']:.3f}, "
          f"MaxVio {', '.join(f'{m:.2f}' for m in f['maxvio'])}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data", help="folder for moe/ (checkpoints and log); default data")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--jobs", type=int, default=min(len(SETTINGS), os.cpu_count() or 1),
                        help="settings trained in parallel (one CPU thread each); default: one per core, at most 3")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    models, logs = train_all(args.settings, steps=args.steps, seed=args.seed, jobs=args.jobs,
                             progress=not args.no_progress)
    save(args.out, models, logs)
    print(f"wrote {log_path(args.out)} and {len(models)} checkpoints in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
