"""The objects a training run is made of: the Run (the model and everything that trains it, built once by the engine
and passed whole to the functions that need several of its parts: training step, epoch, evaluation, checkpoints)
and its Progress (where it stands: with the state_dicts, all that a resumed run needs).

Only cfg, model and device are needed to build a Run: evaluation needs no optimiser, and a benchmark or a test
builds the parts it uses, by keyword."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.optim.swa_utils import AveragedModel

from config import Config


@dataclass
class Run:
    cfg: Config
    model: torch.nn.Module  # the plain module (compiled with --compile): evaluation, the EMA and checkpoints use it
    device: torch.device
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
    scaler: Optional[torch.amp.GradScaler] = None
    criterion: object = None  # losses.TrainLoss: (logits, targets, epoch) -> loss
    dtype: Optional[torch.dtype] = None  # the autocast dtype, None = float32
    ema: Optional[torch.nn.Module] = None  # torch.optim.swa_utils.AveragedModel of the plain module
    mixer: object = None  # mix.BatchMixer, or None without --mixup/--cutmix
    classes: tuple = ()
    class_counts: tuple = ()
    run_dir: str = ""
    board: object = None  # tensorboard_log.Board with --tensorboard, on rank 0
    train_model: Optional[torch.nn.Module] = None  # what the epoch trains: the model, or its DDP wrapper
    writes: object = None  # run_folder.EpochWrites: when last.pt and the plots are written (--save-share)
    teachers: object = None  # distill.Teachers with --teacher

    @property
    def plain(self) -> torch.nn.Module:
        """The model without its torch.compile or DDP wrappers: what checkpoints save and load."""
        return unwrap(self.model)

    @property
    def trained(self) -> torch.nn.Module:
        """The module the epoch trains: its DDP wrapper under torchrun, else the model."""
        return self.train_model if self.train_model is not None else self.model


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
    budget: dict = field(default_factory=dict)  # --budget: the plan and the times it was made from (budget.py)
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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP, torch.compile or AveragedModel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, AveragedModel)):
            model = model.module
        else:
            return model
