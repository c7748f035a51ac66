"""Training augmentation: the --aug lists, in their two forms.

Loader side (per image, in the loader workers, on PIL images): train_transform builds the list of --aug; for the
seed list on the CPU its colour steps run as one lookup table (ColourLUT) and the blur on the uint8 pixels
(RandomBlur).
Device side (per batch, on the training device, with per-image draws): BatchAugment runs the seed list's colour
jitter, grayscale and blur when training on CUDA (--augment-on), and random_erasing runs after normalisation in
every case (dataset.to_float_batch calls both).

Ops in two forms: ColorJitter (brightness, contrast, saturation, hue, in a random order), RandomGrayscale and
GaussianBlur exist as ColourLUT/RandomBlur (loader) and BatchAugment (device); both draw their parameters the way
torchvision does and use the same colour functions below. tests/test_fast_paths.py keeps each equal to torchvision's
own transform on the same draws (and so to each other); tests/test_dataset.py checks the erasing boxes.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torchvision.transforms import v2

from errors import UserError

if TYPE_CHECKING:
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


def train_transform(cfg: Config) -> v2.Compose:
    """The train augmentation of --aug, every number from the config; output is a uint8 CHW tensor.

    seed: the hand-tuned list; policy: crop, flip and an --auto-augment policy in place of the hand-tuned colour and
    geometry steps (as torchvision's reference recipes do); light: crop and flip only.

    With the seed list, when the batch augmentation is on (training on CUDA, or --augment-on batch) only the
    geometric steps run here, on the PIL image; colour jitter, grayscale and blur follow per batch on the GPU
    (BatchAugment), where they cost next to nothing. Otherwise the whole list runs here, per image, with the
    colour steps as one lookup table (ColourLUT) and the blur on the uint8 pixels (RandomBlur): the same draws as
    torchvision's transforms at a fraction of the cost of PIL's HSV round trip and the tensor blur of a PIL image.
    """
    if cfg.aug == "policy" and cfg.auto_augment == "none":
        raise UserError("--aug policy needs a policy: add --auto-augment ta_wide, rand-m9, augmix or imagenet")
    if cfg.aug != "policy" and cfg.auto_augment != "none":
        raise UserError(f"--auto-augment {cfg.auto_augment} is a policy of --aug policy, not of --aug {cfg.aug}: "
                        f"drop --aug {cfg.aug} (a policy alone implies --aug policy)")
    crop_and_flip = [v2.RandomResizedCrop(cfg.img_size, scale=tuple(cfg.rrc_scale),
                                          interpolation=interpolation_mode(cfg.interpolation), antialias=True),
                     v2.RandomHorizontalFlip(cfg.hflip)]
    if cfg.aug == "light":
        steps = crop_and_flip
    elif cfg.aug == "policy":
        steps = crop_and_flip + [auto_augment_policy(cfg.auto_augment)]
    else:
        steps = [
            crop_and_flip[0],
            v2.RandomAffine(degrees=cfg.affine_degrees, translate=(cfg.affine_translate, cfg.affine_translate),
                            scale=tuple(cfg.affine_scale)),
            crop_and_flip[1],
        ]
    if cfg.aug == "seed" and not batch_augment_on(cfg):
        steps += [ColourLUT(cfg.jitter, cfg.grayscale), RandomBlur(cfg.blur, cfg.blur_sigma, cfg.blur_kernel)]
    return v2.Compose(steps + [v2.PILToTensor()])


def draw_params(transform, img):
    """The random parameters of a torchvision v2 transform, drawn by its own code (make_params; _get_params
    before torchvision 0.21)."""
    draw = getattr(transform, "make_params", None) or transform._get_params
    return draw([img])


class ColourLUT:
    """ColorJitter (its four factors in a random order) and RandomGrayscale of a PIL image in one pass: the
    composition of the image's drawn operations is tabulated on a grid of RGB colours and applied with PIL's
    Color3DLUT (trilinear interpolation in C).

    The factors, order and coin come from torchvision's own sampling, so the distribution is the seed's. The pixels
    differ from torchvision's PIL chain by a few levels of 255 at most: one rounding instead of one per operation
    (PIL's hue goes through an 8-bit HSV image) and the interpolation between grid colours; contrast blends with
    the grey mean of the image as it is at that point of the order, estimated on every 4th pixel of every 4th row.
    torchvision's hue step alone is an HSV round trip of the image; here the image is read and written once.
    """

    def __init__(self, jitter, grayscale, grid=17):
        b, c, s, h = jitter
        self.jitter = v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)
        self.grayscale, self.grid = grayscale, grid
        levels = torch.linspace(0, 1, grid)
        blue, green, red = torch.meshgrid(levels, levels, levels, indexing="ij")  # red varies fastest, as PIL wants
        self.colours = torch.stack([red, green, blue]).reshape(1, 3, -1, 1)

    def __call__(self, img):
        params = draw_params(self.jitter, img)
        grey = torch.rand(1).item() < self.grayscale  # v2.RandomGrayscale's coin
        names = [["brightness", "contrast", "saturation", "hue"][i] for i in params["fn_idx"].tolist()]
        names = [name for name in names if params[f"{name}_factor"] is not None]
        if not names and not grey:
            return img
        x = self.colours.clone()
        grid = x.shape[2]
        if "contrast" in names:  # the image's own colours go through the steps before contrast with the grid
            pixels = torch.from_numpy(np.asarray(img)[::4, ::4].reshape(-1, 3).T / 255.0).float()
            x = torch.cat([x, pixels.reshape(1, 3, -1, 1)], dim=2)
        for name in names:
            factor = params[f"{name}_factor"]
            if name == "brightness":
                x = adjust_brightness(x, factor)
            elif name == "saturation":
                x = adjust_saturation(x, factor)
            elif name == "hue":
                x = adjust_hue(x, torch.tensor([factor]))
            else:
                x = blend(x[:, :, :grid], luma(x[:, :, grid:]).mean(), factor)
        if grey:
            x = luma(x).expand(-1, 3, -1, -1)
        table = x.reshape(3, -1).T.numpy()
        return img.filter(ImageFilter.Color3DLUT(self.grid, table))


class RandomBlur:
    """v2.RandomApply([v2.GaussianBlur(kernel, sigma)], p) of a PIL image, done on its uint8 pixels with numpy:
    the same drawn sigma, the same kernel and reflect padding as torchvision's, applied as two 1-D passes instead
    of the 2-D convolution of a float tensor (equal up to float rounding, so within one level of 255)."""

    def __init__(self, p, sigma, kernel):
        self.p, self.blur = p, v2.GaussianBlur(kernel, sigma=tuple(sigma))

    def __call__(self, img):
        if torch.rand(1).item() >= self.p:  # v2.RandomApply's coin
            return img
        sigma = draw_params(self.blur, img)["sigma"][0]
        size = self.blur.kernel_size[0]
        half = (size - 1) / 2
        weights = np.exp(-0.5 * (np.linspace(-half, half, size) / sigma) ** 2)
        weights = (weights / weights.sum()).astype(np.float32)
        pad = size // 2
        x = np.pad(np.asarray(img, dtype=np.float32), ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
        height, width = img.height, img.width
        rows = sum(w * x[:, i:i + width] for i, w in enumerate(weights))
        out = sum(w * rows[i:i + height] for i, w in enumerate(weights))
        return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


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
    """Zero a random rectangle of each image with probability p (value 0 of the normalised image, as the seed)."""
    n, _, height, width = x.shape
    top, left, h, w = erasing_boxes(n, height, width, p).to(x.device).view(n, 4, 1, 1).unbind(1)
    rows = torch.arange(height, device=x.device).view(1, height, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, width)
    box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    return x.masked_fill_(box.unsqueeze(1), 0.0)
