"""Figures of chapter 1 (KV caching). Pure functions: numbers in, `plotly.graph_objects.Figure` out."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dslib.viz.common import COLORS, styled

__all__ = [
    "step_time_figure",
    "memory_vs_compute_figure",
    "attention_time_figure",
    "kv_memory_figure",
    "param_accounting_figure",
]

_SCHEME_COLORS = [  # (substring of a label, colour), first match wins
    ("indexer", COLORS["indexer"]), ("MLA-FP8", COLORS["mla_fp8"]), ("MLA", COLORS["mla"]),
    ("MQA", COLORS["mqa"]), ("GQA", COLORS["gqa"]), ("MHA", COLORS["mha"]),
]


def _scheme_color(label: str) -> str:
    return next((c for key, c in _SCHEME_COLORS if key in label), "#888888")


def step_time_figure(context_lens: Sequence[int], seconds: Mapping[str, Sequence[float]], *,
                     title: str = "Time per generated token") -> go.Figure:
    """One line per series (e.g. 'with cache', 'without cache'): milliseconds of one decode step against the
    number of tokens in the context at that step."""
    fig = go.Figure()
    for name, values in seconds.items():
        if len(values) != len(context_lens):
            raise ValueError(f"series {name!r} has {len(values)} values for {len(context_lens)} context lengths.")
        color = COLORS["no_cache"] if "without" in name.lower() else COLORS["cache"]
        fig.add_trace(go.Scatter(x=list(context_lens), y=[1e3 * s for s in values], mode="lines+markers",
                                 name=name, line=dict(color=color), marker=dict(size=4)))
    return styled(fig, title, "tokens in the context", "ms per generated token")


def memory_vs_compute_figure(seq_lens: Sequence[int], cache_bytes: Sequence[float], attention_flops: Sequence[float],
                             *, cache_formula: Sequence[float] | None = None,
                             flops_formula: Sequence[float] | None = None,
                             flops_label: str = "attention FLOPs to generate the sequence") -> go.Figure:
    """Two panels over sequence length: the KV cache's bytes (grows linearly) and the cumulative attention
    FLOPs spent producing the sequence (grows quadratically). Optional formula curves are drawn as lines
    behind the measured points."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("KV cache size: linear", "attention compute: quadratic"))
    panels = [(1, cache_bytes, cache_formula, "cache bytes", COLORS["cache"]),
              (2, attention_flops, flops_formula, flops_label, COLORS["no_cache"])]
    for col, measured, formula, name, color in panels:
        if len(measured) != len(seq_lens):
            raise ValueError(f"{name}: {len(measured)} values for {len(seq_lens)} sequence lengths.")
        if formula is not None:
            fig.add_trace(go.Scatter(x=list(seq_lens), y=list(formula), mode="lines", name=f"{name} (formula)",
                                     line=dict(color=color, width=6), opacity=0.3), row=1, col=col)
        fig.add_trace(go.Scatter(x=list(seq_lens), y=list(measured), mode="markers", name=f"{name} (measured)",
                                 marker=dict(color=color, size=5)), row=1, col=col)
    fig.update_yaxes(title_text="bytes", row=1, col=1)
    fig.update_yaxes(title_text="FLOPs", row=1, col=2)
    fig.update_xaxes(title_text="sequence length (tokens)")
    fig = styled(fig, "What grows with context length", "", "", height=460)
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.22, xanchor="left", x=0),
                      margin=dict(t=80, b=110))
    return fig


def attention_time_figure(seq_lens: Sequence[int], seconds: Sequence[float], *, exponent: float | None = None,
                          title: str = "Causal attention over a whole sequence (prefill), measured") -> go.Figure:
    """Measured seconds against sequence length on log-log axes; `exponent`, if given, adds the fitted
    power law t = c * L^exponent through the last point (slope 1 = linear, 2 = quadratic)."""
    if len(seconds) != len(seq_lens):
        raise ValueError(f"{len(seconds)} timings for {len(seq_lens)} sequence lengths.")
    fig = go.Figure(go.Scatter(x=list(seq_lens), y=[1e3 * s for s in seconds], mode="markers+lines",
                               name="measured (median)", line=dict(color=COLORS["no_cache"])))
    if exponent is not None:
        c = seconds[-1] / seq_lens[-1] ** exponent
        fig.add_trace(go.Scatter(x=list(seq_lens), y=[1e3 * c * n**exponent for n in seq_lens], mode="lines",
                                 name=f"fit: L^{exponent:.2f}", line=dict(dash="dash", color="#444")))
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return styled(fig, title, "sequence length L (tokens)", "milliseconds")


def kv_memory_figure(sizes: Mapping[str, float], *, capacity_bytes: float | None = None,
                     capacity_name: str = "GPU memory", title: str = "KV cache size", log_y: bool = True) -> go.Figure:
    """Bars of cache size (GB = 1e9 bytes) per scheme, labelled with GB and the share of `capacity_bytes`,
    and a dashed horizontal line at the capacity."""
    labels = list(sizes)
    gb = [sizes[k] / 1e9 for k in labels]
    text = [f"{g:,.2f} GB" + (f"<br>{g * 1e9 / capacity_bytes:.0%} of {capacity_name}" if capacity_bytes else "")
            for g in gb]
    fig = go.Figure(go.Bar(x=labels, y=gb, text=text, textposition="outside", showlegend=False,
                           marker_color=[_scheme_color(k) for k in labels]))
    if capacity_bytes:
        cap = capacity_bytes / 1e9
        fig.add_hline(y=cap, line=dict(color="black", dash="dash"))
        # Annotations on a log axis take log10 of the value (shapes do not).
        fig.add_annotation(x=1, xref="paper", xanchor="right", y=math.log10(cap) if log_y else cap, yanchor="bottom",
                           text=f"{capacity_name}: {cap:,.0f} GB", showarrow=False)
    if log_y:
        top = max(gb + [capacity_bytes / 1e9 if capacity_bytes else 0])
        low = min((g for g in gb if g > 0), default=1e-3)
        fig.update_yaxes(type="log", range=[math.log10(low) - 0.5, math.log10(top) + 0.8])
    return styled(fig, title, "", "GB (log scale)" if log_y else "GB", height=430)


def param_accounting_figure(total: Mapping[str, float], active: Mapping[str, float], *,
                            title: str = "Parameters: stored vs used per token") -> go.Figure:
    """Two stacked horizontal bars (billions of parameters): everything stored, and what one token uses.
    `total` and `active` map component name -> parameter count; components missing in `active` count 0."""
    fig = go.Figure()
    palette = ["#636EFA", "#EF553B", "#19D3F3", "#00CC96", "#AB63FA", "#FFA15A", "#B6E880", "#FF97FF", "#FECB52"]
    for i, name in enumerate(total):
        fig.add_trace(go.Bar(y=["used per token", "stored"], x=[active.get(name, 0) / 1e9, total[name] / 1e9],
                             name=name, orientation="h", marker_color=palette[i % len(palette)]))
    fig.update_layout(barmode="stack")
    sums = [sum(active.values()) / 1e9, sum(total.values()) / 1e9]
    for y, s in zip(["used per token", "stored"], sums):
        fig.add_annotation(x=s, y=y, text=f"{s:,.1f}B", showarrow=False, xanchor="left", xshift=4)
    fig = styled(fig, title, "billions of parameters", "", height=360)
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.25, xanchor="left", x=0, traceorder="normal"),
                      margin=dict(b=120))
    return fig
