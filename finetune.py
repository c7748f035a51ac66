"""How a pretrained backbone is fine-tuned: learning rate per stage, which tensors decay, a frozen warm start.

The optimiser gets one parameter group per (stage, decays or not). The stages come from the model
(model.backbone_stages): a torchvision ResNet's are, from the input, the stem (conv1, bn1) and layer1 .. layer4; a
timm model's are the groups of its own group_matcher (the stem, one group per stage, and a final norm where the
model has one). Our head (fc) comes last. With --layer-decay d, the top stage trains at --lr and each stage below at
d times the one above (a torchvision stem at lr * d^4): early filters are generic and need to move least. The head
trains at lr * --head-lr-mult. Normalisation weights and biases (every 1-d tensor) get no weight decay by default:
decaying them only shrinks BatchNorm's scales towards zero and does not regularise the function.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from errors import UserError
from model import backbone_stages

if TYPE_CHECKING:
    import torch

    from config import Config


def stage_depths(model, layer_decay=1.0):
    """{parameter name: (stage, depth)}, depth counted from the top stage (0) down to the stem; --layer-decay needs
    at least two stages to decay over."""
    stages = backbone_stages(model)
    if layer_decay != 1 and len(stages) < 2:
        raise UserError(f"--layer-decay {layer_decay:g}: this model names no stages (timm gives it no "
                        "group_matcher), so there is nothing to decay over: train without --layer-decay")
    return {name: (stage, len(stages) - 1 - i) for i, (stage, names) in enumerate(stages) for name in names}


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """Parameter groups for the optimiser, each with its stage name, depth (None for the head), lr and
    weight_decay."""
    depths = stage_depths(model, cfg.layer_decay)
    groups = {}
    for name, p in model.named_parameters():
        stage, depth = depths.get(name, ("head", None))
        decays = cfg.decay_norm_bias or p.ndim > 1
        key = (stage, decays)
        if key not in groups:
            scale = cfg.head_lr_mult if depth is None else cfg.layer_decay ** depth
            groups[key] = {"params": [], "stage": stage, "depth": depth, "lr": cfg.lr * scale,
                           "weight_decay": cfg.weight_decay if decays else 0.0}
        groups[key]["params"].append(p)
    return list(groups.values())


def backbone_frozen(cfg: Config, epoch: int) -> bool:
    return epoch < cfg.freeze_epochs


def set_backbone_frozen(model: torch.nn.Module, frozen: bool) -> None:
    """Stop (or restart) training every stage but the head; frozen BatchNorm layers keep their running statistics.

    Call it after model.train(): it puts the frozen backbone's modules back into eval mode, so BatchNorm normalises
    with the pretrained statistics instead of updating them from the new data while nothing else can adapt.
    """
    for name, module in model.named_children():
        if name == "fc":
            continue
        module.train(not frozen and model.training)
        for p in module.parameters():
            p.requires_grad_(not frozen)


def reported_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the top backbone stage (--lr times the schedule): the one number the history and console
    show. Optimiser states saved before groups had a depth name that stage layer4."""
    return next(g["lr"] for g in optimizer.param_groups if g.get("depth") == 0 or g["stage"] == "layer4")
