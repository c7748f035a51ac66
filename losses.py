"""Label-smoothed cross-entropy, per-sample focal loss, their blend, and the epoch schedule between them.

Every loss here is one formula, computed per sample in float32 (also under autocast):

    loss_i = -sum_c w_c * q_ic * (1 - p_ic)^gamma * log p_ic

with q the (smoothed, or mixed) target distribution, p the softmax and w optional class weights. gamma = 0 is
cross-entropy. The seed computed focal loss on the batch-mean CE, which re-weights the whole batch by one number
instead of down-weighting the easy samples; this is the per-sample form of Lin et al. 2017.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from config import Config


def soft_targets(target, num_classes, smoothing=0.0):
    """Class indices or a (N, C) distribution -> a smoothed (N, C) float32 distribution."""
    if target.dim() == 1:
        target = F.one_hot(target, num_classes).float()
    target = target.float()
    if smoothing:
        target = target * (1 - smoothing) + smoothing / num_classes
    return target


def focal_loss(logits, target, gamma=1.5, smoothing=0.0, weight=None):
    """Mean over the batch of the per-sample focal loss; gamma=0 equals (smoothed, weighted) cross-entropy."""
    log_p = F.log_softmax(logits.float(), dim=1)
    q = soft_targets(target, logits.shape[1], smoothing)
    terms = -q * log_p
    if gamma:
        terms = terms * (1 - log_p.exp()).clamp(min=0).pow(gamma)
    if weight is not None:
        terms = terms * weight.to(terms.device, torch.float32)
    return terms.sum(dim=1).mean()


def cross_entropy(logits, target, smoothing=0.0, weight=None):
    return focal_loss(logits, target, gamma=0.0, smoothing=smoothing, weight=weight)


def loss_phase(cfg: Config, epoch: int) -> tuple[str, float]:
    """(phase name, focal share) for an epoch: a pure function of the epoch, so a resumed run picks the same loss."""
    if cfg.loss == "ce":
        return "ce", 0.0
    if cfg.loss == "focal":
        return "focal", 1.0
    if cfg.loss == "smooth-focal":
        return "smooth-focal", cfg.focal_blend
    s1, s2 = cfg.focal_start, cfg.focal_full
    if epoch < s1:
        return "ce", 0.0
    if epoch >= s2:
        return "focal", 1.0
    return "blend", (epoch - s1 + 1) / (s2 - s1 + 1)  # strictly between 0 and 1 inside [s1, s2)


def class_weights(counts: Sequence[int] | np.ndarray, kind: str = "none",
                  beta: float = 0.999) -> torch.Tensor | None:
    """Per-class weights from the class counts of the file list (never from a pass over augmented images)."""
    counts = np.asarray(counts)
    if kind == "none":
        return None
    present = np.flatnonzero(counts)
    w = np.zeros(len(counts))
    if kind == "balanced":
        from sklearn.utils.class_weight import compute_class_weight  # imported here: sklearn costs a second
        labels = np.repeat(np.arange(len(counts)), counts)
        w[present] = compute_class_weight("balanced", classes=present, y=labels)
    elif kind == "effective":
        effective = (1 - beta ** counts[present]) / (1 - beta)
        w[present] = 1.0 / effective
        w *= len(present) / w.sum()
    else:
        raise ValueError(f"unknown class weighting {kind}")
    return torch.tensor(w, dtype=torch.float32)


class TrainLoss:
    """The training loss of one epoch: a blend of smoothed CE and focal loss as loss_phase says."""

    def __init__(self, cfg, weights=None):
        self.cfg, self.weights = cfg, weights

    def __call__(self, logits, target, epoch):
        cfg = self.cfg
        _, share = loss_phase(cfg, epoch)
        # the CE part is weighted from the first epoch (--class-weights-from start), or when the loss has no focal
        # part for the weights to enter (--loss ce: weighted cross-entropy)
        ce_weights = self.weights if cfg.class_weights_from == "start" or cfg.loss == "ce" else None
        loss = 0.0
        if share < 1:
            loss = (1 - share) * cross_entropy(logits, target, cfg.label_smoothing, ce_weights)
        if share > 0:
            loss = loss + share * focal_loss(logits, target, cfg.focal_gamma, cfg.label_smoothing, self.weights)
        return loss
