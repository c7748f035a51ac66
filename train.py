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

import gc

if __name__ == "__main__":
    gc.disable()  # no collections while torch and torchvision import (~1 s of start-up): run_cli enables them

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import sys
import time
from typing import Any


import distributed
from budget import kept_on_resume, planned_config, process_seconds, replan
from checkpoint import best_checkpoint, load_resumable, save_atomic, save_last, saved_progress
from config import (Config, add_config_args, check_config, config_file_args, config_from_args, read_config_file,
                    time_limit_seconds)
from distill import teacher_lines
from dataset import build_train_val, check_images, list_files, not_images_note
from engine import (build_run, epoch_scores, make_loaders, report_bad_files, scaled_lr, steps_per_epoch,
                    train_one_epoch, training_module)
from errors import UserError, run_cli
from finetune import backbone_frozen, reported_lr
from folds import FOLD_SPLIT, VAL_SPLIT, fold_datasets, run_all_folds, val_fraction_datasets, write_oof, write_split
from history import better_weights, last_validated
from losses import loss_phase
from lr_finder import add_finder_args, find_lr, finder_run
from model import build_model, check_params, count_params, data_summary, resolve_data
from plots import plot_confusion, plot_curves
from progressive import plan_lines, train_size
from resume import check_resume_data, resume_path, resume_training, resumed_config
from run import Progress, Run
from run_folder import (folds_parent, keep_epoch_copy, new_run_dir, remove_stale_temp_files, run_name, write_config,
                        write_history)
from stopping import GracefulStop, epoch_ends_run, stop_run, update_plateau
from utils import default_workers, emulated_bf16_note, pick_device, precision_name, seed_everything, seed_rank_streams


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


@dataclasses.dataclass
class Opened:
    """An opened run: its settings and folder; for a resumed run its last.pt and whether the settings given now
    change its schedule (--allow-schedule-change), which decides how the LR schedule is restored."""
    cfg: Config
    run_dir: str
    ckpt: dict[str, Any] | None = None
    schedule_changed: bool = False


def new_run_config(cfg: Config) -> Config:
    """The settings of a new run, as a training run and the LR finder both open it: the model's own input settings
    where the flags leave them to it, checked (before anything of an earlier run is removed), and the run's name."""
    cfg = resolve_data(cfg)
    check_config(cfg)
    return dataclasses.replace(cfg, run_name=run_name(cfg))


def open_run(cfg: Config, args: argparse.Namespace, given: dict[str, Any]) -> Opened:
    """A new run, the one --resume names with its settings, or the LR finder's sweep of a new run."""
    if args.find_lr:
        return Opened(*finder_run(new_run_config(cfg), args))
    if args.resume == "auto" and not cfg.run_name:
        raise UserError("--resume auto needs the --run-name of the run to continue")
    path = resume_path(args.resume, os.path.join(cfg.output_dir, cfg.run_name)) if args.resume else None
    if path is None:
        if args.resume:
            print(f"no checkpoint in {os.path.join(cfg.output_dir, cfg.run_name)} yet: starting the run")
        cfg = new_run_config(cfg)
        clear = "--overwrite" if args.overwrite else "--resume auto found no last.pt" if args.resume else None
        return Opened(cfg, new_run_dir(cfg, clear))
    ckpt = load_resumable(path)
    cfg, schedule_changed = resumed_config(ckpt["config"], kept_on_resume(ckpt, given), args.allow_schedule_change)
    cfg = resolve_data(cfg)  # a run saved before these settings were stored: torchvision's, as it trained with
    check_config(cfg)
    run_dir = os.path.dirname(path) or "."
    cfg = dataclasses.replace(cfg, output_dir=os.path.dirname(run_dir) or ".", run_name=os.path.basename(run_dir))
    return Opened(cfg, run_dir, ckpt, schedule_changed)


# ---------------------------------------------------------------- after each epoch

def epoch_row(run, progress, epoch, scores):
    """The epoch's history.csv row."""
    val, val_ema = scores["raw"] or {}, scores["ema"] or {}  # empty: not validated (--val-every)
    phase, share = loss_phase(run.cfg, epoch)
    return dict(epoch=epoch + 1, lr=progress.epoch_lr, loss_phase=phase, focal_share=share,
                train_size=train_size(run.cfg, epoch),
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
    """Keep what an epoch gave: best.pt when it is the best so far, the history row, last.pt and the plots, the
    console line. An epoch that --val-every skips keeps its history row, last.pt and the curves."""
    row = epoch_row(run, progress, epoch, scores)
    improved = scores["raw"] is not None and keep_best(run, progress, epoch, scores, row, val_set)
    progress.history.append(row)
    if run.board is not None:
        run.board.log_epoch(row, os.path.join(run.run_dir, "confusion_matrix.png") if improved else None)
    progress.epoch, progress.step, progress.done = epoch + 1, 0, 0
    if distributed.is_main():
        write_history(run.run_dir, progress.history)
    if run.cfg.keep_epochs or run.writes.due(run.device):
        write_epoch_files(run, progress)
    print(epoch_line(run.cfg, row, scores, improved))


def keep_best(run, progress, epoch, scores, row, val_set):
    """A validated epoch: its unreadable images named, the raw or the EMA weights (whichever scored higher) standing
    for it, the plateau count, and best.pt when it beats the best so far (returned: whether it did)."""
    val, val_ema = scores["raw"], scores["ema"]
    report_bad_files(val["bad"] + (val_ema["bad"] if val_ema else []), progress, run.run_dir)
    source = better_weights(val["acc"], val_ema["acc"] if val_ema else None)
    chosen = val_ema if source == "ema" else val
    improved = chosen["acc"] > progress.best["acc"]
    if improved:
        progress.best = {"acc": chosen["acc"], "epoch": epoch + 1, "source": source}
    update_plateau(progress, chosen["acc"], run.cfg.min_delta, epoch + 1 - last_validated(progress.history))
    distributed.check_in_sync(run.model, *([run.ema.module] if run.ema is not None else []))
    if improved and distributed.is_main():
        save_best(run, epoch, source, chosen, row, val_set)
    return improved


def epoch_line(cfg, row, scores, improved):
    """The epoch's console line."""
    val, val_ema = scores["raw"], scores["ema"]
    val_text = f" | val loss {val['loss']:.4f} acc {val['acc']:.4f}" if val else ""
    val_text += f" | val EMA {val_ema['acc']:.4f}" if val_ema else ""
    return (f"epoch {row['epoch']:3d}/{cfg.epochs} | {row['loss_phase']:5s} | lr {row['lr']:.2e} | train loss "
            f"{row['train_loss']:.4f} acc {row['train_acc']:.4f}{val_text} | {row['images_per_s']:.0f} img/s"
            f"{' | best' if improved else ''}")


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
    train_set, val_set, classes = build_train_val(resolve_data(cfg))
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


# ---------------------------------------------------------------- the run

def load_data(opened, datasets, progress, allow_change):
    """The train and val (or held-out fold) datasets after the up-front scan has left out unreadable images (named
    in progress, the run's Progress). datasets: build_train_val's (train, val, classes)."""
    cfg, run_dir, ckpt = opened.cfg, opened.run_dir, opened.ckpt
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
    drop_unreadable(train_set, val_set, cfg, progress, run_dir)
    if ckpt:
        check_resume_data(ckpt, classes, len(train_set), allow_change)
    progress.train_images, progress.processes = len(train_set), distributed.world_size()
    return train_set, val_set


def new_model(cfg, classes, ckpt):
    """The model with its pretrained (or --weights FILE) backbone; a resumed run loads its own weights later. Its
    size is checked first, on shapes alone: a model over --max-params stops before any download."""
    check_params(cfg.arch, len(classes), cfg.head, cfg.max_params)
    return build_model(cfg.arch, len(classes), "none" if ckpt else cfg.weights, cfg.head, cfg.head_dropout,
                       classes)


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
    for line in plan_lines(cfg) + teacher_lines(run.teachers, [path for path, _ in val_set.samples]):
        print(line)
    if distributed.is_main():
        remove_stale_temp_files(run.run_dir)
        write_config(run.run_dir, cfg, run.classes, n)


def fit(run: Run, loaders, progress: Progress, started: float) -> int:
    """Train the remaining epochs, then say how the run ended; returns the exit code. started: time.monotonic() when
    the run began, from which --time-limit counts."""
    with GracefulStop(time_limit_seconds(run.cfg.time_limit), started) as stop:
        stopped = train_epochs(run, loaders, progress, stop)
    if stopped:
        return stop_run(stop, progress, run, steps_per_epoch(loaders.train, run.cfg))
    if run.board is not None:
        run.board.close()
    best = progress.best
    print(f"best val accuracy {best['acc']:.4f} at epoch {best['epoch']} ({best['source']} weights)")
    print(f"run folder: {run.run_dir}")
    print(f"next: python inference.py --checkpoint {os.path.join(run.run_dir, 'best.pt')} --data-dir "
          f"{run.cfg.data_dir}")
    return 0


def train_epochs(run: Run, loaders, progress: Progress, stop: GracefulStop) -> bool:
    """The epoch loop: train, validate, keep what the epoch gave, up to the last epoch or the --patience plateau.
    True when a signal or --time-limit stopped it, once last.pt holds the state to resume from."""
    frozen = None
    for epoch in itertools.count(progress.epoch):
        replan(run, progress, stop.elapsed())  # --budget: once, after the second epoch; may change the epochs
        cfg = run.cfg
        if epoch >= cfg.epochs:
            break
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
            return True
        stop.validation_took(scores["seconds"])
        record_epoch(run, progress, epoch, scores, loaders.val.dataset.dataset)
        ending = epoch_ends_run(run, progress, stop)
        if ending:
            catch_up_writes(run, progress)
            return ending == "stopped"
    catch_up_writes(run, progress)
    return False


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """started: time.monotonic() when the run began, from which --time-limit and --budget count (default: now; as a
    command, the start of the process)."""
    started = time.monotonic() if started is None else started
    cfg, args, given = parse_args(argv)
    if args.check_data:  # under torchrun the first process checks alone: the data are the same for all
        return check_data(cfg) if int(os.environ.get("RANK", 0)) == 0 else 0
    device = distributed.setup(pick_device(cfg.device))  # first: the first process names the run for all
    if cfg.all_folds and not args.find_lr:  # the finder sweeps on one fold's training part
        check_config(cfg)
        return run_all_folds(main, argv, cfg, folds_parent(cfg, args.overwrite), started)
    opened = open_run(cfg, args, given)
    cfg, ckpt = opened.cfg, opened.ckpt
    print_warnings(cfg, device)
    seed_everything(cfg.seed)

    datasets = build_train_val(cfg)
    model = new_model(cfg, datasets[2], ckpt)  # before the scan: a model over --max-params stops at once
    progress = saved_progress(ckpt)  # where the run stands
    train_set, val_set = load_data(opened, datasets, progress, args.allow_schedule_change)
    loaders = make_loaders(cfg, train_set, val_set, device)
    steps = steps_per_epoch(loaders.train, cfg)
    cfg = planned_config(opened, progress, model, device, loaders, started)  # --budget: the epochs that fit
    run = build_run(cfg, model, device, train_set, steps, opened.run_dir)
    seed_rank_streams(cfg.seed)  # every process built the same model; from here each draws its own numbers
    if ckpt:
        resume_training(ckpt, run, progress, steps, opened.schedule_changed)
    describe(run, train_set, val_set)
    return find_lr(run, loaders, args, argv) if args.find_lr else fit(run, loaders, progress, started)


if __name__ == "__main__":
    run_cli(lambda: main(started=time.monotonic() - process_seconds()))
