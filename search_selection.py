"""The recipe search's honest selection: the study's trials by role, the confirmation runs of the top
configurations with more seeds (each claimed by a lock, so two processes never train one in the same folder), the
ranking by mean over seeds, and how much of the winner's lead is noise."""
from __future__ import annotations

from typing import TYPE_CHECKING

import contextlib
import math
import os
import time

from search_cv import class_images, pooled_images, recipe_epochs, run_recipe
from trials import POLL_SECONDS, Search, progress_line, standard_error

if TYPE_CHECKING:
    import argparse
    
    import optuna

SE_MULTIPLE = 2  # a lead counts as beyond noise when it exceeds this many standard errors


def started(study: optuna.Study) -> list:
    """The study's trials but the --first-trials still waiting for a process to run them."""
    import optuna
    return [t for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.WAITING]


def finished(study: optuna.Study, role: str, complete_only: bool = False) -> list:
    import optuna
    states = (optuna.trial.TrialState.COMPLETE,) if complete_only else (
        optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [t for t in study.get_trials(deepcopy=False, states=states) if t.user_attrs.get("role") == role]


def top_trials(study: optuna.Study, n: int) -> list:
    return sorted(finished(study, "search", complete_only=True), key=lambda t: (-t.value, t.number))[:n]


def confirmations(study, source: int) -> dict:
    """{seed: value} of the finished confirmation runs of one search trial (the first of duplicates)."""
    found = {}
    for t in finished(study, "confirm", complete_only=True):
        if t.user_attrs.get("source") == source:
            found.setdefault(t.user_attrs["seed"], t.value)
    return found


def confirm(search: Search, study: optuna.Study) -> None:
    """Re-run the top configurations with the next seeds, each run recorded in the study (role confirm). A run that
    another process on this machine is doing (two processes sharing a study reach the confirmation together) is
    left to it at first, and waited for at the end; if it still has no result then, this process runs it."""
    args = search.args
    runs = [(source, seed) for source in (top_trials(study, args.confirm_top) if args.confirm_seeds else [])
            for seed in range(args.seed + 1, args.seed + 1 + args.confirm_seeds)]
    for wait in (False, True):
        taken = []
        for source, seed in runs:
            if search.deadline is not None and search.deadline - time.monotonic() <= 0:
                print("confirmation incomplete: the budget ran out")
                return
            if not confirm_one(search, study, source, seed, wait):
                taken.append((source, seed))
        for source, seed in taken:
            print(f"confirm {source.number} seed {seed}: " + ("still running in another process at the end of the "
                  "budget" if wait else "another process is running it; waiting for it at the end"))
        runs = taken


def confirm_one(search: Search, study, source, seed: int, wait: bool) -> bool:
    """One confirmation run, unless the study holds its result already; False when another process holds its
    claim and `wait` is off. The claim is a lock on locks/<run>.lock in the study folder, released when its process
    ends however it ends."""
    import optuna
    name = f"{source.number:04d}-seed{seed}"
    with run_claim(os.path.join(search.study_dir, "locks", f"{name}.lock"), wait, search.deadline) as mine:
        if not mine:
            return False
        if seed in confirmations(study, source.number):
            return True  # done earlier, or by another process sharing the study
        left = None if search.deadline is None else search.deadline - time.monotonic()
        settings = source.user_attrs["settings"]
        outcome = run_recipe(search, settings, name, seed, left or 0)
        print(progress_line(f"confirm {source.number} seed {seed}", settings, outcome, recipe_epochs(search.args)),
              flush=True)
        if outcome.state == "complete":  # a run the budget cut short is not comparable; a failed one says why
            study.add_trial(optuna.trial.create_trial(
                params=source.params, distributions=source.distributions, value=outcome.value,
                user_attrs=dict(role="confirm", source=source.number, seed=seed, settings=settings,
                                epochs=outcome.epochs, seconds=outcome.seconds, n_val=outcome.n_val)))
    return True


@contextlib.contextmanager
def run_claim(path: str, wait: bool, deadline: float | None):
    """Hold an exclusive lock on the file `path` while a run of the study folder trains: yields True when this
    process holds it, False when another does (after waiting for it until the deadline, with `wait`)."""
    try:
        import fcntl
    except ImportError:  # Windows: no claims, as before them
        yield True
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait or (deadline is not None and time.monotonic() >= deadline):
                    yield False
                    return
                time.sleep(POLL_SECONDS)
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ranking(study: optuna.Study, args: argparse.Namespace) -> list[dict]:
    """The configurations compared for the win: the top search trials and every one with confirmation runs (an
    earlier top, or another machine's), with their mean val accuracy over seeds, the val set's SE and the seed
    spread. Ranked by seeds first, then by mean: a single search value is the best of many draws and inflated by
    that selection, so a configuration with fewer seeds (its confirmation cut by the budget, failed, or not run
    yet) is ranked after the ones with more, however high its value."""
    confirmed = {t.user_attrs.get("source") for t in finished(study, "confirm", complete_only=True)}
    top = top_trials(study, args.confirm_top if args.confirm_seeds else 1)
    top += [t for t in finished(study, "search", complete_only=True) if t.number in confirmed and t not in top]
    ranked = []
    for t in top:
        values = [t.value, *confirmations(study, t.number).values()]
        mean = sum(values) / len(values)
        spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        ranked.append(dict(trial=t.number, mean=mean, seeds=len(values), seed_std=spread,
                           se=standard_error(mean, t.user_attrs.get("n_val", 0)), settings=t.user_attrs["settings"]))
    return sorted(ranked, key=lambda r: (-r["seeds"], -r["mean"], r["trial"]))


def seeds_text(entry: dict) -> str:
    return f"{entry['seeds']} seed{'s' * (entry['seeds'] != 1)}"


def fewer_seeds_note(ranked: list[dict]) -> str:
    """Which configurations were ranked after the winner's group for having fewer seeds, or ""."""
    fewer = [r for r in ranked if r["seeds"] < ranked[0]["seeds"]] if ranked else []
    if not fewer:
        return ""
    names = ", ".join(f"trial {r['trial']} ({seeds_text(r)}, mean {r['mean']:.4f})" for r in fewer)
    return (f"ranked after the configurations with {seeds_text(ranked[0])}: {names}; a value from fewer seeds is "
            "the best of the search's draws and inflated by that selection, so it is not compared with confirmed "
            "means (run the same command again to confirm them)")


def val_images(data_dir: str, val_fraction: float, cv: int = 0) -> int:
    """How many images the recipes are scored on: val/'s, or the --val-fraction share of train/'s; with --cv, every
    image of train/ and val/ (each held out once)."""
    val_dir, train_dir = os.path.join(data_dir, "val"), os.path.join(data_dir, "train")
    if cv:
        return sum(pooled_images(data_dir).values())
    return sum(class_images(val_dir).values()) if os.path.isdir(val_dir) else \
        round(val_fraction * sum(class_images(train_dir).values()))


def val_size_note(data_dir: str, val_fraction: float, cv: int = 0) -> str:
    """Before a search: when the images a recipe is scored on are too few to tell recipes two points apart, what
    they can tell apart, and what would tell more."""
    n = val_images(data_dir, val_fraction, cv)
    noise = 2 * math.sqrt(2 * 0.85 * 0.15 / n) if n else 0.0  # 2 SE of a difference of two accuracies near 85%
    if noise <= 0.02:
        return ""
    scored = f"out-of-fold accuracy over {n} images (--cv {cv})" if cv else f"val accuracy on {n} images"
    more = "a larger val/ or train/ for a finer choice" if cv else \
        "--cv 5 scores each recipe on all of train/ + val/ (5 times the time per trial); a larger val/, or -- " \
        "--val-fraction on a train/ alone, for a finer choice"
    return (f"note: the recipes are scored by {scored}: two recipes' scores differ by up to {100 * noise:.1f} "
            "points from the noise of that set alone (2 standard errors of a difference, near 85% accuracy), so the "
            f"search can only tell apart recipes further apart than that; {more}")


def noise_note(ranked: list[dict]) -> str:
    """How much of the winner's lead over the runner-up is within noise, in one sentence."""
    if len(ranked) < 2:
        return "only one configuration was compared: there is no runner-up to measure a lead against"
    win, second = ranked[:2]
    lead = win["mean"] - second["mean"]
    val_se = math.sqrt(win["se"] ** 2 + second["se"] ** 2)
    seeds = min(win["seeds"], second["seeds"]) > 1
    seed_se = math.sqrt(win["seed_std"] ** 2 / win["seeds"] + second["seed_std"] ** 2 / second["seeds"])
    noise = max(val_se, seed_se if seeds else 0.0)
    single = [f"trial {r['trial']}" for r in (win, second) if r["seeds"] == 1]
    seed_text = f", the seeds' spread gives {seed_se * 100:.2f}" if seeds else \
        f" (no seed spread: {' and '.join(single)} {'has' if len(single) == 1 else 'have'} one seed)"
    verdict = f"within noise (less than {SE_MULTIPLE} standard errors): the runner-up may be as good" \
        if lead <= SE_MULTIPLE * noise else f"beyond {SE_MULTIPLE} standard errors"
    return (f"trial {win['trial']} ({seeds_text(win)}) leads trial {second['trial']} ({seeds_text(second)}) by "
            f"{lead * 100:.2f} points of mean val accuracy; the val set's standard error of that difference is "
            f"{val_se * 100:.2f} points{seed_text}: the lead is {verdict}")


SE_MULTIPLE = 2  # a lead counts as beyond noise when it exceeds this many standard errors
