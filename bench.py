"""Throughput of our input pipeline, training step, whole epoch and inference, each against the seed-style loop
measured in the same run: the ratios, not the absolute numbers, are what carry from one busy machine to another.

    python bench.py                                    # CPU defaults (resnet18, 224 px, synthetic 500x375 JPEGs)
    python bench.py --arch resnext101_32x8d --batch-size 128 --device cuda --json bench-gpu.json

Seed style = PIL decode of the full-size JPEG, torchvision's whole augmentation per image in the loader (ColorJitter's
hue and the GaussianBlur on PIL images), float conversion and normalisation on the CPU, 2 loader workers, NCHW, fp32
on CPU and fp16 with a grad scaler on GPU, a loss.item() every step and an annotated confusion heatmap every epoch.
The whole-epoch part also gives the loop efficiency: our training loop's images/s over real images as a share of the
bare forward + backward + AdamW step of the same model and batch (target >= 85%). On a CPU with native bf16 (or with
--cpu-bf16) the step part adds our bf16 autocast step against our float32 step.
Prints a table and writes it as JSON (default bench.json).
"""
import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

import engine
from augment import BatchAugment, eval_sizes, eval_transform, torchvision_geometry, train_transform
from batches import collate_skipping_bad, loader_options, normalisation, to_float_batch
from config import Config
from dataset import LabelledImages, build_train_val
from errors import run_cli
from losses import TrainLoss
from model import IMAGENET_MEAN, IMAGENET_STD, build_model, resolve_data
from plots import confusion_counts, pyplot, save_figure
from predict import TTA_MODES, predict_probs
from progressive import epoch_sizes
from run import Progress, Run
from stopping import GracefulStop
from utils import (amp_dtype, autocast, default_workers, emulated_bf16_note, native_cpu_bf16, pick_device,
                   precision_name, seed_everything)

# dense bf16/fp16 tensor-core peaks in TFLOP/s, for the MFU column
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark our training and inference paths against the seed-style "
                                            "loop in one run; prints a table and writes JSON.")
    p.add_argument("--data-dir", default=None, help="an image folder with train/<class>/ and val/<class>/ "
                   "(default: synthetic 500x375 JPEGs in a temporary folder)")
    p.add_argument("--arch", default="resnet18", help="backbone for the step, epoch and inference parts "
                                                      "(default: %(default)s)")
    p.add_argument("--any-arch", action="store_true", help="--arch may be any timm image classifier, as in train.py")
    p.add_argument("--img-size", type=int, default=224, help="train crop size (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (default: %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: %(default)s)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="our mixed precision, as train.py (default: %(default)s)")
    p.add_argument("--no-channels-last", action="store_true", help="measure our step in NCHW")
    p.add_argument("--compile", action="store_true", help="torch.compile our model for the step part")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="loader worker counts for the input part (default: 0 and what --workers -1 picks here)")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="on the CPU, also time our step under bf16 autocast against float32 even where the CPU only "
                        "emulates bf16 (far slower there); where it computes bf16 natively the row is always added")
    p.add_argument("--images", type=int, default=128, help="synthetic train images (val gets a quarter): one "
                                                           "input-pipeline run and one epoch (default: %(default)s)")
    p.add_argument("--steps", type=int, default=2, help="training steps per timed round, after 2 warm-up steps "
                                                        "(default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per input and step setting, "
                                                          "ours and seed style in turns; the median is reported "
                                                          "(default: %(default)s)")
    p.add_argument("--parts", nargs="+", default=["input", "step", "epoch", "inference"],
                   choices=["input", "step", "epoch", "inference", "sizes"],
                   help="what to measure (default: all but sizes; sizes = our step at each side of a --progressive "
                        "plan against the full --img-size)")
    p.add_argument("--progressive", type=float, default=0.5,
                   help="with --parts sizes: the plan's first side as a share of --img-size (default: %(default)s)")
    p.add_argument("--json", default="bench.json", help="where the results go (default: %(default)s)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- data

def synthetic_photo(rng, width=500, height=375):
    """Smooth colour waves plus sensor-like noise: decodes and compresses like a photo, unlike pure noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    a, b, c = rng.uniform(15, 60, 3)
    img = np.stack([128 + 100 * np.sin(x / a + rng.uniform(0, 6)), 128 + 100 * np.cos(y / b),
                    128 + 60 * np.sin((x + y) / c)], axis=-1) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def make_synthetic(root, n_train, n_classes=10):
    rng = np.random.default_rng(0)
    n_classes = min(n_classes, n_train)
    for split, n in [("train", n_train), ("val", max(n_classes, n_train // 4))]:
        for i in range(n):
            folder = os.path.join(root, split, str(i % n_classes))
            os.makedirs(folder, exist_ok=True)
            synthetic_photo(rng).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    return root


def seed_transform(cfg):
    """The seed's per-image chain, all torchvision: our geometric steps (the same transforms), then ColorJitter,
    RandomGrayscale and GaussianBlur on the PIL image, float conversion, normalisation and erasing on the CPU."""
    geometric = torchvision_geometry(cfg)
    b, c, s, h = cfg.jitter
    return v2.Compose(geometric + [
        v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h),
        v2.RandomGrayscale(cfg.grayscale),
        v2.RandomApply([v2.GaussianBlur(cfg.blur_kernel, sigma=tuple(cfg.blur_sigma))], p=cfg.blur),
        v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.RandomErasing(cfg.erasing)])


def seed_heatmap(targets, preds, classes, path):
    """The seed's confusion figure: every class, every cell annotated with its count (as a seaborn heatmap with
    annot=True), drawn after every epoch."""
    plt = pyplot()
    n = len(classes)
    cm = confusion_counts(targets, preds, n)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * n), max(5, 0.3 * n)))
    ax.imshow(cm, cmap="Blues")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6)
    ax.set_xticks(range(n), classes, rotation=90)
    ax.set_yticks(range(n), classes)
    fig.tight_layout()
    save_figure(fig, path)


def subset(dataset, n):
    return torch.utils.data.Subset(dataset, list(range(min(n, len(dataset)))))


# ---------------------------------------------------------------- timing helpers

def cpu_model():
    """The CPU's name as Linux gives it, and whether it computes bf16 natively: CPU numbers differ by 3x between
    the machines we measured on, so a table of them must say which CPU it comes from."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        name = "cpu"
    return f"{name} ({'native' if native_cpu_bf16() else 'no native'} bf16)"


def load_average():
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def three_digits(value):
    return float(f"{value:.3g}") if value else None


def row(part, setting, ours, seed=None, unit="img/s", **extra):
    return dict(part=part, setting=setting, ours=three_digits(ours), seed=three_digits(seed),
                ratio=three_digits(ours / seed) if seed else None, unit=unit, **extra)


# ---------------------------------------------------------------- parts

def input_rates(cfg, data_dir, workers, images, repeats, device):
    """Images/s from the JPEG files to a normalised, augmented float batch on the device."""
    ours_set = LabelledImages(os.path.join(data_dir, "train"), sorted(os.listdir(os.path.join(data_dir, "train"))),
                              train_transform(cfg))
    seed_set = LabelledImages(ours_set.root, ours_set.classes, seed_transform(cfg))
    augment = BatchAugment.from_config(cfg)

    def ours():
        loader = torch.utils.data.DataLoader(subset(ours_set, images), batch_size=cfg.batch_size,
                                             **loader_options(workers, device))
        for batch, _, _ in loader:
            to_float_batch(batch, device, normalisation(cfg), cfg.erasing, augment, cfg.channels_last)

    def seed():
        loader = torch.utils.data.DataLoader(subset(seed_set, images), batch_size=cfg.batch_size,
                                             num_workers=workers, collate_fn=collate_skipping_bad)
        for batch, _, _ in loader:
            batch.to(device)

    n = min(images, len(ours_set))
    rounds = [(timed(ours, device), timed(seed, device)) for _ in range(repeats)]  # in turns, as step_rates
    ours_s, seed_s = (statistics.median(times) for times in zip(*rounds))
    return row("input pipeline", f"{workers} workers" + (" (1 core)" if workers == 0 else ""), n / ours_s, n / seed_s)


def make_step(arch, cfg, device, seed_style):
    """A closure doing one training step on a fixed uint8 batch, ours or seed style; and its model."""
    model = build_model(arch, 100, "none", cfg.head, cfg.head_dropout)
    criterion = TrainLoss(cfg, None)
    images = torch.randint(0, 256, (cfg.batch_size, 3, cfg.img_size, cfg.img_size), dtype=torch.uint8)
    targets = torch.randint(0, 100, (cfg.batch_size,))
    if seed_style:
        model.to(device)
        dtype = torch.float16 if device.type == "cuda" else None
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype is not None)
        x = to_float_batch(images, device, normalisation(cfg))  # the seed normalised in the loader: not in its step

        def step():
            optimizer.zero_grad()
            with autocast(device, dtype):
                loss = criterion(model(x), targets.to(device), 0)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss.item()
        return step, model, dtype
    engine.setup_backends(cfg, device)
    model = engine.prepare_model(model, cfg, device)
    dtype = amp_dtype(cfg, device)
    run = Run(cfg=cfg, model=model, device=device, dtype=dtype, optimizer=engine.build_optimizer(model, cfg),
              scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), criterion=criterion)
    augment = BatchAugment.from_config(cfg)
    micro = engine.micro_batch_size(cfg)
    batches = [(images[i:i + micro].pin_memory() if device.type == "cuda" else images[i:i + micro],
                targets[i:i + micro]) for i in range(0, cfg.batch_size, micro)]

    def step():
        engine.train_step(run, batches, epoch=0, augment=augment)
    return step, model, dtype


def step_flops(model, cfg, device, dtype):
    """FLOPs of one forward + backward of a batch, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast(device, dtype):
            out = model(x)
        out.float().sum().backward()
    return counter.get_total_flops()


def alternating_rates(steps_by_name, cfg, device, steps, repeats):
    """Images/s of each step closure, timed in turns (repeats rounds of `steps` steps each, after 2 warm-up steps)
    so that a change in the machine's load hits all of them; the median round counts."""
    for step in steps_by_name.values():
        for _ in range(2):
            step()  # warm-up: cuDNN autotuning, compilation, allocator
    seconds = {name: [] for name in steps_by_name}
    for _ in range(repeats):
        for name, step in steps_by_name.items():
            seconds[name].append(timed(lambda: [step() for _ in range(steps)], device))
    return {name: steps * cfg.batch_size / statistics.median(s) for name, s in seconds.items()}


def step_setting(arch, cfg, dtype):
    return (f"{arch}@{cfg.img_size} b{cfg.batch_size} {precision_name(dtype)} "
            f"{'channels_last' if cfg.channels_last else 'NCHW'}{' compiled' if cfg.compile else ''}")


def step_rates(arch, cfg, device, steps, repeats):
    """Seed-style and our step timed in turns; on a GPU also TFLOP/s, MFU and peak memory."""
    styles = {style: make_step(arch, cfg, device, style == "seed") for style in ("seed", "ours")}
    for _, model, _ in styles.values():
        model.train()
    rates = alternating_rates({style: step for style, (step, _, _) in styles.items()}, cfg, device, steps, repeats)
    extra = {}
    _, model, dtype = styles["ours"]
    if device.type == "cuda":
        extra["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)  # both models together
        tflops = step_flops(model, cfg, device, dtype) * rates["ours"] / cfg.batch_size / 1e12
        extra["ours_tflops"] = round(tflops, 1)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
        if peak:
            extra["ours_mfu"] = round(tflops / peak, 3)
    return row("train step", step_setting(arch, cfg, dtype), rates["ours"], rates["seed"], **extra)


def cpu_bf16_rates(arch, cfg, device, steps, repeats):
    """Our step under bf16 autocast against our float32 step on the CPU, in turns: bf16 pays off only where the
    CPU computes it natively (AVX512-BF16, AMX, Arm BF16); emulated it is far slower, which is why --amp auto
    keeps float32 on such a CPU."""
    closures = {amp: make_step(arch, dataclasses.replace(cfg, amp=amp), device, False)[0] for amp in ("bf16", "off")}
    rates = alternating_rates(closures, cfg, device, steps, repeats)
    native = "native bf16" if native_cpu_bf16() else "emulated bf16 (no bf16 instructions): slow"
    return row("train step bf16", f"{step_setting(arch, cfg, torch.bfloat16)}, {native}; seed column = our "
               "float32 step", rates["bf16"], rates["off"])


def size_rates(arch, cfg, device, steps, repeats, start):
    """Our step at each side a --progressive `start` plan trains at, timed in turns with the step at the full
    --img-size (the seed column): what the smaller early epochs save, per image."""
    plan = dataclasses.replace(cfg, epochs=10, progressive=start)
    closures = {side: make_step(arch, dataclasses.replace(cfg, img_size=side), device, False)[0]
                for side in sorted(set(epoch_sizes(plan)))}
    rates = alternating_rates(closures, cfg, device, steps, repeats)
    return [row("step per side", f"{arch}@{side} (--progressive {start:g} of {cfg.img_size}), batch "
                f"{cfg.batch_size}; seed column = the step at {cfg.img_size} px", rates[side], rates[cfg.img_size])
            for side in closures if side != cfg.img_size]


def seed_epoch(cfg, data_dir, device):
    """One epoch the seed's way: per-image CPU augmentation in 2 workers, NCHW, item() per step, heatmap."""
    train_set, val_set, classes = build_train_val(dataclasses.replace(cfg, data_dir=data_dir))
    train_set.transform = seed_transform(cfg)
    resize, crop = eval_sizes(cfg.img_size, cfg.eval_crop_ratio)
    val_set.draft_size = None  # full-size decode
    val_set.transform = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(crop), v2.PILToTensor()])
    model = build_model(cfg.arch, len(classes), "none", cfg.head, cfg.head_dropout).to(device)
    dtype = torch.float16 if device.type == "cuda" else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is not None)
    criterion = TrainLoss(cfg, None)
    common = dict(num_workers=2, collate_fn=collate_skipping_bad)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                               **common)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=cfg.batch_size, **common)
    model.train()
    for x, y, _ in train_loader:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        with autocast(device, dtype):
            loss = criterion(model(x), y, 0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss.item()
    model.eval()
    preds, targets = [], []
    with torch.no_grad():
        for x, y, _ in val_loader:
            with autocast(device, dtype):
                preds.append(model(to_float_batch(x, device, normalisation(cfg))).argmax(1).cpu())
            targets.append(y)
    with tempfile.TemporaryDirectory() as tmp:
        seed_heatmap(torch.cat(targets).numpy(), torch.cat(preds).numpy(), classes, os.path.join(tmp, "cm.png"))
    return len(train_loader) * cfg.batch_size, None, 0.0


def our_epoch(cfg, data_dir, device):
    """One epoch through train.py's own functions (loaders, step, validation), without the checkpoint writes.
    Returns the images trained on, the seconds of the training loop alone, and those of two warm-up steps on a
    random batch before it, as the bare step gets them (cuDNN autotuning and compilation are not the loop's cost;
    the whole-epoch time leaves them out, as the seed's epoch has none)."""
    cfg = dataclasses.replace(cfg, data_dir=data_dir, epochs=1)
    train_set, val_set, classes = build_train_val(cfg)
    engine.setup_backends(cfg, device)
    model = engine.prepare_model(build_model(cfg.arch, len(classes), "none", cfg.head, cfg.head_dropout), cfg, device)
    dtype = amp_dtype(cfg, device)
    train_loader, val_loader, _ = engine.make_loaders(cfg, train_set, val_set, device)
    optimizer = engine.build_optimizer(model, cfg)
    progress = Progress()
    with tempfile.TemporaryDirectory() as run_dir, GracefulStop() as stop:
        run = Run(cfg=cfg, model=model, device=device, dtype=dtype, optimizer=optimizer,
                  scheduler=engine.build_scheduler(optimizer, cfg, len(train_loader)),
                  scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
                  criterion=TrainLoss(cfg, None), run_dir=run_dir)  # save_every_steps 0: no checkpoint written
        warm_up = random_batch(cfg, len(classes))
        warm_up_seconds = timed(lambda: [engine.train_step(run, [warm_up], epoch=0) for _ in range(2)], device)
        train_seconds = timed(lambda: engine.train_one_epoch(run, train_loader, epoch=0, progress=progress, stop=stop),
                              device)
    engine.evaluate(model, val_loader, run)
    return progress.seen, train_seconds, warm_up_seconds


def random_batch(cfg, num_classes):
    """A uint8 batch of --batch-size random images and its targets, as the loader gives them."""
    return (torch.randint(0, 256, (cfg.batch_size, 3, cfg.img_size, cfg.img_size), dtype=torch.uint8),
            torch.randint(0, num_classes, (cfg.batch_size,)))


def bare_step(cfg, num_classes, device):
    """The least a training step can do with our model, batch size, image size, memory format, precision and
    optimiser: forward, cross-entropy, backward and AdamW on one float batch already on the device, with no loader,
    augmentation, loss bookkeeping or host synchronisation."""
    model = engine.prepare_model(build_model(cfg.arch, num_classes, "none", cfg.head, cfg.head_dropout), cfg, device)
    model.train()
    optimizer = engine.build_optimizer(model, cfg)
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    images, targets = random_batch(cfg, num_classes)
    x = to_float_batch(images, device, normalisation(cfg), channels_last=cfg.channels_last)
    y = targets.to(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            logits = model(x)
        scaler.scale(torch.nn.functional.cross_entropy(logits.float(), y)).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


def epoch_rates(cfg, data_dir, device, steps, repeats):
    """The whole epoch, ours against the seed's; and the loop efficiency: our training loop's images/s over real
    images against the bare step's of the same model and batch, timed in rounds before and after the epoch."""
    seed_everything(0)
    num_classes = len(os.listdir(os.path.join(data_dir, "train")))
    bare = bare_step(cfg, num_classes, device)
    before = alternating_rates({"bare": bare}, cfg, device, steps, max(1, repeats // 2))["bare"]
    rates = {}
    for name, run in [("seed", seed_epoch), ("ours", our_epoch)]:
        seed_everything(0)
        start = time.perf_counter()
        images, loop_seconds, warm_up_seconds = run(cfg, data_dir, device)
        sync(device)
        rates[name] = images / (time.perf_counter() - start - warm_up_seconds)
    loop_rate = images / loop_seconds  # ours, the last of the two
    after = alternating_rates({"bare": bare}, cfg, device, steps, max(1, repeats - repeats // 2))["bare"]
    bare_rate = (before + after) / 2  # the load may change while the epochs run: timed on both sides of them
    workers = default_workers(cfg.workers, device)
    return [row("whole epoch", f"{cfg.arch}@{cfg.img_size}, train + val, ours {workers} workers, seed 2",
                rates["ours"], rates["seed"]),
            row("loop efficiency", f"our training loop {loop_rate:.3g} img/s over real images ({workers} workers) / "
                f"bare forward+backward+AdamW {bare_rate:.3g} img/s", 100 * loop_rate / bare_rate, unit="%",
                target=">= 85%")]


def inference_rates(cfg, data_dir, device):
    """Images/s of prediction (decode, resize, batched TTA forward) per TTA mode, with our loader."""
    val_dir = os.path.join(data_dir, "val")
    resize, _ = eval_sizes(cfg.img_size, cfg.eval_crop_ratio)
    dataset = LabelledImages(val_dir, sorted(os.listdir(val_dir)), eval_transform(cfg.img_size, cfg.eval_crop_ratio),
                             draft_size=resize)
    model = build_model(cfg.arch, len(dataset.classes), "none", cfg.head, cfg.head_dropout).to(device).eval()
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    rows = []
    for mode in TTA_MODES:
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size,
                                             **loader_options(default_workers(cfg.workers, device), device))

        def run():
            for images, _, _ in loader:
                predict_probs(model, images, device, cfg, mode)
        rows.append(row("inference", f"TTA {mode}", len(dataset) / timed(run, device)))
    return rows


# ---------------------------------------------------------------- main

def print_table(rows):
    print("\n| part | setting | ours | seed style | ratio |\n| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        extra = "".join(f", {k} {v}" for k, v in r.items()
                        if k not in ("part", "setting", "ours", "seed", "ratio", "unit"))
        seed = f"{r['seed']:g}" if r["seed"] else ""
        ratio = f"{r['ratio']:g}x" if r["ratio"] else ""
        print(f"| {r['part']} | {r['setting']}{extra} | {r['ours']:g} {r['unit']} | {seed} | {ratio} |")


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    device = pick_device(args.device)
    cfg = resolve_data(Config(arch=args.arch, img_size=args.img_size, batch_size=args.batch_size, amp=args.amp,
                              device=args.device, channels_last=not args.no_channels_last, compile=args.compile,
                              workers=-1, any_arch=args.any_arch))
    if emulated_bf16_note(cfg, device):  # the figures would time emulated bf16: say so, as train.py does
        print(f"warning: {emulated_bf16_note(cfg, device)}")
    worker_counts = args.workers if args.workers is not None else sorted({0, default_workers(-1, device)})
    threads = torch.get_num_threads()
    meta = dict(device=str(torch.cuda.get_device_name() if device.type == "cuda" else cpu_model()),
                cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                torch=torch.__version__, load_average=load_average(),
                args=vars(args))
    print(f"bench on {meta['device']} ({meta['cores']} cores, load {meta['load_average']}), torch {torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or make_synthetic(tmp, args.images)
        if "input" in args.parts:
            for workers in worker_counts:
                torch.set_num_threads(1)  # the same cores for both: one per worker, one for the main process
                rows.append(input_rates(cfg, data_dir, workers, args.images, args.repeats, device))
                print(rows[-1])
            torch.set_num_threads(threads)
        if "step" in args.parts:
            rows.append(step_rates(args.arch, cfg, device, args.steps, args.repeats))
            print(rows[-1])
            if device.type == "cpu" and (args.cpu_bf16 or native_cpu_bf16()):
                rows.append(cpu_bf16_rates(args.arch, cfg, device, args.steps, args.repeats))
                print(rows[-1])
        if "sizes" in args.parts:
            sized = size_rates(args.arch, cfg, device, args.steps, args.repeats, args.progressive)
            rows += sized
            print(*sized, sep="\n")
        if "epoch" in args.parts:
            rows += epoch_rates(cfg, data_dir, device, args.steps, args.repeats)
            print(*rows[-2:], sep="\n")
        if "inference" in args.parts:
            rows += inference_rates(cfg, data_dir, device)
    meta["load_average_end"] = load_average()
    meta["wall_s"] = round(time.perf_counter() - start)
    print_table(rows)
    print(f"\n{meta['wall_s']} s, load average {meta['load_average']} at the start, {meta['load_average_end']} at the end")
    with open(args.json, "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=2)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    run_cli(main)
