"""A run's history.csv, read back: its complete rows (also while train.py is writing it), the validated epochs
(--val-every leaves the others' val columns empty), and an epoch's score, the better of the raw and the EMA
weights, as best.pt chooses them. train.py, tune.py and ablation.py read it through here."""
from __future__ import annotations

import csv
import math
import os

import pandas as pd


def read_history(path: str) -> list[dict]:
    """The complete rows of a history.csv that train.py may be writing right now."""
    try:
        with open(path, newline="") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    lines = text.splitlines(keepends=True)
    rows = list(csv.DictReader([line for line in lines if line.endswith("\n")]))
    return [r for r in rows if r.get("epoch_seconds") not in (None, "")]


def history_table(run_dir: str) -> pd.DataFrame:
    """A run folder's history.csv as a table of numbers (the loss phase as text), its complete rows only."""
    table = pd.DataFrame(read_history(os.path.join(run_dir, "history.csv")))
    # an empty cell (an epoch --val-every skips) is a missing number
    numbers = {column: table[column].map(lambda v: float(v) if v != "" else math.nan) for column in table
               if column != "loss_phase"}
    return table.assign(**numbers)


def better_weights(raw_acc: float, ema_acc: float | None) -> str:
    """Which weights stand for an epoch: "ema" when the EMA's val accuracy is higher than the raw weights', else
    "raw" (also without an EMA score: None, or NaN in history.csv)."""
    return "ema" if ema_acc is not None and not math.isnan(ema_acc) and ema_acc > raw_acc else "raw"


def epoch_acc(row: dict) -> float:
    """An epoch's val accuracy, as best.pt chooses: that of the better of the raw and the EMA weights."""
    raw, ema = float(row["val_acc"]), float(row.get("val_acc_ema") or "nan")
    return ema if better_weights(raw, ema) == "ema" else raw


def validated(rows: list[dict]) -> list[dict]:
    """The rows of the epochs that were validated: train.py --val-every leaves the others' val_acc empty."""
    return [r for r in rows if r.get("val_acc")]


def last_validated(history: list[dict]) -> int:
    """The last validated epoch in history.csv's rows (0 when none): --val-every leaves the others' val_acc NaN."""
    return next((row["epoch"] for row in reversed(history) if row["val_acc"] == row["val_acc"]), 0)
