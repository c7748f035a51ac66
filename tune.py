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

import argparse
import contextlib
import csv
import dataclasses
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import train
from config import Config, read_config_file, time_limit_seconds
from errors import UserError, check_folder_path, run_cli
from plots import markdown_table, pyplot, save_figure
from resume import GracefulStop

# ---------------------------------------------------------------- the search spaces
# One entry per setting, keyed by train.py's setting name (its flag without --):
#   [a, b, c]          one of these values (numbers, words, true/false)
#   {log: [low, high]} a number drawn on a log scale;  {range: [low, high]} a number drawn uniformly;
#   {int: [low, high]} a whole number;                  a single value: the same for every trial
# Two names are not train.py flags: augment (seed, light, or an --auto-augment policy, meaning --aug policy with it)
# and rrc_scale_low (the low bound of --rrc-scale; the high bound stays 1).
SPACES = {
    "seed": {  # around train.py's defaults (the seed recipe)
        "lr": {"log": [2e-5, 2e-4]},
        "weight_decay": {"log": [1e-3, 0.1]},
        "augment": ["seed", "light", "ta_wide"],
        "rrc_scale_low": {"range": [0.08, 0.5]},
        "label_smoothing": {"range": [0.0, 0.15]},
        "loss": ["schedule", "ce"],
        "head": ["mlp", "linear"],
        "ema": [True, False],
        "mixup": [0.0, 0.2],
        "cutmix": [0.0, 1.0],
    },
    "wide": {  # broader: from-scratch-like LRs, the four policies, stronger mixing, flip or not
        "lr": {"log": [1e-5, 3e-3]},
        "weight_decay": {"log": [1e-5, 0.3]},
        "augment": ["seed", "light", "ta_wide", "rand-m9", "augmix", "imagenet"],
        "rrc_scale_low": {"range": [0.05, 0.8]},
        "label_smoothing": {"range": [0.0, 0.2]},
        "loss": ["schedule", "ce"],
        "head": ["mlp", "linear"],
        "ema": [True, False],
        "mixup": [0.0, 0.2, 0.8],  # choices, so that "off" is drawn too (a range would never give exactly 0)
        "cutmix": [0.0, 0.5, 1.0],
        "hflip": [0.0, 0.5],  # text, digits and other data a mirror changes
    },
}
# the known recipes a new study tries first (--first-trials), so that the winner is at least as good as them on val;
# a setting outside the space's range is drawn instead
PLAIN = {"lr": 1e-3, "weight_decay": 0.05, "augment": "light", "rrc_scale_low": 0.6, "label_smoothing": 0.0,
         "loss": "ce", "head": "linear", "ema": False, "mixup": 0.0, "cutmix": 0.0, "hflip": 0.5}
# the same without the mirror: the one photo assumption that is wrong for whole kinds of data (letters, digits, maps,
# charts, left/right in medical images), too costly to leave to the sampler's luck in a short search
PLAIN_NO_FLIP = {**PLAIN, "hflip": 0.0}
SPECIAL = {"augment": ["seed", "light", "ta_wide", "rand-m9", "augmix", "imagenet"], "rrc_scale_low": None}
# set by tune.py for every trial, or meaningless in a search
RESERVED = {"data_dir", "output_dir", "run_name", "epochs", "seed", "time_limit", "all_folds", "rrc_scale", "aug",
            "auto_augment", "tensorboard"}
RESERVED_FIELDS = {"epochs", "seed", "run_name", "output_dir", "time_limit", "all_folds", "data_dir"}  # and
# train.py's --resume, --overwrite, --find-lr, --check-data
# shared settings that would make trials of different lengths: a trial stopped early by --patience "completes" with
# fewer epochs than the others it is compared with
UNFAIR_FLAGS = {"patience": "it ends trials at different epochs, which the pruner and the ranking then compare; "
                              "give it to the final run (train.py --config best_config.json --patience N)"}
# train.py's settings counted in epochs. A space or a shared flag gives them for the final run (--final-epochs), as
# best_config.json keeps them, and each trial gets the same share of its own --epochs-per-trial: a 5-epoch trial of
# --focal-start 14 (of 100) switches to focal in epoch 1, where the final run would after 14%
EPOCH_SETTINGS = ("warmup_epochs", "t_max", "freeze_epochs", "ema_start_epoch", "focal_start", "focal_full",
                  "mix_off_epoch")
POLL_SECONDS = 0.5
# what opening a new study reports when another process is creating the same tables or study at that moment
RACES = ("IntegrityError", "already exists", "database is locked")
SE_MULTIPLE = 2  # a lead counts as beyond noise when it exceeds this many standard errors


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
    p.add_argument("--trials", type=int, default=0, help="search trials this command adds to the study (0: as many "
                   "as --budget holds; with --budget too, whichever ends first)")
    p.add_argument("--epochs-per-trial", type=int, default=5, help="epochs of every trial (default: %(default)s)")
    p.add_argument("--final-epochs", type=int, default=Config().epochs, help="epochs of the final run that "
                   "best_config.json describes (default: %(default)s, train.py's)")
    p.add_argument("--space", default="seed", help="seed (around train.py's defaults), wide, or a YAML/JSON file "
                   "in the same format (see README, Recipe search) (default: %(default)s)")
    p.add_argument("--name", default="tune", help="study name and its folder under --output-dir "
                   "(default: %(default)s)")
    p.add_argument("--output-dir", default="checkpoints", help="where the study folder goes (default: %(default)s)")
    p.add_argument("--storage", default="", help="Optuna storage URL (sqlite:///FILE, postgresql://user:pw@host/db, "
                   "mysql://...); several machines with one URL and --name work on one study (default: "
                   "sqlite:///<study folder>/study.db)")
    p.add_argument("--seed", type=int, default=42, help="seed of the sampler and of every search trial; the "
                   "confirmation runs use the next ones (default: %(default)s)")
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


# ---------------------------------------------------------------- the space: read, check, sample

def load_space(name: str) -> dict:
    if name in SPACES:
        return SPACES[name]
    if not os.path.splitext(name)[1].lower() in (".json", ".yaml", ".yml"):
        raise UserError(f"--space {name}: give seed, wide, or a .json/.yaml file")
    try:
        values = read_config_file(name)
    except UserError as e:
        raise UserError(str(e).replace("--config", "--space", 1)) from None
    return check_space(values, name)


def check_space(space: dict, where: str) -> dict:
    """One-line errors for a space file: unknown settings, malformed ranges, values train.py would refuse."""
    if not space:
        raise UserError(f"--space {where}: no settings to search")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for name, spec in space.items():
        if name not in fields and name not in SPECIAL or name in RESERVED:
            raise UserError(f"--space {where}: {name} is not a setting a search can vary (train.py's settings, "
                            "augment or rrc_scale_low; not " + ", ".join(sorted(RESERVED)) + ")")
        for value in spec_values(spec, name, where):
            check_value(name, value, fields.get(name), where)
        whole = name in fields and type(fields[name].default) is int
        if whole and isinstance(spec, dict) and "int" not in spec:
            raise UserError(f"--space {where}: {name} is a whole number: draw it with {{int: [low, high]}}")
    return space


def spec_values(spec, name, where):
    """The values a spec names (the choices, or a range's two bounds), checked for shape."""
    if isinstance(spec, list):
        if not spec:
            raise UserError(f"--space {where}: {name} has an empty list of choices")
        return spec
    if not isinstance(spec, dict):
        return [spec]
    kind = next(iter(spec), None)
    bounds = spec.get(kind)
    if len(spec) != 1 or kind not in ("log", "range", "int") or not (
            isinstance(bounds, list) and len(bounds) == 2 and all(is_number(b) for b in bounds)):
        raise UserError(f"--space {where}: {name}: write {{log: [low, high]}}, {{range: [low, high]}} or "
                        f"{{int: [low, high]}}, or a list of choices (it is {spec!r})")
    if not bounds[0] < bounds[1] or (kind == "log" and bounds[0] <= 0):
        raise UserError(f"--space {where}: {name}: need low < high{' and low > 0 on a log scale' * (kind == 'log')}")
    return bounds


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_value(name, value, field, where):
    if name == "augment":
        ok, expected = value in SPECIAL["augment"], "one of " + ", ".join(SPECIAL["augment"])
    elif name == "rrc_scale_low":
        ok, expected = is_number(value) and 0 < value <= 1, "a number in (0, 1]"
    else:
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if isinstance(default, list):
            raise UserError(f"--space {where}: {name} takes several numbers, which a search cannot vary")
        choices = field.metadata["choices"]
        ok, expected = {bool: (isinstance(value, bool), "true or false"),
                        str: (isinstance(value, str) and (not choices or value in choices),
                              "one of " + ", ".join(choices or ["a text"])),
                        }.get(type(default), (is_number(value), "a number"))
    if not ok:
        raise UserError(f"--space {where}: {name} must be {expected} (it is {value!r})")


def suggest(trial, space: dict) -> dict:
    """One trial's settings, drawn from the space."""
    params = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            params[name] = trial.suggest_categorical(name, spec)
        elif isinstance(spec, dict):
            kind, (low, high) = next(iter(spec.items()))
            params[name] = trial.suggest_int(name, int(low), int(high)) if kind == "int" else \
                trial.suggest_float(name, low, high, log=kind == "log")
        else:
            params[name] = spec
    return params


def setting_flags(params: dict) -> list[str]:
    """train.py's flags for a trial's settings."""
    flags = []
    for name, value in params.items():
        if name == "augment":
            flags += ["--aug", value] if value in ("seed", "light") else ["--auto-augment", value]
        elif name == "rrc_scale_low":
            flags += ["--rrc-scale", str(value), "1"]
        elif isinstance(value, bool):
            flags.append(("--" if value else "--no-") + name.replace("_", "-"))
        else:
            flags.append(f"--{name.replace('_', '-')}={value}")
    return flags


def short(params: dict) -> str:
    """A trial's settings in one short line: lr 2.1e-04 wd 0.012 augment light ..."""
    names = {"weight_decay": "wd", "label_smoothing": "ls", "rrc_scale_low": "rrc"}
    words = []
    for name, value in params.items():
        shown = ("on" if value else "off") if isinstance(value, bool) else \
            f"{value:.3g}" if isinstance(value, float) else str(value)
        words.append(f"{names.get(name, name)} {shown}")
    return " ".join(words)


# ---------------------------------------------------------------- the study

def check_train_args(train_args, space):
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


def check_focal_order(space, cfg, where):
    """A space whose focal_start can be drawn after focal_full (or after the shared value of the other) would give
    trials that train.py refuses: say so before the first trial."""
    def bounds(name):
        spec = space.get(name, getattr(cfg, name))
        values = spec_values(spec, name, where) if isinstance(spec, (list, dict)) else [spec]
        return min(values), max(values)
    if "focal_start" in space or "focal_full" in space:
        latest_start, earliest_full = bounds("focal_start")[1], bounds("focal_full")[0]
        if latest_start > earliest_full:
            raise UserError(f"--space {where}: focal_start can be drawn up to {latest_start:g}, after focal_full "
                            f"{earliest_full:g} (the first epoch of pure focal loss): let focal_start end at or "
                            "before the lowest focal_full")


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
            study = optuna.create_study(study_name=args.name, storage=storage, direction="maximize",
                                        load_if_exists=True, pruner=pruner)
            break
        except Exception as e:  # a malformed URL, a missing driver, a server that does not answer
            if attempt < 4 and any(race in f"{type(e).__name__} {e}" for race in RACES):
                time.sleep(1 + attempt)  # another process created the tables or the study at the same moment
                continue
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"--storage {url}: cannot open it ({reason})")
    # seeded, and moved on by the trials so far, so that a resumed study does not draw its first settings again
    study.sampler = optuna.samplers.TPESampler(seed=args.seed + len(started(study)))
    return study, url


def check_setup(study, args, cfg: Config, space) -> None:
    """A study's trials compare only when they ran alike: the first process records what the study was started
    with (trial length, the final length the epoch-counted settings are scaled from, the shared train.py settings as
    train.py's parser read them, the space), and a later command that differs is refused, naming the difference.
    The data folder is not compared: machines sharing a study may keep the data at other paths."""
    defaults = dataclasses.asdict(Config())
    shared = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "data_dir" and v != defaults[k]}
    setup = json.loads(json.dumps({"--epochs-per-trial": args.epochs_per_trial, "--final-epochs": args.final_epochs,
                                   "shared train.py settings": shared, "space": space}))
    if study.user_attrs.get("setup") is None:
        if started(study):
            print(f"warning: study {args.name} was started before tune.py recorded its settings: from now on it "
                  "takes this command's")
        study.set_user_attr("setup", setup)
    saved = study.user_attrs.get("setup")  # read back: another process may have recorded its own first
    for key, value in setup.items():
        if saved.get(key) != value:
            raise UserError(f"study {args.name} was started with {setup_difference(key, saved.get(key), value)}: its "
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


@dataclasses.dataclass
class Search:
    """What every trial of this command shares."""
    args: argparse.Namespace
    train_args: list
    space: dict
    cfg: Config
    study_dir: str
    deadline: float | None  # time.monotonic() when the budget ends, None without --budget
    trial_seconds: float = 0.0  # the longest full trial so far, the unit of the plan
    measured: bool = False  # whether trial_seconds comes from a complete trial (else from a stopped one, scaled)
    reserve: float = 0.0  # seconds kept back for the confirmation runs (confirm_reserve)


def trial_command(search: Search, params: dict, run_name: str, seed: int, time_limit: float) -> list[str]:
    """train.py's command line for one trial: the shared flags, the trial's settings, and every epoch-counted
    setting (drawn or shared) scaled from the final run's length to the trial's (trial_epoch_settings)."""
    args = search.args
    flags = setting_flags({k: v for k, v in params.items() if k not in EPOCH_SETTINGS})
    # after the shared flags: argparse keeps the last value given
    flags += setting_flags(trial_epoch_settings(search, params))
    limit = [f"--time-limit={max(int(time_limit), 1)}s"] if time_limit else []
    return [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"),
            "--data-dir", args.data_dir, *search.train_args, *flags, *limit, "--epochs", str(args.epochs_per_trial),
            "--seed", str(seed), "--output-dir", os.path.join(search.study_dir, "trials"), "--run-name", run_name,
            "--overwrite"]


def trial_epoch_settings(search: Search, params: dict) -> dict:
    """{setting: value} of the epoch-counted settings a trial uses, drawn or shared, at the same share of the trial
    as of --final-epochs (whole numbers rounded; --mix-off-epoch stays at least 1, as 0 means never off). A setting
    the trial does not use (0, or the focal epochs without --loss schedule) is left out."""
    args, cfg = search.args, search.cfg
    scale = args.epochs_per_trial / args.final_epochs
    schedule = params.get("loss", cfg.loss) == "schedule"
    scaled = {}
    for name in EPOCH_SETTINGS:
        value = params.get(name, getattr(cfg, name))
        if name.startswith("focal_") and not schedule or not value and not name.startswith("focal_"):
            continue
        if isinstance(getattr(Config(), name), int):
            scaled[name] = max(round(value * scale), 1 if name == "mix_off_epoch" else 0)
        else:
            scaled[name] = value * scale
    return scaled


def epoch_plan(search: Search) -> str:
    """The plan's line on the trials' epoch-counted settings: the shared ones with their scaled values, the drawn
    ones by name."""
    shared = {k: v for k, v in trial_epoch_settings(search, {}).items() if k not in search.space}
    drawn = [name for name in EPOCH_SETTINGS if name in search.space]
    if not shared and not drawn:
        return ""
    shown = [f"--{name.replace('_', '-')} {getattr(search.cfg, name):g} -> {value:g}" for name, value in shared.items()]
    shown += [f"{', '.join(drawn)} as drawn"] if drawn else []
    return (f"epoch-counted settings, given for the final {search.args.final_epochs} epochs, take the same share of "
            f"each {search.args.epochs_per_trial}-epoch trial: {', '.join(shown)}")


def read_history(path: str) -> list[dict]:
    """The complete rows of a history.csv that train.py may be writing right now."""
    try:
        with open(path, newline="") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    lines = text.splitlines(keepends=True)
    rows = list(csv.DictReader([line for line in lines if line.endswith("\n")]))
    return [r for r in rows if r.get("epoch_seconds") not in (None, "")]


def epoch_acc(row: dict) -> float:
    """The epoch's val accuracy as train.py chooses best.pt: the better of the raw and the EMA weights."""
    ema = float(row.get("val_acc_ema") or "nan")
    return max(float(row["val_acc"]), ema) if ema == ema else float(row["val_acc"])


def validated(rows: list[dict]) -> list[dict]:
    """The rows of the epochs that were validated: train.py --val-every leaves the others' val_acc empty."""
    return [r for r in rows if r.get("val_acc")]


@dataclasses.dataclass
class Outcome:
    """How one train.py run ended: complete, pruned, budget (stopped by --budget), failed."""
    state: str
    value: float  # the best epoch's val accuracy (nan when no epoch finished)
    epochs: int
    seconds: float
    n_val: int
    error: str = ""

    @property
    def se(self) -> float:
        return standard_error(self.value, self.n_val)


def standard_error(acc: float, n_val: int) -> float:
    """The val set's standard error of an accuracy: sqrt(p(1-p)/n)."""
    return math.sqrt(acc * (1 - acc) / n_val) if n_val and acc == acc else float("nan")


def watch(proc, run_dir, trial, args, ctrl_c) -> bool:
    """Poll history.csv while train.py runs, report each new epoch to the trial; True when the pruner stopped it.

    Ctrl-C meanwhile only sets ctrl_c's flag (a GracefulStop on SIGINT), turned into a KeyboardInterrupt here: Python's
    own handler raises it at whatever line runs, and one that lands in a finaliser (a database connection's, say) is
    printed and dropped there, so the search would go on. Like train.py, this also takes SIGINT back where a
    background start left it ignored."""
    history, read = os.path.join(run_dir, "history.csv"), 0
    while True:
        if ctrl_c.signalled:
            raise KeyboardInterrupt
        done = proc.poll() is not None
        rows = read_history(history)
        for row in validated(rows[read:]):
            if trial is None:
                continue
            epoch = int(row["epoch"])
            trial.report(epoch_acc(row), epoch)
            below = args.prune_below and epoch >= args.prune_warmup and epoch_acc(row) < args.prune_below
            if not done and epoch < args.epochs_per_trial and (below or trial.should_prune()):
                proc.send_signal(signal.SIGTERM)  # train.py stops after its current step and saves last.pt
                proc.wait()
                return True
        read = len(rows)
        if done:
            return False
        time.sleep(POLL_SECONDS)


def run_training(search: Search, command: list[str], run_dir: str, trial=None) -> Outcome:
    """One train.py run in its own process (its own session: Ctrl-C reaches tune.py, which stops it with SIGTERM);
    the output goes to <run>.log beside the run folder."""
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    start = time.monotonic()
    with open(run_dir + ".log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            with GracefulStop(signals=(signal.SIGINT,)) as ctrl_c:
                pruned = watch(proc, run_dir, trial, search.args, ctrl_c)
            if ctrl_c.signalled:  # as the run ended, after watch() last looked
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
    if not search.args.keep_checkpoints:  # the study needs a run's history only; a trial's .pt files fill disks
        for path in glob.glob(os.path.join(run_dir, "*.pt")):
            os.remove(path)
    with open(run_dir + ".log", errors="replace") as f:
        text = f.read()
    history = read_history(os.path.join(run_dir, "history.csv"))
    state = "pruned" if pruned else {0: "complete", train.TIME_LIMIT_EXIT: "budget"}.get(proc.returncode, "failed")
    error = [line for line in text.splitlines() if line.strip()][-1:] if state == "failed" else []
    best = max(validated(history), key=epoch_acc, default=None)  # its val_images: the n of the SE
    return Outcome(state, epoch_acc(best) if best else float("nan"), len(history), time.monotonic() - start,
                   int(float(best["val_images"])) if best else 0, error[0].strip() if error else "")


def search_time_left(search: Search) -> float | None:
    """Seconds the search may still use (the confirmation runs' share kept back); None without --budget."""
    if search.deadline is None:
        return None
    return search.deadline - time.monotonic() - search.reserve


def trial_time_limit(search: Search) -> float:
    """A search trial's --time-limit (0: none): the search's time left. Before any trial has measured how long one
    takes, the confirmation's share is not known yet: the first trial then gets the share that leaves its own
    length to each confirmation run, so that a slow first trial cannot spend the whole budget."""
    left = search_time_left(search)
    if left is None:
        return 0
    return left if search.trial_seconds else left / (1 + confirm_runs(search.args))


def confirm_reserve(search: Search, study) -> float:
    """The confirmation's share of the budget: the current top configurations' own trial times, once per extra
    seed (the longest complete trial stands in for a place not yet taken), so that a slow trial outside the top
    does not shrink the search."""
    top = [t.user_attrs.get("seconds", 0.0) for t in top_trials(study, search.args.confirm_top)]
    top += [search.trial_seconds] * (search.args.confirm_top - len(top))
    return search.args.confirm_seeds * sum(top)


def confirm_runs(args) -> int:
    return args.confirm_top * args.confirm_seeds


def run_trial(search: Search, study, trial) -> Outcome:
    """Draw a trial's settings, train it, tell the study how it went, print its line."""
    import optuna
    settings = suggest(trial, search.space)
    trial.set_user_attr("role", "search")
    trial.set_user_attr("settings", settings)
    command = trial_command(search, settings, f"{trial.number:04d}", search.args.seed, trial_time_limit(search))
    try:
        outcome = run_training(search, command, os.path.join(search.study_dir, "trials", f"{trial.number:04d}"),
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
    print(progress_line(f"trial {trial.number}", settings, outcome, search.args.epochs_per_trial), flush=True)
    return outcome


def update_trial_seconds(search: Search, outcome: Outcome) -> None:
    """The plan's unit: the longest complete trial so far. A stopped trial stands in, scaled up per epoch, only
    while none has completed: the scaling counts its start-up once per epoch, which makes it far too long (a trial
    pruned after 1 of 10 one-second epochs with 8 s of start-up would count as 90 s instead of 18 s)."""
    if outcome.state == "complete":
        search.trial_seconds = max(search.trial_seconds, outcome.seconds) if search.measured else outcome.seconds
        search.measured = True
    elif not search.measured and outcome.epochs:
        scaled = outcome.seconds * search.args.epochs_per_trial / outcome.epochs
        search.trial_seconds = max(search.trial_seconds, scaled)


def progress_line(what: str, settings: dict, outcome: Outcome, epochs: int) -> str:
    acc = f"val {outcome.value:.4f} ± {outcome.se:.4f}" if outcome.value == outcome.value else "val -"
    end = f"failed: {outcome.error}" if outcome.state == "failed" else outcome.state
    return f"{what} | {short(settings)} | {acc} | {outcome.epochs}/{epochs} epochs | {end} | {outcome.seconds:.0f}s"


def in_space(spec, value) -> bool:
    if isinstance(spec, list):
        return any(v == value and isinstance(v, bool) == isinstance(value, bool) for v in spec)
    if isinstance(spec, dict):
        low, high = next(iter(spec.values()))
        return is_number(value) and low <= value <= high
    return False  # a fixed setting: nothing to enqueue


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
    if not study.trials:  # a new study; skip_if_exists: another process may be starting it too
        for point in first_points(search):
            study.enqueue_trial(point, skip_if_exists=True)
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


# ---------------------------------------------------------------- the plan, said before the first trial

def earlier_trial_seconds(study) -> float:
    """The longest complete search trial of the study so far (a resumed study plans with it)."""
    seconds = [t.user_attrs.get("seconds", 0) for t in finished(study, "search", complete_only=True)]
    return max(seconds, default=0.0)


def print_plan(search: Search, study, storage: str) -> None:
    args = search.args
    print(f"study {args.name} in {search.study_dir} ({storage}): {len(started(study))} trials so far; space "
          f"{args.space} ({len(search.space)} settings); {args.epochs_per_trial} epoch(s) per trial; pruner "
          + (f"median (from epoch {args.prune_warmup}, once {args.prune_startup} trials finished)"
             if args.pruner == "median" else "none")
          + (f", below val {args.prune_below:g}" if args.prune_below else ""))
    reserve = (f"confirmation: the top {args.confirm_top} configurations x {args.confirm_seeds} more seed(s) = "
               f"{confirm_runs(args)} runs of {args.epochs_per_trial} epoch(s)" if args.confirm_seeds else
               "no confirmation (--confirm-seeds 0): the winner is the best single run")
    if epoch_plan(search):
        print(epoch_plan(search))
    trials = f"{args.trials} trials" if args.trials else "trials"
    if search.deadline is None:
        print(f"{trials}, then {reserve}")
    elif search.trial_seconds:
        print(f"budget {args.budget}: {trials} while one fits before the {reserve}; " + plan_estimate(search))
    else:
        print(f"budget {args.budget}: {trials} while one fits before the {reserve} (their share of the budget is "
              "kept back); the first trial measures how long a trial takes")


def plan_estimate(search: Search) -> str:
    total = search.deadline - time.monotonic()
    reserve = search.reserve
    fit = max(int((total - reserve) // search.trial_seconds), 0)
    return (f"a full trial takes about {search.trial_seconds:.0f}s: about {fit} more full-length trials fit in "
            f"the {max(total - reserve, 0) / 60:.1f} min left for the search (pruned trials end sooner, so more "
            f"may), and {reserve / 60:.1f} min are kept for the confirmation")


# ---------------------------------------------------------------- honest selection

def started(study) -> list:
    """The study's trials but the --first-trials still waiting for a process to run them."""
    import optuna
    return [t for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.WAITING]


def finished(study, role: str, complete_only: bool = False) -> list:
    import optuna
    states = (optuna.trial.TrialState.COMPLETE,) if complete_only else (
        optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [t for t in study.get_trials(deepcopy=False, states=states) if t.user_attrs.get("role") == role]


def top_trials(study, n: int) -> list:
    return sorted(finished(study, "search", complete_only=True), key=lambda t: (-t.value, t.number))[:n]


def confirmations(study, source: int) -> dict:
    """{seed: value} of the finished confirmation runs of one search trial (the first of duplicates)."""
    found = {}
    for t in finished(study, "confirm", complete_only=True):
        if t.user_attrs.get("source") == source:
            found.setdefault(t.user_attrs["seed"], t.value)
    return found


def confirm(search: Search, study) -> None:
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
    run_dir = os.path.join(search.study_dir, "trials", name)
    with run_claim(os.path.join(search.study_dir, "locks", f"{name}.lock"), wait, search.deadline) as mine:
        if not mine:
            return False
        if seed in confirmations(study, source.number):
            return True  # done earlier, or by another process sharing the study
        left = None if search.deadline is None else search.deadline - time.monotonic()
        settings = source.user_attrs["settings"]
        outcome = run_training(search, trial_command(search, settings, name, seed, left or 0), run_dir)
        print(progress_line(f"confirm {source.number} seed {seed}", settings, outcome, search.args.epochs_per_trial),
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


def ranking(study, args) -> list[dict]:
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
        for run in runs:
            rows = validated(read_history(os.path.join(search.study_dir, "trials", run, "history.csv")))
            ax.plot([int(r["epoch"]) for r in rows], [epoch_acc(r) for r in rows], "--" if "seed" in run else "-",
                    color=f"C{i}", marker=".", label=f"trial {entry['trial']}" if "seed" not in run else None)
    ax.set(xlabel="epoch", ylabel="val accuracy (the better of raw and EMA)", title="the top configurations")
    ax.legend()
    save_figure(fig, path)


def write_report(search: Search, study, ranked: list[dict], lines: list[str]) -> str:
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
            "## Winner", "", "Ranked by the mean val accuracy over the search run and the confirmation seeds; ± SE is "
            "the val set's standard error sqrt(p(1-p)/n).", "", markdown_table(ranking_table), *lines, "",
            "## Optimisation history", "", "![history](history.png)", "", "## Parameter importances", "",
            "![importances](importance.png)" if weights else "Too few complete trials (or too little variety "
            "among them) for importances.", "", "## Val curves of the top configurations", "",
            "![curves](curves.png)", "", "## All trials", "", markdown_table(table.drop(columns=["error"]))]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(text))
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
    check_train_args(train_args, space)
    cfg = fixed_config(args, train_args, space)
    study_dir = os.path.join(args.output_dir, args.name)
    check_folder_path(study_dir, "study folder")
    os.makedirs(study_dir, exist_ok=True)
    study, storage = open_study(args, study_dir)
    check_setup(study, args, cfg, space)
    earlier = earlier_trial_seconds(study)
    search = Search(args, train_args, space, cfg, study_dir, started + budget if budget else None, earlier,
                    earlier > 0)
    search.reserve = confirm_reserve(search, study)
    print_plan(search, study, storage)
    try:
        search_trials(search, study)
        confirm(search, study)
    except KeyboardInterrupt:
        print(f"interrupted: the running trial was stopped and recorded as failed; the study is kept in {storage}: "
              "run the same command to continue it", file=sys.stderr)
        return 130
    return finish(search, study)


if __name__ == "__main__":
    run_cli(main)
