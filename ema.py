"""The exponential moving average of the weights, updated after every optimiser step (BatchNorm buffers included)."""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel


def ema_avg_fn(decay):
    """AveragedModel multi_avg_fn with warmup: decay_t = min(decay, (1 + t) / (10 + t)), t = updates so far.

    Early on the average follows the weights closely, so a short run still gets a useful EMA. Integer buffers
    (BatchNorm's num_batches_tracked) are copied, float ones (running mean/var) are averaged like the weights.
    """
    def update(ema_list, model_list, num_averaged):
        t = float(num_averaged)
        d = min(decay, (1 + t) / (10 + t))
        floats = [(e, m) for e, m in zip(ema_list, model_list) if e.is_floating_point()]
        others = [(e, m) for e, m in zip(ema_list, model_list) if not e.is_floating_point()]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1 - d)
        for e, m in others:
            e.copy_(m)
    return update


def make_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """An AveragedModel over parameters and buffers, updated after every optimiser step by the training loop."""
    return AveragedModel(model, multi_avg_fn=ema_avg_fn(decay), use_buffers=True)
