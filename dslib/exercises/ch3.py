"""Exercise checks of chapter 3 (sparse attention).

1. `check_index_score(fn)`: write the lightning indexer's score for one (query, key) pair.
2. `check_attention_recall(fn)`: write the share of dense attention mass a selection keeps.
3. `check_crossover(answer)`: from which position on is a DSA decode step cheaper (in FLOPs) than dense attention?
"""
from __future__ import annotations

import torch

from dslib.config import ModelConfig
from dslib.exercises import Verdict, attempt, correct, not_yet  # noqa: F401
from dslib.sparse import attention_flops_per_token, attention_recall


# ------------------------------------------------------------------------------------------------ exercise 1
def solution_index_score(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> float:
    """I = Σ_j w[j] · ReLU(q[j] · k) for one query (q `[H_I, D]`, w `[H_I]`, scales already in w) and one key k `[D]`."""
    return float((w * torch.relu(q @ k)).sum())


def check_index_score(fn) -> Verdict:
    """fn(q [H_I, D], w [H_I], k [D]) -> float, the index score of one (query, key) pair."""
    g = torch.Generator().manual_seed(3)
    cases = [(torch.randn(4, 8, generator=g), torch.randn(4, generator=g), torch.randn(8, generator=g)) for _ in range(5)]
    for q, w, k in cases:
        got, err = attempt(fn, q.clone(), w.clone(), k.clone())
        if err is not None:
            return err
        try:
            got = float(got)
        except (TypeError, ValueError):
            return not_yet(f"it should return one number, got {type(got).__name__}.")
        want = solution_index_score(q, w, k)
        if abs(got - want) <= 1e-4 * max(1.0, abs(want)):
            continue
        no_relu = float((w * (q @ k)).sum())
        if abs(got - no_relu) <= 1e-4 * max(1.0, abs(no_relu)):
            return not_yet("the ReLU is missing: each head's dot product q_j·k is clipped at 0 before weighting.")
        relu_after = float(torch.relu((w * (q @ k)).sum()))
        if abs(got - relu_after) <= 1e-4 * max(1.0, abs(relu_after)):
            return not_yet("the ReLU goes on each head's q_j·k, before multiplying by w_j and summing, not on the sum.")
        unweighted = float(torch.relu(q @ k).sum())
        if abs(got - unweighted) <= 1e-4 * max(1.0, abs(unweighted)):
            return not_yet("the head weights w_j are missing: I = Σ_j w_j · ReLU(q_j · k).")
        return not_yet(f"for one test case you returned {got:.4f}, expected {want:.4f}. I = Σ_j w_j · ReLU(q_j · k).")
    return correct("that is the lightning indexer's score: a few ReLU'd dot products, weighted per query.")


# ------------------------------------------------------------------------------------------------ exercise 2
def solution_attention_recall(probs: torch.Tensor, selected: list[int]) -> float:
    """Share of one query's dense attention probs `[S]` that falls on the selected key positions."""
    return float(probs[[s for s in set(selected) if s >= 0]].sum())


def check_attention_recall(fn) -> Verdict:
    """fn(probs [S] (sums to 1), selected list of key positions, may contain -1) -> float in [0, 1]."""
    g = torch.Generator().manual_seed(5)
    probs = torch.softmax(3 * torch.randn(12, generator=g), 0)
    cases = [[0, 3, 7], [11, 10, 9, 8], [5, -1, -1], list(range(12))]
    for sel in cases:
        got, err = attempt(fn, probs.clone(), list(sel))
        if err is not None:
            return err
        want = float(attention_recall(probs.view(1, 1, -1), torch.tensor([[sel]])))
        try:
            got = float(got)
        except (TypeError, ValueError):
            return not_yet(f"it should return one number, got {type(got).__name__}.")
        if abs(got - want) > 1e-5:
            if -1 in sel:
                return not_yet(f"with selected={sel} you returned {got:.4f}, expected {want:.4f}: entries -1 mean "
                               "'no key' and must be skipped (probs[-1] would read the last key).")
            return not_yet(f"with selected={sel} you returned {got:.4f}, expected {want:.4f} (the sum of probs at "
                           "the selected positions).")
    return correct("recall 1.0 means the selection loses nothing of what dense attention looked at.")


# ------------------------------------------------------------------------------------------------ exercise 3
def solution_crossover(fp8_indexer: bool = True) -> int:
    """The first token position at which one DSA decode step needs fewer attention FLOPs than a dense one
    (671B dims, per layer; `attention_flops_per_token`). Below k both attend to every key and DSA also pays for
    the indexer; above k DSA's core cost stops growing while the indexer's grows 17x (34x in FP8) slower than
    dense attention's."""
    cfg = ModelConfig.deepseek_v32()
    per_key = attention_flops_per_token(cfg, 0, "dense")["total"]  # dense: per_key per visible key
    idx = attention_flops_per_token(cfg, 0, "sparse", fp8_indexer=fp8_indexer)["indexer"]  # per visible key
    # n = position + 1 keys, n > k:  n * per_key > k * per_key + n * idx   <=>   n > k * per_key / (per_key - idx)
    k = cfg.index_topk
    n = int(k * per_key // (per_key - idx)) + 1
    while attention_flops_per_token(cfg, n - 2, "sparse", fp8_indexer=fp8_indexer)["total"] < \
            attention_flops_per_token(cfg, n - 2, "dense")["total"]:
        n -= 1  # guard against rounding: walk back to the first position that wins
    return n - 1  # position = keys - 1


def check_crossover(answer) -> Verdict:
    """answer: the first position (0-based, the token sees position + 1 keys) where a DSA decode step costs fewer
    attention FLOPs than dense MLA at the 671B dims, with the FP8 indexer counted at half cost."""
    if answer is None:
        return not_yet("no answer yet: replace None by your number.")
    try:
        answer = float(answer)
    except (TypeError, ValueError):
        return not_yet(f"the answer should be a number, got {answer!r}.")
    want, want_bf16 = solution_crossover(True), solution_crossover(False)
    if abs(answer - want) <= 2:
        return correct(f"position {want}: just past k = 2,048. In FLOPs DSA wins almost at once; in the paper's measured "
                       "decode costs the curves cross near 4.7K tokens (section 6), because the indexer costs more "
                       "than its FLOPs and V3.2 pays a constant premium.")
    if abs(answer - want_bf16) <= 2:
        return not_yet(f"{want_bf16} is right if the indexer ran at the bf16 rate; count its FLOPs at half cost (FP8).")
    if abs(answer - 2048) <= 2:
        return not_yet("at k the two are equal in core attention, but DSA also pays for the indexer on every key: "
                       "it has to go a little further before it wins.")
    return not_yet(f"{answer:.0f} is off. Compare attention_flops_per_token(cfg, p, 'dense') and (..., 'sparse') for "
                   "growing p (or solve n·c = k·c + n·i for the number of keys n).")
