"""The mixture sweep's figures (``metrics.mixture_sweep``, ``eval.json``'s ``alpha_sweep`` and
``alpha_grid``), drawn with matplotlib's ``Figure`` and the Agg canvas, so pyplot's global
backend is untouched. matplotlib comes with the ``plots`` extra; without it a figure is a
MissingExtraError naming it (``eval`` and ``train`` skip their figure instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from threetowers.errors import require


def _figure(width: float, height: float, what: str):
    """An empty matplotlib Figure on the Agg canvas."""
    figure = require("matplotlib.figure", what)
    agg = require("matplotlib.backends.backend_agg", what)
    fig = figure.Figure(figsize=(width, height))
    agg.FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> None:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)


def plot_alpha_sweep(
    sweeps: dict[str, list[dict[str, float]]], metrics: Sequence[str], path
) -> None:
    """Plot metric vs α to a PNG: one panel per sweep (e.g. per setting), one line per metric."""
    fig = _figure(5.2 * len(sweeps), 4.2, "the alpha-sweep figure")
    axes = fig.subplots(1, len(sweeps), squeeze=False)[0]
    for ax, (name, rows) in zip(axes, sweeps.items(), strict=True):
        rows = sorted(rows, key=lambda r: r["alpha"])
        for metric in metrics:
            points = [(r["alpha"], r[metric]) for r in rows if metric in r]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=metric)
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel("α (1: f·g alone; 0: h·g_h alone)")
        ax.set_ylabel("metric (%)")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    _save(fig, path)


def plot_alpha_grid(
    rows: Sequence[dict], metrics: Sequence[str], towers: Sequence[str], path, steps: int = 10
) -> None:
    """Heat maps of the mixed score's metrics over the weights of two frozen towers (a_f is
    what they leave: 1 − a₁ − a₂), one panel per metric; ``rows`` as ``eval.json``'s
    ``alpha_grid`` (each with ``weights``: {"f": a_f, towers[0]: a₁, towers[1]: a₂})."""
    first, second = towers
    fig = _figure(4.6 * len(metrics), 4.2, "the alpha-grid figure")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        grid = np.full((steps + 1, steps + 1), np.nan)  # outside the simplex: blank
        for row in rows:
            x, y = round(row["weights"][first] * steps), round(row["weights"][second] * steps)
            grid[y, x] = row[metric]
        image = ax.imshow(grid, origin="lower", extent=(-0.05, 1.05, -0.05, 1.05), cmap="viridis")
        best = max(rows, key=lambda r: r[metric])
        ax.plot(best["weights"][first], best["weights"][second], "r*", markersize=12)
        ax.set_title(f"{metric} (best {best[metric]:.1f}, a_f {best['weights']['f']:.1f})")
        ax.set_xlabel(f"a_{first}")
        ax.set_ylabel(f"a_{second}")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    _save(fig, path)
