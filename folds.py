"""Held-out splits: K-fold cross-validation (a stratified split of train/ + val/, one training run per held-out
fold) and --val-fraction (a stratified share of train/ as validation, for data without a val/ folder).

    python train.py --folds 5 --fold 0 --run-name cv            # one fold
    python train.py --folds 5 --all-folds --run-name cv         # folds 0..4 into checkpoints/cv/fold<i>/

The split is drawn from the file list and --seed once and then kept: each run stores it as folds.csv (image path
relative to --data-dir, class, fold), a resumed run uses its own again, and the later folds of --all-folds use fold
0's (--fold-split), so an image added to the data since cannot move a trained-on image into a held-out fold.
With --all-folds, every image is predicted once by the model that did not train on it: the out-of-fold accuracy, an
estimate of how the 5-model ensemble's members generalise that uses all the labelled images (it is slightly
optimistic: each fold's best epoch is chosen on the same held-out fold).
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from config import time_limit_seconds
from errors import UserError

if TYPE_CHECKING:
    from config import Config
    from dataset import LabelledImages


def check_fold_args(cfg):
    if cfg.all_folds and cfg.folds < 2:
        raise UserError("--all-folds needs --folds K (K >= 2)")
    if cfg.folds and (cfg.folds < 2 or not 0 <= cfg.fold < cfg.folds):
        raise UserError(f"--folds {cfg.folds} --fold {cfg.fold}: need K >= 2 and 0 <= fold < K")
    if cfg.fold_split and not cfg.folds:
        raise UserError(f"--fold-split {cfg.fold_split} is the split of a --folds run: give --folds K with it")


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


FOLD_SPLIT = "folds.csv"  # every pooled image of a --folds run: path, class, fold


def fold_datasets(cfg: Config, train_set: LabelledImages, val_set: LabelledImages, classes: Sequence[str],
                  saved_split: str | None = None) -> tuple[LabelledImages, LabelledImages, pd.DataFrame | None]:
    """(train, held-out, split table) for --folds K --fold i; train keeps the train augmentation, the held-out fold
    the evaluation transform. saved_split: a folds.csv whose assignment is used again (a resumed run's own, or
    --fold-split: the other folds of --all-folds take fold 0's), so that a changed file list cannot move an image
    the run trained on into its held-out fold. Without --folds, the datasets come back as they are and no split."""
    check_fold_args(cfg)
    if not cfg.folds:
        return train_set, val_set, None
    pool = train_set.samples + val_set.samples
    names = [os.path.relpath(p, cfg.data_dir) for p, _ in pool]
    labels = [classes[t] for _, t in pool]
    if saved_split:
        split = read_fold_split(saved_split, cfg.folds)
        folds = saved_folds(split, names, labels, saved_split)
    else:
        folds = assign_folds([t for _, t in pool], cfg.folds, cfg.seed)
        split = pd.DataFrame({"image": names, "label": labels, "fold": folds})
    train = train_set.with_samples([s for s, f in zip(pool, folds) if f != cfg.fold])
    held_out = val_set.with_samples([s for s, f in zip(pool, folds) if f == cfg.fold])
    return train, held_out, split


def read_fold_split(path: str, k: int) -> pd.DataFrame:
    """A folds.csv (image, label, fold) of a K-fold split, checked; one-line errors for another file or K."""
    if not os.path.isfile(path):
        raise UserError(f"--fold-split {path}: no such file (a folds.csv that a --folds run wrote)")
    split = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(split.columns) != ["image", "label", "fold"] or not split["fold"].str.isdigit().all():
        raise UserError(f"{path} is not a fold split: expected the columns image,label,fold of a folds.csv")
    split["fold"] = split["fold"].astype(int)
    if sorted(set(split["fold"])) != list(range(k)):
        raise UserError(f"{path} splits the images into {split['fold'].max() + 1} folds, not --folds {k}: train "
                        f"with --folds {split['fold'].max() + 1}, or without the saved split")
    return split


def saved_folds(split: pd.DataFrame, names: Sequence[str], labels: Sequence[str], path: str) -> np.ndarray:
    """Each image's fold in the saved split; -1 (trained on in every fold, never held out) for an image the split
    does not hold, or holds under another class."""
    saved = {(image, label): fold for image, label, fold in split.itertuples(index=False)}
    print(f"--folds: the fold assignment of {path} ({len(saved)} images), as the run began with")
    say_changed_files(saved, list(zip(names, labels)), path, "they train in every fold and are never held out")
    return np.array([saved.get(key, -1) for key in zip(names, labels)], dtype=int)


def say_changed_files(saved: Collection, current: Sequence[tuple[str, str]], path: str, fate: str) -> None:
    """Warn about the (image, class) pairs of the data that a saved split does not hold, and the other way round:
    the file list changed since the split was made (fate: what becomes of the new images)."""
    new = [image for image, label in current if (image, label) not in saved]
    gone = len(saved) - (len(current) - len(new))
    if new:
        print(f"warning: {len(new)} image(s) are not in {path} (added, or moved to another class, since the split "
              f"was made): {fate}: {', '.join(new[:5])}{', ...' if len(new) > 5 else ''}")
    if gone:
        print(f"warning: {gone} image(s) of {path} are no longer in the data (removed, or moved to another class)")


def write_split(split: pd.DataFrame | None, run_dir: str, name: str = FOLD_SPLIT) -> None:
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
        say_changed_files(set(zip(table["image"], table["label"])), [(n, classes[t]) for n, (_, t) in
                                                                     zip(names, pool)], saved_split, "they train")
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
        stale = os.path.join(run_dir, "oof.csv")  # an earlier best epoch's: not this best.pt's predictions
        if os.path.exists(stale):
            os.remove(stale)
        return
    pd.DataFrame({"image": [os.path.relpath(p, cfg.data_dir) for p, _ in val_set.samples],
                  "label": [classes[t] for _, t in val_set.samples],
                  "pred": [classes[i] for i in preds], "fold": cfg.fold}).to_csv(
        os.path.join(run_dir, "oof.csv"), index=False)


def fold_budget(cfg: Config, fold: int, started: float) -> list[str]:
    """The --budget flag of fold `fold`: an even share of what is left of the command's budget."""
    if not cfg.budget:
        return []
    left = time_limit_seconds(cfg.budget, "--budget") - (time.monotonic() - started)
    return ["--budget", f"{max(1.0, left / (cfg.folds - fold)):.1f}s"]


def run_all_folds(train_main: Callable[[list[str]], int], argv: list[str] | None, cfg: Config,
                  run_name: str, started: float) -> int:
    """Train folds 0 .. K-1 one after the other (each a full train.py run), then report out-of-fold accuracy.
    started: time.monotonic() when the command began; --budget is the whole command's, each fold taking an even
    share of what is left when it starts."""
    check_fold_args(cfg)
    argv = list(sys.argv[1:] if argv is None else argv)
    parent = os.path.join(cfg.output_dir, run_name)
    for i in range(cfg.folds):
        print(f"==== fold {i + 1}/{cfg.folds}")
        # one split for all folds: the later ones take fold 0's, whatever the file list holds by then
        same_split = ["--fold-split", os.path.join(parent, "fold0", FOLD_SPLIT)] if i else []
        code = train_main(argv + ["--no-all-folds", "--fold", str(i), "--run-name", f"{run_name}/fold{i}",
                                  *same_split, *fold_budget(cfg, i, started)])
        if code:
            return code
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
