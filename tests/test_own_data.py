"""A folder of the user's own: no val/ folder (--val-fraction, --folds on train/ alone) and settings from a file
(--config), on a run, on a resumed run and on a run's own config.json."""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

import train
from conftest import SAMPLE, TINY, error_line, one_line_error, run_main
from folds import holdout_mask

# class name -> how many of the sample's train images of class 0, 1, 2, 3 it gets: 'rare' cannot be split
CLASSES = {"cat": 6, "dog": 6, "owl": 6, "rare": 1}
SMALL = [*TINY, "--head", "linear", "--batch-size", 8, "--no-ema"]


@pytest.fixture(scope="module")
def train_only(tmp_path_factory):
    """train/<class>/ of four named classes and no val/ folder: seconds per epoch."""
    root = tmp_path_factory.mktemp("own") / "data"
    for i, (name, n) in enumerate(CLASSES.items()):
        os.makedirs(root / "train" / name)
        for image in sorted(os.listdir(os.path.join(SAMPLE, "train", str(i))))[:n]:
            shutil.copy(os.path.join(SAMPLE, "train", str(i), image), root / "train" / name / image)
    return root


def test_holdout_is_stratified_seeded_and_keeps_images_on_both_sides():
    targets = np.repeat([0, 1, 2, 3], [10, 4, 1, 2])
    held, too_small = holdout_mask(targets, 0.2, seed=3)
    assert np.bincount(targets[held], minlength=4).tolist() == [2, 1, 0, 1]  # at least one, never all of a class
    assert too_small == [2]
    assert (holdout_mask(targets, 0.2, seed=3)[0] == held).all()
    assert any((holdout_mask(targets, 0.2, seed=s)[0] != held).any() for s in range(4, 10))


@pytest.fixture(scope="module")
def fraction_run(train_only, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    argv = ["--data-dir", train_only, "--output-dir", out, "--run-name", "vf", *SMALL, "--epochs", 1,
            "--val-fraction", 0.34]
    code, stdout = run_in_process(argv)
    assert code == 0
    return out / "vf", stdout


def run_in_process(argv):
    import contextlib
    import io
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = train.main([str(a) for a in argv])
    return code, buffer.getvalue()


def test_val_fraction_trains_without_val_and_writes_its_split(fraction_run):
    run_dir, out = fraction_run
    split = pd.read_csv(run_dir / "val_split.csv", dtype=str)
    assert len(split) == 19 and list(split.columns) == ["image", "label", "split"]
    held = split[split["split"] == "val"]
    assert held["label"].value_counts().to_dict() == {"cat": 2, "dog": 2, "owl": 2}
    assert "warning: --val-fraction 0.34: 1 class(es) have a single image, which stays in training" in out
    assert "13 train / 6 val images" in out
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == [1]


def test_a_resumed_run_validates_on_its_saved_split(fraction_run, tmp_path, capsys):
    run_dir = tmp_path / "vf"
    shutil.copytree(fraction_run[0], run_dir)
    split = pd.read_csv(run_dir / "val_split.csv", dtype=str)
    # another image of each class in val than the seed would draw: only a reused split can give this one
    split["split"] = np.where(split.groupby("label").cumcount() < 1, "val", "train")
    split.loc[split["label"] == "rare", "split"] = "train"
    # and one training image the file does not hold, as if added to train/ since: it trains, and is named
    added = split[split["split"] == "train"]["image"].iloc[0]
    split[split["image"] != added].to_csv(run_dir / "val_split.csv", index=False)
    code, out, err = run_main(train.main, ["--resume", run_dir / "last.pt", "--epochs", 2,
                                           "--allow-schedule-change"], capsys)
    assert code == 0, err
    assert f"validating on the 3 images of {run_dir / 'val_split.csv'}, as the run did" in out
    assert f"warning: 1 image(s) are not in {run_dir / 'val_split.csv'} (added, or moved to another class, since " \
           f"the split was made): they train: {added}" in out
    assert "16 train / 3 val images" in out
    assert pd.read_csv(run_dir / "val_split.csv", dtype=str).equals(split)
    assert list(pd.read_csv(run_dir / "history.csv")["epoch"]) == [1, 2]


def test_folds_need_no_val_folder(train_only, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(train_only, data)
    shutil.rmtree(data / "train" / "rare")  # one image cannot go to two folds
    code, out, err = run_main(train.main, ["--data-dir", data, "--output-dir", tmp_path, "--run-name", "cv", *SMALL,
                                           "--epochs", 1, "--folds", 2, "--fold", 1], capsys)
    assert code == 0, err
    split = pd.read_csv(tmp_path / "cv" / "folds.csv", dtype=str)
    assert len(split) == 18 and (split.groupby("label")["fold"].value_counts() == 3).all()
    assert "9 train / 9 val images" in out


def test_val_folder_questions_are_one_line_errors(train_only, tmp_path, capsys):
    def error(data, *argv):
        return one_line_error(*run_main(train.main, ["--data-dir", data, "--output-dir", tmp_path, *SMALL, *argv],
                                        capsys)[::2])

    message = error(train_only)
    assert "no such folder" in message and "add --val-fraction 0.1" in message
    assert "drop --val-fraction to validate on val/" in error(SAMPLE, "--val-fraction", 0.1)
    assert "both choose the validation images" in error(train_only, "--val-fraction", 0.1, "--folds", 2)
    assert "--val-fraction and --min-delta must lie in [0, 1)" in error(train_only, "--val-fraction", 1)


# ---------------------------------------------------------------- --config FILE

def test_config_file_settings_are_overridden_by_typed_flags(tmp_path):
    (tmp_path / "run.yaml").write_text("lr: 1e-3\nbatch-size: 16\nema: false\naug: light\nrrc_scale: [0.5, 1]\n"
                                       "amp: off\nrun_name: -odd-name\n")
    cfg, _, given = train.parse_args(["--config", str(tmp_path / "run.yaml"), "--batch-size", "8"])
    assert (cfg.lr, cfg.batch_size, cfg.ema, cfg.aug, cfg.rrc_scale, cfg.amp) == (1e-3, 8, False, "light",
                                                                                [0.5, 1.0], "off")
    assert cfg.run_name == "-odd-name"
    assert given["lr"] == 1e-3 and given["batch_size"] == 8  # the file's settings count as given
    (tmp_path / "run.json").write_text(json.dumps({"epochs": 3, "auto_augment": "ta_wide"}))
    cfg, _, _ = train.parse_args(["--config", str(tmp_path / "run.json"), "--epochs", "5"])
    assert cfg.epochs == 5 and cfg.aug == "policy"


def test_config_file_mistakes_are_one_line_errors(tmp_path, capsys):
    def error(text, name="run.yaml"):
        (tmp_path / name).write_text(text)
        return one_line_error(*run_main(train.main, ["--config", tmp_path / name, *SMALL], capsys)[::2])

    assert "unknown setting(s) batchsize, learning_rate" in error("learning_rate: 0.1\nbatchsize: 4\nlr: 0.1\n")
    assert "epochs must be a whole number (it is 2.5)" in error("epochs: 2.5\n")
    assert "loss must be one of ce, focal" in error("loss: hinge\n")
    assert "ema must be true or false" in error("ema: 3\n")
    assert "cannot read it" in error("{lr: [\n")
    assert "cannot read it" in error('{"lr": 1e-3,}', "run.json")
    assert "no such file" in one_line_error(*run_main(train.main, ["--config", tmp_path / "none.yaml"],
                                                      capsys)[::2])


def test_a_runs_own_config_json_starts_a_new_run_and_resumes_its_run(fraction_run, tmp_path, capsys):
    run_dir = tmp_path / "vf"
    shutil.copytree(fraction_run[0], run_dir)
    own = run_dir / "config.json"
    saved = json.loads(own.read_text())
    assert {"classes", "processes"} <= set(saved)
    cfg, _, _ = train.parse_args(["--config", str(own), "--run-name", "again"])
    assert {k: v for k, v in vars(cfg).items() if k != "run_name"} == \
        {k: v for k, v in saved.items() if k not in ("classes", "processes", "run_name")}
    # resuming with the run's own file checks its settings like typed flags: the same ones pass, a change does not
    code, out, err = run_main(train.main, ["--config", own, "--resume", run_dir / "last.pt", "--output-dir",
                                           tmp_path, "--max-params", 1], capsys)
    assert "--max-params cannot change when resuming" in error_line(code, err)
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(dict(saved, epochs=3)))
    code, out, err = run_main(train.main, ["--config", edited, "--resume", run_dir / "last.pt"], capsys)
    assert "--epochs 3 differs from the resumed run's 1: pass --allow-schedule-change" in error_line(code, err)
    code, out, err = run_main(train.main, ["--config", edited, "--resume", run_dir / "last.pt",
                                           "--epochs", 1], capsys)  # typed flags win over the file
    assert code == 0, err
    assert "resuming at epoch 2 step 0" in out
