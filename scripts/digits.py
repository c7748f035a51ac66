"""
Write scikit-learn's bundled handwritten digits (1,797 images of 8x8 pixels, 16 grey levels, classes 0-9; the UCI
"Optical Recognition of Handwritten Digits" test set) in the HW1 folder layout, as scripts/fashion_mnist.py does:

    OUT/train/<digit>/*.jpg, OUT/val/<digit>/*.jpg, OUT/test/*.jpg (flat), OUT/test_labels.csv, OUT/classes.csv

    python scripts/digits.py --out data/digits-32 --size 32

It needs no download: the images ship inside scikit-learn. Digits are a dataset where a horizontal flip changes
what an image shows, unlike photos and clothes.
"""

import argparse
import os

import numpy as np

from fashion_mnist import add_writing_args, check_out, hidden_name, run_cli, write_images, write_label_files


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Write scikit-learn's 8x8 digits in the HW1 folder layout.")
    p.add_argument("--out", required=True, help="output root (must be empty unless --overwrite)")
    p.add_argument("--size", type=int, default=32, help="output side in pixels, bicubic upscale from 8 "
                   "(default: %(default)s)")
    p.add_argument("--val-size", type=int, default=300, help="val images, stratified (default: %(default)s)")
    p.add_argument("--test-size", type=int, default=500, help="test images, stratified (default: %(default)s)")
    p.add_argument("--train-per-class", type=int, default=0, help="keep this many training images per digit "
                   "(default: 0 = all the rest, about 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default: %(default)s)")
    add_writing_args(p)
    args = p.parse_args(argv)
    if args.size < 8:
        p.error("--size must be at least 8 (the digits are 8x8)")
    if args.train_per_class < 0:
        p.error("--train-per-class must be 0 (all) or more")
    if args.val_size < 10 or args.test_size < 10 or args.val_size + args.test_size > 1797 - 100:
        p.error("--val-size and --test-size must be at least 10 each and leave at least 100 training images")
    return args


def split(labels, args):
    from sklearn.model_selection import train_test_split  # slow import: only once the arguments are good
    rest, test = train_test_split(np.arange(len(labels)), test_size=args.test_size, stratify=labels,
                                  random_state=args.seed)
    train, val = train_test_split(rest, test_size=args.val_size, stratify=labels[rest], random_state=args.seed)
    if args.train_per_class:
        rng = np.random.default_rng(args.seed)
        train = np.concatenate([rng.permutation(train[labels[train] == c])[:args.train_per_class] for c in range(10)])
    return np.sort(train), np.sort(val), np.sort(test)


def main(argv=None):
    args = parse_args(argv)
    from sklearn.datasets import load_digits
    check_out(args.out, args.overwrite)
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 grey levels -> 0..255
    labels = digits.target
    train, val, test = split(labels, args)
    jobs, rows = [], []
    for name, indices in (("train", train), ("val", val)):
        for i in indices:
            folder = os.path.join(args.out, name, str(labels[i]))
            os.makedirs(folder, exist_ok=True)
            jobs.append((images[i], os.path.join(folder, f"{i:04d}.jpg"), args.size, "jpg"))
    os.makedirs(os.path.join(args.out, "test"), exist_ok=True)
    for i in test:
        name = hidden_name(args.seed, i)
        rows.append((name, int(labels[i])))
        jobs.append((images[i], os.path.join(args.out, "test", f"{name}.jpg"), args.size, "jpg"))
    write_images(jobs, args.workers)
    write_label_files(args.out, rows, ((c, c) for c in range(10)))
    print(f"wrote {len(train)} train, {len(val)} val, {len(test)} test images ({args.size}px jpg) to {args.out}")


if __name__ == "__main__":
    run_cli(main)
