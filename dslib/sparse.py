"""DeepSeek Sparse Attention: token selection and attention over the selected latents (chapter 3).

DSA = MLA (chapter 2) + a lightning indexer (`dslib.indexer`) + a selection: every query attends only to the
k keys its indexer scored highest (`index_topk`, one set per query shared by all heads). This module holds

- the selections: `topk_selection` (indexer top-k, causal) and `window_selection` (the last k positions, the
  content-blind baseline with the same budget), both `[B, T, k]` int64 key indices with -1 for "none";
- `sparse_attention`: MQA-mode (absorbed) attention that *gathers* the selected latents, chunk by chunk of
  queries, so it costs O(T·k) and never builds a `T × S` tensor;
- `dense_masked_attention`: the same numbers computed the obvious O(T·S) way (scores for every key, the
  unselected ones masked to -inf) — the reference the tests compare against;
- `attention_recall`: the share of the dense attention mass a selection keeps;
- `DSAttention`, the attention module of the whole model (MLA + `indexer`), and its cache `DSACache`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------- selections
def _as_batched_positions(q_positions: torch.Tensor) -> torch.Tensor:
    if q_positions.dim() == 1:
        return q_positions.unsqueeze(0)  # [1, T]
    if q_positions.dim() != 2:
        raise ValueError(f"q_positions must be [T] or [B, T], got shape {tuple(q_positions.shape)}.")
    return q_positions


def causal_mask(q_positions: torch.Tensor, num_keys: int) -> torch.Tensor:
    """bool `[B, T, S]` (or `[1, T, S]` for 1-D positions): key s is visible to the query at position p iff s <= p."""
    pos = _as_batched_positions(q_positions)
    keys = torch.arange(num_keys, device=pos.device)
    return keys.view(1, 1, -1) <= pos.unsqueeze(-1)


def topk_selection(index_scores: torch.Tensor, k: int, q_positions: torch.Tensor | None = None) -> torch.Tensor:
    """The k keys with the highest index score for every query: `[B, T, k]` int64, -1 where there is none.

    index_scores: `[B, T, S]`, future keys already at -inf (as `LightningIndexer` returns them).
    A query at position p has only p + 1 visible keys; when p + 1 <= k it keeps all of them (its attention is
    exactly dense) and the remaining slots are -1 — `torch.topk` would otherwise fill them with masked (future)
    keys, so the result is intersected with the causal mask (`q_positions`, if given, and the -inf scores).
    The order of the k indices is by decreasing score.
    """
    if index_scores.dim() != 3:
        raise ValueError(f"index_scores must be [B, T, S], got shape {tuple(index_scores.shape)}.")
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k (tokens kept per query) must be a positive integer, got {k!r}.")
    B, T, S = index_scores.shape
    kk = min(k, S)
    top_scores, selected = index_scores.topk(kk, dim=-1)  # [B, T, kk]
    invalid = top_scores == float("-inf")
    if q_positions is not None:
        pos = _as_batched_positions(q_positions).to(selected.device)
        invalid |= selected > pos.unsqueeze(-1)
    selected = selected.masked_fill(invalid, -1)
    if kk < k:  # fewer keys than the budget: pad with "none"
        selected = F.pad(selected, (0, k - kk), value=-1)
    return selected


def window_selection(q_positions: torch.Tensor, window: int) -> torch.Tensor:
    """Sliding window: the query at position p keeps keys p - window + 1 .. p. `[B, T, window]` int64, -1 for
    positions before the start of the sequence. q_positions `[T]` (gives B = 1) or `[B, T]`."""
    if not isinstance(window, int) or window <= 0:
        raise ValueError(f"window must be a positive integer, got {window!r}.")
    pos = _as_batched_positions(q_positions)
    offsets = torch.arange(window, device=pos.device)
    selected = pos.unsqueeze(-1) - offsets  # [B, T, window]: p, p-1, ..., p-window+1
    return selected.masked_fill(selected < 0, -1)


def selection_mask(selected: torch.Tensor, num_keys: int) -> torch.Tensor:
    """bool `[B, T, S]`: True at the selected keys (entries -1 are ignored)."""
    B, T, k = selected.shape
    mask = torch.zeros(B, T, num_keys + 1, dtype=torch.bool, device=selected.device)
    # -1 goes to the extra last column, which is dropped
    mask.scatter_(-1, torch.where(selected < 0, num_keys, selected), True)
    return mask[..., :num_keys]


# ------------------------------------------------------------------------------------------ attention maths
def dense_masked_attention(
    q_absorbed: torch.Tensor,
    q_rope: torch.Tensor,
    kv_latent: torch.Tensor,
    k_rope: torch.Tensor,
    allowed: torch.Tensor,
    softmax_scale: float,
    *,
    return_probs: bool = False,
):
    """Reference MQA-mode (absorbed) attention over *all* S keys with a mask. Costs O(T·S).

        score[t,h,s] = (q_absorbed[t,h] · kv_latent[s] + q_rope[t,h] · k_rope[s]) · scale,  -inf where not allowed
        x[t,h]       = Σ_s softmax_s(score[t,h,:]) · kv_latent[s]

    q_absorbed `[B, T, H, C]` (= W_UK_hᵀ q_nope, C = kv_lora_rank), q_rope `[B, T, H, R]`,
    kv_latent `[B, S, C]`, k_rope `[B, S, R]`, allowed bool `[B, T, S]`.
    Returns x `[B, T, H, C]` (latent space; W_UV comes after) and, if asked, the probabilities `[B, T, H, S]`.
    """
    scores = torch.einsum("bthc,bsc->bths", q_absorbed, kv_latent)
    scores = scores + torch.einsum("bthr,bsr->bths", q_rope, k_rope)
    scores = (scores * softmax_scale).float().masked_fill(~allowed.unsqueeze(2), float("-inf"))
    probs = scores.softmax(dim=-1).to(kv_latent.dtype)  # [B, T, H, S]
    x = torch.einsum("bths,bsc->bthc", probs, kv_latent)
    return (x, probs) if return_probs else x


def gather_keys(kv_latent: torch.Tensor, k_rope: torch.Tensor, selected: torch.Tensor):
    """The selected latents and rope keys: `[B, T, k, C]`, `[B, T, k, R]` (index -1 reads key 0; mask it later)."""
    B = kv_latent.shape[0]
    idx = selected.clamp(min=0)
    batch = torch.arange(B, device=selected.device).view(B, 1, 1)
    return kv_latent[batch, idx], k_rope[batch, idx]


def sparse_attention(
    q_absorbed: torch.Tensor,
    q_rope: torch.Tensor,
    kv_latent: torch.Tensor,
    k_rope: torch.Tensor,
    selected: torch.Tensor,
    softmax_scale: float,
    *,
    chunk: int = 256,
) -> torch.Tensor:
    """DSA core attention in MQA mode: every query attends to its k selected latents only. Costs O(T·k).

    Shapes as in `dense_masked_attention`, with selected `[B, T, k]` int64 (-1 = none) instead of a mask.
    Queries are processed `chunk` at a time: the largest temporary is `[B, chunk, H, k]` scores and
    `[B, chunk, k, C]` gathered latents; nothing of size T × S is ever built. Every query must have at least
    one selected key (with causal selections the query itself is always visible).
    Returns x `[B, T, H, C]`.
    """
    B, T, H, C = q_absorbed.shape
    if selected.shape[:2] != (B, T):
        raise ValueError(
            f"selected has shape {tuple(selected.shape)} but the queries are [B={B}, T={T}, ...]: "
            "pass one row of key indices per query."
        )
    out = []
    for start in range(0, T, chunk):
        sl = slice(start, start + chunk)
        sel = selected[:, sl]  # [B, c, k]
        lat, rope = gather_keys(kv_latent, k_rope, sel)  # [B, c, k, C], [B, c, k, R]
        scores = torch.einsum("bthc,btkc->bthk", q_absorbed[:, sl], lat)
        scores = scores + torch.einsum("bthr,btkr->bthk", q_rope[:, sl], rope)
        scores = (scores * softmax_scale).float().masked_fill((sel < 0).unsqueeze(2), float("-inf"))
        probs = scores.softmax(dim=-1).to(lat.dtype)  # [B, c, H, k]
        out.append(torch.einsum("bthk,btkc->bthc", probs, lat))
    return torch.cat(out, dim=1)


def attention_recall(probs: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Share of the dense attention mass that a selection keeps: Σ_{s ∈ selected} p[t, s] for each query.

    probs `[B, T, S]` (one distribution per query, e.g. head-averaged) or `[B, T, H, S]` (averaged over heads
    here); selected `[B, T, k]`. Returns `[B, T]` in [0, 1]; 1 means the selection loses nothing.
    """
    if probs.dim() == 4:
        probs = probs.mean(dim=2)
    keep = selection_mask(selected, probs.shape[-1])
    return (probs * keep).sum(-1)
