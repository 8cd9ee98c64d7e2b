"""Figures of chapter 4 (MoE routing). Pure functions: numbers in, `plotly.graph_objects.Figure` out."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from dslib.viz.common import COLORS, styled

__all__ = [
    "SETTING_COLORS", "params_bars", "token_routing", "maxvio_curves", "expert_load_heatmap", "task_expert_heatmap",
    "quality_bars", "nodes_touched_bars", "bias_curves",
]

# One colour per balancing setting (keys as in dslib.moe_train.SETTINGS).
SETTING_COLORS = {"none": "#7F7F7F", "aux": "#636EFA", "bias": "#EF553B", "aux_small": "#A5B4FC",
                  "aux_batch": "#19D3F3"}
_GROUP_COLORS = ["#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3", "#FF6692", "#B6E880"]


def _np(x) -> np.ndarray:
    return np.asarray(x.tolist() if hasattr(x, "tolist") else x, dtype=float)


def params_bars(labels: Sequence[str], total: Sequence[float], active: Sequence[float], *, unit: str = "B",
                log: bool = True) -> go.Figure:
    """Total vs active parameters per token for a few models or components (values already in `unit`); a log axis
    by default, since a layer and a whole model differ by orders of magnitude."""
    fig = go.Figure()
    fig.add_bar(name="stored (total)", x=list(labels), y=list(total), marker_color=COLORS["dense"],
                text=[f"{v:,.1f}" for v in total], textposition="outside")
    fig.add_bar(name="used per token (active)", x=list(labels), y=list(active), marker_color=COLORS["sparse"],
                text=[f"{v:,.1f}" for v in active], textposition="outside")
    fig.update_layout(barmode="group")
    if log:
        fig.update_yaxes(type="log")
    axis = f"parameters ({unit}{', log scale' if log else ''})"
    return styled(fig, "Parameters stored vs parameters each token uses", "", axis)


def token_routing(scores, bias, group_kept, topk_idx, topk_weight, n_group: int, *, title: str = "") -> go.Figure:
    """One token through the gate: every expert's sigmoid score (bar) and biased score (marker), coloured by group;
    dropped groups are faded, chosen experts outlined and labelled with their weight.

    scores, bias [E]; group_kept [G] bools (or None: all kept); topk_idx, topk_weight [k].
    """
    s, b = _np(scores), _np(bias)
    n_experts = len(s)
    per = n_experts // n_group
    group = np.arange(n_experts) // per
    kept = np.ones(n_group, bool) if group_kept is None else np.asarray(_np(group_kept), bool)
    chosen = {int(e): float(w) for e, w in zip(_np(topk_idx), _np(topk_weight))}
    colors = [_GROUP_COLORS[g % len(_GROUP_COLORS)] for g in group]
    opacity = [1.0 if kept[g] else 0.25 for g in group]
    fig = go.Figure()
    fig.add_bar(
        x=np.arange(n_experts), y=s, name="score s = sigmoid(W x)", marker_color=colors, marker_opacity=opacity,
        marker_line_width=[3 if e in chosen else 0 for e in range(n_experts)], marker_line_color="black",
        text=[f"w={chosen[e]:.2f}" if e in chosen else "" for e in range(n_experts)], textposition="outside",
        customdata=group, hovertemplate="expert %{x} (group %{customdata})<br>s=%{y:.3f}<extra></extra>",
    )
    fig.add_scatter(x=np.arange(n_experts), y=s + b, mode="markers", name="s + bias (used to choose)",
                    marker=dict(symbol="line-ew-open", size=14, color="black"))
    for g in range(n_group):
        if not kept[g]:
            fig.add_vrect(x0=g * per - 0.5, x1=(g + 1) * per - 0.5, fillcolor="lightgray", opacity=0.3, line_width=0)
    title = title or f"{len(chosen)} experts chosen from {int(kept.sum())} of {n_group} groups (faded: dropped groups)"
    return styled(fig, title, "expert (coloured by group)", "score")


def maxvio_curves(steps: Sequence[int], curves: dict[str, Sequence[float]], *, colors: dict[str, str] | None = None,
                  dashes: dict[str, str] | None = None) -> go.Figure:
    """MaxVio (max load / mean load - 1) over training, one line per label."""
    fig = go.Figure()
    for label, ys in curves.items():
        fig.add_scatter(x=list(steps), y=list(ys), mode="lines", name=label,
                        line=dict(color=(colors or {}).get(label), dash=(dashes or {}).get(label, "solid")))
    fig.add_hline(y=0, line_dash="dot", line_color="gray")
    return styled(fig, "Load imbalance on the evaluation set (0 = every expert does its share)", "training step",
                  "MaxVio")


def expert_load_heatmap(load, row_labels: Sequence[str], n_group: int, *, title: str = "Expert load") -> go.Figure:
    """Load of each expert relative to the mean (1 = its fair share), one row per layer/setting. load [R, E]."""
    m = _np(load)
    rel = m / m.mean(axis=1, keepdims=True)
    n_experts = m.shape[1]
    fig = go.Figure(go.Heatmap(
        z=rel, x=np.arange(n_experts), y=list(row_labels), colorscale="RdBu_r", zmid=1.0, zmin=0, zmax=3,
        colorbar=dict(title="load / mean"), hovertemplate="%{y}<br>expert %{x}: %{z:.2f}× its share<extra></extra>",
    ))
    per = n_experts // n_group
    for g in range(1, n_group):
        fig.add_vline(x=g * per - 0.5, line_color="black", line_width=1)
    fig = styled(fig, title, f"expert ({n_group} groups of {per})", "", height=120 + 40 * len(row_labels))
    fig.update_yaxes(autorange="reversed")
    return fig


def task_expert_heatmap(counts, task_names: Sequence[str], *, title: str = "Which experts each task uses") -> go.Figure:
    """Share of each task's routed slots that go to each expert (rows sum to 1). counts [tasks, E]."""
    m = _np(counts)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig = go.Figure(go.Heatmap(
        z=share, x=np.arange(m.shape[1]), y=list(task_names), colorscale="Viridis",
        colorbar=dict(title="share"), hovertemplate="%{y} → expert %{x}: %{z:.1%}<extra></extra>",
    ))
    fig = styled(fig, title, "expert", "task", height=360)
    fig.update_yaxes(autorange="reversed")
    return fig


def quality_bars(task_names: Sequence[str], accuracy: dict[str, Sequence[float]], *,
                 colors: dict[str, str] | None = None) -> go.Figure:
    """Answer-token accuracy per task, one bar group per task, one bar per setting."""
    fig = go.Figure()
    for label, acc in accuracy.items():
        fig.add_bar(x=list(task_names), y=list(acc), name=label, marker_color=(colors or {}).get(label))
    fig.update_layout(barmode="group")
    fig.update_yaxes(range=[0, 1.05], tickformat=".0%")
    return styled(fig, "Quality after training (evaluation set)", "task", "answer-token accuracy")


def nodes_touched_bars(histograms: dict[str, Sequence[float]], *,
                       title: str = "Nodes each token must reach") -> go.Figure:
    """Share of tokens whose experts live on 0, 1, 2, ... nodes. histograms: label -> counts indexed by node count."""
    fig = go.Figure()
    for label, h in histograms.items():
        h = _np(h)
        mean = np.dot(np.arange(len(h)), h) / h.sum()
        fig.add_bar(x=np.arange(len(h)), y=h / h.sum(), name=f"{label} (mean {mean:.2f})")
    fig.update_layout(barmode="group")
    fig.update_yaxes(tickformat=".0%")
    return styled(fig, title, "nodes (expert groups) reached by one token", "share of tokens")


def bias_curves(steps: Sequence[int], bias, *, n_group: int | None = None, title: str = "") -> go.Figure:
    """Each expert's correction bias minus the mean bias over training (the sign update drifts all biases together,
    so only differences matter). bias [steps, E]."""
    b = _np(bias)
    b = b - b.mean(axis=1, keepdims=True)
    per = b.shape[1] // n_group if n_group else b.shape[1]
    fig = go.Figure()
    for e in range(b.shape[1]):
        g = e // per
        fig.add_scatter(x=list(steps), y=b[:, e], mode="lines", name=f"expert {e}", showlegend=False,
                        line=dict(width=1, color=_GROUP_COLORS[g % len(_GROUP_COLORS)]))
    return styled(fig, title or "Correction bias of each expert (minus the mean), coloured by group", "training step",
                  "b_i − mean(b)")

