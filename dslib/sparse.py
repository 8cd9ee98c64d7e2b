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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dslib.config import ModelConfig
from dslib.indexer import IndexerKeyCache, LightningIndexer, index_scores
from dslib.mla import MLA, LatentCache


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
    for start in range(0, T, chunk):
        sl = slice(start, start + chunk)
        sel = selected[:, sl]  # [B, c, k]
        lat, rope = gather_keys(kv_latent, k_rope, sel)  # [B, c, k, C], [B, c, k, R]
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


class DSACache:
    """One layer's DSA cache: MLA's latent cache (`latent`: kv_latent + k_rope) and the indexer's key cache
    (`index_keys`). Both always hold the same tokens; a mismatch means the caches were mixed up."""

    def __init__(self, max_len: int | None = None):
        self.latent = LatentCache(max_len=max_len)
        self.index_keys = IndexerKeyCache(max_len=max_len)

    def __len__(self) -> int:
        n, m = len(self.latent), len(self.index_keys)
        if n != m:
            raise RuntimeError(
                f"DSACache is inconsistent: the latent cache holds {n} tokens but the indexer key cache {m}. "
                "Both must be filled by the same DSAttention forward calls; start a fresh DSACache."
            )
        return n

    @property
    def nbytes(self) -> int:
        return self.latent.nbytes + self.index_keys.nbytes


@dataclass
class AttentionStats:
    """What `DSAttention.forward_train` exposes besides the output (all for one layer)."""

    out: torch.Tensor  # [B, T, d]
    selected: torch.Tensor | None  # [B, T, k] key indices (-1 = none); None for dense attention
    index_scores: torch.Tensor | None  # [B, T, S] fp32, -inf at future keys (None if not asked)
    probs: torch.Tensor | None  # [B, T, H, S] dense or [B, T, H, k] over the selection (None if not asked)


class DSAttention(MLA):
    """DeepSeek Sparse Attention = MLA (chapter 2) + a lightning indexer + top-k selection.

    state_dict: MLA's tensors + `indexer.{wq_b, wk, k_norm, weights_proj}` (checkpoint names).
    attention: "sparse" (indexer top-k, k = index_topk: the real model), "dense" (plain MLA),
    "window" (the last `window` tokens, default index_topk: the content-blind baseline with the same budget).
    mode: "absorbed" runs the selection with the gather-based MQA-mode path (`sparse_attention`, O(T·k));
    "naive" runs it as MHA-mode MLA with the selection as a mask (O(T·S), the reference).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__(cfg, layer_idx)
        self.indexer = LightningIndexer(cfg)
        self.index_topk = cfg.index_topk

    def _check_cache(self, cache) -> int:
        if cache is None:
            return 0
        if not isinstance(cache, DSACache):
            raise TypeError(
                f"DSAttention needs a DSACache (latent + indexer keys), got {type(cache).__name__}. "
                "Create one per layer with dslib.sparse.DSACache()."
            )
        return len(cache)  # raises if the two halves disagree

    def select(self, h, q_latent, cos, sin, positions, cache, attention, *, window=None, precision="fp32"):
        """The selected key indices `[B, T, k]` for "sparse" / "window" (None for "dense"), and the index scores
        (None unless "sparse"). Always appends the new indexer keys to the cache, so it stays in step with MLA's."""
        B, T, _ = h.shape
        if attention == "sparse":
            scores = self.indexer(h, q_latent, cos, sin, positions, cache.index_keys if cache is not None else None, precision=precision)
            return topk_selection(scores, self.index_topk, positions), scores
        if cache is not None:
            cache.index_keys.append(self.indexer.project_k(h, cos, sin))
        if attention == "dense":
            return None, None
        pos = positions if positions.dim() == 2 else positions.unsqueeze(0)
        return window_selection(pos, window or self.index_topk).expand(B, -1, -1), None

    def attend_selected(self, q_nope, q_rope, kv_latent, k_rope, positions, selected, *, mode="absorbed", return_probs=False):
        """Attention of the queries over their selected keys -> `[B, T, H, v_head_dim]` (+ probs `[B, T, H, k]`
        in absorbed mode). absorbed: gather + MQA mode; naive: MHA mode with the selection as a mask."""
        if mode == "absorbed":
            q_absorbed = torch.einsum("bthd,hdc->bthc", q_nope, self.w_uk())  # [B, T, H, kv_lora_rank]
            x = sparse_attention(q_absorbed, q_rope, kv_latent, k_rope, selected, self.softmax_scale, return_probs=return_probs)
            x, probs = x if return_probs else (x, None)
            out = torch.einsum("bthc,hvc->bthv", x, self.w_uv())  # [B, T, H, v_head_dim]
            return (out, probs) if return_probs else out
        if return_probs:
            raise ValueError("return_probs needs mode='absorbed'.")
        mask = selection_mask(selected, kv_latent.shape[1])
        return self.attend(q_nope, q_rope, kv_latent, k_rope, positions, mode=mode, mask=mask)

    def forward(
        self,
        h: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: DSACache | None = None,
        mode: str = "absorbed",
        attention: str = "sparse",
        record=None,
        *,
        window: int | None = None,
        precision: str = "fp32",
    ) -> torch.Tensor:
        """h `[B, T, d]` -> `[B, T, d]`. positions default to len(cache) + arange(T); new tokens are appended to
        `cache` (a `DSACache`). `record`, if given, is called as `record(layer_idx=..., selected=[B, T, k],
        positions=[T] or [B, T])` whenever a selection was made (sparse / window)."""
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}.")
        positions, given = self.check_input(h, self._check_cache(cache), positions)
        B, T, _ = h.shape
        cos, sin = self.rotary(positions)
        q_latent, q_nope, q_rope = self.project_q(h, cos, sin)
        kv_latent, k_rope = self.project_kv(h, cos, sin)
        if cache is not None:
            kv_latent, k_rope = cache.latent.append(kv_latent, k_rope)  # [B, S, kv_lora_rank], [B, S, rope]
        selected, _ = self.select(h, q_latent, cos, sin, positions, cache, attention, window=window, precision=precision)
        if cache is not None:
            len(cache)  # both halves must now hold S tokens
        if selected is None:
            out = self.attend(q_nope, q_rope, kv_latent, k_rope, positions, mode=mode, check_positions=given)
        else:
            if record is not None:
                record(layer_idx=self.layer_idx, selected=selected, positions=positions)
            out = self.attend_selected(q_nope, q_rope, kv_latent, k_rope, positions, selected, mode=mode)
        return self.o_proj(out.reshape(B, T, self.num_heads * self.v_head_dim))

    def forward_train(
        self,
        h: torch.Tensor,
        attention: str = "dense",
        *,
        window: int | None = None,
        need_probs: bool = False,
        need_index_scores: bool = False,
        impl: str = "gather",
        rows: torch.Tensor | None = None,
    ) -> AttentionStats:
        """A prefill (positions 0..T-1, no cache) that also returns what the indexer's training needs.

        The indexer always sees *detached* inputs (h and c^Q): its loss never moves the main model, and the
        language-model loss never moves the indexer (REFERENCE.md §5). The top-k itself is chosen without
        gradient (an index has none).
        need_probs: the main attention's probabilities, `[B, T, H, S]` for dense attention, `[B, T, H, k]` over
        the selection otherwise. need_index_scores: the index scores `[B, T, S]` (with gradient for the indexer).
        rows: `[B, P]` query positions; probabilities and index scores are then returned only for those rows
        (`[B, P, ...]`) — all a loss over P positions needs, and much cheaper for the indexer.
        impl: how a selection is computed, "gather" (`sparse_attention`, O(T·k)) or "masked"
        (`dense_masked_attention`, O(T·S), but fewer and larger matmuls: faster on a CPU for short sequences).
        """
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}.")
        if impl not in ("gather", "masked"):
            raise ValueError(f"impl must be 'gather' or 'masked', got {impl!r}.")
        B, T, _ = h.shape
        positions = torch.arange(T, device=h.device)
        cos, sin = self.rotary(positions)
        q_latent, q_nope, q_rope = self.project_q(h, cos, sin)
        kv_latent, k_rope = self.project_kv(h, cos, sin)
        h_i, q_i = h.detach(), q_latent.detach()  # the indexer's inputs: no gradient flows back into the model

        def all_scores():
            return self.indexer(h_i, q_i, cos, sin, positions)  # [B, T, T]

        scores, selected = None, None
        if attention == "sparse":
            if need_index_scores and rows is None:
                scores = all_scores()
                selected = topk_selection(scores.detach(), self.index_topk, positions)
            else:
                with torch.no_grad():
                    selected = topk_selection(all_scores(), self.index_topk, positions)
        elif attention == "window":
            selected = window_selection(positions, window or self.index_topk).expand(B, -1, -1)
        if need_index_scores and rows is not None:  # the indexer's queries only at `rows`, its keys everywhere
            ix, take = self.indexer, rows.unsqueeze(-1)
            cos_r, sin_r = self.rotary(rows)  # [B, P, rope/2]
            q_rows = ix.project_q(q_i.gather(1, take.expand(-1, -1, q_i.shape[-1])), cos_r, sin_r)
            w_rows = ix.head_weights(h_i.gather(1, take.expand(-1, -1, h_i.shape[-1])))
            scores = index_scores(q_rows, w_rows, ix.project_k(h_i, cos, sin), rows)  # [B, P, T]
        elif need_index_scores and scores is None:
            scores = all_scores()

        q_absorbed = torch.einsum("bthd,hdc->bthc", q_nope, self.w_uk())  # [B, T, H, kv_lora_rank]
        if selected is not None and impl == "gather":
            x, probs = sparse_attention(q_absorbed, q_rope, kv_latent, k_rope, selected, self.softmax_scale,
                                        return_probs=True)  # probs [B, T, H, k]
        else:
            allowed = causal_mask(positions, T)
            if selected is not None:
                allowed = allowed & selection_mask(selected, T)
            x, probs = dense_masked_attention(q_absorbed, q_rope, kv_latent, k_rope, allowed, self.softmax_scale,
                                              return_probs=True)  # probs [B, T, H, S]
            if selected is not None and need_probs:  # the probabilities of the selected keys, [B, T, H, k]
                idx = selected.clamp(min=0).unsqueeze(2).expand(-1, -1, probs.shape[2], -1)
                probs = probs.gather(-1, idx).masked_fill((selected < 0).unsqueeze(2), 0.0)
        if rows is not None and need_probs:
            probs = probs.gather(1, rows.view(B, -1, 1, 1).expand(-1, -1, *probs.shape[2:]))  # [B, P, H, ...]
        out = torch.einsum("bthc,hvc->bthv", x, self.w_uv())  # [B, T, H, v_head_dim]
        out = self.o_proj(out.reshape(B, T, self.num_heads * self.v_head_dim))
        return AttentionStats(out, selected, scores, probs if need_probs else None)


# ------------------------------------------------------------------------------------------------ accounting
def core_attention_flops(cfg: ModelConfig, seq_len: int, attention: str = "dense", *, k: int | None = None,
                         mode: str = "absorbed", skip_masked: bool = True) -> int:
    """Matmul FLOPs (2 per multiply-add) of the core attention of a causal prefill of `seq_len` tokens, one layer.

    The query at position t attends n_t = t + 1 keys (dense) or min(t + 1, k) keys (sparse / window). Per
    (query, key) pair and head: absorbed (MQA mode) 2·(C + R) for the score + 2·C for the weighted sum
    (C = kv_lora_rank, R = qk_rope_head_dim; 2·1,088 at the 671B dims); naive (MHA mode) 2·(nope + R) + 2·v.
    Projections are not included (they are the same for every attention).
    skip_masked=False counts what the simple implementations here compute: `dense_masked_attention` scores all
    L² pairs (half of them are masked afterwards) and `sparse_attention` computes all k slots of every query.
    """
    H, C, R = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    per_pair = 2 * H * (2 * C + R) if mode == "absorbed" else 2 * H * (cfg.qk_nope_head_dim + R + cfg.v_head_dim)
    L = seq_len
    k = k or cfg.index_topk
    if attention == "dense":
        pairs = L * (L + 1) // 2 if skip_masked else L * L
    elif skip_masked:
        m = min(k, L)
        pairs = m * (m + 1) // 2 + (L - m) * k  # rows 0..k-1 see t+1 keys, later rows exactly k
    else:
        pairs = L * k
    return per_pair * pairs


def indexer_flops(cfg: ModelConfig, seq_len: int, *, skip_masked: bool = True) -> int:
    """Matmul FLOPs of the lightning indexer's scores for a causal prefill of `seq_len` tokens, one layer:
    per (query, key) pair 2·index_n_heads·index_head_dim (q·k for every indexer head) + 2·index_n_heads (the
    weighted head sum). Still O(L²), but 8,192 MACs per pair at the 671B dims instead of MLA's 139,264."""
    pairs = seq_len * (seq_len + 1) // 2 if skip_masked else seq_len * seq_len
    return pairs * (2 * cfg.index_n_heads * cfg.index_head_dim + 2 * cfg.index_n_heads)


def attention_flops_per_token(cfg: ModelConfig, position: int, attention: str = "dense", *, phase: str = "decode",
                              fp8_indexer: bool = True) -> dict[str, float]:
    """Attention FLOPs for ONE token at `position` (it sees position + 1 keys), per layer, in bf16-equivalent
    FLOPs: {"core": ..., "indexer": ..., "total": ...}.

    phase "decode": MQA (absorbed) mode, as deployed; "prefill": MHA (naive) mode for dense attention (what
    prefill uses), MQA mode for DSA (FlashMLA's sparse prefill kernel). The indexer runs in FP8, at twice the bf16
    rate on Hopper: with `fp8_indexer` its FLOPs count half. Projections and MoE are not included.
    """
    n = position + 1
    H, C, R = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    mqa = 2 * H * (2 * C + R)
    mha = 2 * H * (cfg.qk_nope_head_dim + R + cfg.v_head_dim)
    if attention == "dense":
        core = n * (mha if phase == "prefill" else mqa)
        idx = 0.0
    elif attention == "sparse":
        core = min(n, cfg.index_topk) * mqa
        idx = n * (2 * cfg.index_n_heads * cfg.index_head_dim + 2 * cfg.index_n_heads) * (0.5 if fp8_indexer else 1.0)
    else:
        raise ValueError(f"attention must be 'dense' or 'sparse', got {attention!r}.")
    return {"core": float(core), "indexer": float(idx), "total": float(core + idx)}


def time_attention(lengths, *, heads: int = 4, latent: int = 64, rope: int = 16, k: int = 64, index_heads: int = 4,
                   index_dim: int = 32, repeats: int = 3, seed: int = 0, chunk: int = 256) -> dict[str, list[float]]:
    """Median CPU seconds of one layer's core attention for a prefill of each length (batch 1, random tensors):
    "dense" (`dense_masked_attention`, causal mask: O(L²)), "sparse" (`sparse_attention` over k selected keys:
    O(L·k)) and "indexer" (`index_scores`: O(L²) with a small constant). The selection is a window, so that
    only attention is timed, not the top-k."""
    import statistics
    import time

    from dslib.indexer import index_scores

    g = torch.Generator().manual_seed(seed)
    out = {"dense": [], "sparse": [], "indexer": []}
    for L in lengths:
        qa, qr = torch.randn(1, L, heads, latent, generator=g), torch.randn(1, L, heads, rope, generator=g)
        lat, kr = torch.randn(1, L, latent, generator=g), torch.randn(1, L, rope, generator=g)
        qi, wi, ki = torch.randn(1, L, index_heads, index_dim, generator=g), torch.randn(1, L, index_heads, generator=g), torch.randn(1, L, index_dim, generator=g)
        pos = torch.arange(L)
        allowed = causal_mask(pos, L)
        sel = window_selection(pos, k)
        runs = {
            "dense": lambda: dense_masked_attention(qa, qr, lat, kr, allowed, 0.1),
            "sparse": lambda: sparse_attention(qa, qr, lat, kr, sel, 0.1, chunk=chunk),
            "indexer": lambda: index_scores(qi, wi, ki, pos, chunk=chunk),
        }
        with torch.no_grad():
            for name, fn in runs.items():
                fn()  # warm-up
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                out[name].append(statistics.median(times))
    return out
