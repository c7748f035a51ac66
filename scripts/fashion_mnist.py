"""
Convert Fashion-MNIST (idx .gz files) into the HW1 folder layout:

    OUT/train/<class>/*.jpg     labelled, class folders "0".."9"
    OUT/val/<class>/*.jpg       labelled, stratified split of the 60k train set
    OUT/test/*.jpg              flat, unlabelled (the 10k t10k images)
    OUT/test_labels.csv         image_name,label for test/ (kept outside test/)
    OUT/classes.csv             folder,name

Examples:
    python scripts/fashion_mnist.py --out data/fashion_mnist          # full 55k/5k/10k
    python scripts/fashion_mnist.py --sample --out data/sample        # small committed sample

The source files come from Debian's dataset-fashion-mnist package.
"""

import argparse
import gzip
import hashlib
import os
import shutil
import sys
from multiprocessing import Pool

import numpy as np
from PIL import Image
from tqdm import tqdm

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "sudo apt-get install dataset-fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# what --sample means: small enough to commit, big enough to smoke-test training
SAMPLE = dict(train_per_class=30, val_per_class=10, test_count=50)
# paths this script owns inside --out; --overwrite replaces only these, so a
# hand-written file next to them (e.g. a LICENSE.md) survives a regeneration
OWNED = ["train", "val", "test", "test_labels.csv", "classes.csv"]


class UsageError(Exception):
    """A problem the user can fix; reported as one line, exit code 2."""


# -----------------------------------------------------------------------------
# reading idx files

def read_idx(path):
    # idx format: 2 zero bytes, a dtype byte (0x08 = uint8), a byte with the number
    # of dimensions, then one big-endian uint32 per dimension, then the raw data
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UsageError(f"cannot read {path}: {e}")
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UsageError(f"{path} is not a uint8 idx file")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise UsageError(f"{path} is truncated: header says {dims}, got {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_split(source_dir, prefix):
    images = read_idx(os.path.join(source_dir, FILES[prefix + "_images"]))
    labels = read_idx(os.path.join(source_dir, FILES[prefix + "_labels"]))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UsageError(f"{prefix} images {images.shape} and labels {labels.shape} do not match")
    return images, labels


# -----------------------------------------------------------------------------
# choosing which images go where

def cap_per_class(indices, labels, n, rng):
    # a seeded subset with the same number of images from every class
    if n is None:
        return indices
    keep = []
    for c in np.unique(labels[indices]):
        members = indices[labels[indices] == c]
        keep.append(rng.permutation(members)[:n])
    return np.sort(np.concatenate(keep))


def take_stratified(indices, labels, n, seed):
    # n images keeping the class proportions, so a 50-image test slice still has every class
    from sklearn.model_selection import train_test_split  # slow import, see plan()
    if n is None or n >= len(indices):
        return indices
    n_classes = len(np.unique(labels[indices]))
    stratify = labels[indices] if n >= n_classes else None  # sklearn needs >= 1 per class
    subset, _ = train_test_split(indices, train_size=n, stratify=stratify, random_state=seed)
    return np.sort(subset)


def hidden_name(seed, index):
    # test names must not leak the label (nor sort by it), yet be stable across runs
    return hashlib.sha1(f"{seed}-test-{index}".encode()).hexdigest()[:12]


def plan(args, train_labels, test_labels):
    """Return (train_idx, val_idx, test_idx), indices into the source arrays."""
    # sklearn takes seconds to import, so it is imported only once the inputs are known to be good
    from sklearn.model_selection import train_test_split
    n_train, n_classes = len(train_labels), len(np.unique(train_labels))
    if not n_classes <= args.val_size <= n_train - n_classes:
        raise UsageError(f"--val-size must be between {n_classes} and {n_train - n_classes} "
                         f"(stratified: at least one image per class on each side), got {args.val_size}")
    train_idx, val_idx = train_test_split(
        np.arange(n_train), test_size=args.val_size,
        stratify=train_labels, random_state=args.seed)
    rng = np.random.default_rng(args.seed)
    train_idx = cap_per_class(np.sort(train_idx), train_labels, args.train_per_class, rng)
    val_idx = cap_per_class(np.sort(val_idx), train_labels, args.val_per_class, rng)
    test_idx = take_stratified(np.arange(len(test_labels)), test_labels, args.test_count, args.seed)
    return train_idx, val_idx, test_idx


# -----------------------------------------------------------------------------
# writing images

def save_image(job):
    # runs in a worker process; the 28x28 array is small enough to ship per job
    pixels, path, size, fmt = job
    img = Image.fromarray(pixels)  # 2-D uint8 -> mode "L"
    if size != pixels.shape[0]:
        img = img.resize((size, size), Image.BICUBIC)
    img = img.convert("RGB")  # the training code expects 3 channels, as in HW1
    if fmt == "jpg":
        img.save(path, quality=95)
    else:
        img.save(path)


def write_images(jobs, workers):
    if workers <= 1:
        for job in tqdm(jobs, desc="writing", unit="img"):
            save_image(job)
        return
    with Pool(workers) as pool:
        for _ in tqdm(pool.imap_unordered(save_image, jobs, chunksize=256),
                      total=len(jobs), desc="writing", unit="img"):
            pass


def add_writing_args(p, overwrite_help="write into a non-empty --out"):
    """--overwrite and --workers, shared by the scripts that write a dataset in the homework layout."""
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                   help="processes used to encode images (default: %(default)s)")


def write_label_files(out, rows, classes):
    """test_labels.csv (image_name,label of the flat test/ folder) and classes.csv (folder,name)."""
    with open(os.path.join(out, "test_labels.csv"), "w") as f:
        f.write("image_name,label\n" + "".join(f"{name},{label}\n" for name, label in sorted(rows)))
    with open(os.path.join(out, "classes.csv"), "w") as f:
        f.write("folder,name\n" + "".join(f"{folder},{name}\n" for folder, name in classes))


def check_out(out, overwrite):
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"{out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise UsageError(f"{out} is not empty; pass --overwrite to replace its contents")


def prepare_out(out):
    if os.path.isdir(out):
        for name in OWNED:
            path = os.path.join(out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    for split in ("train", "val"):
        for c in range(len(CLASS_NAMES)):
            os.makedirs(os.path.join(out, split, str(c)), exist_ok=True)
    os.makedirs(os.path.join(out, "test"), exist_ok=True)


# -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Convert Fashion-MNIST into the HW1 folder layout.")
    p.add_argument("--source-dir", default=DEFAULT_SOURCE,
                   help="folder with the four idx .gz files (default: %(default)s)")
    p.add_argument("--out", required=True, help="output root (must be empty unless --overwrite)")
    p.add_argument("--size", type=int, default=64, help="output side in pixels, bicubic upscale from 28")
    p.add_argument("--format", choices=["jpg", "png"], default="jpg")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-size", type=int, default=5000,
                   help="images moved from train to val (stratified)")
    p.add_argument("--train-per-class", type=int, default=None, help="cap train images per class")
    p.add_argument("--val-per-class", type=int, default=None, help="cap val images per class")
    p.add_argument("--test-count", type=int, default=None, help="cap test images (stratified)")
    p.add_argument("--sample", action="store_true",
                   help="small sample: 30 train + 10 val per class, 50 test images")
    add_writing_args(p, "replace train/ val/ test/ and the csv files in a non-empty --out")
    args = p.parse_args(argv)
    if args.sample:
        for key, value in SAMPLE.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    if args.size < 1:
        p.error("--size must be positive")
    for key in ("train_per_class", "val_per_class", "test_count"):
        value = getattr(args, key)
        if value is not None and value < 1:
            p.error(f"--{key.replace('_', '-')} must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)

    missing = [f for f in FILES.values() if not os.path.isfile(os.path.join(args.source_dir, f))]
    if missing:
        raise UsageError(f"Fashion-MNIST not found in {args.source_dir} (missing {missing[0]}); "
                         f"install it with: {INSTALL_HINT}")
    check_out(args.out, args.overwrite)
    train_images, train_labels = load_split(args.source_dir, "train")
    test_images, test_labels = load_split(args.source_dir, "test")
    if train_labels.max() >= len(CLASS_NAMES) or test_labels.max() >= len(CLASS_NAMES):
        raise UsageError(f"labels must be in 0..{len(CLASS_NAMES) - 1}")

    train_idx, val_idx, test_idx = plan(args, train_labels, test_labels)
    prepare_out(args.out)

    ext = args.format
    jobs = []
    # train and val both come from the 60k file, so its index is a unique, stable name
    for split, indices in (("train", train_idx), ("val", val_idx)):
        for i in indices:
            path = os.path.join(args.out, split, str(train_labels[i]), f"{i:05d}.{ext}")
            jobs.append((train_images[i], path, args.size, ext))
    rows = []
    for i in test_idx:
        name = hidden_name(args.seed, i)
        rows.append((name, int(test_labels[i])))
        jobs.append((test_images[i], os.path.join(args.out, "test", f"{name}.{ext}"), args.size, ext))
    if len({name for name, _ in rows}) != len(rows):
        raise UsageError("test name collision; try another --seed")  # 48-bit names, so never in practice

    write_images(jobs, args.workers)

    write_label_files(args.out, rows, enumerate(CLASS_NAMES))

    print(f"wrote {len(train_idx)} train, {len(val_idx)} val, {len(test_idx)} test images "
          f"({args.size}px {ext}) to {args.out}")


def run_cli(main_function):
    """Run a script's main(): a UsageError is one line on stderr and exit code 2, never a traceback."""
    try:
        main_function()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_cli(main)
