"""
The evidence of README "Recipe search": on three small datasets unlike HW1, trained from scratch on the CPU, compare
three recipes with the same model and image size, each over several seeds, on the held-back test set:

    plain     scripts/plain_baseline.py (RandomResizedCrop 0.6-1 + flip, linear head, CE, AdamW 1e-3, cosine)
    defaults  train.py with its defaults (the HW1 recipe), as many epochs as the plain script
    searched  train.py --config best_config.json of a tune.py search on the dataset (--space wide), for the epochs
              that fit: guessed from the search's runs, then set from the first seed's own run

Each recipe trains for at most the plain script's mean wall time (train.py's --time-limit).

    python scripts/search_evidence.py                 # all three datasets, about 2 hours on two CPU cores
    python scripts/search_evidence.py --only digits   # one of them

Every run is kept under --out and skipped when the same command runs again, so it resumes where it stopped
(other --epochs/--search/--trial-epochs need another --out).
The table (markdown) is printed and written to <out>/summary.md, the numbers to <out>/summary.json, a plot of
every run's test accuracy to <out>/summary.png.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name: (command that writes the dataset, epochs of every compared run, tune.py budget, epochs per search trial,
# flags of every train.py run there: the digits' val set is larger than their train set, the letters' more than half
# of it, so validating every epoch would take a third of the time)
DATASETS = {
    "fashion-mnist": (["scripts/fashion_mnist.py", "--size", "32", "--train-per-class", "300",
                       "--val-per-class", "100"], 10, "20m", 3, []),
    "digits": (["scripts/digits.py", "--size", "32", "--train-per-class", "20", "--test-size", "800"], 60, "20m",
               20, ["--val-every", "5"]),
    "glyphs": (["scripts/glyphs.py", "--size", "32"], 30, "20m", 10, ["--val-every", "5"]),
}
CONFIRM_SEEDS = 2  # tune.py's default
MODEL = ["--arch", "resnet18", "--weights", "none", "--img-size", "32", "--eval-crop-ratio", "1",
         "--batch-size", "64"]


def run(cmd, log, ok=(0,)):
    """Run one command with its output in log; return its wall time in seconds."""
    print("+", " ".join(cmd), flush=True)
    start = time.monotonic()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode not in ok:
        with open(log) as f:
            last = ([line.strip() for line in f if line.strip()] or ["no output"])[-1]
        sys.exit(f"error: {cmd[0]} failed (exit {done.returncode}): {last} (full output: {log})")
    return time.monotonic() - start


def scored(data, out, name, train_cmd, predict_cmd=None):
    """Train (and predict), score the prediction against test_labels.csv; cached in <out>/<name>.json."""
    path = os.path.join(out, f"{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    # exit 124: train.py stopped at --time-limit, with best.pt from the epochs it finished
    seconds = run(train_cmd, os.path.join(out, f"{name}.train.log"), ok=(0, 124))
    if predict_cmd and not os.path.exists(predict_cmd[predict_cmd.index("--checkpoint") + 1]):
        sys.exit(f"error: {name} reached the plain script's wall time before its first epoch ended: give more "
                 "--epochs, so that the plain script trains longer")
    if predict_cmd:
        run(predict_cmd, os.path.join(out, f"{name}.predict.log"))
    score_json = os.path.join(out, f"{name}.score.json")
    run(["scripts/score.py", os.path.join(out, f"{name}.csv"), os.path.join(data, "test_labels.csv"),
         "--json", score_json], os.path.join(out, f"{name}.score.log"))
    with open(score_json) as f:
        result = {"test_acc": json.load(f)["accuracy"], "train_seconds": round(seconds, 1)}
    history = os.path.join(out, name, "history.csv")
    result["epochs"] = len(pd.read_csv(history)) if predict_cmd else int(train_cmd[train_cmd.index("--epochs") + 1])
    with open(path, "w") as f:
        json.dump(result, f)
    return result


def ours(data, out, name, flags):
    """A train.py run and its test prediction (no TTA: the comparison is of training recipes)."""
    train_cmd = ["train.py", "--data-dir", data, "--output-dir", out, "--run-name", name, "--overwrite", *flags]
    predict_cmd = ["inference.py", "--checkpoint", os.path.join(out, name, "best.pt"), "--data-dir", data,
                   "--tta", "none", "--output", os.path.join(out, f"{name}.csv")]
    return scored(data, out, name, train_cmd, predict_cmd)


def search(data, out, budget, trial_epochs, tune_flags, model):
    """tune.py on the dataset (tune_flags: its --final-epochs and --confirm-seeds), unless it ran before."""
    config = os.path.join(out, "search", "best_config.json")
    if not os.path.exists(config):
        length = ["--trials", budget] if budget.isdigit() else ["--budget", budget]
        run(["tune.py", "--data-dir", data, *length, "--space", "wide", "--epochs-per-trial", str(trial_epochs),
             *tune_flags, "--name", "search", "--output-dir", out, "--", *model],
            os.path.join(out, "search.log"))
    trials = pd.read_csv(os.path.join(out, "search", "trials.csv"))
    searched = trials[trials["role"] == "search"]
    return config, {"budget": budget, "epochs_per_trial": trial_epochs, "search_trials": len(searched),
                    "pruned": int((searched["state"] == "pruned").sum()),
                    "confirm_runs": int((trials["role"] != "search").sum())}


def fitting_epochs(out, wall):
    """A first guess at the epochs of the searched recipe that fit in the plain script's wall time, from the
    winner's own runs in the search (their start-up counts once per epoch here, so it errs on the short side)."""
    trials = pd.read_csv(os.path.join(out, "search", "trials.csv"))
    winner = int(pd.read_csv(os.path.join(out, "search", "ranking.csv"))["trial"][0])
    own = (trials["trial"] == winner) | trials["role"].str.startswith(f"confirm of {winner} ")
    runs = trials[own & (trials["state"] == "complete")]
    return max(1, int(wall * runs["epochs"].sum() / runs["seconds"].sum()))


def refit_epochs(guess, first, wall, most):
    """The epochs that fit in `wall` seconds, from the first run of `guess` epochs: fewer when the time limit cut it
    short (its cosine schedule unfinished), more (up to `most`) when it ended early; its start-up counts once per
    epoch here, so that errs on the short side."""
    if first["epochs"] < guess:
        return max(1, first["epochs"] - 1)
    return min(most, max(guess, int(guess * wall / first["train_seconds"])))


def same_settings(root, settings):
    """Runs are reused by name: refuse a folder whose runs were made with other settings."""
    path = os.path.join(root, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        if before != settings:
            sys.exit(f"error: {root} holds runs made with {before}, not {settings}: give another --out")
    os.makedirs(root, exist_ok=True)
    with open(path, "w") as f:
        json.dump(settings, f)


def one_dataset(name, args):
    """The three recipes on one dataset, each trained for the plain script's wall time: the runs, the search."""
    make, epochs, budget, trial_epochs, extra = DATASETS[name]
    epochs, budget, trial_epochs = args.epochs or epochs, args.search or budget, args.trial_epochs or trial_epochs
    seeds, root, model = args.seeds, os.path.join(args.out, name), [*MODEL, *extra]
    same_settings(root, {"epochs": epochs, "search": budget, "trial_epochs": trial_epochs, "seeds": seeds,
                         **({"flags": extra} if extra else {}),
                         **({"confirm_seeds": args.confirm_seeds} if args.confirm_seeds != CONFIRM_SEEDS
                            else {})})
    data, out = os.path.join(root, "data"), os.path.join(root, "runs")
    os.makedirs(out, exist_ok=True)
    if not os.path.isdir(os.path.join(data, "train")):
        run([*make, "--out", data], os.path.join(root, "data.log"))
    rows = [{"recipe": "plain", "seed": seed, **scored(data, out, f"plain-{seed}", [
        "scripts/plain_baseline.py", "--data-dir", data, "--epochs", str(epochs), "--seed", str(seed),
        "--output", os.path.join(out, f"plain-{seed}.csv")])} for seed in seeds]
    wall = round(sum(r["train_seconds"] for r in rows) / len(rows))  # every recipe trains this long at most
    limit = ["--time-limit", f"{wall}s", "--seed"]
    for seed in seeds:
        flags = [*model, "--epochs", str(epochs), *limit, str(seed)]
        rows.append({"recipe": "defaults", "seed": seed, **ours(data, out, f"defaults-{seed}", flags)})
    tune_flags = ["--final-epochs", str(epochs), "--confirm-seeds", str(args.confirm_seeds)]
    config, info = search(data, out, budget, trial_epochs, tune_flags, model)
    fitting = min(epochs, fitting_epochs(out, wall))
    # runs are cached by name: the winner's own settings are part of it, so a search run again names new runs
    with open(config, "rb") as f:
        recipe = hashlib.sha1(f.read()).hexdigest()[:8]
    searched = {}
    for seed in seeds:
        flags = ["--config", config, "--epochs", str(fitting), *limit, str(seed)]
        searched[seed] = ours(data, out, f"searched-{recipe}-e{fitting}-{seed}", flags)
        if seed == seeds[0]:  # the first run times the recipe itself: the epochs that really fit, for every seed
            fitting = refit_epochs(fitting, searched[seed], wall, epochs)
            if fitting != searched[seed]["epochs"]:
                searched[seed] = ours(data, out, f"searched-{recipe}-e{fitting}-{seed}",
                                      [*flags[:3], str(fitting), *flags[4:]])
    rows += [{"recipe": "searched", "seed": seed, **result} for seed, result in searched.items()]
    with open(config) as f:
        shown = {k: v for k, v in json.load(f).items() if k not in ("data_dir", "output_dir", "run_name", "epochs")}
    info["winner"] = shown
    return pd.DataFrame(rows), {"epochs": epochs, "wall_seconds": wall, **info}


def summary(name, runs, info):
    table = runs.groupby("recipe", sort=False).agg(
        test_acc=("test_acc", "mean"), std=("test_acc", "std"), seeds=("seed", "count"),
        train_s=("train_seconds", "mean"), epochs=("epochs", "mean"))
    length = f"{info['budget']} trials" if info["budget"].isdigit() else f"budget {info['budget']}"
    lines = [f"### {name}: every recipe trains for at most {info['wall_seconds']} s, the plain script's "
             f"{info['epochs']} epochs; search ({length}): {info['search_trials']} trials of "
             f"{info['epochs_per_trial']} epochs ({info['pruned']} pruned) + {info['confirm_runs']} confirmation "
             "runs", "", "| recipe | test acc % (mean ± std) | vs plain | seeds | epochs | train wall s |",
             "| --- | --- | --- | --- | --- | --- |"]
    plain = table.loc["plain", "test_acc"]
    for recipe, r in table.iterrows():
        lines.append(f"| {recipe} | {100 * r.test_acc:.2f} ± {100 * r['std']:.2f} | "
                     f"{100 * (r.test_acc - plain):+.2f} | {int(r.seeds)} | {r.epochs:.3g} | {r.train_s:.0f} |")
    lines += ["", "winner: `" + json.dumps(info["winner"]) + "`", ""]
    return "\n".join(lines), table


def plot(results, path):
    """Test accuracy of every run (dots) and each recipe's mean (bars), one panel per dataset."""
    sys.path.insert(0, ROOT)
    from plots import pyplot, save_figure
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (name, runs) in zip(axes[0], results.items()):
        recipes = list(dict.fromkeys(runs["recipe"]))
        means = [100 * runs[runs["recipe"] == r]["test_acc"].mean() for r in recipes]
        ax.bar(recipes, means, color=["C7", "C3", "C2"][:len(recipes)], alpha=0.5)
        for i, r in enumerate(recipes):
            ax.plot([i] * (runs["recipe"] == r).sum(), 100 * runs[runs["recipe"] == r]["test_acc"], "k.")
            ax.annotate(f"{means[i]:.1f}", (i, means[i]), ha="center", va="bottom")
        low = min(100 * runs["test_acc"].min(), min(means))
        ax.set(title=name, ylabel="test accuracy %", ylim=(max(0, low - 5), 100))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def main():
    p = argparse.ArgumentParser(description="Plain script vs train.py defaults vs tune.py's recipe on small datasets.")
    p.add_argument("--out", default=os.path.join(ROOT, "checkpoints", "search-evidence"),
                   help="folder of the datasets, runs and summary (default: checkpoints/search-evidence)")
    p.add_argument("--only", choices=list(DATASETS), default=None, help="run one dataset (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=0, help="epochs of every compared run (default: 0 = the "
                   "dataset's: fashion-mnist 10, digits 60, glyphs 30)")
    p.add_argument("--search", default="", help="tune.py's length: a budget (25m) or a number of trials "
                   "(default: the dataset's: 20m each)")
    p.add_argument("--confirm-seeds", type=int, default=CONFIRM_SEEDS, help="extra seeds tune.py re-runs its "
                   "top configurations with before it names the winner (default: %(default)s, tune.py's)")
    p.add_argument("--trial-epochs", type=int, default=0, help="epochs per search trial (default: 0 = the "
                   "dataset's: fashion-mnist 3, digits 20, glyphs 10)")
    args = p.parse_args()
    if min(args.epochs, args.trial_epochs, args.confirm_seeds) < 0 or len(set(args.seeds)) != len(args.seeds):
        p.error("--epochs, --trial-epochs and --confirm-seeds cannot be negative, and --seeds must differ")
    texts, numbers, results = [], {}, {}
    for name in [args.only] if args.only else DATASETS:
        runs, info = one_dataset(name, args)
        text, table = summary(name, runs, info)
        texts.append(text)
        numbers[name], results[name] = {"runs": runs.to_dict("records"), **info}, runs
    plot(results, os.path.join(args.out, "summary.png"))
    report = "\n".join(texts)
    print(report)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(numbers, f, indent=1)


if __name__ == "__main__":
    main()
