import os

import numpy as np
import pytest
from PIL import Image

from config import Config
from dataset import FlatImages, build_train_val, find_classes
from errors import UserError
from images import IMAGE_EXTENSIONS, BadImage, load_rgb, to_rgb
from model import resolve_data


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


def test_plain_jpegs_decode_to_the_pixels_of_pil_and_every_other_file_is_left_to_pil(tmp_path):
    import torch

    from augment import train_transform
    from conftest import SAMPLE
    from dataset import LabelledImages
    from images import plain_jpeg_rgb
    photo = Image.open(os.path.join(SAMPLE, "train", "3", sorted(os.listdir(os.path.join(SAMPLE, "train", "3")))[0]))
    photo = photo.convert("RGB").resize((96, 80))
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {"baseline": dict(quality=90), "progressive": dict(progressive=True), "grey": dict(mode="L"),
             "rotated": dict(exif=exif), "cmyk": dict(mode="CMYK"), "png inside": dict(format="PNG")}
    for name, options in files.items():
        mode = options.pop("mode", "RGB")
        photo.convert(mode).save(tmp_path / f"{name}.jpg", **({"format": "JPEG"} | options))
    data = (tmp_path / "baseline.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[:len(data) // 2])
    for name in ["baseline", "progressive", "grey"]:  # OpenCV's decode: the same libjpeg, the same pixels
        path = str(tmp_path / f"{name}.jpg")
        assert np.array_equal(plain_jpeg_rgb(path), np.asarray(load_rgb(path)))
    for name in ["rotated", "cmyk", "png inside", "truncated"]:
        assert plain_jpeg_rgb(str(tmp_path / f"{name}.jpg")) is None
    # the training set hands the OpenCV transform the array, with the same augmented result as from PIL's image
    os.makedirs(tmp_path / "train" / "a")
    os.replace(tmp_path / "baseline.jpg", tmp_path / "train" / "a" / "x.jpg")
    transform = train_transform(Config(img_size=32))
    data = LabelledImages(str(tmp_path / "train"), ["a"], transform)
    torch.manual_seed(0)
    expected = transform(load_rgb(data.samples[0][0]))
    torch.manual_seed(0)
    assert torch.equal(data[0][0], expected)


def test_unreadable_file_is_a_bad_image(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not an image at all")
    with pytest.raises(BadImage, match="broken.jpg"):
        load_rgb(str(path))


def test_train_val_layout_checks(tmp_path):
    cfg = resolve_data(Config(data_dir=str(tmp_path / "nowhere")))
    with pytest.raises(UserError, match="no such data folder"):
        build_train_val(cfg)
    for split, classes in [("train", ["0", "1", "10"]), ("val", ["0", "5"])]:
        for c in classes:
            save(str(tmp_path / split / c / "a.png"), Image.new("RGB", (8, 8)))
    with pytest.raises(UserError, match="lacks: 5"):
        build_train_val(resolve_data(Config(data_dir=str(tmp_path))))
    # the data code is handed the model's input settings as values: it never asks the model for them
    with pytest.raises(ValueError, match="takes resolved input settings"):
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


RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def grey(v):
    return (v, v, v)


def two_colour(mode, left, right, size=(16, 8)):
    """An image of `mode`, its left half `left` and its right half `right` (values in the mode's own terms)."""
    img = Image.new(mode, size, left)
    # an image, not a colour, is pasted: PIL fills I;16 byte by byte with a pasted colour (250 becomes 64250)
    img.paste(Image.new(mode, (size[0] // 2, size[1]), right), (size[0] // 2, 0))
    if mode in ("P", "PA"):
        img.putpalette([*RED, *BLUE])
    return img


def mark_alpha_premultiplied(path):
    """Rewrite the ExtraSamples tag of a TIFF that PIL wrote (2: straight alpha) to 1 (associated, i.e.
    premultiplied alpha), as other software writes it; PIL then opens a grey + alpha file as mode La."""
    entry = (338).to_bytes(2, "little") + (3).to_bytes(2, "little") + (1).to_bytes(4, "little")  # SHORT, count 1
    data = path.read_bytes()
    assert data.count(entry + b"\x02\x00") == 1
    path.write_bytes(data.replace(entry + b"\x02\x00", entry + b"\x01\x00"))


def write(img, path, kind):
    if kind == "pgm":  # a 16-bit PGM by hand: Pillow 10 cannot write one
        path.write_bytes(b"P5\n%d %d\n65535\n" % img.size + np.asarray(img).astype(">u2").tobytes())
    elif kind == "transparent.png":
        img.save(path, transparency=1)  # palette entry 1 is see-through
    else:
        img.save(path)
    if kind == "premultiplied.tif":
        mark_alpha_premultiplied(path)


# (mode written, file type, left, right, mode PIL opens the file as, expected RGB left, right, tolerance in levels).
# Left out, as no file format opens as them: La written as such (La comes from a premultiplied TIFF, below), RGBa
# (PIL opens premultiplied RGB TIFFs as RGBA), RGBX, HSV, I;16N, and I;16L, which only PIL's own IM format keeps
# (deprecated, gone in Pillow 15); test_modes_no_file_opens_as converts them in memory.
FILE_MODES = [
    pytest.param("1", "png", 0, 1, "1", grey(0), WHITE, 0, id="1"),
    pytest.param("L", "tif", 30, 200, "L", grey(30), grey(200), 0, id="L"),
    pytest.param("LA", "tif", (0, 128), (200, 255), "LA", grey(127), grey(200), 1, id="LA"),
    pytest.param("LA", "premultiplied.tif", (0, 128), (100, 128), "La", grey(127), grey(227), 2, id="La"),
    pytest.param("P", "png", 0, 1, "P", RED, BLUE, 0, id="P"),
    pytest.param("P", "transparent.png", 0, 1, "P", RED, WHITE, 0, id="P-transparency"),
    pytest.param("PA", "tif", (0, 255), (1, 128), "PA", RED, (127, 127, 255), 1, id="PA"),
    pytest.param("RGB", "tif", (200, 30, 40), (10, 200, 30), "RGB", (200, 30, 40), (10, 200, 30), 0, id="RGB"),
    pytest.param("RGBA", "png", (200, 30, 40, 255), (0, 0, 255, 128), "RGBA", (200, 30, 40), (127, 127, 255), 1,
                 id="RGBA"),
    pytest.param("CMYK", "tif", (0, 255, 255, 0), (255, 255, 0, 0), "CMYK", RED, BLUE, 0, id="CMYK"),
    pytest.param("CMYK", "jpg", (0, 255, 255, 0), (255, 255, 0, 0), "CMYK", RED, BLUE, 8, id="CMYK-jpeg"),
    pytest.param("YCbCr", "tif", (81, 104, 212), (123, 75, 46), "YCbCr", (200, 30, 40), (10, 200, 30), 4,
                 id="YCbCr"),
    # CIELAB 8-bit (L*255/100, a+128, b+128) of sRGB red and of L* 50, which is sRGB grey 119
    pytest.param("LAB", "tif", (138, 209, 198), (128, 128, 128), "LAB", RED, grey(119), 6, id="LAB"),
    # a 16-bit PGM opens as mode I: its values count out of 65535 even when all are small
    pytest.param("I;16", "pgm", 100, 250, "I", grey(0), grey(1), 0, id="I-16bit-pgm"),
    pytest.param("I", "tif", 51, 204, "I", grey(51), grey(204), 0, id="I-32bit-8bit-values"),
    pytest.param("I", "tif", 13107, 52428, "I", grey(51), grey(204), 0, id="I-32bit-16bit-values"),
    pytest.param("I", "tif", 500_000, 1_000_000, "I", grey(128), WHITE, 1, id="I-32bit-wider"),
    pytest.param("F", "tif", 0.2, 0.8, "F", grey(51), grey(204), 0, id="F-0-to-1"),
    pytest.param("F", "tif", 51.0, 204.0, "F", grey(51), grey(204), 0, id="F-0-to-255"),
    pytest.param("F", "tif", 13107.0, 52428.0, "F", grey(51), grey(204), 0, id="F-0-to-65535"),
    pytest.param("I;16", "png", 13107, 52428, "I;16", grey(51), grey(204), 0, id="I;16-png"),
    pytest.param("I;16", "png", 100, 250, "I;16", grey(0), grey(1), 0, id="I;16-png-small-values"),
    pytest.param("I;16", "tif", 13107, 52428, "I;16", grey(51), grey(204), 0, id="I;16-tif"),
    pytest.param("I;16B", "tif", 13107, 52428, "I;16B", grey(51), grey(204), 0, id="I;16B"),
]


@pytest.mark.parametrize("mode,kind,left,right,opens_as,want_left,want_right,tolerance", FILE_MODES)
def test_every_pixel_mode_a_file_holds_loads_as_its_colours(tmp_path, mode, kind, left, right, opens_as, want_left,
                                                            want_right, tolerance):
    path = tmp_path / f"img.{kind}"
    write(two_colour(mode, left, right), path, kind)
    with Image.open(path) as opened:
        assert opened.mode == opens_as  # the file really holds the mode under test
    rgb = load_rgb(str(path))
    assert rgb.mode == "RGB" and rgb.size == (16, 8)
    pixels = np.asarray(rgb, dtype=int)
    assert np.abs(pixels[:, :8] - want_left).max() <= tolerance, pixels[0, 0]
    assert np.abs(pixels[:, 8:] - want_right).max() <= tolerance, pixels[0, -1]


@pytest.mark.parametrize("img,want_left,want_right,tolerance", [
    pytest.param(two_colour("La", (0, 128), (100, 128)), grey(127), grey(227), 2, id="La"),
    pytest.param(two_colour("RGBa", (100, 15, 20, 128), (0, 0, 0, 0)), (227, 142, 147), WHITE, 2, id="RGBa"),
    pytest.param(two_colour("RGBX", (200, 30, 40, 0), (10, 200, 30, 255)), (200, 30, 40), (10, 200, 30), 0,
                 id="RGBX"),
    pytest.param(two_colour("RGB", (200, 30, 40), (10, 200, 30)).convert("HSV"), (200, 30, 40), (10, 200, 30), 4,
                 id="HSV"),
    pytest.param(two_colour("I;16N", 13107, 52428), grey(51), grey(204), 0, id="I;16N"),
    pytest.param(two_colour("I;16L", 13107, 52428), grey(51), grey(204), 0, id="I;16L"),
])
def test_modes_no_file_opens_as(img, want_left, want_right, tolerance):
    pixels = np.asarray(to_rgb(img), dtype=int)
    assert np.abs(pixels[:, :8] - want_left).max() <= tolerance, pixels[0, 0]
    assert np.abs(pixels[:, 8:] - want_right).max() <= tolerance, pixels[0, -1]


def test_lab_without_littlecms_is_a_bad_image(tmp_path, monkeypatch):
    from PIL import ImageCms

    def no_littlecms(*args, **kwargs):
        raise ImportError("The _imagingcms C module is not installed")  # what a Pillow built without it raises
    monkeypatch.setattr(ImageCms, "createProfile", no_littlecms)
    path = tmp_path / "lab.tif"
    two_colour("LAB", (138, 209, 198), (128, 128, 128)).save(path)
    with pytest.raises(BadImage, match="lab.tif: .*LAB.*littlecms"):
        load_rgb(str(path))


def test_test_folder_lists_every_extension_pil_decodes_in_any_case(tmp_path):
    img = two_colour("RGB", (200, 30, 40), (10, 200, 30))
    for name, fmt in [("a.jfif", "JPEG"), ("b.JPG", "JPEG"), ("c.webp", "WEBP"), ("d.tif", "TIFF"),
                      ("e.Jpeg", "JPEG"), ("f.PNG", "PNG")]:
        img.save(tmp_path / name, format=fmt)
    expected = ["a", "b", "c", "d", "e", "f"]
    if ".avif" in Image.registered_extensions():  # this Pillow writes and reads AVIF
        img.save(tmp_path / "g.avif")
        expected.append("g")
        assert ".avif" in IMAGE_EXTENSIONS
    else:  # without AVIF support a .avif file is named, not dropped
        (tmp_path / "g.avif").write_bytes(b"\x00\x00\x00\x1cftypavif")
        with pytest.raises(UserError, match="not images by their extension: g.avif"):
            FlatImages(str(tmp_path), transform=None)
        os.remove(tmp_path / "g.avif")
    assert FlatImages(str(tmp_path), transform=None).names == expected
    assert {".jfif", ".jpg", ".webp", ".tif", ".tiff", ".png"} <= set(IMAGE_EXTENSIONS)
    assert ".pdf" not in IMAGE_EXTENSIONS  # PIL writes PDFs but does not read them


def test_a_non_image_in_the_test_folder_is_a_one_line_error(tmp_path):
    save(str(tmp_path / "a.png"), Image.new("RGB", (8, 8)))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "x.heic").write_bytes(b"x")
    for dropping in ["Thumbs.db", "desktop.ini", ".DS_Store"]:  # OS files, ignored like dotfiles
        (tmp_path / dropping).write_bytes(b"x")
    with pytest.raises(UserError) as error:
        FlatImages(str(tmp_path), transform=None)
    assert str(error.value) == (f"{tmp_path} holds 2 file(s) that are not images by their extension: notes.txt, "
                                "x.heic; move them out")
    os.remove(tmp_path / "notes.txt")
    os.remove(tmp_path / "x.heic")
    assert FlatImages(str(tmp_path), transform=None).names == ["a"]


def test_non_images_in_class_folders_are_one_warning_per_folder_set(tmp_path, capsys):
    for split in ("train", "val"):
        for c in ("0", "1"):
            save(str(tmp_path / split / c / "a.png"), Image.new("RGB", (8, 8)))
    (tmp_path / "train" / "0" / "notes.txt").write_text("x")
    (tmp_path / "train" / "1" / "b.heic").write_bytes(b"x")
    (tmp_path / "train" / "1" / "Thumbs.db").write_bytes(b"x")
    os.makedirs(tmp_path / "val" / "1" / "more")
    train, val, _ = build_train_val(resolve_data(Config(data_dir=str(tmp_path))))
    assert len(train) == 2 and len(val) == 2
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {tmp_path / 'train'} holds 2 file(s) that are not images by their extension: 0/notes.txt, "
        "1/b.heic; skipped",
        f"warning: {tmp_path / 'val'} holds 1 file(s) that are not images by their extension: 1/more/; skipped"]
