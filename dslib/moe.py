"""Mixture of experts: the gate, the experts, the MoE block and load balancing (chapter 4).

DeepSeek-V3.2 replaces the feed-forward network of layers 3..60 by 256 small routed experts and one shared expert.
Each token runs through 8 routed experts (chosen by the gate) plus the shared one, so a layer holds 257 experts'
worth of parameters but a token pays for 9 (REFERENCE.md §1.2, §6).

The gate, step by step (REFERENCE.md §6.1), for a token x:

    s   = sigmoid(W_gate x)                   # [E] affinity of the token to each expert, in fp32
    s_b = s + b                               # b = e_score_correction_bias: used only to CHOOSE experts
    g   = sum of the top-2 of s_b per group   # [G] group (= node) scores
    keep the topk_group best groups, s_b = -inf elsewhere
    E_t = top-k experts of s_b
    w_e = s[e] / sum_{E_t} s  * routed_scaling_factor      # weights from the UNBIASED scores

The MoE block sends each token to its experts and adds the shared expert:
    y = sum_{e in E_t} w_e * Expert_e(x) + Shared(x),   Expert(x) = down(silu(gate(x)) * up(x))

Balancing without an auxiliary loss moves b after every step: b_i += gamma * sign(mean load - load_i).
Parameter names are the checkpoint's: `gate.weight`, `gate.e_score_correction_bias`,
`experts.{e}.{gate_proj,up_proj,down_proj}.weight`, `shared_experts.{gate_proj,up_proj,down_proj}.weight`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dslib.attention import FeedForward
from dslib.config import ConfigError, ModelConfig

__all__ = [
    "MLP", "Gate", "MoE", "Routing",
    "router_scores", "group_scores", "keep_top_groups", "limit_to_groups", "select_experts", "expert_weights",
    "dispatch", "moe_reference",
    "expert_load", "max_violation", "update_bias", "sequence_aux_loss", "groups_touched",
]


# ---------------------------------------------------------------------------------------------------- experts
class MLP(FeedForward):
    """SwiGLU feed-forward: down_proj(silu(gate_proj(x)) * up_proj(x)) — chapter 1's `FeedForward`, by its
    DeepSeek role.

    The same module is the dense FFN of the first `first_k_dense_replace` layers, one routed expert, and the
    shared expert (whose width is `moe_intermediate_size * n_shared_experts`). x [..., d] -> [..., d].
    """


# ---------------------------------------------------------------------------------------------------- the gate
def router_scores(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Step 1: s = sigmoid(x W^T), in fp32. x [N, d], weight [E, d] -> scores [N, E] in (0, 1).

    A sigmoid (not a softmax) scores every expert independently, so adding or removing experts does not
    change the others' scores; the weights are normalised later over the chosen ones only.
    """
    return torch.sigmoid(F.linear(x.float(), weight.float()))


def group_scores(choice_scores: torch.Tensor, n_group: int) -> torch.Tensor:
    """Step 3: a group's score is the sum of its 2 best (biased) expert scores. [N, E] -> [N, n_group].

    Experts e = g*E/G .. (g+1)*E/G - 1 form group g (one group = the experts living on one node).
    Summing the top 2 rather than taking the max rewards groups that could serve several of the token's experts.
    """
    n_tokens, n_experts = choice_scores.shape
    per_group = choice_scores.view(n_tokens, n_group, n_experts // n_group)  # [N, G, E/G]
    return per_group.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]


def keep_top_groups(group_score: torch.Tensor, topk_group: int) -> torch.Tensor:
    """Step 4a: which groups a token may use: the `topk_group` best. [N, G] -> bool [N, G]."""
    kept = group_score.topk(topk_group, dim=-1).indices  # [N, topk_group]
    return torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)


def limit_to_groups(choice_scores: torch.Tensor, group_kept: torch.Tensor) -> torch.Tensor:
    """Step 4b: -inf for every expert outside the kept groups, so top-k cannot pick it. [N, E], [N, G] -> [N, E]."""
    n_tokens, n_experts = choice_scores.shape
    n_group = group_kept.shape[-1]
    expert_kept = group_kept.repeat_interleave(n_experts // n_group, dim=-1)  # [N, E]
    return choice_scores.masked_fill(~expert_kept, float("-inf"))


def select_experts(choice_scores: torch.Tensor, k: int) -> torch.Tensor:
    """Step 5: the k experts with the largest (biased, group-limited) scores. [N, E] -> int64 [N, k], best first."""
    return choice_scores.topk(k, dim=-1).indices


def expert_weights(
    scores: torch.Tensor, topk_idx: torch.Tensor, routed_scaling_factor: float, norm_topk_prob: bool = True
) -> torch.Tensor:
    """Step 6: weights from the UNBIASED scores of the chosen experts, renormalised, times the scale.

    scores [N, E] (sigmoid, no bias), topk_idx [N, k] -> [N, k] fp32; each row sums to routed_scaling_factor.
    The bias never enters here: it decides who works, not how much their output counts.
    """
    weight = scores.gather(1, topk_idx)  # [N, k]
    if norm_topk_prob:
        weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)  # 1e-20 as transformers does
    return weight * routed_scaling_factor


@dataclass
class Routing:
    """Everything the gate decided for N tokens (what a recorder receives and the balancing code reads)."""

    scores: torch.Tensor  # [N, E] sigmoid affinities, unbiased (fp32)
    group_scores: torch.Tensor | None  # [N, G] top-2 sums of the biased scores (None with one group)
    group_kept: torch.Tensor | None  # bool [N, G] groups the token may use (None with one group)
    topk_idx: torch.Tensor  # int64 [N, k] chosen experts, best first
    topk_weight: torch.Tensor  # [N, k] fp32 weights (unbiased, renormalised, scaled)


class Gate(nn.Module):
    """DeepSeek's router: sigmoid scores, bias-corrected choice, group-limited top-k (REFERENCE.md §6.1).

    Parameters: `weight [E, d]` (learned) and the buffer `e_score_correction_bias [E]` (fp32, no gradient; it is
    moved by `update_bias`, never by the optimiser). `forward(x [..., d]) -> (topk_idx [N, k], topk_weight [N, k])`
    with N = number of tokens in x.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_moe_config(cfg)
        self.n_routed_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.norm_topk_prob = cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear; checkpoints overwrite it

    def route(self, x: torch.Tensor, *, topk_group: int | None = None) -> Routing:
        """All gate steps for x [N, d]. `topk_group` overrides the config (n_group = no group limit)."""
        if x.dim() != 2 or x.shape[-1] != self.weight.shape[1]:
            raise ValueError(
                f"Gate.route expects tokens as [N, hidden_size={self.weight.shape[1]}], got {tuple(x.shape)}. "
                "Flatten batch and time first: x.reshape(-1, hidden_size)."
            )
        topk_group = self.topk_group if topk_group is None else topk_group
        scores = router_scores(x, self.weight)  # [N, E]
        choice = scores + self.e_score_correction_bias.float()  # [N, E] biased, for the choice only
        g_scores = g_kept = None
        if self.n_group > 1:
            g_scores = group_scores(choice, self.n_group)  # [N, G]
            g_kept = keep_top_groups(g_scores, topk_group)  # [N, G]
            choice = limit_to_groups(choice, g_kept)
        topk_idx = select_experts(choice, self.top_k)  # [N, k]
        topk_weight = expert_weights(scores, topk_idx, self.routed_scaling_factor, self.norm_topk_prob)
        return Routing(scores, g_scores, g_kept, topk_idx, topk_weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        routing = self.route(x.reshape(-1, x.shape[-1]))
        return routing.topk_idx, routing.topk_weight


def check_moe_config(cfg: ModelConfig) -> None:
    """Reject routing settings the gate cannot run, with the fix (ModelConfig checks divisibility and reach)."""
    cfg._validate_moe()  # n_routed_experts % n_group, topk_group * experts per group >= num_experts_per_tok, ...
    if cfg.n_group > 1 and cfg.experts_per_group < 2:
        raise ConfigError(
            f"n_routed_experts / n_group = {cfg.n_routed_experts} / {cfg.n_group} = 1 expert per group: a group's "
            "score is the sum of its 2 best experts, so every group needs >= 2. Lower n_group (or use n_group=1)."
        )


# ---------------------------------------------------------------------------------------------------- dispatch
def dispatch(
    x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, experts: nn.ModuleList
) -> torch.Tensor:
    """Batched routed-expert computation: sum_k topk_weight[n, k] * experts[topk_idx[n, k]](x[n]).

    x [N, d], topk_idx / topk_weight [N, k] -> [N, d]. The N*k (token, expert) pairs are sorted by expert, so each
    expert runs ONE matmul over all its tokens (a loop over experts, never over tokens); `index_add_` scatters
    the weighted results back. This is what expert-parallel systems do across GPUs (all-to-all instead of a sort).
    """
    n_tokens, k = topk_idx.shape
    flat_expert = topk_idx.reshape(-1)  # [N*k]
    order = flat_expert.argsort(stable=True)  # (token, slot) pairs grouped by expert
    token_of = order // k  # [N*k] which token each sorted pair belongs to
    tokens_per_expert = torch.bincount(flat_expert, minlength=len(experts)).tolist()
    grouped = x[token_of]  # [N*k, d] tokens, grouped by expert
    outputs = [
        experts[e](chunk) for e, chunk in enumerate(grouped.split(tokens_per_expert)) if tokens_per_expert[e]
    ]
    expert_out = torch.cat(outputs) if outputs else grouped  # [N*k, d]
    weight = topk_weight.reshape(-1)[order].to(x.dtype)  # [N*k]
    y = torch.zeros_like(x)
    return y.index_add_(0, token_of, expert_out * weight[:, None])


def moe_reference(moe: "MoE", x: torch.Tensor) -> torch.Tensor:
    """The slow, obvious MoE: a Python loop over tokens and their experts. For tests only. x [B, T, d]."""
    flat = x.reshape(-1, x.shape[-1])
    topk_idx, topk_weight = moe.gate(flat)
    out = []
    for n in range(flat.shape[0]):
        y = torch.zeros_like(flat[n])
        for e, w in zip(topk_idx[n].tolist(), topk_weight[n]):
            y = y + w.to(x.dtype) * moe.experts[e](flat[n])
        if moe.shared_experts is not None:
            y = y + moe.shared_experts(flat[n])
        out.append(y)
    return torch.stack(out).view_as(x)


class MoE(nn.Module):
    """The MoE feed-forward of layers >= first_k_dense_replace: gate + routed experts + shared expert(s).

    forward(x [B, T, d], record=None, backend="torch") -> [B, T, d]. If `record` is given it is called with the
    `Routing` of the B*T tokens (token n = b*T + t), e.g. to count expert load during training or in chapter 5's
    views. backend="triton" runs the experts as one grouped FP8 computation (`dslib.kernels.moe`, GPU).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts)
        )
        # n_shared_experts shared experts are stored as one MLP n times as wide (the checkpoint's layout).
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor, record: Callable[[Routing], None] | None = None, *,
                backend: str = "torch") -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"MoE expects hidden states [B, T, d], got shape {tuple(x.shape)}.")
        flat = x.reshape(-1, x.shape[-1])  # [B*T, d]
        routing = self.gate.route(flat)
        if backend == "triton":  # chapter 6: routed + shared experts as one grouped computation (loaded only here)
            from dslib.kernels import moe as grouped
            y = grouped.forward(self, flat, routing)
        elif backend == "torch":
            y = dispatch(flat, routing.topk_idx, routing.topk_weight, self.experts)  # [B*T, d]
            if self.shared_experts is not None:
                y = y + self.shared_experts(flat)  # every token, weight 1
        else:
            raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}.")
        if record is not None:
            record(routing)
        return y.view_as(x)


# ---------------------------------------------------------------------------------------------------- balancing
def expert_load(topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: [..., k] int64 -> [E] int64 (a token counts once per expert it uses)."""
    return torch.bincount(topk_idx.reshape(-1), minlength=n_experts)


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = max_i load_i / mean load - 1: 0 for perfectly even experts; 1 means the busiest does twice its share.

    The busiest expert sets the step time when experts run in parallel on different GPUs.
    """
    load = load.float()
    return float(load.max() / load.mean() - 1)


@torch.no_grad()
def update_bias(gate: Gate, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """Auxiliary-loss-free balancing (REFERENCE.md §6.2): b_i += gamma * sign(mean load - load_i), in place.

    Called after each optimiser step with the load the batch put on each expert. Overloaded experts become less
    attractive, underloaded ones more; no gradient and no loss term touch the model's quality. Returns the bias.
    """
    load = load.float()
    gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
    return gate.e_score_correction_bias


def sequence_aux_loss(scores: torch.Tensor, topk_idx: torch.Tensor, alpha: float) -> torch.Tensor:
    """Sequence-wise balance loss (REFERENCE.md §6.3): alpha * sum_i f_i * P_i, averaged over sequences.

    scores [B, T, E] unbiased sigmoid scores; topk_idx [B, T, k] the routed experts.
        f_i = E / (k T) * #{t : i in TopK_t}      (1 for every expert when perfectly even)
        P_i = mean_t s[t, i] / sum_j s[t, j]
    Each sequence is balanced on its own. Passing the whole batch as one sequence ([1, B*T, ...]) gives the
    batch-wise variant. Gradient flows through P (the scores), not through the discrete counts f.
    """
    if scores.dim() != 3 or topk_idx.shape[:2] != scores.shape[:2]:
        raise ValueError(
            f"sequence_aux_loss expects scores [B, T, E] and topk_idx [B, T, k], got {tuple(scores.shape)} and "
            f"{tuple(topk_idx.shape)}."
        )
    n_seq, n_tok, n_experts = scores.shape
    k = topk_idx.shape[-1]
    counts = torch.zeros(n_seq, n_experts, device=scores.device).scatter_add_(
        1, topk_idx.reshape(n_seq, -1), torch.ones(n_seq, n_tok * k, device=scores.device)
    )  # [B, E]
    f = counts * n_experts / (k * n_tok)  # [B, E]
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # [B, E]
    return alpha * (f * p).sum(dim=-1).mean()


def groups_touched(topk_idx: torch.Tensor, n_group: int, n_experts: int) -> torch.Tensor:
    """How many groups (nodes) each token's experts live on: [..., k] -> [...] int64.

    With experts of group g on node g, this is the number of nodes a token must be sent to (all-to-all traffic).
    """
    group = topk_idx // (n_experts // n_group)  # [..., k]
    onehot = torch.zeros(*topk_idx.shape[:-1], n_group, dtype=torch.bool, device=topk_idx.device)
    return onehot.scatter_(-1, group, True).sum(dim=-1)
