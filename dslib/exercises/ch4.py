"""Exercise checks of chapter 4 (MoE routing).

1. `check_group_scores(fn)`: write the gate's group score (sum of the 2 best biased scores in each group).
2. `check_bias_update(fn)`: write one step of auxiliary-loss-free balancing.
3. `check_active_params(answer)`: active parameters per token of DeepSeek-V3.2 if it routed to 16 experts.
"""
from __future__ import annotations

import torch

from dslib.config import ModelConfig
from dslib.exercises import Verdict, attempt, correct, not_yet  # noqa: F401
from dslib.moe import group_scores

__all__ = [
    "check_group_scores", "check_bias_update", "check_active_params",
    "solution_group_scores", "solution_bias_update", "solution_active_params",
]


# ---------------------------------------------------------------------------------------------------- 1
def solution_group_scores(choice_scores: torch.Tensor, n_group: int) -> torch.Tensor:
    """[N, E] biased scores -> [N, n_group]: each group's two best scores, summed."""
    n, e = choice_scores.shape
    return choice_scores.view(n, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)


def check_group_scores(fn) -> Verdict:
    """fn(choice_scores [N, E], n_group) -> [N, n_group]."""
    g = torch.Generator().manual_seed(4)
    s = torch.rand(6, 32, generator=g) + 0.1 * torch.randn(32, generator=g)
    got, err = attempt(fn, s.clone(), 8)
    if err is not None:
        return err
    if not isinstance(got, torch.Tensor):
        return not_yet(f"it should return a tensor, got {type(got).__name__}.")
    want = group_scores(s, 8)
    if tuple(got.shape) != tuple(want.shape):
        return not_yet(f"the result should have shape [N, n_group] = {tuple(want.shape)}, got {tuple(got.shape)}.")
    if torch.allclose(got, want, atol=1e-6):
        return correct("a group is scored by its two best experts, so a group that could serve two of the token's "
                       "experts beats one with a single strong expert.")
    grouped = s.view(6, 8, 4)
    if torch.allclose(got, grouped.max(-1).values, atol=1e-6):
        return not_yet("you took each group's best score; DeepSeek-V3 sums the best TWO (topk(2).values.sum).")
    if torch.allclose(got, grouped.sum(-1), atol=1e-6):
        return not_yet("you summed every expert of the group; keep only its two best scores before summing.")
    strided = s.view(6, 4, 8).transpose(1, 2)  # [N, 8, 4]: group g = experts g, g+8, g+16, g+24
    if torch.allclose(got, strided.topk(2, dim=-1).values.sum(-1), atol=1e-6):
        return not_yet("your groups are strided; group g holds the CONTIGUOUS experts g*E/G .. (g+1)*E/G - 1 "
                       "(view(N, n_group, E // n_group)).")
    return not_yet("the values differ from the top-2 sums per group; check that you view the scores as "
                   "[N, n_group, E // n_group] and sum the two largest along the last dimension.")


# ---------------------------------------------------------------------------------------------------- 2
def solution_bias_update(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """b_i + gamma * sign(mean load - load_i)."""
    load = load.float()
    return bias + gamma * torch.sign(load.mean() - load)


def check_bias_update(fn) -> Verdict:
    """fn(bias [E], load [E], gamma) -> new bias [E]."""
    bias = torch.tensor([0.0, 0.2, -0.1, 0.05, 0.0, 0.0])
    load = torch.tensor([30, 2, 9, 10, 7, 2])  # mean 10: one expert exactly at the mean
    got, err = attempt(fn, bias.clone(), load.clone(), 0.01)
    if err is not None:
        return err
    if not isinstance(got, torch.Tensor) or got.shape != bias.shape:
        return not_yet(f"it should return the new bias, a tensor of shape {tuple(bias.shape)}.")
    want = solution_bias_update(bias, load, 0.01)
    if torch.allclose(got.float(), want, atol=1e-7):
        return correct("overloaded experts lose a little bias, underloaded ones gain; an expert at exactly the mean "
                       "keeps its bias, and no gradient is involved.")
    delta = got.float() - bias
    if torch.allclose(delta, -(want - bias), atol=1e-7):
        return not_yet("the sign is reversed: an OVERloaded expert (load above the mean) must get a LOWER bias so "
                       "that fewer tokens choose it.")
    if torch.allclose(delta, 0.01 * (load.float().mean() - load.float()), atol=1e-6):
        return not_yet("you moved the bias in proportion to the load gap; the update uses only its sign, "
                       "gamma * sign(mean - load), so every expert moves by the same small step.")
    if torch.allclose(got.float(), want - bias, atol=1e-7):
        return not_yet("you returned only the change; return the updated bias (old bias + change).")
    return not_yet("the result differs from b + gamma * sign(mean(load) - load); compare with that formula "
                   "element by element.")


# ---------------------------------------------------------------------------------------------------- 3
def solution_active_params() -> int:
    """DeepSeek-V3.2 (with indexers) routing every token to 16 experts instead of 8."""
    return ModelConfig.deepseek_v32().replace(num_experts_per_tok=16).active_params()


def check_active_params(answer) -> Verdict:
    """answer: parameters per token (a number, e.g. 46.9e9) for DeepSeek-V3.2 with num_experts_per_tok = 16."""
    if answer is None or answer is Ellipsis:
        return not_yet("replace the placeholder with your number (parameters, e.g. 45e9).")
    try:
        value = float(answer)
    except (TypeError, ValueError):
        return not_yet(f"the answer should be a number of parameters, got {answer!r}.")
    cfg = ModelConfig.deepseek_v32()
    want = solution_active_params()
    if abs(value - want) <= 0.005 * want:
        return correct(f"{want / 1e9:.2f}B: each extra expert per token adds 3·7168·2048 parameters in each of the "
                       f"{cfg.num_moe_layers} MoE layers, while the stored total stays "
                       f"{cfg.total_params() / 1e9:.1f}B.")
    base = cfg.active_params()
    expert = cfg.param_counts()["expert"]
    if abs(value - want / 1e9) <= 0.005 * want / 1e9:
        return not_yet("give the number of parameters, not billions (e.g. 45e9 rather than 45).")
    if abs(value - base) <= 0.005 * base:
        return not_yet("that is the active count with 8 experts per token; now every token uses 16.")
    if abs(value - cfg.total_params()) <= 0.005 * cfg.total_params():
        return not_yet("that is every stored parameter; a token only uses its routed experts, the shared expert and "
                       "the dense parts.")
    if abs(value - (base + 8 * expert)) <= 0.005 * want:
        return not_yet(f"you added 8 experts once; there is a set of experts in each of the {cfg.num_moe_layers} MoE "
                       "layers.")
    if abs(value - (base + 8 * expert * cfg.num_hidden_layers)) <= 0.002 * want:
        return not_yet(f"only layers {cfg.first_k_dense_replace}..{cfg.num_hidden_layers - 1} are MoE layers "
                       f"({cfg.num_moe_layers} of them); the first {cfg.first_k_dense_replace} are dense.")
    return not_yet(f"start from ModelConfig.deepseek_v32().active_params() = {base / 1e9:.2f}B and add the "
                   "parameters of the 8 extra experts in every MoE layer (one expert is 3·hidden·moe_intermediate).")
