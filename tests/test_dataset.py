import os

import numpy as np
import pytest
import torch
from PIL import Image

from config import Config
from dataset import (IMAGENET_MEAN, IMAGENET_STD, BadImage, FlatImages, build_train_val, find_classes, load_rgb,
                     to_float_batch, train_transform)
from model import UserError


def save(path, img):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)


def test_numeric_class_folders_sort_as_numbers(tmp_path):
    for name in ["0", "1", "2", "10", "11", "9"]:
        os.makedirs(tmp_path / name)
    os.makedirs(tmp_path / ".hidden")
    assert find_classes(str(tmp_path)) == ["0", "1", "2", "9", "10", "11"]


def test_named_class_folders_sort_as_strings(tmp_path):
    for name in ["cat", "Dog", "10", "ant"]:
        os.makedirs(tmp_path / name)
    assert find_classes(str(tmp_path)) == ["10", "Dog", "ant", "cat"]


@pytest.mark.parametrize("mode,color", [("L", 128), ("CMYK", (0, 255, 255, 0)), ("RGBA", (255, 0, 0, 0)),
                                        ("P", 3), ("I;16", 65535)])
def test_any_pixel_mode_becomes_rgb(tmp_path, mode, color):
    ext = "jpg" if mode == "CMYK" else "png"
    path = str(tmp_path / f"img.{ext}")
    Image.new(mode, (20, 10), color).save(path)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (20, 10)
    if mode == "I;16":
        assert img.getpixel((0, 0)) == (255, 255, 255)  # full-scale 16-bit is white, not clipped garbage
    if mode == "RGBA":
        assert img.getpixel((0, 0)) == (255, 255, 255)  # fully transparent pixels over white


def test_exif_rotation_is_applied(tmp_path):
    path = str(tmp_path / "rotated.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (40, 20), (10, 20, 30)).save(path, exif=exif)
    assert load_rgb(path).size == (20, 40)


def test_unreadable_file_is_a_bad_image(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not an image at all")
    with pytest.raises(BadImage, match="broken.jpg"):
        load_rgb(str(path))


def test_train_val_layout_checks(tmp_path):
    cfg = Config(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="no such data folder"):
        build_train_val(cfg)
    for split, classes in [("train", ["0", "1", "10"]), ("val", ["0", "5"])]:
        for c in classes:
            save(str(tmp_path / split / c / "a.png"), Image.new("RGB", (8, 8)))
    with pytest.raises(UserError, match="lacks: 5"):
        build_train_val(Config(data_dir=str(tmp_path)))


def test_flat_test_folder_ignores_hidden_files_and_refuses_clashing_names(tmp_path):
    save(str(tmp_path / "b.jpg"), Image.new("RGB", (8, 8)))
    save(str(tmp_path / "a b é.png"), Image.new("RGB", (8, 8)))
    (tmp_path / ".DS_Store").write_bytes(b"x")
    (tmp_path / "._b.jpg").write_bytes(b"x")
    ds = FlatImages(str(tmp_path), transform=lambda img: img)
    assert ds.names == ["a b é", "b"]
    save(str(tmp_path / "b.png"), Image.new("RGB", (8, 8)))
    with pytest.raises(UserError, match="share the name b"):
        FlatImages(str(tmp_path), transform=lambda img: img)


def test_train_transform_gives_uint8_crops_and_batches_normalise():
    cfg = Config(img_size=48)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8))
    out = train_transform(cfg)(img)
    assert out.dtype == torch.uint8 and out.shape == (3, 48, 48)
    batch = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    x = to_float_batch(batch, torch.device("cpu"))
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    assert x[0, :, 0, 0].tolist() == pytest.approx(expected, rel=1e-5)


def test_random_erasing_draws_per_image():
    torch.manual_seed(0)
    batch = torch.full((16, 3, 32, 32), 128, dtype=torch.uint8)
    x = to_float_batch(batch, torch.device("cpu"), erasing=0.5)
    reference = to_float_batch(batch[:1], torch.device("cpu"))[0]
    erased = [not torch.equal(img, reference) for img in x]
    assert 0 < sum(erased) < 16  # some images erased, others not: one draw each
