"""Folders of images: data/train/<class>/, data/val/<class>/ and a flat data/test/.

    python dataset.py --preview data/train --img-size 224 --erasing 0.5     # original vs augmented samples as a PNG

Images leave the loader as uint8 tensors (channels_last batches from OpenCVAugment); converting to float,
normalising and random erasing happen per batch on the training device (to_float_batch), which keeps the worker
processes light and the host-to-GPU copy 4x smaller.
"""
from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from augment import eval_crop, eval_sizes, eval_transform, train_transform
from config import Config, require_resolved
from errors import UserError
from images import IMAGE_EXTENSIONS, BadImage, cache_side, load_rgb, open_image, plain_jpeg_rgb
from utils import seeded

# Windows Explorer and macOS (a folder's custom icon) leave these in image folders; like dotfiles, never data
OS_DROPPINGS = {"thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini", "icon\r"}


def is_visible(name):
    return not name.startswith(".")  # .DS_Store, AppleDouble ._x.jpg, editor droppings


def list_files(folder: str) -> tuple[list[str], list[str]]:
    """(images, others) of one folder: the sorted paths of the files with an extension this Pillow reads (in any
    case), and the sorted names of every other entry (a folder with a trailing '/'), dotfiles and OS droppings
    left out."""
    images, others = [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not is_visible(entry.name) or entry.name.lower() in OS_DROPPINGS:
            continue
        if entry.is_dir():
            others.append(entry.name + "/")
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
            images.append(os.path.join(folder, entry.name))
        else:
            others.append(entry.name)
    return images, others


def not_images_note(names: Sequence[str], n: int = 5) -> str:
    """'2 file(s) that are not images by their extension: notes.txt, x.heic', naming the first n."""
    listed = ", ".join(names[:n]) + (", ..." if len(names) > n else "")
    return f"{len(names)} file(s) that are not images by their extension: {listed}"


def sort_class_names(names):
    """Numeric order when every name is an integer ('2' before '10'), else plain string order."""
    if names and all(n.isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def find_classes(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise UserError(f"no such folder: {folder}")
    names = [n for n in os.listdir(folder) if is_visible(n) and os.path.isdir(os.path.join(folder, n))]
    if not names:
        raise UserError(f"{folder} has no class folders (expected {folder}/<class>/<image>)")
    return sort_class_names(names)


class LabelledImages(torch.utils.data.Dataset):
    """(path, class index) pairs from root/<class>/ for the given class list; an unreadable image comes back as
    (None, target, reason) so that the loop can skip it and name it."""

    def __init__(self, root, classes, transform, draft_size=None, cache=None):
        self.root, self.classes, self.transform, self.draft_size = root, list(classes), transform, draft_size
        self.cache = cache
        self.samples, self.not_images = [], []  # not_images: '<class>/<name>' of the files that are left out
        for index, name in enumerate(self.classes):
            folder = os.path.join(root, name)
            if os.path.isdir(folder):
                images, others = list_files(folder)
                self.samples += [(path, index) for path in images]
                self.not_images += [f"{name}/{other}" for other in others]
        if not self.samples:
            raise UserError(f"{root} holds no images (expected {root}/<class>/<image>)")
        self.targets = [t for _, t in self.samples]

    def __len__(self):
        return len(self.samples)

    def with_samples(self, samples):
        """The same dataset (classes, transform, decoding) over another list of (path, class index) pairs."""
        other = copy.copy(self)
        other.samples = list(samples)
        other.targets = [t for _, t in other.samples]
        return other

    def held_out(self, samples, transform, draft_size):
        """Some of these (path, class index) pairs as a validation set: the evaluation transform and decoding."""
        other = self.with_samples(samples)
        other.transform, other.draft_size, other.not_images = transform, draft_size, []
        return other

    def class_counts(self):
        return np.bincount(self.targets, minlength=len(self.classes))

    def drop(self, paths):
        """Leave out files known to be unreadable (found by check_images before training)."""
        bad = set(paths)  # once, not once per sample: the training set can hold tens of thousands
        self.samples = [(p, t) for p, t in self.samples if p not in bad]
        self.targets = [t for _, t in self.samples]

    def __getitem__(self, key):
        # the training sampler hands out (index, seed): each image's augmentation then depends on that seed only,
        # not on which worker decodes it or where a resumed epoch starts
        i, seed = key if isinstance(key, tuple) else (key, None)
        path, target = self.samples[i]
        try:
            img = None
            if getattr(self.transform, "takes_arrays", False) and not (self.draft_size or self.cache):
                img = plain_jpeg_rgb(path)
            if img is None:
                img = open_image(path, self.draft_size, self.cache)
        except BadImage as e:
            return None, target, str(e)  # the training loop names it and counts it
        with seeded(seed):
            return self.transform(img), target, path


class FlatImages(torch.utils.data.Dataset):
    """Every image of one flat folder, for prediction: (image, file name without extension)."""

    def __init__(self, folder, transform, draft_size=None):
        if not os.path.isdir(folder):
            raise UserError(f"no such test folder: {folder}")
        self.paths, others = list_files(folder)
        if others:  # each test file must get its row in prediction.csv, or be named here
            raise UserError(f"{folder} holds {not_images_note(others)}; move them out")
        if not self.paths:
            raise UserError(f"{folder} holds no images (no file with an extension this Pillow reads, such as .jpg, "
                            ".png, .webp or .tif)")
        names = [os.path.splitext(os.path.basename(p))[0] for p in self.paths]
        dupes = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) < len(names) else []
        if dupes:
            raise UserError(f"{folder}: several files share the name {dupes[0]} (differing only in extension); "
                            "prediction.csv needs one row per name")
        self.names, self.transform, self.draft_size = names, transform, draft_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            img = load_rgb(self.paths[i], self.draft_size)
        except BadImage as e:
            return None, self.names[i], str(e)
        return self.transform(img), self.names[i], ""


class ImageCheck(torch.utils.data.Dataset):
    """Decode each file once and say what is wrong with it ('' when nothing). JPEGs decode at 1/8 scale, which
    still reads every byte, so a truncated file is caught at a fraction of the cost."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            load_rgb(self.paths[i], draft_size=32)
            return ""
        except BadImage as e:
            return str(e)


def check_images(paths: Sequence[str], workers: int, desc: str = "checking images") -> dict[str, str]:
    """{path: reason} for every unreadable file among `paths`, decoded in parallel loader processes."""
    loader = torch.utils.data.DataLoader(ImageCheck(paths), batch_size=32, num_workers=workers, collate_fn=list,
                                         generator=torch.Generator())  # draws nothing from the global generator
    reasons = [r for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True) for r in batch]
    return {p: r for p, r in zip(paths, reasons) if r}


def build_train_val(cfg: Config) -> tuple[LabelledImages, LabelledImages, list[str]]:
    """Datasets for train/ and val/ with the class list of train/; val must use the same class names. Without a
    val/ folder, under --val-fraction or --folds, val comes back empty: the run holds out part of train/ itself.
    cfg: the run's settings with its input settings resolved (model.resolve_data)."""
    train_dir, val_dir = os.path.join(cfg.data_dir, "train"), os.path.join(cfg.data_dir, "val")
    if not os.path.isdir(cfg.data_dir):
        raise UserError(f"no such data folder: {cfg.data_dir} (expected {cfg.data_dir}/train/<class>/ and "
                        f"{cfg.data_dir}/val/<class>/, or train/ alone with --val-fraction)")
    classes = find_classes(train_dir)
    use_val = own_val_folder(cfg, val_dir)  # the layout before the images: a missing val/ is said first
    require_resolved(cfg, "build_train_val")
    # only evaluation decodes JPEGs at reduced size: a random crop may take a small part of the image at full detail
    draft = eval_sizes(eval_crop(cfg), cfg.eval_crop_ratio)[0]
    largest = max(cfg.img_size, eval_crop(cfg))
    cache = (cfg.cache, cache_side(largest, eval_sizes(largest, cfg.eval_crop_ratio)[0])) if cfg.cache else None
    train = LabelledImages(train_dir, classes, train_transform(cfg), cache=cache)
    evaluation = eval_transform(eval_crop(cfg), cfg.eval_crop_ratio, cfg.interpolation)
    if use_val:
        val_classes = find_classes(val_dir)
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise UserError(f"{val_dir} has class folders that {train_dir} lacks: {', '.join(unknown[:5])}")
        val = LabelledImages(val_dir, classes, evaluation, draft_size=draft, cache=cache)
    else:
        val = train.held_out([], evaluation, draft)
    for split in (train, val):
        if split.not_images:
            print(f"warning: {split.root} holds {not_images_note(split.not_images)}; skipped")
    empty = [c for c, n in zip(classes, train.class_counts()) if n == 0]
    if empty:
        warnings.warn(f"{len(empty)} class folder(s) of {train_dir} hold no images: {', '.join(empty[:5])}")
    return train, val, classes


def own_val_folder(cfg, val_dir):
    """Whether the run validates on DATA/val/: without it, --val-fraction or --folds must say what to hold out."""
    if os.path.isdir(val_dir):
        if cfg.val_fraction:
            raise UserError(f"--val-fraction {cfg.val_fraction:g} holds out part of train/, but {val_dir} exists: "
                            "drop --val-fraction to validate on val/, or move val/ away to split train/")
        return True
    if not (cfg.val_fraction or cfg.folds):
        raise UserError(f"no such folder: {val_dir}; to validate on part of train/, add --val-fraction 0.1 (or "
                        "--folds K for cross-validation)")
    return False


# ---------------------------------------------------------------- augmentation preview

