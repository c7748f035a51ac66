"""Exact resume: what last.pt holds besides the weights, how a run picks it up again, and how a run stops on a signal.

A run is a function of its config: the epoch order and every image's augmentation are drawn from (seed, epoch,
image), never from a generator that runs on through the epochs, so a resumed run only has to skip the batches it has
done; the rest (dropout, random erasing, the EMA and optimiser state, the schedule) is saved and loaded as is.
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import shutil
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

import distributed
from config import Config, config_from_dict, with_implied
from errors import UserError
from runtime import restore_rng

if TYPE_CHECKING:
    from run import Run

# settings a resumed run may change freely: where things are, how fast they go and when the run stops, not what
# is computed up to then
FREE_ON_RESUME = {"data_dir", "output_dir", "run_name", "workers", "device", "weights", "save_every_steps",
                  "keep_epochs", "save_share", "max_bad_frac", "cache", "channels_last", "cudnn_benchmark", "tf32",
                  "compile", "patience", "min_delta", "time_limit", "val_every"}
# settings that give the saved state another meaning: never changed on resume
FIXED_ON_RESUME = {"arch", "head", "batch_size", "ema", "max_params"}


@dataclass
class Progress:
    """Where a run stands: with the state_dicts, all that a resumed run needs to carry on bit for bit."""
    epoch: int = 0  # the epoch in progress, 0-based
    step: int = 0  # its optimiser steps already done
    done: int = 0  # its images already trained on, all processes together: the position in the epoch order
    processes: int = 1  # how many processes trained it
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"acc": -1.0, "epoch": -1, "source": "raw"})
    skipped_files: list = field(default_factory=list)  # unreadable images met so far
    train_images: int = 0  # size of the training set the epoch order was drawn for
    # --patience: the val accuracy a better epoch must beat by more than --min-delta, and the epochs since one did
    plateau_best: float = -1.0
    plateau_epochs: int = 0
    # running sums of the epoch in progress, so that its history row is the same after a resume
    epoch_lr: float = math.nan
    loss_sum: float = 0.0
    correct: float = 0.0  # a mixed image counts the target share of its predicted class
    seen: int = 0
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0
    seconds: float = 0.0

    def start_epoch(self, lr):
        self.step, self.done, self.epoch_lr, self.loss_sum, self.correct, self.seen = 0, 0, lr, 0.0, 0, 0
        self.nonfinite_steps, self.seconds = 0, 0.0


# ---------------------------------------------------------------- the epoch order

class EpochSampler(torch.utils.data.Sampler):
    """Shuffles each epoch with a generator seeded from seed + epoch (as DistributedSampler does) and hands every
    index out with its own augmentation seed, drawn from the same generator.

    Not torch's DistributedSampler, because a resumed run must pick up mid-epoch: start_epoch(epoch, done) begins
    an epoch after the first `done` images of its order (all processes together), so a resumed epoch goes on with
    the very batches and augmentations that the interrupted one would have seen. With num_replicas > 1 each rank
    takes every num_replicas-th index of the rest, padded with the epoch's first images to a multiple of
    num_replicas (as DistributedSampler pads): every rank gets as many. Resumed with another number of processes,
    the images no process has trained on yet are shared among the new ones in the same way.
    """

    def __init__(self, size, seed, num_replicas=1, rank=0):
        self.size, self.seed, self.num_replicas, self.rank = size, seed, num_replicas, rank
        self.epoch, self.done = 0, 0

    def start_epoch(self, epoch, done=0):
        self.epoch, self.done = epoch, done

    def per_rank(self):
        return math.ceil(self.size / self.num_replicas)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        seeds = torch.randint(2**62, (self.size,), generator=g).tolist()
        rest = order[self.done:]
        rest += order[:-len(rest) % self.num_replicas]
        return iter([(i, seeds[i]) for i in rest[self.rank::self.num_replicas]])

    def __len__(self):
        return math.ceil(max(0, self.size - self.done) / self.num_replicas)


# ---------------------------------------------------------------- random number generators


# ---------------------------------------------------------------- the training state


def restore_training_state(ckpt: dict[str, Any], run: Run, replay_steps: int | None = None) -> Progress:
    """Load a last.pt (checkpoint.training_checkpoint) into a freshly built run.Run and return its Progress.

    replay_steps: the schedule changed on resume (--allow-schedule-change): instead of loading the old scheduler,
    step the new one that many times, and keep the new optimiser hyper-parameters (lr, weight decay).
    """
    run.plain.load_state_dict(ckpt["model"])
    if run.ema is not None:
        run.ema.module.load_state_dict(ckpt["ema"])
        run.ema.n_averaged.fill_(ckpt["ema_updates"])
    optimizer, scheduler = run.optimizer, run.scheduler
    if replay_steps is None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
            for _ in range(replay_steps):
                scheduler.step()
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, new in zip(optimizer.param_groups, settings):
            group.update(new)
    restore_scaler(run.scaler, ckpt["scaler"])
    restore_rng(ckpt)  # last: building the objects above drew random numbers
    return Progress(**ckpt["progress"])


def restore_scaler(scaler, state):
    """Load the fp16 loss scale. A run that trained without fp16 (CPU, bf16, --amp off) saved a disabled scaler's
    empty state: resumed on a GPU that computes in fp16, the scaler starts at its initial scale instead."""
    if not state and scaler.is_enabled():
        print("the run trained without fp16 loss scaling: the fp16 loss scale starts afresh")
        return
    scaler.load_state_dict(state)


# ---------------------------------------------------------------- --resume

def resume_path(resume: str, run_dir: str) -> str | None:
    """The checkpoint that --resume names: a file, or 'auto' = the run folder's last.pt when there is one."""
    if resume == "auto":
        path = os.path.join(run_dir, "last.pt")
        return path if os.path.isfile(path) else None
    if not os.path.isfile(resume):
        raise UserError(f"--resume {resume}: no such checkpoint")
    return resume


def resumed_config(saved: dict[str, Any], given: dict[str, Any],
                   allow_schedule_change: bool) -> tuple[Config, bool]:
    """The run's saved config with the settings given on this command line; refuses changes that break the run.

    saved: the checkpoint's config dict; given: {field: value} of the flags typed on this command line.
    """
    cfg = config_from_dict(saved)
    defaults = Config()
    changed = {k: v for k, v in given.items() if v != saved.get(k, getattr(defaults, k))}
    for name, value in changed.items():
        old = saved.get(name, getattr(defaults, name))
        flag = "--" + name.replace("_", "-")
        if name in FIXED_ON_RESUME:
            raise UserError(f"{flag} cannot change when resuming (the run has {old}, asked {value}): start a new "
                            "run, e.g. with --weights <run>/last.pt")
        if name not in FREE_ON_RESUME and not allow_schedule_change:
            raise UserError(f"{flag} {value} differs from the resumed run's {old}: pass --allow-schedule-change "
                            "to continue with the new value (the run then no longer matches an uninterrupted one)")
    cfg = with_implied(dataclasses.replace(cfg, **changed))
    schedule_changed = any(k not in FREE_ON_RESUME for k in changed)
    return cfg, schedule_changed


# ---------------------------------------------------------------- files

# what a run writes into its folder (inference.py --report adds report/, --all-folds the fold<i>/ runs, ablation.py
# --test-labels the test predictions of its best.pt and what they were made from): a new run
# with --overwrite removes all of it first, so that nothing of the old run can be resumed, pruned, ensembled or
# counted in place of the new run's
RUN_FILES = ["last.pt", "best.pt", "epoch-*.pt", ".tmp-*.pt", "config.json", "history.csv", "curves.png",
             "confusion_matrix.png", "confusion_matrix.csv", "folds.csv", "val_split.csv", "oof.csv",
             "skipped_images.txt", "test_prediction_*",
             "*.tmp.png", "tensorboard", "report", "fold[0-9]*"]


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
    last, copy = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, f"epoch-{epoch:03d}.pt")
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


# ---------------------------------------------------------------- signals

class GracefulStop:
    """While active, SIGINT and SIGTERM (or the given signals) ask the training loop to stop after its current step;
    a second SIGINT (Ctrl-C twice) stops at once. The handler only records the signal: printing from it could collide with tqdm.

    With a time limit (seconds after `started`, a time.monotonic() reading) the loop is asked to stop as well at the
    last step boundary before the limit: when the next piece of work (the longest training step so far, or the
    longest validation pass before one) would end past it. The limit is only checked once this process has trained
    a step, so that every start of a run makes progress."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, time_limit: float = 0.0, started: float | None = None, signals=SIGNALS):
        self.signum, self.old, self.signals = None, {}, signals
        start = time.monotonic() if started is None else started
        self.deadline = start + time_limit if time_limit else None
        self.longest_step, self.longest_validation, self.timed_out = 0.0, 0.0, False

    @property
    def requested(self):
        """Stop at this step boundary: a signal came, or the next step would end past the time limit."""
        return self.signum is not None or self.out_of_time()

    @property
    def signalled(self):
        return self.signum is not None

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else ""

    def out_of_time(self, ahead: float | None = None) -> bool:
        """Whether work of `ahead` seconds (default: the longest step so far) would end past the limit; once true,
        it stays true."""
        if self.deadline is not None and not self.timed_out and self.longest_step > 0:
            ahead = self.longest_step if ahead is None else ahead
            self.timed_out = time.monotonic() + ahead >= self.deadline
        return self.timed_out

    def step_took(self, seconds: float) -> None:
        self.longest_step = max(self.longest_step, seconds)

    def validation_took(self, seconds: float) -> None:
        self.longest_validation = max(self.longest_validation, seconds)

    def handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.old = {s: signal.signal(s, self.handle) for s in self.signals}
        return self

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)
        return False
