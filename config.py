"""The one training config: every default is the seed recipe's number.

train.py builds its command line from these fields, checkpoints store them as a plain dict, and the other tools
(inference, ablation) read them back. A field's metadata carries its --help text, choices and group.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from errors import UserError


def opt(default, help, **options):
    """A Config field with its --help text; options: choices, group (default "training"), flag (the option
    string, default --field-name), nargs, type."""
    meta = dict(dict(choices=None, group="training", flag=None, nargs=None, type=None), help=help, **options)
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def from_zero(n, more=""):
    """How every epoch-counted flag says it counts: from 0, as the loop does, while the console prints "epoch 1/100"
    for epoch 0."""
    return f"counted from 0 ({n} = the console's epoch {n + 1}{more})"


@dataclass
class Config:
    # data and output
    data_dir: str = opt("data", "dataset root holding train/<class>/ and val/<class>/", group="data")
    output_dir: str = opt("checkpoints", "where run folders are written", group="data")
    run_name: str = opt("", "run folder name under --output-dir (default: <arch>-<date>-<time>)", group="data")
    workers: int = opt(-1, "data loader worker processes (-1: on the CPU, 0 on machines with <= 2 cores, where a "
                           "worker process takes the core the training step needs, else one per core but the main "
                           "process's; on a GPU, one per core shared among the GPU processes of the machine, at least "
                           "one each; at most 16)", group="data")
    cache: str = opt("", "folder for a pre-resized copy of the images (short side 9/7 of --img-size, JPEG q95), "
                         "written on first use and rebuilt for files that change; empty = decode the originals",
                     group="data")
    max_bad_frac: float = opt(0.01, "every train/val image is decoded once before training: unreadable ones are "
                                    "named and left out, and more than this fraction of them stops the run",
                              group="data")
    tensorboard: bool = opt(False, "also log scalars, the confusion matrix and augmented images to <run>/tensorboard "
                                   "(needs the tensorboard package)", group="data")
    val_fraction: float = opt(0.0, "without a val/ folder: hold out this share of each class of train/ as validation "
                                   "(stratified, drawn from --seed, at least one image per class; written to "
                                   "<run>/val_split.csv and reused on resume); an error when DATA/val/ exists; 0 = use "
                                   "DATA/val/", group="data")

    # checkpoints
    save_every_steps: int = opt(0, "also write last.pt every N optimiser steps, mid-epoch (0: at epoch ends only)",
                                group="checkpoints")
    keep_epochs: int = opt(0, "keep the resumable checkpoints of the last N epochs as epoch-NNN.pt besides last.pt "
                              "(0: only last.pt)", group="checkpoints")
    save_share: float = opt(0.1, "the largest share of the run's time that writing last.pt and the plots after an "
                                 "epoch may take: when epochs are short beside that write (small data), they are "
                                 "written every few epochs instead, and always after the last epoch and at a stop "
                                 "(1: after every epoch; best.pt is always written at once)", group="checkpoints")

    # model
    arch: str = opt("resnext101_32x8d", "backbone: a torchvision ResNet (resnet18, resnet34, resnet50, resnet101, "
                                        "resnet152, resnext50_32x4d, resnext101_32x8d, resnext101_64x4d, "
                                        "wide_resnet50_2, wide_resnet101_2), or any model of timm's ResNet family, "
                                        "with or without its pretrained tag (seresnextaa101d_32x8d.sw_in12k_ft_in1k_288, "
                                        "resnet50d; timm/NAME for a name torchvision also has); sizes and tags: "
                                        "python model.py --list",
                    group="model")
    any_arch: bool = opt(False, "let --arch take any timm image classifier (EfficientNet, RegNet, ConvNeXt, ViT, "
                                "...), for your own data: the ResNet family is the homework's rule and the default "
                                "here; --max-params still applies (100M unless given); a model of a fixed input "
                                "size trains and predicts at that size", group="model")
    weights: str = opt("default", "'default' (the pretrained weights: torchvision's ImageNet ones, cached in the "
                                  "torch hub folder, or those of the timm tag, cached by the Hugging Face hub), a "
                                  "torchvision enum name such as IMAGENET1K_V1, 'none' (from scratch), or a local "
                                  "FILE (a torchvision or timm state_dict, .pth/.bin/.safetensors, or one of our "
                                  "checkpoints)", group="model")
    head: str = opt("mlp", "classifier head: 4-layer MLP with BatchNorm and dropout, or one Linear layer",
                    choices=["mlp", "linear"], group="model")
    head_dropout: list = opt([0.4, 0.3, 0.2], "dropout of the three hidden MLP layers", group="model",
                             nargs=3, type=float)
    max_params: float = opt(100e6, "refuse a model with more parameters than this (the HW1 rule is 100M)",
                            group="model", type=float)

    # schedule and optimiser
    epochs: int = opt(100, "training epochs")
    batch_size: int = opt(64, "images per optimiser step, per process (under torchrun the global batch is N "
                                   "processes x this)")
    lr: float = opt(5e-5, "AdamW peak learning rate")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    head_lr_mult: float = opt(1.0, "learning-rate multiplier for the classifier head")
    layer_decay: float = opt(1.0, "learning-rate decay per backbone stage, from the top stage (x1) down to the stem "
                                  "(x decay^4 for a torchvision ResNet; a timm model's stages are those its "
                                  "group_matcher names); 1 = one learning rate for the whole backbone")
    freeze_epochs: int = opt(0, "train only the head (backbone frozen, its BatchNorm in eval mode) before this "
                                "epoch, then unfreeze; " + from_zero(2, ", the first to train the backbone"))
    decay_norm_bias: bool = opt(False, "also apply weight decay to normalisation weights and biases, as the seed "
                                       "did (by default they are excluded)")
    min_lr: float = opt(1e-5, "cosine annealing floor (eta_min) of --lr; each parameter group's floor is scaled "
                              "like its LR (min-lr x group LR / --lr)")
    warmup_epochs: float = opt(0.0, "linear warmup length in epochs (fractions allowed)", type=float)
    t_max: float = opt(0.0, "cosine period in epochs; 0 = the whole run (the seed used 50 in a 100-epoch run)",
                       type=float)
    seed: int = opt(42, "seed for python, numpy, torch and loader workers")
    device: str = opt("auto", "where to train: auto = cuda when available, else cpu",
                      choices=["auto", "cpu", "cuda"])
    amp: str = opt("auto", "autocast precision: auto = bf16 where the device computes it natively (a GPU of compute "
                           "capability 8.0 or higher: A100, H100, RTX 30xx and later; a CPU with AVX512-BF16, AMX or "
                           "Arm BF16), else fp16 with loss scaling on CUDA (T4, V100, RTX 20xx) and float32 on the "
                           "CPU (emulated bf16 is far slower); bf16 = bf16 (even where emulated, with a warning); "
                           "fp16 = fp16 on CUDA, float32 on the CPU; off = float32",
                   choices=["auto", "bf16", "fp16", "off"])
    lr_scale: str = opt("none", "under torchrun: multiply --lr and --min-lr by the number of processes (linear; the "
                                "global batch over --batch-size) or by its square root (sqrt); none = the LR as given",
                        choices=["none", "linear", "sqrt"])
    sync_bn: bool = opt(False, "under torchrun on GPUs: BatchNorm normalises with the statistics of the global batch "
                               "(SyncBatchNorm) instead of each process's own; PyTorch's SyncBatchNorm needs CUDA, "
                               "so this stops with an error on the CPU")
    accum_steps: int = opt(1, "split each --batch-size step into N micro-batches whose gradients add up (same "
                              "effective batch for a smaller GPU; BatchNorm then sees micro-batches)")
    clip_grad: float = opt(0.0, "clip the gradient to this total L2 norm, once per optimiser step (after every "
                                "micro-batch of --accum-steps, after unscaling under fp16, on the gradient averaged "
                                "over torchrun processes); 0 = no clipping")

    # when to stop before --epochs; neither shortens the cosine schedule, which still spans --epochs
    patience: int = opt(0, "stop when the val accuracy (the better of raw and EMA weights) has not risen by more "
                           "than --min-delta for N epochs in a row, keeping best.pt and a resumable last.pt; the "
                           "cosine schedule still spans --epochs (the LR has not reached --min-lr when it stops); "
                           "0 = train all --epochs", group="stopping")
    min_delta: float = opt(0.0, "with --patience: the smallest rise of the val accuracy that counts as better (0.002 "
                                "= 0.2 points)", group="stopping")
    val_every: int = opt(1, "validate after every Nth epoch only (and always after the last one and the one a stop "
                            "ends on): for data whose val pass costs much beside an epoch of training; best.pt, "
                            "--patience and the pruning of tune.py then see those epochs only, and history.csv "
                            "leaves the others' val columns empty", group="stopping")
    time_limit: str = opt("", "stop at the last optimiser step that ends before this much wall time since the start "
                              "(90m, 2h, 1h30m, 3600s; a bare number is seconds), save a resumable last.pt, print the "
                              "resume command and exit with code 124 as timeout(1) does; the cosine schedule still "
                              "spans --epochs, so a resumed run carries on along it", group="stopping")
    budget: str = opt("", "plan the run to end within this wall time of the whole process (90m, 2h, 1h30m, 3600s): it "
                          "times the first steps at each training side, a val pass and a save, then trains the most "
                          "epochs whose schedule ends inside 95%% of it, --epochs being the cap; the epoch-counted "
                          "settings (--warmup-epochs, --t-max, --freeze-epochs, --ema-start-epoch, --focal-start, "
                          "--focal-full, --mix-off-epoch) are shares of --epochs, scaled to the planned count; from "
                          "the third epoch to the middle of the schedule it checks the plan against the median time "
                          "of the last 5 epochs (not the first, which pays one-off start-up costs, nor frozen ones) "
                          "and lays it out again when the planned end falls outside 90-97%% of the budget (headroom "
                          "for the unchecked second half); a resumed run keeps its plan whatever --budget it is "
                          "given; with --all-folds it is the whole command's, each fold taking an even share of what "
                          "is left; --time-limit stays a hard stop", group="stopping")

    # speed (each on by default where the hardware has it)
    channels_last: bool = opt(True, "channels_last memory format for the model and its input batches",
                              group="speed")
    cudnn_benchmark: bool = opt(True, "CUDA: let cuDNN time its convolution algorithms and keep the fastest",
                                group="speed")
    tf32: bool = opt(True, "CUDA: TensorFloat-32 matmuls and convolutions where autocast leaves float32",
                     group="speed")
    compile: bool = opt(False, "torch.compile the model (minutes of compilation, then faster steps)",
                        group="speed")

    # loss
    loss: str = opt("schedule", "ce: label-smoothed cross-entropy; focal: per-sample focal loss; "
                                "smooth-focal: fixed CE/focal blend; schedule: CE, then a blend, then focal",
                    choices=["ce", "focal", "smooth-focal", "schedule"], group="loss")
    label_smoothing: float = opt(0.05, "label smoothing of the targets", group="loss")
    focal_gamma: float = opt(1.5, "focal loss gamma (0 gives plain cross-entropy)", group="loss")
    focal_blend: float = opt(0.5, "focal share of the smooth-focal loss", group="loss")
    focal_start: int = opt(14, "schedule: first epoch of the CE-to-focal blend (s1), " + from_zero(14),
                           group="loss")
    focal_full: int = opt(17, "schedule: first epoch of pure focal loss (s2), " + from_zero(17), group="loss")
    class_weights: str = opt("none", "per-class loss weights: balanced = n/(C*n_c); "
                                     "effective = effective number of samples, Cui et al. 2019",
                             choices=["none", "balanced", "effective"], group="loss")
    class_weights_beta: float = opt(0.999, "beta of the effective-number weights", group="loss")
    class_weights_from: str = opt("focal", "apply class weights to the focal part only (as the seed; with "
                                           "--loss ce, which has no focal part, to the cross-entropy) or from the "
                                           "first epoch to every loss", choices=["focal", "start"], group="loss")
    teacher: list = opt([], "distil from these checkpoints of your own (a folder: every best.pt below it, e.g. the "
                            "fold models of --all-folds): the student also learns their averaged softened "
                            "predictions on the very batch it sees, each teacher at its own input size and "
                            "normalisation; they must know the student's classes (docs/distillation.md)",
                        group="loss", nargs="+", type=str)
    distill_weight: float = opt(0.5, "with --teacher: the share of the distillation loss (KL to the teachers) in the "
                                     "blend with the label loss", group="loss")
    distill_temperature: float = opt(4.0, "with --teacher: the softmax temperature of teachers and student in the "
                                          "distillation loss", group="loss")

    # cross-validation
    folds: int = opt(0, "K-fold cross-validation: pool train/ and val/ (or train/ alone, without a val/ folder), "
                        "split them stratified into K folds (from --seed) and train on K-1 of them; 0 = the given "
                        "train/val split", group="cross-validation")
    fold: int = opt(0, "which fold is held out for validation (0 .. K-1)", group="cross-validation")
    fold_split: str = opt("", "a folds.csv whose fold assignment this run uses instead of drawing one from the file "
                              "list and --seed (images it does not hold train in every fold; --all-folds gives fold "
                              "0's to the others, and a resumed run always takes its own)", group="cross-validation")
    all_folds: bool = opt(False, "train every fold in turn into <run>/fold<i>/ and report out-of-fold accuracy",
                          group="cross-validation")

    # EMA
    ema: bool = opt(True, "keep an exponential moving average of the weights (updated every optimiser step)",
                    group="ema")
    ema_decay: float = opt(0.999, "EMA decay (warmed up as min(decay, (1+t)/(10+t)))", group="ema")
    ema_start_epoch: int = opt(0, "first epoch whose EMA weights are validated and may become best, " + from_zero(5),
                               group="ema")

    # augmentation (train); evaluation is resize + centre crop
    img_size: int = opt(0, "train crop size; evaluation sizes follow it; 0 = the model's own (224 for a torchvision "
                           "arch, a timm model's pretrained input size, e.g. 288 for ..._288)", group="augmentation")
    progressive: float = opt(0.0, "progressive resizing: train the first epoch at this share of --img-size (e.g. 0.5: "
                                  "half the side), growing in multiples of 32 to --img-size, which the last "
                                  "--progressive-full of the epochs train at; evaluation and best.pt at the run's own "
                                  "sizes; 0 = off. It pays where the training step, not the loader, sets the pace "
                                  "(docs/performance.md)",
                             group="augmentation")
    progressive_full: float = opt(0.2, "with --progressive: the share of the epochs, at the end, trained at the full "
                                       "--img-size (the last epoch at least)", group="augmentation")
    eval_size: int = opt(0, "evaluation centre-crop size; 0 = the model's own test size when --img-size is the "
                            "model's own too (e.g. 320 for seresnextaa101d_32x8d.sw_in12k_ft_in1k_288), else "
                            "--img-size", group="augmentation")
    eval_crop_ratio: float = opt(0.0, "evaluation: centre crop = resize * ratio; 0 = the model's own (224/256 = "
                                      "0.875 for a torchvision arch; a timm model's crop_pct, or its test_crop_pct "
                                      "at its test size)", group="augmentation")
    interpolation: str = opt("", "resize interpolation of the crops and the evaluation resize; empty = the model's "
                                 "own (bilinear for a torchvision arch, a timm model's pretrained config's)",
                             choices=["bilinear", "bicubic"], group="augmentation")
    mean: list = opt([], "input normalisation mean, R G B in 0..1; empty = the model's own (ImageNet's for a "
                         "torchvision arch, a timm model's pretrained config's)", group="augmentation", nargs=3,
                     type=float)
    std: list = opt([], "input normalisation standard deviation, R G B; empty = the model's own",
                    group="augmentation", nargs=3, type=float)
    aug: str = opt("seed", "train augmentation: seed = the hand-tuned list below; policy = random resized crop, "
                           "flip and the --auto-augment policy (an --auto-augment policy alone implies it); light = "
                           "random resized crop and flip only",
                   choices=["seed", "policy", "light"], group="augmentation")
    auto_augment: str = opt("none", "policy of --aug policy, which it implies: ta_wide = TrivialAugmentWide, rand-m9 "
                                    "= RandAugment (2 ops, magnitude 9), augmix = AugMix, imagenet = AutoAugment's "
                                    "ImageNet policy",
                            choices=["none", "ta_wide", "rand-m9", "augmix", "imagenet"], group="augmentation")
    rrc_scale: list = opt([0.08, 1.0], "RandomResizedCrop area range", group="augmentation", nargs=2, type=float)
    affine_degrees: float = opt(30.0, "RandomAffine rotation range in degrees", group="augmentation")
    affine_translate: float = opt(0.15, "RandomAffine translation fraction", group="augmentation")
    affine_scale: list = opt([0.7, 1.2], "RandomAffine scale range", group="augmentation", nargs=2, type=float)
    hflip: float = opt(0.5, "horizontal flip probability", group="augmentation")
    jitter: list = opt([0.25, 0.25, 0.25, 0.125], "ColorJitter brightness, contrast, saturation, hue",
                       group="augmentation", nargs=4, type=float)
    grayscale: float = opt(0.1, "RandomGrayscale probability", group="augmentation")
    blur: float = opt(0.3, "GaussianBlur probability", group="augmentation")
    blur_sigma: list = opt([0.1, 1.0], "GaussianBlur sigma range", group="augmentation", nargs=2, type=float)
    blur_kernel: int = opt(5, "GaussianBlur kernel size (odd)", group="augmentation")
    erasing: float = opt(0.2, "RandomErasing probability", group="augmentation")
    augment_on: str = opt("auto", "where colour jitter, grayscale and blur run: batch = per batch on the training "
                                  "device, with per-image draws; loader = per image in the loader workers (with OpenCV, "
                                  "on the uint8 pixels); auto = the faster of the two for the "
                                  "device: batch when training on CUDA, loader on the CPU",
                          choices=["auto", "batch", "loader"], group="augmentation")

    # mixing images of a batch (after random erasing); targets become class distributions
    mixup: float = opt(0.0, "MixUp alpha (0 = off; 0.2-0.8 is usual)", group="mixing")
    cutmix: float = opt(0.0, "CutMix alpha (0 = off; 1.0 is usual)", group="mixing")
    mix_prob: float = opt(1.0, "probability that a batch is mixed", group="mixing")
    mix_switch_prob: float = opt(0.5, "with both --mixup and --cutmix: probability of CutMix for a mixed batch",
                                 group="mixing")
    mix_off_epoch: int = opt(0, "no mixing from this epoch on, " + from_zero(90) + ", so the last epochs see clean "
                                "images; 0 = mix in every epoch", group="mixing")


GROUPS = ["data", "checkpoints", "model", "training", "stopping", "speed", "loss", "cross-validation", "ema",
          "augmentation", "mixing"]


def add_config_args(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """One flag per Config field: --field-name, defaults and help from the dataclass.

    Returns the argument groups by name, so that a script can put its own flags beside the config's."""
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for f in dataclasses.fields(Config):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        kwargs = dict(dest=f.name, default=default, help=meta["help"] + default_suffix(default))
        if f.type in (bool, "bool") or isinstance(default, bool):  # "bool": annotations are strings here
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = meta["type"] or type(default)
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
            if meta["nargs"]:
                kwargs["nargs"] = meta["nargs"]
                kwargs["metavar"] = "N" if kwargs["type"] in (int, float) else "PATH"
        groups[meta["group"]].add_argument(flag, **kwargs)
    return groups


def shown_value(value: Any) -> str:
    """A default as a user would type it: 1e+08 rather than 100000000.0, "0.4 0.3 0.2" rather than a list."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return " ".join(shown_value(v) for v in value)
    return str(value)


def default_suffix(value: Any) -> str:
    """The "(default: ...)" that --help adds to a config flag's text; none for an empty default, whose meaning the
    text itself says (e.g. "empty = decode the originals")."""
    empty = value is None or (isinstance(value, (str, list, tuple)) and len(value) == 0)
    return "" if empty else f" (default: {shown_value(value)})"


def config_from_args(args: argparse.Namespace) -> Config:
    names = {f.name for f in dataclasses.fields(Config)}
    return with_implied(Config(**{k: v for k, v in vars(args).items() if k in names}))


# the settings counted in epochs: a run of another length (a search's trial, a --budget plan) takes each at the same
# share of its own epochs
EPOCH_SETTINGS = ("warmup_epochs", "t_max", "freeze_epochs", "ema_start_epoch", "focal_start", "focal_full",
                  "mix_off_epoch")


def scaled_epoch_setting(name: str, value: float, scale: float, epochs: int) -> float:
    """An epoch-counted setting at `scale` times its length, for a run of `epochs` epochs: whole numbers rounded, a
    phase that starts inside the longer run (EMA, focal, no mixing, the end of the freeze) starts inside the shorter
    one too, and --mix-off-epoch stays at least 1 (0 means never off)."""
    if not value:  # off (0) stays off
        return value
    if not isinstance(getattr(Config(), name), int):
        return value * scale
    scaled = round(value * scale)
    if value * scale < epochs:
        scaled = min(scaled, epochs - 1)
    return max(scaled, 1 if name == "mix_off_epoch" else 0)


def with_epochs(cfg: Config, epochs: int) -> Config:
    """The config for a run of `epochs` epochs, its epoch-counted settings at the same share of it as of cfg's."""
    scale = epochs / cfg.epochs
    return dataclasses.replace(cfg, epochs=epochs, **{name: scaled_epoch_setting(name, getattr(cfg, name), scale,
                                                                                  epochs) for name in EPOCH_SETTINGS})


def with_implied(cfg: Config) -> Config:
    """The settings one flag implies: a policy replaces the hand-tuned list, so --auto-augment ta_wide alone means
    --aug policy (the seed list being the default, --aug seed beside a policy cannot be told from no --aug)."""
    if cfg.auto_augment != "none" and cfg.aug == "seed":
        return dataclasses.replace(cfg, aug="policy")
    return cfg


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from a checkpoint's plain dict; fields added later keep their defaults."""
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------- --config FILE

# keys of a run's config.json that are not settings: what train.py wrote beside them, read back as they were
CONFIG_JSON_EXTRAS = {"classes", "processes"}


def read_config_file(path: str) -> dict[str, Any]:
    """The settings of a JSON or YAML file ({field or flag name: value}); a run's config.json works as it is."""
    if not os.path.isfile(path):
        raise UserError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.lower().endswith(".json"):
            values = json.loads(text)
        else:
            import yaml  # YAML reads JSON too; imported here: only --config needs it
            values = yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError: the parser's own first line says where
        raise UserError(f"--config {path}: cannot read it ({str(e).splitlines()[0]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected settings as key: value pairs, found a {type(values).__name__}")
    return {str(k).replace("-", "_"): v for k, v in values.items() if str(k) not in CONFIG_JSON_EXTRAS}


def config_file_args(values: dict[str, Any], path: str) -> list[str]:
    """The command-line arguments that give a config file's settings ({field: value}), so that the parser checks
    them as it checks typed flags and flags typed after them win."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"--config {path}: unknown setting(s) {', '.join(unknown)} (the keys are train.py's flags "
                        "without the leading --, e.g. batch_size or batch-size)")
    return [arg for name, value in values.items() for arg in setting_args(fields[name], value, path)]


def setting_args(f, value, path):
    """One file setting as command-line arguments: ['--lr=0.001'], ['--no-ema'], ['--rrc-scale', '0.5', '1']; a
    value of the wrong kind is a one-line error naming the file and the key."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()

    def wrong(expected):
        return UserError(f"--config {path}: {f.name} must be {expected} (it is {value!r})")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise wrong("true or false")
        return [flag(f.name) if value else "--no-" + flag(f.name)[2:]]
    if isinstance(default, list):
        count = f.metadata["nargs"] or len(default)
        if isinstance(value, list) and not value and not default:
            return []  # empty, as the default: the model's own (--mean, --std)
        if not isinstance(value, list) or len(value) != count:
            raise wrong(f"a list of {count} numbers")
        return [flag(f.name), *[file_value(0.0, v, wrong) for v in value]]
    text = file_value(default, value, wrong)
    if f.metadata["choices"] and text not in f.metadata["choices"]:
        raise wrong("one of " + ", ".join(f.metadata["choices"]))
    return [f"{flag(f.name)}={text}"]  # --x=VALUE: a value that starts with '-' is not taken for a flag


def file_value(default, value, wrong):
    """A file value as the text a user would type for a setting of the default's type."""
    if isinstance(default, str):
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans: --amp off
            return "on" if value else "off"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise wrong("a text")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise wrong("a number")
    try:
        number = int(value) if isinstance(default, int) else float(value)  # YAML reads 1e-3 as a string
    except ValueError:
        raise wrong("a whole number" if isinstance(default, int) else "a number") from None
    if isinstance(default, int) and number != value and str(number) != str(value).strip():
        raise wrong("a whole number")
    return repr(number)


# ---------------------------------------------------------------- settings that contradict or do nothing

def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_ranges(cfg: Config) -> None:
    """One-line errors for values no run can use (a probability above 1, a crop larger than its resize, ...)."""
    def need(ok, message):
        if not ok:
            raise UserError(message)
    for name in ("epochs", "batch_size", "accum_steps"):
        need(getattr(cfg, name) >= 1, f"{flag(name)} must be at least 1 (it is {getattr(cfg, name)})")
    need(cfg.img_size >= 0, f"--img-size must be at least 1, or 0 for the model's own (it is {cfg.img_size})")
    need(not cfg.std or min(cfg.std) > 0, "--std takes three standard deviations above 0")
    for name in ("lr", "ema_decay", "class_weights_beta", "distill_temperature"):
        need(getattr(cfg, name) > 0, f"{flag(name)} must be above 0 (it is {getattr(cfg, name):g})")
    for name in ("hflip", "grayscale", "blur", "erasing", "mix_prob", "mix_switch_prob", "label_smoothing",
                 "focal_blend", "ema_decay", "max_bad_frac", "distill_weight"):
        need(0 <= getattr(cfg, name) <= 1, f"{flag(name)} must lie in [0, 1] (it is {getattr(cfg, name):g})")
    need(0 <= cfg.eval_crop_ratio <= 1, f"--eval-crop-ratio {cfg.eval_crop_ratio:g} must lie in (0, 1], or be 0 for "
                                        "the model's own: it is crop / resize, e.g. 224/256 = 0.875 (a ratio above 1 "
                                        "would crop outside the image)")
    need(0 < cfg.rrc_scale[0] <= cfg.rrc_scale[1] <= 1, f"--rrc-scale {cfg.rrc_scale[0]:g} {cfg.rrc_scale[1]:g}: "
                                                        "need 0 < low <= high <= 1 (shares of the image area)")
    need(cfg.blur_kernel >= 1 and cfg.blur_kernel % 2 == 1, f"--blur-kernel {cfg.blur_kernel} must be odd and >= 1")
    for name in ("affine_scale", "blur_sigma"):
        low, high = getattr(cfg, name)
        need(0 < low <= high, f"{flag(name)} {low:g} {high:g}: need 0 < low <= high")
    need(min(cfg.jitter) >= 0 and cfg.jitter[3] <= 0.5, "--jitter takes four amounts >= 0 (brightness, contrast, "
                                                        "saturation, hue), the hue one at most 0.5")
    need(0 <= cfg.affine_translate <= 1 and cfg.affine_degrees >= 0,
         "--affine-translate must lie in [0, 1] and --affine-degrees be >= 0")
    need(min(cfg.eval_size, cfg.min_lr, cfg.weight_decay, cfg.warmup_epochs, cfg.t_max, cfg.freeze_epochs,
             cfg.save_every_steps, cfg.keep_epochs, cfg.mixup, cfg.cutmix) >= 0,
         "--eval-size, --min-lr, --weight-decay, --warmup-epochs, --t-max, --freeze-epochs, --save-every-steps, "
         "--keep-epochs, --mixup and --cutmix cannot be negative")
    need(cfg.min_lr <= cfg.lr, f"--min-lr {cfg.min_lr:g} is above --lr {cfg.lr:g}: the cosine would rise")
    need(0 < cfg.save_share <= 1, f"--save-share {cfg.save_share:g}: give a share in (0, 1]")
    need(0 <= cfg.progressive < 1 and 0 <= cfg.progressive_full <= 1,
         f"--progressive {cfg.progressive:g} must lie in [0, 1) (a share of --img-size; 0 = off) and "
         f"--progressive-full {cfg.progressive_full:g} in [0, 1] (a share of the epochs)")
    need(min(cfg.clip_grad, cfg.patience) >= 0, "--clip-grad and --patience cannot be negative")
    need(cfg.val_every >= 1, f"--val-every {cfg.val_every}: give a number of epochs >= 1")
    need(0 <= cfg.val_fraction < 1 and 0 <= cfg.min_delta < 1,
         "--val-fraction and --min-delta must lie in [0, 1) (a share of train/, a rise of the val accuracy)")
    time_limit_seconds(cfg.time_limit)  # a one-line error for a duration it cannot read
    time_limit_seconds(cfg.budget, "--budget")


DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([hms]?)")


def time_limit_seconds(text: str, flag: str = "--time-limit") -> float:
    """A duration flag (--time-limit, --budget) in seconds (0: none): 90m, 2h, 1h30m, 3600s, 1.5h; a bare number is
    seconds."""
    compact = text.replace(" ", "").lower()
    if not compact:
        return 0.0
    parts = DURATION.findall(compact)
    seconds = sum(float(number) * {"h": 3600, "m": 60, "s": 1, "": 1}[unit] for number, unit in parts)
    if "".join(a + b for a, b in parts) != compact or seconds <= 0:
        raise UserError(f"{flag} {text!r}: give a duration such as 90m, 2h, 1h30m or 3600s")
    return seconds


def check_schedule(cfg):
    """One-line errors for settings that contradict each other or the length of the run."""
    if cfg.val_fraction and cfg.folds:
        raise UserError(f"--val-fraction {cfg.val_fraction:g} and --folds {cfg.folds} both choose the validation "
                        "images: --folds holds out a fold of train/ (and val/), so drop --val-fraction")
    if cfg.time_limit and cfg.all_folds:
        raise UserError("--time-limit stops one run, and --all-folds trains several one after the other: train "
                        "each fold as its own run (--folds K --fold i) with its own --time-limit")
    if cfg.loss == "schedule" and cfg.focal_full < cfg.focal_start:
        raise UserError(f"--focal-full {cfg.focal_full} is before --focal-start {cfg.focal_start}")
    focal_reached = cfg.loss in ("focal", "smooth-focal") or (cfg.loss == "schedule" and cfg.focal_start < cfg.epochs)
    if cfg.class_weights != "none" and cfg.class_weights_from == "focal" and cfg.loss == "schedule" \
            and not focal_reached:
        raise UserError(f"--class-weights {cfg.class_weights} applies to the focal part only, and this run ends "
                        f"(--epochs {cfg.epochs}) before the focal phase (--focal-start {cfg.focal_start}): add "
                        "--class-weights-from start, or lower --focal-start")


def schedule_notes(cfg):
    """What the run's length makes of the epoch-counted settings, when it is not what they usually do."""
    notes = []
    if cfg.freeze_epochs >= cfg.epochs:
        notes.append(f"--freeze-epochs {cfg.freeze_epochs} >= --epochs {cfg.epochs}: the backbone stays frozen for "
                     "the whole run (only the head trains)")
    if cfg.warmup_epochs >= cfg.epochs:
        notes.append(f"--warmup-epochs {cfg.warmup_epochs:g} >= --epochs {cfg.epochs}: the run ends before the LR "
                     "reaches --lr")
    if cfg.ema and cfg.ema_start_epoch >= cfg.epochs:
        notes.append(f"--ema-start-epoch {cfg.ema_start_epoch} >= --epochs {cfg.epochs}: the EMA weights are never "
                     "validated, so they cannot become best.pt's")
    if cfg.loss == "schedule" and cfg.focal_start >= cfg.epochs:
        notes.append(f"--loss schedule: the focal phase would start at epoch {cfg.focal_start + 1} (--focal-start "
                     f"{cfg.focal_start}, counted from 0) and this run has {cfg.epochs} epochs, so it trains with "
                     "cross-entropy only")
    if cfg.class_weights != "none" and cfg.loss == "ce" and cfg.class_weights_from == "focal":
        notes.append(f"--class-weights {cfg.class_weights} weight the cross-entropy: --loss ce has no focal part")
    return notes


def unused_settings(cfg):
    """(flag, why) for each setting changed from its default that this run never uses."""
    mixing, seed_list = cfg.mixup > 0 or cfg.cutmix > 0, cfg.aug == "seed"
    rules = [
        ("class_weights_beta", cfg.class_weights != "effective", "only --class-weights effective uses it"),
        ("class_weights_from", cfg.class_weights == "none", "there are no --class-weights"),
        ("ema_decay", not cfg.ema, "--no-ema"), ("ema_start_epoch", not cfg.ema, "--no-ema"),
        ("mix_prob", not mixing, "no --mixup or --cutmix"), ("mix_off_epoch", not mixing, "no --mixup or --cutmix"),
        ("mix_switch_prob", not (cfg.mixup > 0 and cfg.cutmix > 0), "it needs both --mixup and --cutmix"),
        ("focal_gamma", cfg.loss == "ce", "--loss ce has no focal part"),
        ("focal_blend", cfg.loss != "smooth-focal", "only --loss smooth-focal uses it"),
        ("focal_start", cfg.loss != "schedule", "only --loss schedule uses it"),
        ("focal_full", cfg.loss != "schedule", "only --loss schedule uses it"),
        ("head_dropout", cfg.head == "linear", "--head linear has no dropout"),
        ("fold", not cfg.folds, "there is no --folds K"),
        ("min_delta", not cfg.patience, "there is no --patience N"),
        ("progressive_full", not cfg.progressive, "there is no --progressive F"),
        ("distill_weight", not cfg.teacher, "there is no --teacher"),
        ("distill_temperature", not cfg.teacher, "there is no --teacher"),
        ("mix_off_epoch", cfg.mix_off_epoch >= cfg.epochs, f"it is not before --epochs {cfg.epochs}"),
    ]
    rules += [(name, not seed_list, f"only --aug seed uses it (--aug {cfg.aug})")
              for name in ("affine_degrees", "affine_translate", "affine_scale", "jitter", "grayscale", "blur",
                           "blur_sigma", "blur_kernel", "augment_on")]
    defaults, said = Config(), {}
    for name, unused, why in rules:
        if unused and getattr(cfg, name) != getattr(defaults, name):
            said.setdefault(flag(name), why)
    return list(said.items())


def check_config(cfg: Config) -> list[str]:
    """Raise a UserError for a setting that cannot work; return warnings for settings that change nothing or act
    otherwise than usual in this run (an ablation grid may set them for its other levels, so they are said, not
    refused)."""
    check_ranges(cfg)
    check_schedule(cfg)
    return [f"{name} has no effect in this run: {why}" for name, why in unused_settings(cfg)] + schedule_notes(cfg)


def require_resolved(cfg: Config, who: str) -> Config:
    """The data code takes the run's input settings as values: the model fills them in once (model.resolve_data),
    and a config that still leaves them to the model is a programming error here, not a user's mistake."""
    if not (cfg.img_size and cfg.eval_crop_ratio and cfg.mean and cfg.std and cfg.interpolation):
        raise ValueError(f"{who} takes resolved input settings (model.resolve_data first); got img_size "
                         f"{cfg.img_size}, eval_crop_ratio {cfg.eval_crop_ratio}, mean {cfg.mean}, std {cfg.std}, "
                         f"interpolation {cfg.interpolation!r}")
    return cfg
