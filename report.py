"""The model report: what a checkpoint gets right and wrong on a labelled folder.

    python inference.py --checkpoint checkpoints/<run>/best.pt --val-dir data/val --report

Writes into the report folder: per_class.csv (precision, recall, F1, support), confused_pairs.csv (the 20 most
frequent true -> predicted mistakes), tta.csv (accuracy per test-time augmentation mode), report.md with all of it,
misclassified.png (the most confident mistakes) and reliability.png (calibration, with the expected calibration
error). Everything is computed from the softmax probabilities of the chosen TTA mode.
"""
from __future__ import annotations

import argparse
import collections
import os

import numpy as np
import pandas as pd

from errors import UserError, run_cli
from images import load_rgb
from plots import confusion_counts, markdown_table, pyplot, save_figure

TOP_PAIRS = 20
CALIBRATION_BINS = 15


def per_class_table(targets, preds, classes):
    from sklearn.metrics import precision_recall_fscore_support
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, preds, labels=list(range(len(classes))), zero_division=0)
    return pd.DataFrame({"class": classes, "precision": precision, "recall": recall, "f1": f1, "support": support})


def confused_pairs(cm, classes, top=TOP_PAIRS):
    """The off-diagonal cells of a count matrix, most frequent first (ties: in class order)."""
    cm = np.asarray(cm)
    rows = cm.sum(axis=1)
    pairs = [(cm[i, j], i, j) for i in range(len(cm)) for j in range(len(cm)) if i != j and cm[i, j] > 0]
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    return pd.DataFrame([{"true": classes[i], "predicted": classes[j], "count": int(n), "share_of_true": n / rows[i]}
                         for n, i, j in pairs[:top]], columns=["true", "predicted", "count", "share_of_true"])


def calibration(probs, targets, bins=CALIBRATION_BINS):
    """Reliability table over equal-width confidence bins and the expected calibration error:
    ECE = sum over bins of (images in bin / all images) * |accuracy in bin - mean confidence in bin|."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == np.asarray(targets)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)  # bin i is (edge i, edge i+1]
    rows = []
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        rows.append({"lower": edges[b], "upper": edges[b + 1], "count": n,
                     "confidence": confidence[inside].mean() if n else np.nan,
                     "accuracy": correct[inside].mean() if n else np.nan})
    table = pd.DataFrame(rows)
    filled = table[table["count"] > 0]
    ece = float((filled["count"] / len(confidence) * (filled["accuracy"] - filled["confidence"]).abs()).sum())
    return table, ece


def plot_reliability(table, ece, path):
    plt = pyplot()
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, height_ratios=[3, 1])
    width = table["upper"] - table["lower"]
    ax.bar(table["lower"], table["accuracy"].fillna(0), width=width, align="edge", edgecolor="black",
           color="tab:blue", label="accuracy in the bin")
    ax.bar(table["lower"], (table["confidence"] - table["accuracy"]).fillna(0), bottom=table["accuracy"].fillna(0),
           width=width, align="edge", color="tab:red", alpha=0.3, hatch="//", label="gap to the mean confidence")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set(title=f"reliability diagram (ECE {ece:.4f})", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    ax_count.bar(table["lower"], table["count"], width=width, align="edge", color="gray", edgecolor="black")
    ax_count.set(xlabel="confidence (top softmax probability)", ylabel="images")
    fig.tight_layout()
    save_figure(fig, path)


# a labelled folder as the report sees it: image paths, their class indices, the class names
Labelled = collections.namedtuple("Labelled", "paths targets classes")


def plot_misclassified(labelled, probs, path, count=24):
    """The most confident mistakes first: each image with its true label, the prediction and its probability."""
    paths, targets, classes = labelled
    columns = 6
    plt = pyplot()
    preds, confidence = probs.argmax(1), probs.max(1)
    wrong = np.flatnonzero(preds != np.asarray(targets))
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
    rows = max(1, -(-len(wrong) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        img = load_rgb(paths[i])
        img.thumbnail((160, 160))
        ax.imshow(img)
        ax.set_title(f"true {classes[targets[i]]}\npred {classes[preds[i]]} ({confidence[i]:.2f})", fontsize=9,
                     color="darkred")
    if len(wrong) == 0:
        axes[0, 0].set_title("no mistakes")
    fig.suptitle(f"the {len(wrong)} most confident mistakes")
    fig.tight_layout()
    save_figure(fig, path)


def write_report(out_dir: str, probs_by_mode: dict[str, np.ndarray], labelled: Labelled, mode: str,
                 title: str) -> dict[str, float | pd.DataFrame]:
    """All report files from the probabilities of every evaluated TTA mode on a Labelled folder; `mode` is the one
    analysed."""
    os.makedirs(out_dir, exist_ok=True)
    targets, classes = np.asarray(labelled.targets), labelled.classes
    probs = probs_by_mode[mode]
    preds = probs.argmax(1)
    per_class = per_class_table(targets, preds, classes)
    pairs = confused_pairs(confusion_counts(targets, preds, len(classes)), classes)
    table, ece = calibration(probs, targets)
    tta = pd.DataFrame([{"tta": m, "accuracy": float((p.argmax(1) == targets).mean())}
                        for m, p in probs_by_mode.items()])
    per_class.to_csv(os.path.join(out_dir, "per_class.csv"), index=False, float_format="%.6g")
    pairs.to_csv(os.path.join(out_dir, "confused_pairs.csv"), index=False, float_format="%.6g")
    tta.to_csv(os.path.join(out_dir, "tta.csv"), index=False, float_format="%.6g")
    plot_misclassified(labelled, probs, os.path.join(out_dir, "misclassified.png"))
    plot_reliability(table, ece, os.path.join(out_dir, "reliability.png"))

    accuracy = float((preds == targets).mean())
    worst = per_class.sort_values("f1", kind="stable").head(10)
    text = [f"# Model report: {title}", "",
            f"{len(targets)} labelled images, {len(classes)} classes, TTA `{mode}`: accuracy {accuracy:.4f}, "
            f"macro F1 {per_class['f1'].mean():.4f}, expected calibration error {ece:.4f} "
            f"({CALIBRATION_BINS} bins).", "",
            "## Accuracy per test-time augmentation", "", markdown_table(tta),
            "## Lowest F1", "", markdown_table(worst),
            f"## Most confused pairs (top {TOP_PAIRS})", "",
            markdown_table(pairs) if len(pairs) else "no mistakes\n",
            "## Most confident mistakes", "", "![misclassified](misclassified.png)", "",
            "## Calibration", "", "![reliability diagram](reliability.png)", "",
            "## Every class", "", markdown_table(per_class)]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(text))
    return dict(accuracy=accuracy, ece=ece, per_class=per_class, pairs=pairs, tta=tta)


def main(argv: list[str] | None = None) -> int:
    """This file holds the report's code; the command that writes a report is inference.py --report."""
    command = "python inference.py --checkpoint checkpoints/<run>/best.pt --val-dir data/val --report [DIR]"
    parser = argparse.ArgumentParser(
        description="The model report (per-class precision/recall/F1, the most confused pairs, the most confident "
                    "mistakes, calibration, accuracy per TTA mode) of a checkpoint on a labelled folder. This file "
                    f"holds its code and has no command of its own: write a report with {command}")
    parser.parse_args(argv)
    raise UserError(f"report.py has no command of its own: write a model report with {command}")


if __name__ == "__main__":
    run_cli(main)
