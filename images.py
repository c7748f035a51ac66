"""Reading an image file into RGB pixels: which files are images, decoding with colour management (ICC profiles,
16-bit and Lab images, alpha), a fast path for plain JPEGs, and the image cache of --cache (a pre-resized copy)."""
from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
import warnings

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps
from torchvision.transforms import v2


def decodable_extensions():
    """Every file extension this Pillow reads, lower case with the dot ('.jpg', '.jfif', '.webp', '.tif', '.avif'
    where it has libavif, ...): those its plugins register, less the formats it can only write (PDF, Palm), the
    stubs that decode only through a handler the application registers (BUFR, GRIB, HDF5, WMF) and MPEG, of
    which it reads the header only."""
    def decodes(fmt):
        if fmt == "MPO":
            return True  # registered for writing; MPO files open through the JPEG plugin
        if fmt not in Image.OPEN or fmt == "MPEG":
            return False
        factory = Image.OPEN[fmt][0]
        return not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))
    Image.init()
    return tuple(sorted({ext.lower() for ext, fmt in Image.registered_extensions().items() if decodes(fmt)}))


IMAGE_EXTENSIONS = decodable_extensions()


class BadImage(Exception):
    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path = path


def declared_peak(img):
    """The largest value an integer grey image's samples can hold by what its file says, None when it says nothing
    narrower than 32 bits. Read it from a file before the pixels are decoded: decoding empties img.tile."""
    if img.mode.startswith("I;16"):
        return 65535
    if img.mode != "I":
        return None
    if img.format == "PPM":
        return 65535  # PIL reads a PGM of any maxval above 255 as 0..65535
    for tile in getattr(img, "tile", ()):  # the decoder's raw mode names the stored layout: 'I;16B', 'I;16S' ...
        args = tile[3]
        rawmode = args[0] if isinstance(args, tuple) and args else args
        match = re.fullmatch(r"I;(8|16)[BLN]?(S?)", rawmode) if isinstance(rawmode, str) else None
        if match:  # a signed TIFF ('I;16S') holds 0..32767 above zero
            return 2 ** (int(match[1]) - bool(match[2])) - 1
    return None


def grey_to_l(img, peak=None):
    """8-bit grey from an integer (I, I;16*) or float (F) image: 0..peak maps to 0..255, negatives and NaN are
    black. The peak is what the file says (`peak`: 65535 for I;16* modes, 16-bit PNG and PGM, 32767 for a signed
    16-bit TIFF) whatever the values; where it says nothing (32-bit integers, floats) it is the largest value rounded
    up to 1 (floats only), 255 or 65535, or the largest value itself beyond 65535."""
    arr = np.asarray(img).astype(np.float32)
    if peak is None:
        finite = arr[np.isfinite(arr)]
        top = float(finite.max()) if finite.size else 0.0
        steps = (1.0, 255.0, 65535.0) if img.mode == "F" else (255.0, 65535.0)
        peak = next((step for step in steps if top <= step), top)
    arr = np.nan_to_num(arr, nan=0.0, posinf=peak, neginf=0.0)
    return Image.fromarray((arr * (255.0 / peak)).round().clip(0, 255).astype(np.uint8))


def lab_to_srgb(img):
    """CIELAB (D50, as ICC profiles take it) to sRGB through littlecms. PIL's own LAB-to-RGB conversion takes the
    same route since Pillow 9.4, but a Pillow built without littlecms raises ImportError there: here that is an
    OSError, which load_rgb names as an unreadable image."""
    from PIL import ImageCms
    try:
        transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                            "LAB", "RGB")
    except ImportError as e:
        raise OSError(f"LAB colour needs PIL's littlecms support (PIL.ImageCms), which this Pillow lacks: {e}") \
            from None
    return ImageCms.applyTransform(img, transform)


def has_alpha(img):
    """Whether some pixels may be see-through: an alpha band (straight or premultiplied), a transparent colour or
    palette entry, or a palette with alpha."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return True
    return img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"


def to_rgb(img, peak=None):
    """Any PIL image as RGB: integer and float grey scaled by their range (grey_to_l, `peak` as the file declares
    it), LAB through littlecms, see-through pixels composited on white; other modes (1, L, P, CMYK, YCbCr, HSV,
    RGBX) by PIL's conversion."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        # PIL's convert('RGB') clips every value above 255 to white; an I;16 image says its range in its mode
        img = grey_to_l(img, peak or declared_peak(img))
    elif img.mode == "LAB":
        img = lab_to_srgb(img)
    if has_alpha(img):
        # composite on white rather than letting transparent pixels keep whatever colour they had
        if img.mode == "La":
            img = img.convert("LA")  # PIL converts premultiplied grey to straight alpha only
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return img.convert("RGB")


def load_rgb(path: str, draft_size: int | None = None) -> Image.Image:
    """Decode any image file this Pillow reads into an RGB PIL image, upright as its EXIF says (to_rgb says how
    each pixel mode is converted); BadImage if unreadable."""
    try:
        with warnings.catch_warnings(), Image.open(path) as img:
            # a large image under the hard limit decodes fine: no DecompressionBombWarning per epoch
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))  # JPEG DCT scaling: decode at >= draft_size, faster
            peak = declared_peak(img)
            img = ImageOps.exif_transpose(img)
            return to_rgb(img, peak)
    except Image.DecompressionBombError:
        raise BadImage(path, f"image too large: over PIL's decompression-bomb limit of {2 * Image.MAX_IMAGE_PIXELS} "
                             "pixels (shrink the file, or remove it)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImage(path, f"cannot decode image ({e})") from None


# Start-of-frame markers of the JPEG processes other than baseline, extended and progressive Huffman (lossless,
# hierarchical, arithmetic-coded): left to PIL
OTHER_FRAMES = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def plain_jpeg_rgb(path: str) -> np.ndarray | None:
    """A plain JPEG (8-bit grey or 3-channel colour, complete up to its end marker, no EXIF, under PIL's pixel limit)
    decoded by OpenCV straight to an RGB array: load_rgb's pixels (the same libjpeg) for about two thirds of the
    cost of PIL's decode and copy to an array. None for any other file, which load_rgb then decodes."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if not (data.startswith(b"\xff\xd8") and data.endswith(b"\xff\xd9")):
        return None
    pos = 2
    while pos + 10 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xE1 or marker in OTHER_FRAMES:  # EXIF (its orientation) or an unusual process: PIL's
            return None
        if marker in (0xC0, 0xC1, 0xC2):
            precision, channels = data[pos + 4], data[pos + 9]
            pixels = int.from_bytes(data[pos + 5:pos + 7], "big") * int.from_bytes(data[pos + 7:pos + 9], "big")
            if precision != 8 or channels not in (1, 3) or pixels > (Image.MAX_IMAGE_PIXELS or pixels):
                return None
            return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def cache_file(cache_dir, path, short_side):
    """Where the resized copy of `path` lives; the name changes with the file's size and mtime, so an edited or
    replaced image is decoded again instead of served stale."""
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{short_side}"
    return os.path.join(cache_dir, hashlib.sha1(key.encode()).hexdigest()[:20] + ".jpg")


def load_cached(path, cache_dir, short_side):
    """The image with its short side resized to `short_side` (never enlarged), written to cache_dir as JPEG q95
    on first use (atomically: loader workers may race) and read from there afterwards."""
    try:
        target = cache_file(cache_dir, path, short_side)
    except OSError as e:
        raise BadImage(path, f"cannot read file ({e})") from None
    if os.path.exists(target):
        try:
            return load_rgb(target)
        except BadImage:
            pass  # a damaged cache entry: rebuild it from the source
    img = load_rgb(path, draft_size=short_side)
    if min(img.size) > short_side:
        img = v2.functional.resize(img, short_side, antialias=True)
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-", suffix=".jpg")
    with os.fdopen(fd, "wb") as f:
        img.save(f, "JPEG", quality=95, subsampling=0)  # 4:4:4: colour edges kept
    os.replace(tmp, target)
    return img


def cache_side(img_size: int, eval_resize: int) -> int:
    """Short side of cached images: 9/7 of the crop (288 for 224), and never below the evaluation resize."""
    return max(math.ceil(img_size * 9 / 7), eval_resize)


def open_image(path: str, draft_size: int | None = None, cache: tuple[str, int] | None = None) -> Image.Image:
    """load_rgb, or the cached copy when cache = (folder, short side) is given."""
    return load_cached(path, *cache) if cache else load_rgb(path, draft_size)
