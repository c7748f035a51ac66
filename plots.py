"""The pictures and tables a run leaves for people: training curves, confusion matrices, markdown tables.

matplotlib is imported on first use with the file-only Agg backend, so that --help and errors stay fast.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage


def pyplot() -> ModuleType:
    """matplotlib with the file-only Agg backend, imported on first use so that --help and errors stay fast."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(history: Sequence[dict[str, Any]], path: str) -> None:
    """Loss and accuracy per epoch: train vs val, raw vs EMA weights."""
    plt = pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind in [(ax_loss, "loss"), (ax_acc, "acc")]:
        for key, label, style in [(f"train_{kind}", "train", "-"), (f"val_{kind}", "val (raw)", "-"),
                                  (f"val_{kind}_ema", "val (EMA)", "--")]:
            # the epochs that have the value: no EMA yet, or not validated (--val-every)
            points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None and h[key] == h[key]]
            if points:
                ax.plot(*zip(*points), style, label=label, marker="." if len(points) < 30 else None)
    ax_loss.set(title="loss (val: plain cross-entropy)", xlabel="epoch", ylabel="loss")
    ax_acc.set(title="accuracy", xlabel="epoch", ylabel="accuracy", ylim=(0, 1.01))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def confusion_counts(targets: Sequence[int] | np.ndarray, preds: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """n x n counts: rows are true classes, columns predicted ones (scikit-learn's layout)."""
    from sklearn.metrics import confusion_matrix
    return confusion_matrix(targets, preds, labels=list(range(n)))


def row_normalise(cm):
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def draw_confusion(ax: Axes, cm: np.ndarray, classes: Sequence[str], title: str,
                   annotate: bool = True) -> AxesImage:
    """A row-normalised matrix on a fixed 0..1 colour scale, so that panels side by side compare directly."""
    n = len(classes)
    im = ax.imshow(row_normalise(cm), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    step = 1 if n <= 50 else max(1, n // 50)
    ax.set_xticks(range(0, n, step), [classes[i] for i in range(0, n, step)], rotation=90,
                  fontsize=8 if n > 30 else 10)
    ax.set_yticks(range(0, n, step), [classes[i] for i in range(0, n, step)], fontsize=8 if n > 30 else 10)
    if annotate and n <= 30:  # cell values only while they stay readable
        normalised = row_normalise(cm)
        for i in range(n):
            for j in range(n):
                if normalised[i, j] >= 0.005:
                    ax.text(j, i, f"{normalised[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if normalised[i, j] > 0.5 else "black")
    ax.set(title=title, xlabel="predicted class", ylabel="true class")
    return im


def plot_confusion(targets: Sequence[int] | np.ndarray, preds: Sequence[int] | np.ndarray, classes: Sequence[str],
                   path: str, title: str = "confusion matrix") -> None:
    """Row-normalised validation confusion matrix as a PNG, its counts beside it as CSV (same name, .csv)."""
    import pandas as pd
    plt = pyplot()
    n = len(classes)
    cm = confusion_counts(targets, preds, n)
    pd.DataFrame(cm, index=pd.Index(classes, name="true"), columns=classes).to_csv(os.path.splitext(path)[0] + ".csv")
    side = min(4 + 0.35 * n, 30)
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
    im = draw_confusion(ax, cm, classes, title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    save_figure(fig, path)


def markdown_table(df: pd.DataFrame, floats: str = "{:.4f}") -> str:
    """A pandas DataFrame as a GitHub markdown table (pandas' own to_markdown needs the tabulate package)."""
    def cell(v):
        return floats.format(v) if isinstance(v, (float, np.floating)) else str(v)
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + " --- |" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def save_figure(fig: Figure, path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp.png"  # processes sharing a study write the same plots: one file each
    fig.savefig(tmp, dpi=100)
    pyplot().close(fig)
    os.replace(tmp, path)
