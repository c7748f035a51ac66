import dataclasses
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import inference
import predict
import train
from augment import center_crop
from config import Config
from conftest import SAMPLE, TINY, call_script, one_line_error, run_main, run_script
from inference import write_predictions
from losses import TrainLoss, cross_entropy

RUN_FILES = ["last.pt", "best.pt", "config.json", "history.csv", "curves.png", "confusion_matrix.png"]


def test_train_writes_every_output(trained_run):
    run_dir, proc = trained_run
    for name in RUN_FILES:
        assert (run_dir / name).stat().st_size > 0, name
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    for column in ["lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_loss_ema", "val_acc_ema",
                   "loss_phase", "epoch_seconds", "images_per_s"]:
        assert history[column].notna().all(), column
    assert history["lr"].iloc[1] < history["lr"].iloc[0]  # cosine annealing moves every step
    config = json.loads((run_dir / "config.json").read_text())
    assert config["classes"] == [str(i) for i in range(10)] and config["arch"] == "resnet18"
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["source"] in ("raw", "ema") and best["classes"] == config["classes"]
    assert best["epoch"] in (1, 2)
    assert "best val accuracy" in proc.stdout and "inference.py --checkpoint" in proc.stdout


def test_inference_writes_one_row_per_test_image(trained_run, tmp_path):
    run_dir, _ = trained_run
    out = tmp_path / "prediction.csv"
    proc = call_script("inference.py", "--checkpoint", run_dir / "best.pt", "--data-dir", SAMPLE, "--output", out,
                      "--topk", 3, "--val-dir", os.path.join(SAMPLE, "val"), "--workers", 0)
    df = pd.read_csv(out, dtype=str)
    assert list(df.columns) == ["image_name", "pred_label"]
    test_names = sorted(os.path.splitext(n)[0] for n in os.listdir(os.path.join(SAMPLE, "test")))
    assert list(df["image_name"]) == test_names
    assert set(df["pred_label"]) <= {str(i) for i in range(10)}
    top = pd.read_csv(tmp_path / "prediction_top3.csv", dtype={"image_name": str, "label_1": str})
    assert list(top.columns) == ["image_name", "label_1", "prob_1", "label_2", "prob_2", "label_3", "prob_3"]
    assert list(top["label_1"]) == list(df["pred_label"])
    assert (top["prob_1"] >= top["prob_2"]).all() and (top["prob_1"] <= 1).all()
    assert "val accuracy with TTA none" in proc.stdout and "val accuracy with TTA flip" in proc.stdout


def test_tta_modes_and_weight_choices(trained_run, tmp_path):
    run_dir, _ = trained_run
    for tta, weights in [("none", "raw"), ("flip-crops", "ema")]:
        out = tmp_path / f"{tta}.csv"
        call_script("inference.py", "--checkpoint", run_dir / "last.pt", "--data-dir", SAMPLE, "--output", out,
                   "--tta", tta, "--use", weights, "--workers", 0)
        assert len(pd.read_csv(out)) == len(os.listdir(os.path.join(SAMPLE, "test")))


def test_csv_carries_the_class_folder_name_not_the_index(tmp_path):
    classes = ["0", "1", "2", "10", "11"]  # index 3 is class '10', not '3'
    probs = np.eye(5)[[3, 4, 0]]
    write_predictions(["c", "a", "b"], probs, classes, str(tmp_path / "p.csv"))
    df = pd.read_csv(tmp_path / "p.csv", dtype=str)
    assert df.values.tolist() == [["a", "11"], ["b", "0"], ["c", "10"]]


def test_numeric_class_folders_end_to_end(tmp_path):
    """12 classes named 0..11: the checkpoint stores numeric order and the CSV uses the folder names."""
    data = tmp_path / "data"
    for split in ("train", "val"):
        for c in range(12):
            src = os.path.join(SAMPLE, split, str(c % 10))
            dst = data / split / str(c)
            os.makedirs(dst)
            for name in sorted(os.listdir(src))[:4]:
                shutil.copy(os.path.join(src, name), dst / name)
    shutil.copytree(os.path.join(SAMPLE, "test"), data / "test")
    call_script("train.py", "--data-dir", data, "--output-dir", tmp_path / "runs", "--run-name", "n", "--epochs", 1,
               "--head", "linear", *TINY)
    ckpt = torch.load(tmp_path / "runs" / "n" / "best.pt", weights_only=True)
    assert ckpt["classes"] == [str(i) for i in range(12)]
    call_script("inference.py", "--checkpoint", tmp_path / "runs" / "n" / "best.pt", "--data-dir", data,
               "--output", tmp_path / "p.csv", "--workers", 0)
    assert set(pd.read_csv(tmp_path / "p.csv", dtype=str)["pred_label"]) <= {str(i) for i in range(12)}


def test_help_documents_every_flag():
    text = call_script("train.py", "--help").stdout
    for f in dataclasses.fields(Config):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "--no-ema" in text
    text = call_script("inference.py", "--help").stdout
    for flag in ["--checkpoint", "--data-dir", "--test-dir", "--output", "--tta", "--topk", "--batch-size",
                 "--workers", "--device", "--val-dir", "--use"]:
        assert flag in text


def test_a_user_mistake_is_one_line_on_the_real_command_line(tmp_path):
    proc = run_script("train.py", "--data-dir", tmp_path / "nope", *TINY, check=False)
    assert "no such data folder" in one_line_error(proc.returncode, proc.stderr)


def test_user_mistakes_give_one_line_errors(tmp_path, trained_run, capsys):
    run_dir, _ = trained_run

    def train_error(*argv):
        return one_line_error(*run_main(train.main, argv, capsys)[::2])

    def inference_error(*argv):
        return one_line_error(*run_main(inference.main, argv, capsys)[::2])

    assert "over --max-params" in train_error("--data-dir", SAMPLE, "--max-params", "1e6", "--output-dir", tmp_path,
                                              *TINY)
    assert "already holds a run" in train_error("--data-dir", SAMPLE, "--output-dir", run_dir.parent,
                                                "--run-name", run_dir.name, *TINY)
    assert "no such folder" in train_error("--data-dir", tmp_path, *TINY)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert "bad.pt" in inference_error("--checkpoint", bad)
    assert "no such checkpoint" in inference_error("--checkpoint", tmp_path / "missing.pt")
    assert "no such test folder" in inference_error("--checkpoint", run_dir / "best.pt", "--test-dir",
                                                    tmp_path / "none")


def test_asking_for_cuda_without_one_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_main(train.main, ["--data-dir", SAMPLE, "--device", "cuda", *TINY], capsys)
    assert "--device cuda" in one_line_error(code, err)


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "classes": ["a"], "config": {}, "payload": os.system}, path)
    proc = call_script("inference.py", "--checkpoint", path, check=False)
    line = one_line_error(proc.returncode, proc.stderr)
    assert "refusing to load" in line


# ---------------------------------------------------------------- settings that would silently change nothing

def test_class_weights_weight_the_cross_entropy_of_loss_ce():
    logits, targets = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 0, 0, 0, 1, 2])
    weights = torch.tensor([0.5, 2.0, 2.0])
    cfg = dataclasses.replace(Config(), loss="ce", class_weights="balanced")
    weighted, plain = TrainLoss(cfg, weights)(logits, targets, 0), TrainLoss(cfg, None)(logits, targets, 0)
    assert weighted == pytest.approx(cross_entropy(logits, targets, cfg.label_smoothing, weights).item())
    assert weighted != pytest.approx(plain.item())


def test_settings_that_do_nothing_are_said_and_contradictions_refused(tmp_path, capsys):
    base = ["--data-dir", SAMPLE, "--output-dir", tmp_path, *TINY, "--epochs", 2, "--max-params", 1]

    def warnings(*argv):  # the run stops at --max-params, after saying what it thinks of its settings
        code, out, err = run_main(train.main, [*base, *argv], capsys)
        assert "over --max-params" in one_line_error(code, err)
        return [line for line in out.splitlines() if line.startswith("warning: ")]

    said = warnings("--mix-off-epoch", 1, "--no-ema", "--ema-start-epoch", 1, "--aug", "light", "--jitter", 0, 0, 0,
                    0, "--loss", "ce", "--class-weights", "effective", "--class-weights-beta", 0.99, "--focal-gamma",
                    2, "--head", "linear", "--head-dropout", 0, 0, 0, "--fold", 1, "--freeze-epochs", 2)
    for text in ["--mix-off-epoch has no effect in this run: no --mixup or --cutmix",
                 "--ema-start-epoch has no effect in this run: --no-ema",
                 "--jitter has no effect in this run: only --aug seed uses it (--aug light)",
                 "--focal-gamma has no effect in this run: --loss ce has no focal part",
                 "--head-dropout has no effect in this run: --head linear has no dropout",
                 "--fold has no effect in this run: there is no --folds K",
                 "--freeze-epochs 2 >= --epochs 2: the backbone stays frozen for the whole run",
                 "--class-weights effective weight the cross-entropy: --loss ce has no focal part"]:
        assert any(line.startswith(f"warning: {text}") for line in said), (text, said)
    assert not any("class-weights-beta" in line for line in said)  # effective weights use it
    assert warnings("--loss", "focal", "--mixup", 0.2, "--mix-off-epoch", 1) == []

    def error(*argv):
        return one_line_error(*run_main(train.main, [*base, *argv], capsys)[::2])

    assert "add --class-weights-from start" in error("--class-weights", "balanced")  # 2 epochs: no focal phase
    assert "--eval-crop-ratio 1.14286 must lie in (0, 1]" in error("--eval-crop-ratio", 256 / 224)
    assert "--hflip must lie in [0, 1]" in error("--hflip", 1.5)
    assert "--focal-full 3 is before --focal-start 5" in error("--focal-start", 5, "--focal-full", 3)
    assert "--rrc-scale" in error("--rrc-scale", 0.9, 0.5)


def test_an_eval_crop_larger_than_its_image_is_refused(trained_run, tmp_path, capsys):
    with pytest.raises(ValueError, match="the crop must fit inside"):
        center_crop(torch.zeros(1, 3, 196, 196, dtype=torch.uint8), 224)
    code, _, err = run_main(inference.main, ["--checkpoint", trained_run[0] / "best.pt", "--data-dir", SAMPLE,
                                             "--eval-crop-ratio", 1.14], capsys)
    assert code == 2 and "--eval-crop-ratio 1.14 must lie in (0, 1]" in err and "Traceback" not in err


def test_flip_crops_views_are_the_ones_the_help_names():
    square = torch.arange(2 * 3 * 40 * 40, dtype=torch.float32).view(2, 3, 40, 40)
    views = predict.tta_views(square, 32, "flip-crops")
    assert len(views) == 8  # centre, its mirror, whole, its mirror, four corners as they are
    assert torch.equal(views[1], views[0].flip(-1)) and torch.equal(views[3], views[2].flip(-1))
    corners = [square[..., :32, :32], square[..., :32, 8:], square[..., 8:, :32], square[..., 8:, 8:]]
    assert all(torch.equal(view, corner) for view, corner in zip(views[4:], corners))
