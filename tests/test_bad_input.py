"""Hostile files everywhere: odd pixel formats, broken images, odd names, hidden files, odd folders, bad checkpoints."""
import io
import os
import shutil
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import inference
import train
import tune
from conftest import SAMPLE, TINY, error_line, one_line_error, run_main
from errors import UserError, run_cli
from images import BadImage, load_rgb
from model import build_model

BROKEN = ["truncated.jpg", "zero bytes.jpg", "not an image.png"]


def pattern(size=(40, 30)):
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def add_odd_files(folder):
    """Every kind of readable oddity, three unreadable files and two hidden ones into `folder`."""
    os.makedirs(folder, exist_ok=True)
    pattern().convert("CMYK").save(folder / "cmyk.jpg")
    pattern().convert("L").save(folder / "grey.png")
    pattern().convert("P").save(folder / "palette.png")
    pattern().convert("RGBA").save(folder / "alpha.png")
    Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16)).save(folder / "sixteen bit.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    pattern().save(folder / "rotated.jpg", exif=exif)
    pattern().save(folder / "ünïcödé näme.jpg")
    pattern().save(folder / "really a png.jpg", format="PNG")
    pattern((400, 300)).save(folder / "big.jpg", quality=95)
    data = (folder / "big.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (folder / "zero bytes.jpg").write_bytes(b"")
    (folder / "not an image.png").write_text("hello")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    (folder / "._cmyk.jpg").write_bytes(b"AppleDouble")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Sample classes 0-3 (8 train / 4 val images each), odd and broken files in train/0 and test/, an empty class
    folder and a class missing from val/."""
    data = tmp_path_factory.mktemp("hostile")
    for split, n in (("train", 8), ("val", 4)):
        for c in range(4):
            if split == "val" and c == 3:
                continue  # class folder missing from val/
            os.makedirs(data / split / str(c))
            for name in sorted(os.listdir(os.path.join(SAMPLE, split, str(c))))[:n]:
                shutil.copy(os.path.join(SAMPLE, split, str(c), name), data / split / str(c) / name)
    os.makedirs(data / "train" / "4")  # empty class folder
    add_odd_files(data / "train" / "0")
    add_odd_files(data / "test")
    return data


@pytest.fixture(scope="module")
def hostile_run(hostile, tmp_path_factory):
    """One tiny epoch on the hostile data, in this process (capsys is per test, so its output is caught here)."""
    out, stdout, stderr = tmp_path_factory.mktemp("runs"), io.StringIO(), io.StringIO()
    argv = ["--data-dir", hostile, "--output-dir", out, "--run-name", "h", "--epochs", 1, "--max-bad-frac", 0.2,
            *TINY]
    with redirect_stdout(stdout), redirect_stderr(stderr), pytest.raises(SystemExit) as stop:
        run_cli(lambda: train.main([str(a) for a in argv]))
    return out / "h", stop.value.code, stdout.getvalue(), stderr.getvalue()


def test_training_names_and_skips_unreadable_images_and_reads_every_odd_one(hostile_run):
    run_dir, code, out, err = hostile_run
    assert code == 0, err
    for name in BROKEN:
        assert any(line.startswith("warning: skipped unreadable image") and name in line for line in out.splitlines())
    assert "._cmyk" not in out + err and ".DS_Store" not in out + err  # hidden files are not images
    listed = (run_dir / "skipped_images.txt").read_text().splitlines()
    assert sorted(os.path.basename(line.split(": ")[0]) for line in listed) == sorted(BROKEN)
    # 32 sample images + 9 readable odd ones, in 5 classes (one of them empty)
    assert "5 classes, 41 train / 12 val images" in out
    assert len(pd.read_csv(run_dir / "history.csv")) == 1


def test_too_many_unreadable_images_stop_before_training(hostile, tmp_path, capsys):
    code, out, err = run_main(train.main, ["--data-dir", hostile, "--output-dir", tmp_path, "--run-name", "x",
                                           *TINY], capsys)
    message = error_line(code, err)
    assert "3 of 56 train/val images (5.4%) cannot be read, more than --max-bad-frac 0.01" in message
    assert not (tmp_path / "x" / "last.pt").exists()
    assert len((tmp_path / "x" / "skipped_images.txt").read_text().splitlines()) == 3


def test_check_data_is_its_own_command(hostile, capsys):
    with pytest.warns(UserWarning, match="hold no images: 4"):  # the empty class folder
        code, out, err = run_main(train.main, ["--data-dir", hostile, "--check-data", "--max-bad-frac", 0.2,
                                               "--workers", 0], capsys)
    assert code == 0, err
    assert "5 classes, 41 train / 12 val readable images, 3 unreadable" in out
    assert "9 test images readable, 3 unreadable (inference.py needs --skip-bad for them)" in out
    assert sum(line.startswith("warning: unreadable test image") for line in out.splitlines()) == 3
    code, _, err = run_main(train.main, ["--data-dir", hostile, "--check-data", "--workers", 0], capsys)
    assert "more than --max-bad-frac" in error_line(code, err)


def test_inference_stops_on_an_unreadable_test_image_unless_skip_bad(hostile, hostile_run, tmp_path, capsys):
    run_dir = hostile_run[0]
    args = ["--checkpoint", run_dir / "best.pt", "--data-dir", hostile, "--workers", 0, "--batch-size", 4]
    code, _, err = run_main(inference.main, [*args, "--output", tmp_path / "no.csv"], capsys)
    message = error_line(code, err)
    assert "unreadable image" in message and "--skip-bad" in message
    assert any(name in message for name in BROKEN)
    assert not (tmp_path / "no.csv").exists()

    code, out, err = run_main(inference.main, [*args, "--output", tmp_path / "p.csv", "--skip-bad", "--topk", 2],
                              capsys)
    assert code == 0, err
    df = pd.read_csv(tmp_path / "p.csv", dtype=str)
    files = sorted(n for n in os.listdir(hostile / "test") if not n.startswith("."))
    assert list(df["image_name"]) == sorted(os.path.splitext(n)[0] for n in files)  # one row per test file
    broken = df[df["image_name"].isin([os.path.splitext(n)[0] for n in BROKEN])]
    assert list(broken["pred_label"]) == ["0", "0", "0"]  # class 0 has the most training images
    assert "3 unreadable test image(s) predicted as the most frequent training class 0" in out
    assert sum(line.startswith("warning: unreadable image") for line in (out + err).splitlines()) == 3
    assert len(pd.read_csv(tmp_path / "p_top2.csv")) == len(files)


def test_empty_or_missing_folders_are_one_line_errors(hostile, hostile_run, tmp_path, capsys):
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"x")
    checkpoint = hostile_run[0] / "best.pt"
    code, _, err = run_main(inference.main, ["--checkpoint", checkpoint, "--test-dir", tmp_path / "empty"], capsys)
    assert "holds no images" in error_line(code, err)
    code, _, err = run_main(inference.main, ["--checkpoint", checkpoint, "--test-dir", tmp_path / "gone"], capsys)
    assert "no such test folder" in error_line(code, err)
    os.makedirs(tmp_path / "data" / "train" / "a")
    code, _, err = run_main(train.main, ["--data-dir", tmp_path / "data", *TINY], capsys)
    assert "no such folder" in error_line(code, err) and "val" in error_line(code, err)
    code, _, err = run_main(inference.main, ["--checkpoint", checkpoint, "--data-dir", hostile,
                                             "--val-dir", os.path.join(SAMPLE, "val")], capsys)
    message = error_line(code, err)
    assert "class folders the checkpoint does not know (5 classes: 5, 6, 7, 8, 9)" in message
    assert "trained on 5 classes: 0, 1, 2, 3, 4" in message


def test_output_paths_that_cannot_be_written_are_one_line_errors(hostile, hostile_run, tmp_path, capsys):
    (tmp_path / "a file").write_text("x")
    blocked = tmp_path / "a file" / "runs"
    code, _, err = run_main(train.main, ["--data-dir", hostile, "--output-dir", blocked, "--run-name", "r", *TINY],
                            capsys)
    assert one_line_error(code, err) == (f"error: run folder {blocked / 'r'}: {tmp_path / 'a file'} is a file, not "
                                         "a folder")
    assert not (tmp_path / "r").exists()
    checkpoint = hostile_run[0] / "best.pt"
    for output, message in [(tmp_path, f"error: --output {tmp_path} is a folder: give a file name"),
                            (blocked / "p.csv", f"error: --output {blocked}: {tmp_path / 'a file'} is a file, not "
                                                "a folder")]:
        code, _, err = run_main(inference.main, ["--checkpoint", checkpoint, "--data-dir", hostile, "--output",
                                                 output], capsys)
        assert one_line_error(code, err) == message
    code, _, err = run_main(tune.main, ["--data-dir", hostile, "--output-dir", blocked, "--trials", 1], capsys)
    assert one_line_error(code, err) == (f"error: study folder {blocked / 'tune'}: {tmp_path / 'a file'} is a file, "
                                         "not a folder")


def test_an_image_over_the_decompression_bomb_limit_is_named(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    pattern((64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 is then over twice the limit
    with pytest.raises(BadImage, match="huge.png: image too large: over PIL's decompression-bomb limit of 2000"):
        load_rgb(str(path))


def test_a_checkpoint_of_another_arch_or_class_list(hostile_run, tmp_path, capsys):
    checkpoint = str(hostile_run[0] / "best.pt")
    with pytest.raises(UserError, match="is a resnet18 checkpoint, not --arch resnet34"):
        build_model("resnet34", 5, weights=checkpoint)
    theirs = torch.load(checkpoint, weights_only=True)["model"]
    same = build_model("resnet18", 5, weights=checkpoint, classes=["0", "1", "2", "3", "4"])
    assert torch.equal(same.fc[-1].weight, theirs["fc.12.weight"])
    other = build_model("resnet18", 5, weights=checkpoint, classes=["a", "b", "c", "d", "e"])
    assert torch.equal(other.conv1.weight, theirs["conv1.weight"])
    assert not torch.equal(other.fc[-1].weight, theirs["fc.12.weight"])
    out = capsys.readouterr().out
    assert "head was trained on other classes (5 classes: 0, 1, 2, 3, 4 vs 5 classes: a, b, c, d, e)" in out


def test_inference_predicts_every_extension_pil_reads_and_names_other_files(hostile_run, tmp_path, capsys):
    folder = tmp_path / "test"
    os.makedirs(folder)
    files = {"a.jfif": "JPEG", "b.JPG": "JPEG", "c.webp": "WEBP", "d.tif": "TIFF"}
    if ".avif" in Image.registered_extensions():  # test_dataset checks that a .avif is named where it is not
        files["e.avif"] = "AVIF"
    for name, fmt in files.items():
        pattern().save(folder / name, format=fmt)
    Image.fromarray(np.linspace(0, 1, 1200, dtype=np.float32).reshape(30, 40)).save(folder / "float.tiff")
    args = ["--checkpoint", hostile_run[0] / "best.pt", "--test-dir", folder, "--workers", 0]
    code, out, err = run_main(inference.main, [*args, "--output", tmp_path / "p.csv"], capsys)
    assert code == 0, err
    names = sorted(os.path.splitext(n)[0] for n in [*files, "float.tiff"])
    assert sorted(pd.read_csv(tmp_path / "p.csv", dtype=str)["image_name"]) == names
    (folder / "notes.txt").write_text("not an image")
    (folder / "Thumbs.db").write_bytes(b"\x00")  # Windows' thumbnail cache: ignored
    code, _, err = run_main(inference.main, [*args, "--output", tmp_path / "q.csv"], capsys)
    assert error_line(code, err) == (f"error: {folder} holds 1 file(s) that are not images by their extension: "
                                     "notes.txt; move them out")
    assert not (tmp_path / "q.csv").exists()


def test_check_data_names_non_images_in_every_folder(tmp_path, capsys):
    for folder in ("train/0", "train/1", "val/0", "val/1", "test"):
        os.makedirs(tmp_path / folder)
        pattern().save(tmp_path / folder / "a.png")
    (tmp_path / "train" / "1" / "labels.csv").write_text("x")
    (tmp_path / "test" / "notes.txt").write_text("x")
    (tmp_path / "test" / "desktop.ini").write_text("x")  # Windows' folder settings: ignored
    code, out, err = run_main(train.main, ["--data-dir", tmp_path, "--check-data", "--workers", 0], capsys)
    assert code == 0, err
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {tmp_path / 'train'} holds 1 file(s) that are not images by their extension: 1/labels.csv; skipped",
        f"warning: {tmp_path / 'test'} holds 1 file(s) that are not images by their extension: notes.txt; "
        "inference.py stops on them: move them out"]
    assert "2 classes, 2 train / 2 val readable images" in out and "1 test images readable" in out
