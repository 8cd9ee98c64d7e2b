"""Figures of chapter 5 (the full model). Pure functions: numbers in, `plotly.graph_objects.Figure` out."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from dslib.viz.common import COLORS, styled

__all__ = [
    "COMPONENT_COLORS", "checkpoint_bytes_figure", "device_plan_figure", "selection_figure", "gpu_attention_figure",
    "gpu_ffn_figure", "load_memory_figure",
]

COMPONENT_COLORS = {
    "embeddings + head": "#7F7F7F", "attention (MLA)": COLORS["mla"], "indexer": COLORS["indexer"],
    "dense FFN": "#636EFA", "routed experts": "#AB63FA", "shared experts": "#FFA15A", "router": "#00CC96",
    "norms": "#B6E880", "FP8 scales": "#FF6692",
}
VARIANT_COLORS = {"sparse": COLORS["sparse"], "indexer": COLORS["indexer"], "dense_sdpa": COLORS["dense"],
                  "dense_naive": "#7F7F7F", "dense_absorbed": COLORS["mla_fp8"]}


def _np(x) -> np.ndarray:
    return np.asarray(x.tolist() if hasattr(x, "tolist") else x)


def checkpoint_bytes_figure(breakdown: Mapping[str, Mapping[str, float]], *, unit: str = "GB") -> go.Figure:
    """Stacked bars: bytes (already in `unit`) per component, one bar per storage format.

    breakdown: {"FP8 checkpoint": {"routed experts": 653.9, ...}, "bf16": {...}}."""
    fig = go.Figure()
    components = list(dict.fromkeys(c for parts in breakdown.values() for c in parts))
    formats = list(breakdown)
    for comp in components:
        ys = [breakdown[f].get(comp, 0.0) for f in formats]
        fig.add_bar(name=comp, x=formats, y=ys, marker_color=COMPONENT_COLORS.get(comp),
                    hovertemplate=f"{comp}: %{{y:,.2f}} {unit}<extra></extra>")
    totals = [sum(breakdown[f].values()) for f in formats]
    fig.add_scatter(x=formats, y=totals, mode="text", text=[f"{t:,.1f} {unit}" for t in totals],
                    textposition="top center", showlegend=False, hoverinfo="skip")
    fig.update_layout(barmode="stack", legend=dict(orientation="v", x=1.02, y=1, yanchor="top"))
    fig = styled(fig, "Where the bytes of DeepSeek-V3.2's weights are", "", f"weights ({unit})", height=420)
    fig.update_layout(legend=dict(orientation="v", x=1.02, y=1, yanchor="top", xanchor="left"))
    return fig


def device_plan_figure(rows: Sequence[Mapping], *, title: str = "") -> go.Figure:
    """One bar per device: weight GB placed on it (labelled with its layers) against the usable GB.

    rows: dicts with keys device, layers (e.g. "0-9"), weights_GB, usable_GB (as `DevicePlan.rows()`)."""
    devices = [r["device"] for r in rows]
    used = [r["weights_GB"] for r in rows]
    usable = [r["usable_GB"] for r in rows]
    fig = go.Figure()
    fig.add_bar(name="usable memory", x=devices, y=usable, marker_color="#E5ECF6", hoverinfo="skip")
    fig.add_bar(name="weights placed", x=devices, y=used, marker_color=COLORS["mla"],
                text=[f"layers {r['layers']}" + (f" + {r['also']}" if r.get("also") else "") for r in rows],
                textposition="inside", hovertemplate="%{x}: %{y:.1f} GB<extra></extra>")
    fig.update_layout(barmode="overlay")
    return styled(fig, title or "Memory plan: consecutive layers per device", "device", "GB")


def selection_figure(matrix, positions: Sequence[int], *, query: int | None = None, title: str = "") -> go.Figure:
    """Which keys each query attended to: bool matrix [Q, S] (row i = query at positions[i]), selected = dark.

    `query` (a position) is outlined, and its selected keys are listed in the title."""
    m = _np(matrix).astype(float)
    pos = list(positions)
    n_keys = m.shape[1]
    # 0 = future (not visible), 1 = visible but not selected, 2 = selected. uint8 keeps the figure small (1 byte per
    # cell): a widget output of more than ~64 KB stalls headless notebook runs (nbclient) until their timeout.
    visible = np.arange(n_keys)[None, :] <= np.asarray(pos)[:, None]
    z = np.where(m > 0, 2, np.where(visible, 1, 0)).astype(np.uint8)
    fig = go.Figure(go.Heatmap(
        z=z, x=np.arange(n_keys), y=pos, zmin=0, zmax=2, showscale=False,
        colorscale=[[0, "white"], [0.5, "#E5ECF6"], [1, COLORS["sparse"]]],
        hovertemplate="query %{y}, key %{x}<extra></extra>",
    ))
    if query is not None and query in pos:
        fig.add_shape(type="rect", x0=-0.5, x1=n_keys - 0.5, y0=query - 0.5, y1=query + 0.5,
                      line=dict(color="black", width=2))
        row = m[pos.index(query)]
        title = title or f"query at position {query}: {int(row.sum())} of {query + 1} visible keys selected"
    fig = styled(fig, title or "Selected keys per query (dark), visible but skipped (light), future (white)",
                 "key position", "query position", height=460)
    fig.update_yaxes(autorange="reversed")
    return fig


def gpu_attention_figure(rows: Sequence[Mapping], phase: str, *, batch: int | None = None) -> go.Figure:
    """Measured time of one full-size attention layer vs context length, one line per variant (log-log).

    rows: dicts with phase, variant, context, batch, median_ms (as in data/gpu_attention.csv); None ms = skipped."""
    sel = [r for r in rows if r["phase"] == phase and (batch is None or int(r["batch"]) == batch)
           and r.get("median_ms") not in (None, "")]
    fig = go.Figure()
    for variant in dict.fromkeys(r["variant"] for r in sel):
        pts = sorted((int(r["context"]), float(r["median_ms"])) for r in sel if r["variant"] == variant)
        fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=variant,
                        line=dict(color=VARIANT_COLORS.get(variant)),
                        hovertemplate=f"{variant}<br>L=%{{x}}: %{{y:.3f}} ms<extra></extra>")
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    what = "prefill of L tokens" if phase == "prefill" else f"decode of 1 token over L cached, batch {batch}"
    return styled(fig, f"One full-size attention layer, {what}", "context length L (tokens)", "time (ms)")


def gpu_ffn_figure(rows: Sequence[Mapping]) -> go.Figure:
    """Measured FFN time per token count: MoE block vs dense FFN (rows as in data/gpu_moe.csv), log-log."""
    fig = go.Figure()
    for block, color in (("moe", "#AB63FA"), ("dense_mlp", "#636EFA")):
        pts = sorted((int(r["tokens"]), float(r["median_ms"])) for r in rows
                     if r["block"] == block and r.get("median_ms") not in (None, ""))
        fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=block,
                        line=dict(color=color), hovertemplate=f"{block}<br>%{{x}} tokens: %{{y:.3f}} ms<extra></extra>")
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return styled(fig, "One full-size FFN layer: MoE (256+1 experts) vs the dense FFN", "tokens in the batch",
                  "time (ms)")


def load_memory_figure(rows: Sequence[Mapping]) -> go.Figure:
    """Extra host memory of loading vs the largest shard, per shard size (rows as in data/load_memory.csv)."""
    shard = [float(r["largest_shard_bytes"]) / 1e6 for r in rows]
    extra = [float(r["extra_bytes"]) / 1e6 for r in rows]
    fig = go.Figure()
    fig.add_bar(name="largest shard", x=[f"{s:.0f} MB shards" for s in shard], y=shard, marker_color="#E5ECF6")
    fig.add_bar(name="extra host memory while loading", x=[f"{s:.0f} MB shards" for s in shard], y=extra,
                marker_color=COLORS["mla"])
    fig.update_layout(barmode="group")
    return styled(fig, "Loading needs memory for one tensor at a time, not for the checkpoint", "", "MB")
