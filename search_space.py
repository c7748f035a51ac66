"""The recipe search's space language: the built-in spaces, the known first recipes, reading and checking a space
file, drawing a trial's settings, and those settings as train.py flags and as one short line.

One entry per setting, keyed by train.py's setting name (its flag without --):
  [a, b, c]          one of these values (numbers, words, true/false)
  {log: [low, high]} a number drawn on a log scale;  {range: [low, high]} a number drawn uniformly;
  {int: [low, high]} a whole number;                  a single value: the same for every trial
Two names are not train.py flags: augment (seed, light, or an --auto-augment policy, meaning --aug policy with it)
and rrc_scale_low (the low bound of --rrc-scale; the high bound stays 1)."""
from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

from config import Config, check_ranges, flag, read_config_file
from errors import UserError

if TYPE_CHECKING:
    import optuna

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


# a from-scratch run (--weights none) learns at about ten times a fine-tune's rate: there the seed space draws its
# learning rates from this range instead (a short search of 2e-5..2e-4 on a from-scratch run lost every drawn trial
# to the plain recipe's 1e-3)
SCRATCH_LR = {"log": [3e-4, 3e-3]}


def space_for_run(name: str, space: dict, cfg: Config) -> tuple[dict, str]:
    """(the space, a line saying what changed or ""): the built-in seed space follows the run, its learning rates
    those of a from-scratch run when the shared settings train from scratch (--weights none)."""
    if name != "seed" or cfg.weights != "none":
        return space, ""
    low, high = SCRATCH_LR["log"]
    return {**space, "lr": SCRATCH_LR}, (f"space seed from scratch (--weights none): lr drawn from {low:g} to "
                                         f"{high:g}, not the fine-tuning range {space['lr']['log'][0]:g} to "
                                         f"{space['lr']['log'][1]:g}")


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
    if field is not None and name != "min_lr":  # --min-lr's range is --lr's, which the study may set
        check_range(name, value, where)


def check_range(name, value, where):
    """A value train.py's own range check refuses (a share above 1, a negative count) is named before any trial
    runs; a check that also depends on another setting is left to the trial, which has the study's flags."""
    try:
        check_ranges(dataclasses.replace(Config(), **{name: value}))
    except UserError as error:
        if str(error).startswith(flag(name) + " "):
            raise UserError(f"--space {where}: {name} {value!r}: {error}") from None


def suggest(trial: optuna.trial.Trial, space: dict) -> dict:
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


def in_space(spec: Any, value: Any) -> bool:
    if isinstance(spec, list):
        return any(v == value and isinstance(v, bool) == isinstance(value, bool) for v in spec)
    if isinstance(spec, dict):
        low, high = next(iter(spec.values()))
        return is_number(value) and low <= value <= high
    return False  # a fixed setting: nothing to enqueue


def check_focal_order(space: dict, cfg: Config, where: str) -> None:
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
