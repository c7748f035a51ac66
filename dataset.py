"""Folders of images: data/train/<class>/, data/val/<class>/ and a flat data/test/.

    python dataset.py --preview data/train --img-size 224 --erasing 0.5     # original vs augmented samples as a PNG

Images leave the loader as uint8 tensors (channels_last batches from OpenCVAugment); converting to float,
normalising and random erasing happen per batch on the training device (to_float_batch), which keeps the worker
processes light and the host-to-GPU copy 4x smaller.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import math
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torchvision.transforms import v2
from torchvision.utils import make_grid
from tqdm import tqdm

from augment import BatchAugment, interpolation_mode, random_erasing, train_transform
from config import Config, add_config_args, config_from_args
from errors import UserError, run_cli
from model import IMAGENET_MEAN, IMAGENET_STD, resolve_data


def decodable_extensions():
    """Every file extension this Pillow reads, lower case with the dot ('.jpg', '.jfif', '.webp', '.tif', '.avif'
    where it has libavif, ...): those its plugins register, less the formats it can only write (PDF, Palm), the
    stubs that decode only through a handler the application registers (BUFR, GRIB, HDF5, WMF) and MPEG, of
    which it reads the header only."""
    def decodes(fmt):
        if fmt == "MPO":
            return True  # registered for writing; MPO files open through the JPEG plugin
        if fmt not in Image.OPEN or fmt == "MPEG":
            return False
        factory = Image.OPEN[fmt][0]
        return not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))
    Image.init()
    return tuple(sorted({ext.lower() for ext, fmt in Image.registered_extensions().items() if decodes(fmt)}))


IMAGE_EXTENSIONS = decodable_extensions()
# Windows Explorer and macOS (a folder's custom icon) leave these in image folders; like dotfiles, never data
OS_DROPPINGS = {"thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini", "icon\r"}


class BadImage(Exception):
    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path = path


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


def declared_peak(img):
    """The largest value an integer grey image's samples can hold by what its file says, None when it says nothing
    narrower than 32 bits. Read it from a file before the pixels are decoded: decoding empties img.tile."""
    if img.mode.startswith("I;16"):
        return 65535
    if img.mode != "I":
        return None
    if img.format == "PPM":
        return 65535  # PIL reads a PGM of any maxval above 255 as 0..65535
    for tile in getattr(img, "tile", ()):  # the decoder's raw mode names the stored layout: 'I;16B', 'I;16S' ...
        args = tile[3]
        rawmode = args[0] if isinstance(args, tuple) and args else args
        match = re.fullmatch(r"I;(8|16)[BLN]?(S?)", rawmode) if isinstance(rawmode, str) else None
        if match:  # a signed TIFF ('I;16S') holds 0..32767 above zero
            return 2 ** (int(match[1]) - bool(match[2])) - 1
    return None


def grey_to_l(img, peak=None):
    """8-bit grey from an integer (I, I;16*) or float (F) image: 0..peak maps to 0..255, negatives and NaN are
    black. The peak is what the file says (`peak`: 65535 for I;16* modes, 16-bit PNG and PGM, 32767 for a signed
    16-bit TIFF) whatever the values; where it says nothing (32-bit integers, floats) it is the largest value rounded
    up to 1 (floats only), 255 or 65535, or the largest value itself beyond 65535."""
    arr = np.asarray(img).astype(np.float32)
    if peak is None:
        finite = arr[np.isfinite(arr)]
        top = float(finite.max()) if finite.size else 0.0
        steps = (1.0, 255.0, 65535.0) if img.mode == "F" else (255.0, 65535.0)
        peak = next((step for step in steps if top <= step), top)
    arr = np.nan_to_num(arr, nan=0.0, posinf=peak, neginf=0.0)
    return Image.fromarray((arr * (255.0 / peak)).round().clip(0, 255).astype(np.uint8))


def lab_to_srgb(img):
    """CIELAB (D50, as ICC profiles take it) to sRGB through littlecms. PIL's own LAB-to-RGB conversion takes the
    same route since Pillow 9.4, but a Pillow built without littlecms raises ImportError there: here that is an
    OSError, which load_rgb names as an unreadable image."""
    from PIL import ImageCms
    try:
        transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                            "LAB", "RGB")
    except ImportError as e:
        raise OSError(f"LAB colour needs PIL's littlecms support (PIL.ImageCms), which this Pillow lacks: {e}") \
            from None
    return ImageCms.applyTransform(img, transform)


def has_alpha(img):
    """Whether some pixels may be see-through: an alpha band (straight or premultiplied), a transparent colour or
    palette entry, or a palette with alpha."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return True
    return img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"


def to_rgb(img, peak=None):
    """Any PIL image as RGB: integer and float grey scaled by their range (grey_to_l, `peak` as the file declares
    it), LAB through littlecms, see-through pixels composited on white; other modes (1, L, P, CMYK, YCbCr, HSV,
    RGBX) by PIL's conversion."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        # PIL's convert('RGB') clips every value above 255 to white; an I;16 image says its range in its mode
        img = grey_to_l(img, peak or declared_peak(img))
    elif img.mode == "LAB":
        img = lab_to_srgb(img)
    if has_alpha(img):
        # composite on white rather than letting transparent pixels keep whatever colour they had
        if img.mode == "La":
            img = img.convert("LA")  # PIL converts premultiplied grey to straight alpha only
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return img.convert("RGB")


def load_rgb(path: str, draft_size: int | None = None) -> Image.Image:
    """Decode any image file this Pillow reads into an RGB PIL image, upright as its EXIF says (to_rgb says how
    each pixel mode is converted); BadImage if unreadable."""
    try:
        with warnings.catch_warnings(), Image.open(path) as img:
            # a large image under the hard limit decodes fine: no DecompressionBombWarning per epoch
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))  # JPEG DCT scaling: decode at >= draft_size, faster
            peak = declared_peak(img)
            img = ImageOps.exif_transpose(img)
            return to_rgb(img, peak)
    except Image.DecompressionBombError:
        raise BadImage(path, f"image too large: over PIL's decompression-bomb limit of {2 * Image.MAX_IMAGE_PIXELS} "
                             "pixels (shrink the file, or remove it)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImage(path, f"cannot decode image ({e})") from None


# Start-of-frame markers of the JPEG processes other than baseline, extended and progressive Huffman (lossless,
# hierarchical, arithmetic-coded): left to PIL
OTHER_FRAMES = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def plain_jpeg_rgb(path: str) -> np.ndarray | None:
    """A plain JPEG (8-bit grey or 3-channel colour, complete up to its end marker, no EXIF, under PIL's pixel limit)
    decoded by OpenCV straight to an RGB array: load_rgb's pixels (the same libjpeg) for about two thirds of the
    cost of PIL's decode and copy to an array. None for any other file, which load_rgb then decodes."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if not (data.startswith(b"\xff\xd8") and data.endswith(b"\xff\xd9")):
        return None
    pos = 2
    while pos + 10 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xE1 or marker in OTHER_FRAMES:  # EXIF (its orientation) or an unusual process: PIL's
            return None
        if marker in (0xC0, 0xC1, 0xC2):
            precision, channels = data[pos + 4], data[pos + 9]
            pixels = int.from_bytes(data[pos + 5:pos + 7], "big") * int.from_bytes(data[pos + 7:pos + 9], "big")
            if precision != 8 or channels not in (1, 3) or pixels > (Image.MAX_IMAGE_PIXELS or pixels):
                return None
            return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def cache_file(cache_dir, path, short_side):
    """Where the resized copy of `path` lives; the name changes with the file's size and mtime, so an edited or
    replaced image is decoded again instead of served stale."""
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{short_side}"
    return os.path.join(cache_dir, hashlib.sha1(key.encode()).hexdigest()[:20] + ".jpg")


def load_cached(path, cache_dir, short_side):
    """The image with its short side resized to `short_side` (never enlarged), written to cache_dir as JPEG q95
    on first use (atomically: loader workers may race) and read from there afterwards."""
    try:
        target = cache_file(cache_dir, path, short_side)
    except OSError as e:
        raise BadImage(path, f"cannot read file ({e})") from None
    if os.path.exists(target):
        try:
            return load_rgb(target)
        except BadImage:
            pass  # a damaged cache entry: rebuild it from the source
    img = load_rgb(path, draft_size=short_side)
    if min(img.size) > short_side:
        img = v2.functional.resize(img, short_side, antialias=True)
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-", suffix=".jpg")
    with os.fdopen(fd, "wb") as f:
        img.save(f, "JPEG", quality=95, subsampling=0)  # 4:4:4: colour edges kept
    os.replace(tmp, target)
    return img


def cache_side(img_size, crop_ratio):
    """Short side of cached images: 9/7 of the crop (288 for 224), and never below the evaluation resize."""
    return max(math.ceil(img_size * 9 / 7), eval_sizes(img_size, crop_ratio)[0])


def open_image(path, draft_size=None, cache=None):
    """load_rgb, or the cached copy when cache = (folder, short side) is given."""
    return load_cached(path, *cache) if cache else load_rgb(path, draft_size)


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


@contextmanager
def seeded(seed):
    """Draw from torch's generator seeded with `seed`, leaving the global stream as it was (None: no change)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


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


def collate_skipping_bad(batch: Sequence[tuple[torch.Tensor | None, int | str, str]]
                         ) -> tuple[torch.Tensor, torch.Tensor | list[str], list[str]]:
    """Stack the good images; return the paths (or messages) of the bad ones beside them."""
    good = [b for b in batch if b[0] is not None]
    bad = [b[2] for b in batch if b[0] is None]
    images = stack_images([b[0] for b in good]) if good else torch.empty(0, dtype=torch.uint8)
    second = [b[1] for b in good]
    if second and isinstance(second[0], int):
        second = torch.tensor(second)
    return images, second, bad


def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """One uint8 batch. Images whose pixels lie channel-last in memory (OpenCVAugment's CHW views of HWC arrays) make
    a channels_last batch: no transpose here, and to_float_batch normalises it in one pass over rows of pixels."""
    if images[0].dim() == 3 and images[0].stride(0) == 1 and images[0].shape[0] > 1:
        return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
    return torch.stack(images)


def loader_options(workers: int, device: torch.device) -> dict[str, Any]:
    """DataLoader settings shared by training and prediction: persistent, prefetching workers and pinned memory
    (so that the non-blocking copies to the GPU overlap the compute)."""
    options = dict(num_workers=workers, pin_memory=device.type == "cuda", collate_fn=collate_skipping_bad)
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=4)
    return options


def eval_crop(cfg: Config) -> int:
    """The evaluation centre-crop size: --eval-size, or the train crop size."""
    return cfg.eval_size or cfg.img_size


def eval_sizes(img_size: int, crop_ratio: float) -> tuple[int, int]:
    """(resize, crop): the short side is resized to crop/ratio, then the centre crop is taken (256 -> 224)."""
    return int(round(img_size / crop_ratio)), img_size


def eval_transform(img_size: int, crop_ratio: float, interpolation: str = "bilinear") -> v2.Compose:
    """Resize the short side and centre-crop a square of that side; the model's centre crop is taken per batch.

    Keeping the larger square lets test-time augmentation cut its other views from the same decoded tensor.
    """
    resize, _ = eval_sizes(img_size, crop_ratio)
    return v2.Compose([v2.Resize(resize, interpolation=interpolation_mode(interpolation), antialias=True),
                       v2.CenterCrop(resize), v2.PILToTensor()])


def center_crop(batch: torch.Tensor, size: int) -> torch.Tensor:
    h, w = batch.shape[-2:]
    if size > min(h, w):  # negative offsets would slice a sliver, which a network classifies all the same
        raise ValueError(f"centre crop of {size} px from {h}x{w} images: the crop must fit inside")
    top, left = (h - size) // 2, (w - size) // 2
    return batch[..., top:top + size, left:left + size]


def normalisation(cfg: Config) -> tuple[Sequence[float], Sequence[float]]:
    """(mean, std) of the model's input: the config's (resolved from the model, or set by flags), else ImageNet's."""
    return tuple(cfg.mean) or IMAGENET_MEAN, tuple(cfg.std) or IMAGENET_STD


def to_float_batch(batch: torch.Tensor, device: torch.device, erasing: float = 0.0,
                   augment: BatchAugment | None = None, channels_last: bool = False,
                   norm: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD)) -> torch.Tensor:
    """uint8 NCHW on any device -> float on `device`, normalised with norm = (mean, std); training adds the batch
    augmentation and per-image random erasing (after normalisation, as the seed's RandomErasing)."""
    x = batch.to(device, non_blocking=True).float()  # keeps the batch's memory format
    mean = torch.tensor(norm[0], device=device).view(1, 3, 1, 1)
    std = torch.tensor(norm[1], device=device).view(1, 3, 1, 1)
    if augment is not None:
        x = augment(x.div_(255)).sub_(mean).div_(std)
    else:  # (x / 255 - mean) / std as one scale and one shift: two passes over the batch instead of three
        x = scale_channels_(x, 1 / (255 * std), -mean / std)
    if erasing > 0:
        x = random_erasing(x, erasing)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def scale_channels_(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x * scale + shift per channel, in place. A channels_last batch is seen as its image rows (W*C values, with
    the factors tiled along them): on the CPU a per-channel broadcast over an innermost dimension of C is several
    times slower than this long inner loop."""
    n, channels, height, width = x.shape
    if channels > 1 and x.is_contiguous(memory_format=torch.channels_last):
        rows = x.permute(0, 2, 3, 1).view(n * height, width * channels)
        rows.mul_(scale.flatten().repeat(width)).add_(shift.flatten().repeat(width))
        return x
    return x.mul_(scale).add_(shift)


def build_train_val(cfg: Config) -> tuple[LabelledImages, LabelledImages, list[str]]:
    """Datasets for train/ and val/ with the class list of train/; val must use the same class names. Without a
    val/ folder, under --val-fraction or --folds, val comes back empty: the run holds out part of train/ itself.
    The sizes and interpolation are the model's own where the config leaves them to it."""
    train_dir, val_dir = os.path.join(cfg.data_dir, "train"), os.path.join(cfg.data_dir, "val")
    if not os.path.isdir(cfg.data_dir):
        raise UserError(f"no such data folder: {cfg.data_dir} (expected {cfg.data_dir}/train/<class>/ and "
                        f"{cfg.data_dir}/val/<class>/, or train/ alone with --val-fraction)")
    classes = find_classes(train_dir)
    use_val = own_val_folder(cfg, val_dir)  # the layout before the images: a missing val/ is said first
    cfg = resolve_data(cfg)
    # only evaluation decodes JPEGs at reduced size: a random crop may take a small part of the image at full detail
    draft = eval_sizes(eval_crop(cfg), cfg.eval_crop_ratio)[0]
    cache = (cfg.cache, cache_side(max(cfg.img_size, eval_crop(cfg)), cfg.eval_crop_ratio)) if cfg.cache else None
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

def preview_picks(targets, count):
    """Indices of `count` samples spread over the classes: the first image of each class, then the second, ..."""
    by_class = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    picks, rank = [], 0
    while len(picks) < count and any(rank < len(v) for v in by_class.values()):
        picks += [v[rank] for v in by_class.values() if rank < len(v)][:count - len(picks)]
        rank += 1
    return picks


def preview_grid(dataset: LabelledImages, cfg: Config, images: int = 8, views: int = 5,
                 padding: int = 2) -> torch.Tensor:
    """uint8 (3, H, W) grid: one row per image, its evaluation view first, then `views` draws of the train pipeline.

    Random erasing is drawn here as the training loop draws it (per image, filled with the mean colour). The global
    torch RNG is left as it was, so that a preview inside a training run does not change the run.
    """
    # the whole list per image, as on CPU: on CUDA the same colour steps run per batch, with the same distribution
    augment = train_transform(dataclasses.replace(cfg, augment_on="loader"))
    evaluate = eval_transform(cfg.img_size, cfg.eval_crop_ratio, cfg.interpolation)
    erase = v2.RandomErasing(p=cfg.erasing, value=[round(255 * m) for m in normalisation(cfg)[0]])
    tiles = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for i in preview_picks(dataset.targets, images):
            img = load_rgb(dataset.samples[i][0])
            tiles.append(center_crop(evaluate(img), cfg.img_size))
            tiles += [erase(augment(img)) if cfg.erasing > 0 else augment(img) for _ in range(views)]
    return make_grid(torch.stack(tiles), nrow=1 + views, padding=padding, pad_value=255)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Augmentation preview: a PNG grid with one row per training image, its evaluation view in the "
                    "first column and draws of the configured training augmentation after it. Takes every "
                    "train.py flag; the augmentation ones (and --img-size, --seed) change the picture.")
    parser.add_argument("--preview", required=True, metavar="DIR", help="a folder of class folders, e.g. data/train")
    parser.add_argument("--output", default="augmentation_preview.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--images", type=int, default=8, help="rows: images, spread over the classes "
                                                               "(default: %(default)s)")
    parser.add_argument("--views", type=int, default=5, help="augmented draws per image (default: %(default)s)")
    add_config_args(parser)
    args = parser.parse_args(argv)
    if args.images < 1 or args.views < 1:
        parser.error("--images and --views must be at least 1")
    cfg = resolve_data(config_from_args(args))
    dataset = LabelledImages(args.preview, find_classes(args.preview), transform=None)
    grid = preview_grid(dataset, cfg, args.images, args.views)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(args.output)
    rows = min(args.images, len(dataset))
    print(f"wrote {args.output}: {rows} images x (original + {args.views} augmented) at {cfg.img_size}px")
    return 0


if __name__ == "__main__":
    run_cli(main)
