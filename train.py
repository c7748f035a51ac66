"""Fine-tune a torchvision ResNet-family classifier on data/train + data/val.

    python train.py                                   # the full seed recipe: ResNeXt-101 32x8d, 100 epochs
    python train.py --data-dir data/sample --arch resnet18 --weights none --img-size 64 --epochs 3

Writes checkpoints/<run>/: last.pt, best.pt, config.json, history.csv, curves.png, confusion_matrix.png.
"""
import argparse
import dataclasses
import json
import math
import os
import time
from datetime import datetime

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from config import Config, add_config_args, config_from_args
from dataset import build_train_val, collate_skipping_bad, center_crop, to_float_batch
from losses import TrainLoss, class_weights, loss_phase
from model import UserError, build_model, count_params, head_parameters
from utils import (amp_dtype, autocast, default_workers, make_ema, pick_device, plot_confusion, plot_curves, run_cli, save_atomic,
                   seed_everything, seed_worker, unwrap)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Fine-tune a torchvision ResNet-family classifier on an image-folder dataset "
                    "(DATA/train/<class>/, DATA/val/<class>/).")
    add_config_args(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="start again in a run folder that already holds a run (its files are replaced)")
    args = parser.parse_args(argv)
    return config_from_args(args), args


# ---------------------------------------------------------------- setup

def make_loaders(cfg, train_set, val_set, device):
    workers = default_workers(cfg.workers)
    common = dict(num_workers=workers, pin_memory=device.type == "cuda", collate_fn=collate_skipping_bad,
                  worker_init_fn=seed_worker, persistent_workers=workers > 0)
    generator = torch.Generator().manual_seed(cfg.seed)
    # dropping the last partial batch keeps BatchNorm away from a batch of one
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True,
                                               drop_last=len(train_set) > cfg.batch_size, generator=generator,
                                               **common)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=cfg.batch_size * 2, shuffle=False, **common)
    return train_loader, val_loader


def build_optimizer(model, cfg):
    head = {id(p) for p in head_parameters(model)}
    backbone = [p for p in model.parameters() if id(p) not in head]
    groups = [{"params": backbone, "lr": cfg.lr},
              {"params": head_parameters(model), "lr": cfg.lr * cfg.head_lr_mult}]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer, cfg, steps_per_epoch):
    """Per-step cosine annealing to min_lr over the whole run (or --t-max epochs), after an optional warmup."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    period = (cfg.t_max or cfg.epochs) * steps_per_epoch - warmup
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(period)), eta_min=cfg.min_lr)
    if warmup <= 0:
        return cosine
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def make_run_dir(cfg, overwrite):
    name = cfg.run_name or f"{cfg.arch}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = os.path.join(cfg.output_dir, name)
    if os.path.exists(os.path.join(run_dir, "last.pt")) and not overwrite:
        raise UserError(f"{run_dir} already holds a run: pass --overwrite to start it again, "
                        "or choose another --run-name")
    os.makedirs(run_dir, exist_ok=True)
    return run_dir


# ---------------------------------------------------------------- one epoch

def train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, ema, epoch, cfg, device, dtype):
    model.train()
    total_loss, correct, seen, bad = 0.0, 0, 0, []
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
    for images, targets, bad_files in bar:
        bad += bad_files
        if len(images) == 0:
            continue
        x = to_float_batch(images, device, cfg.erasing)
        y = targets.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(x)
        loss = criterion(logits, y, epoch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        n = len(y)
        total_loss += loss.item() * n
        correct += (logits.argmax(1) == y).sum().item()
        seen += n
        rate = seen / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}", img_s=f"{rate:.0f}")
    seconds = time.perf_counter() - start
    return dict(train_loss=total_loss / max(seen, 1), train_acc=correct / max(seen, 1),
                images_per_s=seen / seconds, bad=bad)


@torch.no_grad()
def evaluate(model, loader, device, dtype, img_size, desc="val"):
    """Plain cross-entropy and accuracy on the centre crop; the loss does not change with the training loss."""
    model.eval()
    total_loss, preds, targets, bad = 0.0, [], [], []
    for images, y, bad_files in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        bad += bad_files
        if len(images) == 0:
            continue
        x = to_float_batch(center_crop(images, img_size), device)
        y = y.to(device)
        with autocast(device, dtype):
            logits = model(x)
        total_loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
        preds.append(logits.argmax(1).cpu())
        targets.append(y.cpu())
    preds, targets = torch.cat(preds).numpy(), torch.cat(targets).numpy()
    return dict(loss=total_loss / len(targets), acc=float((preds == targets).mean()), preds=preds,
                targets=targets, bad=bad)


# ---------------------------------------------------------------- checkpoints and reports

def checkpoint_state(model, ema, optimizer, scheduler, scaler, cfg, classes, epoch, history, best):
    return {
        "model": unwrap(model).state_dict(),
        "ema": unwrap(ema).state_dict() if ema is not None else None,
        "ema_updates": int(ema.n_averaged) if ema is not None else 0,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch + 1,  # the next epoch to run
        "classes": list(classes),
        "config": dataclasses.asdict(cfg),
        "history": history,
        "best": best,
        "torch_version": str(torch.__version__),
    }


def best_state(model, ema, source, cfg, classes, epoch, scores):
    raw = unwrap(model).state_dict()
    averaged = unwrap(ema).state_dict() if ema is not None else None
    return {
        "model": averaged if source == "ema" else raw,  # shares storage with raw/ema: saved once
        "raw": raw,
        "ema": averaged,
        "source": source,
        "epoch": epoch + 1,
        "scores": scores,
        "classes": list(classes),
        "config": dataclasses.asdict(cfg),
        "torch_version": str(torch.__version__),
    }


def write_history(history, run_dir):
    pd.DataFrame(history).to_csv(os.path.join(run_dir, "history.csv"), index=False, float_format="%.6g")
    plot_curves(history, os.path.join(run_dir, "curves.png"))


def report_bad_files(bad, seen_bad, run_dir):
    new = sorted(set(bad) - seen_bad)
    for message in new:
        print(f"warning: skipped unreadable image {message}")
    seen_bad.update(new)
    if new:
        with open(os.path.join(run_dir, "skipped_images.txt"), "w") as f:
            f.write("\n".join(sorted(seen_bad)) + "\n")


# ---------------------------------------------------------------- main

def main(argv=None):
    cfg, args = parse_args(argv)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    dtype = amp_dtype(cfg, device)

    train_set, val_set, classes = build_train_val(cfg)
    model = build_model(cfg.arch, len(classes), cfg.weights, cfg.head, cfg.head_dropout)
    n_params = count_params(model)
    print(f"{cfg.arch} with {cfg.head} head: {n_params / 1e6:.1f}M parameters, {len(classes)} classes, "
          f"{len(train_set)} train / {len(val_set)} val images, device {device}"
          f"{', ' + str(dtype).removeprefix('torch.') + ' autocast' if dtype else ''}")
    if n_params > cfg.max_params:
        raise UserError(f"{cfg.arch} has {n_params / 1e6:.1f}M parameters, over --max-params "
                        f"{cfg.max_params / 1e6:.1f}M (use a smaller --arch or --head linear)")
    model.to(device)
    run_dir = make_run_dir(cfg, args.overwrite)

    train_loader, val_loader = make_loaders(cfg, train_set, val_set, device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(train_loader))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = make_ema(model, cfg.ema_decay) if cfg.ema else None
    weights = class_weights(train_set.class_counts(), cfg.class_weights, cfg.class_weights_beta)
    criterion = TrainLoss(cfg, weights.to(device) if weights is not None else None)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(dict(dataclasses.asdict(cfg), classes=classes), f, indent=2)

    history, best, seen_bad = [], {"acc": -1.0, "epoch": -1, "source": "raw"}, set()
    for epoch in range(cfg.epochs):
        epoch_start = time.perf_counter()
        phase, share = loss_phase(cfg, epoch)
        lr = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, scaler, ema, epoch, cfg,
                                device, dtype)
        val = evaluate(model, val_loader, device, dtype, cfg.img_size)
        val_ema = None
        if ema is not None and epoch >= cfg.ema_start_epoch:
            val_ema = evaluate(ema.module, val_loader, device, dtype, cfg.img_size, desc="val (EMA)")
        report_bad_files(stats["bad"] + val["bad"], seen_bad, run_dir)

        source, chosen = ("ema", val_ema) if val_ema is not None and val_ema["acc"] > val["acc"] else ("raw", val)
        row = dict(epoch=epoch + 1, lr=lr, loss_phase=phase, focal_share=share, train_loss=stats["train_loss"],
                   train_acc=stats["train_acc"], val_loss=val["loss"], val_acc=val["acc"],
                   val_loss_ema=val_ema["loss"] if val_ema else math.nan,
                   val_acc_ema=val_ema["acc"] if val_ema else math.nan,
                   images_per_s=stats["images_per_s"])
        row["epoch_seconds"] = time.perf_counter() - epoch_start
        improved = chosen["acc"] > best["acc"]
        if improved:
            best = {"acc": chosen["acc"], "epoch": epoch + 1, "source": source}
            save_atomic(best_state(model, ema, source, cfg, classes, epoch, row), os.path.join(run_dir, "best.pt"))
            plot_confusion(chosen["targets"], chosen["preds"], classes, os.path.join(run_dir, "confusion_matrix.png"),
                           title=f"val confusion, epoch {epoch + 1} ({source} weights, acc {chosen['acc']:.4f})")
        history.append(row)
        save_atomic(checkpoint_state(model, ema, optimizer, scheduler, scaler, cfg, classes, epoch, history, best),
                    os.path.join(run_dir, "last.pt"))
        write_history(history, run_dir)
        ema_text = f" | val EMA {val_ema['acc']:.4f}" if val_ema else ""
        print(f"epoch {epoch + 1:3d}/{cfg.epochs} | {phase:5s} | lr {lr:.2e} | train loss {stats['train_loss']:.4f} "
              f"acc {stats['train_acc']:.4f} | val loss {val['loss']:.4f} acc {val['acc']:.4f}{ema_text}"
              f" | {stats['images_per_s']:.0f} img/s{' | best' if improved else ''}")

    print(f"best val accuracy {best['acc']:.4f} at epoch {best['epoch']} ({best['source']} weights)")
    print(f"run folder: {run_dir}")
    print(f"next: python inference.py --checkpoint {os.path.join(run_dir, 'best.pt')} --data-dir {cfg.data_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
