"""--teacher: distillation from one's own checkpoints. The student learns from the averaged softened predictions of
one or more trained models (the K fold models of --all-folds, or a larger backbone) on the very batch it sees,
augmented and mixed (consistent teaching): KL divergence at --distill-temperature, blended with the label loss by
--distill-weight. Teachers run in eval mode without gradients, under the run's autocast, on its device, each at its
own input size and normalisation; any arch the tool trains can teach any other.

A teacher that trained on the student's validation images makes the student's val score, its best.pt choice and
--patience optimistic: such teachers are named in one line at the start (docs/distillation.md: how to distil
honestly). The checkpoints record the teachers' files and hashes; a resumed run refuses changed teachers.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from checkpoint import checkpoint_files
from config import Config
from dataset import list_files
from errors import UserError
from folds import FOLD_SPLIT, VAL_SPLIT
from predict import load_model
from utils import autocast


class Teachers:
    """The teachers of a run: their models, configs and files; called on a normalised student batch, the mean of
    their softened class probabilities."""

    def __init__(self, members: list[tuple[torch.nn.Module, Config, str]], student: Config):
        self.members, self.student = members, student
        self.files = [path for _, _, path in members]
        self.record = [{"file": path, "sha256": file_hash(path)} for path in self.files]  # what checkpoints keep

    def probs(self, x: torch.Tensor, dtype: torch.dtype | None, temperature: float) -> torch.Tensor:
        mean = torch.tensor(self.student.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.student.std, device=x.device).view(1, 3, 1, 1)
        pixels = x.float() * std + mean  # back to 0..1: each teacher normalises in its own way
        total = 0.0
        with torch.no_grad(), autocast(x.device, dtype):
            for model, cfg, _ in self.members:
                side = cfg.eval_size or cfg.img_size
                view = pixels if pixels.shape[-1] == side else F.interpolate(
                    pixels, size=(side, side), mode=cfg.interpolation, antialias=True, align_corners=False)
                view = (view - torch.tensor(cfg.mean, device=x.device).view(1, 3, 1, 1)) / torch.tensor(
                    cfg.std, device=x.device).view(1, 3, 1, 1)
                total = total + (model(view).float() / temperature).softmax(1)
        return total / len(self.members)


def load_teachers(cfg: Config, classes: list[str], device: torch.device) -> Teachers | None:
    """The --teacher checkpoints (a folder: every best.pt below it), each checked to know the student's classes in
    the student's order; None without --teacher."""
    if not cfg.teacher:
        return None
    members = []
    for path in checkpoint_files(cfg.teacher):
        if not os.path.isfile(path):
            raise UserError(f"--teacher {path}: no such checkpoint")
        model, teacher_cfg, teacher_classes, _, _ = load_model(path, "best", device)
        if teacher_classes != list(classes):
            raise UserError(f"--teacher {path} was trained on other classes than this run's ({len(teacher_classes)} "
                            f"vs {len(classes)}, or another order): a teacher must know the student's classes")
        members.append((model.eval().requires_grad_(False), teacher_cfg, path))
    return Teachers(members, cfg)


def distilled_loss(label_loss: torch.Tensor, logits: torch.Tensor, teacher_probs: torch.Tensor,
                   cfg: Config) -> torch.Tensor:
    """The label loss blended with KL(teachers || student) at --distill-temperature T, scaled by T^2 so that its
    gradients keep their size whatever T is (Hinton et al. 2015)."""
    t = cfg.distill_temperature
    student = F.log_softmax(logits.float() / t, dim=1)
    kl = F.kl_div(student, teacher_probs, reduction="batchmean") * t * t
    return (1 - cfg.distill_weight) * label_loss + cfg.distill_weight * kl


# ---------------------------------------------------------------- what the teachers were trained on

def trained_images(path: str, cfg: Config) -> set[str]:
    """The images (real paths) a checkpoint's run trained on: from its folds.csv or val_split.csv when it has one,
    else every image of its data's train/."""
    run_dir = os.path.dirname(os.path.abspath(path))
    folds, split = os.path.join(run_dir, FOLD_SPLIT), os.path.join(run_dir, VAL_SPLIT)
    if cfg.folds and os.path.isfile(folds):
        table = pd.read_csv(folds, dtype=str, keep_default_na=False)
        names = table.loc[table["fold"].astype(int) != cfg.fold, "image"]
    elif cfg.val_fraction and os.path.isfile(split):
        table = pd.read_csv(split, dtype=str, keep_default_na=False)
        names = table.loc[table["split"] == "train", "image"]
    else:  # all of train/, and val/ too for a fold model whose folds.csv is not beside it (the two were pooled)
        found = set()
        for part in ("train", "val") if cfg.folds else ("train",):
            folder = os.path.join(cfg.data_dir, part)
            for c in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                if os.path.isdir(os.path.join(folder, c)):
                    found |= {os.path.realpath(p) for p in list_files(os.path.join(folder, c))[0]}
        return found
    return {os.path.realpath(os.path.join(cfg.data_dir, name)) for name in names}


def teacher_lines(teachers: Teachers | None, val_paths: list[str]) -> list[str]:
    """What a distilled run says at its start: its teachers, and one line per teacher that trained on some of the
    student's validation images."""
    if teachers is None:
        return []
    val = {os.path.realpath(p) for p in val_paths}
    student = teachers.student
    lines = [f"distilling from {len(teachers.members)} teacher(s) at temperature {student.distill_temperature:g}, "
             f"weight {student.distill_weight:g}: {', '.join(teachers.files)}"]
    for _, cfg, path in teachers.members:
        seen = len(val & trained_images(path, cfg))
        if seen:
            lines.append(f"warning: --teacher {path} trained on {seen} of the {len(val)} val images: the val accuracy, "
                         "best.pt and --patience of this run are optimistic; to distil honestly, validate on images "
                         "no teacher trained on (docs/distillation.md)")
    return lines


# ---------------------------------------------------------------- the checkpoint's record of its teachers

def file_hash(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_same_teachers(saved: list[dict[str, Any]], teachers: Teachers | None) -> None:
    """A resumed run learns from the teachers it started with: a changed, added or missing teacher is refused."""
    now = teachers.record if teachers is not None else []
    if [t["sha256"] for t in saved] != [t["sha256"] for t in now]:
        before = ", ".join(t["file"] for t in saved) or "none"
        raise UserError(f"the run was distilled from other teachers ({before}; their files' hashes differ from the "
                        "--teacher files now): resume with the same teacher files, or start a new run")
