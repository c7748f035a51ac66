"""Progressive resizing: the plan of training sides, a run whose batches grow, exact resume across a change of side,
and the mistakes."""
import os
import shutil

import pandas as pd
import pytest
import torch

import engine
import train
from config import Config
from conftest import LIGHT, SAMPLE, TIMING_COLUMNS, error_line, run_main
from errors import UserError
from progressive import STEP, epoch_sizes, plan_lines
from search_space import check_space


def test_the_plan_grows_in_multiples_of_32_and_ends_at_full_size():
    sizes = epoch_sizes(Config(img_size=224, epochs=10, progressive=0.5))
    assert sizes == [128, 128, 128, 160, 160, 192, 192, 224, 224, 224]  # 0.5 x 224 = 112: the nearest multiple, 128
    assert all(s % STEP == 0 for s in sizes) and sizes == sorted(sizes)
    assert epoch_sizes(Config(img_size=224, epochs=10, progressive=0.5, progressive_full=0.5))[-5:] == [224] * 5
    assert epoch_sizes(Config(img_size=224, epochs=10, progressive=0.5, progressive_full=0))[-1] == 224
    assert epoch_sizes(Config(img_size=100, epochs=4, progressive=0.3)) == [32, 64, 64, 100]  # never above the full
    assert epoch_sizes(Config(img_size=224, epochs=3)) == [224] * 3  # off
    line, = plan_lines(Config(img_size=224, epochs=10, progressive=0.5))
    assert line.startswith("progressive resizing: epochs 1-3 at 128 px, epochs 4-5 at 160 px, ")
    assert "once per training side (4 sides)" in plan_lines(Config(img_size=224, epochs=10, progressive=0.5,
                                                                   compile=True))[1]
    warning, = plan_lines(Config(img_size=32, epochs=4, progressive=0.5))
    assert warning.startswith("warning: --progressive 0.5 has no effect in this run: --img-size 32")


def test_a_progressive_run_trains_its_batches_at_each_side_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    # device-side colour and CutMix on the smaller batches too; the side follows the epoch, so a run resumed from
    # its first epoch's copy trains epoch 2 at 64 px as the uninterrupted run did, bit for bit
    args = ["--data-dir", SAMPLE, "--output-dir", tmp_path, "--epochs", 2, *LIGHT, "--img-size", 64,
            "--progressive", 0.5, "--augment-on", "batch", "--cutmix", 1.0, "--keep-epochs", 2]
    seen, resized = [], engine.resized

    def recording(batch, side, cfg):  # the side of every training batch the model sees
        out = resized(batch, side, cfg)
        seen.append(tuple(out.shape[-2:]))
        return out
    monkeypatch.setattr(engine, "resized", recording)
    code, out, err = run_main(train.main, [*args, "--run-name", "whole"], capsys)
    assert code == 0, err
    assert "progressive resizing: epoch 1 at 32 px, epoch 2 at 64 px" in out
    history = pd.read_csv(tmp_path / "whole" / "history.csv")
    assert list(history["train_size"]) == [32, 64]
    assert seen == [(32, 32)] * 9 + [(64, 64)] * 9  # 300 images in steps of 32: 9 a epoch

    resumed = tmp_path / "resumed"
    os.makedirs(resumed)
    shutil.copy(tmp_path / "whole" / "epoch-001.pt", resumed / "last.pt")
    code, out, err = run_main(train.main, ["--resume", resumed / "last.pt", "--workers", 0], capsys)
    assert code == 0, err
    ours, theirs = pd.read_csv(resumed / "history.csv"), history
    pd.testing.assert_frame_equal(ours.drop(columns=TIMING_COLUMNS), theirs.drop(columns=TIMING_COLUMNS))
    ours, theirs = (torch.load(d / "last.pt", weights_only=True) for d in (resumed, tmp_path / "whole"))
    for name, tensor in theirs["model"].items():
        assert torch.equal(ours["model"][name], tensor), name


def test_progressive_mistakes_are_one_line(tmp_path, capsys):
    base = ["--data-dir", SAMPLE, "--output-dir", tmp_path, *LIGHT, "--epochs", 1]
    code, out, err = run_main(train.main, [*base, "--progressive", 1.5], capsys)
    assert "--progressive 1.5 must lie in [0, 1)" in error_line(code, err)
    code, out, err = run_main(train.main, [*base, "--progressive-full", -0.1, "--progressive", 0.5], capsys)
    assert "--progressive-full -0.1 in [0, 1]" in error_line(code, err)
    # said, not refused: a share with nothing to share, and a side too small to shrink
    code, out, err = run_main(train.main, [*base, "--progressive-full", 0.5, "--run-name", "a"], capsys)
    assert code == 0 and "--progressive-full has no effect in this run: there is no --progressive F" in out
    code, out, err = run_main(train.main, [*base, "--progressive", 0.5, "--run-name", "b"], capsys)
    assert code == 0 and "warning: --progressive 0.5 has no effect in this run: --img-size 32" in out


def test_a_search_space_may_vary_it():
    assert check_space({"progressive": [0.0, 0.5], "progressive_full": {"range": [0.1, 0.4]}}, "space.yaml")
    with pytest.raises(UserError, match="--progressive 1.5 must lie in"):
        check_space({"progressive": [0.0, 1.5]}, "space.yaml")
