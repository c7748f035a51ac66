"""The recipe search's report: report.md with the ranking and the noise verdict, trials.csv and ranking.csv, and
the plots (optimisation history, parameter importances, the top configurations' val curves)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import os

from history import epoch_acc, read_history, validated
from plots import markdown_table, pyplot, save_figure
from search_selection import finished, started
from search_space import short
from trials import Search, standard_error

if TYPE_CHECKING:
    import argparse

    import optuna


def trials_table(study):
    import pandas as pd
    rows = []
    for t in started(study):
        attrs = t.user_attrs
        value = t.value if t.value is not None else float("nan")
        rows.append({"trial": t.number, "role": attrs.get("role", "?") + (
            f" of {attrs['source']} (seed {attrs['seed']})" if attrs.get("role") == "confirm" else ""),
            "state": t.state.name.lower(), "val acc": value,
            "± SE": standard_error(value, attrs.get("n_val", 0)), "epochs": attrs.get("epochs", 0),
            "seconds": round(attrs.get("seconds", 0)), "settings": short(attrs.get("settings", {})),
            "error": attrs.get("error", "")})
    return pd.DataFrame(rows)


def plot_history(study, path: str) -> None:
    """Each search trial's val accuracy (a pruned one's last epoch) and the best so far."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    best, xs, bests = -1.0, [], []
    for t in sorted(finished(study, "search"), key=lambda t: t.number):
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        value = t.value if t.state.name == "COMPLETE" else last
        if value is None:
            continue
        ax.plot(t.number, value, "o" if t.state.name == "COMPLETE" else "x", color="C0" if t.state.name ==
                "COMPLETE" else "C3")
        if t.state.name == "COMPLETE":
            best = max(best, value)
            xs.append(t.number)
            bests.append(best)
    ax.step(xs, bests, where="post", color="C1", label="best so far")
    ax.set(xlabel="trial", ylabel="val accuracy", title="optimisation history (o complete, x pruned)")
    ax.legend()
    save_figure(fig, path)


def importances(study) -> dict:
    """fANOVA importances (optuna's own, numpy only) of the complete search trials; {} when they are too few."""
    import optuna
    trials = finished(study, "search", complete_only=True)
    if len(trials) < 2:
        return {}
    alone = optuna.create_study(direction="maximize")
    alone.add_trials(trials)
    try:
        return optuna.importance.get_param_importances(alone, evaluator=optuna.importance.FanovaImportanceEvaluator(
            seed=0))
    except (RuntimeError, ValueError):  # e.g. every trial drew the same values
        return {}


def plot_importances(values: dict, trials: int, path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(values) + 1.5))
    names = list(values)[::-1]
    ax.barh(names, [values[n] for n in names])
    ax.set(xlabel="importance (fANOVA, share of the val accuracy's variance)", title=f"parameter importances, from {trials} complete trials (rough when they are few)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_top_curves(search: Search, ranked: list[dict], path: str) -> None:
    """Val accuracy per epoch of every run of the top configurations (search run solid, extra seeds dashed)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, entry in enumerate(ranked):
        trials_dir = os.path.join(search.study_dir, "trials")  # this machine's runs, when machines share a study
        runs = sorted(name for name in (os.listdir(trials_dir) if os.path.isdir(trials_dir) else [])
                      if name.split("-")[0] == f"{entry['trial']:04d}" and not name.endswith(".log"))
        for run in runs:  # a --cv recipe: its first fold, the one the pruner judged
            rows = validated(read_history(os.path.join(trials_dir, run, "fold0" if search.args.cv else "",
                                                       "history.csv")))
            ax.plot([int(r["epoch"]) for r in rows], [epoch_acc(r) for r in rows], "--" if "seed" in run else "-",
                    color=f"C{i}", marker=".", label=f"trial {entry['trial']}" if "seed" not in run else None)
    ax.set(xlabel="epoch", ylabel="val accuracy (the better of raw and EMA)", title="the top configurations"
           + (" (first fold)" if search.args.cv else ""))
    ax.legend()
    save_figure(fig, path)


def scored_by(args: argparse.Namespace) -> str:
    return f"out-of-fold accuracy over train/ + val/ (--cv {args.cv}; the column's val acc)" if args.cv else \
        "val accuracy"


def write_report(search: Search, study: optuna.Study, ranked: list[dict], lines: list[str]) -> str:
    """report.md with the ranking, the noise note, the final command and the plots; trials.csv beside it."""
    import pandas as pd
    out, args = search.study_dir, search.args
    table = trials_table(study)
    table.to_csv(os.path.join(out, "trials.csv"), index=False)
    plot_history(study, os.path.join(out, "history.png"))
    plot_top_curves(search, ranked, os.path.join(out, "curves.png"))
    weights = importances(study)
    if weights:
        plot_importances(weights, len(finished(study, "search", complete_only=True)),
                         os.path.join(out, "importance.png"))
    counts = table["state"].value_counts().to_dict() if len(table) else {}
    ranking_table = pd.DataFrame([{"trial": r["trial"], "mean val acc": r["mean"], "± SE": r["se"],
                                   "seeds": r["seeds"], "seed std": r["seed_std"], "settings": short(r["settings"])}
                                  for r in ranked])
    ranking_table.to_csv(os.path.join(out, "ranking.csv"), index=False)  # the winner first
    text = [f"# Recipe search `{args.name}`", "",
            f"Data `{args.data_dir}`, space `{args.space}`, {args.epochs_per_trial} epochs per trial, shared train.py "
            f"flags `{' '.join(search.train_args) or '(none)'}`. Trials: "
            + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) + ".", "",
            "## Winner", "", f"Ranked by the mean {scored_by(args)} over the search run and the confirmation seeds; "
            "± SE is the standard error sqrt(p(1-p)/n) of the images scored.", "", markdown_table(ranking_table), *lines, "",
            "## Optimisation history", "", "![history](history.png)", "", "## Parameter importances", "",
            "![importances](importance.png)" if weights else "Too few complete trials (or too little variety "
            "among them) for importances.", "", "## Val curves of the top configurations", "",
            "![curves](curves.png)", "", "## All trials", "", markdown_table(table.drop(columns=["error"]))]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(text))
    return path
