"""train.py --find-lr: the sweep trains the run's own model with the training step, then puts the weights and the
optimiser back; the rules behind the suggestion; the training command it prints; its mistakes are one line.
(The whole walkthrough, finder to export, is in test_own_dataset.py.)"""
import copy
import shlex

import numpy as np
import pytest
import torch

import engine
import lr_finder
import train
from config import Config
from conftest import SAMPLE, TINY, one_line_error, run_main
from dataset import build_train_val
from run import Progress

CPU = torch.device("cpu")


def assert_same(a, b, where="state"):
    """Equal nested state_dicts: the same keys, equal tensors and values."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def tiny_finder_run(tmp_path):
    """The run train.main builds for --find-lr on the sample data, and its parsed arguments."""
    argv = ["--data-dir", SAMPLE, *TINY, "--find-lr", "--lr-find-steps", "6", "--lr-find-range", "1e-4", "1",
            "--lr-find-plot", str(tmp_path / "sweep.png")]
    cfg, args, given = train.parse_args(argv)
    opened = train.open_run(cfg, args, given)
    cfg = opened.cfg
    datasets = build_train_val(cfg)
    model = train.new_model(cfg, datasets[2], None)
    train_set, val_set = train.load_data(opened, datasets, Progress(), False)
    loaders = engine.make_loaders(cfg, train_set, val_set, CPU)
    run = engine.build_run(cfg, model, CPU, train_set, len(loaders.train), opened.run_dir)
    return run, loaders, args, argv


def test_sweep_trains_then_restores_weights_and_optimiser(tmp_path, capsys, monkeypatch):
    run, loaders, args, argv = tiny_finder_run(tmp_path)
    engine.train_step(run, next(engine.endless_groups(loaders, 1)), 0)  # the optimiser now holds moments
    state = lambda: copy.deepcopy([run.plain.state_dict(), run.optimizer.state_dict(), run.scheduler.state_dict(),
                                   run.scaler.state_dict()])
    before, lrs, moved = state(), [], []
    first = next(run.plain.parameters()).detach().clone()

    def step(run, group, epoch, augment):
        lrs.append(run.optimizer.param_groups[0]["lr"])
        result = engine.train_step(run, group, epoch, augment)
        moved.append(not torch.equal(next(run.plain.parameters()), first))
        return result

    monkeypatch.setattr(lr_finder, "train_step", step)  # the engine's step, watched
    assert lr_finder.find_lr(run, loaders, args, argv) == 0
    assert_same(state(), before)
    assert len(lrs) == 6 and all(moved)  # the sweep did train, on the real step
    ratios = np.array(lrs[1:]) / np.array(lrs[:-1])
    assert np.allclose(ratios, ratios[0]) and lrs[-1] / lrs[0] == pytest.approx(1e4)  # exponential, end to end
    out = capsys.readouterr().out
    assert "LR finder: 6 of 6 steps, LR 0.0001 to 1\n" in out and (tmp_path / "sweep.png").stat().st_size > 0
    assert "train with: python train.py" in out


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = np.geomspace(1e-6, 1, 61)
    x = np.log10(lrs)
    # the loss drops fastest around 1e-3, bottoms out near 1e-1.6 and then diverges
    loss = 2.3 - 1.5 / (1 + np.exp(-3 * (x + 3))) + np.where(x > -1.6, 20 * (x + 1.6) ** 2, 0)
    lr, steepest, minimum = lr_finder.suggest(lrs, lr_finder.smooth(loss, 5))
    assert steepest and 6e-4 < lr < 1.7e-3 and 1e-2 < minimum < 5e-2
    # a loss that never falls: the minimum / 10, not below the sweep's start, flagged as no steepest descent
    lr, steepest, minimum = lr_finder.suggest(lrs, 2.3 + 0.1 * x)
    assert not steepest and minimum == lrs[0] and lr == lrs[0]


def test_smoothing_does_not_lag():
    values = np.r_[np.zeros(20), np.ones(20)]
    smoothed = lr_finder.smooth(values, 5)
    assert smoothed[19] == pytest.approx(0.4) and smoothed[20] == pytest.approx(0.6)  # centred on the step
    assert smoothed[0] == 0 and smoothed[-1] == 1  # the ends average over the points they have


def test_printed_command_trains_with_the_suggestion():
    cfg = Config(run_name="mine", lr=1e-3, min_lr=1e-5)
    argv = ["--data-dir", "my data", "--find-lr", "--lr-find-range", "1e-7", "10", "--lr=3e-4", "--lr-find-steps",
            "100", "--epochs", "5", "--run-name", "mine", "--lr-find-plot=x.png"]
    command = lr_finder.training_command(argv, 4.2e-6, cfg)
    words = shlex.split(command)
    # below the run's --min-lr: the floor keeps its ratio to --lr, so that the cosine still falls
    assert words == ["python", "train.py", "--data-dir", "my data", "--epochs", "5", "--run-name", "mine", "--lr",
                     "4.2e-06", "--min-lr", "4.2e-08"]
    parsed, args, _ = train.parse_args(words[2:])
    assert parsed.lr == 4.2e-6 and not args.find_lr
    assert "--min-lr" not in lr_finder.training_command(["--lr", "1"], 3e-3, cfg)


@pytest.mark.parametrize("extra,expected", [
    (["--resume", "auto"], "--find-lr sweeps from a new run's starting weights: drop --resume"),
    (["--lr-find-range", "1", "0.1"], "--lr-find-range 1 0.1: give two learning rates"),
    (["--lr-find-range", "0", "1"], "the first above 0"),
    (["--lr-find-steps", "3"], "at least 5 steps"),
])
def test_finder_mistakes_are_one_line(tmp_path, capsys, extra, expected):
    code, _, err = run_main(train.main, ["--data-dir", SAMPLE, "--output-dir", tmp_path, "--run-name", "x", *TINY,
                                         "--find-lr", *extra], capsys)
    assert expected in one_line_error(code, err)
    assert list(tmp_path.iterdir()) == []
