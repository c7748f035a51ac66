"""augment.py: each op in both its forms (per image in the loader, per batch on the device) against torchvision's
own transform on the same draws, and the per-image draws of the batch form."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import bench
from augment import (BatchAugment, ColourLUT, RandomBlur, adjust_brightness, adjust_contrast, adjust_hue,
                     adjust_saturation, draw_params, erasing_boxes, gaussian_blur, luma, train_transform)
from config import Config
from dataset import IMAGENET_MEAN, IMAGENET_STD, to_float_batch


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


def photo_crop(seed=0, size=96):
    return bench.synthetic_photo(np.random.default_rng(seed), 160, 120).crop((0, 0, size, size))


def test_loader_colour_table_matches_torchvision_jitter_and_grayscale_on_the_same_draws():
    colour = ColourLUT([0.25, 0.25, 0.25, 0.125], 0.5, grid=17)
    grey = np.asarray(photo_crop(1).convert("L").convert("RGB"))  # plain grey pixels stay grey
    diffs, greyed = [], 0
    for seed in range(24):
        img = photo_crop(seed)
        torch.manual_seed(seed)
        ours = np.asarray(colour(img), dtype=float)
        torch.manual_seed(seed)  # the same draws, in the same order, through torchvision's own kernels
        theirs = colour.jitter.transform(img, draw_params(colour.jitter, img))
        if torch.rand(1).item() < 0.5:
            theirs, greyed = TF.rgb_to_grayscale(theirs, 3), greyed + 1
        diffs.append(np.abs(ours - np.asarray(theirs, dtype=float)))
    diffs = np.stack(diffs)
    assert 4 <= greyed <= 20  # both branches of the grayscale coin were compared
    assert diffs.mean() < 2.5 and np.percentile(diffs, 99) <= 10  # levels of 255
    assert diffs.mean(axis=(1, 2, 3)).max() < 4  # no image is off as a whole
    assert np.array_equal(np.asarray(ColourLUT([0, 0, 0, 0], 0, grid=17)(Image.fromarray(grey))), grey)


def test_loader_blur_matches_torchvision_blur_on_the_same_sigma():
    img = photo_crop()
    blur = RandomBlur(1.0, (0.1, 1.0), 5)
    changed = 0
    for seed in range(4):
        torch.manual_seed(seed)
        ours = np.asarray(blur(img), dtype=int)
        torch.manual_seed(seed)
        torch.rand(1)  # RandomApply's coin
        theirs = np.asarray(TF.gaussian_blur(img, [5, 5], draw_params(blur.blur, img)["sigma"]), dtype=int)
        assert np.abs(ours - theirs).max() <= 1 and (ours != theirs).mean() < 0.01
        changed += not np.array_equal(ours, np.asarray(img))
    assert changed >= 2  # the sigmas drawn blur visibly
    torch.manual_seed(0)
    kept = sum(RandomBlur(0.3, (0.1, 1.0), 5)(img) is img for _ in range(400))
    assert 250 < kept < 310  # blurred with probability 0.3


def test_loader_keeps_the_colour_steps_unless_they_run_per_batch():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    for where, steps in [("batch", 4), ("loader", 6)]:
        transform = train_transform(Config(img_size=32, augment_on=where))
        assert len(transform.transforms) == steps
        assert transform(img).dtype == torch.uint8
    assert BatchAugment.from_config(Config(augment_on="loader")) is None


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
