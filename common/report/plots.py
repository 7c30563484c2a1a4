"""PNG plots written atomically (matplotlib's Agg canvas; pyplot's global state is never touched)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from common.runs.io import atomic_path


def log_log_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike[str], lo: float,
                xlabel: str = "false positive rate", ylabel: str = "true positive rate",
                title: str | None = None) -> None:
    """ROC curves (label -> (x, y) rates) on log-log axes from ``lo`` to 1, with the chance line.

    The low-rate corner is what matters for both verification (FMR 1e-3) and membership inference
    (TPR at 0.1% FPR); rates of 0 are pinned just below ``lo`` so that they stay on the axes.
    """
    if not curves:
        raise ValueError("log_log_roc: no curves")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 5.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (x, y) in curves.items():
        ax.plot(np.maximum(x, lo / 2), np.maximum(y, lo / 2), label=label)
    ax.plot([lo, 1.0], [lo, 1.0], linestyle="--", color="grey", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1.0)
    ax.set_ylim(lo, 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
