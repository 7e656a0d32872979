"""Plotly figures for attention: pattern grids per prompt and layer×head metric heatmaps.

Returned as figures, not written: the Logger sends them to W&B online and to files offline.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots


def pattern_grid(patterns, labels: list[str], max_tokens: int, title: str) -> go.Figure:
    """patterns [L, H, T, T] -> one heatmap per (layer, head) over the last max_tokens positions."""
    n_layers, n_heads, t, _ = patterns.shape
    start = max(0, t - max_tokens)
    labels = [f"{i}:{s}" for i, s in enumerate(labels)][start:]
    fig = make_subplots(rows=n_layers, cols=n_heads, horizontal_spacing=0.02, vertical_spacing=0.02,
                        subplot_titles=[f"L{layer} H{head}" for layer in range(n_layers) for head in range(n_heads)])
    for layer in range(n_layers):
        for head in range(n_heads):
            z = np.asarray(patterns[layer, head, start:, start:])
            fig.add_trace(go.Heatmap(z=z, x=labels, y=labels, zmin=0, zmax=1, coloraxis="coloraxis"),
                          row=layer + 1, col=head + 1)
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(title=title, coloraxis={"colorscale": "Viridis"}, height=260 * n_layers + 80,
                      width=260 * n_heads + 120)
    return fig


def matrix_heatmap(matrix, title: str) -> go.Figure:
    """A [layers, heads] matrix as a heatmap, layer 0 at the top."""
    z = np.asarray(matrix, dtype=float)
    fig = go.Figure(go.Heatmap(z=z, x=[f"head {h}" for h in range(z.shape[1])],
                               y=[f"layer {layer}" for layer in range(z.shape[0])], colorscale="Viridis"))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title)
    return fig
