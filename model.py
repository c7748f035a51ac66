"""A torchvision ResNet-family backbone with its fc replaced by our classifier head.

    python model.py --list [--num-classes 100]     # every supported arch with its parameter count
    python model.py --list --flops --img-size 224  # and its forward cost per image
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torchvision import models

from torch.optim.swa_utils import AveragedModel

from checkpoint import read_state_dict
from errors import UserError

ARCHS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
]


def mlp_head(in_features, num_classes, dropout=(0.4, 0.3, 0.2)):
    widths = [in_features, 2048, 1024, 1024]
    layers = []
    for i, p in enumerate(dropout):
        layers += [nn.Linear(widths[i], widths[i + 1]), nn.BatchNorm1d(widths[i + 1]), nn.ReLU(inplace=True),
                   nn.Dropout(p)]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)


def build_head(kind, in_features, num_classes, dropout=(0.4, 0.3, 0.2)):
    if kind == "mlp":
        return mlp_head(in_features, num_classes, dropout)
    if kind == "linear":
        return nn.Linear(in_features, num_classes)
    raise UserError(f"unknown head '{kind}' (choose mlp or linear)")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def torchvision_weights(arch, name):
    """The torchvision weights enum member for 'default' or an enum name like IMAGENET1K_V2."""
    enum = models.get_model_weights(arch)
    if name == "default":
        return enum.DEFAULT
    try:
        return enum[name]
    except KeyError:
        valid = ", ".join(["default", "none"] + [w.name for w in enum])
        raise UserError(f"--weights {name}: not a file and not one of {valid}") from None


def load_pretrained(backbone, arch, name):
    weights = torchvision_weights(arch, name)
    try:
        # torchvision caches downloads in $TORCH_HOME/hub/checkpoints and reads them from there afterwards
        state = weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # no network, proxy errors, a broken cache file: all one message to the user
        cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise UserError(f"could not load {arch} {weights.name} weights ({type(e).__name__}: {e}); put the file at "
                        f"{cache}, or pass --weights FILE or --weights none") from None
    backbone.load_state_dict(state)


def load_weights_file(model, path, arch, classes=None):
    """Load a local file into the whole model; a head of another shape or trained on other classes is
    re-initialised, and we say so."""
    state, info = read_state_dict(path)
    if info.get("arch") and info["arch"] != arch:
        raise UserError(f"{path} is a {info['arch']} checkpoint, not --arch {arch}: pass --arch {info['arch']} "
                        "or another weights file")
    own = model.state_dict()
    backbone_keys = [k for k in own if not k.startswith("fc.")]
    missing = [k for k in backbone_keys if k not in state]
    wrong = [k for k in backbone_keys if k in state and state[k].shape != own[k].shape]
    extra = [k for k in state if not k.startswith("fc.") and k not in own]
    if missing or wrong or extra:
        example = (missing or wrong or extra)[0]
        raise UserError(f"{path} does not fit --arch {arch}: {len(missing)} backbone tensors missing, "
                        f"{len(wrong)} of another shape, {len(extra)} unknown (e.g. {example})")
    head = {k: v for k, v in state.items() if k.startswith("fc.")}
    head_fits = head.keys() == {k for k in own if k.startswith("fc.")} and all(
        v.shape == own[k].shape for k, v in head.items())
    theirs = list(info.get("classes") or [])
    same_classes = not theirs or classes is None or theirs == list(classes)
    keep = {k: v for k, v in state.items() if k in own and (head_fits and same_classes or not k.startswith("fc."))}
    model.load_state_dict(keep, strict=False)
    if not head_fits:
        print(f"loaded the {arch} backbone from {path}; its classifier head does not fit, so the head starts fresh")
    elif not same_classes:
        print(f"loaded the {arch} backbone from {path}; its head was trained on other classes "
              f"({short_list(theirs)} vs {short_list(classes)}), so the head starts fresh")


def short_list(names: Iterable[str], n: int = 5) -> str:
    names = list(names)
    return f"{len(names)} classes: {', '.join(names[:n])}{', ...' if len(names) > n else ''}"


def build_model(arch: str = "resnext101_32x8d", num_classes: int = 100, weights: str = "default",
                head: str = "mlp", head_dropout: Sequence[float] = (0.4, 0.3, 0.2),
                classes: Sequence[str] | None = None) -> models.ResNet:
    if arch not in ARCHS:
        raise UserError(f"--arch {arch}: choose one of {', '.join(ARCHS)}")
    backbone = getattr(models, arch)(weights=None)
    is_file = weights not in ("default", "none") and (os.path.sep in weights or os.path.exists(weights))
    if weights != "none" and not is_file:
        load_pretrained(backbone, arch, weights)
    backbone.fc = build_head(head, backbone.fc.in_features, num_classes, head_dropout)
    if is_file:
        if not os.path.isfile(weights):
            raise UserError(f"--weights {weights}: no such file")
        load_weights_file(backbone, weights, arch, classes)
    return backbone


def head_parameters(model):
    return list(model.fc.parameters())


def forward_flops(model, img_size):
    """Floating-point operations of one forward pass of one image (a multiply-add counts 2), on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        model.eval()(torch.empty(1, 3, img_size, img_size))
    return counter.get_total_flops()


def list_archs(num_classes, head, max_params, img_size=0):
    flops_title = f"  GFLOPs/img at {img_size}" if img_size else ""
    print(f"{'arch':20s} {'params':>10s}  fits {max_params / 1e6:.0f}M{flops_title}  "
          f"(with the {head} head, {num_classes} classes)")
    for arch in ARCHS:
        with torch.device("meta"):  # shapes only: no memory, no init time
            model = build_model(arch, num_classes, weights="none", head=head)
        n = count_params(model)
        flops = f"  {forward_flops(model, img_size) / 1e9:8.1f}" if img_size else ""
        fits = "yes" if n <= max_params else "no"
        print(f"{arch:20s} {n / 1e6:9.1f}M  {fits:9s}{flops}".rstrip())


def main(argv=None):
    parser = argparse.ArgumentParser(description="Model zoo of the classifier: list archs and their sizes.")
    parser.add_argument("--list", action="store_true", help="print every supported arch with its parameter count")
    parser.add_argument("--num-classes", type=int, default=100, help="classes of the head (default: %(default)s)")
    parser.add_argument("--head", choices=["mlp", "linear"], default="mlp", help="head kind (default: %(default)s)")
    parser.add_argument("--max-params", type=float, default=100e6, help="budget (default: %(default)s)")
    parser.add_argument("--flops", action="store_true",
                        help="also count each arch's forward GFLOPs per image at --img-size (a few seconds)")
    parser.add_argument("--img-size", type=int, default=224, help="image side for --flops (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.list:
        parser.print_help()
        return 0
    list_archs(args.num_classes, args.head, args.max_params, args.img_size if args.flops else 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP, torch.compile or AveragedModel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, AveragedModel)):
            model = model.module
        else:
            return model
