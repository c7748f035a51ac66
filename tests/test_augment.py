"""augment.py: each op in both its forms (per image in the loader with OpenCV, per batch on the device) against
torchvision's own transform on the same draws, the loader's draws against torchvision's, and the per-image draws of
the batch form."""
import glob
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.functional import _get_inverse_affine_matrix
from torchvision.transforms.v2 import functional as TF

import augment
import bench
from augment import (BatchAugment, adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, draw_params,
                     erasing_boxes, gaussian_blur, luma, torchvision_geometry, train_transform)
from batches import collate_skipping_bad, to_float_batch
from config import Config
from conftest import SAMPLE
from model import IMAGENET_MEAN, IMAGENET_STD

IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)


def per_image(fn, x, factors):
    return torch.stack([fn(img, float(f)) for img, f in zip(x, factors)])


def test_batch_colour_ops_equal_torchvision_image_by_image():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 20, 24)
    f = torch.tensor([0.5, 0.8, 1.0, 1.1, 1.25, 2.0])
    for ours, theirs in [(adjust_brightness, TF.adjust_brightness), (adjust_contrast, TF.adjust_contrast),
                         (adjust_saturation, TF.adjust_saturation)]:
        torch.testing.assert_close(ours(x.clone(), f.view(-1, 1, 1, 1)), per_image(theirs, x, f), atol=1e-6, rtol=0)
    hue = torch.tensor([-0.5, -0.125, 0.0, 0.05, 0.125, 0.4])
    torch.testing.assert_close(adjust_hue(x, hue), per_image(TF.adjust_hue, x, hue), atol=1e-5, rtol=0)
    torch.testing.assert_close(luma(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)
    sigma = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
    theirs = torch.stack([TF.gaussian_blur(img, [5, 5], [float(s)] * 2) for img, s in zip(x, sigma)])
    torch.testing.assert_close(gaussian_blur(x, sigma, 5), theirs, atol=1e-6, rtol=0)


def test_batch_augment_draws_every_factor_and_coin_per_image():
    torch.manual_seed(0)
    n = 2000
    red = torch.zeros(n, 3, 1, 1)
    red[:, 0] = 0.8
    shifted = BatchAugment([0, 0, 0, 0.125], 0, 0, (0.1, 1), 5).color_jitter(red.clone())
    hue = torch.tensor([TF.adjust_hue(torch.tensor([0.8, 0, 0]).view(3, 1, 1), h).flatten().tolist()
                        for h in (-0.125, 0.125)])
    # a red pixel turned by at most 1/8 of the wheel: green or blue rises, never both, never past the extremes
    assert (shifted[:, 1:].amax(1) <= hue[:, 1:].max() + 1e-5).all()
    assert ((shifted[:, 1] > 0.01) & (shifted[:, 2] > 0.01)).sum() == 0
    assert 0.4 < (shifted[:, 1] > 0.01).float().mean() < 0.6

    grey = torch.full((n, 3, 1, 1), 0.5)
    bright = BatchAugment([0.25, 0, 0, 0], 0, 0, (0.1, 1), 5).color_jitter(grey.clone()).flatten()
    assert bright.min() >= 0.375 - 1e-6 and bright.max() <= 0.625 + 1e-6 and bright.std() > 0.05

    colours = torch.rand(n, 3, 1, 1)
    greyed = BatchAugment([0, 0, 0, 0], 0.1, 0, (0.1, 1), 5).random_grayscale(colours.clone())
    assert 0.07 < (greyed.std(1) < 1e-6).float().mean() < 0.13

    noise = torch.rand(n, 3, 8, 8)
    blurred = BatchAugment([0, 0, 0, 0], 0, 0.3, (0.1, 1), 5).random_blur(noise.clone())
    assert 0.26 < (blurred != noise).flatten(1).any(1).float().mean() < 0.34


def test_erasing_boxes_fit_and_follow_the_probability():
    torch.manual_seed(0)
    boxes = erasing_boxes(2000, 32, 40, p=0.2)
    top, left, h, w = boxes.T
    erased = h > 0
    assert 0.16 < erased.float().mean() < 0.24
    assert ((top + h <= 32) & (left + w <= 40)).all()
    area = (h * w)[erased].float() / (32 * 40)
    assert area.min() > 0.01 and area.max() < 0.36


def sample_images():
    """Real photos (data/sample, 64x64) and larger synthetic ones, so crops both shrink and grow."""
    paths = sorted(glob.glob(os.path.join(SAMPLE, "train", "*", "*.jpg")))[::40]
    return [Image.open(p).convert("RGB") for p in paths] + [
        bench.synthetic_photo(np.random.default_rng(seed), 160, 120) for seed in range(3)]


def levels(img):
    return np.asarray(img, dtype=int)


def errors(pairs):
    """Absolute differences in levels of 255, all pixels of all (ours, theirs) pairs."""
    return np.concatenate([np.abs(levels(a) - levels(b)).ravel() for a, b in pairs])


def torchvision_seed_list(cfg):
    """The seed list as torchvision's own transforms of a PIL image (the reference OpenCVAugment follows)."""
    b, c, s, h = cfg.jitter
    return v2.Compose(torchvision_geometry(cfg) + [
        v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h), v2.RandomGrayscale(cfg.grayscale),
        v2.RandomApply([v2.GaussianBlur(cfg.blur_kernel, sigma=tuple(cfg.blur_sigma))], p=cfg.blur)])


@pytest.mark.parametrize("aug,augment_on", [("seed", "loader"), ("seed", "batch"), ("light", "auto")])
def test_loader_path_draws_as_torchvision_and_matches_its_output(aug, augment_on, monkeypatch):
    cfg = Config(img_size=48, aug=aug, augment_on=augment_on, jitter=[0.4, 0.4, 0.4, 0.1], grayscale=0.2, blur=0.5)
    ours = train_transform(cfg)
    theirs = torchvision_seed_list(cfg) if ours.jitter is not None else v2.Compose(torchvision_geometry(cfg))
    drawn = []  # every parameter our path draws, through augment.draw_params
    monkeypatch.setattr(augment, "draw_params", lambda t, img: drawn.append(draw_params(t, img)) or drawn[-1])
    pairs, states = [], []
    for seed, img in enumerate(sample_images() * 2):
        torch.manual_seed(seed)
        out = ours(img).permute(1, 2, 0).numpy()
        after_ours = torch.get_rng_state()
        torch.manual_seed(seed)
        pairs.append((out, theirs(img)))
        states.append(torch.equal(after_ours, torch.get_rng_state()))
        assert out.shape == (48, 48, 3)
    assert all(states)  # the same number of draws, in the same order: with the same seed, the same parameters
    each = (2 if aug == "seed" else 1) + (ours.jitter is not None)  # crop, affine, colour factors; blur sigma if
    assert len(drawn) == len(pairs) * each + sum("sigma" in p for p in drawn)  # its coin says so
    diff = errors(pairs)
    per_image = [np.abs(levels(a) - levels(b)).mean() for a, b in pairs]
    assert diff.mean() < 1.0 and max(per_image) < 3  # levels of 255; no image off as a whole
    assert np.percentile(diff, 99) <= 8  # a few pixels: hue steps, warp rounding at edges


def test_loader_draws_follow_the_seed_and_the_config():
    img = sample_images()[0]
    transform = train_transform(Config(img_size=32, blur=0.0, grayscale=0.0))
    torch.manual_seed(3)
    first = transform(img)
    torch.manual_seed(3)
    assert torch.equal(transform(img), first)
    assert not torch.equal(transform(img), first)  # a new draw
    assert train_transform(Config(img_size=32, augment_on="batch")).jitter is None  # colour per batch instead
    assert BatchAugment.from_config(Config(augment_on="loader")) is None


def test_loader_geometry_matches_torchvision_crop_resize_affine_and_flip():
    cfg = Config(img_size=48)
    crop, affine, flip = torchvision_geometry(cfg)
    resized, warped = [], []
    for img in sample_images():
        for seed in range(4):
            torch.manual_seed(seed)
            box = draw_params(crop, img)
            theirs = crop.transform(img, box)
            ours = augment.resize(np.asarray(img)[box["top"]:box["top"] + box["height"],
                                                  box["left"]:box["left"] + box["width"]], crop.size, crop.interpolation)
            resized.append((ours, theirs))
            angle = draw_params(affine, theirs)
            matrix = _get_inverse_affine_matrix([24.0, 24.0], angle["angle"], angle["translate"], angle["scale"],
                                                angle["shear"])
            for flipped in (False, True):
                moved = affine.transform(theirs, angle)
                warped.append((augment.warp(np.asarray(theirs), matrix, flipped),
                               TF.horizontal_flip(moved) if flipped else moved))
    diff = errors(resized)
    assert diff.mean() < 0.3 and diff.max() <= 1  # antialiased as PIL, where it shrinks and where it grows
    diff = errors(warped)
    assert (diff == 0).mean() > 0.999  # the same source pixel but for rounding ties of the nearest neighbour
    assert flip.p == cfg.hflip


@pytest.mark.parametrize("name,theirs,factors,mean,most", [
    ("brightness", TF.adjust_brightness, [0.6, 0.9, 1.2, 1.4], 0.0, 0),
    ("contrast", TF.adjust_contrast, [0.6, 0.9, 1.2, 1.4], 0.05, 1),
    ("saturation", TF.adjust_saturation, [0.6, 0.9, 1.2, 1.4], 0.5, 1),
    ("hue", TF.adjust_hue, [-0.1, -0.03, 0.05, 0.1], 1.0, 8)])
def test_loader_colour_steps_match_torchvision_on_the_same_factor(name, theirs, factors, mean, most):
    pairs = [(augment.COLOUR_OPS[name](np.asarray(img), f), theirs(img, f)) for img in sample_images() for f in factors]
    diff = errors(pairs)
    assert diff.mean() <= mean and np.percentile(diff, 99) <= most  # levels of 255


def test_loader_grayscale_and_blur_match_torchvision():
    cfg = Config(img_size=48, jitter=[0, 0, 0, 0], grayscale=1.0, blur=1.0)
    transform = train_transform(cfg)
    theirs = v2.Compose(torchvision_seed_list(cfg).transforms[-3:])  # jitter (no factors), grayscale, blur
    pairs = []
    for seed, img in enumerate(sample_images()):
        img = img.resize((48, 48))
        torch.manual_seed(seed)
        ours = transform.random_blur(transform.colour(np.asarray(img)))
        torch.manual_seed(seed)
        pairs.append((ours, theirs(img)))
    diff = errors(pairs)
    assert diff.mean() < 0.1 and diff.max() <= 1
    assert all(np.ptp(ours, axis=2).max() == 0 for ours, _ in pairs)  # grey: three equal channels


def test_train_transform_gives_uint8_crops_and_batches_normalise():
    cfg = Config(img_size=48)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8))
    out = train_transform(cfg)(img)
    assert out.dtype == torch.uint8 and out.shape == (3, 48, 48)
    batch = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    x = to_float_batch(batch, torch.device("cpu"), IMAGENET)
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    assert x[0, :, 0, 0].tolist() == pytest.approx(expected, rel=1e-5)


def test_loader_batches_are_channels_last_and_normalise_as_contiguous_ones():
    cfg = Config(img_size=32)
    transform = train_transform(cfg)
    rng = np.random.default_rng(0)
    images = [transform(Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))) for _ in range(3)]
    batch, targets, bad = collate_skipping_bad([(image, i, f"{i}.jpg") for i, image in enumerate(images)])
    assert batch.is_contiguous(memory_format=torch.channels_last) and targets.tolist() == [0, 1, 2] and bad == []
    plain = torch.stack([image.contiguous() for image in images])
    assert plain.is_contiguous() and torch.equal(batch, plain)
    for channels_last in (True, False):
        for erasing in (0.0, 0.7):
            torch.manual_seed(1)
            ours = to_float_batch(batch, torch.device("cpu"), IMAGENET, erasing, channels_last=channels_last)
            torch.manual_seed(1)
            theirs = to_float_batch(plain, torch.device("cpu"), IMAGENET, erasing, channels_last=channels_last)
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
            assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (plain / 255 - mean) / std
    torch.testing.assert_close(to_float_batch(batch, torch.device("cpu"), IMAGENET), expected, atol=1e-5, rtol=0)


def test_random_erasing_draws_per_image():
    torch.manual_seed(0)
    batch = torch.full((16, 3, 32, 32), 128, dtype=torch.uint8)
    x = to_float_batch(batch, torch.device("cpu"), IMAGENET, erasing=0.5)
    reference = to_float_batch(batch[:1], torch.device("cpu"), IMAGENET)[0]
    erased = [not torch.equal(img, reference) for img in x]
    assert 0 < sum(erased) < 16  # some images erased, others not: one draw each
