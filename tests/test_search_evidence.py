"""The recipe-search evidence: scripts/digits.py and scripts/glyphs.py (offline datasets), scripts/plain_baseline.py
(the plain script they are compared with) and scripts/search_evidence.py (the three recipes, run, scored and
tabulated)."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
from PIL import Image

from conftest import ROOT, SAMPLE


def script(name, *args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_digits_layout(tmp_path):
    out = tmp_path / "digits"
    r = script("digits.py", "--out", out, "--size", 16, "--val-size", 50, "--test-size", 100, "--train-per-class", 5)
    assert r.returncode == 0, r.stderr
    classes = [str(c) for c in range(10)]
    assert sorted(os.listdir(out / "train")) == classes and sorted(os.listdir(out / "val")) == classes
    assert all(len(os.listdir(out / "train" / c)) == 5 for c in classes)
    assert sum(len(os.listdir(out / "val" / c)) for c in classes) == 50
    labels = pd.read_csv(out / "test_labels.csv", dtype=str)
    assert sorted(labels.image_name + ".jpg") == sorted(os.listdir(out / "test"))
    assert labels.label.value_counts().min() >= 9  # stratified: every digit about 10 times
    with Image.open(out / "test" / f"{labels.image_name[0]}.jpg") as im:
        a = np.asarray(im)
    assert im.size == (16, 16) and (a[..., 0] == a[..., 2]).all() and a.max() > 200  # grey, strokes near white
    assert pd.read_csv(out / "classes.csv", dtype=str).folder.tolist() == classes

    again = script("digits.py", "--out", out)  # not empty, no --overwrite
    assert again.returncode == 2 and again.stderr.startswith("error:") and "--overwrite" in again.stderr
    bad = script("digits.py", "--out", tmp_path / "x", "--test-size", 1700)
    assert bad.returncode == 2 and "leave at least 100 training images" in bad.stderr


def mpl_fonts():
    import matplotlib
    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")


def test_glyphs_layout_and_typeface_split(tmp_path):
    out = tmp_path / "glyphs"  # matplotlib's own fonts: present wherever the tests run
    r = script("glyphs.py", "--out", out, "--fonts", mpl_fonts(), "--size", 16, "--train-per-class", 2,
               "--val-per-class", 1, "--test-per-class", 2)
    assert r.returncode == 0, r.stderr
    classes = pd.read_csv(out / "classes.csv", dtype=str)
    assert len(classes) == 52 and classes.name.tolist()[:2] == ["A", "B"] and classes.name.tolist()[26] == "a"
    assert sorted(os.listdir(out / "train")) == sorted(classes.folder)  # cap-A ... small-z
    assert all(len(os.listdir(out / "train" / c)) == 2 and len(os.listdir(out / "val" / c)) == 1
               for c in classes.folder)
    labels = pd.read_csv(out / "test_labels.csv", dtype=str)
    assert sorted(labels.image_name + ".jpg") == sorted(os.listdir(out / "test"))
    assert (labels.label.value_counts() == 2).all() and set(labels.label) == set(classes.folder)
    fonts = pd.read_csv(out / "fonts.csv")
    by_split = fonts.groupby("split").typeface.agg(set)
    assert set(by_split.index) == {"train", "val", "test"}  # every split has typefaces, none shared
    assert not (by_split["train"] & by_split["test"]) and not (by_split["val"] & by_split["test"])
    assert not any("STIXSiz" in f or "cmex" in f for f in fonts.file)  # symbol fonts are not letters
    with Image.open(out / "test" / f"{labels.image_name[0]}.jpg") as im:
        a = np.asarray(im)
    assert im.size == (16, 16) and (a[..., 0] == a[..., 2]).all() and a.max() > 200 and a[0].max() < 60

    again = script("glyphs.py", "--out", out, "--fonts", mpl_fonts())  # not empty, no --overwrite
    assert again.returncode == 2 and again.stderr.startswith("error:") and "--overwrite" in again.stderr
    (tmp_path / "no-fonts").mkdir()
    none = script("glyphs.py", "--out", tmp_path / "x", "--fonts", tmp_path / "no-fonts")
    assert none.returncode == 2 and "found 0 typeface(s)" in none.stderr and "Traceback" not in none.stderr
    missing = script("glyphs.py", "--out", tmp_path / "x", "--fonts", tmp_path / "nowhere")
    assert missing.returncode == 2 and "--fonts" in missing.stderr and "no such folder" in missing.stderr
    shares = script("glyphs.py", "--out", tmp_path / "x", "--fonts", mpl_fonts(), "--test-share", 0.49,
                    "--val-share", 0.49)
    assert shares.returncode == 2 and "none of the" in shares.stderr and "Traceback" not in shares.stderr


def test_a_letter_keeps_its_size_on_the_baseline():
    """A small c is drawn smaller than a capital C and on the same baseline: what crops that zoom in destroy."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import glyphs
    font = os.path.join(mpl_fonts(), "DejaVuSans.ttf")
    rng = np.random.default_rng(0)
    rows = {c: np.flatnonzero(glyphs.render(c, font, 64, rng).max(axis=1) > 128) for c in "Cc"}
    height = {c: rows[c][-1] - rows[c][0] for c in "Cc"}
    assert height["c"] < 0.85 * height["C"]
    assert abs(rows["c"][-1] - rows["C"][-1]) <= 4  # both end at the baseline, give or take the jitter


def test_plain_baseline_predicts_every_test_image(tmp_path):
    csv = tmp_path / "plain.csv"
    r = script("plain_baseline.py", "--data-dir", SAMPLE, "--epochs", 1, "--img-size", 32, "--output", csv)
    assert r.returncode == 0, r.stderr
    assert "epoch 1/1" in r.stdout and "training took" in r.stdout
    pred = pd.read_csv(csv, dtype=str)
    names = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(SAMPLE, "test")))
    assert sorted(pred.image_name) == names
    assert set(pred.pred_label) <= set(os.listdir(os.path.join(SAMPLE, "train")))
    scored = script("score.py", csv, os.path.join(SAMPLE, "test_labels.csv"))
    assert scored.returncode == 0 and "50 / 50" in scored.stdout, scored.stdout + scored.stderr


def test_search_evidence_runs_scores_and_resumes(tmp_path):
    # 24 plain epochs: the wall time every recipe gets must hold train.py's start-up and its first validated epoch
    # (the digits validate every 5th) while the other test worker loads the machine
    args = ["--only", "digits", "--seeds", 1, "--epochs", 24, "--search", 1, "--trial-epochs", 1, "--confirm-seeds", 0,
            "--out", tmp_path]
    # a data folder that is there already is used as it is: a smaller digits set than the script's own
    made = script("digits.py", "--size", 32, "--train-per-class", 10, "--val-size", 50, "--test-size", 100, "--out",
                  tmp_path / "digits" / "data")
    assert made.returncode == 0, made.stderr
    r = script("search_evidence.py", *args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    for recipe in ("plain", "defaults", "searched"):
        assert f"| {recipe} |" in summary
    assert "1 trials of 1 epochs (0 pruned) + 0 confirmation runs" in summary
    assert (tmp_path / "summary.png").stat().st_size > 10_000
    numbers = json.loads((tmp_path / "summary.json").read_text())["digits"]
    assert sorted(run["recipe"] for run in numbers["runs"]) == ["defaults", "plain", "searched"]
    assert all(0 <= run["test_acc"] <= 1 and run["train_seconds"] > 0 and run["epochs"] >= 1
               for run in numbers["runs"])
    assert numbers["wall_seconds"] > 0  # the plain script's: the time every recipe gets
    assert numbers["search_trials"] == 1  # tune.py's first trial is train.py's defaults: only the model flags differ
    assert numbers["winner"] == {"arch": "resnet18", "weights": "none", "img_size": 32, "eval_crop_ratio": 1.0,
                                 "val_every": 5}  # the digits' flag reaches the search and its winner

    again = script("search_evidence.py", *args, timeout=120)  # every run is reused: no training, same table
    assert again.returncode == 0 and (tmp_path / "summary.md").read_text() == summary
    assert not [line for line in again.stdout.splitlines() if line.startswith("+ ")]  # no command was run
    other = script("search_evidence.py", *args[:4], "--epochs", 5, *args[6:])
    assert other.returncode != 0 and "give another --out" in other.stderr


def test_the_searched_recipe_gets_the_epochs_its_first_run_fits():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from search_evidence import refit_epochs
    assert refit_epochs(40, {"epochs": 33, "train_seconds": 91.5}, 91, 60) == 32  # the time limit cut it at 33
    assert refit_epochs(40, {"epochs": 40, "train_seconds": 70}, 91, 60) == 52  # it ended early: more fit
    assert refit_epochs(40, {"epochs": 40, "train_seconds": 50}, 91, 60) == 60  # never more than the plain script's


def test_script_mistakes_are_one_line_errors(tmp_path):
    plain = script("plain_baseline.py", "--data-dir", tmp_path)
    last_line = plain.stderr.strip().splitlines()[-1]
    assert plain.returncode == 2 and last_line.endswith("needs train/<class>/ and test/ folders")
    seeds = script("search_evidence.py", "--seeds", 1, 1, "--out", tmp_path)
    assert seeds.returncode == 2 and "--seeds must differ" in seeds.stderr and not os.listdir(tmp_path)
