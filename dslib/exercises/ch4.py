"""Exercise checks of chapter 4 (MoE routing).

1. `check_group_scores(fn)`: write the gate's group score (sum of the 2 best biased scores in each group).
2. `check_bias_update(fn)`: write one step of auxiliary-loss-free balancing.
3. `check_active_params(answer)`: active parameters per token of DeepSeek-V3.2 if it routed to 16 experts.
4. `check_route(fn)`: build it — the gate's route, steps 1-6, from torch operations.
"""
from __future__ import annotations

import torch

from dslib.config import ModelConfig
from dslib.exercises import Verdict, attempt, attempt_own, correct, fresh_generator, not_yet  # noqa: F401
from dslib.moe import group_scores

__all__ = [
    "check_group_scores", "check_bias_update", "check_active_params",
    "solution_group_scores", "solution_bias_update", "solution_active_params",
    "check_route", "solution_route",
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


# ---------------------------------------------------------------------------------------------- build it: the route
def _route(x, weight, bias, cfg, *, score="sigmoid", choose_with_bias=True, weights_with_bias=False,
           group_score="top2", groups="contiguous", limit=True, normalise=True, scale=True):
    """The gate's steps 1-6 from torch operations, with the variants the check recognises."""
    n, E, G = x.shape[0], weight.shape[0], cfg.n_group
    logits = x.float() @ weight.float().T
    s = torch.sigmoid(logits) if score == "sigmoid" else torch.softmax(logits, dim=-1)  # 1. scores [N, E]
    choice = s + bias if choose_with_bias else s.clone()  # 2. the bias, for choosing only
    if limit and G > 1:
        grouped = choice.view(n, G, E // G) if groups == "contiguous" else choice.view(n, E // G, G).transpose(1, 2)
        g = grouped.topk(2, dim=-1).values.sum(-1) if group_score == "top2" else grouped.max(-1).values  # 3. [N, G]
        kept = torch.zeros(n, G, dtype=torch.bool).scatter_(1, g.topk(cfg.topk_group, dim=-1).indices, True)  # 4.
        expert_kept = kept.repeat_interleave(E // G, dim=1) if groups == "contiguous" else kept.repeat(1, E // G)
        choice = choice.masked_fill(~expert_kept, float("-inf"))
    idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices  # 5. top-k of the biased, limited scores
    w = (s + bias if weights_with_bias else s).gather(1, idx)  # 6. weights from the UNBIASED scores
    if normalise:
        w = w / w.sum(-1, keepdim=True)
    return idx, w * cfg.routed_scaling_factor if scale else w


def solution_route(x, weight, bias, cfg):
    """DeepSeek-V3's gate: (1) s = sigmoid(x Wᵀ) in fp32; (2) s + bias to choose; (3) group score = sum of each
    group's two best biased scores; (4) keep the topk_group best groups, -inf elsewhere; (5) top-k experts;
    (6) weights = unbiased s of the chosen, renormalised, times routed_scaling_factor."""
    return _route(x, weight, bias, cfg)


def _by_expert(idx: torch.Tensor, w: torch.Tensor):
    order = idx.argsort(dim=-1)
    return idx.gather(1, order), w.gather(1, order)


_ROUTE_HINT = ("Start with step 1, s = torch.sigmoid(x.float() @ weight.float().T), and step 2, choice = s + bias; "
               "then view choice as [N, n_group, E // n_group] for the group scores.")


def check_route(fn) -> Verdict:
    """Build it: `fn(x [N, d], weight [E, d], bias [E], cfg) -> (topk_idx [N, k], topk_weight [N, k])`, the gate
    of one MoE layer (steps 1-6), compared with `dslib.moe.Gate.route` on fresh random tokens, weights and biases,
    for two group layouts. The order of a token's k experts does not matter."""
    from dslib import moe
    from dslib.moe import Gate, expert_weights, group_scores, keep_top_groups, limit_to_groups

    g = fresh_generator()
    configs = [
        ModelConfig.small(),  # 16 experts in 4 groups of 4, top-4 from <= 2 groups
        ModelConfig.small(hidden_size=32, n_routed_experts=32, n_group=8, topk_group=4, num_experts_per_tok=8),
    ]
    for cfg in configs:
        gate = Gate(cfg)
        with torch.no_grad():
            gate.weight.copy_(torch.randn(cfg.n_routed_experts, cfg.hidden_size, generator=g) / cfg.hidden_size**0.5)
            gate.e_score_correction_bias.copy_(0.1 * torch.randn(cfg.n_routed_experts, generator=g))
        x = torch.randn(64, cfg.hidden_size, generator=g)
        args = (x, gate.weight.detach().clone(), gate.e_score_correction_bias.clone(), cfg)
        with torch.no_grad():
            want = gate.route(x)
            got, failure = attempt_own(fn, x.clone(), *args[1:], modules=(moe,), stub_hint=_ROUTE_HINT)
        if failure is not None:
            return failure
        setup = (f"{cfg.n_routed_experts} experts in {cfg.n_group} groups, top-{cfg.num_experts_per_tok} from "
                 f"<= {cfg.topk_group} groups")
        if not (isinstance(got, tuple) and len(got) == 2 and all(isinstance(t, torch.Tensor) for t in got)):
            return not_yet(f"return two tensors (topk_idx, topk_weight); got {type(got).__name__}.")
        idx, w = got
        shape = (x.shape[0], cfg.num_experts_per_tok)
        if tuple(idx.shape) != shape or tuple(w.shape) != shape:
            return not_yet(f"with {setup}: topk_idx and topk_weight should both be [N, k] = {list(shape)}, got "
                           f"{list(idx.shape)} and {list(w.shape)}.")
        mine_idx, mine_w = _by_expert(idx.long(), w.detach().float())
        want_idx, want_w = _by_expert(want.topk_idx, want.topk_weight)
        if torch.equal(mine_idx, want_idx) and torch.allclose(mine_w, want_w, atol=1e-5):
            continue
        variants = [
            (dict(score="softmax"), "the scores come from a softmax; DeepSeek-V3 scores each expert with its own "
                                    "sigmoid (step 1), so experts do not compete before the choice."),
            (dict(weights_with_bias=True), "the weights include the bias. The bias only decides WHO is chosen; the "
                                           "weights come from the unbiased sigmoid scores (step 6)."),
            (dict(choose_with_bias=False), "the experts are chosen by the plain scores; the choice (steps 3-5) uses "
                                           "the biased scores s + bias, which is how balancing steers it."),
            (dict(group_score="max"), "each group is scored by its best expert; DeepSeek sums its TWO best (step 3)."),
            (dict(groups="strided"), "your groups are strided; group g holds the CONTIGUOUS experts "
                                     "g·E/G … (g+1)·E/G − 1 (view as [N, n_group, E // n_group])."),
            (dict(limit=False), f"some tokens use experts from more than topk_group = {cfg.topk_group} groups: "
                                "keep only the best groups and set every other expert's score to -inf (step 4)."),
            (dict(normalise=False), "the weights are not renormalised: divide by their sum over the k chosen experts "
                                    "before scaling (step 6)."),
            (dict(scale=False), f"the weights sum to 1; multiply them by routed_scaling_factor = "
                                f"{cfg.routed_scaling_factor} (step 6)."),
        ]
        for kw, hint in variants:
            v_idx, v_w = _by_expert(*_route(*args, **kw))
            if torch.equal(mine_idx, v_idx) and torch.allclose(mine_w, v_w, atol=1e-5):
                return not_yet(hint)
        if torch.equal(mine_idx, want_idx):
            return not_yet(f"with {setup} the right experts are chosen but the weights differ: step 6 takes the "
                           "unbiased scores of the chosen experts, renormalises them and scales them.")
        return not_yet(f"with {setup} the chosen experts differ from the gate's for "
                       f"{int((mine_idx != want_idx).any(-1).sum())} of {x.shape[0]} tokens; check steps 2-5 "
                       "(biased scores, top-2 group sums, the kept groups, top-k).")
    return correct("that is DeepSeek-V3.2's router. Compare with dslib's version below.",
                   compare=(Gate.route, group_scores, keep_top_groups, limit_to_groups, expert_weights))
