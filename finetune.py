"""How a pretrained backbone is fine-tuned: learning rate per stage, which tensors decay, a frozen warm start.

The optimiser gets one parameter group per (stage, decays or not). A ResNet's stages, from the input: the stem
(conv1, bn1), layer1 .. layer4, then our head (fc). With --layer-decay d, layer4 trains at --lr and each stage below
at d times the one above (the stem at lr * d^4): early filters are generic and need to move least. The head trains at
lr * --head-lr-mult. Normalisation weights and biases (every 1-d tensor) get no weight decay by default: decaying
them only shrinks BatchNorm's scales towards zero and does not regularise the function.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from config import Config

BACKBONE_STAGES = ["layer4", "layer3", "layer2", "layer1", "stem"]  # top first: layer4 gets decay^0


def stage_of(name):
    top = name.split(".")[0]
    if top == "fc":
        return "head"
    return top if top in BACKBONE_STAGES else "stem"


def stage_lr_scales(cfg):
    """{stage: learning-rate multiplier} for every stage of the model."""
    scales = {stage: cfg.layer_decay ** depth for depth, stage in enumerate(BACKBONE_STAGES)}
    scales["head"] = cfg.head_lr_mult
    return scales


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """Parameter groups for the optimiser, each with its stage name, lr and weight_decay."""
    scales = stage_lr_scales(cfg)
    groups = {}
    for name, p in model.named_parameters():
        stage = stage_of(name)
        decays = cfg.decay_norm_bias or p.ndim > 1
        key = (stage, decays)
        if key not in groups:
            groups[key] = {"params": [], "stage": stage, "lr": cfg.lr * scales[stage],
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
    """The learning rate of layer4 (--lr times the schedule): the one number the history and console show."""
    return next(g["lr"] for g in optimizer.param_groups if g["stage"] == "layer4")
