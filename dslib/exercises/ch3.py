"""Exercise checks of chapter 3 (sparse attention).

1. `check_index_score(fn)`: write the lightning indexer's score for one (query, key) pair.
2. `check_attention_recall(fn)`: write the share of dense attention mass a selection keeps.
3. `check_crossover(answer)`: from which position on is a DSA decode step cheaper (in FLOPs) than dense attention?
4. `check_select_and_gather(fn)`: build it — top-k selection of the indexer's scores and the gather of the latents.
"""
from __future__ import annotations

import torch

from dslib.config import ModelConfig
from dslib.cost import attention_flops_per_token
from dslib.exercises import Verdict, attempt, attempt_own, correct, fresh_generator, not_yet  # noqa: F401
from dslib.sparse import attention_recall


# ------------------------------------------------------------------------------------------------ exercise 1
def solution_index_score(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> float:
    """I = Σ_j w[j] · ReLU(q[j] · k) for one query (q `[H_I, D]`, w `[H_I]`, scales already in w) and one
    key k `[D]`."""
    return float((w * torch.relu(q @ k)).sum())


def check_index_score(fn) -> Verdict:
    """fn(q [H_I, D], w [H_I], k [D]) -> float, the index score of one (query, key) pair."""
    g = torch.Generator().manual_seed(3)
    cases = [(torch.randn(4, 8, generator=g), torch.randn(4, generator=g), torch.randn(8, generator=g))
             for _ in range(5)]
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
        return correct(f"position {want}: just past k = 2,048. In FLOPs DSA wins almost at once; in the paper's "
                       "measured decode costs the curves cross near 4.7K tokens (section 6), because the indexer "
                       "costs more than its FLOPs and V3.2 pays a constant premium.")
    if abs(answer - want_bf16) <= 2:
        return not_yet(f"{want_bf16} is right if the indexer ran at the bf16 rate; count its FLOPs at half cost (FP8).")
    if abs(answer - 2048) <= 2:
        return not_yet("at k the two are equal in core attention, but DSA also pays for the indexer on every key: "
                       "it has to go a little further before it wins.")
    return not_yet(f"{answer:.0f} is off. Compare attention_flops_per_token(cfg, p, 'dense') and (..., 'sparse') for "
                   "growing p (or solve n·c = k·c + n·i for the number of keys n).")


# -------------------------------------------------------------------------------------- build it: select + gather
def _gather(kv_latent: torch.Tensor, k_rope: torch.Tensor, selected: torch.Tensor):
    """lat[b, t, j] = kv_latent[b, selected[b, t, j]] (index -1 reads key 0: those slots are masked later)."""
    batch = torch.arange(kv_latent.shape[0]).view(-1, 1, 1)
    idx = selected.clamp(min=0)
    return kv_latent[batch, idx], k_rope[batch, idx]


def solution_select_and_gather(index_scores, k, q_positions, kv_latent, k_rope):
    """Top-k selection and the gather, from torch operations.

    Each query keeps its k best-scoring *visible* keys (future keys carry -inf and must never be kept; a query with
    fewer than k visible keys keeps all of them, the rest of its slots are -1), then the selected latents and rope
    keys are gathered per batch element: lat[b, t, j] = kv_latent[b, selected[b, t, j]].
    """
    B, T, S = index_scores.shape
    kk = min(k, S)
    top, selected = index_scores.topk(kk, dim=-1)  # [B, T, kk]
    selected = selected.masked_fill((top == float("-inf")) | (selected > q_positions.view(1, -1, 1)), -1)
    if kk < k:
        selected = torch.cat([selected, selected.new_full((B, T, k - kk), -1)], dim=-1)
    return (selected, *_gather(kv_latent, k_rope, selected))


_SELECT_HINT = ("Start with index_scores.topk(min(k, S), dim=-1) and set to -1 the slots whose score is -inf "
                "(future keys); then gather kv_latent[batch_index, selected].")


def _kept(selected: torch.Tensor) -> list[list[set[int]]]:
    return [[{int(i) for i in row if int(i) >= 0} for row in seq] for seq in selected]


def check_select_and_gather(fn) -> Verdict:
    """Build it: `fn(index_scores [B, T, S], k, q_positions [T], kv_latent [B, S, C], k_rope [B, S, R]) ->
    (selected [B, T, k] int64 with -1 for "none", lat [B, T, k, C], rope [B, T, k, R])`, compared with
    `dslib.sparse.topk_selection` and the gather of `sparse_attention` on fresh random scores: a prefill longer than
    k, a prefill shorter than k, and a decode step (order within a row does not matter; -1 slots may gather
    anything)."""
    from dslib import indexer, sparse
    from dslib.sparse import sparse_attention, topk_selection

    g = fresh_generator()
    for B, T, S, k, C, R in ((2, 12, 12, 4, 6, 3), (2, 3, 3, 5, 6, 3), (2, 1, 9, 4, 6, 3)):
        pos = torch.arange(S - T, S)
        scores = torch.randn(B, T, S, generator=g).masked_fill(torch.arange(S) > pos[:, None], float("-inf"))
        kv_latent, k_rope = torch.randn(B, S, C, generator=g), torch.randn(B, S, R, generator=g)
        case = ("a decode step" if T == 1 else f"a prefill of {T} tokens") + f" with k = {k}"
        got, failure = attempt_own(fn, scores.clone(), k, pos.clone(), kv_latent.clone(), k_rope.clone(),
                                   modules=(sparse, indexer), stub_hint=_SELECT_HINT)
        if failure is not None:
            if S < k and "out of range" in failure.message:
                return not_yet(f"{case} but only {S} keys, torch.topk(k) fails: take min(k, S) keys and pad the "
                               "remaining slots with -1.")
            return failure
        if not (isinstance(got, tuple) and len(got) == 3 and all(isinstance(t, torch.Tensor) for t in got)):
            return not_yet(f"return three tensors (selected, lat, rope); got {type(got).__name__}.")
        selected, lat, rope = got
        want = topk_selection(scores, k, pos)
        if selected.shape != want.shape:
            pad = " (when fewer than k keys exist, pad with -1)" if S < k else ""
            return not_yet(f"for {case}, selected has shape {list(selected.shape)}, expected {list(want.shape)} = "
                           f"[B, T, k]{pad}.")
        if selected.dtype != torch.int64:
            return not_yet(f"selected should hold int64 key positions, got {selected.dtype}.")
        mine, right = _kept(selected), _kept(want)
        if mine != right:
            future = any(int(i) > int(p) for seq in selected for row, p in zip(seq, pos) for i in row)
            lowest = _kept(topk_selection(torch.where(torch.isinf(scores), scores, -scores), k, pos))
            if future:
                return not_yet(f"for {case} a query keeps a key after its own position: with fewer than k visible "
                               "keys, torch.topk fills the row with masked (-inf) future keys; set those slots to -1.")
            if mine == lowest:
                return not_yet("those are the k LOWEST-scoring keys: topk keeps the largest (largest=True).")
            return not_yet(f"for {case} the kept keys differ from the k best-scoring visible ones of each query.")
        if lat.shape != (B, T, k, C) or rope.shape != (B, T, k, R):
            return not_yet(f"for {case} lat / rope have shapes {list(lat.shape)} / {list(rope.shape)}, expected "
                           f"{[B, T, k, C]} / {[B, T, k, R]}: index the batch dimension too, "
                           "kv_latent[torch.arange(B).view(B, 1, 1), selected].")
        valid = selected >= 0
        want_lat, want_rope = _gather(kv_latent, k_rope, selected)
        if not torch.equal(lat[valid], want_lat[valid]):
            first = _gather(kv_latent[:1].expand_as(kv_latent), k_rope, selected)[0]
            if torch.equal(lat[valid], first[valid]):
                return not_yet("every batch element gathers from kv_latent[0]: element b must gather from its own "
                               "kv_latent[b].")
            return not_yet(f"for {case}, lat[b, t, j] is not kv_latent[b, selected[b, t, j]].")
        if not torch.equal(rope[valid], want_rope[valid]):
            return not_yet("the latents are right, the rope keys are not: gather k_rope with the same indices.")
    return correct("each query keeps its own k keys, and the latent cache is read only at those rows: O(T·k) "
                   "instead of O(T·S). Compare with dslib's selection and the gather inside its sparse attention.",
                   compare=(topk_selection, sparse_attention))
