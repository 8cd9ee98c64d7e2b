"""Figures of chapter 6 (the full-size model on GPUs). Pure functions: recorded numbers in, plotly figures out.

They read the plain lists of a recording (`dslib.record.SummaryRecorder.to_dict()`, shipped as JSON in data/), so
the same figures draw a live GPU run and a replay on a laptop. Figures shown inside widgets stay small (uint8
heatmaps, binned strips): a widget output above ~64 KB stalls headless notebook runs.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from dslib.viz.common import COLORS, styled

__all__ = [
    "distance_bin_labels", "distance_histogram_figure", "selection_strip_figure", "layer_overlap_figure",
    "neighbour_overlap_figure", "beyond_window_figure", "expert_load_grid_figure", "load_imbalance_figure",
    "ep_traffic_figure", "layer_time_figure", "kernel_time_figure", "memory_plan_figure", "value_histogram_figure",
]

PHASE_COLORS = {"weights": "#7F7F7F", "indexer": COLORS["indexer"], "attention": COLORS["sparse"], "FFN": "#AB63FA"}


def distance_bin_labels(edges: Sequence[int]) -> list[str]:
    """Labels of log-scale distance bins with lower edges [0, 1, 2, 4, ...]: '0', '1', '2-3', '4-7', ..."""
    labels = []
    for j, lo in enumerate(edges):
        hi = edges[j + 1] - 1 if j + 1 < len(edges) else None
        labels.append(str(lo) if hi == lo else (f"{lo:,}-{hi:,}" if hi is not None else f"≥{lo:,}"))
    return labels


def _k(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else f"{n:,}"


def distance_histogram_figure(edges: Sequence[int], counts: Mapping[str, Sequence[int]], *, window: int | None = None,
                              title: str = "") -> go.Figure:
    """Share of selected keys at each query-key distance (log-scale bins), one line per label (e.g. per layer).

    edges: lower bin edges [0, 1, 2, 4, ...]; counts: label -> counts per bin. A dashed line marks `window`: a
    sliding window of the same budget sees only distances below it."""
    labels = distance_bin_labels(edges)
    last = max((max((j for j, c in enumerate(cs) if c), default=0) for cs in counts.values()), default=0)
    fig = go.Figure()
    for name, cs in counts.items():
        c = np.asarray(cs, dtype=float)
        share = c / max(c.sum(), 1)
        fig.add_scatter(x=labels[: last + 1], y=share[: last + 1], mode="lines+markers", name=name,
                        hovertemplate=f"{name}<br>distance %{{x}}: %{{y:.1%}} of the selected keys<extra></extra>")
    if window:
        j = next((j for j, e in enumerate(edges) if e >= window), None)
        if j is not None and j <= last:
            fig.add_vline(x=j - 0.5, line_dash="dash", line_color="gray",
                          annotation_text=f"window of {window:,}", annotation_position="top left")
    fig.update_yaxes(tickformat=".0%")
    return styled(fig, title or "How far back the selected keys lie", "query - key distance (tokens, log bins)",
                  "share of selected keys")


def selection_strip_figure(keys: Sequence[int], query: int, n_keys: int | None = None, *, window: int | None = None,
                           bins: int = 512, tokens: Sequence[str] | None = None, top: int = 24,
                           title: str = "") -> go.Figure:
    """The keys one query selected, as a strip over all key positions 0..query (binned: `bins` cells, each
    coloured by how many keys it holds). keys: selected positions in score order (best first); the first `top`
    are also drawn as markers, labelled with their token text when `tokens` (text per position) is given. The
    shaded band is what a sliding window of the same budget would see."""
    n_keys = n_keys or query + 1
    keys = np.asarray(list(keys), dtype=np.int64)
    width = max(1, -(-n_keys // bins))
    counts = np.bincount(keys // width, minlength=-(-n_keys // width)).astype(np.uint16)
    fig = go.Figure(go.Heatmap(
        z=counts[None, :], x0=width / 2, dx=width, y=[""],
        colorscale=[[0, "#F4F6FA"], [1e-9, "#FDD"], [1, COLORS["sparse"]]],
        zmin=0, showscale=False, hovertemplate=f"keys %{{x:,.0f}} ± {width // 2:,}: %{{z}} selected<extra></extra>",
    ))
    window = window or len(keys)
    fig.add_vrect(x0=max(0, query - window + 1), x1=query + 1, fillcolor="gray", opacity=0.15, line_width=0,
                  annotation_text=f"window of {window:,}", annotation_position="top left")
    best = keys[:top]
    text = [tokens[k] if tokens is not None and k < len(tokens) else "" for k in best]
    fig.add_scatter(x=best, y=[""] * len(best), mode="markers", marker=dict(symbol="line-ns-open", size=28,
                    color="black"), name=f"top {len(best)} by index score", text=text,
                    hovertemplate="key %{x:,}" + (": %{text}" if tokens is not None else "") + "<extra></extra>")
    fig.add_vline(x=query, line_color="black", line_width=2)
    beyond = int((keys <= query - window).sum())
    fig = styled(fig, title or f"query at position {query:,}: {len(keys):,} selected keys, {beyond:,} of them beyond "
                 "the window", "key position", "", height=220)
    fig.update_xaxes(range=[0, n_keys])
    return fig


def layer_overlap_figure(layers: Sequence[int], matrix, *, title: str = "") -> go.Figure:
    """Heatmap [L, L]: the share of a query's selected keys that layers i and j have in common (mean over sampled
    queries). 1 on the diagonal; a random selection of k of S keys would share about k/S."""
    m = np.round(np.asarray(matrix, dtype=float), 3)
    fig = go.Figure(go.Heatmap(z=m, x=list(layers), y=list(layers), colorscale="Viridis", zmin=0, zmax=1,
                               colorbar=dict(title="shared"),
                               hovertemplate="layers %{y} and %{x}: %{z:.1%} of the keys in common<extra></extra>"))
    fig = styled(fig, title or "Do layers select the same keys?", "layer", "layer", height=480)
    fig.update_yaxes(autorange="reversed")
    return fig


def neighbour_overlap_figure(layers: Sequence[int], means, offsets: Sequence[int], *, title: str = "") -> go.Figure:
    """Per layer: the share of query p's selected keys that query p + D also selects, one line per offset D."""
    m = np.asarray([[np.nan if v is None else v for v in row] for row in means], dtype=float)
    fig = go.Figure()
    for j, off in enumerate(offsets):
        fig.add_scatter(x=list(layers), y=m[:, j], mode="lines+markers", name=f"query p + {off}",
                        hovertemplate=f"layer %{{x}}: %{{y:.1%}} shared with the query {off} later<extra></extra>")
    fig.update_yaxes(tickformat=".0%", range=[0, 1.02])
    return styled(fig, title or "Neighbouring queries select overlapping keys", "layer", "share of keys in common")


def beyond_window_figure(layers: Sequence[int], beyond: Sequence[int], eligible: Sequence[int], window: int, *,
                         title: str = "") -> go.Figure:
    """Per layer: the share of selected keys (queries at positions >= window) that lie beyond a sliding window of
    the same budget, i.e. that a window would never have seen."""
    share = np.asarray(beyond, dtype=float) / np.maximum(np.asarray(eligible, dtype=float), 1)
    fig = go.Figure(go.Bar(x=list(layers), y=share, marker_color=COLORS["sparse"],
                           hovertemplate="layer %{x}: %{y:.1%} of the selected keys lie beyond the window"
                                         "<extra></extra>"))
    fig.update_yaxes(tickformat=".0%", range=[0, 1])
    return styled(fig, title or f"Selected keys a sliding window of {window:,} would miss", "layer", "share")


def expert_load_grid_figure(load, layers: Sequence[int], n_group: int, *, title: str = "",
                            zmax: float = 3.0) -> go.Figure:
    """Heatmap [layers, experts]: each expert's load relative to its layer's mean (1 = its fair share), groups
    (= nodes / GPUs under expert parallelism) separated and labelled. uint8 cells (tenths), so it stays small."""
    m = np.asarray(load, dtype=float)
    rel = m / np.maximum(m.mean(axis=1, keepdims=True), 1e-9)
    z = np.clip(np.round(rel * 10), 0, 255).astype(np.uint8)
    n_experts = m.shape[1]
    per = n_experts // n_group
    fig = go.Figure(go.Heatmap(
        z=z, x=np.arange(n_experts), y=[str(layer) for layer in layers], zmin=0, zmax=zmax * 10, colorscale="RdBu_r",
        zmid=10, colorbar=dict(title="load / mean", tickvals=[0, 10, 20, 30], ticktext=["0", "1×", "2×", "3×"]),
        hovertemplate="layer %{y}, expert %{x}: %{z}/10 of the mean load<extra></extra>",
    ))
    for g in range(1, n_group):
        fig.add_vline(x=g * per - 0.5, line_color="black", line_width=1)
    for g in range(n_group):
        fig.add_annotation(x=(g + 0.5) * per - 0.5, y=1.0, yref="paper", yanchor="bottom", showarrow=False,
                           text=f"group {g}", font=dict(size=10))
    fig = styled(fig, title or f"Expert load, {len(layers)} MoE layers x {n_experts} experts",
                 f"expert ({n_group} groups of {per})", "layer", height=max(300, min(720, 140 + 9 * len(layers))))
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_layout(margin=dict(t=80))
    return fig


def load_imbalance_figure(layers: Sequence[int], loads: Mapping[str, Sequence[Sequence[int]]], *,
                          title: str = "") -> go.Figure:
    """Per layer: the busiest expert's load over the mean (1 = perfectly even), one line per routing (label ->
    [layers, experts] loads)."""
    fig = go.Figure()
    for name, load in loads.items():
        m = np.asarray(load, dtype=float)
        ratio = m.max(axis=1) / np.maximum(m.mean(axis=1), 1e-9)
        fig.add_scatter(x=list(layers), y=ratio, mode="lines+markers", name=name,
                        hovertemplate=f"{name}<br>layer %{{x}}: busiest expert %{{y:.2f}}× the mean<extra></extra>")
    fig.add_hline(y=1, line_dash="dot", line_color="gray")
    return styled(fig, title or "Load imbalance per layer: max / mean tokens per expert", "layer", "max / mean")


def ep_traffic_figure(layers: Sequence[int], sent: Mapping[str, Sequence[int]], tokens: Sequence[int], ep_gpus: int, *,
                      title: str = "") -> go.Figure:
    """Per layer: token copies sent to other GPUs per routed token, under expert parallelism over `ep_gpus` GPUs,
    one line per routing (label -> copies sent per layer)."""
    fig = go.Figure()
    tok = np.maximum(np.asarray(tokens, dtype=float), 1)
    for name, s in sent.items():
        per = np.asarray(s, dtype=float) / tok
        fig.add_scatter(x=list(layers), y=per, mode="lines+markers", name=f"{name} (mean {per.mean():.2f})",
                        hovertemplate=f"{name}<br>layer %{{x}}: %{{y:.2f}} copies per token<extra></extra>")
    fig.update_yaxes(rangemode="tozero")
    return styled(fig, title or f"All-to-all traffic with the experts spread over {ep_gpus} GPUs",
                  "layer", "copies of a token sent to other GPUs")


def layer_time_figure(timings: Sequence[Mapping], *, title: str = "") -> go.Figure:
    """Stacked bars per layer: seconds spent making/loading its weights, in the indexer, in the rest of the
    attention, and in the FFN (timings: dicts with layer, load_s, attention_s, indexer_s (or None), ffn_s)."""
    layers = [t["layer"] for t in timings]
    idx = [t.get("indexer_s") or 0.0 for t in timings]
    parts = {
        "weights": [t["load_s"] for t in timings],
        "indexer": idx,
        "attention": [t["attention_s"] - i for t, i in zip(timings, idx)],
        "FFN": [t["ffn_s"] for t in timings],
    }
    fig = go.Figure()
    for name, ys in parts.items():
        if name == "indexer" and not any(ys):
            continue
        fig.add_bar(x=layers, y=ys, name=name, marker_color=PHASE_COLORS[name],
                    hovertemplate=f"layer %{{x}} {name}: %{{y:.3f}} s<extra></extra>")
    fig.update_layout(barmode="stack")
    return styled(fig, title or "Where the prefill time goes, layer by layer", "layer", "seconds")


Points = Sequence[tuple[float, float]]


def kernel_time_figure(series: Mapping[str, Points], *, roofline: Mapping[str, Points] | None = None, title: str = "",
                       x_title: str = "context length (tokens)", y_title: str = "time (ms)") -> go.Figure:
    """Measured time against context length, one line per series (label -> [(context, ms), ...]), log-log; the
    roofline series (label -> [(context, ms)]) are drawn dashed: the time at the hardware's peak rate."""
    fig = go.Figure()
    for name, pts in series.items():
        pts = sorted(pts)
        fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=name,
                        hovertemplate=f"{name}<br>%{{x:,}} tokens: %{{y:.3f}} ms<extra></extra>")
    for name, pts in (roofline or {}).items():
        pts = sorted(pts)
        fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines", name=name,
                        line=dict(dash="dash", color="gray"),
                        hovertemplate=f"{name}<br>%{{x:,}}: %{{y:.3f}} ms<extra></extra>")
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return styled(fig, title or "Measured kernel time", x_title, y_title)


def memory_plan_figure(rows: Sequence[Mapping], *, title: str = "") -> go.Figure:
    """Stacked bars per device: the planned bytes (GB) by purpose, against the device's limit (rows as
    `RunPlan.rows()`: keys ending in _GB, plus limit_GB)."""
    fig = go.Figure()
    devices = [r["device"] for r in rows]
    keys = [k for k in rows[0] if k.endswith("_GB") and k not in ("planned_GB", "limit_GB")] if rows else []
    for k in keys:
        fig.add_bar(x=devices, y=[r[k] for r in rows], name=k[:-3].replace("_", " "),
                    hovertemplate=f"{k[:-3]}: %{{y:.1f}} GB<extra></extra>")
    fig.add_scatter(x=devices, y=[r["limit_GB"] for r in rows], mode="markers", name="limit",
                    marker=dict(symbol="line-ew-open", size=40, color="black", line=dict(width=3)))
    fig.update_layout(barmode="stack")
    return styled(fig, title or "Memory plan per device", "device", "GB")


def value_histogram_figure(values, *, bins: int = 100, title: str = "", x_title: str = "value") -> go.Figure:
    """Histogram of numbers (binned here, so the figure holds `bins` bars, not the values)."""
    v = np.asarray(values, dtype=float).ravel()
    counts, edges = np.histogram(v, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure(go.Bar(x=centers, y=counts, width=np.diff(edges), marker_color=COLORS["mla"],
                           hovertemplate="%{x:.3g}: %{y:,}<extra></extra>"))
    return styled(fig, title or "Histogram", x_title, "count")
