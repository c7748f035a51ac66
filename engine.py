"""The training engine: the loaders and their epoch order, the optimiser and LR schedule, the Run's assembly, one
optimiser step, one epoch, and evaluation. train.py drives it (its command line, the run folder, the record of each
epoch); bench.py and the LR finder use the same step.

A run is a function of its config: the epoch order and every image's augmentation are drawn from (seed, epoch,
image), never from a generator that runs on through the epochs, so a resumed run only has to skip the batches it has
done; the rest (dropout, random erasing, the EMA and optimiser state, the schedule) is saved and loaded as is.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import distributed
from augment import BatchAugment, center_crop, eval_crop
from batches import loader_options, normalisation, to_float_batch
from checkpoint import save_last
from config import Config
from dataset import LabelledImages
from distill import distilled_loss, load_teachers
from errors import UserError
from finetune import backbone_frozen, param_groups, set_backbone_frozen
from losses import TrainLoss, class_weights
from mix import build_mixer, count_correct
from model import to_sync_batchnorm
from progressive import resized, train_size
from run import Progress, Run, unwrap
from run_folder import EpochWrites, last_path, write_skipped
from stopping import GracefulStop
from tensorboard_log import Board
from utils import amp_dtype, autocast, default_workers, make_ema, seed_worker

NONFINITE_LIMIT = 5  # non-finite losses in a row that stop the run


# the training loader, the validation loader (this process's shard of val) and the epoch order behind the first
Loaders = collections.namedtuple("Loaders", "train val sampler")


def make_loaders(cfg: Config, train_set: LabelledImages, val_set: LabelledImages, device: torch.device) -> Loaders:
    workers = default_workers(cfg.workers, device)
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


def micro_batch_size(cfg: Config) -> int:
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


def scaled_lr(cfg: Config) -> Config:
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


def build_run(cfg: Config, model: torch.nn.Module, device: torch.device, train_set: LabelledImages,
              steps_per_epoch: int, run_dir: str) -> Run:
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
               writes=EpochWrites(cfg.save_share), teachers=load_teachers(cfg, train_set.classes, device))


def training_module(run: Run, frozen: bool) -> torch.nn.Module:
    """The module an epoch trains, with the backbone frozen or not. Under torchrun it is a DDP wrapper built after
    the freeze: DDP registers the parameters that need gradients when it is built, so it is built again whenever
    that set changes (--freeze-epochs); the plain module stays for evaluation, the EMA and the checkpoints."""
    set_backbone_frozen(run.plain, frozen)
    if not distributed.active():
        return run.model
    device = run.device
    return torch.nn.parallel.DistributedDataParallel(run.model,
                                                     device_ids=[device.index] if device.type == "cuda" else None)


def micro_batch_groups(loader: Iterable[tuple], n: int) -> Iterator[list[tuple]]:
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
        x = to_float_batch(images, device, normalisation(cfg), cfg.erasing, augment, cfg.channels_last)
        x = resized(x, train_size(cfg, epoch), cfg)  # --progressive: the epoch's side
        y = targets.to(device, non_blocking=True)
        if run.mixer is not None:
            x, y = run.mixer(x, y, epoch)  # y becomes (N, C) class distributions when the batch is mixed
        with sync:
            with autocast(device, run.dtype):
                logits = model(x)
            loss = run.criterion(logits, y, epoch)
            if run.teachers is not None:  # --teacher: on the same augmented and mixed batch
                loss = distilled_loss(loss, logits, run.teachers.probs(x, run.dtype, cfg.distill_temperature), cfg)
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


def endless_groups(loaders: Loaders, accum_steps: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The training batches, one optimiser step's micro-batches at a time as the training groups them, epoch after
    epoch in the run's own shuffled orders: for the LR finder's sweep and the --budget probe, which may take more
    steps than an epoch of a small dataset holds."""
    for epoch in itertools.count():
        loaders.sampler.start_epoch(epoch)
        steps = 0
        for group in readable_groups(micro_batch_groups(loaders.train, accum_steps)):
            steps += 1
            yield group
        if not steps:
            raise UserError("the training loader gave no batch: no readable training images")


def steps_per_epoch(loader: torch.utils.data.DataLoader, cfg: Config) -> int:
    """Optimiser steps in one epoch of `loader`: --accum-steps micro-batches each, the last step taking what is left."""
    return math.ceil(len(loader) / cfg.accum_steps)


def readable_groups(groups: Iterable[list], progress: Progress | None = None,
                    run_dir: str | None = None) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each step's micro-batches with the unreadable images left out (named once, with a progress to keep them in);
    a step whose every image was unreadable is skipped."""
    for group in groups:
        if progress is not None:
            for _, _, bad_files in group:
                report_bad_files(bad_files, progress, run_dir)
        group = [(images, targets) for images, targets, _ in group if len(images)]
        if group:
            yield group


def train_one_epoch(run: Run, loader: torch.utils.data.DataLoader, epoch: int, progress: Progress,
                    stop: GracefulStop) -> bool:
    """Train on the epoch's remaining batches, keeping `progress` current after every step so that last.pt can be
    written at any step. Returns False when a signal asked the run to stop."""
    cfg = run.cfg
    run.trained.train()
    set_backbone_frozen(run.plain, backbone_frozen(cfg, epoch))  # back to eval mode for a frozen backbone
    augment = BatchAugment.from_config(cfg)
    groups = readable_groups(micro_batch_groups(loader, cfg.accum_steps), progress, run.run_dir)
    bar = tqdm(groups, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
               initial=progress.step, total=progress.step + steps_per_epoch(loader, cfg),
               disable=not distributed.is_main())
    start = time.perf_counter()
    for group in bar:
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


def count_step(run: Run, progress: Progress, value: float, correct: float, n: float) -> None:
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
        last = last_path(run_dir)
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
        x = to_float_batch(center_crop(images, crop), device, normalisation(run.cfg),
                           channels_last=run.cfg.channels_last)
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


def epoch_scores(run: Run, loader: torch.utils.data.DataLoader, epoch: int,
                 stop: GracefulStop) -> dict[str, Any] | None:
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


def report_bad_files(bad: Iterable[str], progress: Progress, run_dir: str | None = None) -> None:
    """Name each unreadable image once, and keep the whole list in the run folder."""
    new = sorted(set(bad) - set(progress.skipped_files))
    for message in new:
        tqdm.write(f"warning: skipped unreadable image {message}")
    progress.skipped_files = sorted(set(progress.skipped_files) | set(new))
    if new and run_dir and distributed.is_main():
        write_skipped(run_dir, progress.skipped_files)


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
