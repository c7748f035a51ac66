"""The fast paths give the same results as the plain ones: gradient accumulation vs one batch, channels_last vs
NCHW, the image cache vs decode-and-resize (the two forms of each augmentation: test_augment.py); bench.py runs."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

import bench
import engine
import train
from augment import BatchAugment
from config import Config
from conftest import SAMPLE, TINY, run_main
from images import cache_file, load_cached, load_rgb
from losses import TrainLoss
from model import build_model, resolve_data
from run import Run
from utils import native_cpu_bf16

CPU = torch.device("cpu")


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


@pytest.mark.parametrize("split", [[8], [2, 2, 2, 2], [5, 3]])
def test_accumulated_micro_batches_give_the_step_of_one_batch(split):
    cfg = resolve_data(Config(erasing=0.0, channels_last=False, augment_on="loader"))
    criterion = TrainLoss(cfg, None)
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8, generator=gen)
    targets = torch.randint(0, 5, (8,), generator=gen)
    model = tiny_net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    bounds = np.cumsum([0] + split)
    batches = [(images[a:b], targets[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    run = Run(cfg=cfg, model=model, device=CPU, optimizer=optimizer, scaler=scaler, criterion=criterion)
    loss, correct, n = engine.train_step(run, batches, epoch=0)
    reference = tiny_net()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    ref_run = Run(cfg=cfg, model=reference, device=CPU, optimizer=ref_opt, scaler=scaler, criterion=criterion)
    ref_loss, _, _ = engine.train_step(ref_run, [(images, targets)], epoch=0)
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
    bf16 = ["train step bf16"] if native_cpu_bf16() else []  # added by itself where the CPU has bf16 instructions
    assert parts == ["input pipeline", "train step"] + bf16 + ["whole epoch", "loop efficiency"] + ["inference"] * 3
    for r in result["rows"]:
        assert r["ours"] > 0
        if r["part"] not in ("inference", "loop efficiency"):
            assert r["seed"] > 0 and r["ratio"] == pytest.approx(r["ours"] / r["seed"], rel=0.02)
    assert "| input pipeline | 0 workers (1 core) |" in table and "TTA flip-crops" in table
    assert "| loop efficiency | our training loop" in table and "target >= 85%" in table


def test_bench_compares_bf16_with_float32_on_the_cpu_when_asked(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, table, err = run_main(bench.main, ["--images", 8, "--img-size", 32, "--batch-size", 4, "--steps", 1,
                                             "--repeats", 1, "--device", "cpu", "--parts", "step", "--cpu-bf16",
                                             "--json", out], capsys)
    assert code == 0, err
    step, bf16 = json.loads(out.read_text())["rows"]
    assert ("bfloat16 autocast" if native_cpu_bf16() else "float32") in step["setting"]  # --amp auto
    assert "bfloat16 autocast" in bf16["setting"]
    assert bf16["ours"] > 0 and bf16["seed"] > 0
    assert ("native bf16" if native_cpu_bf16() else "emulated bf16") in bf16["setting"]


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
    cfg = resolve_data(Config(erasing=0.0, augment_on="loader"))
    device = torch.device("cuda")
    images = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8)
    targets = torch.randint(0, 5, (8,))
    models = [tiny_net().to(device, memory_format=torch.channels_last) for _ in range(2)]
    for model, batches in zip(models, [[(images, targets)], [(images[:4], targets[:4]), (images[4:], targets[4:])]]):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        run = Run(cfg=cfg, model=model, device=device, optimizer=optimizer, scaler=scaler,
                  criterion=TrainLoss(cfg, None))
        engine.train_step(run, batches, epoch=0)
    for p, q in zip(*[m.parameters() for m in models]):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
