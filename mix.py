"""MixUp and CutMix on a training batch: images are blended, targets become class distributions.

torchvision.transforms.v2.MixUp/CutMix do the blending; this file decides when a batch is mixed (--mix-prob,
--mix-off-epoch) and which of the two runs (--mix-switch-prob). The losses take the mixed targets as they are,
class weights included, since every loss in losses.py is linear in the target distribution.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torchvision.transforms import v2

if TYPE_CHECKING:
    from config import Config


class BatchMixer:
    """mixer(images, targets, epoch) -> (images, targets): targets are class indices in, (N, C) floats out."""

    def __init__(self, cfg, num_classes):
        self.cfg, self.num_classes = cfg, num_classes
        mixup = v2.MixUp(alpha=cfg.mixup, num_classes=num_classes) if cfg.mixup > 0 else None
        cutmix = v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes) if cfg.cutmix > 0 else None
        if mixup and cutmix:
            self.mix = v2.RandomChoice([mixup, cutmix], p=[1 - cfg.mix_switch_prob, cfg.mix_switch_prob])
        else:
            self.mix = mixup or cutmix

    def active(self, epoch):
        return self.cfg.mix_off_epoch <= 0 or epoch < self.cfg.mix_off_epoch

    def __call__(self, images, targets, epoch):
        if not self.active(epoch) or torch.rand(()).item() >= self.cfg.mix_prob:
            return images, targets
        # the torch RNG draws lambda and the box, so a seeded run mixes the same way again
        return self.mix(images, targets)


def build_mixer(cfg: Config, num_classes: int) -> BatchMixer | None:
    """A BatchMixer, or None when neither --mixup nor --cutmix is on (the seed recipe)."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return BatchMixer(cfg, num_classes)


def count_correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Correct predictions of a batch; with mixed targets each image counts the share of the predicted class.

    For a MixUp of 0.7 cat + 0.3 dog, predicting cat scores 0.7 and dog 0.3; with class indices this is plain
    accuracy. So train accuracy stays comparable between mixed and clean epochs instead of dropping to the share of
    images whose dominant label happens to win.

    A 0-d tensor on the logits' device: the training step adds them up and reads the sum once per step, so counting
    costs no host sync per micro-batch.
    """
    preds = logits.argmax(1)
    if targets.dim() == 1:
        return (preds == targets).sum()
    return targets.gather(1, preds[:, None]).sum()
