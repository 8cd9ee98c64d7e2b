"""Figures of the text model (chapter 5's trained DeepSeek-V3.2): a text drawn as its tokens, the keys the indexer
selected for one token against a sliding window's, tokens coloured by the expert that served them, and the
measured numbers of the training log. Pure functions: numbers and strings in, `plotly.graph_objects.Figure` out.

The text is drawn as a grid of characters (a heatmap with one cell per character, the character written in it),
so colouring a token colours its characters where they stand in the text. Tokens are given as `pieces`: the
exact slice of the text each token covers (they concatenate back to the text; see `dslib.lm_data.token_pieces`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from dslib.viz.common import COLORS, styled

__all__ = [
    "TOKEN_CLASS_COLORS", "SELECTION_LEGEND", "TextGrid", "text_grid", "message_figure", "token_text_figure",
    "text_selection_figure", "text_expert_figure", "text_class_figure", "loss_by_distance_figure",
    "selection_distance_figure", "recall_stages_figure", "text_view_figure", "lm_training_figure",
]

TOKEN_CLASS_COLORS = {
    "keyword": "#AB63FA", "identifier": "#636EFA", "whitespace": "#F2F2F2", "string": "#00CC96", "number": "#FFA15A",
    "operator": "#EF553B", "comment": "#B6E880", "other": "#BBBBBB",
}
# Cell categories of the selection view (value -> label, colour). Light colours keep the black characters readable.
SELECTION_LEGEND = (
    ("not kept", "#FFFFFF"), ("the token (query)", "#FF5C5C"), ("indexer only", "#FFB570"),
    ("window only", "#A8E6A1"), ("indexer and window", "#C9A6FF"), ("after the token", "#E6E6E6"),
)
# 24 distinct light-ish colours for experts (Plotly's Light24 palette).
EXPERT_PALETTE = (
    "#FD3216", "#00FE35", "#6A76FC", "#FED4C4", "#FE00CE", "#0DF9FF", "#F6F926", "#FF9616", "#479B55", "#EEA6FB",
    "#DC587D", "#D626FF", "#6E899C", "#00B5F7", "#B68E00", "#C9FBE5", "#FF0092", "#22FFA7", "#E3EE9E", "#86CE00",
    "#BC7196", "#7E7DCD", "#FC6955", "#E48F72",
)
CELL_W, CELL_H = 8, 17  # pixels per character cell


@dataclass
class TextGrid:
    """A text laid out as characters on a grid: token `[lines, width]` int (the token each cell belongs to, -1 =
    empty cell), chars of the same shape (one character per cell, "" for empty), n_tokens."""

    token: np.ndarray
    chars: np.ndarray
    n_tokens: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.token.shape


def text_grid(pieces: Sequence[str], *, width: int = 96, max_lines: int = 40, tab: int = 4) -> TextGrid:
    """Lay out token pieces as characters: a newline is one blank cell at the end of its line and starts the next,
    tabs expand to the next multiple of `tab`, long lines wrap at `width`, unprintable characters show as "·".
    Spaces are blank cells that still take their token's colour, so indentation shows as coloured blocks.
    At most `max_lines` lines (the rest is cut)."""
    if width < 8:
        raise ValueError(f"width={width}: use at least 8 characters per line.")
    cells_tok: list[list[int]] = [[]]
    cells_chr: list[list[str]] = [[]]
    for i, piece in enumerate(pieces):
        for ch in piece:
            if len(cells_tok) > max_lines:
                break
            if ch == "\n":
                cells_tok[-1].append(i)  # the newline itself is one cell at the end of the line
                cells_chr[-1].append(" ")
                cells_tok.append([])
                cells_chr.append([])
                continue
            chars = " " * (tab - len(cells_tok[-1]) % tab) if ch == "\t" else (ch if ch.isprintable() else "·")
            for c in chars:
                if len(cells_tok[-1]) >= width:
                    cells_tok.append([])
                    cells_chr.append([])
                cells_tok[-1].append(i)
                cells_chr[-1].append(c)
    cells_tok, cells_chr = cells_tok[:max_lines], cells_chr[:max_lines]
    while len(cells_tok) > 1 and not cells_tok[-1]:
        cells_tok.pop()
        cells_chr.pop()
    used = max(1, max(len(r) for r in cells_tok))
    tok = np.full((len(cells_tok), used), -1, dtype=np.int64)
    chars = np.full((len(cells_tok), used), "", dtype=object)
    for r, (ts, cs) in enumerate(zip(cells_tok, cells_chr)):
        tok[r, : len(ts)] = ts
        chars[r, : len(cs)] = cs
    return TextGrid(tok, chars, len(pieces))


def message_figure(message: str, *, title: str = "") -> go.Figure:
    """A figure that only says something (bad input: what is wrong and how to fix it), instead of a traceback."""
    fig = go.Figure()
    fig.add_annotation(text=message.replace("\n", "<br>"), x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14), align="left")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(template="plotly_white", height=160, title=title, margin=dict(l=20, r=20, t=40, b=20))
    return fig


def _discrete(colors: Sequence[str]) -> list:
    """A colourscale with one flat band per category value 0..n-1 (used with zmin=-0.5, zmax=n-0.5)."""
    n = len(colors)
    scale = []
    for i, c in enumerate(colors):
        scale += [[i / n, c], [(i + 1) / n, c]]
    return scale


def token_text_figure(pieces: Sequence[str], values: Sequence[int], labels: Sequence[str], colors: Sequence[str], *,
                      title: str = "", width: int = 96, max_lines: int = 40,
                      legend: bool = True) -> go.Figure:
    """The text with every token's characters coloured by its category: values[i] in 0..len(labels)-1 for token i.
    Hovering a character shows its token's index (the position to pick in the views)."""
    if len(values) != len(pieces):
        raise ValueError(f"{len(values)} values for {len(pieces)} tokens: give one value per token.")
    if len(labels) != len(colors) or not 0 < len(labels) < 255:
        raise ValueError(f"{len(labels)} labels and {len(colors)} colours: give one colour per label (1..254).")
    grid = text_grid(pieces, width=width, max_lines=max_lines)
    n = len(labels)
    vals = np.asarray(values, dtype=np.int64)
    if len(vals) and (vals.min() < 0 or vals.max() >= n):
        raise ValueError(f"values must lie in 0..{n - 1} (one per label), got {vals.min()}..{vals.max()}.")
    # uint8 categories (value n = empty cell, drawn white) and int16 token indices: compact typed arrays, so a
    # widget's output stays small (large outputs stall headless notebook runs)
    z = np.where(grid.token >= 0, vals[np.clip(grid.token, 0, None)] if len(vals) else n, n).astype(np.uint8)
    fig = go.Figure(go.Heatmap(
        z=z, text=grid.chars, texttemplate="%{text}", textfont=dict(family="monospace", size=12, color="black"),
        customdata=grid.token.astype(np.int16), hovertemplate="token %{customdata}<extra></extra>",
        colorscale=_discrete([*colors, "#FFFFFF"]), zmin=-0.5, zmax=n + 0.5, xgap=0, ygap=1, showscale=legend,
        colorbar=dict(tickvals=list(range(n)), ticktext=list(labels), len=min(1.0, 0.12 * n + 0.2), thickness=14),
    ))
    lines, cols = grid.shape
    fig.update_xaxes(visible=False, range=[-0.5, max(cols, 24) - 0.5])
    fig.update_yaxes(visible=False, autorange="reversed")
    fig.update_layout(template="plotly_white", title=title, width=max(cols, 24) * CELL_W + 260,
                      height=lines * CELL_H + 90, margin=dict(l=10, r=10, t=50, b=10), plot_bgcolor="white")
    return fig


def text_selection_figure(pieces: Sequence[str], query: int, selected: Sequence[int], window: int, *,
                          layer: int | None = None, width: int = 96, max_lines: int = 40) -> go.Figure:
    """Which earlier tokens the token at position `query` attends to: the indexer's selected keys (`selected`,
    positions) against the last `window` positions (a sliding window of the same budget), drawn in the text."""
    n = len(pieces)
    if not 0 <= query < n:
        raise ValueError(f"query={query} is outside the text's {n} tokens (0..{n - 1}).")
    sel = {int(s) for s in selected if 0 <= int(s) <= query}
    win = set(range(max(0, query - window + 1), query + 1))
    values = []
    for t in range(n):
        if t == query:
            values.append(1)
        elif t > query:
            values.append(5)
        else:
            values.append({(True, True): 4, (True, False): 2, (False, True): 3}.get((t in sel, t in win), 0))
    far = sum(1 for s in sel if s not in win)
    where = f"layer {layer}: " if layer is not None else ""
    title = (f"{where}the indexer keeps {len(sel)} of {query + 1} visible tokens for token {query} "
             f"({far} beyond the {window}-token window)")
    labels, colors = zip(*SELECTION_LEGEND)
    return token_text_figure(pieces, values, labels, colors, title=title, width=width, max_lines=max_lines)


def text_expert_figure(pieces: Sequence[str], experts: Sequence[int], n_experts: int, *, layer: int | None = None,
                       n_group: int | None = None, width: int = 96, max_lines: int = 40) -> go.Figure:
    """Every token coloured by the expert that served it most (its highest-weight routed expert) in one MoE layer.
    experts: one expert index per token."""
    if n_experts > len(EXPERT_PALETTE):
        raise ValueError(f"{n_experts} experts: this view has {len(EXPERT_PALETTE)} colours.")
    per = n_experts // n_group if n_group else None
    labels = [f"expert {e}" + (f" (group {e // per})" if per else "") for e in range(n_experts)]
    where = f"layer {layer}: " if layer is not None else ""
    return token_text_figure(pieces, [int(e) for e in experts], labels, EXPERT_PALETTE[:n_experts],
                             title=f"{where}each token coloured by its top expert", width=width, max_lines=max_lines)


def text_class_figure(pieces: Sequence[str], classes: Sequence[int], class_names: Sequence[str], *, width: int = 96,
                      max_lines: int = 40) -> go.Figure:
    """Every token coloured by its Python token class (keyword, identifier, string, ...)."""
    colors = [TOKEN_CLASS_COLORS.get(c, "#BBBBBB") for c in class_names]
    return token_text_figure(pieces, [int(c) for c in classes], list(class_names), colors,
                             title="token classes (Python's tokenize)", width=width, max_lines=max_lines)


_VARIANT_COLORS = {"dense": COLORS["dense"], "dsa": COLORS["sparse"], "window": COLORS["window"]}


def loss_by_distance_figure(buckets: Sequence[str], losses: Mapping[str, Sequence[float]], counts: Sequence[int], *,
                            window: int | None = None,
                            title: str = "Held-out loss by distance to the previous occurrence of the token",
                            ) -> go.Figure:
    """Grouped bars: mean next-token loss (nats) per distance bucket, one bar per variant (name -> losses);
    each bucket's token count under its label."""
    fig = go.Figure()
    x = [f"{b}<br>({c:,} tokens)" for b, c in zip(buckets, counts)]
    for name, ys in losses.items():
        fig.add_bar(x=x, y=list(ys), name=name, marker_color=_VARIANT_COLORS.get(name.split(" ")[0].lower()),
                    hovertemplate=f"{name}: %{{y:.3f}} nats<extra></extra>")
    fig.update_layout(barmode="group")
    xlabel = "distance to the previous occurrence (tokens)" + (f"; the window holds {window}" if window else "")
    return styled(fig, title, xlabel, "loss (nats per token)")


def selection_distance_figure(edges: Sequence[int], shares: Mapping[str, Sequence[float]], *,
                              title: str = "How far back the selected keys are") -> go.Figure:
    """Share of the selected keys per query-key distance bin [edges[i], edges[i+1]), one line per layer/name."""
    labels = [f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])]
    fig = go.Figure()
    for name, ys in shares.items():
        fig.add_scatter(x=labels, y=list(ys), name=name, mode="lines+markers")
    return styled(fig, title, "query - key distance (tokens)", "share of the selected keys")


def recall_stages_figure(stages: Mapping[str, Sequence[float]], window: Sequence[float], *,
                         title: str = "Dense attention mass kept by the indexer's top-k, per layer") -> go.Figure:
    """Grouped bars per layer: the share of the dense attention mass inside the indexer's top-k at each training
    stage (name -> per-layer recall), and inside a window of the same size (the last stage's model)."""
    fig = go.Figure()
    layers = [f"layer {i}" for i in range(len(window))]
    shades = ["#FDD4C2", "#F8936F", COLORS["sparse"], "#B33A22"]
    for i, (name, ys) in enumerate(stages.items()):
        fig.add_bar(x=layers, y=list(ys), name=f"indexer, {name}", marker_color=shades[min(i, len(shades) - 1)])
    fig.add_bar(x=layers, y=list(window), name="window", marker_color=COLORS["window"])
    fig.update_layout(barmode="group")
    fig.update_yaxes(range=[0, 1.05])
    return styled(fig, title, "", "share of the dense attention mass")


def text_view_figure(analysis, view: str, layer: int, token: int, *, n_experts: int, n_group: int | None = None,
                     class_names: Sequence[str] = (), width: int = 96, max_lines: int = 40) -> go.Figure:
    """The figure the text widget shows. `analysis` has `pieces`, `classes`, `window`, `selected` ({layer: [T, k]}),
    `experts` ({MoE layer: [T, n_per_token]}), like `dslib.lm_train.TextAnalysis`. view: "indexer selection" |
    "experts" | "token classes". A token past the end is clamped to the last; a layer without experts or without
    a selection gets a message saying which layers have them."""
    n = len(analysis.pieces)
    token = max(0, min(int(token), n - 1))
    if view == "indexer selection":
        if layer not in analysis.selected:
            return message_figure(f"Layer {layer} recorded no selection; layers with one: {sorted(analysis.selected)}.")
        keys = [s for s in analysis.selected[layer][token] if s >= 0]
        return text_selection_figure(analysis.pieces, token, keys, analysis.window, layer=layer, width=width,
                                     max_lines=max_lines)
    if view == "experts":
        if layer not in analysis.experts:
            return message_figure(f"Layer {layer} is a dense layer: it has no experts. MoE layers: "
                                  f"{sorted(analysis.experts)}.")
        top = [e[0] for e in analysis.experts[layer]]
        return text_expert_figure(analysis.pieces, top, n_experts, layer=layer, n_group=n_group, width=width,
                                  max_lines=max_lines)
    if view == "token classes":
        return text_class_figure(analysis.pieces, analysis.classes, class_names, width=width, max_lines=max_lines)
    raise ValueError(f"view={view!r}: use 'indexer selection', 'experts' or 'token classes'.")


def lm_training_figure(curves: Mapping[str, Mapping[str, Sequence[float]]], *, branch: int | None = None,
                       title: str = "Training: loss on the batches (lines) and on held-out files (markers)",
                       ) -> go.Figure:
    """Per run (name -> {"step", "loss", "probe_step", "probe_loss"}): the training loss and the held-out probe
    loss against the global step; `branch` marks where the variants start from the dense model."""
    fig = go.Figure()
    for name, c in curves.items():
        color = _VARIANT_COLORS.get(name.split(" ")[0].lower(), "#7F7F7F")
        fig.add_scatter(x=list(c["step"]), y=list(c["loss"]), name=f"{name}, training batches", mode="lines",
                        line=dict(color=color, width=1), opacity=0.6)
        if c.get("probe_step"):
            fig.add_scatter(x=list(c["probe_step"]), y=list(c["probe_loss"]), name=f"{name}, held-out",
                            mode="lines+markers", line=dict(color=color, dash="dot"), marker=dict(size=7))
    if branch is not None:
        fig.add_vline(x=branch, line_dash="dash", line_color="black", annotation_text="variants start")
    return styled(fig, title, "step", "loss (nats per token)", height=420)
