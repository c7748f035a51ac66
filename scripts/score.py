"""
Score a prediction.csv against the held-back test labels.

    python scripts/score.py prediction.csv data/sample/test_labels.csv
    python scripts/score.py prediction.csv data/sample/test_labels.csv --json score.json
    python scripts/score.py prediction.csv data/sample/test_labels.csv --plot test_confusion.png

prediction.csv: image_name,pred_label (a column called "label" is accepted too)
labels csv:     image_name,label      (as written by scripts/fashion_mnist.py)

Labels are compared as strings after stripping whitespace, so "07" is not "7":
the grader of the original homework would not have forgiven it either.
"""

import argparse
import json
import os
import sys

import pandas as pd

PRED_COLUMNS = ("pred_label", "label")  # first one found wins


class ScoreError(ValueError):
    """Inputs that cannot be scored; the CLI reports it as one line, exit code 2."""


def read_csv(path):
    if not os.path.isfile(path):
        raise ScoreError(f"{path}: no such file")
    try:
        # dtype=str and no NA parsing: "07" must stay "07" and an empty cell stays ""
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ScoreError(f"{path}: not a readable csv ({str(e).splitlines()[0]})")


def few(names, n=3):
    names = sorted(names)
    more = f", ... (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def clean(df, label_columns, what):
    """Return a frame with stripped string columns image_name, label."""
    df = df.rename(columns=lambda c: str(c).strip())
    label_col = next((c for c in label_columns if c in df.columns), None)
    if "image_name" not in df.columns or label_col is None:
        want = "image_name," + "|".join(label_columns)
        raise ScoreError(f"{what} must have columns {want}, found: {','.join(map(str, df.columns))}")
    out = pd.DataFrame({
        "image_name": df["image_name"].astype(str).str.strip(),
        "label": df[label_col].astype(str).str.strip(),
    })
    dup = out["image_name"][out["image_name"].duplicated()].unique()
    if len(dup):
        raise ScoreError(f"{what} has {len(dup)} duplicated image_name(s): {few(dup)}")
    return out


def label_order(labels):
    # "2" before "10" when every label is a number; plain string order otherwise
    labels = sorted(set(labels))
    if all(l.isdigit() for l in labels):
        return sorted(labels, key=lambda l: (int(l), l))
    return labels


def score(pred_df, labels_df):
    """
    Compare predictions with ground truth. Both are DataFrames with an image_name
    column; predictions carry pred_label (or label), ground truth carries label.
    Returns a dict with accuracy, macro_f1, counts and a confusion DataFrame
    (rows: true label, columns: predicted label). Raises ScoreError on bad input.
    """
    pred = clean(pred_df, PRED_COLUMNS, "predictions")
    truth = clean(labels_df, ("label",), "labels")
    if len(truth) == 0:
        raise ScoreError("labels file has no rows")

    missing = set(truth["image_name"]) - set(pred["image_name"])
    if missing:
        raise ScoreError(f"predictions missing for {len(missing)} of {len(truth)} labelled images: "
                         f"{few(missing)}")
    # predictions for unlabelled images are ignored but counted, so a mix-up is visible
    extra = len(set(pred["image_name"]) - set(truth["image_name"]))

    from sklearn.metrics import accuracy_score, f1_score  # slow import; bad input fails fast

    merged = truth.merge(pred, on="image_name", suffixes=("_true", "_pred"))
    y_true, y_pred = merged["label_true"], merged["label_pred"]
    # sklearn's default label set is the union of true and predicted labels, so a
    # predicted label that never occurs in the truth (e.g. "07") counts as a class
    # with F1 = 0 and drags the macro average down instead of being silently dropped
    order = label_order(list(y_true) + list(y_pred))
    confusion = pd.crosstab(pd.Categorical(y_true, categories=order),
                            pd.Categorical(y_pred, categories=order),
                            rownames=["true"], colnames=["pred"], dropna=False)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=order, average="macro", zero_division=0)),
        "matched": int(len(merged)),
        "labelled": int(len(truth)),
        "extra_predictions": int(extra),
        "confusion": confusion,
    }


def to_json(result):
    out = {k: v for k, v in result.items() if k != "confusion"}
    cm = result["confusion"]
    out["confusion"] = {"labels": [str(c) for c in cm.columns], "matrix": cm.values.tolist()}
    return out


def plot(confusion, path):
    """The confusion matrix as train.py draws it (row-normalised PNG, counts beside it as .csv)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import numpy as np
    from plots import plot_confusion

    counts = confusion.values
    true, pred = np.nonzero(counts)
    n = counts[true, pred]
    plot_confusion(np.repeat(true, n), np.repeat(pred, n), [str(c) for c in confusion.columns], path,
                   title="test confusion matrix")


def main(argv=None):
    p = argparse.ArgumentParser(description="Score prediction.csv against test labels.")
    p.add_argument("predictions", help="csv with image_name,pred_label")
    p.add_argument("labels", help="csv with image_name,label (e.g. data/sample/test_labels.csv)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers to FILE")
    p.add_argument("--plot", metavar="PNG", help="also draw the row-normalised confusion matrix to PNG (its "
                   "counts beside it, same name .csv)")
    args = p.parse_args(argv)

    result = score(read_csv(args.predictions), read_csv(args.labels))

    print(f"accuracy  {result['accuracy']:.4f}")
    print(f"macro_f1  {result['macro_f1']:.4f}")
    print(f"matched   {result['matched']} / {result['labelled']} labelled images")
    if result["extra_predictions"]:
        print(f"ignored   {result['extra_predictions']} predictions for images without a label")
    print("\nconfusion matrix (rows: true, columns: predicted)")
    print(result["confusion"].to_string())

    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(result), f, indent=2)
            f.write("\n")
    if args.plot:
        plot(result["confusion"], args.plot)


if __name__ == "__main__":
    try:
        main()
    except ScoreError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
