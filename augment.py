"""Training augmentation: the --aug lists, in their two forms.

Loader side (per image, in the loader workers): train_transform builds the list of --aug. The seed and light lists
run on the uint8 pixels with OpenCV (OpenCVAugment: crop, affine, flip, colour jitter, grayscale, blur), --aug policy
runs torchvision's transforms on the PIL image.
Device side (per batch, on the training device, with per-image draws): BatchAugment runs the seed list's colour
jitter, grayscale and blur when training on CUDA (--augment-on), and random_erasing runs after normalisation in
every case (batches.to_float_batch calls both).

Ops in two forms: ColorJitter (brightness, contrast, saturation, hue, in a random order), RandomGrayscale and
GaussianBlur exist as OpenCVAugment's colour steps (loader) and BatchAugment (device). Both draw their parameters
with torchvision's own samplers (or the way torchvision does, per image) and tests/test_augment.py keeps each equal
to torchvision's own transform on the same draws (and so to each other): the loader form against torchvision's PIL
kernels within a level or two of 255, the device form against its tensor kernels; it also checks the erasing boxes.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.functional import _get_inverse_affine_matrix
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import make_grid

from errors import UserError
from images import load_rgb
from utils import seeded

# One image is too small a job to split across threads: the loader's workers are the parallelism, and OpenCV's own
# threads in each of them would only compete for the same cores.
cv2.setNumThreads(1)

if TYPE_CHECKING:
    from PIL import Image

    from config import Config


# ---------------------------------------------------------------- per image, in the loader

def auto_augment_policy(name):
    """torchvision's learned or random augmentation policies, as named by --auto-augment."""
    if name == "ta_wide":
        return v2.TrivialAugmentWide()
    if name == "rand-m9":
        return v2.RandAugment(num_ops=2, magnitude=9)
    if name == "augmix":
        return v2.AugMix()
    if name == "imagenet":
        return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)
    raise ValueError(f"unknown augmentation policy {name}")


def batch_augment_on(cfg):
    """Whether the seed list's colour steps run per batch on the device (BatchAugment) rather than per image."""
    if cfg.aug != "seed":
        return False
    if cfg.augment_on == "auto":
        return cfg.device != "cpu" and torch.cuda.is_available()
    return cfg.augment_on == "batch"


def interpolation_mode(name: str) -> v2.InterpolationMode:
    """torchvision's mode for a config's interpolation; '' (a config not resolved against its model yet, as in a
    bare Config()) is torchvision's default, bilinear."""
    return v2.InterpolationMode(name or "bilinear")


def torchvision_geometry(cfg: Config) -> list:
    """torchvision's geometric steps of --aug: crop, affine and flip for the seed list, crop and flip otherwise.
    --aug policy runs them; OpenCVAugment draws its parameters with them (and tests compare it with them)."""
    crop = v2.RandomResizedCrop(cfg.img_size, scale=tuple(cfg.rrc_scale),
                                interpolation=interpolation_mode(cfg.interpolation), antialias=True)
    flip = v2.RandomHorizontalFlip(cfg.hflip)
    if cfg.aug != "seed":
        return [crop, flip]
    affine = v2.RandomAffine(degrees=cfg.affine_degrees, translate=(cfg.affine_translate, cfg.affine_translate),
                             scale=tuple(cfg.affine_scale))
    return [crop, affine, flip]


def train_transform(cfg: Config) -> OpenCVAugment | v2.Compose:
    """The train augmentation of --aug, every number from the config; output is a uint8 CHW tensor.

    seed: the hand-tuned list; policy: crop, flip and an --auto-augment policy in place of the hand-tuned colour and
    geometry steps (as torchvision's reference recipes do); light: crop and flip only.

    seed and light run on the uint8 pixels with OpenCV (OpenCVAugment), a few times faster than torchvision's
    transforms of a PIL image; policy runs torchvision's transforms. With the seed list, when the batch augmentation
    is on (training on CUDA, or --augment-on batch) only the geometric steps run here; colour jitter, grayscale and
    blur follow per batch on the device (BatchAugment), where they cost next to nothing.
    """
    if cfg.aug == "policy" and cfg.auto_augment == "none":
        raise UserError("--aug policy needs a policy: add --auto-augment ta_wide, rand-m9, augmix or imagenet")
    if cfg.aug != "policy" and cfg.auto_augment != "none":
        raise UserError(f"--auto-augment {cfg.auto_augment} is a policy of --aug policy, not of --aug {cfg.aug}: "
                        f"drop --aug {cfg.aug} (a policy alone implies --aug policy)")
    if cfg.aug == "policy":
        return v2.Compose(torchvision_geometry(cfg) + [auto_augment_policy(cfg.auto_augment), v2.PILToTensor()])
    return OpenCVAugment(cfg, colour=cfg.aug == "seed" and not batch_augment_on(cfg))


def draw_params(transform, img):
    """The random parameters of a torchvision v2 transform, drawn by its own code (make_params; _get_params
    before torchvision 0.21)."""
    draw = getattr(transform, "make_params", None) or transform._get_params
    return draw([img])


class OpenCVAugment:
    """The seed list of --aug (crop, affine, flip, colour jitter, grayscale, blur), its geometry alone or --aug
    light's crop and flip, on the image's uint8 RGB pixels with OpenCV; returns a uint8 CHW tensor.

    Every random number is drawn by torchvision's own transforms (draw_params) in the order of the torchvision list
    (torchvision_geometry, then ColorJitter, RandomGrayscale and RandomApply([GaussianBlur])), so the distribution
    is the seed's and one seed gives the same draws. The pixels follow torchvision's PIL kernels within a level or
    two of 255 (tests/test_augment.py measures each op): the crop is resized antialiased as PIL does, the affine and
    the flip are one nearest-neighbour warp, the colour steps are blends and an 8-bit HSV hue shift as
    PIL's, the blur is OpenCV's Gaussian with torchvision's kernel, sigma and reflect padding.
    """

    takes_arrays = True  # LabelledImages may hand it OpenCV's decode of a plain JPEG instead of a PIL image

    def __init__(self, cfg: Config, colour: bool) -> None:
        geometry = torchvision_geometry(cfg)
        self.crop, self.flip = geometry[0], geometry[-1]
        self.affine = geometry[1] if len(geometry) == 3 else None
        self.jitter = self.blur = None
        if colour:
            b, c, s, h = cfg.jitter
            self.jitter = v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)
            self.grayscale, self.blur_p = cfg.grayscale, cfg.blur
            self.blur = v2.GaussianBlur(cfg.blur_kernel, sigma=tuple(cfg.blur_sigma))

    def __call__(self, img: Image.Image | np.ndarray) -> torch.Tensor:
        x = self.geometry(np.asarray(img))
        if self.jitter is not None:
            x = self.random_blur(self.colour(x))
        # a CHW view of the HWC pixels, not a transposed copy: the batch stays channels_last (batches.stack_images)
        return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)

    def geometry(self, x):
        box = draw_params(self.crop, size_of(x))
        x = resize(x[box["top"]:box["top"] + box["height"], box["left"]:box["left"] + box["width"]],
                   self.crop.size, self.crop.interpolation)
        matrix = None
        if self.affine is not None:
            p = draw_params(self.affine, size_of(x))
            height, width = x.shape[:2]
            matrix = _get_inverse_affine_matrix([width * 0.5, height * 0.5], p["angle"], p["translate"],
                                                p["scale"], p["shear"])
        flip = torch.rand(1).item() < self.flip.p  # v2.RandomHorizontalFlip's coin
        if matrix is None:
            return cv2.flip(x, 1) if flip else x
        return warp(x, matrix, flip)

    def colour(self, x):
        params = draw_params(self.jitter, size_of(x))
        for i in params["fn_idx"].tolist():
            name = ["brightness", "contrast", "saturation", "hue"][i]
            factor = params[f"{name}_factor"]
            if factor is not None:
                x = COLOUR_OPS[name](x, factor)
        if torch.rand(1).item() < self.grayscale:  # v2.RandomGrayscale's coin
            x = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        return x

    def random_blur(self, x):
        if torch.rand(1).item() >= self.blur_p:  # v2.RandomApply's coin
            return x
        sigma = draw_params(self.blur, size_of(x))["sigma"][0]
        return cv2.GaussianBlur(x, tuple(self.blur.kernel_size), sigmaX=sigma, sigmaY=sigma,
                                borderType=cv2.BORDER_REFLECT_101)  # torch's 'reflect' padding


def size_of(x):
    """An empty tensor with the height and width of an HWC array: all torchvision's samplers read of the image."""
    return torch.empty(0, x.shape[0], x.shape[1])


def resize(x, size, interpolation):
    """Resize an HWC uint8 array to size = (height, width) as torchvision resizes the PIL crop: antialiased (PIL's
    filters, here torch's uint8 kernel written to match them) except where OpenCV's bilinear gives the same pixels,
    an enlargement."""
    height, width = size
    if interpolation == v2.InterpolationMode.BILINEAR and x.shape[0] <= height and x.shape[1] <= width:
        return cv2.resize(x, (width, height), interpolation=cv2.INTER_LINEAR)
    image = torch.from_numpy(np.require(x, requirements=["C", "W"])).permute(2, 0, 1)
    return TF.resize(image, [height, width], interpolation=interpolation, antialias=True).permute(1, 2, 0).numpy()


def warp(x, matrix, flip):
    """PIL's nearest-neighbour affine transform with torchvision's inverse matrix (output -> input coordinates,
    pixel centres at +0.5), then a horizontal flip when asked, as one cv2.warpAffine; outside pixels are 0."""
    a, b, c, d, e, f = matrix
    # to OpenCV's coordinates, pixel centres at whole numbers: its rounding then picks PIL's floor(x + 0.5) pixel
    c, f = c + 0.5 * (a + b) - 0.5, f + 0.5 * (d + e) - 0.5
    if flip:  # output column j is the unflipped column width - 1 - j
        last = x.shape[1] - 1
        a, c, d, f = -a, c + a * last, -d, f + d * last
    return cv2.warpAffine(x, np.array([[a, b, c], [d, e, f]]), (x.shape[1], x.shape[0]), flags=cv2.INTER_NEAREST
                          | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def blend_uint8(x, factor, degenerate):
    """PIL's Image.blend(degenerate, img, factor) against a constant grey level: degenerate + factor * (x - degenerate),
    truncated and clipped. OpenCV rounds (ties to even), so just under 0.5 comes off first: a whole result stays
    whole, and only results within 2**-12 below a whole level come out a level high. One addWeighted pass is twice as
    fast as OpenCV's lookup table."""
    return cv2.addWeighted(x, factor, x, 0.0, (1 - factor) * degenerate - 0.5 + 2 ** -12)


def brightness_uint8(x, factor):
    return blend_uint8(x, factor, 0)


def contrast_uint8(x, factor):
    r, g, b = cv2.mean(x)[:3]
    mean = int(0.299 * r + 0.587 * g + 0.114 * b + 0.5)  # PIL's rounded mean of the grey image
    return blend_uint8(x, factor, mean)


def saturation_uint8(x, factor):
    grey = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(x, factor, grey, 1 - factor, -0.5)  # - 0.5: PIL's blend truncates, OpenCV rounds


def hue_uint8(x, factor):
    """PIL's hue shift: the hue of the 8-bit HSV image moves by int(factor * 255) steps, wrapping at 256 (OpenCV's
    full-range HSV has PIL's 8-bit hue scale to within a step)."""
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.uint8(int(factor * 255) % 256)  # uint8 arithmetic wraps at 256
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


COLOUR_OPS = {"brightness": brightness_uint8, "contrast": contrast_uint8, "saturation": saturation_uint8,
              "hue": hue_uint8}


# ---------------------------------------------------------------- augmentation of whole batches
# Each function draws its random numbers per image on the CPU generator (so a seed fixes them on any device) and
# applies them to the batch in a few vectorised operations. The image operations are those of torchvision's
# tensor kernels (tests/test_fast_paths.py compares them image by image), so the distribution is the seed's.

def uniform(n, low, high):
    return torch.empty(n).uniform_(low, high)


def coin(n, p):
    return (torch.rand(n) < p).nonzero().flatten()


def luma(x):
    """ITU-R 601-2 grey level, (N,3,H,W) -> (N,1,H,W), the weights of torchvision's rgb_to_grayscale."""
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def blend(x, other, factor):
    return (factor * x + (1 - factor) * other).clamp_(0, 1)


def adjust_brightness(x, factor):
    return (x * factor).clamp_(0, 1)


def adjust_contrast(x, factor):
    return blend(x, luma(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x, factor):
    return blend(x, luma(x), factor)


def adjust_hue(x, factor):
    """Rotate the HSV hue of each image by its own factor (a fraction of the colour wheel).

    Value (max) and chroma (max - min) stay, so the new pixel is v - c * clamp(min(k, 4 - k), 0, 1) with
    k = (n + h) mod 6, n = 5, 3, 1 for R, G, B and h the hue in sixths of the wheel.
    """
    r, g, b = x.unbind(1)
    v, low = x.amax(1), x.amin(1)
    c = v - low
    safe = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(v == r, (g - b) / safe, torch.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.remainder(h + 6 * factor.view(-1, 1, 1), 6).unsqueeze(1)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + h, 6)
    return v.unsqueeze(1) - c.unsqueeze(1) * torch.minimum(k, 4 - k).clamp_(0, 1)


def gaussian_blur(x, sigma, kernel_size):
    """Separable Gaussian blur with one sigma per image and reflect padding, as torchvision's gaussian_blur."""
    n, channels, height, width = x.shape
    half = (kernel_size - 1) / 2
    offsets = torch.linspace(-half, half, kernel_size, device=x.device)
    kernel = torch.softmax(-0.5 * (offsets / sigma.to(x.device).view(-1, 1)) ** 2, dim=1)  # (N, k), rows sum to 1
    kernel = kernel.repeat_interleave(channels, dim=0)  # one row per image channel
    pad = kernel_size // 2
    flat = F.pad(x.reshape(1, n * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, kernel.view(-1, 1, 1, kernel_size), groups=n * channels)
    flat = F.conv2d(flat, kernel.view(-1, 1, kernel_size, 1), groups=n * channels)
    return flat.view(n, channels, height, width)


class BatchAugment:
    """ColorJitter (its four factors in a random order), RandomGrayscale and GaussianBlur of the seed recipe, on a
    float batch in [0, 1], with every factor, order and coin flip drawn per image."""

    def __init__(self, jitter, grayscale, blur, blur_sigma, blur_kernel):
        self.jitter, self.grayscale = list(jitter), grayscale
        self.blur, self.blur_sigma, self.blur_kernel = blur, tuple(blur_sigma), blur_kernel

    @classmethod
    def from_config(cls, cfg):
        if not batch_augment_on(cfg):
            return None
        return cls(cfg.jitter, cfg.grayscale, cfg.blur, cfg.blur_sigma, cfg.blur_kernel)

    def __call__(self, x):
        return self.random_blur(self.random_grayscale(self.color_jitter(x)))

    def color_jitter(self, x):
        n = len(x)
        b, c, s, h = self.jitter
        ops = [(adjust_brightness, b), (adjust_contrast, c), (adjust_saturation, s), (adjust_hue, h)]
        factors = [uniform(n, -amount, amount) if op is adjust_hue else uniform(n, max(0.0, 1 - amount), 1 + amount)
                   for op, amount in ops]
        order = torch.rand(n, len(ops)).argsort(dim=1)  # a random permutation per image, as v2.ColorJitter's
        for position in range(len(ops)):
            for index, (op, amount) in enumerate(ops):
                chosen = (order[:, position] == index).nonzero().flatten()
                if amount == 0 or len(chosen) == 0:
                    continue
                factor = factors[index][chosen].to(x.device)
                if op is not adjust_hue:
                    factor = factor.view(-1, 1, 1, 1)
                dev = chosen.to(x.device)
                x[dev] = op(x[dev], factor)
        return x

    def random_grayscale(self, x):
        chosen = coin(len(x), self.grayscale).to(x.device)
        if len(chosen):
            x[chosen] = luma(x[chosen]).expand(-1, 3, -1, -1)
        return x

    def random_blur(self, x):
        chosen = coin(len(x), self.blur)
        if len(chosen):
            sigma = uniform(len(chosen), *self.blur_sigma)
            dev = chosen.to(x.device)
            x[dev] = gaussian_blur(x[dev], sigma, self.blur_kernel)
        return x


def erasing_boxes(n, height, width, p, scale=(0.02, 0.33), ratio=(0.3, 3.3)):
    """(top, left, h, w) per image as v2.RandomErasing draws them; an image that is not erased gets h = w = 0."""
    boxes = torch.zeros(n, 4, dtype=torch.long)
    log_ratio = torch.log(torch.tensor(ratio))
    for i in coin(n, p).tolist():
        for _ in range(10):
            area = height * width * uniform(1, *scale).item()
            aspect = torch.exp(uniform(1, log_ratio[0].item(), log_ratio[1].item())).item()
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if h < height and w < width:
                top = torch.randint(0, height - h + 1, (1,)).item()
                left = torch.randint(0, width - w + 1, (1,)).item()
                boxes[i] = torch.tensor([top, left, h, w])
                break
    return boxes


def random_erasing(x: torch.Tensor, p: float) -> torch.Tensor:
    """Zero a random rectangle of each image with probability p (value 0 of the normalised image, as the seed).

    One slice write per erased image: the boxes are drawn on the CPU, so nothing waits for the device, and on the
    CPU this is a small fraction of the cost of a whole-batch mask."""
    n, _, height, width = x.shape
    for i, (top, left, h, w) in enumerate(erasing_boxes(n, height, width, p).tolist()):
        if h:
            x[i, :, top:top + h, left:left + w] = 0.0
    return x


def eval_crop(cfg: Config) -> int:
    """The evaluation centre-crop size: --eval-size, or the train crop size."""
    return cfg.eval_size or cfg.img_size


def eval_sizes(img_size: int, crop_ratio: float) -> tuple[int, int]:
    """(resize, crop): the short side is resized to crop/ratio, then the centre crop is taken (256 -> 224)."""
    return int(round(img_size / crop_ratio)), img_size


def eval_transform(img_size: int, crop_ratio: float, interpolation: str = "bilinear") -> v2.Compose:
    """Resize the short side and centre-crop a square of that side; the model's centre crop is taken per batch.

    Keeping the larger square lets test-time augmentation cut its other views from the same decoded tensor.
    """
    resize, _ = eval_sizes(img_size, crop_ratio)
    return v2.Compose([v2.Resize(resize, interpolation=interpolation_mode(interpolation), antialias=True),
                       v2.CenterCrop(resize), v2.PILToTensor()])


def center_crop(batch: torch.Tensor, size: int) -> torch.Tensor:
    h, w = batch.shape[-2:]
    if size > min(h, w):  # negative offsets would slice a sliver, which a network classifies all the same
        raise ValueError(f"centre crop of {size} px from {h}x{w} images: the crop must fit inside")
    top, left = (h - size) // 2, (w - size) // 2
    return batch[..., top:top + size, left:left + size]


def preview_picks(targets, count):
    """Indices of `count` samples spread over the classes: the first image of each class, then the second, ..."""
    by_class = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    picks, rank = [], 0
    while len(picks) < count and any(rank < len(v) for v in by_class.values()):
        picks += [v[rank] for v in by_class.values() if rank < len(v)][:count - len(picks)]
        rank += 1
    return picks


def preview_grid(samples: Sequence[tuple[str, int]], cfg: Config, images: int = 8, views: int = 5,
                 padding: int = 2) -> torch.Tensor:
    """uint8 (3, H, W) grid of (path, class index) samples: one row per image (spread over the classes), its
    evaluation view first, then `views` draws of the train pipeline. cfg: the run's resolved settings.

    Random erasing is drawn here as the training loop draws it (per image, filled with the mean colour). The global
    torch RNG is left as it was, so that a preview inside a training run does not change the run.
    """
    # the whole list per image, as on CPU: on CUDA the same colour steps run per batch, with the same distribution
    augment = train_transform(dataclasses.replace(cfg, augment_on="loader"))
    evaluate = eval_transform(cfg.img_size, cfg.eval_crop_ratio, cfg.interpolation)
    erase = v2.RandomErasing(p=cfg.erasing, value=[round(255 * m) for m in cfg.mean])
    tiles = []
    with seeded(cfg.seed):
        for i in preview_picks([target for _, target in samples], images):
            img = load_rgb(samples[i][0])
            tiles.append(center_crop(evaluate(img), cfg.img_size))
            tiles += [erase(augment(img)) if cfg.erasing > 0 else augment(img) for _ in range(views)]
    return make_grid(torch.stack(tiles), nrow=1 + views, padding=padding, pad_value=255)
