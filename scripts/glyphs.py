"""
Write printed letters rendered from the fonts on this machine (52 classes, A-Z and a-z) in the HW1 folder layout,
as scripts/fashion_mnist.py does:

    OUT/train/<class>/*.jpg, OUT/val/<class>/*.jpg, OUT/test/*.jpg (flat), OUT/test_labels.csv, OUT/classes.csv,
    OUT/fonts.csv (the font files of each split)

    python scripts/glyphs.py --out data/glyphs-32 --size 32

It needs no download: matplotlib ships a few fonts, Debian's fonts-* packages many more (README "Recipe search"
names the ones its evidence used). Typefaces are split between train, val and test, so the test set measures letters
in typefaces no training image used. Each image is one letter, white on black, drawn at its font's size on a fixed
baseline, with a small random shift, scale and rotation. The class folders are "cap-A" and "small-a" (a
case-insensitive file system could not hold "A" and "a" side by side).

Letters are a dataset where the usual photo augmentations change the label: a mirrored b is a d, and a crop that
zooms in makes a small c look like a capital C.
"""

import argparse
import functools
import os
import re
import string

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fashion_mnist import (UsageError, add_writing_args, check_out, hidden_name, run_cli, write_images,
                           write_label_files)

LETTERS = string.ascii_uppercase + string.ascii_lowercase
FOLDERS = [f"cap-{c}" for c in string.ascii_uppercase] + [f"small-{c}" for c in string.ascii_lowercase]
# fonts whose letters are symbols, math or other alphabets (Symbol draws "a" as alpha)
NOT_LETTERS = re.compile(r"symbol|dingbat|math|cmex|cmsy|stixsiz|stixnonuni|emoji|music|lastresort|d050000l",
                         re.IGNORECASE)
STYLES = r"(bold|bol|italic|ita|oblique|regular|light|medium|condensed|narrow|display)+$"
SUPERSAMPLE = 4  # letters are drawn this many times larger, then shrunk, for smooth edges


def default_font_dirs():
    import matplotlib
    return ["/usr/share/fonts", os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Write letters rendered from this machine's fonts in the HW1 layout.")
    p.add_argument("--out", required=True, help="output root (must be empty unless --overwrite)")
    p.add_argument("--size", type=int, default=32, help="output side in pixels (default: %(default)s)")
    p.add_argument("--train-per-class", type=int, default=10, help="training images per letter (default: "
                   "%(default)s)")
    p.add_argument("--val-per-class", type=int, default=6, help="val images per letter (default: %(default)s)")
    p.add_argument("--test-per-class", type=int, default=20, help="test images per letter (default: %(default)s)")
    p.add_argument("--test-share", type=float, default=0.3, help="share of the typefaces kept for test (default: "
                   "%(default)s)")
    p.add_argument("--val-share", type=float, default=0.2, help="share of the typefaces kept for val (default: "
                   "%(default)s)")
    p.add_argument("--fonts", nargs="+", default=None, help="folders searched for .ttf/.otf files (default: "
                   "/usr/share/fonts and matplotlib's own fonts)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the drawing (default: %(default)s)")
    add_writing_args(p)
    args = p.parse_args(argv)
    if args.size < 8:
        p.error("--size must be at least 8")
    if min(args.train_per_class, args.val_per_class, args.test_per_class) < 1:
        p.error("--train-per-class, --val-per-class and --test-per-class must be at least 1")
    if not (0 < args.test_share and 0 < args.val_share and args.test_share + args.val_share < 1):
        p.error("--test-share and --val-share must be above 0 and leave typefaces for training (sum below 1)")
    return args


def font_files(folders):
    found = []
    for folder in folders:
        if not os.path.isdir(folder):
            raise UsageError(f"--fonts {folder}: no such folder")
        for root, _, names in os.walk(folder):
            found += [os.path.join(root, n) for n in names if n.lower().endswith((".ttf", ".otf"))]
    return sorted(set(found))


@functools.lru_cache(maxsize=256)
def load_font(path, size):
    return ImageFont.truetype(path, size)


def ink(font, text):
    """The pixels of text drawn in font, cropped to their box (empty when the font draws nothing)."""
    left, top, right, bottom = font.getbbox(text)
    if right <= left or bottom <= top:
        return b""
    image = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(image).text((-left, -top), text, fill=255, font=font)
    return image.tobytes() if image.getbbox() else b""


def draws_every_letter(path):
    """True when the font has its own glyph for each letter: none is empty or the same as a missing glyph's."""
    try:
        font = load_font(path, 48)
        missing = ink(font, "\ue000")  # a private-use code point: the font's "no glyph" box, if any
        letters = [ink(font, c) for c in LETTERS]
    except OSError:  # a font file FreeType cannot read
        return False
    return all(pixels and pixels != missing for pixels in letters)


def typeface(path):
    """The typeface a font file belongs to, from its file name: NotoSerif-BoldItalic, FreeSerifBold and
    linlibertine_rb are NotoSerif, FreeSerif and linlibertine; lmroman10 and lmroman12 are lmroman."""
    name = os.path.basename(path).split("-")[0].split("_")[0].split(".")[0].lower()
    name = re.sub(STYLES, "", name) or name
    stem = re.sub(r"\d+$", "", name)
    return stem if len(stem) >= 3 else name  # c059 stays c059


def split_typefaces(paths, args):
    """{"train"|"val"|"test": [[font files of one typeface], ...]}, typefaces shuffled by the seed."""
    families = {}
    for path in paths:
        families.setdefault(typeface(path), []).append(path)
    names = sorted(families)
    if len(names) < 3:
        raise UsageError(f"found {len(names)} typeface(s) with all 52 letters; need at least 3 (one per split): "
                         "install fonts (e.g. apt-get install fonts-noto-core) or give --fonts")
    order = np.random.default_rng(args.seed).permutation(len(names))
    n_test = max(1, round(args.test_share * len(names)))
    n_val = max(1, round(args.val_share * len(names)))
    if n_test + n_val >= len(names):
        raise UsageError(f"--test-share {args.test_share} and --val-share {args.val_share} leave none of the "
                         f"{len(names)} typefaces for training: give smaller shares or more fonts")
    parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return {split: [families[names[i]] for i in sorted(idx)] for split, idx in parts.items()}


@functools.lru_cache(maxsize=None)
def layout(path, side):
    """The font size and baseline that fit every letter of this font in a side x side canvas, so that a letter's
    size and height above the baseline keep their meaning (a small c stays smaller and lower than a capital C)."""
    font = load_font(path, side)
    boxes = np.array([font.getbbox(c, anchor="ls") for c in LETTERS])  # left, top, right, bottom from the baseline
    top, bottom = boxes[:, 1].min(), boxes[:, 3].max()
    width = (boxes[:, 2] - boxes[:, 0]).max()
    scale = 0.8 * side / max(bottom - top, width)
    baseline = side / 2 - scale * (top + bottom) / 2
    return max(4, int(side * scale)), baseline


def render(letter, path, size, rng):
    """One letter, white on black, size x size pixels: the font's layout plus a small random shift, scale and
    rotation."""
    side = size * SUPERSAMPLE
    font_size, baseline = layout(path, side)
    font = load_font(path, int(font_size * rng.uniform(0.9, 1.1)))
    left, _, right, _ = font.getbbox(letter, anchor="ls")
    dx, dy = rng.uniform(-1.5, 1.5, size=2) * SUPERSAMPLE
    canvas = Image.new("L", (side, side), 0)
    ImageDraw.Draw(canvas).text((side / 2 - (left + right) / 2 + dx, baseline + dy), letter, fill=255, font=font,
                                anchor="ls")
    canvas = canvas.rotate(rng.uniform(-8, 8), resample=Image.BICUBIC)
    return np.asarray(canvas.resize((size, size), Image.BOX))


def draw(split_fonts, per_class, size, rng):
    """per_class images of each letter, each from a random typeface of the split and a random file of it."""
    images, labels = [], []
    for label, letter in enumerate(LETTERS):
        for _ in range(per_class):
            family = split_fonts[rng.integers(len(split_fonts))]
            images.append(render(letter, family[rng.integers(len(family))], size, rng))
            labels.append(label)
    return images, labels


def main(argv=None):
    args = parse_args(argv)
    check_out(args.out, args.overwrite)
    fonts = [p for p in font_files(args.fonts or default_font_dirs())
             if not NOT_LETTERS.search(os.path.basename(p)) and draws_every_letter(p)]
    splits = split_typefaces(fonts, args)
    rng = np.random.default_rng(args.seed)
    jobs, rows = [], []
    for split in ("train", "val"):
        images, labels = draw(splits[split], getattr(args, f"{split}_per_class"), args.size, rng)
        for i, (pixels, label) in enumerate(zip(images, labels)):
            folder = os.path.join(args.out, split, FOLDERS[label])
            os.makedirs(folder, exist_ok=True)
            jobs.append((pixels, os.path.join(folder, f"{i:05d}.jpg"), args.size, "jpg"))
    os.makedirs(os.path.join(args.out, "test"), exist_ok=True)
    images, labels = draw(splits["test"], args.test_per_class, args.size, rng)
    for i, (pixels, label) in enumerate(zip(images, labels)):
        name = hidden_name(args.seed, i)
        rows.append((name, FOLDERS[label]))
        jobs.append((pixels, os.path.join(args.out, "test", f"{name}.jpg"), args.size, "jpg"))
    write_images(jobs, args.workers)
    write_label_files(args.out, rows, zip(FOLDERS, LETTERS))
    with open(os.path.join(args.out, "fonts.csv"), "w") as f:  # which fonts made which split, to reproduce it
        f.write("split,typeface,file\n" + "".join(f"{split},{typeface(path)},{path}\n" for split, families in
                                                  splits.items() for family in families for path in family))
    counts = ", ".join(f"{len(splits[s])} {s}" for s in ("train", "val", "test"))
    print(f"typefaces: {counts} ({len(fonts)} font files with all 52 letters)")
    print(f"wrote {len(jobs) - len(rows)} train+val, {len(rows)} test images ({args.size}px jpg) to {args.out}")


if __name__ == "__main__":
    run_cli(main)
