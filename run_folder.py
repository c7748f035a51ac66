"""A run's folder: its name, what a run writes there, refusing or clearing an earlier run's files, the epoch copies
of last.pt, and when last.pt and the plots are written (--save-share)."""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import time
from datetime import datetime
from typing import TYPE_CHECKING

import pandas as pd
import torch

import distributed
from errors import UserError, check_folder_path
from utils import short_names

if TYPE_CHECKING:
    from config import Config

# what a run writes into its folder (inference.py --report adds report/, --all-folds the fold<i>/ runs, ablation.py
# --test-labels the test predictions of its best.pt and what they were made from): a new run
# with --overwrite removes all of it first, so that nothing of the old run can be resumed, pruned, ensembled or
# counted in place of the new run's
RUN_FILES = ["last.pt", "best.pt", "epoch-*.pt", ".tmp-*.pt", "config.json", "history.csv", "curves.png",
             "confusion_matrix.png", "confusion_matrix.csv", "folds.csv", "val_split.csv", "oof.csv",
             "skipped_images.txt", "test_prediction_*",
             "*.tmp.png", "tensorboard", "report", "fold[0-9]*"]


def last_path(run_dir: str) -> str:
    """The run's resumable checkpoint, the file every stop writes and --resume auto looks for."""
    return os.path.join(run_dir, "last.pt")


def write_config(run_dir: str, cfg: Config, classes: list[str], processes: int) -> None:
    """config.json: the run's settings as given (a run trains again from it with --config), its classes, and how
    many processes trained it."""
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(dict(dataclasses.asdict(cfg), classes=list(classes), processes=processes), f, indent=2)


def write_history(run_dir: str, history: list[dict]) -> None:
    """history.csv: one row per epoch (history.py reads it back)."""
    pd.DataFrame(history).to_csv(os.path.join(run_dir, "history.csv"), index=False, float_format="%.6g")


def write_skipped(run_dir: str, skipped_files: list[str]) -> str:
    """skipped_images.txt: every unreadable image the run has left out, one per line; returns its path."""
    path = os.path.join(run_dir, "skipped_images.txt")
    with open(path, "w") as f:
        f.write("\n".join(skipped_files) + "\n")
    return path


def run_files(run_dir: str) -> list[str]:
    """The names of the run files already in run_dir, sorted (files and folders of RUN_FILES)."""
    found = {os.path.basename(p) for pattern in RUN_FILES for p in glob.glob(os.path.join(run_dir, pattern))}
    return sorted(found)


def clear_run(run_dir: str) -> list[str]:
    """Remove the run files of an earlier run from run_dir (other files stay); returns the names removed."""
    removed = run_files(run_dir)
    for name in removed:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return removed


def remove_stale_temp_files(run_dir: str) -> None:
    """A save killed mid-write (kill -9, power loss) leaves its temporary file behind, never a broken last.pt."""
    for path in glob.glob(os.path.join(run_dir, ".tmp-*.pt")):
        os.remove(path)


def epoch_copies(run_dir):
    """[(epoch, path)] of the epoch-NNN.pt copies in run_dir, by epoch number (epoch-1000 after epoch-999)."""
    copies = []
    for path in glob.glob(os.path.join(run_dir, "epoch-*.pt")):
        match = re.fullmatch(r"epoch-(\d+)\.pt", os.path.basename(path))
        if match:
            copies.append((int(match.group(1)), path))
    return sorted(copies)


def keep_epoch_copy(run_dir: str, epoch: int, keep: int) -> None:
    """Keep last.pt as epoch-NNN.pt too (a hard link: no second write), then prune all but the newest `keep`."""
    if keep <= 0:
        return
    last, copy = last_path(run_dir), os.path.join(run_dir, f"epoch-{epoch:03d}.pt")
    if os.path.exists(copy):
        os.remove(copy)
    try:
        os.link(last, copy)
    except OSError:  # file systems without hard links
        shutil.copyfile(last, copy)
    # pruned only now that the new copy is on disk
    for _, old in epoch_copies(run_dir)[:-keep]:
        os.remove(old)


class EpochWrites:
    """--save-share: whether last.pt and the plots are written after this epoch. Each write is timed, and the next
    one waits until training has gone on for (1 / share - 1) times as long, so that writing takes at most `share` of
    the run's time: on epochs that are short beside a write (small data, large model) they are written every few
    epochs; a crash then loses at most that wait. Rank 0 writes, so it decides for every process.
    confusion: the plot of the newest best epoch, drawn at the next write."""

    def __init__(self, share: float):
        self.share, self.cost, self.done_at = share, 0.0, time.monotonic()
        self.behind, self.told, self.confusion = False, False, None

    def due(self, device: torch.device) -> bool:
        since = time.monotonic() - self.done_at
        self.behind = not distributed.any_rank(since >= self.cost * (1 / self.share - 1) and distributed.is_main(),
                                               device)
        if self.behind and not self.told and distributed.is_main():
            self.told = True
            print(f"note: writing last.pt and the plots takes {self.cost:.1f} s, an epoch {since:.1f} s: they are "
                  f"written every few epochs to keep that under --save-share {self.share:g} of the time, and always "
                  "after the last epoch and at a stop")
        return not self.behind

    def __enter__(self):
        self.started = time.monotonic()
        return self

    def __exit__(self, *exc):
        self.done_at = time.monotonic()
        self.cost, self.behind = self.done_at - self.started, False
        return False


def run_name(cfg: Config) -> str:
    """--run-name, or <arch>-<date>-<time>; under torchrun the first process names the run for all of them (each
    taking its own clock could straddle a second and write to two folders)."""
    arch = cfg.arch.replace("/", "-")  # timm/NAME: one folder, not two
    return cfg.run_name or distributed.from_main(f"{arch}-{datetime.now():%Y%m%d-%H%M%S}")


def clear_old_run(run_dir, clear):
    """Refuse a folder that holds a run, or remove that run's files first when `clear` says why they may go
    (--overwrite; --resume auto finding no last.pt), so that nothing of it (last.pt for --resume auto, best.pt for
    inference, epoch copies, oof.csv) can pass for the new run's. The first process decides and removes; the others
    wait for it."""
    old = distributed.from_main(run_files(run_dir) if distributed.is_main() else None)
    # --resume auto without last.pt may clear only a start that saved nothing worth keeping
    kept = [name for name in old if name == "best.pt" or name.startswith("epoch-")] if clear != "--overwrite" else []
    if kept and clear:
        raise UserError(f"{run_dir} holds {short_names(kept)} but no last.pt to continue from (deleted, or never "
                        "written): pass --resume with one of its epoch-NNN.pt, or --overwrite to start the run "
                        "again (its files go), or choose another --run-name")
    if old and not clear:
        raise UserError(f"{run_dir} already holds a run: pass --resume auto to continue it, --overwrite to start it "
                        f"again, or choose another --run-name (it holds {short_names(old)})")
    if old:
        removed = distributed.from_main(clear_run(run_dir) if distributed.is_main() else None)
        print(f"{clear}: removed the earlier run's {short_names(removed, 12)} from {run_dir}")


def new_run_dir(cfg: Config, clear: str | None) -> str:
    run_dir = os.path.join(cfg.output_dir, run_name(cfg))
    check_folder_path(run_dir, "run folder")  # before the data scan, not after it
    clear_old_run(run_dir, clear)
    return run_dir


def folds_parent(cfg: Config, overwrite: bool) -> str:
    """--all-folds: the parent run's name; with --overwrite, every file of an earlier run below it goes first
    (fold folders of a run with more folds, its oof.csv)."""
    name = run_name(cfg)
    parent = os.path.join(cfg.output_dir, name)
    check_folder_path(parent, "run folder")
    if overwrite:
        clear_old_run(parent, "--overwrite")
    return name
