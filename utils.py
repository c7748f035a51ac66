"""EMA of weights, checkpoints, seeding, plots and small helpers shared by the scripts."""
import os
import random
import signal
import tempfile
from contextlib import nullcontext

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from errors import UserError, run_cli  # noqa: F401  (run_cli: the scripts import it from here)


# ---------------------------------------------------------------- EMA

def ema_avg_fn(decay):
    """AveragedModel multi_avg_fn with warmup: decay_t = min(decay, (1 + t) / (10 + t)), t = updates so far.

    Early on the average follows the weights closely, so a short run still gets a useful EMA. Integer buffers
    (BatchNorm's num_batches_tracked) are copied, float ones (running mean/var) are averaged like the weights.
    """
    def update(ema_list, model_list, num_averaged):
        t = float(num_averaged)
        d = min(decay, (1 + t) / (10 + t))
        floats = [(e, m) for e, m in zip(ema_list, model_list) if e.is_floating_point()]
        others = [(e, m) for e, m in zip(ema_list, model_list) if not e.is_floating_point()]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1 - d)
        for e, m in others:
            e.copy_(m)
    return update


def make_ema(model, decay):
    """An AveragedModel over parameters and buffers, updated after every optimiser step by the training loop."""
    return AveragedModel(model, multi_avg_fn=ema_avg_fn(decay), use_buffers=True)


# ---------------------------------------------------------------- seeding and devices

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too; loader workers derive their seeds from the torch generator


def seed_worker(worker_id):
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    # Ctrl-C and SIGTERM reach the whole process group: the main process stops the run cleanly and shuts the
    # workers down itself, which it could not do if they had died mid-batch
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def default_workers(requested):
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(16, cores - 1))  # the main process keeps a core for the device work


def amp_dtype(cfg, device):
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# ---------------------------------------------------------------- checkpoints

def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, fsync, rename, fsync the folder: a crash or kill -9 at
    any moment leaves either the old file or the new one, never a partial one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would create it, not mkstemp's owner-only mode
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_folder(folder)


def fsync_folder(folder):
    """Make a rename inside `folder` durable (POSIX; elsewhere the rename itself is all there is)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path):
    """Our checkpoints hold tensors and plain types only; anything else (pickled code) is refused."""
    if not os.path.isfile(path):
        raise UserError(f"no such checkpoint: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if "Unsupported global" in line), lines[0])
        raise UserError(f"refusing to load {path}: not a plain checkpoint of tensors ({reason[:300]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "classes" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by train.py (no model/classes/config entries)")
    return ckpt


def unwrap(model):
    """The plain module under DDP, torch.compile or AveragedModel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, AveragedModel)):
            model = model.module
        else:
            return model


# ---------------------------------------------------------------- plots

def pyplot():
    """matplotlib with the file-only Agg backend, imported on first use so that --help and errors stay fast."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(history, path):
    """Loss and accuracy per epoch: train vs val, raw vs EMA weights."""
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label, style in [("train_loss", "train", "-"), ("val_loss", "val (raw)", "-"),
                              ("val_loss_ema", "val (EMA)", "--")]:
        values = [h.get(key) for h in history]
        if any(v is not None and v == v for v in values):
            ax_loss.plot(epochs, values, style, label=label, marker="." if len(epochs) < 30 else None)
    for key, label, style in [("train_acc", "train", "-"), ("val_acc", "val (raw)", "-"),
                              ("val_acc_ema", "val (EMA)", "--")]:
        values = [h.get(key) for h in history]
        if any(v is not None and v == v for v in values):
            ax_acc.plot(epochs, values, style, label=label, marker="." if len(epochs) < 30 else None)
    ax_loss.set(title="loss (val: plain cross-entropy)", xlabel="epoch", ylabel="loss")
    ax_acc.set(title="accuracy", xlabel="epoch", ylabel="accuracy", ylim=(0, 1.01))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def confusion_counts(targets, preds, n):
    """n x n counts: rows are true classes, columns predicted ones (scikit-learn's layout)."""
    from sklearn.metrics import confusion_matrix
    return confusion_matrix(targets, preds, labels=list(range(n)))


def row_normalise(cm):
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def draw_confusion(ax, cm, classes, title, annotate=True):
    """A row-normalised matrix on a fixed 0..1 colour scale, so that panels side by side compare directly."""
    n = len(classes)
    im = ax.imshow(row_normalise(cm), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    step = 1 if n <= 50 else max(1, n // 50)
    ax.set_xticks(range(0, n, step), [classes[i] for i in range(0, n, step)], rotation=90,
                  fontsize=8 if n > 30 else 10)
    ax.set_yticks(range(0, n, step), [classes[i] for i in range(0, n, step)], fontsize=8 if n > 30 else 10)
    if annotate and n <= 30:  # cell values only while they stay readable
        normalised = row_normalise(cm)
        for i in range(n):
            for j in range(n):
                if normalised[i, j] >= 0.005:
                    ax.text(j, i, f"{normalised[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if normalised[i, j] > 0.5 else "black")
    ax.set(title=title, xlabel="predicted class", ylabel="true class")
    return im


def plot_confusion(targets, preds, classes, path, title="confusion matrix"):
    """Row-normalised validation confusion matrix as a PNG, its counts beside it as CSV (same name, .csv)."""
    import pandas as pd
    plt = pyplot()
    n = len(classes)
    cm = confusion_counts(targets, preds, n)
    pd.DataFrame(cm, index=pd.Index(classes, name="true"), columns=classes).to_csv(os.path.splitext(path)[0] + ".csv")
    side = min(4 + 0.35 * n, 30)
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
    im = draw_confusion(ax, cm, classes, title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    save_figure(fig, path)


def markdown_table(df, floats="{:.4f}"):
    """A pandas DataFrame as a GitHub markdown table (pandas' own to_markdown needs the tabulate package)."""
    def cell(v):
        return floats.format(v) if isinstance(v, (float, np.floating)) else str(v)
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + " --- |" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def save_figure(fig, path):
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    pyplot().close(fig)
    os.replace(tmp, path)
