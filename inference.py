"""Turn a checkpoint into prediction.csv for a folder of test images, with test-time augmentation.

    python inference.py --checkpoint checkpoints/<run>/best.pt                 # reads data/test/
    python inference.py --checkpoint best.pt --test-dir photos/ --tta flip-crops --topk 5 --val-dir data/val
    python inference.py --checkpoint checkpoints/cv                            # ensemble of every best.pt below
    python inference.py --checkpoint best.pt --val-dir data/val --sweep-eval-size 224 256 288
    python inference.py --checkpoint best.pt --export model.onnx       # or model.pt (TorchScript): see export.py
    torchrun --nproc_per_node=4 inference.py --checkpoint best.pt      # a large test folder on 4 GPUs

prediction.csv has the header image_name,pred_label (--csv-columns id,label names them otherwise): every test image
once, sorted by name, the name without its extension, the label being the class folder's own name. Only the
checkpoint is needed: no train/ folder, no download.
Several checkpoints (or a folder of runs) make an ensemble: their softmaxes, each averaged over its TTA views, are
averaged; they must share the class list. Under torchrun every process predicts its own contiguous share of the
images, and the first one gathers them and writes the same files as a single process would.
"""
from __future__ import annotations

import gc

if __name__ == "__main__":
    gc.disable()  # no collections while torch and torchvision import (~1 s of start-up): run_cli enables them

import argparse
import collections
import dataclasses
import os

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import distributed
from augment import eval_crop, eval_sizes, eval_transform
from batches import loader_options
from checkpoint import checkpoint_files
from dataset import FlatImages, LabelledImages, find_classes
from errors import UserError, check_folder_path, run_cli
from export import export_members
from model import check_input_size, data_summary
from predict import TTA_MODES, load_model, predict_probs
from report import Labelled, write_report
from utils import amp_dtype, default_workers, native_bf16, pick_device, precision_name, short_list

# one checkpoint of the ensemble, ready to predict: its model (on the device, in eval mode), its config with the
# test-time sizes, which weights it holds ("raw" or "ema"), its file and its number of classes
Member = collections.namedtuple("Member", "model cfg source path num_classes")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Predict the class of every image in a test folder with a trained "
                                            "checkpoint and write prediction.csv (image_name,pred_label).")
    p.add_argument("--checkpoint", required=True, nargs="+",
                   help="best.pt or last.pt written by train.py; several files, or a folder (every best.pt below "
                        "it, e.g. the fold runs of --all-folds), average their softmaxes")
    p.add_argument("--data-dir", default="data", help="dataset root whose test/ folder is read (default: %(default)s)")
    p.add_argument("--test-dir", default=None, help="folder of test images; overrides --data-dir/test")
    p.add_argument("--output", default="prediction.csv", help="CSV to write (default: %(default)s)")
    add_file_args(p)
    p.add_argument("--tta", choices=TTA_MODES, default="flip",
                   help="deterministic test-time augmentation, softmax averaged over the views: none = centre crop; "
                        "flip = centre crop + its mirror; flip-crops = those two, the whole resized square and its "
                        "mirror, and the square's four corner crops (not mirrored): 8 views (default: %(default)s)")
    p.add_argument("--topk", type=int, default=0,
                   help="also write the K most likely labels and their probabilities to <output>_top<K>.csv")
    p.add_argument("--use", choices=["best", "ema", "raw"], default="best",
                   help="which weights of the checkpoint: best = the ones it recorded as scoring higher on val, ema = "
                        "the moving average, raw = the trained weights themselves (default: %(default)s)")
    # train.py's --weights is the pretrained source; here the old name for --use only says so
    p.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    p.add_argument("--val-dir", default=None,
                   help="a labelled folder (<class>/<image>): report its accuracy without and with the chosen TTA")
    p.add_argument("--eval-size", type=int, default=0,
                   help="centre-crop size at test time (default: the size each checkpoint was evaluated at)")
    p.add_argument("--eval-crop-ratio", type=float, default=0.0,
                   help="crop / resize ratio at test time, e.g. 224/232 = 0.9655 as torchvision's V2 weights "
                        "(default: each checkpoint's own)")
    p.add_argument("--report", nargs="?", const="", default=None, metavar="DIR",
                   help="with --val-dir: write the model report (per-class precision/recall/F1, confused pairs, "
                        "most confident mistakes, calibration, accuracy per TTA mode) to DIR (default: report/ "
                        "beside the checkpoint, or in the folder given as --checkpoint); no test folder needed")
    p.add_argument("--sweep-eval-size", type=int, nargs="+", default=[], metavar="SIZE",
                   help="with --val-dir: also report the val accuracy at each of these crop sizes, to find the best "
                        "test resolution for a model trained at another one")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    p.add_argument("--workers", type=int, default=-1, help="loader processes; -1 as in train.py: on the CPU none on "
                   "<= 2 cores, else one per other core; on a GPU one per core shared by its processes; at most 16")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to predict: auto = cuda when available, else cpu; under torchrun each process takes "
                        "its own GPU (default: %(default)s)")
    p.add_argument("--skip-bad", action="store_true",
                   help="an unreadable image does not stop the run: a test image still gets its row, predicted as "
                        "the most frequent training class, and every such file is named in a warning")
    args = p.parse_args(argv)
    if args.weights is not None:
        raise UserError(f"inference.py --weights is now --use (--use {args.weights}): --weights names the pretrained "
                        "weights of train.py")
    if args.topk < 0:
        p.error("--topk must be 0 or more")
    if not 0 <= args.eval_crop_ratio <= 1:
        p.error(f"--eval-crop-ratio {args.eval_crop_ratio:g} must lie in (0, 1]: it is crop / resize, e.g. 224/256 "
                "= 0.875 (a ratio above 1 would crop outside the image)")
    if min(args.eval_size, *args.sweep_eval_size, 0) < 0 or 0 in args.sweep_eval_size or args.batch_size < 1:
        p.error("--eval-size and --sweep-eval-size must be positive sizes, --batch-size at least 1")
    if args.sweep_eval_size and not args.val_dir:
        p.error("--sweep-eval-size needs --val-dir")
    if args.report is not None and not args.val_dir:
        p.error("--report needs --val-dir (a labelled folder to measure the model on)")
    return args


def check_outputs(args):
    """The files and folders to write, checked before the model runs: a wrong path fails at once, in one line."""
    for flag, path in [("--output", args.output), ("--export", args.export)]:
        if not path:
            continue
        if os.path.isdir(path):
            raise UserError(f"{flag} {path} is a folder: give a file name")
        check_folder_path(os.path.dirname(os.path.abspath(path)), flag)
    if args.report:
        check_folder_path(args.report, "--report")


def add_file_args(p):
    """What is written: the prediction CSV's header, or instead of predictions an exported model (export.py)."""
    p.add_argument("--csv-columns", type=csv_columns, default="image_name,pred_label", metavar="ID,LABEL",
                   help="header of the prediction CSV: the image name's column, then the label's, as another "
                        "competition asks, e.g. id,label (default: %(default)s)")
    p.add_argument("--export", default=None, metavar="FILE",
                   help="instead of predicting, write the checkpoint (or the ensemble) to FILE as ONNX (.onnx, needs "
                        "the onnx package) or TorchScript (.pt): uint8 centre crops in, softmax probabilities out, "
                        "with --tta none or flip baked in, normalisation inside, eval size, class names and chosen "
                        "weights in the file's metadata (README: Exporting a model)")


def csv_columns(text):
    """'id,label' -> ('id', 'label'): two different, non-empty column names."""
    names = tuple(name.strip() for name in text.split(","))
    if len(names) != 2 or not all(names) or names[0] == names[1]:
        raise UserError(f"--csv-columns {text!r}: give two different column names separated by a comma, the image "
                        "name's first, e.g. id,label")
    return names


# ---------------------------------------------------------------- model


def load_members(args, device):
    """Every checkpoint as (model, config, weights source, file), with the test-time sizes of the command line;
    the class names they share and the mean of their class priors."""
    members, classes, priors = [], None, []
    for path in checkpoint_files(args.checkpoint):
        model, cfg, own_classes, source, prior = load_model(path, args.use, device)
        if classes is None:
            classes, first = own_classes, path
        elif own_classes != classes:
            raise UserError(f"{path} was trained on other classes than {first} "
                            f"({len(own_classes)} vs {len(classes)} classes, or another order): they cannot be "
                            "ensembled")
        cfg = dataclasses.replace(cfg, eval_size=args.eval_size or eval_crop(cfg),
                                  eval_crop_ratio=args.eval_crop_ratio or cfg.eval_crop_ratio)
        check_input_size(cfg)  # a fixed-size model (a ViT) predicts at its own size only
        members.append(Member(model, cfg, source, path, len(own_classes)))
        priors.append(prior)
    return members, classes, np.mean(priors, axis=0)


# ---------------------------------------------------------------- test-time augmentation


def run_loader(member, loader, mode, desc, device, skip_bad=False):
    """A member's probabilities for every readable image of a loader, the second field of its batches (names or
    targets), and the messages of the unreadable images (an error unless skip_bad)."""
    probs, keys, bad = [torch.empty(0, member.num_classes)], [], []
    for images, second, bad_files in tqdm(loader, desc=desc, dynamic_ncols=True, disable=not distributed.is_main()):
        if bad_files and not skip_bad and not distributed.active():  # under torchrun: once the shards are gathered
            unreadable(bad_files)
        bad += bad_files
        if len(images):
            probs.append(predict_probs(member.model, images, device, member.cfg, mode))
            keys += list(second.tolist() if torch.is_tensor(second) else second)
    # each process predicted its own share: gathered back in dataset order
    shards = distributed.gather((torch.cat(probs).numpy(), keys, bad))
    probs, keys, bad = (np.concatenate([s[0] for s in shards]), [k for s in shards for k in s[1]],
                        [b for s in shards for b in s[2]])
    if bad and not skip_bad:
        unreadable(bad)
    for message in bad:
        tqdm.write(f"warning: unreadable image {message}")
    return probs, keys, bad


def unreadable(bad):
    raise UserError(f"unreadable image {bad[0]}; pass --skip-bad to predict around it")


def make_loader(dataset, batch_size, workers, device):
    """The loader of this process's contiguous share of the dataset (all of it in a single process)."""
    dataset = torch.utils.data.Subset(dataset, distributed.shard(len(dataset)))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                       **loader_options(default_workers(workers, device), device))


def ensemble_probs(members, make_dataset, args, device, mode, desc):
    """The mean over the members of their TTA-averaged softmax; each member sees the images at its own sizes.

    make_dataset(transform, draft_size) builds the folder's dataset; its order is fixed, so rows line up.
    Returns the probabilities, the keys of the readable images and the messages of the unreadable ones.
    """
    total, keys, bad = 0.0, None, []
    for i, member in enumerate(members):
        crop, ratio = eval_crop(member.cfg), member.cfg.eval_crop_ratio
        dataset = make_dataset(eval_transform(crop, ratio, member.cfg.interpolation), eval_sizes(crop, ratio)[0])
        label = desc if len(members) == 1 else f"{desc} {i + 1}/{len(members)}"
        loader = make_loader(dataset, args.batch_size, args.workers, device)
        probs, keys, bad = run_loader(member, loader, mode, label, device, args.skip_bad)
        total = total + probs
    return total / len(members), keys, bad


# ---------------------------------------------------------------- outputs

def write_predictions(names, probs, classes, path, columns=("image_name", "pred_label")):
    """One row per image, sorted by name; columns: the header (--csv-columns), the name's column first."""
    labels = [classes[i] for i in probs.argmax(1)]
    df = pd.DataFrame({columns[0]: names, columns[1]: labels}).sort_values(columns[0], kind="stable")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    df.to_csv(path, index=False)
    return df


def write_topk(names, probs, classes, k, path, name_column="image_name"):
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1)[:, :k]
    df = pd.DataFrame({name_column: names})
    for j in range(k):
        df[f"label_{j + 1}"] = [classes[i] for i in top[:, j]]
        df[f"prob_{j + 1}"] = probs[np.arange(len(names)), top[:, j]].round(6)
    df.sort_values(name_column, kind="stable").to_csv(path, index=False)


def val_probs(members, classes, val_dir, args, device, mode):
    def make_dataset(transform, draft):
        return LabelledImages(val_dir, classes, transform, draft_size=draft)
    return ensemble_probs(members, make_dataset, args, device, mode, f"val ({mode})")


def val_accuracy(members, classes, val_dir, args, device, mode):
    probs, targets, _ = val_probs(members, classes, val_dir, args, device, mode)
    return float((probs.argmax(1) == np.array(targets)).mean()), len(targets)


def default_report_dir(checkpoints):
    """report/ beside the checkpoint, or inside the folder an ensemble was given as (checkpoints/cv/report: the
    folder's own, removed with it by --overwrite, not the output folder that other ensembles share)."""
    first = os.path.abspath(checkpoints[0])
    return os.path.join(first if os.path.isdir(first) else os.path.dirname(first), "report")


def model_report(members, classes, val_dir, args, device):
    """Every TTA mode on the val folder, then report.py's files for the chosen one."""
    probs_by_mode = {}
    for mode in TTA_MODES:
        probs_by_mode[mode], targets, bad = val_probs(members, classes, val_dir, args, device, mode)
        acc = float((probs_by_mode[mode].argmax(1) == np.array(targets)).mean())
        print(f"val accuracy with TTA {mode:10s}: {acc:.4f} ({len(targets)} images)")
    # the readable images in loader order: an unreadable one comes back as the message "<path>: <reason>"
    paths = [path for path, _ in LabelledImages(val_dir, classes, None).samples
             if not any(m.startswith(path + ": ") for m in bad)]
    out = args.report or default_report_dir(args.checkpoint)
    first = members[0]
    title = f"{first.path} ({first.cfg.arch}, {first.source} weights)" if len(members) == 1 else f"ensemble of {len(members)} models"
    if distributed.is_main():
        write_report(out, probs_by_mode, Labelled(paths, targets, classes), args.tta, f"{title} on {val_dir}")
    print(f"wrote the model report to {out}/ (report.md, per_class.csv, confused_pairs.csv, tta.csv, "
          "misclassified.png, reliability.png)")


def validate(members, classes, val_dir, args, device):
    unknown = sorted(set(find_classes(val_dir)) - set(classes))
    if unknown:
        raise UserError(f"{val_dir} has class folders the checkpoint does not know ({short_list(unknown)}); "
                        f"it was trained on {short_list(classes)}")
    if any(m.cfg.folds for m in members):
        print("note: cross-validation runs trained on part of val/, so this accuracy is optimistic; the out-of-fold "
              "accuracy printed by train.py --all-folds is the fair estimate")
    if args.report is not None:
        model_report(members, classes, val_dir, args, device)  # prints the accuracy of every TTA mode
    for mode in dict.fromkeys(["none", args.tta]) if args.report is None else []:
        acc, n = val_accuracy(members, classes, val_dir, args, device, mode)
        print(f"val accuracy with TTA {mode:10s}: {acc:.4f} ({n} images)")
    # a ResNet pools globally, so it runs at any size; trained on small random crops it often scores best on
    # larger test crops (Touvron et al. 2019, "Fixing the train-test resolution discrepancy")
    for size in args.sweep_eval_size:
        at_size = [m._replace(cfg=dataclasses.replace(m.cfg, eval_size=size)) for m in members]
        for member in at_size:
            check_input_size(member.cfg)
        acc, n = val_accuracy(at_size, classes, val_dir, args, device, args.tta)
        resize, _ = eval_sizes(size, at_size[0].cfg.eval_crop_ratio)
        print(f"val accuracy at eval size {size} (resize {resize}), TTA {args.tta}: {acc:.4f} ({n} images)")


def precision_note(cfg, device):
    """The precision the checkpoint's --amp gives on this device, and whether the CPU only emulates it."""
    dtype = amp_dtype(cfg, device)
    emulated = dtype == torch.bfloat16 and not native_bf16(device)
    where = "CPU" if device.type == "cpu" else "GPU"
    return precision_name(dtype) + (f" (--amp bf16 of the run, emulated on this {where}: slow)" if emulated else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_outputs(args)
    device = distributed.setup(pick_device(args.device))
    members, classes, prior = load_members(args, device)
    for _, cfg, source, path, _ in members:
        print(f"{path}: {cfg.arch} ({source} weights); {data_summary(cfg)}; {precision_note(cfg, device)}")
    print(f"{len(members)} model(s), {len(classes)} classes, TTA {args.tta}, device {device}")
    if args.export:  # one file: under torchrun the first process writes it
        return export_members(members, classes, args.export, args.tta) if distributed.is_main() else 0
    if args.val_dir:
        validate(members, classes, args.val_dir, args, device)

    test_dir = args.test_dir or os.path.join(args.data_dir, "test")
    if args.report is not None and args.test_dir is None and not os.path.isdir(test_dir):
        print(f"no test folder {test_dir}: no predictions written")
        return 0

    def test_images(transform, draft):
        return FlatImages(test_dir, transform, draft_size=draft)
    probs, names, bad = ensemble_probs(members, test_images, args, device, args.tta, "test")
    if not distributed.is_main():  # the first process writes the files
        return 0
    if bad:  # every test file keeps its row: the unreadable ones get the training prior, i.e. the commonest class
        missing = sorted(set(test_images(None, None).names) - set(names))
        names += missing
        probs = np.concatenate([probs, np.tile(prior, (len(missing), 1))])
        print(f"warning: {len(missing)} unreadable test image(s) predicted as the most frequent training class "
              f"{classes[int(prior.argmax())]}: {', '.join(missing[:10])}{', ...' if len(missing) > 10 else ''}")
    df = write_predictions(names, probs, classes, args.output, args.csv_columns)
    print(f"wrote {args.output}: {len(df)} images, {df[args.csv_columns[1]].nunique()} distinct labels")
    if args.topk:
        stem, ext = os.path.splitext(args.output)
        top_path = f"{stem}_top{args.topk}{ext or '.csv'}"
        write_topk(names, probs, classes, args.topk, top_path, args.csv_columns[0])
        print(f"wrote {top_path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
