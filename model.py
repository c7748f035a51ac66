"""The backbone (a torchvision ResNet, or a model of timm's ResNet family) with our classifier head as `fc`.

    python model.py --list [--num-classes 100]     # every supported arch with its parameter count and input size
    python model.py --list --flops                 # and its forward cost per image at its own input size
    python model.py --list --filter 'seresnext*'   # only the names that match

A torchvision ResNet keeps its own layout with the head in place of its fc; a timm model is built without its
classifier (it returns the pooled features) and sits under our head in TimmNet, whose head is `fc` as well, so the
head, freezing and checkpoints treat both alike. Each model also brings the input its weights were trained for
(normalisation, interpolation, sizes, crop ratio): resolve_data fills in what the flags leave to the model.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision import models

import timm_backbone
from checkpoint import read_state_dict
from config import Config
from errors import UserError
from utils import short_list

ARCHS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
]
TORCHVISION_STAGES = ["stem", "layer1", "layer2", "layer3", "layer4"]  # input side first
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the input of torchvision's ImageNet weights as this project has always fed it: 224 px, resize 256, bilinear
TORCHVISION_DATA = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear", train_size=224,
                        test_size=224, crop_pct=0.875, test_crop_pct=0.875)


class TimmNet(nn.Module):
    """A timm backbone that returns its pooled features (num_features wide), then our head."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.fc = head

    def forward(self, x):
        return self.fc(self.backbone(x))


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


def architecture(arch: str) -> tuple[str, str]:
    """What a weights file must have been trained as: (library, model name), a timm pretrained tag left out."""
    return ("torchvision", arch) if arch in ARCHS else ("timm", timm_backbone.split_arch(arch)[0])


def load_weights_file(model: nn.Module, path: str, arch: str, classes: Sequence[str] | None = None) -> None:
    """Load a local file into the whole model; a head of another shape or trained on other classes is
    re-initialised, and we say so. For a timm arch the file may be timm's own format (a hub file, or a timm
    model's state_dict): its classifier is left out and the rest goes into our backbone."""
    state, info = read_state_dict(path)
    if info.get("arch") and architecture(info["arch"]) != architecture(arch):
        raise UserError(f"{path} is a {info['arch']} checkpoint, not --arch {arch}: pass --arch {info['arch']} "
                        "or another weights file")
    if isinstance(model, TimmNet) and not any(k.startswith("backbone.") for k in state):
        state = timm_backbone.as_backbone_state(state, model.backbone, "backbone.")
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


def is_weights_file(weights: str) -> bool:
    return weights not in ("default", "none") and (os.path.sep in weights or os.path.exists(weights))


def timm_model(arch, num_classes, weights, head, head_dropout):
    """TimmNet: timm's backbone, pretrained when weights is 'default', under our head."""
    if weights not in ("default", "none") and not is_weights_file(weights):
        raise UserError(f"--weights {weights}: not a file; a timm --arch takes default (the weights of its "
                        f"pretrained tag, chosen in the name: --arch {timm_backbone.split_arch(arch)[0]}.TAG), "
                        "none or a FILE")
    backbone = timm_backbone.create(arch, pretrained=weights == "default")
    return TimmNet(backbone, build_head(head, backbone.num_features, num_classes, head_dropout))


def build_model(arch: str = "resnext101_32x8d", num_classes: int = 100, weights: str = "default",
                head: str = "mlp", head_dropout: Sequence[float] = (0.4, 0.3, 0.2),
                classes: Sequence[str] | None = None) -> nn.Module:
    """torchvision's arch (one of ARCHS) or timm's (any other name) with our head; weights: default (the
    library's pretrained weights), none, a torchvision enum name, or a FILE."""
    is_file = is_weights_file(weights)
    if arch in ARCHS:
        model = getattr(models, arch)(weights=None)
        if weights != "none" and not is_file:
            load_pretrained(model, arch, weights)
        model.fc = build_head(head, model.fc.in_features, num_classes, head_dropout)
    else:
        model = timm_model(arch, num_classes, "none" if is_file else weights, head, head_dropout)
    if is_file:
        if not os.path.isfile(weights):
            raise UserError(f"--weights {weights}: no such file")
        load_weights_file(model, weights, arch, classes)
    return model


def to_sync_batchnorm(model: nn.Module) -> nn.Module:
    """The model with SyncBatchNorm layers (same parameter and buffer names: checkpoints load into the plain one)."""
    if isinstance(model, TimmNet):
        return timm_backbone.sync_batchnorm(model)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def backbone_stages(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(stage, parameter names) of the backbone, input side first; the head (fc) is not a stage. A torchvision
    ResNet's: stem (conv1, bn1), layer1 .. layer4; a timm model's: as its own group_matcher groups them (one group
    for a model that has none)."""
    if isinstance(model, TimmNet):
        return [(stage, ["backbone." + n for n in names]) for stage, names in timm_backbone.stages(model.backbone)]
    by_stage = {stage: [] for stage in TORCHVISION_STAGES}
    for name, _ in model.named_parameters():
        top = name.split(".")[0]
        if top != "fc":
            by_stage[top if top in by_stage else "stem"].append(name)
    return list(by_stage.items())


# ---------------------------------------------------------------- the input a model expects

def data_defaults(arch: str) -> dict[str, Any]:
    """The input the arch's pretrained weights were trained for (see TORCHVISION_DATA for the keys)."""
    return TORCHVISION_DATA if arch in ARCHS else timm_backbone.data_defaults(arch)


def resolve_data(cfg: Config) -> Config:
    """The config with every data setting left to the model (0 or empty) filled in from its pretrained config:
    mean/std, interpolation, the train size, and the test size and crop ratio. The model's test size is used only
    when the train size is the model's own too (a run at --img-size 64 evaluates at 64, not at 320), and its test
    crop ratio only at that test size. A resolved config comes back unchanged. A timm model outside the ResNet family
    needs --any-arch; one of a fixed input size is held to it."""
    if cfg.arch not in ARCHS and not cfg.any_arch:
        timm_backbone.check_family(cfg.arch)
    own = data_defaults(cfg.arch)
    img_size = cfg.img_size or own["train_size"]
    eval_size = cfg.eval_size or (own["test_size"] if not cfg.img_size else img_size)
    at_test_size = not cfg.img_size and not cfg.eval_size
    ratio = cfg.eval_crop_ratio or (own["test_crop_pct"] if at_test_size else own["crop_pct"])
    resolved = dataclasses.replace(cfg, img_size=img_size, eval_size=eval_size, eval_crop_ratio=ratio,
                                   mean=[float(m) for m in cfg.mean or own["mean"]],
                                   std=[float(s) for s in cfg.std or own["std"]],
                                   interpolation=cfg.interpolation or own["interpolation"])
    check_input_size(resolved)
    return resolved


def check_input_size(cfg: Config) -> None:
    """A model of a fixed input size (a ViT's position embeddings are laid out for one) trains and predicts at that
    size: a one-line error for any other training, evaluation or progressive side."""
    own = data_defaults(cfg.arch)
    if not own.get("fixed_size"):
        return
    size, asked = own["train_size"], {"--img-size": cfg.img_size, "--eval-size": cfg.eval_size or cfg.img_size}
    wrong = [f"{flag} {value}" for flag, value in asked.items() if value != size]
    if wrong or cfg.progressive:
        raise UserError(f"--arch {cfg.arch} takes {size} px input only (a fixed input size), not "
                        f"{', '.join(wrong) or '--progressive'}: train and evaluate at --img-size {size} "
                        f"--eval-size {size}, without --progressive")


DATA_FIELDS = ("img_size", "eval_size", "eval_crop_ratio", "interpolation", "mean", "std")


def data_summary(cfg: Config) -> str:
    """One line: a resolved config's input settings, where the model's defaults come from, and the defaults that
    differ from them (set by flags, or following --img-size)."""
    own = resolve_data(dataclasses.replace(cfg, **{name: type(getattr(cfg, name))() for name in DATA_FIELDS}))

    def show(value):
        return " ".join(f"{v:g}" for v in value) if isinstance(value, (list, tuple)) else f"{value:g}" \
            if isinstance(value, float) else str(value)
    source = "torchvision's ImageNet recipe" if cfg.arch in ARCHS else \
        f"the pretrained config of {timm_backbone.timm_name(cfg.arch)}"
    differ = [f"--{name.replace('_', '-')} {show(getattr(own, name))}" for name in DATA_FIELDS
              if getattr(cfg, name) != getattr(own, name)]
    return (f"data: train {cfg.img_size} px, eval {cfg.eval_size or cfg.img_size} px at crop ratio "
            f"{show(cfg.eval_crop_ratio)}, {cfg.interpolation} resize, mean {show(cfg.mean)}, std {show(cfg.std)} "
            f"(model defaults from {source}{', which has ' + ', '.join(differ) if differ else ''})")


# ---------------------------------------------------------------- sizes

def param_count(arch: str, num_classes: int, head: str = "mlp") -> int:
    """Parameters of the arch with our head, counted on shapes alone (no memory, no weights)."""
    with timm_backbone.shapes_only():
        return count_params(build_model(arch, num_classes, weights="none", head=head))


def check_params(arch: str, num_classes: int, head: str, max_params: float) -> int:
    """The arch's parameter count; over max_params, a one-line error naming the nearest archs that fit."""
    n = param_count(arch, num_classes, head)
    if n <= max_params:
        return n
    name = architecture(arch)[1]
    pool = ARCHS if arch in ARCHS else sorted({c.partition(".")[0] for c in timm_backbone.family(pretrained=True)})
    close = [c for c in timm_backbone.nearest(name, [c for c in pool if c != name], n=8)
             if param_count(c, num_classes, head) <= max_params][:3]
    fits = f"nearest that fit: {', '.join(close)}" if close else "none of the nearest archs fits either"
    raise UserError(f"{arch} has {n / 1e6:.1f}M parameters with the {head} head, over --max-params "
                    f"{max_params / 1e6:.1f}M; {fits} (or --head linear; sizes: python model.py --list)")


def forward_flops(model, img_size):
    """Floating-point operations of one forward pass of one image (a multiply-add counts 2), on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        model.eval()(torch.empty(1, 3, img_size, img_size))
    return counter.get_total_flops()


def listed_archs(pattern):
    """(--arch name, size key, train size, test size) of every torchvision arch and pretrained timm weight set
    whose name matches the fnmatch pattern."""
    rows = [(arch, arch, 224, 224) for arch in ARCHS if fnmatch.fnmatch(arch, pattern)]
    for name in timm_backbone.family(pretrained=True):
        if fnmatch.fnmatch(name, pattern):
            own = timm_backbone.data_defaults(name)
            rows.append((name, name.partition(".")[0], own["train_size"], own["test_size"]))
    return rows


def list_archs(num_classes: int, head: str, max_params: float, img_size: int = 0, flops: bool = False,
               pattern: str = "*") -> None:
    flops_title = f"  GFLOPs/img at {img_size or 'its train size'}" if flops else ""
    print(f"{'arch':44s} {'params':>9s}  {'input':>7s}  fits {max_params / 1e6:.0f}M{flops_title}  "
          f"(with the {head} head, {num_classes} classes; input: train/test size)", flush=True)
    sizes = {}
    for arch, key, train_size, test_size in listed_archs(pattern):
        if key not in sizes:
            with timm_backbone.shapes_only():  # shapes only: no memory, no init time
                model = build_model(key, num_classes, weights="none", head=head)
            sizes[key] = count_params(model), model
        n, model = sizes[key]
        size = f"{train_size}" if train_size == test_size else f"{train_size}/{test_size}"
        gflops = f"  {forward_flops(model, img_size or train_size) / 1e9:8.1f}" if flops else ""
        fits = "yes" if n <= max_params else "no"
        print(f"{arch:44s} {n / 1e6:8.1f}M  {size:>7s}  {fits:9s}{gflops}".rstrip(), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Model zoo of the classifier: torchvision's ResNets and the pretrained weights of timm's ResNet "
                    "family, with their sizes.")
    parser.add_argument("--list", action="store_true",
                        help="print every supported arch with its parameter count, its input size and whether it "
                             "fits --max-params (the timm ones take a few seconds to count)")
    parser.add_argument("--num-classes", type=int, default=100, help="classes of the head (default: %(default)s)")
    parser.add_argument("--head", choices=["mlp", "linear"], default="mlp", help="head kind (default: %(default)s)")
    parser.add_argument("--max-params", type=float, default=100e6, help="budget (default: %(default)g)")
    parser.add_argument("--flops", action="store_true",
                        help="also count each arch's forward GFLOPs per image (about a second per arch)")
    parser.add_argument("--img-size", type=int, default=0,
                        help="image side for --flops; 0 = each arch's own train size (default: %(default)s)")
    parser.add_argument("--filter", default="*", metavar="PATTERN",
                        help="only the archs whose name matches this shell pattern, e.g. 'resnet50*' "
                             "(default: all)")
    args = parser.parse_args(argv)
    if not args.list:
        parser.print_help()
        return 0
    list_archs(args.num_classes, args.head, args.max_params, args.img_size, args.flops, args.filter)
    return 0


if __name__ == "__main__":
    sys.exit(main())


