"""Search train.py's recipe (LR, weight decay, augmentation, loss, head, EMA, mixing) in a time budget with Optuna.

    python tune.py --data-dir photos --budget 2h -- --arch resnet50 --batch-size 64
    python tune.py --data-dir data/sample --trials 8 --epochs-per-trial 3 -- --arch resnet18 --weights none --img-size 64

Every trial is a real train.py run (a subprocess, the same loop and checkpoints) in <output-dir>/<name>/trials/; its
history.csv is read after each epoch, the val accuracy reported to Optuna, and a trial the pruner gives up on is
stopped with SIGTERM (train.py saves last.pt and exits); a trial's checkpoints are deleted when it ends
(--keep-checkpoints keeps them). The study lives in <output-dir>/<name>/study.db (or
--storage URL), so the same command continues it and several machines can share one. At the end the best
configurations are run again with more seeds, ranked by their mean, and the winner written to best_config.json
(python train.py --config best_config.json takes it as it is), with report.md and its plots.
Flags after -- (or any flag tune.py does not know) go to every trial's train.py unchanged.
"""
from __future__ import annotations

import gc

if __name__ == "__main__":
    gc.disable()  # no collections while torch and torchvision import (~1 s of start-up): run_cli enables them

import argparse
import dataclasses
import json
import os
import sys
import time

import train
from config import Config, time_limit_seconds
from errors import UserError, check_folder_path, run_cli
from search_budget import (confirm_reserve, confirm_runs, earlier_trial_seconds, plan_estimate, print_plan,
                           search_time_left, trial_time_limit, update_trial_seconds)
from search_cv import FOLD_FLAGS, check_cv, recipe_epochs, run_recipe
from search_final import train_final
from search_report import write_report
from search_selection import confirm, fewer_seeds_note, noise_note, ranking, started, val_size_note
from search_space import (PLAIN, PLAIN_NO_FLIP, check_focal_order, in_space, load_space, setting_flags, short,
                          space_for_run, suggest)
from trials import Outcome, Search, progress_line

# ---------------------------------------------------------------- the search spaces
RESERVED_FIELDS = {"epochs", "seed", "run_name", "output_dir", "time_limit", "all_folds", "data_dir"}  # and
# train.py's --resume, --overwrite, --find-lr, --check-data
# shared settings that would make trials of different lengths: a trial stopped early by --patience "completes" with
# fewer epochs than the others it is compared with
UNFAIR_FLAGS = {"patience": "it ends trials at different epochs, which the pruner and the ranking then compare; "
                              "give it to the final run (train.py --config best_config.json --patience N)"}
# what opening a new study reports when another process is creating the same tables or study at that moment
RACES = ("IntegrityError", "already exists", "database is locked")


def add_cv_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cv", type=int, default=0, help="score each recipe by its out-of-fold accuracy over train/ + "
                   "val/ in K folds (K train.py runs of --epochs-per-trial each, one split for the whole study) "
                   "instead of its val accuracy: for a val set too small to tell recipes apart; 0 = off "
                   "(default: %(default)s)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        allow_abbrev=False,  # an abbreviated train.py flag must reach train.py
        description="Search train.py's recipe with Optuna (TPE sampler, median pruning) in a time budget; re-run "
                    "the best configurations with more seeds and write best_config.json, report.md and plots.",
        epilog="Flags after -- (and any flag tune.py does not know) go to every trial's train.py unchanged, e.g. "
               "-- --arch resnet50 --batch-size 64 --img-size 224.")
    p.add_argument("--data-dir", required=True, help="dataset root, as train.py's --data-dir")
    p.add_argument("--budget", default="", help="wall time of this command, search and confirmation together "
                   "(90m, 2h, 3600s); the search stops in time to leave the confirmation runs their share")
    p.add_argument("--train-final", action="store_true", help="then train the winner (train.py --config "
                   "best_config.json, with --budget: in what is left of it, --final-epochs being the cap) and write "
                   "its prediction of the test folder to <output-dir>/<name>/prediction.csv")
    p.add_argument("--search-share", type=float, default=0.5, help="with --train-final and --budget: the share of "
                   "the budget the search and its confirmation take; the final run takes the rest "
                   "(default: %(default)s)")
    p.add_argument("--trials", type=int, default=0, help="search trials this command adds to the study (0: as many "
                   "as --budget holds; with --budget too, whichever ends first)")
    p.add_argument("--epochs-per-trial", type=int, default=5, help="epochs of every trial (default: %(default)s)")
    add_cv_arg(p)
    p.add_argument("--final-epochs", type=int, default=Config().epochs, help="epochs of the final run that "
                   "best_config.json describes (default: %(default)s, train.py's)")
    p.add_argument("--space", default="seed", help="seed (around train.py's defaults; from scratch, -- --weights "
                   "none, its learning rates are drawn from 3e-4 to 3e-3), wide, or a YAML/JSON file in the same "
                   "format (see README, Recipe search) (default: %(default)s)")
    p.add_argument("--name", default="tune", help="study name and its folder under --output-dir "
                   "(default: %(default)s)")
    p.add_argument("--output-dir", default="checkpoints", help="where the study folder goes (default: %(default)s)")
    p.add_argument("--storage", default="", help="Optuna storage URL (sqlite:///FILE, postgresql://user:pw@host/db, "
                   "mysql://...); several machines with one URL and --name work on one study (default: "
                   "sqlite:///<study folder>/study.db)")
    p.add_argument("--seed", type=int, default=42, help="seed of the sampler (each trial draws with the seed "
                   "plus its trial number) and of every search trial; the confirmation runs use the next ones "
                   "(default: %(default)s)")
    p.add_argument("--pruner", choices=["median", "none"], default="median", help="median: stop a trial whose "
                   "val accuracy after an epoch is below the median of earlier trials at that epoch "
                   "(default: %(default)s)")
    p.add_argument("--prune-warmup", type=int, default=None, help="epochs every trial trains before it may be "
                   "pruned (default: a third of --epochs-per-trial, at least 1: from scratch, the first epochs of "
                   "every trial are near chance, and a median of them picks at random)")
    p.add_argument("--prune-startup", type=int, default=4, help="finished trials before pruning starts "
                   "(default: %(default)s)")
    p.add_argument("--prune-below", type=float, default=0.0, help="also prune a trial (after --prune-warmup epochs) "
                   "whose val accuracy is below this, e.g. chance level (default: %(default)s = off)")
    p.add_argument("--first-trials", nargs="+", choices=["defaults", "plain", "plain-no-flip", "none"],
                   default=["defaults", "plain", "plain-no-flip"],
                   help="known recipes a new study tries before it samples: defaults = train.py's, plain = a "
                   "from-scratch recipe (light augmentation, crops of 60-100%%, flip, linear head, CE, LR 1e-3, weight "
                   "decay 0.05, no EMA or mixing), plain-no-flip = the same without the flip (tried only where the "
                   "space varies hflip); each setting outside the space is drawn instead (default: %(default)s)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep every trial's last.pt and best.pt (by "
                   "default they are deleted when the trial ends: the report needs the trials' histories only, and "
                   "best_config.json trains the final model anew)")
    p.add_argument("--confirm-top", type=int, default=3, help="configurations re-run with more seeds before a "
                   "winner is named (default: %(default)s)")
    p.add_argument("--confirm-seeds", type=int, default=2, help="extra seeds per confirmed configuration "
                   "(0: no confirmation) (default: %(default)s)")
    args, train_args = p.parse_known_args(argv)
    return args, [a for a in train_args if a != "--"]


# ---------------------------------------------------------------- the study

def check_train_args(train_args, space, cv=0):
    """A reserved flag, or a flag the space also sets, would be silently overridden: refuse it instead. The flags
    are read by train.py's own parser, so an abbreviation (--pati) or a --config file's setting is caught too."""
    typed = train.given_settings(train_args)
    filed = {k: v for k, v in train.given_settings(train.with_config_file(list(train_args))).items() if k not in typed}
    others = vars(train.build_parser().parse_args(list(train_args)))
    searched = {*space, *(("aug", "auto_augment") if "augment" in space else ()),
                *(("rrc_scale",) if "rrc_scale_low" in space else ())}
    defaults = dataclasses.asdict(Config())
    for name in [*typed, *filed]:
        flag, where = "--" + name.replace("_", "-"), " (from the --config file)" if name in filed else ""
        # a file's --epochs, --seed, ... come before tune.py's own flags, which win; these two would not be set
        if name in RESERVED_FIELDS and (name in typed or name in ("time_limit", "all_folds") and
                                        filed[name] != defaults[name]):
            raise UserError(f"{flag}{where}: tune.py sets this for every trial (see python tune.py --help)")
        if cv and name in FOLD_FLAGS:
            raise UserError(f"{flag}{where}: --cv {cv} chooses the validation images (its folds of train/ + val/); "
                            "drop it, or search without --cv")
        if name in UNFAIR_FLAGS:
            raise UserError(f"{flag}{where}: not in a search: {UNFAIR_FLAGS[name]}")
        if name in searched:
            raise UserError(f"{flag}{where}: the search space varies this setting; drop it, or fix it in a --space "
                            "file")
    for name, value in {"resume": others["resume"], "overwrite": others["overwrite"], "find_lr": others["find_lr"],
                        "check_data": others["check_data"]}.items():
        if value:
            raise UserError(f"--{name.replace('_', '-')}: tune.py sets this for every trial (see python tune.py "
                            "--help)")


def fixed_config(args, train_args, space) -> Config:
    """The settings every trial shares, read by train.py's own parser (a wrong flag stops here, not in trial 0)."""
    cfg, _, _ = train.parse_args(["--data-dir", args.data_dir, *train_args])
    check_focal_order(space, cfg, args.space)
    return cfg


def open_study(args, study_dir):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = args.storage or f"sqlite:///{os.path.abspath(os.path.join(study_dir, 'study.db'))}"
    pruner = optuna.pruners.MedianPruner(n_startup_trials=args.prune_startup, n_warmup_steps=args.prune_warmup) \
        if args.pruner == "median" else optuna.pruners.NopPruner()
    for attempt in range(5):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}
                                                 if url.startswith("sqlite") else {})
            study, created = create_or_load(args.name, storage, pruner)
            break
        except Exception as e:  # a malformed URL, a missing driver, a server that does not answer
            if attempt < 4 and any(race in f"{type(e).__name__} {e}" for race in RACES):
                time.sleep(1 + attempt)  # another process created the tables or the study at the same moment
                continue
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"--storage {url}: cannot open it ({reason})")
    return study, url, created


def create_or_load(name, storage, pruner):
    """The study and whether this process created it. The database decides atomically which of the processes
    starting a study at the same moment creates it: that one alone queues the --first-trials (Optuna's
    skip_if_exists is no guard between processes, and two copies of a queued recipe train it twice)."""
    import optuna
    try:
        return optuna.create_study(study_name=name, storage=storage, direction="maximize", pruner=pruner), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=storage, pruner=pruner), False


def seed_sampler(study, trial, seed) -> None:
    """Seed the drawing of a trial's settings by its number, which the database hands out once: processes joining
    a study at the same moment (whose samplers would otherwise hold the same seed) draw apart, and a resumed study
    does not draw its first settings again. Set after ask(): TPE draws each setting when the trial suggests it."""
    import optuna
    study.sampler = optuna.samplers.TPESampler(seed=seed + trial.number)


def check_setup(study, args, cfg: Config, space) -> None:
    """A study's trials compare only when they ran alike: the first process records what the study was started
    with (trial length, the final length the epoch-counted settings are scaled from, the shared train.py settings as
    train.py's parser read them, the space), and a later command that differs is refused, naming the difference.
    The data folder is not compared: machines sharing a study may keep the data at other paths."""
    defaults = dataclasses.asdict(Config())
    shared = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "data_dir" and v != defaults[k]}
    setup = json.loads(json.dumps({"--epochs-per-trial": args.epochs_per_trial, "--final-epochs": args.final_epochs,
                                   "shared train.py settings": shared, "space": space,
                                   **({"--cv": args.cv} if args.cv else {})}))
    if study.user_attrs.get("setup") is None:
        if started(study):
            print(f"warning: study {args.name} was started before tune.py recorded its settings: from now on it "
                  "takes this command's")
        study.set_user_attr("setup", setup)
    saved = study.user_attrs.get("setup")  # read back: another process may have recorded its own first
    for key in dict.fromkeys([*setup, *saved]):  # a key of one only: --cv, given to one of them
        if saved.get(key) != setup.get(key):
            raise UserError(f"study {args.name} was started with "
                            f"{setup_difference(key, saved.get(key), setup.get(key))}: its "
                            "trials would not compare with the earlier ones; repeat the study's settings, or start a "
                            "new study with another --name")


def setup_difference(key, saved, given) -> str:
    """'<what the study has>, this command gives <what differs>', naming only the settings that differ."""
    if isinstance(given, dict):
        saved = saved or {}
        names = [n for n in dict.fromkeys([*saved, *given]) if saved.get(n) != given.get(n)]

        def show(values):
            return "; ".join(f"{n} {json.dumps(values[n])}" if n in values else f"no {n}" for n in names)
        label = "the space's" if key == "space" else f"the {key}"
        return f"{label} {show(saved)}, this command's {show(given)}"
    return f"{key} {saved}, this command gives {key} {given}"


def run_trial(search: Search, study, trial) -> Outcome:
    """Draw a trial's settings, train it, tell the study how it went, print its line."""
    import optuna
    seed_sampler(study, trial, search.args.seed)
    settings = suggest(trial, search.space)
    trial.set_user_attr("role", "search")
    trial.set_user_attr("settings", settings)
    try:
        outcome = run_recipe(search, settings, f"{trial.number:04d}", search.args.seed, trial_time_limit(search),
                             trial)
    except KeyboardInterrupt:
        trial.set_user_attr("error", "interrupted (Ctrl-C)")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    for key in ("epochs", "seconds", "n_val", "error"):
        trial.set_user_attr(key, getattr(outcome, key))
    update_trial_seconds(search, outcome)
    if outcome.state == "complete":
        study.tell(trial, outcome.value)
    else:
        study.tell(trial, state=optuna.trial.TrialState.FAIL if outcome.state == "failed"
                   else optuna.trial.TrialState.PRUNED)
    search.reserve = confirm_reserve(search, study)
    print(progress_line(f"trial {trial.number}", settings, outcome, recipe_epochs(search.args)), flush=True)
    return outcome


def first_points(search: Search) -> list[dict]:
    """--first-trials as settings of the space: train.py's defaults and the plain recipe with and without the flip,
    each setting the space holds (the others are drawn); a recipe the space cannot tell from an earlier one is left
    out."""
    cfg, points = search.cfg, []
    defaults = {name: getattr(cfg, name) for name in search.space if hasattr(cfg, name)}
    defaults.update(augment=cfg.auto_augment if cfg.aug == "policy" else cfg.aug, rrc_scale_low=cfg.rrc_scale[0])
    for name in search.args.first_trials:
        recipe = {"defaults": defaults, "plain": PLAIN, "plain-no-flip": PLAIN_NO_FLIP}.get(name, {})
        point = {k: v for k, v in recipe.items() if k in search.space and in_space(search.space[k], v)}
        if point and point not in points:
            points.append(point)
    return points


def search_trials(search: Search, study) -> None:
    """Trials until --trials are done or the next one would not fit in the search's share of --budget."""
    args, done = search.args, 0
    while not args.trials or done < args.trials:
        left = search_time_left(search)
        if left is not None and left < max(search.trial_seconds, 1):
            print(f"search stops: the next trial would not fit in the budget before the confirmation's share "
                  f"({confirm_runs(args)} runs, about {search.reserve / 60:.1f} min)")
            break
        first = not search.trial_seconds
        limit = trial_time_limit(search)
        outcome = run_trial(search, study, study.ask())
        done += 1
        if first and search.trial_seconds and search.deadline is not None:
            print(plan_estimate(search))
        if outcome.state == "budget":
            if first:
                share = f", the budget's share that leaves as long to each of the {confirm_runs(args)} confirmation " \
                        "runs" if confirm_runs(args) else ""
                print(f"search stops: the first trial did not finish in {limit / 60:.1f} min{share}: raise --budget, "
                      "or shorten the trials (--epochs-per-trial, a smaller --img-size) or the confirmation "
                      "(--confirm-top, --confirm-seeds)")
            break


# ---------------------------------------------------------------- outputs

def write_best_config(search: Search, settings: dict) -> str:
    """The winner as train.py settings for the full schedule, built by train.py's own parser from the shared flags
    and the winner's settings: python train.py --config best_config.json takes it as it is."""
    args = search.args
    cfg, _, _ = train.parse_args(["--data-dir", args.data_dir, *search.train_args, *setting_flags(settings),
                                  "--epochs", str(args.final_epochs), "--seed", str(args.seed)])
    defaults = dataclasses.asdict(Config())
    # the settings that differ from train.py's defaults (an empty default means "the model's own": left out)
    chosen = {k: v for k, v in dataclasses.asdict(cfg).items() if v != defaults[k] or k in ("data_dir", "epochs")}
    path = os.path.join(search.study_dir, "best_config.json")
    tmp = f"{path}.{os.getpid()}.tmp"  # several processes sharing a study may write it at once: one file each
    with open(tmp, "w") as f:
        json.dump(chosen, f, indent=2)
    os.replace(tmp, path)
    return path


def finish(search: Search, study) -> int:
    """Name the winner (or say why there is none), write best_config.json and the report, print the command."""
    ranked = ranking(study, search.args)
    if not ranked:
        raise UserError(f"no trial of study {search.args.name} finished all its epochs: see the .log files in "
                        f"{os.path.join(search.study_dir, 'trials')}")
    print("ranking (mean val accuracy over seeds ± the val set's SE):")
    for r in ranked:
        print(f"  trial {r['trial']}: {r['mean']:.4f} ± {r['se']:.4f} over {r['seeds']} seed(s), seed std "
              f"{r['seed_std']:.4f} | {short(r['settings'])}")
    config = write_best_config(search, ranked[0]["settings"])
    command = f"python train.py --config {config} --run-name {search.args.name}-final"
    notes = [note for note in (noise_note(ranked), fewer_seeds_note(ranked)) if note]
    lines = [line for note in notes for line in (note, "")]
    lines += [f"Train the final model ({search.args.final_epochs} epochs):", "", f"```bash\n{command}\n```"]
    report = write_report(search, study, ranked, lines)
    print(*notes, sep="\n")
    print(f"wrote {config} and {report}")
    print(f"train the final model with: {command}")
    return 0


# ---------------------------------------------------------------- main

def check_args(args) -> float | None:
    """One-line errors for tune.py's own flags; returns the budget in seconds (None without one)."""
    if not os.path.isdir(os.path.join(args.data_dir, "train")):
        raise UserError(f"--data-dir {args.data_dir}: no train/ folder there (DATA/train/<class>/ holds the images)")
    try:
        budget = time_limit_seconds(args.budget)
    except UserError:
        raise UserError(f"--budget {args.budget!r}: give a duration such as 90m, 2h, 1h30m or 3600s") from None
    if args.trials < 0 or not (budget or args.trials):
        raise UserError("give --budget (e.g. 30m), --trials N (at least 1), or both")
    for name in ("epochs_per_trial", "final_epochs"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if "none" in args.first_trials and len(args.first_trials) > 1:
        raise UserError("--first-trials none: give it alone (no known recipe first), or any of defaults, plain, "
                        "plain-no-flip")
    if args.cv < 0 or args.cv == 1:
        raise UserError(f"--cv {args.cv}: give K >= 2 folds (0 = score on val/)")
    if not 0 < args.search_share < 1:
        raise UserError(f"--search-share {args.search_share:g} must lie in (0, 1): the search's share of --budget")
    if args.prune_warmup is None:
        args.prune_warmup = max(1, args.epochs_per_trial // 3)
    if min(args.confirm_top, args.confirm_seeds + 1, args.prune_startup + 1, args.prune_warmup + 1) < 1:
        raise UserError("--confirm-top must be at least 1; --confirm-seeds, --prune-startup and --prune-warmup "
                        "cannot be negative")
    return budget or None


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args, train_args = parse_args(argv)
    budget = check_args(args)
    space = load_space(args.space)
    check_train_args(train_args, space, args.cv)
    check_cv(args.data_dir, args.cv)
    cfg = fixed_config(args, train_args, space)
    space, followed = space_for_run(args.space, space, cfg)
    study_dir = os.path.join(args.output_dir, args.name)
    check_folder_path(study_dir, "study folder")
    os.makedirs(study_dir, exist_ok=True)
    study, storage, created = open_study(args, study_dir)
    check_setup(study, args, cfg, space)
    earlier = earlier_trial_seconds(study)
    search_budget = budget * args.search_share if budget and args.train_final else budget
    search = Search(args, train_args, space, cfg, study_dir, started + search_budget if budget else None, earlier,
                    earlier > 0)
    search.reserve = confirm_reserve(search, study)
    print_plan(search, study, storage)
    for line in (followed, val_size_note(args.data_dir, cfg.val_fraction, args.cv)):  # what the search can tell apart
        if line:
            print(line)
    if created:  # a resumed study keeps its queue, and a process joining a new one finds it there
        for point in first_points(search):
            study.enqueue_trial(point)
    try:
        search_trials(search, study)
        confirm(search, study)
    except KeyboardInterrupt:
        print(f"interrupted: the running trial was stopped and recorded as failed; the study is kept in {storage}: "
              "run the same command to continue it", file=sys.stderr)
        return 130
    code = finish(search, study)
    return train_final(search, train.main, budget, started) if args.train_final and not code else code


if __name__ == "__main__":
    run_cli(main)
