"""tune.py --train-final: after the search, the winner trained in what is left of the budget (train.py --budget, with
--final-epochs as the cap) and its test prediction written: one command from a folder of images to a hand-in in a
fixed time. Where the final model is, what it trained on and how it predicted are printed and added to report.md."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

from trials import Search

ROOT = os.path.dirname(os.path.abspath(__file__))
PREDICTION_SHARE = 0.05  # of the budget, kept back for the test prediction after the final run


def final_flags(search: Search, budget: float | None, started: float) -> list[str]:
    """train.py's command line of the final run: the winner's config, resumable by running tune.py again, and the
    budget that is left (without --budget, --final-epochs as given)."""
    args = search.args
    flags = ["--config", os.path.join(search.study_dir, "best_config.json"), "--output-dir", search.study_dir,
             "--run-name", "final", "--resume", "auto", "--epochs", str(args.final_epochs)]
    if budget:
        left = budget * (1 - PREDICTION_SHARE) - (time.monotonic() - started)
        flags += ["--budget", f"{max(1.0, left):.0f}s"]
    return flags


def train_final(search: Search, train_main: Callable[[list[str]], int], budget: float | None, started: float) -> int:
    """Train the winner, predict the test folder with it, say where everything is; returns the exit code."""
    flags = final_flags(search, budget, started)
    print(f"final run: python train.py {' '.join(flags)}", flush=True)
    code = train_main(flags)
    if code:
        return code
    run_dir = os.path.join(search.study_dir, "final")
    best = os.path.join(run_dir, "best.pt")
    test_dir = os.path.join(search.args.data_dir, "test")
    lines = ["## Final run", "", f"The winner, trained by `python train.py {' '.join(flags)}`: `{best}`, on the "
             "train/ images of the data (val/ chose its best epoch)."]
    if os.path.isdir(test_dir):
        prediction = os.path.join(search.study_dir, "prediction.csv")
        done = subprocess.run([sys.executable, os.path.join(ROOT, "inference.py"), "--checkpoint", best,
                               "--data-dir", search.args.data_dir, "--output", prediction], cwd=ROOT)
        if done.returncode:
            return done.returncode
        lines.append(f"Its prediction of {test_dir}, with inference.py's default TTA (flip): `{prediction}`.")
    else:
        lines.append(f"No {test_dir} to predict: `python inference.py --checkpoint {best} --test-dir DIR`.")
    with open(os.path.join(search.study_dir, "report.md"), "a") as f:
        f.write("\n" + "\n".join(lines) + "\n")
    print(*lines[2:], sep="\n")
    return 0
