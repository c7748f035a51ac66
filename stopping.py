"""When a run stops before its last epoch, and what it says then: signals (SIGINT, SIGTERM), --time-limit, and the
--patience plateau rule. Every way of stopping saves a resumable last.pt first (train.py does the writing)."""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import TYPE_CHECKING

import distributed
from run_folder import last_path

if TYPE_CHECKING:
    from config import Config
    from run import Progress, Run

TIME_LIMIT_EXIT = 124  # the exit code of a run stopped by --time-limit, as timeout(1) uses it


class GracefulStop:
    """While active, SIGINT and SIGTERM (or the given signals) ask the training loop to stop after its current step;
    a second SIGINT (Ctrl-C twice) stops at once. The handler only records the signal: printing from it could collide
    with tqdm.

    With a time limit (seconds after `started`, a time.monotonic() reading) the loop is asked to stop as well at the
    last step boundary before the limit: when the next piece of work (the longest training step so far, or the
    longest validation pass before one) would end past it. The limit is only checked once this process has trained
    a step, so that every start of a run makes progress."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, time_limit: float = 0.0, started: float | None = None, signals=SIGNALS):
        self.signum, self.old, self.signals = None, {}, signals
        self.started = time.monotonic() if started is None else started
        self.deadline = self.started + time_limit if time_limit else None
        self.longest_step, self.longest_validation, self.timed_out = 0.0, 0.0, False

    @property
    def requested(self):
        """Stop at this step boundary: a signal came, or the next step would end past the time limit."""
        return self.signum is not None or self.out_of_time()

    @property
    def signalled(self):
        return self.signum is not None

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else ""

    def out_of_time(self, ahead: float | None = None) -> bool:
        """Whether work of `ahead` seconds (default: the longest step so far) would end past the limit; once true,
        it stays true."""
        if self.deadline is not None and not self.timed_out and self.longest_step > 0:
            ahead = self.longest_step if ahead is None else ahead
            self.timed_out = time.monotonic() + ahead >= self.deadline
        return self.timed_out

    def elapsed(self) -> float:
        """Seconds since the run began (--time-limit and --budget count from there)."""
        return time.monotonic() - self.started

    def step_took(self, seconds: float) -> None:
        self.longest_step = max(self.longest_step, seconds)

    def validation_took(self, seconds: float) -> None:
        self.longest_validation = max(self.longest_validation, seconds)

    def handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.old = {s: signal.signal(s, self.handle) for s in self.signals}
        return self

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)
        return False


def update_plateau(progress: Progress, acc: float, min_delta: float, epochs: int = 1) -> None:
    """--patience: an epoch is better when its val accuracy beats the last better one's by more than --min-delta
    (counted with or without --patience, so that a resumed run may add it); epochs: those since the last
    validation, which --val-every makes more than one."""
    if acc > progress.plateau_best + min_delta:
        progress.plateau_best, progress.plateau_epochs = acc, 0
    else:
        progress.plateau_epochs += epochs


def plateaued(cfg: Config, progress: Progress, last: str) -> bool:
    """Whether --patience ends the run here; says so, and how to train on."""
    if not cfg.patience or progress.plateau_epochs < cfg.patience or progress.epoch >= cfg.epochs:
        return False
    n = progress.plateau_epochs
    print(f"early stop: the val accuracy has not risen by more than --min-delta {cfg.min_delta:g} for {n} "
          f"epoch{'s' * (n != 1)} (--patience {cfg.patience}); to train on: python train.py --resume {last} "
          "--patience <more epochs>")
    return True


def epoch_ends_run(run: Run, progress: Progress, stop: GracefulStop) -> str | None:
    """After a recorded epoch, what ends the run before its last epoch: "plateau" (--patience: it ends as a finished
    run does) or "stopped" (a signal or --time-limit on any process: stop_run reports it); None: it goes on."""
    if plateaued(run.cfg, progress, last_path(run.run_dir)):
        return "plateau"
    # after the last epoch there is nothing left to stop: the run ends as finished
    if progress.epoch < run.cfg.epochs and distributed.any_rank(stop.requested, run.device):
        return "stopped"
    return None


def stop_run(stop: GracefulStop, progress: Progress, run: Run, steps_per_epoch: int) -> int:
    """After a signal or --time-limit: last.pt is saved; say where the run stopped and how it resumes."""
    last = last_path(run.run_dir)
    reason = stop.name or f"--time-limit {run.cfg.time_limit}"
    print(f"{reason}: stopped at epoch {progress.epoch + 1} step {progress.step}/{steps_per_epoch}; "
          f"saved {last}")
    launcher = "python" if distributed.world_size() == 1 else "torchrun <the same options>"
    print(f"resume with: {launcher} train.py --resume {last}")
    return 128 + stop.signum if stop.signum else TIME_LIMIT_EXIT
