"""Picking up a stopped run: which checkpoint --resume names, which settings may change on resume (and which
change its schedule), the check that the data is the run's own, and loading last.pt into the new run with its
Progress moved to where the run goes on (also with another number of processes)."""
from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import distributed
from checkpoint import restore_training_state
from config import Config, config_from_dict, with_implied
from distill import check_same_teachers
from errors import UserError
from run import Progress
from run_folder import last_path
from utils import short_list

if TYPE_CHECKING:
    from run import Run

# settings a resumed run may change freely: where things are, how fast they go and when the run stops, not what
# is computed up to then
FREE_ON_RESUME = {"data_dir", "output_dir", "run_name", "workers", "device", "weights", "save_every_steps",
                  "keep_epochs", "save_share", "max_bad_frac", "cache", "channels_last", "cudnn_benchmark", "tf32",
                  "compile", "patience", "min_delta", "time_limit", "val_every"}
# settings that give the saved state another meaning: never changed on resume
FIXED_ON_RESUME = {"arch", "head", "batch_size", "ema", "max_params"}


# ---------------------------------------------------------------- --resume

def resume_path(resume: str, run_dir: str) -> str | None:
    """The checkpoint that --resume names: a file, or 'auto' = the run folder's last.pt when there is one."""
    if resume == "auto":
        path = last_path(run_dir)
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


def check_resume_data(ckpt: dict[str, Any], classes: list[str], train_images: int, allow_change: bool) -> None:
    """A resumed run's data must be the run's own: the same classes, and as many training images unless asked."""
    saved = list(ckpt["classes"])
    if saved != classes:
        raise UserError(f"the checkpoint was trained on {short_list(saved)} but the data has {short_list(classes)}: "
                        "resume with the run's own data (--data-dir)")
    before = ckpt["progress"]["train_images"]
    if before != train_images and not allow_change:
        raise UserError(f"the training set now holds {train_images} readable images, the run was started with "
                        f"{before}: the epoch order would differ; pass --allow-schedule-change to carry on anyway")


def resume_training(ckpt: dict[str, Any], run: Run, progress: Progress, steps_per_epoch: int,
                    schedule_changed: bool) -> None:
    """Load last.pt into the freshly built run; progress, the saved one, moves to where the run goes on.

    With another number of processes than the run had, the global batch and the steps per epoch differ: the
    interrupted epoch goes on with the images no process has trained on yet, shared among the new processes, and
    the LR schedule is laid out again for the new steps per epoch (as --allow-schedule-change does), at the LR that
    --lr-scale gives the new number of processes."""
    check_same_teachers(ckpt.get("teachers", []), run.teachers)
    saved, cfg = ckpt["progress"], run.cfg
    processes = distributed.world_size()
    done = saved.get("done", saved["step"] * cfg.batch_size)  # earlier versions counted one process's steps
    regrid = saved.get("processes", 1) != processes
    step = round(done / (cfg.batch_size * processes)) if regrid else saved["step"]
    replay = saved["epoch"] * steps_per_epoch + step if schedule_changed or regrid else None
    restore_training_state(ckpt, run, replay)
    progress.step, progress.done, progress.processes = step, done, processes
    if regrid:
        print(f"the run was trained by {saved.get('processes', 1)} process(es), now {processes}: the rest of epoch "
              f"{progress.epoch + 1} is shared among them and the LR schedule follows the new steps per epoch")
    print(f"resuming at epoch {progress.epoch + 1} step {progress.step}/{steps_per_epoch}")
