import os
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import augment
import augment_preview
import images
import inference
import predict
import train
from conftest import SAMPLE, TINY, run_main
from plots import confusion_counts
from report import Labelled, calibration, confused_pairs, per_class_table, write_report

CLASSES = ["a", "b", "c"]
# (true, predicted, confidence); by hand: confusion [[2,0,0],[1,1,0],[0,1,1]]
#   a: tp=2 fp=1 fn=0 -> P=2/3 R=1   F1=0.8
#   b: tp=1 fp=1 fn=1 -> P=1/2 R=1/2 F1=0.5
#   c: tp=1 fp=0 fn=1 -> P=1   R=1/2 F1=2/3
# two confidence bins: (0, .5] holds .4 (right) and .45 (wrong): |0.5 - 0.425| = .075, weight 2/6;
# (.5, 1] holds .9 .8 .7 (right) and .6 (wrong): accuracy .75 = mean confidence .75 -> ECE = .075 * 2/6 = .025
SAMPLES = [(0, 0, .9), (0, 0, .4), (1, 1, .8), (1, 0, .6), (2, 2, .7), (2, 1, .45)]


def crafted():
    targets = np.array([t for t, _, _ in SAMPLES])
    probs = np.zeros((len(SAMPLES), 3))
    for i, (_, p, c) in enumerate(SAMPLES):
        probs[i] = (1 - c) / 2
        probs[i, p] = c
    return targets, probs


def test_report_numbers_match_a_hand_computed_confusion_matrix(tmp_path):
    targets, probs = crafted()
    preds = probs.argmax(1)
    assert confusion_counts(targets, preds, 3).tolist() == [[2, 0, 0], [1, 1, 0], [0, 1, 1]]
    table = per_class_table(targets, preds, CLASSES)
    assert table["precision"].tolist() == pytest.approx([2 / 3, 1 / 2, 1])
    assert table["recall"].tolist() == pytest.approx([1, 1 / 2, 1 / 2])
    assert table["f1"].tolist() == pytest.approx([0.8, 0.5, 2 / 3])
    assert table["support"].tolist() == [2, 2, 2]
    pairs = confused_pairs(confusion_counts(targets, preds, 3), CLASSES)
    assert pairs[["true", "predicted", "count"]].values.tolist() == [["b", "a", 1], ["c", "b", 1]]
    assert pairs["share_of_true"].tolist() == pytest.approx([0.5, 0.5])
    bins, ece = calibration(probs, targets, bins=2)
    assert ece == pytest.approx(0.025)
    assert bins["count"].tolist() == [2, 4] and bins["accuracy"].tolist() == pytest.approx([0.5, 0.75])

    paths = []
    for i in range(len(SAMPLES)):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(paths[-1])
    flipped = probs.copy()
    flipped[3] = [0.1, 0.8, 0.1]  # this mode gets one more image right
    out = tmp_path / "report"
    write_report(str(out), {"none": probs, "flip": flipped}, Labelled(paths, targets, CLASSES), "none", "crafted")
    assert pd.read_csv(out / "per_class.csv")["f1"].tolist() == pytest.approx([0.8, 0.5, 2 / 3])
    assert pd.read_csv(out / "tta.csv")["accuracy"].tolist() == pytest.approx([4 / 6, 5 / 6])
    assert len(pd.read_csv(out / "confused_pairs.csv")) == 2
    text = (out / "report.md").read_text()
    assert "accuracy 0.6667, macro F1 0.6556" in text
    for name in ["misclassified.png", "reliability.png"]:
        assert Image.open(out / name).size[0] > 100


def test_inference_report_on_a_trained_run(trained_run, tmp_path, capsys):
    run_dir, _ = trained_run
    out = tmp_path / "report"
    code, stdout, err = run_main(inference.main, ["--checkpoint", run_dir / "best.pt", "--val-dir",
                                                  os.path.join(SAMPLE, "val"), "--report", out, "--data-dir",
                                                  tmp_path, "--workers", 0], capsys)
    assert code == 0, err
    per_class = pd.read_csv(out / "per_class.csv", dtype={"class": str})
    assert per_class["class"].tolist() == [str(i) for i in range(10)] and (per_class["support"] == 10).all()
    tta = pd.read_csv(out / "tta.csv")
    assert tta["tta"].tolist() == predict.TTA_MODES
    for mode, acc in zip(tta["tta"], tta["accuracy"]):
        assert f"val accuracy with TTA {mode:10s}: {acc:.4f}" in stdout
    # recall averaged with the class sizes (all 10 here) is the accuracy of the analysed mode (flip)
    assert per_class["recall"].mean() == pytest.approx(tta.set_index("tta")["accuracy"]["flip"], abs=1e-6)
    assert (out / "misclassified.png").exists() and (out / "reliability.png").exists()
    assert "no predictions written" in stdout and not (tmp_path / "prediction.csv").exists()


def test_preview_grid_size_and_views(tmp_path, capsys):
    out = tmp_path / "preview.png"
    state = torch.get_rng_state()
    code, stdout, err = run_main(augment_preview.main, ["--preview", os.path.join(SAMPLE, "train"), "--img-size", 32,
                                                "--images", 4, "--views", 3, "--output", out], capsys)
    assert code == 0, err
    assert torch.equal(state, torch.get_rng_state())  # a preview inside training leaves its random stream alone
    grid = np.asarray(Image.open(out))
    assert grid.shape == (4 * 34 + 2, 4 * 34 + 2, 3)  # 4 rows x (original + 3 views) of 32px tiles, 2px padding
    first = images.load_rgb(os.path.join(SAMPLE, "train", "0", sorted(os.listdir(os.path.join(SAMPLE, "train",
                                                                                              "0")))[0]))
    original = augment.center_crop(augment.eval_transform(32, 0.875)(first), 32).permute(1, 2, 0).numpy()
    assert np.array_equal(grid[2:34, 2:34], original)
    assert not np.array_equal(grid[2:34, 36:68], original)


def test_tensorboard_logs_scalars_and_images(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    code, _, err = run_main(train.main, ["--data-dir", SAMPLE, "--output-dir", tmp_path, "--run-name", "tb",
                                         "--epochs", 1, "--head", "linear", "--tensorboard", *TINY], capsys)
    assert code == 0, err
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss/train_loss", "loss/val_loss", "accuracy/val_acc", "accuracy/val_acc_ema", "schedule/lr",
            "schedule/focal_share", "speed/images_per_s"} <= scalars
    history = pd.read_csv(tmp_path / "tb" / "history.csv")
    assert events.Scalars("accuracy/val_acc")[0].value == pytest.approx(history["val_acc"][0], abs=1e-6)
    assert set(events.Tags()["images"]) == {"augmentation", "confusion_matrix"}


def test_tensorboard_missing_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    code, _, err = run_main(train.main, ["--data-dir", SAMPLE, "--output-dir", tmp_path, "--tensorboard", *TINY],
                            capsys)
    assert code == 2 and "Traceback" not in err, err
    last = err.replace("\r", "\n").strip().splitlines()[-1]  # after the image scan's progress bar
    assert last == "error: --tensorboard needs the tensorboard package: pip install tensorboard"


def test_help_documents_the_new_flags(capsys):
    import ablation
    for main, flags in [(ablation.main, ["--grid", "--repeats", "--seed", "--name", "--output-dir"]),
                        (augment_preview.main, ["--preview", "--output", "--images", "--views", "--img-size", "--erasing"]),
                        (inference.main, ["--report"]), (train.main, ["--tensorboard"])]:
        code, out, _ = run_main(main, ["--help"], capsys)
        assert code == 0 and all(flag in out for flag in flags), out


def test_the_default_report_folder_belongs_to_the_checkpoint_given(tmp_path):
    os.makedirs(tmp_path / "cv" / "fold0")
    (tmp_path / "cv" / "fold0" / "best.pt").write_bytes(b"")
    # a file: report/ beside it; a folder (an ensemble of the best.pt below it): report/ inside that folder, not in
    # the output folder that other ensembles share
    assert inference.default_report_dir([str(tmp_path / "cv" / "fold0" / "best.pt")]) == str(tmp_path / "cv" / "fold0"
                                                                                            / "report")
    assert inference.default_report_dir([str(tmp_path / "cv")]) == str(tmp_path / "cv" / "report")
