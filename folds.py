"""Held-out splits: K-fold cross-validation (a stratified split of train/ + val/, one training run per held-out
fold) and --val-fraction (a stratified share of train/ as validation, for data without a val/ folder).

    python train.py --folds 5 --fold 0 --run-name cv            # one fold
    python train.py --folds 5 --all-folds --run-name cv         # folds 0..4 into checkpoints/cv/fold<i>/

The split depends only on the file list and --seed, so every fold run of one seed sees the same split; each run
stores it as folds.csv (image path relative to --data-dir, class, fold). With --all-folds, every image is predicted
once by the model that did not train on it: the out-of-fold accuracy, an estimate of how the 5-model ensemble's
members generalise that uses all the labelled images (it is slightly optimistic: each fold's best epoch is chosen
on the same held-out fold).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from errors import UserError

if TYPE_CHECKING:
    from config import Config
    from dataset import LabelledImages


def check_fold_args(cfg):
    if cfg.all_folds and cfg.folds < 2:
        raise UserError("--all-folds needs --folds K (K >= 2)")
    if cfg.folds and (cfg.folds < 2 or not 0 <= cfg.fold < cfg.folds):
        raise UserError(f"--folds {cfg.folds} --fold {cfg.fold}: need K >= 2 and 0 <= fold < K")


def assign_folds(targets, k, seed):
    """Fold index (0 .. k-1) per sample: every fold holds about 1/k of each class, reproducible from the seed."""
    from sklearn.model_selection import StratifiedKFold  # imported here: sklearn costs a second
    targets = np.asarray(targets)
    counts = np.bincount(targets)
    if counts[counts > 0].min() < k:
        raise UserError(f"--folds {k}: some class has only {counts[counts > 0].min()} images, fewer than the folds")
    folds = np.empty(len(targets), dtype=int)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for i, (_, held_out) in enumerate(splitter.split(np.zeros(len(targets)), targets)):
        folds[held_out] = i
    return folds


def fold_datasets(cfg: Config, train_set: LabelledImages, val_set: LabelledImages,
                  classes: Sequence[str]) -> tuple[LabelledImages, LabelledImages, pd.DataFrame | None]:
    """(train, held-out, split table) for --folds K --fold i; train keeps the train augmentation, the held-out fold
    the evaluation transform. Without --folds, the datasets come back as they are and no split."""
    check_fold_args(cfg)
    if not cfg.folds:
        return train_set, val_set, None
    pool = train_set.samples + val_set.samples
    folds = assign_folds([t for _, t in pool], cfg.folds, cfg.seed)
    split = pd.DataFrame({"image": [os.path.relpath(p, cfg.data_dir) for p, _ in pool],
                          "label": [classes[t] for _, t in pool], "fold": folds})
    train = train_set.with_samples([s for s, f in zip(pool, folds) if f != cfg.fold])
    held_out = val_set.with_samples([s for s, f in zip(pool, folds) if f == cfg.fold])
    return train, held_out, split


def write_split(split: pd.DataFrame | None, run_dir: str, name: str = "folds.csv") -> None:
    if split is not None:
        split.to_csv(os.path.join(run_dir, name), index=False)


# ---------------------------------------------------------------- --val-fraction

VAL_SPLIT = "val_split.csv"  # every train/ image of a --val-fraction run: path, class, and "train" or "val"


def holdout_mask(targets, fraction, seed):
    """(held out, too small): a boolean per sample, about `fraction` of every class held out (at least one image,
    never all of them) from a generator seeded with `seed`; and the class indices with a single image, which stay
    in training."""
    targets = np.asarray(targets, dtype=int)
    rng = np.random.default_rng(seed)
    held, too_small = np.zeros(len(targets), dtype=bool), []
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        if len(members) < 2:
            too_small.append(int(c))
            continue
        k = min(len(members) - 1, max(1, round(fraction * len(members))))
        held[rng.permutation(members)[:k]] = True
    return held, too_small


def val_fraction_datasets(cfg: Config, train_set: LabelledImages, val_set: LabelledImages, classes: Sequence[str],
                          saved_split: str | None) -> tuple[LabelledImages, LabelledImages, pd.DataFrame | None]:
    """(train, val, split table) for --val-fraction F: val_set is the empty evaluation view of train/ that
    dataset.build_train_val gives without val/. saved_split: a resumed run's val_split.csv, whose held-out images
    are used again (images added to train/ since then train). Without --val-fraction, the datasets as they are."""
    if not cfg.val_fraction:
        return train_set, val_set, None
    pool = train_set.samples
    names = [os.path.relpath(p, cfg.data_dir) for p, _ in pool]
    if saved_split and os.path.isfile(saved_split):
        table = pd.read_csv(saved_split, dtype=str, keep_default_na=False)
        listed = set(table.loc[table["split"] == "val", "image"])
        held = np.array([name in listed for name in names], dtype=bool)
        print(f"--val-fraction: validating on the {int(held.sum())} images of {saved_split}, as the run did")
    else:
        held, too_small = holdout_mask(train_set.targets, cfg.val_fraction, cfg.seed)
        if too_small:
            print(f"warning: --val-fraction {cfg.val_fraction:g}: {len(too_small)} class(es) have a single image, "
                  f"which stays in training (no val image for them): {', '.join(classes[c] for c in too_small[:5])}"
                  f"{', ...' if len(too_small) > 5 else ''}")
    if not held.any():
        raise UserError(f"--val-fraction {cfg.val_fraction:g}: no class of train/ has two images, so none can be "
                        "held out for validation")
    table = pd.DataFrame({"image": names, "label": [classes[t] for _, t in pool],
                          "split": np.where(held, "val", "train")})
    train = train_set.with_samples([s for s, h in zip(pool, held) if not h])
    val = val_set.with_samples([s for s, h in zip(pool, held) if h])
    return train, val, table


def write_oof(run_dir: str, cfg: Config, val_set: LabelledImages, preds: np.ndarray,
              classes: Sequence[str]) -> None:
    """The held-out fold's predictions of the best epoch (centre crop), for the out-of-fold accuracy."""
    if len(preds) != len(val_set.samples):
        print("warning: some held-out images were unreadable; oof.csv is not written for this fold")
        return
    pd.DataFrame({"image": [os.path.relpath(p, cfg.data_dir) for p, _ in val_set.samples],
                  "label": [classes[t] for _, t in val_set.samples],
                  "pred": [classes[i] for i in preds], "fold": cfg.fold}).to_csv(
        os.path.join(run_dir, "oof.csv"), index=False)


def run_all_folds(train_main: Callable[[list[str]], int], argv: list[str] | None, cfg: Config,
                  run_name: str) -> int:
    """Train folds 0 .. K-1 one after the other (each a full train.py run), then report out-of-fold accuracy."""
    check_fold_args(cfg)
    argv = list(sys.argv[1:] if argv is None else argv)
    for i in range(cfg.folds):
        print(f"==== fold {i + 1}/{cfg.folds}")
        code = train_main(argv + ["--no-all-folds", "--fold", str(i), "--run-name", f"{run_name}/fold{i}"])
        if code:
            return code
    parent = os.path.join(cfg.output_dir, run_name)
    parts = [os.path.join(parent, f"fold{i}", "oof.csv") for i in range(cfg.folds)]
    missing = [i for i, p in enumerate(parts) if not os.path.exists(p)]
    if len(missing) == len(parts):
        raise UserError("no fold wrote its oof.csv (unreadable held-out images): no out-of-fold accuracy")
    if missing:
        print(f"warning: fold(s) {', '.join(map(str, missing))} wrote no oof.csv (unreadable held-out images): the "
              "out-of-fold accuracy below leaves their images out")
    oof = pd.concat([pd.read_csv(p, dtype=str) for p in parts if os.path.exists(p)], ignore_index=True)
    oof.to_csv(os.path.join(parent, "oof.csv"), index=False)
    accuracy = float((oof["label"] == oof["pred"]).mean())
    print(f"out-of-fold accuracy {accuracy:.4f} over {len(oof)} images ({cfg.folds} folds); written to "
          f"{os.path.join(parent, 'oof.csv')}")
    print(f"next: python inference.py --checkpoint {parent} --data-dir {cfg.data_dir}")
    return 0
