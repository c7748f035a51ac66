"""A model's class probabilities for a batch of evaluation squares, with test-time augmentation (TTA): the views,
their one forward pass, the softmax averaged over them. inference.py, bench.py and the tests predict through here,
and export.py builds the exported graph's views and average from the same functions."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from augment import center_crop, eval_crop
from batches import normalisation, to_float_batch
from config import Config
from utils import amp_dtype, autocast

TTA_MODES = ["none", "flip", "flip-crops"]


def tta_views(square: torch.Tensor, img_size: int, mode: str, interpolation: str = "bilinear") -> list[torch.Tensor]:
    """Fixed views of a batch of resized squares (N,3,R,R): the centre crop first, always."""
    views = crop_views(center_crop(square, img_size), mode)
    if mode == "flip-crops":
        whole = F.interpolate(square, size=(img_size, img_size), mode=interpolation or "bilinear",
                              antialias=True, align_corners=False)
        r = square.shape[-1]
        corners = [square[..., :img_size, :img_size], square[..., :img_size, r - img_size:],
                   square[..., r - img_size:, :img_size], square[..., r - img_size:, r - img_size:]]
        views += [whole, whole.flip(-1)] + corners
    return views


def crop_views(center: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views that need the centre crop alone: itself, and its mirror with any TTA. Traceable, so an exported
    model, which takes the crop as its input, computes the same views."""
    return [center] if mode == "none" else [center, center.flip(-1)]


def mean_over_views(logits: torch.Tensor, views: int) -> torch.Tensor:
    """Logits (views * N, C) of the views concatenated in tta_views' order -> softmax probabilities (N, C) averaged
    over the views, in float32. Traceable (no Python-side batch size), for the exported model too."""
    return logits.float().softmax(1).view(views, -1, logits.shape[1]).mean(0)


@torch.no_grad()
def predict_probs(model: torch.nn.Module, images: torch.Tensor, device: torch.device, cfg: Config,
                  mode: str) -> torch.Tensor:
    """Softmax averaged over the TTA views, all views of the batch in one forward pass, at the config's evaluation
    size, normalisation and precision."""
    x = to_float_batch(images, device, normalisation(cfg), channels_last=device.type == "cuda")
    views = tta_views(x, eval_crop(cfg), mode, cfg.interpolation)
    with autocast(device, amp_dtype(cfg, device)):
        logits = model(torch.cat(views))
    return mean_over_views(logits, len(views)).cpu()
