"""Shared look of every figure."""
from __future__ import annotations

import plotly.graph_objects as go

__all__ = ["COLORS", "styled"]

# One colour per idea, used the same way in every chapter.
COLORS = {
    "mha": "#636EFA",
    "gqa": "#00CC96",
    "mqa": "#AB63FA",
    "mla": "#EF553B",
    "mla_fp8": "#FFA15A",
    "indexer": "#19D3F3",
    "dense": "#636EFA",
    "window": "#00CC96",
    "window_2k": "#005F46",  # a window of twice the budget: same family as "window", clearly darker
    "window_trained": "#9BD770",  # the model trained under its window (chapter 3's fair baseline)
    "sparse": "#EF553B",
    "cache": "#EF553B",
    "no_cache": "#636EFA",
}


def styled(fig: go.Figure, title: str, x: str, y: str, *, height: int = 380) -> go.Figure:
    """Apply the series' layout: title, axis labels, white template, legend on top."""
    fig.update_layout(
        title=title,
        xaxis_title=x,
        yaxis_title=y,
        template="plotly_white",
        height=height,
        margin=dict(l=60, r=20, t=60, b=50),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0),
    )
    return fig
