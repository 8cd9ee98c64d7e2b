"""Figures of chapter 2 (MLA). Pure functions: numbers in, `plotly.graph_objects.Figure` out."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dslib.viz.common import COLORS, styled

__all__ = [
    "low_rank_figure",
    "rope_frequencies_figure",
    "decode_time_figure",
    "mla_costs_figure",
    "attention_heatmap",
]

_MODE_COLORS = {"naive": COLORS["mha"], "absorbed": COLORS["mla"]}


def _scheme_color(name: str) -> str:
    key = name.lower()
    if "fp8" in key:
        return COLORS["mla_fp8"]
    for scheme in ("mha", "gqa", "mqa", "mla"):
        if key.startswith(scheme):
            return COLORS[scheme]
    return "#888888"


def _floats(values) -> list[float]:
    return [float(v) for v in values]


def low_rank_figure(singular_values: Sequence[float], marks: Mapping[str, int] | None = None) -> go.Figure:
    """Share of the matrix's energy (Σσ²) NOT captured by its best rank-r approximation, vs r (log scale).

    `marks` draws labelled vertical lines, e.g. {"kv_lora_rank": 64, "hidden size": 256}.
    """
    sigma2 = [s * s for s in _floats(singular_values)]
    total = sum(sigma2) or 1.0
    left, remaining = [], total
    for s2 in sigma2:
        remaining -= s2
        left.append(max(remaining, 0.0) / total)
    ranks = list(range(1, len(sigma2) + 1))
    fig = go.Figure(go.Scatter(x=ranks, y=[max(v, 1e-16) for v in left], mode="lines", name="energy lost",
                               line=dict(color=COLORS["mla"], width=3)))
    for label, r in (marks or {}).items():
        fig.add_vline(x=r, line_dash="dash", line_color="#555", annotation_text=label, annotation_position="top")
    fig.update_yaxes(type="log")
    return styled(fig, "How much of [K | V] a rank-r latent loses", "rank r of the latent", "relative error² (log)")


def rope_frequencies_figure(plain: Sequence[float], yarn: Sequence[float], low: int | None = None,
                            high: int | None = None) -> go.Figure:
    """Rotation frequency per pair index i, plain RoPE vs YaRN (log scale), with YaRN's blend range shaded."""
    idx = list(range(len(plain)))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=idx, y=_floats(plain), mode="lines+markers", name="plain RoPE θ_i",
                             line=dict(color=COLORS["mha"])))
    fig.add_trace(go.Scatter(x=idx, y=_floats(yarn), mode="lines+markers", name="YaRN",
                             line=dict(color=COLORS["mla"])))
    if low is not None and high is not None:
        fig.add_vrect(x0=low, x1=high, fillcolor="#999", opacity=0.15, line_width=0,
                      annotation_text="blend", annotation_position="top left")
    fig.update_yaxes(type="log", exponentformat="power")
    return styled(fig, "RoPE frequencies: YaRN slows the slow dims down", "pair index i", "radians per position")


def decode_time_figure(contexts: Sequence[int], times: Mapping[str, Sequence[float]]) -> go.Figure:
    """Time of one decode step's attention vs context length, one line per mode ("naive", "absorbed")."""
    fig = go.Figure()
    for mode, ts in times.items():
        fig.add_trace(go.Scatter(x=list(contexts), y=[t * 1e3 for t in _floats(ts)], mode="lines+markers",
                                 name=mode, line=dict(color=_MODE_COLORS.get(mode), width=3)))
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return styled(fig, "Decode attention time per token (CPU)", "context length (tokens)", "ms per token")


def mla_costs_figure(costs: Mapping[str, Mapping[str, float]], title: str = "") -> go.Figure:
    """Bars per scheme: cache of one sequence (GB) and attention GFLOP per decoded token, ratios as labels.

    `costs`: {scheme: {"cache_bytes", "flops_per_token", "vs_mha", "vs_gqa"}} (as `dslib.mla.decode_costs`).
    """
    names = list(costs)
    colors = [_scheme_color(n) for n in names]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("KV cache of one sequence (GB)", "attention GFLOP per token"))
    cache = [costs[n]["cache_bytes"] / 1e9 for n in names]
    labels = [f"{v:.3g} GB" + (f"<br>MHA ÷ {costs[n]['vs_mha']:.1f}" if costs[n]["vs_mha"] != 1 else "")
              for n, v in zip(names, cache)]
    fig.add_trace(go.Bar(x=names, y=cache, marker_color=colors, text=labels, textposition="auto", showlegend=False),
                  row=1, col=1)
    flops = [costs[n]["flops_per_token"] / 1e9 for n in names]
    fig.add_trace(go.Bar(x=names, y=flops, marker_color=colors, text=[f"{v:.3g}" for v in flops],
                         textposition="auto", showlegend=False), row=1, col=2)
    return styled(fig, title or "Decode cost per scheme", "", "", height=420)


def attention_heatmap(probs: Sequence[Sequence[float]], title: str = "attention probabilities") -> go.Figure:
    """Heatmap of one head's attention: rows = query positions, columns = key positions."""
    fig = go.Figure(go.Heatmap(z=[_floats(row) for row in probs], colorscale="Reds", zmin=0,
                               colorbar=dict(title="p")))
    fig.update_yaxes(autorange="reversed")
    fig = styled(fig, title, "key position", "query position", height=460)
    fig.update_layout(yaxis_scaleanchor="x")
    return fig
