"""timm's ResNet family as backbones: which names --arch takes, their pretrained weights and data configs, their
stages for layer-wise learning rates.

An --arch that is not one of torchvision's ten ResNets (or that starts with 'timm/') is a timm model name, with or
without a pretrained tag: resnet50d, resnet50d.ra2_in1k, timm/seresnextaa101d_32x8d.sw_in12k_ft_in1k_288. timm is
imported on first use (it takes a second or two), so runs of torchvision archs never pay for it.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from errors import UserError

PREFIX = "timm/"
# timm's model modules that hold ResNets and their direct variants: ResNet / ResNet-D / ResNeXt / SE- and
# ECA-ResNet(X)t / ResNet-RS / wide ResNets (resnet), BiT and other pre-activation ResNets (resnetv2), ResNeSt,
# Res2Net, SK-ResNet(X)t and the legacy SE-ResNet(X)t ports (senet). Other modules hold other designs, some with
# "resnet" in their name (cspresnet, nf_resnet, the byobnet resnets), which are left out.
FAMILY_MODULES = ("resnet", "resnetv2", "resnest", "res2net", "sknet", "senet")


def timm_module() -> Any:
    try:
        import timm
    except ImportError:
        raise UserError("timm models need the timm package: pip install -r requirements.txt") from None
    return timm


def split_arch(arch: str) -> tuple[str, str]:
    """'timm/resnet50d.ra2_in1k' -> ('resnet50d', 'ra2_in1k'); the tag is '' when none is given."""
    base, _, tag = arch.removeprefix(PREFIX).partition(".")
    return base, tag


def timm_name(arch: str) -> str:
    """The name timm.create_model takes: the --arch without the 'timm/' prefix."""
    return arch.removeprefix(PREFIX)


@functools.lru_cache(maxsize=None)
def family(pretrained: bool = False) -> tuple[str, ...]:
    """The ResNet-family model names (pretrained=True: the name.tag of every pretrained weight set)."""
    timm = timm_module()
    # one module at a time: timm before 1.0 takes a single module name
    return tuple(sorted({name for module in FAMILY_MODULES
                         for name in timm.list_models(module=module, pretrained=pretrained)}))


def nearest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The n choices whose spelling is closest to name, closest first."""
    return difflib.get_close_matches(name, list(choices), n=n, cutoff=0.0)


def check_arch(arch: str) -> None:
    """A one-line UserError for a name timm does not know or a pretrained tag it does not have. Which of timm's
    models a run may take (the ResNet family unless --any-arch) is check_family's."""
    base, tag = split_arch(arch)
    timm = timm_module()
    if not timm.is_model(base):
        raise UserError(f"--arch {arch}: {base} is neither a torchvision ResNet nor a timm model; nearest "
                        f"ResNet-family choices: {', '.join(nearest(base, family(pretrained=True)))} (all: python "
                        "model.py --list)")
    tags = [name.partition(".")[2] for name in timm.list_models(base, pretrained=True)
            if name.partition(".")[0] == base]
    if tag and tag not in tags:
        known = f"its pretrained tags: {', '.join(tags)}" if tags else "it has no pretrained weights in timm"
        raise UserError(f"--arch {arch}: {base} has no pretrained tag '{tag}' ({known})")


def check_family(arch: str) -> None:
    """The homework's rule and this tool's default: a ResNet-family model; --any-arch lifts it for one's own data."""
    check_arch(arch)  # a name timm does not know is said as such first
    base, _ = split_arch(arch)
    if base not in family():
        raise UserError(f"--arch {arch}: {base} is not a ResNet-family model (the homework's rule, and the default "
                        f"here); nearest ResNet-family choices: {', '.join(nearest(base, family(pretrained=True)))} "
                        "(all: python model.py --list); for your own data, --any-arch takes any timm image "
                        "classifier")


def pretrained_cfg(arch: str) -> Any:
    """timm's PretrainedCfg of the arch's tag (of its default tag when none is given)."""
    check_arch(arch)
    from timm.models import get_pretrained_cfg
    return get_pretrained_cfg(timm_name(arch))


def data_defaults(arch: str) -> dict[str, Any]:
    """The input the weights were trained for, from the pretrained config: normalisation, resize interpolation,
    train size, test size and the centre-crop ratios at each (test_* fall back to the train values)."""
    cfg = pretrained_cfg(arch)
    if cfg is None:  # a model registered without any config: timm's defaults for ImageNet models
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        cfg = argparse.Namespace(input_size=(3, 224, 224), test_input_size=None, mean=IMAGENET_DEFAULT_MEAN,
                                 std=IMAGENET_DEFAULT_STD, interpolation="bicubic", crop_pct=0.875, test_crop_pct=None)
    train_size = int(cfg.input_size[-1])
    return dict(mean=tuple(cfg.mean), std=tuple(cfg.std), interpolation=cfg.interpolation or "bicubic",
                train_size=train_size, test_size=int((cfg.test_input_size or cfg.input_size)[-1]),
                crop_pct=float(cfg.crop_pct), test_crop_pct=float(cfg.test_crop_pct or cfg.crop_pct),
                # a model built for one input size (a ViT's position embeddings): it runs at that size only
                fixed_size=bool(getattr(cfg, "fixed_input_size", False)))


def weights_source(arch: str) -> tuple[str, str]:
    """(what to download, where it goes) for the arch's pretrained weights, as timm fetches them."""
    cfg = pretrained_cfg(arch)
    if cfg.hf_hub_id:
        from huggingface_hub import constants
        # hf_hub_download keeps a repository in <cache>/models--<org>--<name>/ (blobs, snapshots, refs)
        folder = os.path.join(constants.HF_HUB_CACHE, "models--" + cfg.hf_hub_id.replace("/", "--"))
        return f"model.safetensors of https://huggingface.co/{cfg.hf_hub_id}", folder
    if cfg.url:
        return cfg.url, os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg.url))
    raise UserError(f"--arch {arch}: timm has no pretrained weights for it; pass --weights none or --weights FILE, "
                    "or choose a pretrained tag (python model.py --list)")


def create(arch: str, pretrained: bool = False) -> nn.Module:
    """The timm model without its classifier (num_classes=0): it returns the pooled features (num_features wide).
    Pretrained weights come the way timm loads them: the Hugging Face hub cache, downloaded on first use."""
    check_arch(arch)
    timm = timm_module()
    if not pretrained:
        return timm.create_model(timm_name(arch), pretrained=False, num_classes=0)
    what, where = weights_source(arch)
    try:
        return timm.create_model(timm_name(arch), pretrained=True, num_classes=0)
    except Exception as e:  # offline, proxy errors, a broken cache file: all one message to the user
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"could not load the timm weights of {timm_name(arch)} ({type(e).__name__}: {reason}); "
                        f"on a machine with internet run python -c \"import timm; timm.create_model("
                        f"'{timm_name(arch)}', pretrained=True)\" and copy {where} to the same place here (the "
                        f"download is the {what}), or pass --weights FILE or --weights none") from None


def as_backbone_state(state: dict[str, torch.Tensor], backbone: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A timm-format state_dict (what timm.create_model(...).state_dict() or a hub file holds) under our key prefix,
    its 1000-class classifier left out: the head is ours."""
    classifier = backbone.pretrained_cfg.get("classifier") or "fc"
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    own = backbone.state_dict()
    return {prefix + k: v for k, v in state.items()
            if k in own or not any(k == c or k.startswith(c + ".") for c in names)}


def stages(backbone: nn.Module) -> list[tuple[str, list[str]]]:
    """The backbone's parameter names by stage, input side first, as the model's own group_matcher groups them
    (coarse: the stem, then one group per stage; a final norm, as in pre-activation ResNets, is the last group)."""
    from timm.models import group_parameters
    if not hasattr(backbone, "group_matcher"):  # a model that names no stages: one group
        return [("backbone", [name for name, _ in backbone.named_parameters()])]
    groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
    return [("stem" if i == 0 else f"stage{i}", list(names)) for i, names in enumerate(groups.values())]


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm as SyncBatchNorm, timm's fused BatchNormAct2d as its SyncBatchNormAct: torch's own
    conversion would turn those into plain SyncBatchNorm and silently drop their activation."""
    from timm.layers import convert_sync_batchnorm
    return convert_sync_batchnorm(module)


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Within it, models are built on the meta device without running their weight initialisation (which on meta
    tensors is slow and computes nothing): for counting the parameters and FLOPs of many models."""
    saved = {name: getattr(nn.init, name) for name in dir(nn.init)
             if name.endswith("_") and not name.startswith("_") and callable(getattr(nn.init, name))}
    try:
        for name in saved:
            setattr(nn.init, name, _unchanged)
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _unchanged(tensor, *args, **kwargs):
    return tensor
