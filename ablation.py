"""Train a grid of settings on one dataset and compare them; by default the EMA x loss ablation (4 runs).

    python ablation.py --data-dir data/sample --arch resnet18 --weights none --img-size 64 --epochs 6
    python ablation.py --grid ema=on,off loss=ce,focal class_weights=none,balanced --repeats 3 --epochs 30

Every flag that ablation.py does not know goes to train.py unchanged. Writes <output-dir>/<name>/: one run folder
per setting and seed (the usual train.py outputs), summary.csv, report.md, curves.png and confusion_grid.png.
Runs go one after the other in this process; run the same command again to resume: finished runs are kept, an
interrupted one continues from its last checkpoint.
"""
import gc

if __name__ == "__main__":
    gc.disable()  # no collections while torch and torchvision import (~1 s of start-up): run_cli enables them

import argparse
import dataclasses
import itertools
import json
import os
import pathlib
import time

import numpy as np
import pandas as pd
import torch

import inference
import train
from config import Config
from errors import UserError, check_folder_path, run_cli
from history import better_weights, epoch_acc, history_table
from plots import draw_confusion, markdown_table, pyplot, save_figure
from scripts.score import read_csv, score
import predict

DEFAULT_GRID = ["ema=on,off", "loss=schedule,ce"]
RESERVED = {"seed", "output_dir", "run_name"}  # set by ablation.py itself for every run
DONE_FILE = "ablation_run.json"
METRICS = ["best_val_acc", "best_val_acc_raw", "best_val_acc_ema", "final_val_loss", "final_val_loss_ema",
           "best_epoch", "train_val_gap", "wall_seconds"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        allow_abbrev=False,  # an abbreviated train.py flag must reach train.py, not match one of ours
        description="Train every combination of a grid of train.py settings (by default EMA on/off x loss "
                    "schedule/ce) on one dataset, then compare the runs: summary.csv, report.md with main effects, "
                    "curves.png, confusion_grid.png.",
        epilog="Every other flag is passed to train.py (see python train.py --help), e.g. --data-dir, --arch, "
               "--epochs.")
    p.add_argument("--grid", nargs="+", default=DEFAULT_GRID, metavar="FIELD=A,B",
                   help="factors and their levels: any train.py setting (ema, loss, class_weights, lr, ...); "
                        "on/off for switches; several numbers of one level separated by spaces, e.g. "
                        "'rrc_scale=0.08 1,0.5 1' (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per setting with seeds --seed, --seed+1, ...; the report then gives mean ± std "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="first seed (default: %(default)s)")
    p.add_argument("--name", default="ablation", help="grid folder under --output-dir (default: %(default)s)")
    p.add_argument("--output-dir", default="checkpoints", help="where the grid folder goes (default: %(default)s)")
    p.add_argument("--test-labels", default=None, metavar="CSV",
                   help="image_name,label of the flat test folder (<data-dir>/test): each run's best.pt then "
                        "predicts it and the summary adds its test accuracy per --test-tta mode; selection stays "
                        "on val")
    p.add_argument("--test-tta", nargs="+", choices=predict.TTA_MODES, default=["none", "flip"],
                   help="TTA modes scored on the test folder (default: %(default)s)")
    args, train_args = p.parse_known_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.test_tta != p.get_default("test_tta") and not args.test_labels:
        raise UserError("--test-tta scores the test folder: it needs --test-labels")
    return args, train_args


# ---------------------------------------------------------------- the grid

def parse_grid(items):
    """['ema=on,off', 'loss=ce,focal'] -> {'ema': ['on', 'off'], 'loss': ['ce', 'focal']} in the given order."""
    fields = {f.name for f in dataclasses.fields(Config)}
    factors = {}
    for item in items:
        key, sep, values = item.partition("=")
        name = key.strip().lstrip("-").replace("-", "_")
        levels = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not levels:
            raise UserError(f"--grid {item}: write FIELD=LEVEL1,LEVEL2 (e.g. ema=on,off)")
        if name not in fields or name in RESERVED:
            raise UserError(f"--grid {item}: '{key}' is not a train.py setting that a grid can vary "
                            "(see python train.py --help)")
        if name in factors or len(set(levels)) < len(levels):
            raise UserError(f"--grid {item}: a factor or a level is given twice")
        factors[name] = levels
    return factors


def level_args(name, level):
    """The train.py flags of one factor level: on/off for switches, the level's words otherwise."""
    flag = "--" + name.replace("_", "-")
    default = {f.name: f for f in dataclasses.fields(Config)}[name].default
    if isinstance(default, bool):
        switch = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False,
                  "0": False}.get(level.lower())
        if switch is None:
            raise UserError(f"--grid {name}={level}: {name} is a switch, its levels are on and off")
        return [flag] if switch else ["--no-" + flag[2:]]
    return [flag, *level.split()]


def check_passthrough(train_args, factors):
    """A flag given both to the grid and directly would silently win or lose; refuse it instead."""
    typed = train.given_settings(train_args)  # train.py's own parser: an abbreviated flag counts too
    for name in [*factors, "run_name"]:  # --seed and --output-dir are ablation.py's own flags
        if name in typed:
            where = "--grid" if name in factors else "--name"
            raise UserError(f"--{name.replace('_', '-')}: this setting comes from ablation.py's {where}; drop it "
                            "from the other flags")


def plan(args, train_args):
    """One entry per run: its name, its settings (factor -> level), its seed and its full train.py argv."""
    factors = parse_grid(args.grid)
    check_passthrough(train_args, factors)
    grid_dir = os.path.join(args.output_dir, args.name)
    runs = []
    # seed-major: an ablation stopped early still holds whole replicates of the grid
    for seed in range(args.seed, args.seed + args.repeats):
        for levels in itertools.product(*factors.values()):
            settings = dict(zip(factors, levels))
            name = "_".join(f"{k.replace('_', '-')}-{v.replace(' ', '-').replace('/', '-')}"
                            for k, v in settings.items()) + f"_seed{seed}"
            argv = [*train_args, *itertools.chain(*(level_args(k, v) for k, v in settings.items())),
                    "--seed", str(seed), "--output-dir", grid_dir, "--run-name", name]
            runs.append(dict(name=name, settings=settings, seed=seed, argv=argv, dir=os.path.join(grid_dir, name)))
    for run in runs:
        train.parse_args(run["argv"])  # a mistyped flag stops here, before hours of training
    return factors, grid_dir, runs


def run_state(run):
    """'done', 'started' (same flags, unfinished: resumable) or 'new' (no run, or one with other flags)."""
    path = os.path.join(run["dir"], DONE_FILE)
    if not os.path.isfile(path):
        return "new"
    with open(path) as f:
        marker = json.load(f)
    if marker.get("argv") != run["argv"]:
        return "new"
    return "done" if marker.get("finished") else "started"


def write_marker(run, finished, seconds=None):
    with open(os.path.join(run["dir"], DONE_FILE), "w") as f:
        json.dump({"argv": run["argv"], "finished": finished, "wall_seconds": seconds}, f, indent=2)


def train_run(run, state):
    """train.main in this process (no second start-up cost). An interrupted run is resumed exactly where it stopped
    (train.py --resume auto); a new one replaces whatever the folder held. Returns train.py's exit code."""
    start = time.perf_counter()
    os.makedirs(run["dir"], exist_ok=True)
    if state == "new":
        write_marker(run, finished=False)
    code = train.main(run["argv"] + (["--resume", "auto"] if state == "started" else ["--overwrite"]))
    if code == 0:
        write_marker(run, finished=True, seconds=time.perf_counter() - start)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return code


# ---------------------------------------------------------------- summary

def test_scores(run, args, train_args):
    """Test accuracy of the run's best.pt per TTA mode, from predictions written once into the run folder."""
    if not args.test_labels:
        return {}
    data_dir = train.parse_args(run["argv"])[0].data_dir
    labels = read_csv(args.test_labels)
    scores = {}
    key = prediction_key(os.path.join(run["dir"], "best.pt"), os.path.join(data_dir, "test"))
    for mode in args.test_tta:
        path = os.path.join(run["dir"], f"test_prediction_{mode}.csv")
        stamp = pathlib.Path(path).with_suffix(".json")  # what the prediction was made from
        if not (os.path.isfile(path) and stamp.is_file() and stamp.read_text() == key):
            inference.main(["--checkpoint", os.path.join(run["dir"], "best.pt"), "--data-dir", data_dir,
                            "--tta", mode, "--output", path])
            stamp.write_text(key)
        scores[f"test_acc_{mode}"] = score(read_csv(path), labels)["accuracy"]
    return scores


def prediction_key(checkpoint, test_dir):
    """A cached test prediction stands for best.pt and the test folder as they were (each file's name, size and
    modification time): a retrained model or a replaced test folder is predicted again."""
    files = sorted((entry.name, entry.stat().st_size, entry.stat().st_mtime_ns) for entry in os.scandir(test_dir)
                   if entry.is_file())
    model = os.stat(checkpoint)
    return json.dumps({"checkpoint": [model.st_size, model.st_mtime_ns], "test_files": files})


def summarize(run):
    """One summary row from the run's history.csv; 'best' is the epoch train.py kept in best.pt."""
    history = history_table(run["dir"])
    raw = history["val_acc"]
    ema = history["val_acc_ema"] if "val_acc_ema" in history else pd.Series(np.nan, index=history.index)
    chosen = history.apply(epoch_acc, axis=1)  # the weights train.py keeps, raw or EMA
    best = int(chosen.idxmax())
    with open(os.path.join(run["dir"], DONE_FILE)) as f:
        wall = json.load(f)["wall_seconds"]
    return {**run["settings"], "seed": run["seed"], "run": run["name"],
            "best_val_acc": chosen[best], "best_val_acc_raw": raw.max(), "best_val_acc_ema": ema.max(),
            "final_val_loss": history["val_loss"].iloc[-1],
            "final_val_loss_ema": history["val_loss_ema"].iloc[-1] if "val_loss_ema" in history else np.nan,
            "best_epoch": int(history["epoch"][best]), "best_weights": better_weights(raw[best], ema[best]),
            "train_val_gap": history["train_acc"][best] - chosen[best], "epochs": len(history),
            "wall_seconds": wall}


def mean_std(values, digits=4, sign=""):
    """'0.7310 ± 0.0042' over the seeds (sample std), or the one value; sign='+' writes differences as +0.0100."""
    values = values.dropna()
    if values.empty:
        return "n/a"
    if len(values) == 1:
        return f"{values.iloc[0]:{sign}.{digits}f}"
    return f"{values.mean():{sign}.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def cell_table(summary, factors):
    """One row per setting: mean ± std over the seeds."""
    rows = []
    metrics = METRICS + [c for c in summary.columns if c.startswith("test_acc_")]
    for levels, group in summary.groupby(list(factors), sort=False):
        levels = levels if isinstance(levels, tuple) else (levels,)
        row = dict(zip(factors, levels), runs=len(group))
        for metric in metrics:
            row[metric] = mean_std(group[metric], digits=1 if metric in ("best_epoch", "wall_seconds") else 4)
        rows.append(row)
    return pd.DataFrame(rows)


def main_effects(summary, factors, metrics=("best_val_acc", "final_val_loss")):
    """Each level's metric minus the first level's, averaged over the other factors; spread over the seeds."""
    rows = []
    for factor, levels in factors.items():
        if len(levels) < 2:
            continue
        for level in levels:
            row = {"factor": factor, "level": level}
            for metric in metrics:
                per_seed = summary.groupby(["seed", factor])[metric].mean().unstack(factor)[levels]
                row[metric] = mean_std(per_seed[level])
                row[f"{metric} difference"] = ("reference" if level == levels[0] else
                                               mean_std(per_seed[level] - per_seed[levels[0]], sign="+"))
            rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- pictures

def settings_label(settings):
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def plot_curves(runs, path):
    """Val accuracy and val loss of every run overlaid: one colour per setting, dashed = EMA weights.
    Returns the legend's labels."""
    plt = pyplot()
    labels = list(dict.fromkeys(settings_label(r["settings"]) for r in runs))
    colours = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(13, 5))
    for run in runs:
        history = history_table(run["dir"]).dropna(subset=["val_acc"])  # --val-every
        label = settings_label(run["settings"])
        colour = colours(labels.index(label) % colours.N)
        first = run["seed"] == min(r["seed"] for r in runs)  # one legend entry per setting
        marker = "." if len(history) < 30 else None
        for ax, key in [(ax_acc, "val_acc"), (ax_loss, "val_loss")]:
            ax.plot(history["epoch"], history[key], "-", color=colour, marker=marker, label=label if first else None)
            if history.get(key + "_ema") is not None and history[key + "_ema"].notna().any():
                ax.plot(history["epoch"], history[key + "_ema"], "--", color=colour, marker=marker)
    ax_acc.set(title="val accuracy (dashed: EMA weights)", xlabel="epoch", ylabel="accuracy")
    ax_loss.set(title="val loss, plain cross-entropy (dashed: EMA weights)", xlabel="epoch", ylabel="loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    legend = ax_acc.get_legend_handles_labels()[1]
    save_figure(fig, path)
    return legend


def plot_confusion_grid(runs, factors, summary, path):
    """Each setting's best-epoch val confusion matrix (summed over seeds), side by side on one colour scale.
    Returns the panels' titles."""
    plt = pyplot()
    cells = list(dict.fromkeys(settings_label(r["settings"]) for r in runs))
    columns = len(list(factors.values())[-1])  # the last factor's levels side by side
    rows = -(-len(cells) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns + 1, 4.8 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, label in zip(axes.flat, cells):
        members = [r for r in runs if settings_label(r["settings"]) == label]
        counts = [pd.read_csv(os.path.join(r["dir"], "confusion_matrix.csv"), index_col=0) for r in members]
        classes = [str(c) for c in counts[0].columns]
        accuracy = mean_std(summary[summary["run"].isin([r["name"] for r in members])]["best_val_acc"])
        ax.axis("on")
        im = draw_confusion(ax, sum(c.to_numpy() for c in counts), classes, f"{label}\nbest val acc {accuracy}",
                            annotate=len(classes) <= 12)
        ax.title.set_fontsize(9)
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02, label="fraction of the true class")
    titles = [ax.get_title() for ax in axes.flat if ax.get_title()]
    save_figure(fig, path)
    return titles


# ---------------------------------------------------------------- report

def write_report(path, factors, summary, args, train_args):
    lines = ["# Ablation", "", f"`python ablation.py {' '.join(['--grid', *args.grid, '--repeats', str(args.repeats), *train_args])}`",
             "", f"{len(summary)} runs: {' x '.join(f'{k} ({len(v)})' for k, v in factors.items())}"
             f"{f' x {args.repeats} seeds' if args.repeats > 1 else ''}. best_val_acc is the accuracy of the weights "
             "kept in best.pt (the higher of raw and EMA); train_val_gap is the train accuracy (on augmented "
             "images) minus it at that epoch; wall_seconds is the whole run.", ""]
    if args.repeats > 1:
        lines += ["## Settings (mean ± std over the seeds)", "", markdown_table(cell_table(summary, factors))]
    lines += ["## Main effects", "",
              "Each level's mean, averaged over the other factors, and its difference to the factor's first level"
              f"{' (mean ± std over the seeds)' if args.repeats > 1 else ''}.", ""]
    tests = [c for c in summary.columns if c.startswith("test_acc_")]
    effects = main_effects(summary, factors, ("best_val_acc", *tests, "final_val_loss"))
    lines += [markdown_table(effects) if len(effects) else "no factor has two levels\n"]
    lines += ["## Curves", "", "![val curves](curves.png)", "",
              "## Confusion matrices", "", "![confusion matrices](confusion_grid.png)", "",
              "## Every run", "", markdown_table(summary)]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    args, train_args = parse_args(argv)
    factors, grid_dir, runs = plan(args, train_args)
    check_folder_path(grid_dir, "grid folder")
    os.makedirs(grid_dir, exist_ok=True)
    print(f"{len(runs)} runs in {grid_dir}: " + ", ".join(r["name"] for r in runs))
    for i, run in enumerate(runs):
        state = run_state(run)
        if state == "done":
            print(f"[{i + 1}/{len(runs)}] {run['name']}: already done, kept")
            continue
        print(f"[{i + 1}/{len(runs)}] {run['name']}: {'resuming ' if state == 'started' else ''}"
              f"python train.py {' '.join(run['argv'])}")
        code = train_run(run, state)
        if code != 0:  # stopped by a signal: train.py saved a resumable checkpoint
            print(f"stopped; run the same ablation.py command again to carry on from {run['name']}")
            return code

    summary = pd.DataFrame([{**summarize(r), **test_scores(r, args, train_args)} for r in runs])
    summary.to_csv(os.path.join(grid_dir, "summary.csv"), index=False, float_format="%.6g")
    write_report(os.path.join(grid_dir, "report.md"), factors, summary, args, train_args)
    plot_curves(runs, os.path.join(grid_dir, "curves.png"))
    plot_confusion_grid(runs, factors, summary, os.path.join(grid_dir, "confusion_grid.png"))
    tests = [c for c in summary.columns if c.startswith("test_acc_")]
    print(markdown_table(summary[[*factors, "seed", "best_val_acc", *tests, "best_epoch", "final_val_loss",
                                  "train_val_gap", "wall_seconds"]]))
    print(f"wrote {grid_dir}/: summary.csv, report.md, curves.png, confusion_grid.png")
    return 0


if __name__ == "__main__":
    run_cli(main)
