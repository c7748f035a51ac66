"""The one object a training run is made of: the model and everything that trains it, built once by train.py and
passed whole to the functions that need several of its parts (training step, epoch, evaluation, checkpoints).

Only cfg, model and device are needed to build one: evaluation needs no optimiser, and a benchmark or a test builds
the parts it uses, by keyword."""
from dataclasses import dataclass
from typing import Optional

import torch

from config import Config
from model import unwrap


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
    writes: object = None  # resume.EpochWrites: when last.pt and the plots are written (--save-share)

    @property
    def plain(self) -> torch.nn.Module:
        """The model without its torch.compile or DDP wrappers: what checkpoints save and load."""
        return unwrap(self.model)

    @property
    def trained(self) -> torch.nn.Module:
        """The module the epoch trains: its DDP wrapper under torchrun, else the model."""
        return self.train_model if self.train_model is not None else self.model
