"""Exercise checks of chapter 3 (sparse attention).

1. `check_index_score(fn)`: write the lightning indexer's score for one (query, key) pair.
2. `check_attention_recall(fn)`: write the share of dense attention mass a selection keeps.
3. `check_flop_ratio(answer)`: how many times fewer core-attention FLOPs does DSA need for a 128K prefill?
"""
from __future__ import annotations

import torch

from dslib.config import ModelConfig
from dslib.exercises import Verdict, attempt, correct, not_yet  # noqa: F401
from dslib.sparse import attention_recall, core_attention_flops


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
def solution_flop_ratio(seq_len: int = 131072) -> float:
    """Dense / DSA core-attention FLOPs for a causal prefill of `seq_len` tokens at the 671B dims (MQA mode)."""
    cfg = ModelConfig.deepseek_v32()
    return core_attention_flops(cfg, seq_len, "dense") / core_attention_flops(cfg, seq_len, "sparse")


def check_flop_ratio(answer) -> Verdict:
    """answer: dense / sparse core-attention FLOPs for one 131,072-token prefill with index_topk = 2048."""
    if answer is None:
        return not_yet("no answer yet: replace None by your number.")
    try:
        answer = float(answer)
    except (TypeError, ValueError):
        return not_yet(f"the answer should be a number, got {answer!r}.")
    want = solution_flop_ratio()
    if abs(answer - want) <= 0.02 * want:
        return correct(f"{want:.1f}x: dense pairs grow as L²/2, sparse ones as L·k.")
    if abs(answer - 131072 / 2048) <= 0.5:
        return not_yet("L / k = 64 counts every query with L keys; causal dense attention has only ~L²/2 pairs "
                       "(query t sees t + 1 keys), and the first k sparse queries see fewer than k.")
    if abs(answer - 2 * want) <= 0.05 * want:
        return not_yet("close, but the dense count is causal: query t sees only t + 1 keys, ~L²/2 pairs in total.")
    return not_yet(f"{answer:.1f} is off. Count (query, key) pairs: dense Σ_t (t + 1), sparse Σ_t min(t + 1, k).")
