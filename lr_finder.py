"""The learning-rate finder behind `train.py --find-lr`: an exponential LR sweep on the run's own model, data and
augmentation, the loss against the LR plotted to lr_find.png, and a suggested --lr with the command that uses it.

    python train.py --data-dir data/mine --arch resnet50 --run-name mine --find-lr    # then run the printed command

Step i trains on the next batch at an LR that grows by a constant factor per step from the first to the last value
of --lr-find-range (Smith 2017, "Cyclical learning rates for training neural networks"; fastai's lr_find, Lightning's
LearningRateFinder). Every parameter group keeps its ratio to --lr (--head-lr-mult, --layer-decay), so the LR swept
is the value to pass as --lr. The sweep stops early once the loss has plainly diverged: a non-finite loss, or the
smoothed loss four times its lowest value (fastai's rule).

The suggestion is the LR where the smoothed loss falls fastest per decade of LR (the steepest descent), looked for
between the first tenth of the sweep and the loss minimum; the minimum's LR / 10 (fastai's lr_min) is printed and
drawn beside it. The smoothing is a centred moving average, so the curve is not shifted towards higher LRs the way
a running average is.

Afterwards the weights (BatchNorm statistics included), the optimiser, the LR scheduler and the grad scaler are put
back as they were. The training steps write nothing: the files a run writes before training (the split, the list of
unreadable images, config.json) go to a temporary folder removed at exit, so the run folder holds only the plot
and the printed command can start the run there.
"""
from __future__ import annotations

import argparse
import atexit
import copy
import dataclasses
import math
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

import distributed
from augment import BatchAugment
from config import Config
from engine import Loaders, endless_groups, steps_per_epoch, train_step
from errors import UserError
from finetune import set_backbone_frozen
from plots import pyplot, save_figure

if TYPE_CHECKING:
    import torch

    from run import Run

DIVERGED = 4.0  # the sweep stops when the smoothed loss reaches this multiple of its lowest value (as fastai)
RUNNING_BETA = 0.9  # the running average that watches for divergence during the sweep
AUTO_STEPS = (50, 300)  # --lr-find-steps 0: one epoch's steps, within these bounds
# the finder's own flags and how many values each takes: the training command printed afterwards leaves them out
FINDER_FLAGS = {"--find-lr": 0, "--lr-find-steps": 1, "--lr-find-range": 2, "--lr-find-plot": 1}


def add_finder_args(parser: argparse.ArgumentParser) -> None:
    """train.py's --find-lr and its settings: a tool run before training, not a run setting, so not in Config."""
    group = parser.add_argument_group("learning-rate finder")
    group.add_argument("--find-lr", action="store_true",
                       help="instead of training, sweep the LR exponentially over --lr-find-steps training steps "
                            "of this run's model, data and augmentation (weights and optimiser restored "
                            "afterwards, no checkpoint written), plot the loss against it to lr_find.png and print "
                            "a suggested --lr (where the smoothed loss falls fastest, before its minimum) with the "
                            "command that trains with it")
    group.add_argument("--lr-find-steps", type=int, default=0, metavar="N",
                       help=f"steps of the sweep; 0 = one epoch's steps, at least {AUTO_STEPS[0]} (the data is "
                            f"then seen several times) and at most {AUTO_STEPS[1]}")
    group.add_argument("--lr-find-range", type=float, nargs=2, default=[1e-7, 10.0], metavar="LR",
                       help="first and last --lr of the sweep, 1e-7 and 10 unless given (it stops earlier when the "
                            "loss diverges)")
    group.add_argument("--lr-find-plot", default="", metavar="PATH",
                       help="where to write the plot (default: lr_find.png in the run folder)")


def finder_run(cfg: Config, args: argparse.Namespace) -> tuple[Config, str, None]:
    """(config, folder, checkpoint) for a sweep of the new run that train.new_run_config opened (its input settings
    resolved, its name given): a temporary folder (removed at exit) for the files training writes before its first
    step, no checkpoint. An existing run folder is neither refused nor cleared: only lr_find.png is written there."""
    if args.resume:
        raise UserError("--find-lr sweeps from a new run's starting weights: drop --resume (to sweep from other "
                        "weights, pass the file as --weights)")
    if distributed.world_size() > 1:
        raise UserError("--find-lr runs in one process: start it with python train.py, not torchrun")
    if args.lr_find_steps and args.lr_find_steps < 5:
        raise UserError(f"--lr-find-steps {args.lr_find_steps}: the sweep needs at least 5 steps (0 = automatic)")
    start, end = args.lr_find_range
    if not 0 < start < end:
        raise UserError(f"--lr-find-range {start:g} {end:g}: give two learning rates, the first above 0 and below "
                        "the second")
    if cfg.budget:  # the sweep trains no schedule to fit: the budget is for the run it suggests the LR of
        print(f"warning: --budget {cfg.budget} has no effect with --find-lr (the sweep plans no epochs)")
        cfg = dataclasses.replace(cfg, budget="")
    scratch = tempfile.mkdtemp(prefix="lr-find-")
    atexit.register(shutil.rmtree, scratch, True)
    return cfg, scratch, None


def find_lr(run: Run, loaders: Loaders, args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """Sweep, restore, plot, suggest, with the very step the training runs (engine.train_step). loaders: the run's
    (the training loader and its epoch sampler); argv: the command line, for the command printed at the end.
    Returns the exit code."""
    n = args.lr_find_steps or min(AUTO_STEPS[1], max(AUTO_STEPS[0], steps_per_epoch(loaders.train, run.cfg)))
    lrs = np.geomspace(*args.lr_find_range, n)
    saved = snapshot(run)
    try:
        losses = sweep(run, endless_groups(loaders, run.cfg.accum_steps), lrs)
    finally:
        restore(run, saved)
    lrs, losses = finite_points(lrs[:len(losses)], losses)
    smoothed = smooth(losses, window=max(3, len(losses) // 10) | 1)
    lr, steepest, minimum = suggest(lrs, smoothed)
    path = args.lr_find_plot or os.path.join(run.cfg.output_dir, run.cfg.run_name, "lr_find.png")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    marks = [(lr, f"suggested --lr {lr:.2g}"), (max(minimum / 10, float(lrs[0])), "minimum / 10")]
    plot_sweep(lrs, losses, smoothed, marks, path)
    stopped = f", stopped at {lrs[-1]:.2g} where the loss diverged" if len(losses) < n else ""
    start, end = args.lr_find_range
    print(f"LR finder: {len(losses)} of {n} steps, LR {start:.2g} to {end:.2g}{stopped}")
    if steepest:
        print(f"suggested --lr {lr:.2g}: where the smoothed loss falls fastest (steepest descent per decade of LR), "
              f"before its minimum at {minimum:.2g}; the minimum / 10 (fastai's lr_min) is {minimum / 10:.2g}")
    else:
        print(f"warning: the loss did not fall during the sweep (lowest at {minimum:.2g}): suggesting --lr {lr:.2g}, "
              "the minimum / 10; try a lower start of --lr-find-range or more --lr-find-steps")
    print(f"wrote {path}")
    print(f"train with: {training_command(argv, lr, run.cfg)}")
    return 0


def snapshot(run: Run) -> dict[str, Any]:
    """Copies of every state the sweep changes: weights and BatchNorm statistics, optimiser, scheduler, scaler."""
    parts = {"model": run.plain, "optimizer": run.optimizer, "scheduler": run.scheduler, "scaler": run.scaler}
    return {key: copy.deepcopy(part.state_dict()) for key, part in parts.items() if part is not None}


def restore(run: Run, saved: dict[str, Any]) -> None:
    parts = {"model": run.plain, "optimizer": run.optimizer, "scheduler": run.scheduler, "scaler": run.scaler}
    for key, state in saved.items():
        parts[key].load_state_dict(state)


def sweep(run: Run, groups: Iterator[list[tuple[torch.Tensor, torch.Tensor]]], lrs: np.ndarray) -> list[float]:
    """One training step at each LR in turn; the loss of every step taken, up to the one where it diverged."""
    cfg = run.cfg
    ratios = [g.get("initial_lr", g["lr"]) / cfg.lr for g in run.optimizer.param_groups]
    run.trained.train()
    # the whole model, frozen backbone or not: --lr is the LR of the long phase after --freeze-epochs
    set_backbone_frozen(run.plain, False)
    augment = BatchAugment.from_config(cfg)
    losses, running, lowest = [], 0.0, math.inf
    bar = tqdm(zip(lrs, groups), total=len(lrs), desc="LR finder", leave=False, dynamic_ncols=True)
    for i, (lr, group) in enumerate(bar):
        for param_group, ratio in zip(run.optimizer.param_groups, ratios):
            param_group["lr"] = float(lr) * ratio
        loss, _, _ = train_step(run, group, 0, augment)  # epoch 0: the loss, mixing and (--progressive) side of the run's start
        losses.append(loss)
        running = RUNNING_BETA * running + (1 - RUNNING_BETA) * loss
        smoothed = running / (1 - RUNNING_BETA ** (i + 1))
        if not math.isfinite(loss) or smoothed > DIVERGED * lowest:
            break
        lowest = min(lowest, smoothed)
        bar.set_postfix(lr=f"{lr:.1e}", loss=f"{smoothed:.4f}")
    bar.close()
    return losses


def finite_points(lrs: np.ndarray, losses: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    losses = np.asarray(losses, dtype=np.float64)
    keep = np.isfinite(losses)
    if keep.sum() < 3:
        raise UserError(f"the loss was not finite from the first steps of the sweep on (at LR {lrs[0]:.2g}): "
                        "lower the start of --lr-find-range, or train without fp16 (--amp off)")
    return lrs[keep], losses[keep]


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over an odd window, over fewer points at the ends: no lag, unlike a running mean."""
    kernel = np.ones(window)
    return np.convolve(values, kernel, mode="same") / np.convolve(np.ones(len(values)), kernel, mode="same")


def suggest(lrs: np.ndarray, smoothed: np.ndarray) -> tuple[float, bool, float]:
    """(suggested LR, whether the steepest-descent rule found it, LR of the smoothed loss's minimum).

    The steepest descent is looked for after the first tenth of the sweep, where the loss barely moves and its
    slope is noise, and up to the minimum. When the loss never fell, the minimum / 10 (at least the first LR)."""
    low = int(np.argmin(smoothed))
    skip = len(lrs) // 10
    fallback = max(float(lrs[low]) / 10, float(lrs[0]))
    if low - skip < 2:
        return fallback, False, float(lrs[low])
    # central differences over the whole curve, so that the minimum itself (slope 0) is not a one-sided drop
    slopes = np.gradient(smoothed, np.log10(lrs))[skip:low]
    if slopes.min() >= 0:
        return fallback, False, float(lrs[low])
    return float(lrs[skip + int(np.argmin(slopes))]), True, float(lrs[low])


def plot_sweep(lrs: np.ndarray, losses: np.ndarray, smoothed: np.ndarray, marks: Sequence[tuple[float, str]],
               path: str) -> None:
    """Loss against LR on a log axis, the per-step losses faint, the smoothed curve and the marked LRs over them."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses, color="0.75", linewidth=1, label="loss of each step")
    ax.plot(lrs, smoothed, color="C0", label="smoothed")
    for (lr, label), color in zip(marks, ["C3", "C2"]):
        ax.axvline(lr, color=color, linestyle="--", label=label)
    # the diverging tail would squash the useful part of the curve: show from its lowest point to its start
    low, high = float(losses.min()), float(max(smoothed[0], smoothed.min()))
    pad = 0.2 * (high - low) if high > low else 0.1 * abs(low) + 1e-3
    ax.set_ylim(low - pad, high + 2 * pad)
    ax.set(xscale="log", xlabel="learning rate (--lr)", ylabel="training loss",
           title=f"LR finder: {len(lrs)} steps, {lrs[0]:.2g} to {lrs[-1]:.2g}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def training_command(argv: Sequence[str] | None, lr: float, cfg: Config) -> str:
    """The finder's command line without the finder's flags, with --lr set to the suggestion and --run-name to
    the folder of the plot; --min-lr keeps its ratio to --lr when the suggestion falls below it."""
    words = list(sys.argv[1:] if argv is None else argv)
    value = f"{lr:.2g}"
    drop = dict(FINDER_FLAGS, **{"--lr": 1, "--run-name": 1})
    extra = ["--run-name", cfg.run_name, "--lr", value]
    if float(value) < cfg.min_lr:  # the cosine floor must stay below the peak
        drop["--min-lr"] = 1
        extra += ["--min-lr", f"{float(value) * cfg.min_lr / cfg.lr:.2g}"]
    return "python train.py " + shlex.join(without_flags(words, drop) + extra)


def without_flags(words: list[str], drop: dict[str, int]) -> list[str]:
    """argv less the given flags (--flag VALUE... or --flag=VALUE)."""
    kept, i = [], 0
    while i < len(words):
        flag = words[i].split("=", 1)[0]
        if flag in drop:
            i += 1 if "=" in words[i] else 1 + drop[flag]
        else:
            kept.append(words[i])
            i += 1
    return kept
