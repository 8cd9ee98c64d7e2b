"""DeepSeek Sparse Attention: token selection and attention over the selected latents (chapter 3).

DSA = MLA (chapter 2) + a lightning indexer (`dslib.indexer`) + a selection: every query attends only to the
k keys its indexer scored highest (`index_topk`, one set per query shared by all heads). This module holds

- the selections: `topk_selection` (indexer top-k, causal) and `window_selection` (the last k positions, the
  content-blind baseline with the same budget), both `[B, T, k]` int64 key indices with -1 for "none";
- `sparse_attention`: MQA-mode (absorbed) attention that *gathers* the selected latents, chunk by chunk of
  queries, so it costs O(T·k) and never builds a `T × S` tensor;
- `dslib.mla.dense_masked_attention` computes the same numbers the obvious O(T·S) way (scores for every key, the
  unselected ones masked to -inf) — the reference the tests compare against;
- `attention_recall`: the share of the dense attention mass a selection keeps;
- `DSAttention`, the attention module of the whole model (MLA + `indexer`), with one forward for inference,
  decoding and training (`AttentionStats`), and its cache `DSACache`.
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from dslib.attention import batched_positions, causal_mask
from dslib.config import ModelConfig
from dslib.cost import wall_seconds
from dslib.indexer import PRECISIONS, IndexerKeyCache, LightningIndexer, index_scores, take_rows
from dslib.kv_cache import LayerCache
from dslib.mla import MLA, MODES, LatentCache, dense_masked_attention


# ----------------------------------------------------------------------------------------------- selections
def topk_selection(index_scores: torch.Tensor, k: int, q_positions: torch.Tensor | None = None) -> torch.Tensor:
    """The k keys with the highest index score for every query: `[B, T, k]` int64, -1 where there is none.

    index_scores: `[B, T, S]`, future keys already at -inf (as `LightningIndexer` returns them).
    A query at position p has only p + 1 visible keys; when p + 1 <= k it keeps all of them (its attention is
    exactly dense) and the remaining slots are -1 — `torch.topk` would otherwise fill them with masked (future)
    keys, so the result is intersected with the causal mask (`q_positions`, if given, and the -inf scores).
    The order of the k indices is by decreasing score. Equal scores (common: the ReLU makes many index scores
    exactly 0 when the indexer has few heads) go to the earlier key, so the choice never depends on how many
    future keys the row carries — a cached decode selects exactly what the full forward pass selects.
    """
    if index_scores.dim() != 3:
        raise ValueError(f"index_scores must be [B, T, S], got shape {tuple(index_scores.shape)}.")
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k (tokens kept per query) must be a positive integer, got {k!r}.")
    B, T, S = index_scores.shape
    kk = min(k, S)
    # A stable descending sort breaks ties by key position; `torch.topk` leaves tie order to the kernel.
    top_scores, selected = index_scores.sort(dim=-1, descending=True, stable=True)
    top_scores, selected = top_scores[..., :kk], selected[..., :kk]  # [B, T, kk]
    invalid = top_scores == float("-inf")
    if q_positions is not None:
        pos = batched_positions(q_positions).to(selected.device)
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
    pos = batched_positions(q_positions)
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
def sparse_attention(
    q_absorbed: torch.Tensor,
    q_rope: torch.Tensor,
    kv_latent: torch.Tensor,
    k_rope: torch.Tensor,
    selected: torch.Tensor,
    softmax_scale: float,
    *,
    chunk: int = 256,
    return_probs: bool = False,
):
    """DSA core attention in MQA mode: every query attends to its k selected latents only. Costs O(T·k).

    Shapes as in `dense_masked_attention`, with selected `[B, T, k]` int64 (-1 = none) instead of a mask.
    Queries are processed `chunk` at a time: the largest temporary is `[B, chunk, H, k]` scores and
    `[B, chunk, k, C]` gathered latents; nothing of size T × S is ever built. Every query must have at least
    one selected key (with causal selections the query itself is always visible).
    Returns x `[B, T, H, C]` and, if asked, the probabilities over the selected keys `[B, T, H, k]`.
    """
    B, T, H, C = q_absorbed.shape
    if selected.shape[:2] != (B, T):
        raise ValueError(
            f"selected has shape {tuple(selected.shape)} but the queries are [B={B}, T={T}, ...]: "
            "pass one row of key indices per query."
        )
    out, all_probs = [], []
    batch = torch.arange(B, device=selected.device).view(B, 1, 1)
    for start in range(0, T, chunk):
        sl = slice(start, start + chunk)
        sel = selected[:, sl]  # [B, c, k]
        idx = sel.clamp(min=0)  # an empty slot (-1) reads key 0, masked to -inf below
        lat, rope = kv_latent[batch, idx], k_rope[batch, idx]  # gathered: [B, c, k, C], [B, c, k, R]
        scores = torch.einsum("bthc,btkc->bthk", q_absorbed[:, sl], lat)
        scores = scores + torch.einsum("bthr,btkr->bthk", q_rope[:, sl], rope)
        scores = (scores * softmax_scale).float().masked_fill((sel < 0).unsqueeze(2), float("-inf"))
        probs = scores.softmax(dim=-1).to(lat.dtype)  # [B, c, H, k]
        out.append(torch.einsum("bthk,btkc->bthc", probs, lat))
        all_probs.append(probs)
    x = torch.cat(out, dim=1)
    return (x, torch.cat(all_probs, dim=1)) if return_probs else x


def attention_recall(probs: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Share of the dense attention mass that a selection keeps: Σ_{s ∈ selected} p[t, s] for each query.

    probs `[B, T, S]` (one distribution per query, e.g. head-averaged) or `[B, T, H, S]` (averaged over heads
    here); selected `[B, T, k]`. Returns `[B, T]` in [0, 1]; 1 means the selection loses nothing.
    """
    if probs.dim() == 4:
        probs = probs.mean(dim=2)
    keep = selection_mask(selected, probs.shape[-1])
    return (probs * keep).sum(-1)


# ------------------------------------------------------------------------------------- the attention module
ATTENTIONS = ("sparse", "dense", "window")
BACKENDS = ("torch", "triton")


class DSACache(LayerCache):
    """One layer's DSA cache, chapter 1's container once more: MLA's latent and rope key (`LatentCache`'s fields)
    and the indexer's key (`IndexerKeyCache`'s), appended together so they always hold the same tokens."""

    fields = LatentCache.fields + IndexerKeyCache.fields
    kv_latent, k_rope, index_keys = LatentCache.kv_latent, LatentCache.k_rope, IndexerKeyCache.index_keys


@dataclass
class AttentionStats:
    """What one `DSAttention.forward` call reports besides its output: set the request, pass it as `stats=`.

    Request: `need_probs`, `need_index_scores`, `rows` (`[B, P]` indices of the queries the two are needed for, =
    their positions in a prefill from 0; None: all T). Filled by forward: `selected` `[B, T, k]` int64 (-1 = none;
    None for dense attention), `index_scores` `[B, T or P, S]` fp32 (-inf at future keys; gradient flows only into
    the indexer: its inputs are detached), `probs` `[B, T or P, H, S]` (dense) or `[B, T or P, H, k]` (over the
    selection).
    """

    need_probs: bool = False
    need_index_scores: bool = False
    rows: torch.Tensor | None = None
    selected: torch.Tensor | None = None
    index_scores: torch.Tensor | None = None
    probs: torch.Tensor | None = None


_WARNED: set[str] = set()


def _kernels(backend: str, device: torch.device):
    """`dslib.kernels` (chapter 6) for backend="triton" when it can run here; None means the PyTorch path.

    The kernels plug in here, imported only when asked for (a later chapter, so by name at run time). When they
    cannot run (`kernels.unavailable_reason()`: no CUDA device, no Triton or one older than 3.6), warn once with
    the reason and use PyTorch: the same numbers, computed by this module's own code."""
    if backend == "torch":
        return None
    try:
        kernels = importlib.import_module("dslib.kernels")
    except ImportError as err:
        reason = f"dslib.kernels is not importable ({err})"
    else:
        reason = kernels.unavailable_reason()
        if reason is None and device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
            reason = f"the tensors are on {device}, the kernels run on CUDA devices"
        if reason is None:
            return kernels
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f'backend="triton": {reason}; using the PyTorch path (same results).', stacklevel=3)
    return None


class DSAttention(MLA):
    """DeepSeek Sparse Attention = MLA (chapter 2) + a lightning indexer + top-k selection.

    state_dict: MLA's tensors + `indexer.{wq_b, wk, k_norm, weights_proj}` (checkpoint names). One forward for
    inference, decoding with a `DSACache` and training (what training needs comes back in an `AttentionStats`).
    """

    cache_type = DSACache

    def __init__(self, config: ModelConfig, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self.indexer = LightningIndexer(config)
        self.index_topk = config.index_topk

    def forward(
        self,
        h: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: DSACache | None = None,
        *,
        attention: str = "sparse",
        mode: str = "absorbed",
        window: int | None = None,
        precision: str = "fp32",
        backend: str = "torch",
        stats: AttentionStats | None = None,
        recorder=None,
    ) -> torch.Tensor:
        """h `[B, T, d]` -> `[B, T, d]`. positions default to len(cache) + arange(T); the new tokens' latents, rope
        keys and indexer keys are appended to `cache` (a `DSACache`).

        attention: "sparse" (indexer top-k, k = index_topk: the real model), "dense" (plain MLA), "window" (the
        last `window` tokens, default index_topk: the content-blind baseline with the same budget).
        mode: "absorbed" attends to a selection by gathering the selected latents in MQA mode (`sparse_attention`,
        O(T·k)); "naive" runs MHA-mode MLA with the selection as a mask (O(T·S), the reference).
        precision: the indexer's arithmetic, "fp32" or "fp8" (the deployed path, simulated).
        backend: "torch", or "triton" for `dslib.kernels` (CUDA; otherwise one warning and the torch path).
        stats: an `AttentionStats` request, filled in place. recorder: `recorder.on_selection(layer_idx=,
        selected=[B, T, k], positions=)` whenever a selection was made (sparse / window).
        """
        for name, value, allowed in (("attention", attention, ATTENTIONS), ("mode", mode, MODES),
                                     ("precision", precision, PRECISIONS), ("backend", backend, BACKENDS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
        positions, given = self.check_input(h, cache, positions)
        B, T, _ = h.shape
        q_latent, q_nope, q_rope, kv_latent, k_rope, (cos, sin) = self._project(h, positions)
        # The indexer sees detached inputs: its loss never moves the main model, the LM loss never the indexer.
        h_i, q_i, ix = h.detach(), q_latent.detach(), self.indexer
        index_k = ix.project_k(h_i, cos, sin)  # [B, T, D_I], cached even when unused, so the cache stays whole
        if cache is not None:
            kv_latent, k_rope, index_k = cache.append(kv_latent, k_rope, index_k)  # [B, S, ...]: old + new tokens
        kernels = _kernels(backend, h.device)
        want = stats or AttentionStats()
        scores = selected = None
        if want.need_index_scores:  # for the indexer's loss, with gradient; only at `rows` if given
            scores = ix(h_i, q_i, cos, sin, positions, index_k, rows=want.rows, precision=precision)
        if attention == "sparse":
            with torch.no_grad():  # an index has no gradient
                if kernels is not None:
                    selected = kernels.indexer.index_topk(ix.project_q(q_i, cos, sin), ix.head_weights(h_i), index_k,
                                                          positions, self.index_topk, fp8=precision == "fp8")
                else:
                    every = scores if scores is not None and want.rows is None else \
                        ix(h_i, q_i, cos, sin, positions, index_k, precision=precision)  # [B, T, S]
                    selected = topk_selection(every, self.index_topk, positions)
        elif attention == "window":
            selected = window_selection(positions, window or self.index_topk).expand(B, -1, -1)
        if selected is not None and recorder is not None:
            recorder.on_selection(layer_idx=self.layer_idx, selected=selected, positions=positions)

        need, probs = want.need_probs, None  # probabilities only when asked (a 128K-token prefill: 68 GB in bf16)
        if selected is None or mode == "naive":  # MLA (chapter 2); naive: MHA mode, the selection as a mask, O(T·S)
            mask = None if selected is None else selection_mask(selected, kv_latent.shape[1])
            out = self.attend(q_nope, q_rope, kv_latent, k_rope, positions, mode=mode, mask=mask, return_probs=need,
                              check_positions=given)
            if need:
                out, probs = out  # probs [B, T, H, S]
                if selected is not None:  # the probabilities of the selected keys, [B, T, H, k]
                    idx = selected.clamp(min=0).unsqueeze(2).expand(-1, -1, self.num_heads, -1)
                    probs = probs.gather(-1, idx).masked_fill((selected < 0).unsqueeze(2), 0.0)
        else:  # gather the k selected latents per query and attend in MQA mode: O(T·k)
            q_absorbed = torch.einsum("bthd,hdc->bthc", q_nope, self.w_uk())  # [B, T, H, kv_lora_rank]
            if kernels is not None and not need:
                x = kernels.sparse_mla.sparse_mla(q_absorbed, q_rope, kv_latent, k_rope, selected, self.softmax_scale)
            else:
                x = sparse_attention(q_absorbed, q_rope, kv_latent, k_rope, selected, self.softmax_scale,
                                     return_probs=need)
                if need:
                    x, probs = x  # probs [B, T, H, k]
            out = torch.einsum("bthc,hvc->bthv", x, self.w_uv())  # [B, T, H, v_head_dim]
        if stats is not None:
            stats.selected, stats.index_scores = selected, scores
            stats.probs = probs if probs is None or want.rows is None else take_rows(probs, want.rows)
        return self.o_proj(out.reshape(B, T, self.num_heads * self.v_head_dim))


# ------------------------------------------------------------------------------------------------ timing
def time_attention(lengths, *, heads: int = 4, latent: int = 64, rope: int = 16, k: int = 64, index_heads: int = 4,
                   index_dim: int = 32, repeats: int = 3, seed: int = 0, chunk: int = 256) -> dict[str, list[float]]:
    """Median CPU seconds of one layer's core attention for a prefill of each length (batch 1, random tensors):
    "dense" (`dense_masked_attention`, causal mask: O(L²)), "sparse" (`sparse_attention` over k selected keys:
    O(L·k)) and "indexer" (`index_scores`: O(L²) with a small constant). The selection is a window, so that
    only attention is timed, not the top-k."""
    g = torch.Generator().manual_seed(seed)
    out = {"dense": [], "sparse": [], "indexer": []}
    for L in lengths:
        qa, qr = torch.randn(1, L, heads, latent, generator=g), torch.randn(1, L, heads, rope, generator=g)
        lat, kr = torch.randn(1, L, latent, generator=g), torch.randn(1, L, rope, generator=g)
        qi, wi = torch.randn(1, L, index_heads, index_dim, generator=g), torch.randn(1, L, index_heads, generator=g)
        ki = torch.randn(1, L, index_dim, generator=g)
        pos = torch.arange(L)
        allowed = causal_mask(pos, L)
        sel = window_selection(pos, k)
        runs = {
            "dense": partial(dense_masked_attention, qa, qr, lat, kr, allowed, 0.1),
            "sparse": partial(sparse_attention, qa, qr, lat, kr, sel, 0.1, chunk=chunk),
            "indexer": partial(index_scores, qi, wi, ki, pos, chunk=chunk),
        }
        with torch.no_grad():
            for name, fn in runs.items():
                out[name].append(wall_seconds(fn, repeats=repeats))
    return out
