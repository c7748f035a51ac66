"""--budget: a schedule fitted to a wall-time budget. Before the first epoch the run times a few optimiser steps at
each side it may train at (--progressive; the median step, after warm-up steps), one validation pass and one save,
on its own data and model, then puts everything back; it trains the most epochs (--epochs being the cap) whose whole
schedule, validations and saves included, ends inside TARGET of the budget, counted from the start of the process.
The epoch-counted settings are shares of --epochs, scaled to the planned count (config.with_epochs).

From the third epoch to the middle of the schedule, each epoch starts with a check of the plan against the wall
time the epochs since the first really took (their saves, plots and everything else a run does between epochs
included; not the first, which also pays one-off costs: the loader's and the plots' first use, the first best.pt):
the probe's times scaled by the median ratio of taken to planned over the last RECENT epochs, so that one slow
epoch does not move the plan and a lasting change of speed (another job on the machine) does.
When the planned end at those times falls outside LOW-HIGH of the budget and another number of epochs fits, the
schedule is laid out again from where the run is. The checks stop at the middle, so that the learning rate of a
run's second half follows one schedule. A resumed run keeps its plan (and whatever the checks made of it) and never
times or checks again, whatever --budget it is given: resumed after its last check, it goes on bit for bit as the
uninterrupted run. A frozen epoch (--freeze-epochs) times no full step and is not counted. Under torchrun every
process takes part in the timing (the steps are collective) and the first process's times and decisions hold for
all.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import math
import os
import statistics
import time
from typing import Any

import torch

import distributed
from checkpoint import replay_schedule, save_atomic, training_checkpoint
from config import EPOCH_SETTINGS, Config, time_limit_seconds, with_epochs
from augment import BatchAugment
from engine import (build_optimizer, build_run, build_scheduler, count_step, endless_groups, evaluate, scaled_lr,
                    train_step, training_module)
from errors import UserError
from finetune import backbone_frozen
from losses import TrainLoss
from mix import build_mixer
from progressive import STEP, epoch_sizes
from run import Progress, Run
from run_folder import write_config
from utils import rng_state, set_rng_state

TARGET = 0.95  # the share of the budget a plan fills: the run ends at 90-100% of it with its schedule finished
LOW = 0.90  # a planned end below this share of the budget (or past HIGH) lays the plan out again
# a planned end past this share lays it out again too: the second half is not checked, and its epochs may run a few
# percent slower than the first (an hour on a 2-core Xeon whose last check let a 99.6% end stand ended at 100.5%)
HIGH = 0.97
PROBE_STEPS = 3  # timed optimiser steps per side, their median taken, after WARMUP_STEPS untimed ones
RECENT = 5  # the last epochs whose median ratio of taken to planned time a check scales the plan by
WARMUP_STEPS = 2  # the first steps at a side run slower (allocator, oneDNN's and cuDNN's kernel choice, compilation)
BEST_SHARE = 0.25  # best.pt's write per epoch, as a share of last.pt's: half its size, every other epoch


@dataclasses.dataclass
class Times:
    """What one piece of a run takes, in seconds: an optimiser step at each training side, a validation pass of one
    set of weights, a write of last.pt; and the steps in an epoch."""
    step: dict[int, float]
    val: float
    save: float
    steps_per_epoch: int


def process_seconds() -> float:
    """Seconds since this process started (Linux: /proc), so that the interpreter's and torch's start-up count; 0
    where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


# ---------------------------------------------------------------- the plan: pure functions of the times

def sides(cfg: Config) -> list[int]:
    """Every side a plan of at most --epochs epochs may train at: each multiple of STEP from the plan's first side
    up, and --img-size."""
    first = epoch_sizes(cfg)[0]
    return sorted({*range(first, cfg.img_size, STEP), cfg.img_size})


def epoch_work(cfg: Config, times: Times, epoch: int, side: int) -> float:
    """What one epoch of the plan trains and validates for, as history.csv's epoch_seconds counts it: its steps at
    its side and its validation passes (raw and EMA weights, on the epochs --val-every validates)."""
    seconds = times.steps_per_epoch * times.step[side]
    if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
        seconds += times.val * (2 if cfg.ema and epoch >= cfg.ema_start_epoch else 1)
    return seconds


def epoch_seconds(cfg: Config, times: Times, epoch: int, side: int) -> float:
    """An epoch's work and its share of the saves: last.pt and the plots (--save-share keeps them under that share
    of the time) and best.pt (about half of last.pt, which holds the optimiser too), taken as every other epoch."""
    work = epoch_work(cfg, times, epoch, side)
    return work + min(times.save, cfg.save_share * work) + BEST_SHARE * times.save


def planned_seconds(cfg: Config, times: Times, first_epoch: int = 0) -> float:
    """The schedule's time from `first_epoch` to its end, with the final save."""
    plan = epoch_sizes(cfg)
    return sum(epoch_seconds(cfg, times, e, plan[e]) for e in range(first_epoch, cfg.epochs)) + times.save


def fitting_epochs(cap: Config, times: Times, seconds: float, first_epoch: int = 0) -> int:
    """The most epochs, at most cap.epochs, whose schedule (the epochs from first_epoch on) fits in `seconds`; when
    none does, one epoch more than first_epoch, so that the LR schedule still ends at its floor (a plan past its
    budget beats one that stops with the LR high). cap: the config as given, its epoch-counted settings shares of
    its epochs."""
    fits = [n for n in range(first_epoch + 1, cap.epochs + 1)
            if planned_seconds(with_epochs(cap, n), times, first_epoch) <= seconds]
    return max(fits, default=first_epoch + 1)


def plan_line(cap: Config, cfg: Config, times: Times, budget: float, spent: float) -> str:
    """The plan as the run prints it: the times it comes from, the epochs, what was scaled."""
    steps = ", ".join(f"{times.step[side]:.3g} s a step at {side} px" for side in sorted(times.step))
    scaled = [f"--{name.replace('_', '-')} {getattr(cfg, name):g}" for name in ("warmup_epochs", "t_max",
              "freeze_epochs", "ema_start_epoch", "focal_start", "focal_full", "mix_off_epoch")
              if getattr(cfg, name) != getattr(cap, name)]
    end = spent + planned_seconds(cfg, times)
    return (f"--budget {cap.budget}: measured {steps}, {times.val:.3g} s a val pass, {times.save:.3g} s a save; "
            f"{cfg.epochs} epoch(s) fit (--epochs {cap.epochs} is the cap), ending at about {end:.0f} s of "
            f"{budget:.0f}{short_of_budget(cap, cfg, times, end / budget)}"
            f"{'; scaled: ' + ', '.join(scaled) if scaled else ''}")


def short_of_budget(cap: Config, cfg: Config, times: Times, share: float) -> str:
    """Why a plan ends below LOW of its budget when the cap is not what stops it: whole epochs so long that one
    more would pass TARGET (a large data set on a slow machine), said rather than left as an unexplained gap."""
    if share >= LOW or cfg.epochs >= cap.epochs:
        return ""
    more = planned_seconds(with_epochs(cap, cfg.epochs + 1), times) - planned_seconds(cfg, times)
    return (f" ({share:.0%}: an epoch takes about {more:.0f} s, and one more would end past {TARGET:.0%} of the "
            "budget)")


# ---------------------------------------------------------------- timing the run's own pieces

def timed(work, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(cfg: Config, model: torch.nn.Module, device: torch.device, loaders, train_set, run_dir: str) -> Times:
    """The times of a throwaway run of a copy of the model: the median of PROBE_STEPS steps at each side, one
    validation pass, one save. The random generators are put back, so the real run draws what it would have drawn."""
    rng = rng_state()
    probe = build_run(dataclasses.replace(cfg, tensorboard=False), copy.deepcopy(model), device, train_set, 1,
                      run_dir)
    probe.train_model = training_module(probe, False)  # under torchrun the steps are collective, as in training
    probe.train_model.train()
    groups, step, augment = endless_groups(loaders, cfg.accum_steps), {}, BatchAugment.from_config(cfg)

    def one_step():  # as the epoch steps: device-side augmentation, the EMA update, the scheduler
        count_step(probe, Progress(), *train_step(probe, next(groups), 0, augment))
    for side in sides(cfg):
        probe.cfg = dataclasses.replace(cfg, img_size=side, progressive_full=1.0)  # every epoch at this side
        for _ in range(WARMUP_STEPS):
            one_step()
        step[side] = statistics.median(timed(one_step, device) for _ in range(PROBE_STEPS))
    probe.cfg = cfg
    val = timed(lambda: evaluate(probe.model, loaders.val, probe, desc="timing val"), device)
    path = os.path.join(run_dir, f".tmp-budget-{os.getpid()}.pt")
    save = timed(lambda: save_atomic(training_checkpoint(probe, Progress()), path), device) \
        if distributed.is_main() else 0.0
    if os.path.exists(path):
        os.remove(path)
    del probe  # its model, optimiser, EMA and teachers: before the run's own are built
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    set_rng_state(rng)
    loaders.sampler.start_epoch(0)
    measured = Times(step, val, save, math.ceil(len(loaders.train) / cfg.accum_steps))
    return distributed.from_main(measured)


# ---------------------------------------------------------------- the run's side of it

def planned_config(opened: Any, progress: Progress, model: torch.nn.Module, device: torch.device, loaders: Any,
                   started: float) -> Config:
    """The config a run trains with: for a new --budget run, that of the planned schedule (the plan goes into
    progress.budget, and so into last.pt); else the opened run's own (a resumed run keeps its plan)."""
    cfg = opened.cfg
    if opened.ckpt and progress.budget:
        progress.budget["final"] = True  # a resumed run keeps its plan
    if not cfg.budget or opened.ckpt:
        return cfg
    budget = time_limit_seconds(cfg.budget, "--budget")
    times = measure(cfg, model, device, loaders, loaders.train.dataset, opened.run_dir)
    # the first process's budget and clock for all: each process started at its own moment, and under --all-folds
    # each was handed its own share
    budget, spent = distributed.from_main((budget, time.monotonic() - started))
    planned = with_epochs(cfg, fitting_epochs(cfg, times, TARGET * budget - spent))
    print(plan_line(cfg, planned, times, budget, spent))
    if planned_seconds(with_epochs(cfg, 1), times) > budget - spent:
        print(f"warning: --budget {cfg.budget} holds less than one epoch of this run: it trains one")
    progress.budget = {"seconds": budget, "cap": dataclasses.asdict(cfg), "times": dataclasses.asdict(times),
                       "spent": spent, "final": False, "ratios": []}
    return planned


def replan(run: Run, progress: Progress, spent: float) -> None:
    """Called at the start of every epoch (spent: the seconds the run has spent so far). In a --budget run, from the
    third epoch to the middle of the schedule: when the plan, at the times the last epochs (not the first) really
    took, ends outside LOW-HIGH of the budget, the schedule is laid out again from where the run is, with the epochs that
    fit in what is left."""
    plan = progress.budget
    if not plan or plan.get("final", True) or progress.done:
        return
    spent = distributed.from_main(spent)
    epochs = distributed.from_main(checked_epochs(plan, run.cfg, progress.epoch, spent, run.writes.cost))
    if epochs != run.cfg.epochs:
        cap = Config(**plan["cap"])
        print(f"--budget {cap.budget}: the last epochs took {plan['scale']:.2f}x the planned time (median of up "
              f"to {RECENT}): {epochs} epoch(s) fit now, not {run.cfg.epochs}")
        reschedule(run, begun_phases_kept(with_epochs(cap, epochs), run.cfg, progress.epoch),
                   plan["times"]["steps_per_epoch"])


def checked_epochs(plan: dict[str, Any], cfg: Config, epoch: int, spent: float, last_write: float = 0.0) -> int:
    """The epochs the run should have, checked at the start of `epoch` (cfg.epochs when the plan stands): records the
    wall time of the epoch that just ended against the plan's (plan["ratios"]), and marks the plan final from the
    middle of the schedule on. last_write: the run's last write of last.pt and the plots, in seconds, which the
    probe's save leaves out (the plots) and which the run ends with."""
    if epoch >= 2 and not backbone_frozen(cfg, epoch - 1):  # a frozen epoch has no full step
        expected = epoch_seconds(cfg, stored_times(plan), epoch - 1, epoch_sizes(cfg)[epoch - 1])
        plan["ratios"].append((spent - plan["epoch_from"]) / expected)
    plan["epoch_from"] = spent
    epochs = cfg.epochs
    if 2 <= epoch < cfg.epochs and plan["ratios"]:  # a finished run is never extended
        plan["scale"] = statistics.median(plan["ratios"][-RECENT:])
        times = scaled_times(stored_times(plan), plan["scale"])
        ending = max(0.0, last_write - times.save)  # the final write, as the run has seen it, beyond the plan's
        end = spent + ending + planned_seconds(cfg, times, epoch)
        if not LOW * plan["seconds"] <= end <= HIGH * plan["seconds"]:
            epochs = fitting_epochs(Config(**plan["cap"]), times, TARGET * plan["seconds"] - spent - ending, epoch)
    plan["final"] = epoch >= max(2, epochs // 2) or epoch >= cfg.epochs  # the second half follows one plan
    return epochs


def stored_times(plan: dict[str, Any]) -> Times:
    """The probe's times as the plan keeps them in last.pt (a JSON-like dict, the sides' keys maybe strings)."""
    times = Times(**plan["times"])
    times.step = {int(side): seconds for side, seconds in times.step.items()}
    return times


def scaled_times(times: Times, scale: float) -> Times:
    return dataclasses.replace(times, step={s: t * scale for s, t in times.step.items()}, val=times.val * scale,
                               save=times.save * scale)


def begun_phases_kept(new: Config, old: Config, epoch: int) -> Config:
    """The re-planned config, with every epoch-counted phase that has begun by `epoch` (focal loss, the EMA's
    validation, the end of the freeze or of mixing, the warmup) left where it began: a re-plan to more epochs must
    not freeze the backbone again or go back to cross-entropy."""
    kept = {name: getattr(old, name) for name in EPOCH_SETTINGS
            if name != "t_max" and 0 < getattr(old, name) <= epoch}
    return dataclasses.replace(new, **kept)


def reschedule(run: Run, cfg: Config, steps_per_epoch: int) -> None:
    """The run goes on under cfg's schedule (another number of epochs): a new LR schedule stepped to where the run
    is, and the loss and mixing of the new epoch counts."""
    trained, done = run.optimizer.state_dict(), run.scheduler.last_epoch  # the scheduler steps once per step
    run.optimizer = build_optimizer(run.model, scaled_lr(cfg))
    run.scheduler = build_scheduler(run.optimizer, scaled_lr(cfg), steps_per_epoch)
    replay_schedule(run.optimizer, run.scheduler, done, trained)
    run.cfg = cfg
    run.criterion = TrainLoss(cfg, run.criterion.weights)
    run.mixer = build_mixer(cfg, len(run.classes))
    if distributed.is_main():  # config.json says what the run trains with (a --config of it resumes the run)
        write_config(run.run_dir, cfg, list(run.classes), distributed.world_size())


def kept_on_resume(ckpt: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The flags of a resumed run, for a --budget run: the plan stays (the same --budget, --epochs cap and unscaled
    epoch settings as given at the start are taken as the plan's own); --budget added to a run without one is
    refused."""
    plan = ckpt["progress"].get("budget")
    if not plan:
        if given.get("budget"):
            raise UserError("--budget cannot be added on resume: the run's schedule is laid out already (start a new "
                            "run with --budget, or resume without it)")
        return given
    cap, saved = plan["cap"], ckpt["config"]
    return {name: saved[name] if name == "budget" or name in cap and value == cap[name] else value
            for name, value in given.items()}
