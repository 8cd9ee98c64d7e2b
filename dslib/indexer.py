"""The lightning indexer of DeepSeek Sparse Attention, its key cache and its training losses (chapter 3).

For every query token t and every earlier token s the indexer computes a cheap relevance score

    I[t,s] = Σ_j  w[t,j] · ReLU( q[t,j] · k[s] )                      (j = 1..index_n_heads)

with index_n_heads small query heads q[t,j] (from MLA's query latent c^Q, shared with the attention), ONE key
k[s] per token (like MQA; cached for decode), and per-head weights w[t,j] from the token itself. The scales of
the reference are folded into w: w[t,j] = (W_w h[t])_j · index_n_heads^-1/2 · index_head_dim^-1/2
(REFERENCE.md §4.2). RoPE (half-split layout, unlike MLA's interleaved one) rotates the FIRST
qk_rope_head_dim dimensions of q and k. Top-k of I picks the tokens MLA attends to (`dslib.sparse`).

Parameter names are the checkpoint's: `wq_b`, `wk`, `k_norm` (a LayerNorm with bias), `weights_proj`.

The deployed model computes I in FP8 after a Hadamard rotation (REFERENCE.md §4.3); `fp8_index_scores`
simulates that path so its effect on the selection can be measured. `indexer_kl_loss` is the training loss
of both stages of the paper's recipe (REFERENCE.md §5).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dslib.attention import batched_positions, causal_mask
from dslib.config import ModelConfig
from dslib.fp8 import act_quant
from dslib.kv_cache import LayerCache
from dslib.rope import apply_rope_half

PRECISIONS = ("fp32", "fp8")  # the indexer's arithmetic: exact, or the deployed FP8 path (simulated)


class IndexerKeyCache(LayerCache):
    """Per-layer cache of the indexer keys `index_keys [B, S, index_head_dim]` (after k_norm and RoPE), one per token:
    chapter 1's container again. `dslib.sparse.DSACache` keeps them next to MLA's latents.

    The deployed model stores them in FP8 with one fp32 scale per key (132 bytes per token at the 671B dims);
    here they stay in the model dtype.
    """

    fields = ("index_keys",)

    @property
    def index_keys(self) -> torch.Tensor:
        return self.buffers["index_keys"].view()


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x `[B or 1, T, ...]` at the query indices `rows` `[B, P]` -> `[B, P, ...]`: row p of batch b is
    x[b, rows[b, p]]."""
    x = x.expand(rows.shape[0], *x.shape[1:])
    idx = rows.view(*rows.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


class LightningIndexer(nn.Module):
    """Scores every (query, earlier token) pair cheaply so that attention can keep only the top-k.

    Inputs per layer: h `[B, T, d]` (the attention's pre-norm output), q_latent `[B, T, q_lora_rank]`
    (MLA's normalised query latent c^Q; with q_lora_rank null, h), cos/sin from the shared `RotaryEmbedding`.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        q_in = config.q_lora_rank or config.hidden_size
        self.wq_b = nn.Linear(q_in, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)

    # ---- the three projections
    def _rope_first(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """[rope | rest] layout: half-split RoPE on the first rope_dim dims, the rest passes through."""
        x_rope, x_pass = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([apply_rope_half(x_rope, cos, sin), x_pass], dim=-1)

    def project_q(self, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """q `[B, T, index_n_heads, index_head_dim]` = RoPE(wq_b(c^Q))."""
        B, T, _ = q_latent.shape
        q = self.wq_b(q_latent).view(B, T, self.n_heads, self.head_dim)
        return self._rope_first(q, cos, sin)

    def project_k(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """k `[B, T, index_head_dim]` = RoPE(LayerNorm(wk(h))): one key per token, shared by all heads."""
        return self._rope_first(self.k_norm(self.wk(h)), cos, sin)

    def head_weights(self, h: torch.Tensor) -> torch.Tensor:
        """w `[B, T, index_n_heads]` fp32, both scales folded in: (W_w h) · n_heads^-1/2 · head_dim^-1/2."""
        w = F.linear(h.float(), self.weights_proj.weight.float())
        return w * (self.n_heads**-0.5 * self.head_dim**-0.5)

    # ---- scores
    def forward(
        self,
        h: torch.Tensor,
        q_latent: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        q_positions: torch.Tensor,
        keys: torch.Tensor | None = None,
        *,
        rows: torch.Tensor | None = None,
        precision: str = "fp32",
        chunk: int = 256,
    ) -> torch.Tensor:
        """index_scores `[B, T, S]` fp32 of the T queries (h, q_latent at `q_positions`) against the S keys, -inf
        at future keys (key s is visible to the query at position p iff s <= p).

        keys: every key so far `[B, S, index_head_dim]` (cached + new, as `project_k` makes them); default: the
        keys of these T tokens (a prefill). rows `[B, P]`: score only the queries at these indices of the T (in a
        prefill from position 0, the positions themselves) -> `[B, P, S]`; all a loss over P positions needs, and
        T/P times cheaper. precision: "fp32" (exact arithmetic, as transformers does) or "fp8" (the deployed
        Hadamard + FP8 path, simulated; see `fp8_index_scores`).
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
        keys = self.project_k(h, cos, sin) if keys is None else keys  # [B, S, D_I]
        if rows is not None:  # the queries at `rows` only; the keys stay all S
            cos, sin = (take_rows(t if t.dim() == 3 else t[None], rows) for t in (cos, sin))
            h, q_latent = take_rows(h, rows), take_rows(q_latent, rows)
            q_positions = take_rows(batched_positions(q_positions), rows)
        q = self.project_q(q_latent, cos, sin)  # [B, T, H_I, D_I]
        w = self.head_weights(h)  # [B, T, H_I]
        scores = index_scores if precision == "fp32" else fp8_index_scores
        return scores(q, w, keys, q_positions, chunk=chunk)


def index_scores(
    q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, q_positions: torch.Tensor, *, chunk: int = 256
) -> torch.Tensor:
    """I[t,s] = Σ_j w[t,j] · ReLU(q[t,j] · k[s]), future keys -inf. q `[B, T, H, D]`, w `[B, T, H]`,
    k `[B, S, D]` → `[B, T, S]` fp32.

    Computed `chunk` queries at a time so the per-head intermediate `[B, chunk, H, S]` stays small (the head
    sum happens inside the chunk; REFERENCE.md §4.6)."""
    B, T, H, D = q.shape
    pos = batched_positions(q_positions).expand(B, T)
    kf = k.float()
    out = []
    for start in range(0, T, chunk):
        sl = slice(start, start + chunk)
        logits = torch.einsum("bthd,bsd->bths", q[:, sl].float(), kf).relu()  # [B, c, H, S]
        scores = torch.einsum("bths,bth->bts", logits, w[:, sl])  # [B, c, S]
        out.append(scores.masked_fill(~causal_mask(pos[:, sl], k.shape[1]), float("-inf")))
    return torch.cat(out, dim=1)


# ------------------------------------------------------------------- the deployed precision path (simulated)
def hadamard(n: int, *, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix Ĥ = H_n / √n (n a power of two): Ĥ Ĥᵀ = I and Ĥ = Ĥᵀ."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {n} (index_head_dim).")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return (H / math.sqrt(n)).to(dtype)


def fp8_index_scores(
    q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, q_positions: torch.Tensor, *, rotate: bool = True,
    quantize: bool = True, chunk: int = 256,
) -> torch.Tensor:
    """The deployed indexer's arithmetic: rotate q and k by Ĥ (dot products unchanged, outliers spread out),
    quantise each 128-vector to e4m3 with a power-of-two scale, then (REFERENCE.md §4.3)

        I[t,s] = sk[s] · Σ_j ( w[t,j] · sq[t,j] · ReLU(q8[t,j] · k8[s]) )      (fp32 accumulation)

    The positive scales pass through the ReLU exactly. `rotate=False` / `quantize=False` switch either step off
    (with both off this equals `index_scores` up to rounding)."""
    if rotate:
        Hd = hadamard(q.shape[-1], dtype=torch.float32).to(q.device)
        q, k = q.float() @ Hd, k.float() @ Hd  # Ĥ is symmetric: x @ Ĥ = Ĥ x
    if not quantize:
        return index_scores(q, w, k, q_positions, chunk=chunk)
    q8, sq = act_quant(q)  # [B, T, H, D], [B, T, H, 1]
    k8, sk = act_quant(k)  # [B, S, D], [B, S, 1]
    scores = index_scores(q8.float(), w * sq.squeeze(-1), k8.float(), q_positions, chunk=chunk)
    return scores * sk.squeeze(-1).unsqueeze(1)  # [B, T, S] · [B, 1, S]


# ------------------------------------------------------------------------------------------ training losses
def attention_target(probs: torch.Tensor) -> torch.Tensor:
    """The indexer's target p[t,:]: main-attention probabilities `[B, T, H, S]` summed over heads and
    L1-normalised over keys → `[B, T, S]` (every head's row sums to 1, so this is the head average)."""
    p = probs.float().sum(dim=2)
    return p / p.sum(dim=-1, keepdim=True).clamp(min=1e-30)


def indexer_kl_loss(target: torch.Tensor, scores: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """KL( target ‖ softmax(scores) ), summed over keys, averaged over queries (weighted by `weight` [B, T]).

    Stage 1 (dense warm-up): target `[B, T, S]` from `attention_target` of dense attention, scores = the index
    scores `[B, T, S]` (-inf at future keys). Stage 2 (sparse): both gathered at the selected keys `[B, T, k]`
    (-inf at empty slots), so the KL only runs over the selected set S_t.
    Terms with target 0 contribute 0 (never 0·(-inf)).
    """
    if target.shape != scores.shape:
        raise ValueError(f"target {tuple(target.shape)} and scores {tuple(scores.shape)} must have the same shape.")
    target = target.detach().float()
    log_q = torch.log_softmax(scores.float(), dim=-1)
    log_q = log_q.masked_fill(target <= 0, 0.0)  # avoids 0 * -inf
    per_query = (torch.xlogy(target, target) - target * log_q).sum(-1)  # [B, T]
    if weight is None:
        return per_query.mean()
    weight = weight.float()
    return (per_query * weight).sum() / weight.sum().clamp(min=1.0)
