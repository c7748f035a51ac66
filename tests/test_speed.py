"""The fast paths give the same results as the plain ones: batch augmentation vs torchvision per image, gradient
accumulation vs one batch, channels_last vs NCHW, the image cache vs decode-and-resize; and bench.py runs."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

import bench
import train
from config import Config
from conftest import SAMPLE, TINY, run_main
from dataset import (BatchAugment, ColourLUT, RandomBlur, adjust_brightness, adjust_contrast, adjust_hue,
                     adjust_saturation, cache_file, draw_params, erasing_boxes, gaussian_blur, load_cached, load_rgb,
                     luma, train_transform)
from losses import TrainLoss
from model import build_model

CPU = torch.device("cpu")


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


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


@pytest.mark.parametrize("split", [[8], [2, 2, 2, 2], [5, 3]])
def test_accumulated_micro_batches_give_the_step_of_one_batch(split):
    cfg = Config(erasing=0.0, channels_last=False, augment_on="loader")
    criterion = TrainLoss(cfg, None)
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8, generator=gen)
    targets = torch.randint(0, 5, (8,), generator=gen)
    model = tiny_net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    bounds = np.cumsum([0] + split)
    batches = [(images[a:b], targets[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    loss, correct, n = train.train_step(model, batches, criterion, optimizer, scaler, 0, CPU, None, cfg)
    reference = tiny_net()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    ref_loss, _, _ = train.train_step(reference, [(images, targets)], criterion, ref_opt, scaler, 0, CPU, None, cfg)
    assert n == 8 and float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert not torch.equal(reference[0].weight, tiny_net()[0].weight)  # the step did move the weights


def test_channels_last_gives_the_nchw_outputs():
    torch.manual_seed(0)
    model = build_model("resnet18", 10, "none", "mlp").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        model.to(memory_format=torch.channels_last)
        fast = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-4)


def test_cache_serves_the_resized_image_and_notices_a_changed_file(tmp_path):
    source = tmp_path / "photo.jpg"
    bench.synthetic_photo(np.random.default_rng(0), 800, 600).save(source, quality=95)
    cache = str(tmp_path / "cache")
    first = load_cached(str(source), cache, 288)
    expected = TF.resize(load_rgb(str(source), draft_size=288), 288, antialias=True)
    assert first.size == expected.size == (384, 288)
    assert np.array_equal(np.asarray(first), np.asarray(expected))
    assert len(os.listdir(cache)) == 1
    again = load_cached(str(source), cache, 288)  # now decoded from the cache file: JPEG q95 of the same pixels
    diff = np.abs(np.asarray(again, dtype=float) - np.asarray(expected, dtype=float))
    assert diff.mean() < 4 and np.median(diff) <= 3  # JPEG q95 of a noisy photo: a few levels of 255
    old_entry = cache_file(cache, str(source), 288)

    Image.new("RGB", (500, 300), (200, 10, 10)).save(source)
    os.utime(source, ns=(os.stat(source).st_atime_ns, os.stat(source).st_mtime_ns + 10**9))
    assert cache_file(cache, str(source), 288) != old_entry
    changed = load_cached(str(source), cache, 288)
    assert changed.size == (480, 288) and np.allclose(np.asarray(changed)[100, 100], [200, 10, 10], atol=3)

    small = tmp_path / "small.png"
    Image.new("RGB", (50, 40), (1, 2, 3)).save(small)
    assert load_cached(str(small), cache, 288).size == (50, 40)  # never enlarged


def test_training_with_accumulation_batch_augmentation_and_cache(tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = ["--data-dir", SAMPLE, "--output-dir", tmp_path, "--run-name", "fast", "--epochs", 1, *TINY,
            "--accum-steps", 2, "--augment-on", "batch", "--cache", cache]
    code, out, err = run_main(train.main, argv, capsys)
    assert code == 0, err
    # micro-batches of 32/2: the 18 full ones of the 300 train images, and all 100 val images, once each
    assert len(os.listdir(cache)) == 18 * 16 + 100
    best = torch.load(tmp_path / "fast" / "best.pt", weights_only=True)
    assert best["config"]["accum_steps"] == 2 and best["config"]["cache"] == str(cache)
    code, _, err = run_main(train.main, argv[:-6] + ["--accum-steps", 3, "--overwrite"], capsys)
    assert code == 2 and "--accum-steps 3" in err and "Traceback" not in err


def test_bench_measures_ours_against_the_seed_style(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, table, err = run_main(bench.main, ["--images", 8, "--img-size", 32, "--batch-size", 4, "--steps", 1,
                                         "--repeats", 1, "--workers", 0, "--device", "cpu", "--json", out], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    parts = [r["part"] for r in result["rows"]]
    assert parts == ["input pipeline", "train step", "whole epoch"] + ["inference"] * 3
    for r in result["rows"]:
        assert r["ours"] > 0
        if r["part"] != "inference":
            assert r["seed"] > 0 and r["ratio"] == pytest.approx(r["ours"] / r["seed"], rel=0.02)
    assert "| input pipeline | 0 workers (1 core) |" in table and "TTA flip-crops" in table


# ---------------------------------------------------------------- CUDA (run with: python -m pytest -q -m cuda tests)



def cuda_run(tmp_path, capsys, name, *extra):
    argv = ["--data-dir", SAMPLE, "--output-dir", tmp_path, "--run-name", name, "--epochs", 2, *TINY,
            "--device", "cuda", *extra]
    code, out, err = run_main(train.main, argv, capsys)
    assert code == 0, err
    best = torch.load(tmp_path / name / "best.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in best["model"].values() if v.is_floating_point())
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_training_with_amp_and_channels_last(tmp_path, capsys, amp):
    out = cuda_run(tmp_path, capsys, amp, "--amp", amp)
    assert ("bfloat16" if amp == "bf16" else "float16") in out


@pytest.mark.cuda
def test_cuda_compile_with_ema_and_evaluation(tmp_path, capsys):
    cuda_run(tmp_path, capsys, "compiled", "--compile", "--accum-steps", 2)
    ckpt = torch.load(tmp_path / "compiled" / "last.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"]) and ckpt["ema_updates"] > 0


@pytest.mark.cuda
def test_cuda_batch_augment_matches_the_cpu():
    x = torch.rand(8, 3, 32, 32)
    torch.manual_seed(0)
    on_cpu = BatchAugment.from_config(Config(augment_on="batch"))(x.clone())
    torch.manual_seed(0)
    on_gpu = BatchAugment.from_config(Config(augment_on="batch"))(x.cuda())
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_accumulation_matches_one_batch():
    cfg = Config(erasing=0.0, augment_on="loader")
    device = torch.device("cuda")
    images = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8)
    targets = torch.randint(0, 5, (8,))
    models = [tiny_net().to(device, memory_format=torch.channels_last) for _ in range(2)]
    for model, batches in zip(models, [[(images, targets)], [(images[:4], targets[:4]), (images[4:], targets[4:])]]):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        train.train_step(model, batches, TrainLoss(cfg, None), optimizer, scaler, 0, device, None, cfg)
    for p, q in zip(*[m.parameters() for m in models]):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
