"""PNG plots written atomically (matplotlib's Agg canvas; pyplot's global state is never touched)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from common.runs.io import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LINE_STYLES = ("-", "--", "-.", ":")
"""Cycled once per pass through the ten tab10 colours: 40 curves before a (colour, style) pair repeats."""
_LEGEND_ROWS = 24  # legend entries per column: a longer legend gets more columns, not a taller figure


def roc_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], lo: float, xlabel: str = "false positive rate",
               ylabel: str = "true positive rate", title: str | None = None) -> Figure:
    """ROC curves (label -> (x, y) rates) on log-log axes from ``lo`` to 1, with the labelled chance line.

    The low-rate corner is what matters for both verification (FMR 1e-3) and membership inference
    (TPR at 0.1% FPR); rates of 0 are pinned just below ``lo`` so that they stay on the axes. Audits draw
    a dozen curves or more: each gets its own (colour, line style) pair, and the legend sits outside the
    axes, to the right, where it hides no curve (save with ``bbox_inches="tight"`` to keep it).
    """
    if not curves:
        raise ValueError("roc_figure: no curves")
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colours = colormaps["tab10"].colors
    fig = Figure(figsize=(5.0, 5.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (label, (x, y)) in enumerate(curves.items()):
        ax.plot(np.maximum(x, lo / 2), np.maximum(y, lo / 2), label=label, color=colours[i % len(colours)],
                linestyle=LINE_STYLES[i // len(colours) % len(LINE_STYLES)], linewidth=1.3)
    ax.plot([lo, 1.0], [lo, 1.0], color="black", linestyle=":", linewidth=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1.0)
    ax.set_ylim(lo, 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", linewidth=0.3, alpha=0.5)
    if title:
        ax.set_title(title, fontsize="medium")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small",
              ncols=1 + len(curves) // _LEGEND_ROWS)
    return fig


def log_log_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike[str], lo: float,
                xlabel: str = "false positive rate", ylabel: str = "true positive rate",
                title: str | None = None) -> None:
    """Write ``roc_figure``'s PNG atomically, cropped to its content so that the outside legend is kept."""
    fig = roc_figure(curves, lo, xlabel, ylabel, title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
