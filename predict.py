"""A model's class probabilities for a batch of evaluation squares, with test-time augmentation (TTA): the views,
their one forward pass, the softmax averaged over them. inference.py, bench.py and the tests predict through here,
and export.py builds the exported graph's views and average from the same functions."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from augment import center_crop, eval_crop
from batches import normalisation, to_float_batch
from checkpoint import load_checkpoint, select_weights
from config import Config, config_from_dict
from errors import UserError
from model import build_model, resolve_data
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


def load_model(path: str, which: str, device: torch.device) -> tuple:
    """(model, config, class names, weights source, class prior): the prior is the training class frequencies."""
    ckpt = load_checkpoint(path)
    # the input settings the run trained with; a checkpoint from before they were stored gets torchvision's
    cfg = resolve_data(config_from_dict(ckpt["config"]))
    classes = list(ckpt["classes"])
    counts = np.asarray(ckpt.get("class_counts") or np.ones(len(classes)), dtype=np.float64)
    state, source = select_weights(ckpt, which, path)
    model = build_model(cfg.arch, len(classes), weights="none", head=cfg.head, head_dropout=cfg.head_dropout)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path} does not match its own config ({cfg.arch}, {len(classes)} classes): "
                        f"{str(e).splitlines()[0]}") from None
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model.to(device).eval(), cfg, classes, source, (counts / counts.sum()).astype(np.float32)
