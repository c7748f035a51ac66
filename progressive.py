"""Progressive resizing (--progressive): the side each training epoch sees. The first epochs train on smaller images
(a step at half the side costs about a quarter of the compute) growing to --img-size, and the last share of the
epochs (--progressive-full) trains at full size, so that the weights and BatchNorm's statistics settle at the size
the model is evaluated at; evaluation and best.pt are always at the run's own sizes.

The side is a pure function of the epoch, so a resumed run, every torchrun process and every loader worker agree on
it without being told. The batch is resized on the training device after the loader (antialiased, with the run's
--interpolation, as RandomResizedCrop resizes its crop): the loader's work, mostly decoding, costs the same at any
output side, and the crop, the erasing boxes and the mixing keep their meaning as shares of the image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from config import Config

STEP = 32  # the ResNets' total stride: a side that is a multiple of it gives whole feature maps at every stage


def epoch_sizes(cfg: Config) -> list[int]:
    """The training side of every epoch: --progressive x --img-size at the first, growing linearly in multiples of
    STEP, and --img-size itself for the last --progressive-full share of the epochs (the last epoch at least)."""
    if not cfg.progressive:
        return [cfg.img_size] * cfg.epochs
    full = max(1, round(cfg.progressive_full * cfg.epochs))
    growing = cfg.epochs - full
    sizes = []
    for epoch in range(growing):
        share = cfg.progressive + (1 - cfg.progressive) * epoch / growing
        side = int(share * cfg.img_size / STEP + 0.5) * STEP  # the nearest multiple of STEP
        sizes.append(min(cfg.img_size, max(STEP, side)))
    return sizes + [cfg.img_size] * full


def train_size(cfg: Config, epoch: int) -> int:
    """The side epoch `epoch` (counted from 0) trains at."""
    return epoch_sizes(cfg)[min(epoch, cfg.epochs - 1)]


def resized(batch: torch.Tensor, side: int, cfg: Config) -> torch.Tensor:
    """A float training batch at `side` x `side` pixels, in the memory format the run trains in; as it is without
    --progressive, or when it has that side already."""
    if not cfg.progressive or batch.shape[-1] == side and batch.shape[-2] == side:
        return batch
    batch = F.interpolate(batch, size=(side, side), mode=cfg.interpolation, antialias=True, align_corners=False)
    return batch.contiguous(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)


def plan_lines(cfg: Config) -> list[str]:
    """What a --progressive run says at its start: the epochs at each side, and what that means for --compile; a
    warning when the plan trains at one side only."""
    if not cfg.progressive:
        return []
    sizes = epoch_sizes(cfg)
    if len(set(sizes)) == 1:
        return [f"warning: --progressive {cfg.progressive:g} has no effect in this run: --img-size {cfg.img_size} "
                f"over {cfg.epochs} epoch{'s' * (cfg.epochs != 1)} leaves no smaller side that is a multiple of {STEP}"]
    spans, start = [], 0
    for epoch in range(1, len(sizes) + 1):
        if epoch == len(sizes) or sizes[epoch] != sizes[start]:
            epochs = f"{start + 1}" if epoch == start + 1 else f"{start + 1}-{epoch}"
            spans.append(f"epoch{'s' * (epoch > start + 1)} {epochs} at {sizes[start]} px")
            start = epoch
    lines = [f"progressive resizing: {', '.join(spans)}; evaluated at the run's own sizes"]
    if cfg.compile:
        lines.append(f"note: --compile compiles the model once per training side ({len(set(sizes))} sides) and "
                     "once for evaluation")
    return lines
