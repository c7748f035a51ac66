"""
Tests for scripts/fashion_mnist.py and scripts/score.py.

Each script runs end to end as a subprocess, the way a user runs it. Importing
sklearn costs a couple of seconds per process, so those two runs start together
(see end_to_end) and the remaining cases call main()/score() in-process.
"""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
sys.path.insert(0, SCRIPTS)
from score import ScoreError, read_csv, score  # noqa: E402

import fashion_mnist  # noqa: E402

CLASSES = [str(c) for c in range(10)]

# hand-made scoring example, 4 of 6 right (d and f wrong):
#   class 0: tp=2 fp=1 fn=0 -> P=2/3 R=1   F1=0.8
#   class 1: tp=1 fp=1 fn=1 -> P=1/2 R=1/2 F1=0.5
#   class 2: tp=1 fp=0 fn=1 -> P=1   R=1/2 F1=2/3
#   accuracy = 4/6 = 0.6667, macro-F1 = (0.8 + 0.5 + 2/3) / 3 = 0.6556
LABELS = pd.DataFrame({"image_name": list("abcdef"), "label": ["0", "0", "1", "1", "2", "2"]})
PRED = pd.DataFrame({"image_name": list("abcdef"), "pred_label": ["0", "0", "1", "0", "2", "1"]})
CONFUSION = [[2, 0, 0], [1, 1, 0], [0, 1, 1]]


def start(script, *args):
    return subprocess.Popen([sys.executable, os.path.join(SCRIPTS, script), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
    stdout, stderr = proc.communicate(timeout=300)  # a hang guard, generous for a loaded machine
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run(script, *args):
    return finish(start(script, *args))


def write_idx(path, array):
    # idx header: 0, 0, dtype 0x08 (uint8), ndim, then each dim as big-endian uint32
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_source(folder, train_per_class=6, test_per_class=3):
    # a tiny fake Fashion-MNIST: class k has pixels in 20k..20k+19, so labels are checkable
    rng = np.random.default_rng(0)
    src = folder / "src"
    src.mkdir()
    for prefix, n in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.repeat(np.arange(10), n)
        rng.shuffle(labels)
        images = rng.integers(0, 20, size=(len(labels), 28, 28)) + 20 * labels[:, None, None]
        write_idx(src / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return src


def files(folder):
    return sorted(os.listdir(folder))


@pytest.fixture(scope="module")
def end_to_end(tmp_path_factory):
    """Both CLIs on their happy path, run side by side to pay the sklearn import once."""
    tmp = tmp_path_factory.mktemp("e2e")
    out = tmp / "out"
    src = make_source(tmp)
    PRED.to_csv(tmp / "prediction.csv", index=False)
    LABELS.to_csv(tmp / "labels.csv", index=False)
    convert = start("fashion_mnist.py", "--source-dir", src, "--out", out,
                    "--val-size", 20, "--size", 32)
    scoring = start("score.py", tmp / "prediction.csv", tmp / "labels.csv",
                    "--json", tmp / "score.json", "--plot", tmp / "confusion.png")
    return {"out": out, "convert": finish(convert), "score": finish(scoring),
            "score_json": tmp / "score.json", "score_plot": tmp / "confusion.png"}


# -----------------------------------------------------------------------------
# fashion_mnist.py

def test_fashion_mnist_layout(end_to_end):
    r, out = end_to_end["convert"], end_to_end["out"]
    assert r.returncode == 0, r.stderr

    assert sorted(os.listdir(out / "train"), key=int) == CLASSES
    assert sorted(os.listdir(out / "val"), key=int) == CLASSES
    for c in CLASSES:
        assert len(files(out / "train" / c)) == 4  # 6 per class, 2 of them moved to val
        assert len(files(out / "val" / c)) == 2

    test_files = files(out / "test")
    assert len(test_files) == 30
    assert all(os.path.isfile(out / "test" / f) and f.endswith(".jpg") for f in test_files)

    for path in [out / "train" / "3" / files(out / "train" / "3")[0], out / "test" / test_files[0]]:
        with Image.open(path) as im:
            assert im.mode == "RGB" and im.size == (32, 32)
            a = np.asarray(im)
            assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()

    # every test image labelled exactly once, and the label matches the pixels
    labels = pd.read_csv(out / "test_labels.csv", dtype=str)
    assert list(labels.columns) == ["image_name", "label"]
    assert sorted(labels.image_name) == sorted(os.path.splitext(f)[0] for f in test_files)
    assert not labels.image_name.duplicated().any()
    assert labels.label.value_counts().to_dict() == {c: 3 for c in CLASSES}
    for name, label in labels.itertuples(index=False):
        with Image.open(out / "test" / f"{name}.jpg") as im:
            assert np.asarray(im).mean() // 20 == int(label)
    # names must not reveal the label: sorting by name should not sort by label
    assert list(labels.sort_values("image_name").label) != sorted(labels.label, key=int)

    cls = pd.read_csv(out / "classes.csv", dtype=str)
    assert list(cls.folder) == CLASSES
    assert cls.name[0] == "T-shirt/top" and cls.name[9] == "Ankle boot"


def test_fashion_mnist_caps_png_and_overwrite(tmp_path):
    src = make_source(tmp_path)
    out = tmp_path / "out"
    (out / "test").mkdir(parents=True)
    (out / "test" / "stale.png").write_bytes(b"")  # left over from an older run
    (out / "LICENSE.md").write_text("kept")
    args = ["--source-dir", src, "--out", out, "--val-size", 20, "--format", "png", "--workers", 1,
            "--train-per-class", 3, "--val-per-class", 1, "--test-count", 10]
    args = list(map(str, args))

    with pytest.raises(fashion_mnist.UsageError, match="not empty; pass --overwrite"):
        fashion_mnist.main(args)

    fashion_mnist.main(args + ["--overwrite"])
    assert (out / "LICENSE.md").read_text() == "kept"
    assert all(len(files(out / "train" / c)) == 3 for c in CLASSES)
    assert all(len(files(out / "val" / c)) == 1 for c in CLASSES)
    test_files = files(out / "test")
    assert len(test_files) == 10 and "stale.png" not in test_files
    assert all(f.endswith(".png") for f in test_files)
    with Image.open(out / "test" / test_files[0]) as im:
        assert im.mode == "RGB" and im.size == (64, 64)
    labels = pd.read_csv(out / "test_labels.csv", dtype=str)
    assert labels.label.nunique() == 10  # the 10-image slice is stratified: one per class


def test_fashion_mnist_missing_source(tmp_path):
    r = run("fashion_mnist.py", "--source-dir", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "sudo apt-get install dataset-fashion-mnist" in r.stderr
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# score.py

def test_score_function():
    r = score(PRED, LABELS)
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert r["matched"] == 6 and r["extra_predictions"] == 0
    assert r["confusion"].values.tolist() == CONFUSION


def test_score_compares_labels_as_stripped_strings():
    pred = PRED.assign(pred_label=[" 0", "0 ", "01", "0", "2", "1"])  # "01" is not "1"
    r = score(pred, LABELS)
    assert r["accuracy"] == pytest.approx(3 / 6)
    assert "01" in list(r["confusion"].columns)


def test_score_function_errors(tmp_path):
    with pytest.raises(ScoreError, match="missing for 2 of 6"):
        score(PRED.iloc[:4], LABELS)
    with pytest.raises(ScoreError, match="duplicated"):
        score(pd.concat([PRED, PRED.iloc[:1]]), LABELS)
    with pytest.raises(ScoreError, match="must have columns"):
        score(PRED.rename(columns={"pred_label": "guess"}), LABELS)
    with pytest.raises(ScoreError, match="nope.csv: no such file"):
        read_csv(str(tmp_path / "nope.csv"))


def test_score_cli(end_to_end):
    r = end_to_end["score"]
    assert r.returncode == 0, r.stderr
    assert "0.6667" in r.stdout and "0.6556" in r.stdout and "6 / 6" in r.stdout
    numbers = json.loads(end_to_end["score_json"].read_text())
    assert numbers["accuracy"] == pytest.approx(4 / 6)
    assert numbers["confusion"]["matrix"] == CONFUSION
    assert Image.open(end_to_end["score_plot"]).size[0] > 100
    counts = pd.read_csv(end_to_end["score_plot"].with_suffix(".csv"), index_col=0)
    assert counts.values.tolist() == CONFUSION and list(counts.columns) == ["0", "1", "2"]


@pytest.mark.parametrize("pred_rows, message", [
    (PRED.iloc[:3], "missing for 3 of 6 labelled images: d, e, f"),
    (pd.concat([PRED, PRED.iloc[[1]]]), "duplicated image_name(s): b"),
])
def test_score_cli_errors(tmp_path, pred_rows, message):
    pred, labels = tmp_path / "prediction.csv", tmp_path / "labels.csv"
    pred_rows.to_csv(pred, index=False)
    LABELS.to_csv(labels, index=False)
    r = run("score.py", pred, labels)
    assert r.returncode == 2
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
