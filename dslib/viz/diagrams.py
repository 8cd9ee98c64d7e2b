"""Diagrams: one picture per chapter of how the data flows, drawn with plotly shapes and annotations.

Pure functions like the rest of `dslib.viz`: they take a config (or, for the router, one token's numbers) and return
a `plotly.graph_objects.Figure`; every size written on a diagram is computed from what they are given, so the
picture of a small config shows the small config's sizes. No chapter module is imported (`cfg` is any object with
the `ModelConfig` field names).
"""
from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from dslib.viz.common import COLORS

__all__ = [
    "kv_cache_step_diagram",
    "mla_dataflow_diagram",
    "dsa_pipeline_diagram",
    "routing_groups_diagram",
    "model_diagram",
]

_INK = "#333333"
_PALE = {"cache": "#FDE2D6", "compute": "#E4ECFB", "weight": "#F3F3F3", "select": "#D9F5FA", "out": "#E2F6EC",
         "dropped": "#F7F7F7"}


def _canvas(title: str, width: float, height: float, px: int) -> go.Figure:
    fig = go.Figure()
    fig.update_xaxes(visible=False, range=[0, width], fixedrange=True)
    fig.update_yaxes(visible=False, range=[0, height], fixedrange=True)
    fig.update_layout(title=title, template="plotly_white", height=px, margin=dict(l=10, r=10, t=50, b=10),
                      showlegend=False, hovermode=False)
    return fig


def _box(fig: go.Figure, x0: float, y0: float, x1: float, y1: float, text: str, *, fill: str, line: str = _INK,
         width: float = 1.2, dash: str | None = None, size: int = 12, color: str = "#111") -> None:
    fig.add_shape(type="rect", x0=x0, y0=y0, x1=x1, y1=y1, fillcolor=fill, layer="below",
                  line=dict(color=line, width=width, dash=dash))
    if text:
        fig.add_annotation(x=(x0 + x1) / 2, y=(y0 + y1) / 2, text=text, showarrow=False,
                           font=dict(size=size, color=color))


def _arrow(fig: go.Figure, x0: float, y0: float, x1: float, y1: float, text: str = "", *, color: str = _INK,
           size: int = 11, dy: float = 0.0) -> None:
    fig.add_annotation(x=x1, y=y1, ax=x0, ay=y0, xref="x", yref="y", axref="x", ayref="y", text="", showarrow=True,
                       arrowhead=2, arrowsize=1.2, arrowwidth=1.4, arrowcolor=color)
    if text:
        fig.add_annotation(x=(x0 + x1) / 2, y=(y0 + y1) / 2 + dy, text=text, showarrow=False,
                           font=dict(size=size, color=color), bgcolor="rgba(255,255,255,0.85)")


def _note(fig: go.Figure, x: float, y: float, text: str, *, size: int = 12, color: str = "#444", align: str = "left",
          anchor: str = "left") -> None:
    fig.add_annotation(x=x, y=y, text=text, showarrow=False, font=dict(size=size, color=color), align=align,
                       xanchor=anchor)


# ----------------------------------------------------------------------------------------------------- chapter 1
def kv_cache_step_diagram(cached: int = 6, *, kv_heads: int = 2, heads: int = 4, head_dim: int = 64,
                          dtype_bytes: int = 2) -> go.Figure:
    """One decode step with a KV cache: the new token's key and value are appended to the cached ones, then its
    query attends over all `cached + 1` keys. The bytes one token adds (per layer) are computed from the sizes."""
    fig = _canvas("One decode step with a KV cache: append, then attend", 100, 50, 380)
    n = cached + 1
    cell = min(8.0, 56.0 / n)
    x0 = 30
    for name, y in (("K cache", 30), ("V cache", 18)):
        _note(fig, 2, y + 3, f"<b>{name}</b><br>[B, {kv_heads} KV heads, S, {head_dim}]", size=11)
        for i in range(n):
            new = i == n - 1
            _box(fig, x0 + i * cell, y, x0 + (i + 1) * cell - 0.6, y + 6, "new" if new else str(i),
                 fill=COLORS["cache"] if new else _PALE["cache"], size=10, color="white" if new else "#111",
                 width=2.0 if new else 1.0)
    xn = x0 + (n - 1) * cell
    _box(fig, xn - 3, 42, xn + cell + 3, 48, "new token", fill=_PALE["compute"], size=11)
    _arrow(fig, xn + cell / 2 - 1, 42, xn + cell / 2 - 1, 36.4, "k", size=10)
    fig.add_shape(type="path", path=f"M {xn + cell + 3} 45 L {xn + cell + 6} 45 L {xn + cell + 6} 21 "
                                    f"L {xn + cell + 0.4} 21", line=dict(color=_INK, width=1.4))
    _arrow(fig, xn + cell + 1.5, 21, xn + cell - 0.4, 21)
    _note(fig, xn + cell + 6.5, 33, "v", size=11)
    _note(fig, xn + cell + 6.5, 40, "append", size=10)
    _box(fig, 8, 40, 22, 47, f"q  ({heads} heads)", fill=_PALE["compute"], size=11)
    _arrow(fig, xn - 3, 45, 22.2, 43.5, "q", size=10)
    for i in range(n):  # the query meets every cached key
        _arrow(fig, 20, 40, x0 + (i + 0.5) * cell, 36.2, color="#8A8A8A")
    _note(fig, 2, 37.5, f"scores with all {n} keys", size=10)
    _arrow(fig, x0 + n * cell / 2, 17.8, x0 + n * cell / 2, 9.6, "softmax-weighted sum of the values", size=10)
    _box(fig, x0 + n * cell / 2 - 14, 3, x0 + n * cell / 2 + 14, 9.5, f"out  [B, {heads}, 1, {head_dim}]",
         fill=_PALE["out"], size=11)
    per_token = 2 * kv_heads * head_dim * dtype_bytes
    _note(fig, 2, 8, f"each token adds 2 × {kv_heads} × {head_dim} × {dtype_bytes} B<br>= <b>{per_token:,} B</b> per "
                     "layer: memory grows<br>linearly; each step reads it all", size=11)
    return fig


# ----------------------------------------------------------------------------------------------------- chapter 2
def mla_dataflow_diagram(cfg) -> go.Figure:
    """MLA's two computation orders from the same latent cache: naive (MHA mode: up-project every cached latent to
    per-head keys and values) and absorbed (MQA mode: fold W_UK into the query, attend over the shared latent,
    apply W_UV after the weighted sum). Sizes per cached token from `cfg`."""
    H, c, r = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    nope, v = cfg.qk_nope_head_dim, cfg.v_head_dim
    fig = _canvas("MLA: the same cache, two orders of computation", 100, 64, 470)
    fig.update_yaxes(range=[-2, 64])
    # the shared cache, left
    _box(fig, 1, 24, 17, 40, f"<b>latent cache</b><br>c<sup>KV</sup>: {c}<br>k<sup>R</sup>: {r}<br>= {c + r} values<br>"
                             "per token", fill=_PALE["cache"], size=11)
    # naive lane (top)
    _note(fig, 20, 61, "<b>naive (MHA mode)</b>: prefill", size=12, color=COLORS["mha"])
    _box(fig, 22, 46, 36, 56, "kv_b_proj<br>W<sub>UK</sub>, W<sub>UV</sub>", fill=_PALE["weight"], size=11)
    _box(fig, 41, 45, 60, 57, f"per-head K, V<br>{H} × ({nope + r} + {v})<br>= {H * (nope + r + v):,} values / token",
         fill=_PALE["compute"], size=11, line=COLORS["mha"])
    _box(fig, 65, 46, 80, 56, "attention<br>per head", fill=_PALE["compute"], size=11)
    _box(fig, 84, 46, 99, 56, f"o [{H} × {v}]<br>→ o_proj", fill=_PALE["out"], size=11)
    _arrow(fig, 17, 37, 22, 50)
    _arrow(fig, 36, 51, 41, 51)
    _arrow(fig, 60, 51, 65, 51)
    _arrow(fig, 80, 51, 84, 51)
    # absorbed lane (bottom)
    _note(fig, 20, 0.2, "<b>absorbed (MQA mode)</b>: decode, and DSA", size=12, color=COLORS["mla"])
    _box(fig, 22, 3, 36, 13, f"q<sup>C</sup> → W<sub>UK</sub><sup>T</sup><br>q̃: {H} × {c}", fill=_PALE["weight"],
         size=11)
    _box(fig, 41, 2, 60, 16, f"attention over the<br>shared [c<sup>KV</sup> | k<sup>R</sup>]<br>reads {c + r} values / "
                             "token", fill=_PALE["compute"], size=11, line=COLORS["mla"])
    _box(fig, 65, 3, 80, 13, f"x [{H} × {c}]<br>→ W<sub>UV</sub>", fill=_PALE["weight"], size=11)
    _box(fig, 84, 3, 99, 13, f"o [{H} × {v}]<br>→ o_proj", fill=_PALE["out"], size=11)
    _arrow(fig, 17, 27, 45, 16.2)
    _arrow(fig, 36, 8, 41, 8)
    _arrow(fig, 60, 8, 65, 8)
    _arrow(fig, 80, 8, 84, 8)
    ratio = H * (nope + r + v) / (c + r)
    _note(fig, 56, 32, f"same numbers: q·(W<sub>UK</sub>c) = (W<sub>UK</sub><sup>T</sup>q)·c, and every head<br>"
                       f"reads the same latent, so the absorbed order<br>touches {ratio:.0f}× fewer values per cached "
                       "token", size=11)
    return fig


# ----------------------------------------------------------------------------------------------------- chapter 3
def dsa_pipeline_diagram(cfg) -> go.Figure:
    """DeepSeek Sparse Attention for one query: the lightning indexer scores every earlier token from its own key
    cache, top-k keeps `index_topk`, only those latents are gathered for MLA's absorbed attention. Sizes from
    `cfg` (FP8 cache entries: latent + scales + bf16 rope key; indexer key + one fp32 scale)."""
    HI, DI, k = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
    c, r, H = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_attention_heads
    mla_fp8 = c + 4 * -(-c // 128) + 2 * r
    idx_fp8 = DI + 4 * -(-DI // 128)
    fig = _canvas("DeepSeek Sparse Attention: score everything cheaply, attend to k", 100, 60, 460)
    _box(fig, 1, 40, 15, 52, "query token<br>h<sub>t</sub>, c<sup>Q</sup><sub>t</sub>", fill=_PALE["compute"], size=11)
    # indexer lane
    _box(fig, 20, 40, 42, 54, f"<b>lightning indexer</b><br>{HI} heads × {DI}, ReLU,<br>weights w<sub>t,j</sub> (FP8)",
         fill=_PALE["select"], size=11, line=COLORS["indexer"])
    _box(fig, 20, 24, 42, 33, f"indexer key cache<br>{idx_fp8} B / token", fill=_PALE["cache"], size=11)
    _box(fig, 47, 40, 64, 54, "I[t, s] for every<br>s ≤ t: O(L)<br>per query", fill=_PALE["select"], size=11)
    _box(fig, 69, 40, 84, 54, f"<b>top-k</b><br>k = {k:,}<br>(all if t < k)", fill=_PALE["select"], size=11,
         line=COLORS["indexer"])
    _arrow(fig, 15, 46, 20, 46)
    _arrow(fig, 31, 33, 31, 40, "k<sub>s</sub>", size=10)
    _arrow(fig, 42, 47, 47, 47)
    _arrow(fig, 64, 47, 69, 47)
    # attention lane
    _box(fig, 20, 4, 42, 14, f"MLA latent cache<br>{mla_fp8} B / token (FP8)", fill=_PALE["cache"], size=11)
    _box(fig, 47, 3, 64, 15, f"gather the k<br>selected latents<br>[k, {c + r}]", fill=_PALE["compute"], size=11,
         line=COLORS["sparse"])
    _box(fig, 69, 3, 84, 15, f"absorbed MLA<br>{H} heads over k<br>O(k) per query", fill=_PALE["compute"], size=11,
         line=COLORS["sparse"])
    _box(fig, 88, 5, 99, 13, "W<sub>UV</sub>,<br>o_proj", fill=_PALE["out"], size=11)
    _arrow(fig, 76, 40, 56, 15, "indices (one set for all heads)", size=10, dy=2)
    _arrow(fig, 42, 9, 47, 9)
    _arrow(fig, 64, 9, 69, 9)
    _arrow(fig, 84, 9, 88, 9)
    _note(fig, 1, 28, f"per (query, key) pair:<br>indexer {HI * DI:,} MACs (FP8)<br>"
                      f"MLA {H * (2 * c + r):,} MACs (bf16)", size=11)
    return fig


# ----------------------------------------------------------------------------------------------------- chapter 4
def routing_groups_diagram(scores: Sequence[float], bias: Sequence[float], group_kept: Sequence[bool] | None,
                           topk_idx: Sequence[int], topk_weight: Sequence[float], n_group: int,
                           *, title: str = "") -> go.Figure:
    """One token through the gate, group by group: each box is a group (one node in deployment) with its experts;
    the number on a group is its score (the sum of its two best biased scores), dropped groups are greyed, the
    chosen experts are filled and carry their weight. scores, bias [E]; group_kept [G] (None: all kept);
    topk_idx, topk_weight [k]."""
    s = [float(v) for v in (scores.tolist() if hasattr(scores, "tolist") else scores)]
    b = [float(v) for v in (bias.tolist() if hasattr(bias, "tolist") else bias)]
    E = len(s)
    per = E // n_group
    kept = [True] * n_group if group_kept is None else [
        bool(v) for v in (group_kept.tolist() if hasattr(group_kept, "tolist") else group_kept)]
    idx = [int(v) for v in (topk_idx.tolist() if hasattr(topk_idx, "tolist") else topk_idx)]
    wts = [float(v) for v in (topk_weight.tolist() if hasattr(topk_weight, "tolist") else topk_weight)]
    chosen = dict(zip(idx, wts))
    cols = min(n_group, 4)
    rows = -(-n_group // cols)
    fig = _canvas(title or f"The gate, one token: {n_group} groups, {sum(kept)} kept, {len(idx)} experts chosen",
                  100, 4 + 22 * rows, 140 + 150 * rows)
    width = 96 / cols
    ecols = min(per, 8)
    erows = -(-per // ecols)
    for gi in range(n_group):
        gx, gy = 2 + (gi % cols) * width, 5 + (rows - 1 - gi // cols) * 22
        biased = sorted((s[e] + b[e] for e in range(gi * per, (gi + 1) * per)), reverse=True)
        score = sum(biased[:2])
        _box(fig, gx, gy, gx + width - 2, gy + 19, "", fill="white" if kept[gi] else _PALE["dropped"],
             line=_INK if kept[gi] else "#BBBBBB", width=2.0 if kept[gi] else 1.0, dash=None if kept[gi] else "dot")
        label = f"group {gi}: {score:.2f}" + ("" if kept[gi] else " (dropped)")
        _note(fig, gx + 1, gy + 17, label, size=11, color=_INK if kept[gi] else "#999")
        cw = (width - 4) / ecols
        ch = 12 / erows
        for j in range(per):
            e = gi * per + j
            ex, ey = gx + 1 + (j % ecols) * cw, gy + 1.5 + (erows - 1 - j // ecols) * ch
            fill = COLORS["sparse"] if e in chosen else ("#DDE6F7" if kept[gi] else "#EEEEEE")
            _box(fig, ex, ey, ex + cw - 0.6, ey + ch - 0.8, f"{chosen[e]:.2f}" if e in chosen else str(e),
                 fill=fill, size=9, color="white" if e in chosen else ("#333" if kept[gi] else "#AAA"),
                 line="#999", width=0.6)
    _note(fig, 2, 2, "group score = sum of its 2 best (s + bias); the best groups are kept; top-k of s + bias in "
                       "them; filled: chosen, with weight = s renormalised × scale", size=11)
    return fig


# ----------------------------------------------------------------------------------------------------- chapter 5
def model_diagram(cfg) -> go.Figure:
    """The whole model as the checkpoint names it: embedding, `num_hidden_layers` decoder layers (RMSNorm → DSA →
    residual, RMSNorm → dense FFN in the first `first_k_dense_replace` layers / MoE after → residual), final norm
    and LM head. Parameter counts per part from `cfg.param_counts()`."""
    c = cfg.param_counts()
    L, dense = cfg.num_hidden_layers, cfg.first_k_dense_replace
    fig = _canvas("DeepSeek-V3.2 as the checkpoint names it", 100, 78, 560)

    def m(n):
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"

    _box(fig, 30, 70, 70, 76, f"model.embed_tokens  [{cfg.vocab_size:,} × {cfg.hidden_size:,}]", fill=_PALE["weight"],
         size=11)
    _box(fig, 10, 16, 90, 66, "", fill="white", width=1.6)
    _note(fig, 12, 63.5, f"<b>model.layers.N</b>, N = 0 … {L - 1}", size=12)
    _box(fig, 30, 55, 70, 60, "input_layernorm (RMSNorm)", fill=_PALE["weight"], size=11)
    _box(fig, 22, 43, 78, 52, f"<b>self_attn</b>: MLA ({m(c['attention'])}) + indexer ({m(c['indexer'])})<br>"
                              "q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj, indexer.*",
         fill=_PALE["compute"], size=11, line=COLORS["sparse"])
    _box(fig, 30, 35, 70, 40, "post_attention_layernorm (RMSNorm)", fill=_PALE["weight"], size=11)
    _box(fig, 13, 19, 48, 32, f"<b>mlp</b>, layers 0 … {dense - 1}:<br>dense SwiGLU<br>{m(c['dense_mlp'])}",
         fill=_PALE["compute"], size=11)
    _box(fig, 52, 19, 87, 32, f"<b>mlp</b>, layers {dense} … {L - 1}: MoE<br>gate + {cfg.n_routed_experts} experts + "
                              f"{cfg.n_shared_experts} shared<br>{m(c['moe_mlp'])} stored, "
                              f"{m((cfg.num_experts_per_tok + cfg.n_shared_experts) * c['expert'])} used per token",
         fill=_PALE["compute"], size=11, line=COLORS["mla"])
    _box(fig, 30, 8, 70, 13, "model.norm (RMSNorm)", fill=_PALE["weight"], size=11)
    _box(fig, 30, 1, 70, 6, f"lm_head → logits [{cfg.vocab_size:,}]", fill=_PALE["out"], size=11)
    _arrow(fig, 50, 70, 50, 60.2)
    _arrow(fig, 50, 55, 50, 52.2)
    _arrow(fig, 50, 43, 50, 40.2, "+ residual", size=10)
    _arrow(fig, 50, 35, 30, 32.2)
    _arrow(fig, 50, 35, 70, 32.2)
    _arrow(fig, 50, 19, 50, 13.2, "+ residual", size=10)
    _arrow(fig, 50, 8, 50, 6.2)
    return fig
