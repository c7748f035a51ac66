"""tune.py --cv K: a recipe scored by its out-of-fold accuracy over train/ + val/ instead of its val accuracy. A
small val set makes the search's choice a coin toss (300 images give about ±1.3 points of standard error near 95%);
pooling train/ and val/ into K folds and holding each out once scores a recipe on every labelled image, at K times
the cost of a trial.

Each of a recipe's K runs is a train.py run of the same settings and seed (--folds K --fold i), in
trials/<run>/fold<i>/. Every run of the study holds out the same images: the first fold run draws the split from
--seed and the file list and writes folds.csv, which becomes the study's (<study>/folds.csv), and every later run
takes it (--fold-split). The recipe's value is the share of the pooled images its held-out folds got right at each
fold's best epoch, the same number as train.py --all-folds prints; the pruner judges a trial on its first fold
(every trial's first fold holds out the same images), and a trial it stops trains no further folds.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import os
import shutil
import time

from dataset import list_files
from errors import UserError
from folds import FOLD_SPLIT
from trials import Outcome, Search, run_training, trial_command

if TYPE_CHECKING:
    import argparse

    import optuna

# shared train.py settings that choose the validation images themselves: --cv chooses them
FOLD_FLAGS = ("folds", "fold", "fold_split", "val_fraction")


def run_recipe(search: Search, settings: dict, name: str, seed: int, time_limit: float,
               trial: optuna.trial.Trial | None = None) -> Outcome:
    """One scored run of a recipe (a search trial or a confirmation run) in trials/<name>: a single train.py run
    validated on val/, or with --cv K the K fold runs. time_limit: the whole recipe's (0: none)."""
    run_dir = os.path.join(search.study_dir, "trials", name)
    if not search.args.cv:
        return run_training(search, trial_command(search, settings, name, seed, time_limit), run_dir, trial)
    start, runs = time.monotonic(), []
    for fold in range(search.args.cv):
        left = time_limit - (time.monotonic() - start) if time_limit else 0
        if time_limit and left < 1:
            return Outcome("budget", float("nan"), sum(r.epochs for r in runs), time.monotonic() - start, 0)
        command = trial_command(search, settings, f"{name}/fold{fold}", seed, left) + fold_flags(search, fold)
        outcome = run_training(search, command, os.path.join(run_dir, f"fold{fold}"), trial if fold == 0 else None)
        runs.append(outcome)
        if fold == 0:
            keep_split(search, os.path.join(run_dir, "fold0", FOLD_SPLIT))
        if outcome.state != "complete":  # pruned on its first fold, stopped by the budget, or failed
            return Outcome(outcome.state, outcome.value, sum(r.epochs for r in runs), time.monotonic() - start,
                           outcome.n_val, outcome.error)
    return out_of_fold(runs, time.monotonic() - start)


def class_images(folder: str) -> dict[str, int]:
    """{class: images} of an image folder's class folders; {} when there is no such folder."""
    if not os.path.isdir(folder):
        return {}
    return {c: len(list_files(os.path.join(folder, c))[0]) for c in sorted(os.listdir(folder))
            if os.path.isdir(os.path.join(folder, c))}


def pooled_images(data_dir: str) -> dict[str, int]:
    """{class: images} of train/ and val/ together: what --cv splits into folds."""
    pooled = class_images(os.path.join(data_dir, "train"))
    for name, count in class_images(os.path.join(data_dir, "val")).items():
        pooled[name] = pooled.get(name, 0) + count
    return pooled


def check_cv(data_dir: str, cv: int) -> None:
    """Before any trial: every class needs an image in each of the K folds (else each fold run would fail)."""
    small = {name: n for name, n in pooled_images(data_dir).items() if n < cv}
    if cv and small:
        shown = ", ".join(f"{name} ({n})" for name, n in list(small.items())[:5])
        raise UserError(f"--cv {cv}: {len(small)} class(es) have fewer images than folds in train/ + val/: {shown}"
                        f"{', ...' if len(small) > 5 else ''}; give fewer folds")


def study_split(search: Search) -> str:
    return os.path.join(search.study_dir, FOLD_SPLIT)


def fold_flags(search: Search, fold: int) -> list[str]:
    """train.py's flags for fold `fold` of a --cv recipe: the study's split once it has one."""
    split = study_split(search)
    return ["--folds", str(search.args.cv), "--fold", str(fold),
            *(["--fold-split", split] if os.path.isfile(split) else [])]


def keep_split(search: Search, written: str) -> None:
    """The first fold run's folds.csv becomes the study's, for every later run (a copy, then an atomic rename: two
    processes starting a study draw the same split from the same seed and files)."""
    if os.path.isfile(study_split(search)) or not os.path.isfile(written):
        return
    tmp = f"{study_split(search)}.{os.getpid()}.tmp"
    shutil.copyfile(written, tmp)
    os.replace(tmp, study_split(search))


def out_of_fold(runs: list[Outcome], seconds: float) -> Outcome:
    """The recipe's outcome from its K complete fold runs: the out-of-fold accuracy (each fold's best-epoch
    accuracy weighted by its held-out images) over all the held-out images."""
    images = sum(r.n_val for r in runs)
    value = sum(r.value * r.n_val for r in runs) / images if images else float("nan")
    return Outcome("complete", value, sum(r.epochs for r in runs), seconds, images)


def recipe_epochs(args: argparse.Namespace) -> int:
    """The epochs one scored run of a recipe trains: --epochs-per-trial, K times with --cv K."""
    return args.epochs_per_trial * max(args.cv, 1)
