"""Exact resume after a real signal, settings checks on resume, atomic saves, and non-finite losses."""
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

import engine
import losses
import train
from checkpoint import restore_training_state, training_checkpoint
from config import Config
from conftest import LIGHT, ROOT, SAMPLE, TIMING_COLUMNS, TINY, call_script, error_line, run_main, wait_for
from engine import EpochSampler
from model import build_model
from run import Progress, Run
from run_folder import keep_epoch_copy, remove_stale_temp_files
from utils import make_ema


def start_train(*args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def stop_with(proc, signum):
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def test_a_run_killed_twice_by_signals_resumes_to_the_same_history_and_weights(tmp_path):
    args = ["--data-dir", SAMPLE, "--output-dir", tmp_path, "--run-name", "light", "--epochs", 2, *LIGHT]
    reference = tmp_path / "reference"  # the same command, never interrupted
    call_script("train.py", "--data-dir", SAMPLE, "--output-dir", tmp_path, "--run-name", "reference", "--epochs", 2,
                *LIGHT)
    run_dir = tmp_path / "light"

    # SIGTERM mid-epoch 1, as soon as the first mid-epoch checkpoint is on disk
    proc = start_train(*args, "--save-every-steps", 2)
    wait_for(run_dir / "last.pt", proc)
    code, out, _ = stop_with(proc, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, out
    assert f"resume with: python train.py --resume {run_dir / 'last.pt'}" in out
    stopped = torch.load(run_dir / "last.pt", weights_only=True)["progress"]
    assert stopped["epoch"] == 0 and 2 <= stopped["step"] < 9

    # the same command with --resume auto carries on; Ctrl-C once epoch 1 is done
    proc = start_train(*args, "--resume", "auto")
    wait_for(run_dir / "history.csv", proc)
    code, out, _ = stop_with(proc, signal.SIGINT)
    assert code == 128 + signal.SIGINT, out
    assert f"resuming at epoch 1 step {stopped['step']}/9" in out and "SIGINT: stopped at epoch" in out

    # the printed command alone finishes the run
    proc = start_train("--resume", run_dir / "last.pt")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]

    ours, theirs = pd.read_csv(run_dir / "history.csv"), pd.read_csv(reference / "history.csv")
    assert list(ours["epoch"]) == [1, 2]
    pd.testing.assert_frame_equal(ours.drop(columns=TIMING_COLUMNS), theirs.drop(columns=TIMING_COLUMNS))
    ours, theirs = (torch.load(d / "last.pt", weights_only=True) for d in (run_dir, reference))
    for key in ("model", "ema"):
        for name, tensor in theirs[key].items():
            assert torch.equal(ours[key][name], tensor), (key, name)  # bit for bit on CPU
    assert ours["ema_updates"] == theirs["ema_updates"] == 18
    assert ours["scheduler"] == theirs["scheduler"]
    assert ours["progress"]["history"][-1]["nonfinite_steps"] == 0


def copy_run(run_dir, tmp_path):
    target = tmp_path / "copy"
    os.makedirs(target)
    for name in ("last.pt", "best.pt"):
        shutil.copy(run_dir / name, target / name)
    return target


def test_resume_refuses_settings_that_change_the_run(trained_run, tmp_path, capsys):
    run_dir = copy_run(trained_run[0], tmp_path)
    last = run_dir / "last.pt"

    def error(*argv):
        return error_line(*run_main(train.main, argv, capsys)[::2])

    assert "--allow-schedule-change" in error("--resume", last, "--epochs", 3)
    assert "--batch-size cannot change" in error("--resume", last, "--batch-size", 16)
    assert "not a resumable checkpoint" in error("--resume", run_dir / "best.pt")
    assert "needs the --run-name" in error("--resume", "auto")
    assert "no such checkpoint" in error("--resume", tmp_path / "none.pt")
    other = tmp_path / "other"
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            os.makedirs(other / split / c)
            shutil.copy(glob.glob(os.path.join(SAMPLE, split, "0", "*"))[0], other / split / c)
    message = error("--resume", last, "--data-dir", other)
    assert "trained on 10 classes: 0, 1" in message and "data has 2 classes: cat, dog" in message
    assert "already holds a run: pass --resume auto" in error("--output-dir", tmp_path, "--run-name", "copy", *TINY)


def test_more_epochs_on_resume_with_allow_schedule_change(trained_run, tmp_path, capsys):
    run_dir = copy_run(trained_run[0], tmp_path)
    code, out, err = run_main(train.main, ["--resume", run_dir / "last.pt", "--epochs", 3,
                                           "--allow-schedule-change", "--workers", 0], capsys)
    assert code == 0, err
    ours, theirs = pd.read_csv(run_dir / "history.csv"), pd.read_csv(trained_run[0] / "history.csv")
    assert list(ours["epoch"]) == [1, 2, 3]
    pd.testing.assert_series_equal(ours["train_loss"][:2], theirs["train_loss"])  # kept from the checkpoint
    # epoch 3 starts where a 3-epoch cosine is after 2 of its 3 epochs: lr = min + (max - min) * (1 + cos(2pi/3)) / 2
    assert ours["lr"].iloc[2] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.25, rel=1e-3)


def test_epoch_order_depends_on_seed_and_epoch_only_and_skips_done_batches():
    sampler = EpochSampler(10, seed=3)
    sampler.start_epoch(4)
    whole = list(sampler)
    assert sorted(i for i, _ in whole) == list(range(10))
    again = EpochSampler(10, seed=3)
    again.start_epoch(4, done=6)
    assert list(again) == whole[6:] and len(again) == 4
    again.start_epoch(5)
    assert [i for i, _ in again] != [i for i, _ in whole]
    ranks = [EpochSampler(10, seed=3, num_replicas=3, rank=r) for r in range(3)]
    for r in ranks:
        r.start_epoch(4)
    shares = [list(r) for r in ranks]
    assert [len(s) for s in shares] == [4, 4, 4] and {i for s in shares for i, _ in s} == set(range(10))
    # 2 processes did 2 steps of one image each: 3 processes share the 6 images left, each image once
    two = [EpochSampler(10, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for r in two:
        r.start_epoch(4)
    done = sorted(p for r in two for p in list(r)[:2])
    for r in ranks:
        r.start_epoch(4, done=4)
    rest = [list(r) for r in ranks]
    assert sorted(done + [p for s in rest for p in s]) == sorted(whole)
    assert [len(s) for s in rest] == [2, 2, 2] and [len(r) for r in ranks] == [2, 2, 2]


def test_augmentation_follows_the_sample_seed_not_the_global_generator(tmp_path):
    from augment import train_transform
    from config import Config
    from dataset import LabelledImages
    cfg = Config(img_size=32)
    data = LabelledImages(os.path.join(SAMPLE, "train"), [str(c) for c in range(10)], train_transform(cfg))
    first = data[(5, 1234)][0]
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert torch.equal(data[(5, 1234)][0], first)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is left where it was
    assert not torch.equal(data[(5, 99)][0], first)


def test_kill_9_during_a_checkpoint_write_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    script = (f"import sys, torch; sys.path.insert(0, {ROOT!r}); from checkpoint import save_atomic\n"
              f"save_atomic({{'v': torch.zeros(3)}}, {str(path)!r}); print('ready', flush=True)\n"
              "big = {'v': torch.ones(25_000_000)}\n"
              f"while True: save_atomic(big, {str(path)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.time() + 120
    while not any(os.path.getsize(p) > 0 for p in glob.glob(str(tmp_path / ".tmp-*.pt"))):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.001)
    proc.kill()  # SIGKILL in the middle of writing the temporary file
    proc.wait()
    v = torch.load(path, weights_only=True)["v"]
    assert v.shape in ((3,), (25_000_000,)) and v.sum() in (0, 25_000_000)  # the old file or a whole new one
    assert glob.glob(str(tmp_path / ".tmp-*.pt"))
    remove_stale_temp_files(str(tmp_path))
    assert os.listdir(tmp_path) == ["last.pt"]


def test_epoch_copies_are_pruned_after_the_new_one_exists(tmp_path):
    for epoch in range(1, 5):
        (tmp_path / "new").write_text(f"state {epoch}")
        os.replace(tmp_path / "new", tmp_path / "last.pt")  # how save_atomic replaces last.pt
        keep_epoch_copy(str(tmp_path), epoch, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["epoch-003.pt", "epoch-004.pt", "last.pt"]
    assert (tmp_path / "epoch-003.pt").read_text() == "state 3"


def test_epoch_copies_are_pruned_by_epoch_number_not_by_name(tmp_path):
    (tmp_path / "epoch-999.pt").write_text("state 999")
    for epoch in (1000, 1001):
        (tmp_path / "last.pt").write_text(f"state {epoch}")
        keep_epoch_copy(str(tmp_path), epoch, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["epoch-1000.pt", "epoch-1001.pt", "last.pt"]


def test_overwrite_leaves_nothing_of_the_earlier_run(trained_run, tmp_path, capsys):
    run_dir = tmp_path / "again"
    shutil.copytree(trained_run[0], run_dir)
    for name in ("epoch-009.pt", "epoch-010.pt"):  # an earlier, longer run's epoch copies outrank a new run's
        shutil.copy(run_dir / "last.pt", run_dir / name)
    (run_dir / "oof.csv").write_text("image,label,pred,fold\n")
    os.makedirs(run_dir / "fold3")
    shutil.copy(run_dir / "best.pt", run_dir / "fold3" / "best.pt")  # inference.py --checkpoint <run> would take it
    os.makedirs(run_dir / "tensorboard")
    (run_dir / "notes.txt").write_text("the user's own file")
    argv = ["--data-dir", SAMPLE, "--output-dir", tmp_path, "--run-name", "again", *TINY, "--epochs", 1,
            "--keep-epochs", 1]

    # without --overwrite: refused, whichever run file is there
    os.remove(run_dir / "last.pt")
    assert "already holds a run: pass --resume auto to continue it, --overwrite to start it again, or choose another " \
           "--run-name (it holds best.pt, config.json" in error_line(*run_main(train.main, argv, capsys)[::2])

    # a run that stops before its first save (here: over --max-params) leaves no old checkpoint behind either
    code, out, err = run_main(train.main, [*argv, "--overwrite", "--max-params", 1], capsys)
    assert "over --max-params" in error_line(code, err)
    assert "--overwrite: removed the earlier run's best.pt, config.json" in out and "fold3" in out
    assert sorted(os.listdir(run_dir)) == ["notes.txt"]

    code, out, err = run_main(train.main, [*argv, "--overwrite"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(run_dir)) == sorted(["notes.txt", "last.pt", "best.pt", "epoch-001.pt", "config.json",
                                                  "history.csv", "curves.png", "confusion_matrix.png",
                                                  "confusion_matrix.csv"])
    assert list(pd.read_csv(run_dir / "history.csv")["epoch"]) == [1]


def test_resume_auto_starts_a_run_whose_start_saved_no_last_pt(trained_run, tmp_path, capsys):
    # a start killed before its first save (kill -9, a crash) leaves config.json and the split files: nothing to
    # continue from, and --resume auto was asked; a folder with a best.pt or epoch copies is kept, and said so
    run_dir = tmp_path / "crashed"
    os.makedirs(run_dir)
    for name in ("config.json", "best.pt"):
        shutil.copy(trained_run[0] / name, run_dir / name)
    argv = ["--data-dir", SAMPLE, "--output-dir", tmp_path, "--run-name", "crashed", *TINY, "--epochs", 1,
            "--resume", "auto"]
    message = error_line(*run_main(train.main, argv, capsys)[::2])
    assert f"{run_dir} holds best.pt but no last.pt to continue from" in message and "pass --resume auto" not in \
        message
    os.remove(run_dir / "best.pt")
    code, out, err = run_main(train.main, argv, capsys)
    assert code == 0, err
    assert f"no checkpoint in {run_dir} yet: starting the run" in out
    assert f"--resume auto found no last.pt: removed the earlier run's config.json from {run_dir}" in out
    assert list(pd.read_csv(run_dir / "history.csv")["epoch"]) == [1] and (run_dir / "last.pt").exists()


def test_a_run_without_fp16_resumes_on_a_gpu_that_scales_fp16_losses(trained_run):
    """A CPU or bf16 run saved a disabled grad scaler's empty state; an fp16 run resuming it starts a fresh scale."""
    ckpt = torch.load(trained_run[0] / "last.pt", weights_only=True)
    assert ckpt["scaler"] == {}
    cfg = Config(arch="resnet18", lr=1e-3, epochs=2, head_dropout=ckpt["config"]["head_dropout"])
    model = build_model("resnet18", 10, weights="none")
    optimizer = engine.build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=True)  # what an fp16 GPU run builds
    run = Run(cfg=cfg, model=model, device=torch.device("cpu"), optimizer=optimizer, scaler=scaler,
              scheduler=engine.build_scheduler(optimizer, cfg, 9), ema=make_ema(model, 0.999), classes=("0",),
              class_counts=(1,))
    restore_training_state(ckpt, run)
    progress = Progress(**ckpt["progress"])
    assert progress.epoch == 2 and scaler.get_scale() == 65536.0
    assert training_checkpoint(run, progress)["scaler"]["scale"] == 65536.0


class NanLoss(losses.TrainLoss):
    """The real training loss, except at the given calls (1-based), where it is nan."""
    calls = 0
    nan_at = set()

    def __call__(self, logits, target, epoch):
        NanLoss.calls += 1
        loss = super().__call__(logits, target, epoch)
        return loss * float("nan") if NanLoss.calls in NanLoss.nan_at else loss


def test_nonfinite_steps_are_skipped_and_a_diverged_run_stops_keeping_the_last_good_checkpoint(tmp_path, capsys,
                                                                                               monkeypatch):
    monkeypatch.setattr(engine, "TrainLoss", NanLoss)
    monkeypatch.setattr(NanLoss, "calls", 0)
    monkeypatch.setattr(NanLoss, "nan_at", {2, 3} | set(range(5, 100)))  # two skipped steps, then divergence
    code, out, err = run_main(train.main, ["--data-dir", SAMPLE, "--output-dir", tmp_path, "--run-name", "d",
                                           "--epochs", 1, "--save-every-steps", 2, *TINY], capsys)
    message = error_line(code, err)
    assert "the loss is nan at epoch 1 step 2: step skipped" in out + err
    assert "not finite for 5 steps in a row up to epoch 1 step 9" in message and "lower --lr" in message
    assert "last.pt still holds the last good state" in message
    ckpt = torch.load(tmp_path / "d" / "last.pt", weights_only=True)
    assert ckpt["progress"]["step"] == 4 and ckpt["progress"]["nonfinite_steps"] == 2  # saved after step 4 only
    assert all(np.isfinite(t.numpy()).all() for t in ckpt["model"].values() if t.is_floating_point())


def test_save_share_writes_last_pt_every_few_epochs_and_always_after_the_last(tmp_path, capsys):
    # a share this small leaves every epoch after the first without its write: the last one must catch up
    args = ["--data-dir", SAMPLE, "--output-dir", tmp_path, "--run-name", "short", "--epochs", 3, *LIGHT]
    code, out, err = run_main(train.main, [*args, "--save-share", 0.0001], capsys)
    assert code == 0, err
    assert "note: writing last.pt and the plots takes" in out and "--save-share 0.0001" in out
    run_dir = tmp_path / "short"
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["progress"]["epoch"] == 3 and len(last["progress"]["history"]) == 3
    assert list(pd.read_csv(run_dir / "history.csv")["epoch"]) == [1, 2, 3]
    for name in ("curves.png", "confusion_matrix.png"):
        assert (run_dir / name).stat().st_size > 0
    # the caught-up last.pt resumes
    code, out, err = run_main(train.main, ["--resume", run_dir / "last.pt", "--epochs", 4,
                                           "--allow-schedule-change", "--workers", 0], capsys)
    assert code == 0, err
    assert list(pd.read_csv(run_dir / "history.csv")["epoch"]) == [1, 2, 3, 4]
    message = error_line(*run_main(train.main, [*args, "--save-share", 2, "--overwrite"], capsys)[::2])
    assert "--save-share 2: give a share in (0, 1]" in message
