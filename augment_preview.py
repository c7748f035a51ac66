"""Augmentation preview: a PNG grid with one row per training image, its evaluation view in the first column and
draws of the configured training augmentation after it.

    python augment_preview.py --preview data/train --img-size 224 --erasing 0.5     # original vs augmented samples

It takes every train.py flag; the augmentation ones (and --arch, --img-size, --seed) change the picture. The
pictures come from augment.preview_grid, the same that train.py --tensorboard logs.
"""
from __future__ import annotations

import argparse
import os

from PIL import Image

from augment import preview_grid
from config import add_config_args, config_from_args
from dataset import LabelledImages, find_classes
from errors import run_cli
from model import resolve_data


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
    grid = preview_grid(dataset.samples, cfg, args.images, args.views)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(args.output)
    rows = min(args.images, len(dataset))
    print(f"wrote {args.output}: {rows} images x (original + {args.views} augmented) at {cfg.img_size}px")
    return 0


if __name__ == "__main__":
    run_cli(main)
