"""Figures of chapter 3 (sparse attention). Pure functions: numbers in, `plotly.graph_objects.Figure` out."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dslib.viz.common import COLORS, styled

__all__ = [
    "selection_matrix_figure",
    "selection_row_figure",
    "indexer_terms_figure",
    "accuracy_by_distance_figure",
    "method_color",
    "recall_by_layer_figure",
    "training_curves_figure",
    "cost_vs_length_figure",
    "paper_cost_figure",
]

_NAMES = {"dense": "dense", "window": "sliding window", "sparse": "indexer top-k", "indexer": "indexer top-k",
          "window 2k": "sliding window 2k", "window_2k": "sliding window 2k",
          "window trained": "window-trained model, window k", "window_trained": "window-trained model, window k"}


def _color(name: str) -> str:
    return COLORS.get(name, COLORS.get({"indexer": "sparse"}.get(name, name), "#888"))


def method_color(name: str) -> str | None:
    """The colour of an attention method by its result name: "dense", "sparse"/"indexer...", "window",
    "window 2k" (a window of 2k keys, darker than "window"); None (plotly's default) for anything else."""
    key = name.replace(" ", "_")
    if key in COLORS:
        return COLORS[key]
    base = name.split(" ")[0]
    return _color(base) if base in COLORS or base == "indexer" else None


def selection_matrix_figure(mask, title: str = "Which keys each query keeps", *, color: str = "sparse") -> go.Figure:
    """Heatmap of a bool/0-1 matrix `[T, S]` (query rows, key columns): 1 = the query attends to that key."""
    z = [[float(v) for v in row] for row in (mask.tolist() if hasattr(mask, "tolist") else mask)]
    fig = go.Figure(go.Heatmap(z=z, colorscale=[[0, "#f4f4f4"], [1, _color(color)]], showscale=False,
                               hovertemplate="query %{y}, key %{x}: %{z}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    return styled(fig, title, "key position s", "query position t", height=420)


def selection_row_figure(probs, *, query: int, indexer: Sequence[int] = (), window: Sequence[int] = (),
                         source: int | None = None, title: str | None = None) -> go.Figure:
    """One query's row: dense attention mass per key (bars), the keys the indexer and the window keep (markers),
    and the token the query needs (dashed line). probs `[S]` (only keys <= query are drawn)."""
    p = [float(x) for x in (probs.tolist() if hasattr(probs, "tolist") else probs)][: query + 1]
    top = max(p) if p else 1.0
    fig = go.Figure()
    fig.add_bar(x=list(range(len(p))), y=p, name="dense attention (head average)", marker_color=COLORS["dense"])
    idx = sorted(int(i) for i in indexer if 0 <= int(i) <= query)
    win = sorted(int(i) for i in window if 0 <= int(i) <= query)
    fig.add_scatter(x=idx, y=[1.12 * top] * len(idx), mode="markers", name=f"indexer top-k ({len(idx)})",
                    marker=dict(color=_color("sparse"), symbol="triangle-down", size=8))
    fig.add_scatter(x=win, y=[1.22 * top] * len(win), mode="markers", name=f"window ({len(win)})",
                    marker=dict(color=_color("window"), symbol="square", size=6))
    if source is not None and source >= 0:
        fig.add_vline(x=source, line_dash="dash", line_color="black", annotation_text="needed token",
                      annotation_position="top left")
    fig.update_yaxes(range=[0, 1.3 * top])
    return styled(fig, title or f"Query at position {query}: where dense attention looks, what each selection keeps",
                  "key position", "attention probability")


def indexer_terms_figure(head_terms, weights, total, *, keys: Sequence[int] | None = None) -> go.Figure:
    """The index score of one query, term by term: per indexer head j, w[j]·ReLU(q_j·k_s) (stacked bars),
    and their sum I[s] (line). head_terms `[H_I, S]`, weights `[H_I]` (for the legend), total `[S]`."""
    terms = head_terms.tolist() if hasattr(head_terms, "tolist") else head_terms
    tot = total.tolist() if hasattr(total, "tolist") else total
    w = weights.tolist() if hasattr(weights, "tolist") else weights
    x = list(keys) if keys is not None else list(range(len(tot)))
    fig = go.Figure()
    for j, row in enumerate(terms):
        fig.add_bar(x=x, y=row, name=f"head {j}: w = {w[j]:+.2f}")
    fig.add_scatter(x=x, y=tot, mode="lines+markers", name="I[t, s] = Σ_j w_j·ReLU(q_j·k_s)", line=dict(color="black"))
    fig.update_layout(barmode="relative")
    return styled(fig, "Index score of one query, head by head", "key position s", "contribution to I[t, s]")


def accuracy_by_distance_figure(results: Mapping[str, Mapping[str, float]], *, chance: float | None = None,
                                title: str = "Recall accuracy vs distance to the needed token") -> go.Figure:
    """Grouped bars: for each method (name -> {distance bucket label: accuracy}) the accuracy per bucket."""
    fig = go.Figure()
    for name, by_bucket in results.items():
        fig.add_bar(x=list(by_bucket), y=[100 * v for v in by_bucket.values()], name=_NAMES.get(name, name),
                    marker_color=method_color(name))
    if chance is not None:
        fig.add_hline(y=100 * chance, line_dash="dot", annotation_text="chance")
    fig.update_layout(barmode="group")
    fig.update_yaxes(range=[0, 105])
    return styled(fig, title, "query → key distance (tokens)", "accuracy (%)")


def recall_by_layer_figure(analysis: Mapping[str, Sequence[float]]) -> go.Figure:
    """Per layer: attention recall of the indexer and of the window, the dense mass on the needed token, and how
    often each selection contains it (`dslib.train.attention_analysis` output)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("attention recall (dense mass kept)", "needed token kept"))
    layers = [f"layer {i}" for i in range(len(analysis["recall_indexer"]))]
    fig.add_bar(x=layers, y=analysis["recall_indexer"], name="indexer top-k", marker_color=_color("sparse"),
                row=1, col=1)
    fig.add_bar(x=layers, y=analysis["recall_window"], name="window", marker_color=_color("window"), row=1, col=1)
    fig.add_scatter(x=layers, y=analysis["mass_on_source"], name="dense mass on the needed token",
                    mode="markers", marker=dict(color="black", size=10, symbol="diamond"), row=1, col=1)
    fig.add_bar(x=layers, y=analysis["hit_indexer"], name="indexer top-k", marker_color=_color("sparse"),
                showlegend=False, row=1, col=2)
    fig.add_bar(x=layers, y=analysis["hit_window"], name="window", marker_color=_color("window"),
                showlegend=False, row=1, col=2)
    fig.update_yaxes(range=[0, 1.05])
    fig.update_layout(barmode="group")
    return styled(fig, "What the selection keeps, per layer (query positions, dense run)", "", "share")


def training_curves_figure(stages: Mapping[str, Mapping]) -> go.Figure:
    """Accuracy (and KL for the indexer stages) vs step, one colour per stage; stages as in the JSON log. Stages
    follow each other, except "window", the baseline that branches off after "dense" (it starts where dense ends)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("query accuracy", "indexer KL"))
    offset, dense_end = 0, None
    palette = {"dense": COLORS["dense"], "warmup": COLORS["indexer"], "sparse": COLORS["sparse"],
               "window": COLORS["window_trained"]}
    for name, log in stages.items():
        start = dense_end if name == "window" and dense_end is not None else offset
        steps = [start + i * log["every"] for i in range(len(log["acc"]))]
        label = "window (branch after dense)" if name == "window" else name
        fig.add_scatter(x=steps, y=log["acc"], name=label, line=dict(color=palette.get(name)), row=1, col=1)
        if any(log["kl"]):
            fig.add_scatter(x=steps, y=log["kl"], name=f"{name} KL", line=dict(color=palette.get(name), dash="dot"),
                            row=1, col=2)
        if name != "window":
            offset += log["steps"]
        if name == "dense":
            dense_end = offset
    return styled(fig, "Training: dense model, indexer warm-up, sparse stage (and the window baseline)", "step", "")


def cost_vs_length_figure(lengths: Sequence[int], series: Mapping[str, Sequence[float]], *, y: str,
                          title: str, log: bool = True, colors: Mapping[str, str] | None = None) -> go.Figure:
    """Lines of a cost (time, FLOPs) vs sequence length, one per name; log-log by default (slope 2 = quadratic).
    A line's colour comes from the first word of its name ("dense", "sparse", "indexer", ...) unless `colors`
    names it; names with "model" or "formula" are dotted."""
    fig = go.Figure()
    for name, values in series.items():
        base = name.split(" ")[0]
        color = (colors or {}).get(name, _color(base))
        fig.add_scatter(x=list(lengths), y=list(values), name=name, mode="lines+markers",
                        line=dict(color=color, dash="dot" if "model" in name or "formula" in name else None))
    if log:
        fig.update_xaxes(type="log")
        fig.update_yaxes(type="log")
    return styled(fig, title, "sequence length L (tokens)", y)


def paper_cost_figure(paper: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                      model: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None, *, phase: str,
                      crossover: float | None = None, max_position: float | None = None,
                      title: str | None = None) -> go.Figure:
    """The paper's cost per million tokens vs position (markers; joined by thin lines when no model is drawn) and
    our FLOP-based model (lines). paper / model: name -> (positions in tokens, $ per million tokens).
    `crossover` (tokens) draws a dashed line where the two paper curves cross; `max_position` (tokens) zooms in."""
    fig = go.Figure()
    for name, (x, yv) in paper.items():
        c = COLORS["dense"] if "3.1" in name else COLORS["sparse"]
        fig.add_scatter(x=[v / 1024 for v in x], y=list(yv), mode="markers" if model else "lines+markers",
                        name=f"paper: {name}", marker=dict(color=c, size=9), line=dict(color=c, width=1))
    for name, (x, yv) in (model or {}).items():
        c = COLORS["dense"] if "3.1" in name or "dense" in name else COLORS["sparse"]
        fig.add_scatter(x=[v / 1024 for v in x], y=list(yv), mode="lines", name=f"model: {name}", line=dict(color=c))
    if crossover is not None:
        fig.add_vline(x=crossover / 1024, line_dash="dash", line_color="#555",
                      annotation_text=f"crossover ≈ {crossover / 1024:.1f}K", annotation_position="top right")
    if max_position is not None:
        fig.update_xaxes(range=[0, max_position / 1024])
    default = f"{phase.capitalize()} cost per million tokens vs token position (H800, $2/GPU-hour)"
    return styled(fig, title or default, "token position (K = 1,024 tokens)", "$ per million tokens")

