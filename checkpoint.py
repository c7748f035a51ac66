"""The checkpoint format: what best.pt and last.pt hold, how they are written, the one way they are read, and how
a last.pt is loaded back into a run.

Both are plain dicts of tensors and Python types, written atomically (save_atomic) and read with
torch.load(weights_only=True): a file carrying pickled code is refused.

best.pt, the weights of the best epoch (what inference.py reads):
    model          the state_dict that scored higher on val: the EMA or the raw weights, as `source` says
    raw, ema       both state_dicts (ema is None without --ema); model shares storage with one of them
    source         "raw" or "ema"
    epoch          the epoch, counted from 1; scores: its history.csv row
    classes        the class folder names, in the order of the head's outputs; class_counts: train images per class
    config         the run's Config as a dict, its input settings resolved against the model: img_size,
                   eval_size, eval_crop_ratio, mean, std and interpolation hold the values the run used (the model's
                   pretrained config's where no flag set them), which inference.py feeds the model again; files
                   written before those were stored lack mean/std/interpolation and get torchvision's; torch_version

last.pt (and its epoch-NNN.pt copies), everything a resumed run needs:
    model, ema     the raw weights and the EMA's (None without --ema); ema_updates: the EMA's update count
    optimizer, scheduler, scaler   their state_dicts (scaler is empty when fp16 loss scaling is off)
    progress       run.Progress as a dict: epoch, step and position in the epoch, history, best score, ...
    rng            rank 0's python/numpy/torch/CUDA generator states; rng_ranks: every process's, under torchrun
    epoch          epochs completed (when progress.step is 0); classes, class_counts, config, torch_version

A weights file for --weights is read by read_state_dict: a torchvision or timm state_dict (torch.save'd .pth/.bin,
or .safetensors; also under a 'state_dict' entry, as timm's training scripts save it), or the `model` entry of ours.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import torch

import distributed
from errors import UserError
from run import Progress, Run
from run_folder import last_path
from utils import rank_rng_states, restore_rng, rng_state


def save_atomic(obj: object, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, rename, fsync the folder: a crash or kill -9 at
    any moment leaves either the old file or the new one, never a partial one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would create it, not mkstemp's owner-only mode
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_folder(folder)


def fsync_folder(folder):
    """Make a rename inside `folder` durable (POSIX; elsewhere the rename itself is all there is)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_files(paths: Sequence[str]) -> list[str]:
    """The files named, with a folder standing for every best.pt below it (sorted: fold0, fold1, ...)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(path, "**", "best.pt"), recursive=True))
            if not found:
                raise UserError(f"{path} holds no best.pt (in it or in any folder below it)")
            files += found
        else:
            files.append(path)
    return files


def load_checkpoint(path: str) -> dict[str, Any]:
    """Our checkpoints hold tensors and plain types only; anything else (pickled code) is refused."""
    if not os.path.isfile(path):
        raise UserError(f"no such checkpoint: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if "Unsupported global" in line), lines[0])
        raise UserError(f"refusing to load {path}: not a plain checkpoint of tensors ({reason[:300]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "classes" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by train.py (no model/classes/config entries)")
    return ckpt


def training_checkpoint(run: Run, progress: Progress,
                        rng_ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """last.pt: everything a resumed run needs (rng_ranks: every process's generators, under torchrun)."""
    return {
        "model": run.plain.state_dict(),
        "ema": run.ema.module.state_dict() if run.ema is not None else None,
        "ema_updates": int(run.ema.n_averaged) if run.ema is not None else 0,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "progress": dataclasses.asdict(progress),
        "rng": rng_state(),
        "rng_ranks": rng_ranks,
        "epoch": progress.epoch,  # epochs completed when step is 0
        **run_identity(run),
    }


def run_identity(run):
    """The entries both files carry: what the weights mean (class names and counts) and how they were made."""
    return {
        "classes": list(run.classes),
        "class_counts": [int(n) for n in run.class_counts],
        "config": dataclasses.asdict(run.cfg),
        "teachers": run.teachers.record if run.teachers is not None else [],  # --teacher: files and hashes
        "torch_version": str(torch.__version__),
    }


def load_resumable(path: str) -> dict[str, Any]:
    """A last.pt (or epoch-NNN.pt) to resume; best.pt is refused with what to do instead."""
    ckpt = load_checkpoint(path)
    if "progress" not in ckpt or "optimizer" not in ckpt:
        raise UserError(f"{path} is not a resumable checkpoint (best.pt holds weights only): resume from the run's "
                        "last.pt, or start a new run with --weights " + path)
    return ckpt


def best_checkpoint(run: Run, source: str, epoch: int, scores: dict[str, Any]) -> dict[str, Any]:
    """best.pt of an epoch (counted from 0) whose `source` weights ("raw" or "ema") scored `scores`."""
    raw = run.plain.state_dict()
    averaged = run.ema.module.state_dict() if run.ema is not None else None
    return {
        "model": averaged if source == "ema" else raw,  # shares storage with raw/ema: saved once
        "raw": raw,
        "ema": averaged,
        "source": source,
        "epoch": epoch + 1,
        "scores": scores,
        **run_identity(run),
    }


def select_weights(ckpt: dict[str, Any], which: str, path: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state_dict asked for: best.pt carries raw and EMA weights, last.pt the raw ones and the EMA."""
    if which == "best":
        return ckpt["model"], ckpt.get("source", "raw")
    if which == "ema":
        if ckpt.get("ema") is None:
            raise UserError(f"{path} holds no EMA weights (trained with --no-ema); predict with --use raw")
        return ckpt["ema"], "ema"
    return ckpt.get("raw", ckpt["model"]), "raw"


def read_state_dict(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, info) from a torchvision- or timm-format file (.safetensors too) or one of our checkpoints (its
    'model' entry); info holds the checkpoint's arch and class names when it is one of ours."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file  # tensors only by design, like weights_only
            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read weights file {path}: {(str(e).splitlines() or [type(e).__name__])[0]}") \
            from None
    info = {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        info = {"arch": (obj.get("config") or {}).get("arch"), "classes": obj.get("classes")}
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} holds no state_dict of tensors")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}, info


def restore_training_state(ckpt: dict[str, Any], run: Run, replay_steps: int | None = None) -> None:
    """Load a last.pt (training_checkpoint) into a freshly built run.Run: weights, EMA, optimiser, scheduler, grad
    scaler and the random generators (its Progress is saved_progress(ckpt)).

    replay_steps: the schedule changed on resume (--allow-schedule-change): instead of loading the old scheduler,
    step the new one that many times, and keep the new optimiser hyper-parameters (lr, weight decay).
    """
    run.plain.load_state_dict(ckpt["model"])
    if run.ema is not None:
        run.ema.module.load_state_dict(ckpt["ema"])
        run.ema.n_averaged.fill_(ckpt["ema_updates"])
    if replay_steps is None:
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
    else:
        replay_schedule(run.optimizer, run.scheduler, replay_steps, ckpt["optimizer"])
    restore_scaler(run.scaler, ckpt["scaler"])
    restore_rng(ckpt)  # last: building the objects above drew random numbers


def replay_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int,
                    trained: dict[str, Any]) -> None:
    """A new schedule over a trained optimiser: a fresh scheduler (on a fresh optimiser) stepped `steps` times to
    where the run is, then the trained optimiser's moments loaded with the new schedule's hyper-parameters (lr,
    weight decay) kept."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
        for _ in range(steps):
            scheduler.step()
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(trained)
    for group, new in zip(optimizer.param_groups, settings):
        group.update(new)


def restore_scaler(scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
    """Load the fp16 loss scale. A run that trained without fp16 (CPU, bf16, --amp off) saved a disabled scaler's
    empty state: resumed on a GPU that computes in fp16, the scaler starts at its initial scale instead."""
    if not state and scaler.is_enabled():
        print("the run trained without fp16 loss scaling: the fp16 loss scale starts afresh")
        return
    scaler.load_state_dict(state)


def saved_progress(ckpt: dict[str, Any] | None) -> Progress:
    """Where a run stands: a resumed run's saved Progress, or a new run's."""
    return Progress(**ckpt["progress"]) if ckpt else Progress()


def save_last(run: Run, progress: Progress) -> None:
    """last.pt, written by rank 0 with every process's random generators (all processes call this together)."""
    rngs = rank_rng_states()
    if distributed.is_main():
        save_atomic(training_checkpoint(run, progress, rngs), last_path(run.run_dir))
