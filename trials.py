"""The recipe search's trial runner: one train.py run of a trial (a subprocess with its own log), its command line
with the epoch-counted settings scaled to the trial, watching its history.csv to report epochs and prune, and how
it ended."""
from __future__ import annotations

from typing import TYPE_CHECKING

import argparse
import dataclasses
import glob
import math
import os
import signal
import subprocess
import sys
import time

from config import EPOCH_SETTINGS, Config, scaled_epoch_setting
from history import epoch_acc, read_history, validated
from search_space import setting_flags, short
from stopping import TIME_LIMIT_EXIT, GracefulStop

if TYPE_CHECKING:
    import optuna

POLL_SECONDS = 0.5


# train.py's settings counted in epochs (config.EPOCH_SETTINGS). A space or a shared flag gives them for the final
# run (--final-epochs), as best_config.json keeps them, and each trial gets the same share of its own
# --epochs-per-trial: a 5-epoch trial of --focal-start 14 (of 100) switches to focal in epoch 1, where the final run
# would after 14%


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
        scaled[name] = scaled_epoch_setting(name, value, scale, args.epochs_per_trial)
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


def run_training(search: Search, command: list[str], run_dir: str, trial: optuna.trial.Trial | None = None) -> Outcome:
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
    state = "pruned" if pruned else {0: "complete", TIME_LIMIT_EXIT: "budget"}.get(proc.returncode, "failed")
    error = [line for line in text.splitlines() if line.strip()][-1:] if state == "failed" else []
    best = max(validated(history), key=epoch_acc, default=None)  # its val_images: the n of the SE
    return Outcome(state, epoch_acc(best) if best else float("nan"), len(history), time.monotonic() - start,
                   int(float(best["val_images"])) if best else 0, error[0].strip() if error else "")


def progress_line(what: str, settings: dict, outcome: Outcome, epochs: int) -> str:
    acc = f"val {outcome.value:.4f} ± {outcome.se:.4f}" if outcome.value == outcome.value else "val -"
    end = f"failed: {outcome.error}" if outcome.state == "failed" else outcome.state
    return f"{what} | {short(settings)} | {acc} | {outcome.epochs}/{epochs} epochs | {end} | {outcome.seconds:.0f}s"
