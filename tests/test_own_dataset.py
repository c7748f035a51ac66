"""README "Your own dataset": a folder whose classes are words, not numbers, taken from the LR finder to training with
the LR it suggests, to predictions under another competition's CSV header, to an exported ONNX model that agrees
with them."""
import json
import os
import re
import shlex
import shutil

import numpy as np
import onnxruntime
import pandas as pd
import pytest
import torch

import inference
from augment import center_crop, eval_transform
from conftest import SAMPLE, TINY, call_script, one_line_error, run_main, run_script
from dataset import FlatImages
from export import loaded_metadata


def clothes(tmp_path, val=True):
    """The sample set with its class folders named after the clothes (classes.csv) instead of 0 .. 9; without
    val/ (its images join train/) when val is False."""
    names = pd.read_csv(os.path.join(SAMPLE, "classes.csv"), dtype=str)
    words = {folder: re.sub(r"\W+", "_", name) for folder, name in zip(names["folder"], names["name"])}
    root = tmp_path / "clothes"
    for split in ("train", "val"):
        for folder, word in words.items():
            shutil.copytree(os.path.join(SAMPLE, split, folder), root / (split if val else "train") / word,
                            dirs_exist_ok=True)
    shutil.copytree(os.path.join(SAMPLE, "test"), root / "test")
    return root, sorted(words.values())


def find_lr(root, out, *extra):
    """train.py --find-lr: (the suggested --lr, the training command it printed, as argv)."""
    proc = run_script("train.py", "--data-dir", root, "--output-dir", out, "--run-name", "clothes", *TINY,
                      "--epochs", 1, *extra, "--find-lr", "--lr-find-steps", 12, "--lr-find-range", 1e-5, 1)
    command = next(line for line in proc.stdout.splitlines() if line.startswith("train with: "))
    words = shlex.split(command.removeprefix("train with: "))
    assert words[:2] == ["python", "train.py"] and "--find-lr" not in words and "--lr-find-steps" not in words
    lr = float(words[words.index("--lr") + 1])
    suggested = re.search(r"(?:suggested|suggesting) --lr (\S+?)[:,]", proc.stdout)
    assert suggested and float(suggested.group(1)) == lr, proc.stdout
    return lr, words[2:]


def test_own_dataset_walkthrough(tmp_path):
    """As README "Your own dataset" walks it: no val/ folder, a held-out share of train/, early stopping."""
    root, classes = clothes(tmp_path, val=False)
    out = tmp_path / "runs"
    lr, train_args = find_lr(root, out, "--val-fraction", 0.2, "--patience", 3)
    run_dir = out / "clothes"
    assert 1e-5 <= lr <= 1  # inside the swept range
    assert sorted(os.listdir(run_dir)) == ["lr_find.png"]  # no last.pt, best.pt, config.json, split: only the plot
    assert (run_dir / "lr_find.png").stat().st_size > 10_000

    call_script("train.py", *train_args)  # the printed command starts the run in the finder's folder
    assert {"best.pt", "last.pt", "lr_find.png", "val_split.csv"} <= set(os.listdir(run_dir))
    assert (pd.read_csv(run_dir / "val_split.csv")["split"] == "val").sum() == 80  # 20% of each class's 40
    history = pd.read_csv(run_dir / "history.csv")
    assert history["lr"].iloc[0] == pytest.approx(lr)  # the LR the finder suggested
    assert json.loads((run_dir / "config.json").read_text())["classes"] == classes

    predictions = tmp_path / "submission.csv"
    call_script("inference.py", "--checkpoint", run_dir / "best.pt", "--data-dir", root, "--output", predictions,
                "--csv-columns", "id,label", "--topk", 2, "--workers", 0)
    df = pd.read_csv(predictions, dtype=str)
    assert list(df.columns) == ["id", "label"] and set(df["label"]) <= set(classes) and len(df) == 50
    assert list(pd.read_csv(tmp_path / "submission_top2.csv").columns[:2]) == ["id", "label_1"]

    model = str(tmp_path / "clothes.onnx")
    call_script("inference.py", "--checkpoint", run_dir / "best.pt", "--export", model)
    meta = loaded_metadata(model)
    assert json.loads(meta["classes"]) == classes
    size, resize = int(meta["eval_size"]), int(meta["resize"])
    test = FlatImages(str(root / "test"), eval_transform(size, float(meta["eval_crop_ratio"])), draft_size=resize)
    crops = center_crop(torch.stack([test[i][0] for i in range(len(test))]), size).contiguous().numpy()
    probs = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"images": crops})[0]
    exported = dict(zip(test.names, np.array(classes)[probs.argmax(1)]))
    assert [exported[name] for name in df["id"]] == list(df["label"])  # the CSV's labels, from the ONNX file


@pytest.mark.parametrize("columns", ["id", "id,label,extra", "id,", "id,id"])
def test_csv_columns_mistakes_are_one_line(capsys, columns):
    code, _, err = run_main(inference.main, ["--checkpoint", "best.pt", "--csv-columns", columns], capsys)
    assert one_line_error(code, err) == (f"error: --csv-columns {columns!r}: give two different column names "
                                         "separated by a comma, the image name's first, e.g. id,label")
