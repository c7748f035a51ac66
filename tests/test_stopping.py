"""Ending a run before --epochs (--patience with --min-delta, --time-limit) and gradient clipping (--clip-grad)."""
import os
import shutil
import signal

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import engine
import stopping
import train
from config import Config
from conftest import SAMPLE, TINY, one_line_error, run_main
from losses import TrainLoss
from model import resolve_data
from run import Progress, Run
from stopping import GracefulStop

SMALL = [*TINY, "--head", "linear", "--batch-size", 8, "--no-ema"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Three sample classes, 8 train + 4 val images each."""
    root = tmp_path_factory.mktemp("small")
    for split, n in [("train", 8), ("val", 4)]:
        for c in ("0", "1", "2"):
            os.makedirs(root / split / c)
            for name in sorted(os.listdir(os.path.join(SAMPLE, split, c)))[:n]:
                shutil.copy(os.path.join(SAMPLE, split, c, name), root / split / c / name)
    return root


# ---------------------------------------------------------------- --patience, --min-delta

def test_an_epoch_is_better_only_by_more_than_min_delta():
    progress = Progress()
    for acc in (0.50, 0.505, 0.52, 0.52, 0.40):
        stopping.update_plateau(progress, acc, min_delta=0.01)
    assert progress.plateau_best == 0.52 and progress.plateau_epochs == 2
    stopping.update_plateau(progress, 0.531, min_delta=0.01)
    assert progress.plateau_epochs == 0


def test_patience_ends_the_run_with_best_and_a_resumable_last(small, tmp_path, capsys):
    # no epoch can beat the first by 0.99: the run stops after 1 + patience epochs
    argv = ["--data-dir", small, "--output-dir", tmp_path, "--run-name", "p", *SMALL, "--epochs", 6,
            "--patience", 1, "--min-delta", 0.99]
    code, out, err = run_main(train.main, argv, capsys)
    assert code == 0, err
    run_dir = tmp_path / "p"
    assert "early stop: the val accuracy has not risen by more than --min-delta 0.99 for 1 epoch (--patience 1); " \
           f"to train on: python train.py --resume {run_dir / 'last.pt'}" in out
    assert list(pd.read_csv(run_dir / "history.csv")["epoch"]) == [1, 2]
    assert (run_dir / "best.pt").exists() and "best val accuracy" in out
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["progress"]["epoch"] == 2 and last["progress"]["plateau_epochs"] == 1
    # the stopping settings may change on resume: one more epoch without a gain, and it stops again
    code, out, err = run_main(train.main, ["--resume", run_dir / "last.pt", "--patience", 2], capsys)
    assert code == 0, err
    assert "resuming at epoch 3 step 0" in out and "for 2 epochs (--patience 2)" in out
    assert list(pd.read_csv(run_dir / "history.csv")["epoch"]) == [1, 2, 3]


def test_val_every_validates_every_nth_epoch_and_patience_counts_epochs(small, tmp_path, capsys):
    # validated after epochs 2, 4, 6: no epoch beats epoch 2 by 0.99, and at epoch 6 that is 4 epochs >= patience 3
    argv = ["--data-dir", small, "--output-dir", tmp_path, "--run-name", "v", *SMALL, "--epochs", 8,
            "--val-every", 2, "--patience", 3, "--min-delta", 0.99]
    code, out, err = run_main(train.main, argv, capsys)
    assert code == 0, err
    history = pd.read_csv(tmp_path / "v" / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3, 4, 5, 6] and "for 4 epochs (--patience 3)" in out
    assert list(history["val_acc"].notna()) == [False, True] * 3 and history["train_loss"].notna().all()
    best = torch.load(tmp_path / "v" / "best.pt", weights_only=True)["epoch"]
    assert best == history["epoch"][history["val_acc"].idxmax()] and best in (2, 4, 6)
    assert (tmp_path / "v" / "curves.png").is_file()
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [" val loss " in line for line in lines] == [False, True] * 3
    # the last epoch is always validated, and so is the one a stop ends the run on
    assert engine.validation_due(Config(epochs=5, val_every=2), 4, GracefulStop(), torch.device("cpu"))
    stop = GracefulStop()
    assert not engine.validation_due(Config(epochs=5, val_every=2), 2, stop, torch.device("cpu"))
    stop.handle(signal.SIGTERM, None)
    assert engine.validation_due(Config(epochs=5, val_every=2), 2, stop, torch.device("cpu"))


def test_min_delta_without_patience_is_said_and_bad_limits_refused(small, tmp_path, capsys):
    base = ["--data-dir", small, "--output-dir", tmp_path, *SMALL, "--max-params", 1]
    code, out, err = run_main(train.main, [*base, "--min-delta", 0.01], capsys)
    assert "warning: --min-delta has no effect in this run: there is no --patience N" in out
    for argv, message in [(["--time-limit", "soon"], "--time-limit 'soon': give a duration such as 90m"),
                          (["--clip-grad", -1], "--clip-grad and --patience cannot be negative"),
                          (["--val-every", 0], "--val-every 0: give a number of epochs >= 1"),
                          (["--time-limit", "1h", "--folds", 2, "--all-folds"], "train each fold as its own run")]:
        assert message in one_line_error(*run_main(train.main, [*base, *argv], capsys)[::2])


# ---------------------------------------------------------------- --time-limit

def test_the_time_limit_stops_before_a_step_that_would_end_past_it(monkeypatch):
    clock = [120.0]
    monkeypatch.setattr(stopping.time, "monotonic", lambda: clock[0])
    stop = GracefulStop(time_limit=10, started=100.0)
    assert not stop.requested  # past the limit, but every start of a run trains a step first
    clock[0] = 105.0
    stop.step_took(3.0)
    assert not stop.requested  # the next step ends at 108, before the limit at 110
    clock[0] = 107.5
    assert stop.requested and stop.name == "" and not stop.signalled  # one more 3 s step would end at 110.5
    clock[0] = 100.0
    assert stop.requested  # once asked, the run stops
    before_validation = GracefulStop(time_limit=10, started=100.0)
    before_validation.step_took(1.0)
    clock[0] = 104.0
    assert not before_validation.out_of_time(5.0)
    clock[0] = 105.5
    assert before_validation.out_of_time(5.0)  # a 5 s validation pass would end at 110.5
    assert not GracefulStop().requested


def test_time_limit_saves_a_resumable_last_and_prints_the_resume_command(small, tmp_path, capsys):
    argv = ["--data-dir", small, "--output-dir", tmp_path, "--run-name", "t", *SMALL, "--epochs", 500,
            "--time-limit", "3s"]
    code, out, err = run_main(train.main, argv, capsys)
    last = tmp_path / "t" / "last.pt"
    assert code == stopping.TIME_LIMIT_EXIT == 124, err
    assert "--time-limit 3s: stopped at epoch" in out and f"resume with: python train.py --resume {last}" in out
    stopped = torch.load(last, weights_only=True)["progress"]
    assert stopped["epoch"] < 500 and (stopped["epoch"], stopped["step"]) != (0, 0)
    code, out, err = run_main(train.main, ["--resume", last, "--time-limit", "2s"], capsys)
    assert code == 124, err
    assert f"resuming at epoch {stopped['epoch'] + 1} step {stopped['step']}/" in out
    again = torch.load(last, weights_only=True)["progress"]
    assert (again["epoch"], again["step"]) > (stopped["epoch"], stopped["step"])


# ---------------------------------------------------------------- --clip-grad

def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


def batch():
    gen = torch.Generator().manual_seed(1)
    return (torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8, generator=gen),
            torch.randint(0, 5, (8,), generator=gen))


def step_gradient(clip, split=(8,), fp16_scaling=False):
    """The gradient that one train_step hands to the optimiser (lr 0: the weights stay, the gradient is kept)."""
    cfg = resolve_data(Config(erasing=0.0, channels_last=False, augment_on="loader", clip_grad=clip))
    model = tiny_net()
    images, targets = batch()
    bounds = np.cumsum([0, *split])
    run = Run(cfg=cfg, model=model, device=torch.device("cpu"), criterion=TrainLoss(cfg, None),
              optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
              scaler=torch.amp.GradScaler("cpu", enabled=fp16_scaling))
    engine.train_step(run, [(images[a:b], targets[a:b]) for a, b in zip(bounds[:-1], bounds[1:])], epoch=0)
    return [p.grad.clone() for p in model.parameters()]


def norm(grads):
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


def test_clip_grad_bounds_the_norm_once_per_step_and_leaves_smaller_gradients_alone():
    plain = step_gradient(0)
    assert norm(plain) > 0.01
    clipped = step_gradient(0.01)
    assert norm(clipped) == pytest.approx(0.01, rel=1e-4)
    for g, p in zip(clipped, plain):  # the same direction, scaled as a whole
        torch.testing.assert_close(g, p * (0.01 / norm(plain)), rtol=1e-4, atol=1e-8)
    # under fp16 loss scaling the clip sees the unscaled gradient, not 65536 times it
    assert norm(step_gradient(0.01, fp16_scaling=True)) == pytest.approx(0.01, rel=1e-4)
    # accumulation: the sum of the micro-batches is clipped once, to the gradient of the whole batch
    accumulated = step_gradient(0.01, split=(4, 4))
    for g, c in zip(accumulated, clipped):
        torch.testing.assert_close(g, c, rtol=1e-4, atol=1e-8)
    # a norm below the limit: the very same gradient
    assert all(torch.equal(g, p) for g, p in zip(step_gradient(1e6), plain))
