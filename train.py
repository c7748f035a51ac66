"""Fine-tune a ResNet-family classifier (torchvision's, or timm's) on data/train + data/val.

    python train.py                                   # the full seed recipe: ResNeXt-101 32x8d, 100 epochs
    python train.py --arch seresnextaa101d_32x8d.sw_in12k_ft_in1k_288   # a timm backbone at its own sizes
    python train.py --data-dir data/sample --arch resnet18 --weights none --img-size 64 --epochs 3

    python train.py --data-dir photos --val-fraction 0.1 --patience 10 --time-limit 2h   # no val/ folder
    python train.py --config checkpoints/<run>/config.json --run-name again   # repeat a run's settings

    python train.py --resume checkpoints/<run>/last.pt   # carry on where a stopped run left off, bit for bit
    python train.py --data-dir data --check-data          # only decode every image once and list the bad ones
    python train.py --data-dir data --run-name mine --find-lr   # LR sweep: lr_find.png and a suggested --lr
    torchrun --nproc_per_node=4 train.py --lr-scale linear   # one process per GPU (README: Multiple GPUs)

Writes checkpoints/<run>/: last.pt, best.pt, config.json, history.csv, curves.png, confusion_matrix.png/.csv
(and tensorboard/ with --tensorboard).
SIGINT (Ctrl-C) or SIGTERM finishes the current step, saves last.pt and prints the command that resumes the run.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

import distributed
from checkpoint import best_checkpoint, load_resumable, save_atomic, training_checkpoint
from config import (Config, add_config_args, check_config, config_file_args, config_from_args, read_config_file,
                    time_limit_seconds)
from dataset import (LabelledImages, build_train_val, check_images, center_crop, eval_crop, list_files,
                     loader_options, normalisation, not_images_note, to_float_batch)
from augment import BatchAugment
from ema import make_ema
from errors import UserError, check_folder_path, run_cli
from finetune import backbone_frozen, param_groups, reported_lr, set_backbone_frozen
from folds import FOLD_SPLIT, VAL_SPLIT, fold_datasets, run_all_folds, val_fraction_datasets, write_oof, write_split
from losses import TrainLoss, class_weights, loss_phase
from lr_finder import add_finder_args, find_lr, finder_run
from mix import build_mixer, count_correct
from model import (build_model, check_params, count_params, data_summary, resolve_data, short_list,
                   to_sync_batchnorm, unwrap)
from plots import plot_confusion, plot_curves
from resume import (EpochSampler, EpochWrites, GracefulStop, Progress, clear_run, keep_epoch_copy,
                    remove_stale_temp_files, restore_training_state, resume_path, resumed_config, run_files)
from run import Run
from runtime import (amp_dtype, autocast, default_workers, emulated_bf16_note, pick_device, precision_name,
                     rank_rng_states, seed_everything, seed_rank_streams, seed_worker)
from tensorboard_log import Board

NONFINITE_LIMIT = 5  # non-finite losses in a row that stop the run
TIME_LIMIT_EXIT = 124  # the exit code of a run stopped by --time-limit, as timeout(1) uses it

# the training loader, the validation loader (this process's shard of val) and the epoch order behind the first
Loaders = collections.namedtuple("Loaders", "train val sampler")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fine-tune a ResNet-family classifier (torchvision's ResNets or timm's ResNet family) on an "
                    "image-folder dataset (DATA/train/<class>/ and DATA/val/<class>/, or train/ alone with "
                    "--val-fraction).")
    groups = add_config_args(parser)
    # in the config's groups, so that --help and the README's flag table show them beside their kin
    data, checkpoints = groups["data"], groups["checkpoints"]
    data.add_argument("--overwrite", action="store_true",
                      help="start again in a run folder that already holds a run: first remove the earlier run's "
                           "files there (last.pt, best.pt, epoch-*.pt, config.json, history.csv, curves.png, "
                           "confusion_matrix.png/.csv, folds.csv, val_split.csv, oof.csv, skipped_images.txt, "
                           "ablation.py's test_prediction_*, tensorboard/, report/, fold<i>/) and name them; "
                           "other files stay")
    data.add_argument("--config", metavar="FILE",
                      help="read settings from a JSON or YAML file of 'name: value' lines, the names being these "
                           "flags without the leading -- (batch_size: 32, or batch-size); a run's own config.json "
                           "works as it is. Flags typed on the command line override the file; with --resume the "
                           "file's settings are checked against the run's like typed flags")
    checkpoints.add_argument("--resume", metavar="PATH|auto", default=None,
                             help="continue the run of a last.pt (or epoch-NNN.pt) exactly where it stopped, with "
                                  "its own settings; auto = --output-dir/--run-name/last.pt if it exists, else start "
                                  "that run")
    checkpoints.add_argument("--allow-schedule-change", action="store_true",
                             help="with --resume: accept settings that differ from the run's, e.g. more --epochs "
                                  "(the schedule is recomputed for them)")
    data.add_argument("--check-data", action="store_true",
                      help="only decode every train/val/test image once, list the unreadable ones and exit "
                           "(non-zero when more than --max-bad-frac of train+val are unreadable)")
    add_finder_args(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace, dict[str, Any]]:
    argv = with_config_file(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    return config_from_args(args), args, given_settings(argv)


def with_config_file(argv: list[str]) -> list[str]:
    """argv after the settings of --config FILE, as flags: the parser checks them like typed ones, and the flags
    typed on the command line, which come after them, win."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--config")
    path = probe.parse_known_args(argv)[0].config
    return config_file_args(read_config_file(path), path) + argv if path else argv


def given_settings(argv: list[str]) -> dict[str, Any]:
    """{field: value} of the config flags typed on the command line; a resumed run checks them against its own."""
    probe = build_parser()
    probe.set_defaults(**{f.name: dataclasses.MISSING for f in dataclasses.fields(Config)})
    return {k: v for k, v in vars(probe.parse_args(argv)).items()
            if k in Config.__dataclass_fields__ and v is not dataclasses.MISSING}


# ---------------------------------------------------------------- setup

def make_loaders(cfg: Config, train_set: LabelledImages, val_set: LabelledImages, device: torch.device) -> Loaders:
    workers = default_workers(cfg.workers)
    # the loaders get generators of their own: starting an epoch draws nothing from the global generator, which a
    # resumed run sets back to where the stopped run left it
    common = dict(loader_options(workers, device), worker_init_fn=seed_worker,
                  generator=torch.Generator().manual_seed(cfg.seed))
    # each process takes every world_size-th index of the epoch's order, as DistributedSampler does
    sampler = EpochSampler(len(train_set), cfg.seed, distributed.world_size(), distributed.rank())
    micro = micro_batch_size(cfg)
    # dropping the last partial batch keeps BatchNorm away from a batch of one
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=micro, sampler=sampler,
                                               drop_last=sampler.per_rank() > micro, **common)
    # exact evaluation: disjoint contiguous shards, no padding; evaluate() gathers them back in order
    val_shard = torch.utils.data.Subset(val_set, distributed.shard(len(val_set)))
    val_loader = torch.utils.data.DataLoader(val_shard, batch_size=micro * 2, shuffle=False, **common)
    return Loaders(train_loader, val_loader, sampler)


def micro_batch_size(cfg):
    if cfg.accum_steps < 1 or cfg.batch_size % cfg.accum_steps:
        raise UserError(f"--accum-steps {cfg.accum_steps} must be at least 1 and divide --batch-size "
                        f"{cfg.batch_size}")
    return cfg.batch_size // cfg.accum_steps


def setup_backends(cfg: Config, device: torch.device) -> None:
    """cuDNN autotuning and TF32 on CUDA (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32


def prepare_model(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.nn.Module:
    """Move to the device in the chosen memory format and compile; any DDP wrapper must come after this."""
    if cfg.sync_bn:
        if device.type != "cuda":
            raise UserError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm does not run on the CPU (train without it)")
        # same parameter and buffer names: the checkpoints still load into the plain model
        model = to_sync_batchnorm(model)
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    return torch.compile(model) if cfg.compile else model


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW over the stage-wise parameter groups of finetune.py (learning rate and weight decay per group)."""
    return torch.optim.AdamW(param_groups(unwrap(model), cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
                             **adamw_kernel(model))


def scaled_lr(cfg):
    """The config with --lr and --min-lr scaled for the global batch (--lr-scale); the run's saved config keeps the
    values as given, and a resumed run scales them for its own number of processes."""
    n = distributed.world_size()
    factor = {"none": 1, "linear": n, "sqrt": math.sqrt(n)}[cfg.lr_scale]
    return dataclasses.replace(cfg, lr=cfg.lr * factor, min_lr=cfg.min_lr * factor)


def adamw_kernel(model):
    """The fused CUDA AdamW (one kernel for all tensors) on GPU, the multi-tensor one elsewhere."""
    on_cuda = next(model.parameters()).is_cuda
    return {"fused": True} if on_cuda else {"foreach": True}


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step cosine annealing to min_lr over the whole run (or --t-max epochs), after an optional warmup.

    Every group anneals from its own lr to min_lr scaled like it (min_lr * group lr / --lr), so a stage that starts
    below --min-lr under --layer-decay still decreases; with one lr for all groups this is CosineAnnealingLR.
    """
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    period = max(1, int((cfg.t_max or cfg.epochs) * steps_per_epoch - warmup))
    floor = cfg.min_lr / cfg.lr
    cosine = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: floor + (1 - floor) * (1 + math.cos(math.pi * step / period)) / 2)
    if warmup <= 0:
        return cosine
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def run_name(cfg):
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


def short_names(names, n=5):
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def new_run_dir(cfg, clear):
    run_dir = os.path.join(cfg.output_dir, run_name(cfg))
    check_folder_path(run_dir, "run folder")  # before the data scan, not after it
    clear_old_run(run_dir, clear)
    return run_dir


def folds_parent(cfg, overwrite):
    """--all-folds: the parent run's name; with --overwrite, every file of an earlier run below it goes first
    (fold folders of a run with more folds, its oof.csv)."""
    name = run_name(cfg)
    parent = os.path.join(cfg.output_dir, name)
    check_folder_path(parent, "run folder")
    if overwrite:
        clear_old_run(parent, "--overwrite")
    return name


def print_warnings(cfg, device):
    """Say every setting that changes nothing in this run (config.check_config) or on this device."""
    warnings = check_config(cfg)
    warnings += precision_notes(cfg, device)
    if cfg.sync_bn and distributed.world_size() == 1:
        warnings.append("--sync-bn has no effect in a single process (it syncs BatchNorm across torchrun processes)")
    for warning in warnings:
        print(f"warning: {warning}")


def precision_notes(cfg, device):
    """--amp settings that do not compute as asked on this device: fp16 on the CPU, bf16 where it is emulated."""
    notes = [emulated_bf16_note(cfg, device)]
    if device.type == "cpu" and cfg.amp == "fp16":
        notes.append("--amp fp16 has no effect on the CPU (fp16 autocast there is slower than float32 and would need "
                     "a grad scaler): this run computes in float32; --amp bf16 is the CPU's mixed precision")
    return [note for note in notes if note]


def new_run_config(cfg):
    """The settings of a new run, as a training run and the LR finder both open it: the model's own input settings
    where the flags leave them to it, checked (before anything of an earlier run is removed), and the run's name."""
    cfg = resolve_data(cfg)
    check_config(cfg)
    return dataclasses.replace(cfg, run_name=run_name(cfg))


def open_run(cfg, args, given):
    """(config, run folder, checkpoint to resume or None): a new run, the one --resume names with its settings, or
    the LR finder's sweep of a new run."""
    if args.find_lr:
        return finder_run(new_run_config(cfg), args)
    if args.resume == "auto" and not cfg.run_name:
        raise UserError("--resume auto needs the --run-name of the run to continue")
    path = resume_path(args.resume, os.path.join(cfg.output_dir, cfg.run_name)) if args.resume else None
    if path is None:
        if args.resume:
            print(f"no checkpoint in {os.path.join(cfg.output_dir, cfg.run_name)} yet: starting the run")
        cfg = new_run_config(cfg)
        clear = "--overwrite" if args.overwrite else "--resume auto found no last.pt" if args.resume else None
        return cfg, new_run_dir(cfg, clear), None
    ckpt = load_resumable(path)
    cfg, schedule_changed = resumed_config(ckpt["config"], given, args.allow_schedule_change)
    cfg = resolve_data(cfg)  # a run saved before these settings were stored: torchvision's, as it trained with
    check_config(cfg)
    run_dir = os.path.dirname(path) or "."
    cfg = dataclasses.replace(cfg, output_dir=os.path.dirname(run_dir) or ".", run_name=os.path.basename(run_dir))
    ckpt["schedule_changed"] = schedule_changed
    return cfg, run_dir, ckpt


def check_resume_data(ckpt, classes, train_images, allow_change):
    saved = list(ckpt["classes"])
    if saved != classes:
        raise UserError(f"the checkpoint was trained on {short_list(saved)} but the data has {short_list(classes)}: "
                        "resume with the run's own data (--data-dir)")
    before = ckpt["progress"]["train_images"]
    if before != train_images and not allow_change:
        raise UserError(f"the training set now holds {train_images} readable images, the run was started with "
                        f"{before}: the epoch order would differ; pass --allow-schedule-change to carry on anyway")


# ---------------------------------------------------------------- one epoch

def training_module(run, frozen):
    """The module an epoch trains, with the backbone frozen or not. Under torchrun it is a DDP wrapper built after
    the freeze: DDP registers the parameters that need gradients when it is built, so it is built again whenever
    that set changes (--freeze-epochs); the plain module stays for evaluation, the EMA and the checkpoints."""
    set_backbone_frozen(run.plain, frozen)
    if not distributed.active():
        return run.model
    device = run.device
    return torch.nn.parallel.DistributedDataParallel(run.model,
                                                     device_ids=[device.index] if device.type == "cuda" else None)


def micro_batch_groups(loader, n):
    """Lists of n consecutive loader batches (the last list may be shorter): one optimiser step each."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


def train_step(run: Run, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], epoch: int,
               augment: BatchAugment | None = None) -> tuple[float, float, float]:
    """One optimiser step of run.trained over a list of (uint8 images, targets) micro-batches.

    Each micro-batch loss is weighted by its share of the step's images, so the summed gradient is the gradient of
    the mean loss over all of them: N micro-batches give the step of one batch of their union (up to float error
    and BatchNorm, which sees each micro-batch alone). A non-finite loss is not applied. Returns (mean loss,
    correct predictions, images), summed over all processes under torchrun.
    """
    model, cfg, device = run.trained, run.cfg, run.device
    total = sum(len(targets) for _, targets in micro_batches)
    loss_sum, correct = 0.0, 0
    run.optimizer.zero_grad(set_to_none=True)
    for i, (images, targets) in enumerate(micro_batches):
        # under DDP the gradients are averaged across processes once per step, on the last micro-batch
        last = i == len(micro_batches) - 1
        sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
        x = to_float_batch(images, device, cfg.erasing, augment, cfg.channels_last, normalisation(cfg))
        y = targets.to(device, non_blocking=True)
        if run.mixer is not None:
            x, y = run.mixer(x, y, epoch)  # y becomes (N, C) class distributions when the batch is mixed
        with sync:
            with autocast(device, run.dtype):
                logits = model(x)
            loss = run.criterion(logits, y, epoch)
            run.scaler.scale(loss * (len(y) / total)).backward()
        loss_sum += loss.detach() * len(y)
        correct += count_correct(logits.detach(), y)
    # the one host sync of the step, summed over the processes: a nan/inf loss on any of them makes the sum
    # non-finite on all of them, so they all skip the step (its gradients were averaged into every process)
    loss_sum, correct, total = distributed.sum_all([loss_sum, correct, total], device).tolist()
    value = loss_sum / total
    if math.isfinite(value):
        if cfg.clip_grad:
            # once per step, on the true gradient: unscaled from the fp16 loss scale, summed over the micro-batches
            # and, under DDP, already averaged over the processes, so that every process clips by the same factor
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        run.scaler.step(run.optimizer)
        run.scaler.update()
    return value, correct, total


def train_one_epoch(run: Run, loader: torch.utils.data.DataLoader, epoch: int, progress: Progress,
                    stop: GracefulStop) -> bool:
    """Train on the epoch's remaining batches, keeping `progress` current after every step so that last.pt can be
    written at any step. Returns False when a signal asked the run to stop."""
    cfg = run.cfg
    run.trained.train()
    set_backbone_frozen(run.plain, backbone_frozen(cfg, epoch))  # back to eval mode for a frozen backbone
    augment = BatchAugment.from_config(cfg)
    steps = math.ceil(len(loader) / cfg.accum_steps)
    bar = tqdm(micro_batch_groups(loader, cfg.accum_steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
               dynamic_ncols=True, initial=progress.step, total=progress.step + steps,
               disable=not distributed.is_main())
    start = time.perf_counter()
    for group in bar:
        for _, _, bad_files in group:
            report_bad_files(bad_files, progress, run.run_dir)
        group = [(images, targets) for images, targets, _ in group if len(images)]
        if not group:
            continue
        count_step(run, progress, *train_step(run, group, epoch, augment))
        now = time.perf_counter()
        stop.step_took(now - start)
        progress.seconds += now - start
        start = now
        bar.set_postfix(loss=f"{progress.loss_sum / max(progress.seen, 1):.4f}",
                        acc=f"{progress.correct / max(progress.seen, 1):.3f}",
                        img_s=f"{progress.seen / max(progress.seconds, 1e-9):.0f}")
        if distributed.any_rank(stop.requested, run.device):  # every process stops after the same step
            return False
        # never in a run of non-finite losses: last.pt stays the state after the last good step
        if cfg.save_every_steps and progress.step % cfg.save_every_steps == 0 and not progress.nonfinite_in_a_row:
            save_last(run, progress)
    return True


def count_step(run, progress, value, correct, n):
    """After a step: the EMA follows a good one and its sums enter the epoch's; a non-finite one is counted."""
    if math.isfinite(value):
        if run.ema is not None:
            distributed.broadcast_buffers(run.plain)  # the same BatchNorm statistics on every rank
            run.ema.update_parameters(run.plain)
        progress.nonfinite_in_a_row = 0
        progress.loss_sum += value * n
        progress.correct += correct
        progress.seen += int(n)
    else:
        skip_nonfinite_step(value, progress, run.cfg, run.dtype, run.run_dir)
    run.scheduler.step()  # the schedule follows the batches, skipped ones included
    progress.step += 1
    progress.done += run.cfg.batch_size * distributed.world_size()


def skip_nonfinite_step(value, progress, cfg, dtype, run_dir):
    """A nan/inf loss: its step is not applied (the weights stay good); several in a row stop the run."""
    progress.nonfinite_steps += 1
    progress.nonfinite_in_a_row += 1
    where = f"epoch {progress.epoch + 1} step {progress.step + 1}"
    tqdm.write(f"warning: the loss is {value} at {where}: step skipped")
    if progress.nonfinite_in_a_row >= NONFINITE_LIMIT:
        fp16 = ", or train without fp16 (--amp off)" if dtype == torch.float16 else ""
        last = os.path.join(run_dir, "last.pt")
        kept = f"; {last} still holds the last good state" if os.path.exists(last) else ""
        raise UserError(f"the loss was not finite for {NONFINITE_LIMIT} steps in a row up to {where}: training "
                        f"diverged; lower --lr (it is {cfg.lr:g}){fp16}{kept}")


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: torch.utils.data.DataLoader, run: Run, desc: str = "val",
             stop: GracefulStop | None = None) -> dict[str, Any] | None:
    """Plain cross-entropy and accuracy of `model` on the centre crop, on run's device and precision; the loss does
    not change with the training loss. None when a signal asked the run to stop before the end."""
    model.eval()
    device, crop = run.device, eval_crop(run.cfg)
    total_loss, preds, targets, bad = 0.0, [], [], []
    for images, y, bad_files in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
                                     disable=not distributed.is_main()):
        if stop is not None and stop.signalled:  # the time limit lets a started validation pass finish
            break
        bad += bad_files
        if len(images) == 0:
            continue
        x = to_float_batch(center_crop(images, crop), device, channels_last=run.cfg.channels_last,
                           norm=normalisation(run.cfg))
        y = y.to(device, non_blocking=True)
        with autocast(device, run.dtype):
            logits = model(x)
        total_loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
        preds.append(logits.argmax(1).cpu())
        targets.append(y.cpu())
    if stop is not None and distributed.any_rank(stop.signalled, device):  # all processes stop, or none
        return None
    # every rank evaluated its own shard: gather predictions and losses in dataset order
    shards = distributed.gather((total_loss, torch.cat(preds).numpy() if preds else np.zeros(0, np.int64),
                                 torch.cat(targets).numpy() if targets else np.zeros(0, np.int64), bad))
    total_loss = sum(s[0] for s in shards)
    preds, targets = np.concatenate([s[1] for s in shards]), np.concatenate([s[2] for s in shards])
    bad = [b for s in shards for b in s[3]]
    return dict(loss=total_loss / len(targets), acc=float((preds == targets).mean()), preds=preds,
                targets=targets, bad=bad)


NOT_VALIDATED = dict(raw=None, ema=None, seconds=0.0)  # the scores of an epoch that --val-every skips


def validation_due(cfg, epoch, stop, device):
    """--val-every: the epoch is validated when it is an Nth one, the last one, or the one a stop (signal,
    --time-limit) ends the run on, so that best.pt and the curves always see the weights the run ends with."""
    return (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs or distributed.any_rank(stop.requested,
                                                                                               device)


def epoch_scores(run, loader, epoch, stop):
    """The val scores of an epoch whose training finished: NOT_VALIDATED when --val-every skips it, None when the
    run stops first (a validation pass that would end past --time-limit waits for the resumed run)."""
    if not validation_due(run.cfg, epoch, stop, run.device):
        return NOT_VALIDATED
    if distributed.any_rank(stop.out_of_time(stop.longest_validation), run.device):
        return None
    return validate(run, loader, epoch, stop)


def validate(run: Run, loader, epoch: int, stop: GracefulStop):
    """The raw weights, and the EMA's from --ema-start-epoch on, on val: {"raw": scores, "ema": scores or None,
    "seconds": the time it took}, or None when a signal stopped it."""
    start = time.perf_counter()
    distributed.broadcast_buffers(run.model)  # every rank evaluates the weights that rank 0 saves
    raw = evaluate(run.model, loader, run, stop=stop)
    ema = None
    if raw is not None and run.ema is not None and epoch >= run.cfg.ema_start_epoch:
        ema = evaluate(run.ema.module, loader, run, desc="val (EMA)", stop=stop)
        if ema is None:
            return None
    return None if raw is None else dict(raw=raw, ema=ema, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------- after each epoch

def epoch_row(run, progress, epoch, scores):
    """The epoch's history.csv row."""
    val, val_ema = scores["raw"] or {}, scores["ema"] or {}  # empty: not validated (--val-every)
    phase, share = loss_phase(run.cfg, epoch)
    return dict(epoch=epoch + 1, lr=progress.epoch_lr, loss_phase=phase, focal_share=share,
                train_loss=progress.loss_sum / max(progress.seen, 1),
                train_acc=progress.correct / max(progress.seen, 1), val_loss=val.get("loss", math.nan),
                val_acc=val.get("acc", math.nan), val_loss_ema=val_ema.get("loss", math.nan),
                val_acc_ema=val_ema.get("acc", math.nan),
                val_images=len(val["targets"]) if val else math.nan,  # what the accuracies count (tune.py's SE)
                nonfinite_steps=progress.nonfinite_steps,
                images_per_s=progress.seen / max(progress.seconds, 1e-9),
                epoch_seconds=progress.seconds + scores["seconds"])


def save_best(run, epoch, source, chosen, row, val_set):
    """best.pt, the val confusion matrix and (with --folds) the held-out predictions of a new best epoch."""
    save_atomic(best_checkpoint(run, source, epoch, row), os.path.join(run.run_dir, "best.pt"))
    # drawn with last.pt (--save-share), or at once for TensorBoard, which shows it at this epoch
    run.writes.confusion = functools.partial(
        plot_confusion, chosen["targets"], chosen["preds"], run.classes,
        os.path.join(run.run_dir, "confusion_matrix.png"),
        title=f"val confusion, epoch {epoch + 1} ({source} weights, acc {chosen['acc']:.4f})")
    if run.board is not None:
        draw_confusion(run)
    if run.cfg.folds:
        write_oof(run.run_dir, run.cfg, val_set, chosen["preds"], run.classes)


def record_epoch(run: Run, progress: Progress, epoch: int, scores: dict, val_set):
    """Keep what an epoch gave: the history row, best.pt when it is the best so far, last.pt, the plots, the
    console line. The raw or the EMA weights, whichever scored higher, stand for the epoch. An epoch that --val-every
    skips keeps its history row, last.pt and the curves."""
    val, val_ema = scores["raw"], scores["ema"]
    row, improved = epoch_row(run, progress, epoch, scores), False
    if val is not None:
        report_bad_files(val["bad"] + (val_ema["bad"] if val_ema else []), progress, run.run_dir)
        source, chosen = ("ema", val_ema) if val_ema is not None and val_ema["acc"] > val["acc"] else ("raw", val)
        improved = chosen["acc"] > progress.best["acc"]
        if improved:
            progress.best = {"acc": chosen["acc"], "epoch": epoch + 1, "source": source}
        update_plateau(progress, chosen["acc"], run.cfg.min_delta, epoch + 1 - last_validated(progress.history))
        distributed.check_in_sync(run.model, *([run.ema.module] if run.ema is not None else []))
        if improved and distributed.is_main():
            save_best(run, epoch, source, chosen, row, val_set)
    progress.history.append(row)
    if run.board is not None:
        run.board.log_epoch(row, os.path.join(run.run_dir, "confusion_matrix.png") if improved else None)
    progress.epoch, progress.step, progress.done = epoch + 1, 0, 0
    if distributed.is_main():
        pd.DataFrame(progress.history).to_csv(os.path.join(run.run_dir, "history.csv"), index=False,
                                              float_format="%.6g")
    if run.cfg.keep_epochs or run.writes.due(run.device):
        write_epoch_files(run, progress)
    val_text = f" | val loss {val['loss']:.4f} acc {val['acc']:.4f}" if val else ""
    val_text += f" | val EMA {val_ema['acc']:.4f}" if val_ema else ""
    print(f"epoch {epoch + 1:3d}/{run.cfg.epochs} | {row['loss_phase']:5s} | lr {row['lr']:.2e} | train loss "
          f"{row['train_loss']:.4f} acc {row['train_acc']:.4f}{val_text} | {row['images_per_s']:.0f} img/s"
          f"{' | best' if improved else ''}")


def last_validated(history):
    """The last validated epoch in history.csv's rows (0 when none): --val-every leaves the others' val_acc NaN."""
    return next((row["epoch"] for row in reversed(history) if row["val_acc"] == row["val_acc"]), 0)


def update_plateau(progress, acc, min_delta, epochs=1):
    """--patience: an epoch is better when its val accuracy beats the last better one's by more than --min-delta
    (counted with or without --patience, so that a resumed run may add it); epochs: those since the last
    validation, which --val-every makes more than one."""
    if acc > progress.plateau_best + min_delta:
        progress.plateau_best, progress.plateau_epochs = acc, 0
    else:
        progress.plateau_epochs += epochs


def plateaued(cfg, progress, last):
    """Whether --patience ends the run here; says so, and how to train on."""
    if not cfg.patience or progress.plateau_epochs < cfg.patience or progress.epoch >= cfg.epochs:
        return False
    n = progress.plateau_epochs
    print(f"early stop: the val accuracy has not risen by more than --min-delta {cfg.min_delta:g} for {n} "
          f"epoch{'s' * (n != 1)} (--patience {cfg.patience}); to train on: python train.py --resume {last} "
          "--patience <more epochs>")
    return True


def save_last(run: Run, progress: Progress):
    """last.pt, written by rank 0 with every process's random generators (all processes call this together)."""
    rngs = rank_rng_states()
    if distributed.is_main():
        save_atomic(training_checkpoint(run, progress, rngs), os.path.join(run.run_dir, "last.pt"))


def write_epoch_files(run: Run, progress: Progress):
    """last.pt (with its epoch-NNN.pt copy), the curves and the newest best epoch's confusion matrix, timed for
    --save-share (all processes call this together)."""
    with run.writes:
        save_last(run, progress)
        if distributed.is_main():
            if progress.done == 0:  # at an epoch's end
                keep_epoch_copy(run.run_dir, progress.epoch, run.cfg.keep_epochs)
            plot_curves(progress.history, os.path.join(run.run_dir, "curves.png"))
            draw_confusion(run)


def catch_up_writes(run, progress):
    """At the end of a run: last.pt and the plots of its last epoch, if --save-share skipped them."""
    if run.writes.behind:
        write_epoch_files(run, progress)


def draw_confusion(run):
    if run.writes.confusion is not None:
        run.writes.confusion()
        run.writes.confusion = None


def report_bad_files(bad, progress, run_dir=None):
    """Name each unreadable image once, and keep the whole list in the run folder."""
    new = sorted(set(bad) - set(progress.skipped_files))
    for message in new:
        tqdm.write(f"warning: skipped unreadable image {message}")
    progress.skipped_files = sorted(set(progress.skipped_files) | set(new))
    if new and run_dir and distributed.is_main():
        with open(os.path.join(run_dir, "skipped_images.txt"), "w") as f:
            f.write("\n".join(progress.skipped_files) + "\n")


def drop_unreadable(train_set, val_set, cfg, progress, run_dir=None):
    """Decode every train/val image once before training: name the unreadable ones and leave them out, or stop
    when they are more than --max-bad-frac of all."""
    paths = [p for p, _ in train_set.samples + val_set.samples]
    # decoded once, by the first process; the others take its list
    bad = distributed.from_main(check_images(paths, default_workers(cfg.workers)) if distributed.is_main() else None)
    report_bad_files(bad.values(), progress, run_dir)
    if len(bad) > cfg.max_bad_frac * len(paths):
        where = f" (listed above and in {os.path.join(run_dir, 'skipped_images.txt')})" if run_dir else " (listed above)"
        raise UserError(f"{len(bad)} of {len(paths)} train/val images ({len(bad) / len(paths):.1%}) cannot be read, "
                        f"more than --max-bad-frac {cfg.max_bad_frac:g}: repair or remove them{where}, "
                        "or raise --max-bad-frac")
    train_set.drop(bad)
    val_set.drop(bad)
    return bad


def check_data(cfg):
    """--check-data: the up-front scan alone, over train/, val/ and test/ when there is one."""
    train_set, val_set, classes = build_train_val(cfg)
    bad = drop_unreadable(train_set, val_set, cfg, Progress())
    print(f"{len(classes)} classes, {len(train_set)} train / {len(val_set)} val readable images, "
          f"{len(bad)} unreadable (at most {cfg.max_bad_frac:g} allowed)")
    test_dir = os.path.join(cfg.data_dir, "test")
    if os.path.isdir(test_dir):
        tests, others = list_files(test_dir)
        if others:
            print(f"warning: {test_dir} holds {not_images_note(others)}; inference.py stops on them: move them out")
        bad_tests = check_images(tests, default_workers(cfg.workers), desc="checking test images")
        for message in sorted(bad_tests.values()):
            print(f"warning: unreadable test image {message}")
        print(f"{len(tests) - len(bad_tests)} test images readable, {len(bad_tests)} unreadable"
              f"{' (inference.py needs --skip-bad for them)' if bad_tests else ''}")
    return 0


def resume_training(ckpt, run: Run, progress: Progress, steps_per_epoch: int) -> Progress:
    """Load last.pt into the freshly built run; returns the run's Progress.

    With another number of processes than the run had, the global batch and the steps per epoch differ: the
    interrupted epoch goes on with the images no process has trained on yet, shared among the new processes, and
    the LR schedule is laid out again for the new steps per epoch (as --allow-schedule-change does), at the LR that
    --lr-scale gives the new number of processes."""
    saved, cfg = ckpt["progress"], run.cfg
    processes = distributed.world_size()
    done = saved.get("done", saved["step"] * cfg.batch_size)  # earlier versions counted one process's steps
    regrid = saved.get("processes", 1) != processes
    step = round(done / (cfg.batch_size * processes)) if regrid else saved["step"]
    replay = saved["epoch"] * steps_per_epoch + step if ckpt["schedule_changed"] or regrid else None
    resumed = restore_training_state(ckpt, run, replay)
    resumed.skipped_files, resumed.train_images = progress.skipped_files, progress.train_images
    resumed.step, resumed.done, resumed.processes = step, done, processes
    if regrid:
        print(f"the run was trained by {saved.get('processes', 1)} process(es), now {processes}: the rest of epoch "
              f"{resumed.epoch + 1} is shared among them and the LR schedule follows the new steps per epoch")
    print(f"resuming at epoch {resumed.epoch + 1} step {resumed.step}/{steps_per_epoch}")
    return resumed


def stop_run(stop, progress, run, steps_per_epoch):
    """After a signal or --time-limit: last.pt is saved; say where the run stopped and how it resumes."""
    last = os.path.join(run.run_dir, "last.pt")
    reason = stop.name or f"--time-limit {run.cfg.time_limit}"
    print(f"{reason}: stopped at epoch {progress.epoch + 1} step {progress.step}/{steps_per_epoch}; "
          f"saved {last}")
    launcher = "python" if distributed.world_size() == 1 else "torchrun <the same options>"
    print(f"resume with: {launcher} train.py --resume {last}")
    return 128 + stop.signum if stop.signum else TIME_LIMIT_EXIT


# ---------------------------------------------------------------- the run

def load_data(cfg, datasets, run_dir, ckpt, allow_change):
    """The train and val (or held-out fold) datasets after the up-front scan has left out unreadable images, with
    the run's Progress (the images skipped so far). datasets: build_train_val's (train, val, classes)."""
    train_set, val_set, classes = datasets
    # a resumed run validates on its own split: its folds.csv or val_split.csv
    own_folds = os.path.join(run_dir, FOLD_SPLIT)
    saved_folds = own_folds if ckpt and os.path.isfile(own_folds) else cfg.fold_split or None
    train_set, val_set, split = fold_datasets(cfg, train_set, val_set, classes, saved_folds)
    saved_split = os.path.join(run_dir, VAL_SPLIT) if ckpt else None
    train_set, val_set, held_out = val_fraction_datasets(cfg, train_set, val_set, classes, saved_split)
    os.makedirs(run_dir, exist_ok=True)
    write_split(split, run_dir)
    write_split(held_out, run_dir, VAL_SPLIT)
    progress = Progress(skipped_files=ckpt["progress"]["skipped_files"] if ckpt else [])
    drop_unreadable(train_set, val_set, cfg, progress, run_dir)
    if ckpt:
        check_resume_data(ckpt, classes, len(train_set), allow_change)
    progress.train_images, progress.processes = len(train_set), distributed.world_size()
    return train_set, val_set, progress


def new_model(cfg, classes, ckpt):
    """The model with its pretrained (or --weights FILE) backbone; a resumed run loads its own weights later. Its
    size is checked first, on shapes alone: a model over --max-params stops before any download."""
    check_params(cfg.arch, len(classes), cfg.head, cfg.max_params)
    return build_model(cfg.arch, len(classes), "none" if ckpt else cfg.weights, cfg.head, cfg.head_dropout,
                       classes)


def build_run(cfg, model, device, train_set, steps_per_epoch, run_dir) -> Run:
    """Every object that trains the model, for this device and number of processes."""
    setup_backends(cfg, device)
    model = prepare_model(model, cfg, device)
    dtype = amp_dtype(cfg, device)
    run_cfg = scaled_lr(cfg)  # the LR for this number of processes; the run's saved config keeps --lr as given
    optimizer = build_optimizer(model, run_cfg)
    counts = train_set.class_counts()
    weights = class_weights(counts, cfg.class_weights, cfg.class_weights_beta)
    return Run(cfg=cfg, model=model, device=device, dtype=dtype, optimizer=optimizer,
               scheduler=build_scheduler(optimizer, run_cfg, steps_per_epoch),
               scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
               ema=make_ema(unwrap(model), cfg.ema_decay) if cfg.ema else None,  # a copy of the plain module
               criterion=TrainLoss(cfg, weights.to(device) if weights is not None else None),
               mixer=build_mixer(cfg, len(train_set.classes)), classes=tuple(train_set.classes),
               class_counts=tuple(int(n) for n in counts), run_dir=run_dir,
               board=Board(run_dir, train_set, cfg) if cfg.tensorboard and distributed.is_main() else None,
               writes=EpochWrites(cfg.save_share))


def describe(run, train_set, val_set):
    """The run's setup in three lines (the model, the batch and LR, the input data settings), and its config.json."""
    cfg, run_cfg, n = run.cfg, scaled_lr(run.cfg), distributed.world_size()
    dtype = f", {precision_name(run.dtype)}"
    print(f"{cfg.arch} with {cfg.head} head: {count_params(run.plain) / 1e6:.1f}M parameters, {len(run.classes)} "
          f"classes, {len(train_set)} train / {len(val_set)} val images, device {run.device}{dtype}")
    scaling = f" (--lr {cfg.lr:g} x {run_cfg.lr / cfg.lr:.4g}, --lr-scale {cfg.lr_scale})" \
        if cfg.lr_scale != "none" else ""
    print(f"{n} process(es) x --batch-size {cfg.batch_size} = global batch {n * cfg.batch_size}, "
          f"lr {run_cfg.lr:g}{scaling}")
    print(data_summary(cfg))
    if distributed.is_main():
        remove_stale_temp_files(run.run_dir)
        with open(os.path.join(run.run_dir, "config.json"), "w") as f:
            json.dump(dict(dataclasses.asdict(cfg), classes=list(run.classes), processes=n), f, indent=2)


def fit(run: Run, loaders, progress: Progress, started: float) -> int:
    """The epoch loop: train, validate, keep what the epoch gave; returns the exit code. started: time.monotonic()
    when the run began, from which --time-limit counts."""
    cfg, frozen = run.cfg, None
    steps_per_epoch = math.ceil(len(loaders.train) / cfg.accum_steps)
    with GracefulStop(time_limit_seconds(cfg.time_limit), started) as stop:
        for epoch in range(progress.epoch, cfg.epochs):
            if backbone_frozen(cfg, epoch) != frozen:
                frozen = backbone_frozen(cfg, epoch)
                run.train_model = training_module(run, frozen)
            if progress.done == 0:
                progress.start_epoch(reported_lr(run.optimizer))
            loaders.sampler.start_epoch(epoch, progress.done)
            finished = train_one_epoch(run, loaders.train, epoch, progress, stop)
            scores = epoch_scores(run, loaders.val, epoch, stop) if finished else None
            if scores is None:  # stopped by a signal or the time limit mid-epoch
                write_epoch_files(run, progress)
                return stop_run(stop, progress, run, steps_per_epoch)
            stop.validation_took(scores["seconds"])
            record_epoch(run, progress, epoch, scores, loaders.val.dataset.dataset)
            if plateaued(cfg, progress, os.path.join(run.run_dir, "last.pt")):
                break
            # after the last epoch there is nothing left to stop: the run ends as finished
            if progress.epoch < cfg.epochs and distributed.any_rank(stop.requested, run.device):
                catch_up_writes(run, progress)
                return stop_run(stop, progress, run, steps_per_epoch)
    catch_up_writes(run, progress)
    if run.board is not None:
        run.board.close()
    best = progress.best
    print(f"best val accuracy {best['acc']:.4f} at epoch {best['epoch']} ({best['source']} weights)")
    print(f"run folder: {run.run_dir}")
    print(f"next: python inference.py --checkpoint {os.path.join(run.run_dir, 'best.pt')} --data-dir {cfg.data_dir}")
    return 0


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()  # --time-limit counts from here
    cfg, args, given = parse_args(argv)
    if args.check_data:  # under torchrun the first process checks alone: the data are the same for all
        return check_data(cfg) if int(os.environ.get("RANK", 0)) == 0 else 0
    device = distributed.setup(pick_device(cfg.device))  # first: the first process names the run for all
    if cfg.all_folds and not args.find_lr:  # the finder sweeps on one fold's training part
        check_config(cfg)
        return run_all_folds(main, argv, cfg, folds_parent(cfg, args.overwrite))
    cfg, run_dir, ckpt = open_run(cfg, args, given)
    print_warnings(cfg, device)
    seed_everything(cfg.seed)

    datasets = build_train_val(cfg)
    model = new_model(cfg, datasets[2], ckpt)  # before the scan: a model over --max-params stops at once
    train_set, val_set, progress = load_data(cfg, datasets, run_dir, ckpt, args.allow_schedule_change)
    loaders = make_loaders(cfg, train_set, val_set, device)
    steps_per_epoch = math.ceil(len(loaders.train) / cfg.accum_steps)
    run = build_run(cfg, model, device, train_set, steps_per_epoch, run_dir)
    seed_rank_streams(cfg.seed)  # every process built the same model; from here each draws its own numbers
    if ckpt:
        progress = resume_training(ckpt, run, progress, steps_per_epoch)
    describe(run, train_set, val_set)
    return find_lr(run, loaders, train_step, args, argv) if args.find_lr else fit(run, loaders, progress, started)


if __name__ == "__main__":
    run_cli(main)
