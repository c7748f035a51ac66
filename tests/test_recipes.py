"""The recipe levers: mixing, augmentation policies, layer-wise learning rates, freezing, folds, ensembles."""
import contextlib
import io
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import engine
import inference
import train
from augment import train_transform
from config import Config
from conftest import TINY, copy_sample, one_line_error, run_main
from dataset import build_train_val
from errors import UserError
from finetune import param_groups
from folds import assign_folds
from losses import TrainLoss
from mix import build_mixer, count_correct
from model import build_model, resolve_data

CLASSES = ["0", "1", "2"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Three sample classes, 8 train + 4 val images each, and a few test images: seconds per epoch."""
    return copy_sample(tmp_path_factory.mktemp("small"), CLASSES, train=8, val=4, test=6)


# ---------------------------------------------------------------- mixing

def mixed_batch(cfg, seed):
    torch.manual_seed(seed)
    x, y = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    x_mixed, q = build_mixer(cfg, 5)(x, y, epoch=0)
    return x, y, x_mixed, q


def mixing_share(q, y):
    """lambda of a batch mixed with its roll by one (torchvision's pairing): q = lam * e_y + (1 - lam) * e_rolled."""
    a, b = torch.eye(5)[y], torch.eye(5)[y.roll(1, 0)]
    lam = ((q - b) * (a - b)).sum() / ((a - b) ** 2).sum()
    assert torch.allclose(q, lam * a + (1 - lam) * b, atol=1e-6)
    return lam.item()


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixed_targets_sum_to_one_and_match_the_mixed_images(kind):
    x, y, x_mixed, q = mixed_batch(Config(**{kind: 1.0}), seed=3)
    assert q.shape == (8, 5) and torch.allclose(q.sum(1), torch.ones(8))
    lam = mixing_share(q, y)
    assert 0 < lam < 1
    if kind == "mixup":
        assert torch.allclose(x_mixed, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-6)
    else:  # every pixel comes from the image or its partner, the image's share being lam
        own = (x_mixed == x).all(1)
        assert ((x_mixed == x) | (x_mixed == x.roll(1, 0))).all()
        assert own.float().mean().item() == pytest.approx(lam, abs=1e-6)


@pytest.mark.parametrize("loss", ["ce", "focal", "smooth-focal", "schedule"])
def test_every_loss_takes_mixed_targets_with_class_weights(loss):
    """A loss of the mixed target is the same mix of the two labels' losses, class weights and smoothing included."""
    cfg = Config(loss=loss, mixup=0.4, class_weights_from="start")
    _, y, _, q = mixed_batch(cfg, seed=0)
    lam = mixing_share(q, y)
    logits = torch.randn(8, 5)
    criterion = TrainLoss(cfg, torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0]))
    for epoch in (0, 15, 40):
        expected = lam * criterion(logits, y, epoch) + (1 - lam) * criterion(logits, y.roll(1, 0), epoch)
        assert criterion(logits, q, epoch).item() == pytest.approx(expected.item(), rel=1e-5)


def test_mixing_probability_switch_and_off_epoch():
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    never = build_mixer(Config(cutmix=1.0, mix_prob=0.0), 5)
    assert never(x, y, 0)[1] is y
    late = build_mixer(Config(mixup=0.2, mix_off_epoch=3), 5)
    assert late(x, y, 2)[1].shape == (4, 5) and late(x, y, 3)[1] is y
    assert build_mixer(Config(), 5) is None  # the seed recipe does not mix


def test_train_accuracy_of_a_mixed_batch_counts_the_predicted_share():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    q = torch.tensor([[0.7, 0.3, 0.0], [0.7, 0.3, 0.0], [0.5, 0.5, 0.0]])
    assert count_correct(logits, q) == pytest.approx(0.7 + 0.3 + 0.0)
    assert count_correct(logits, torch.tensor([0, 2, 2])) == 2


# ---------------------------------------------------------------- augmentation

@pytest.mark.parametrize("aug,policy", [("policy", "ta_wide"), ("policy", "rand-m9"), ("policy", "augmix"),
                                        ("policy", "imagenet"), ("light", "none")])
def test_augmentation_choices_give_uint8_crops(aug, policy):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 60, 3), dtype=np.uint8))
    out = train_transform(Config(img_size=24, aug=aug, auto_augment=policy))(img)
    assert out.dtype == torch.uint8 and out.shape == (3, 24, 24)


def test_augmentation_flags_that_do_not_fit_are_refused():
    with pytest.raises(UserError, match="add --auto-augment"):
        train_transform(Config(aug="policy"))
    with pytest.raises(UserError, match="drop --aug light"):
        train_transform(Config(aug="light", auto_augment="ta_wide"))
    # the seed list stays the default; on the CPU its colour steps and blur run in the loader too, with OpenCV
    transform = train_transform(Config())
    assert type(transform).__name__ == "OpenCVAugment" and transform.affine is not None
    assert transform.jitter is not None and transform.blur is not None


def test_eval_size_sets_the_validation_crop(small_data):
    _, val, _ = build_train_val(resolve_data(Config(data_dir=str(small_data), img_size=32, eval_size=40,
                                                   eval_crop_ratio=0.8)))
    assert val[0][0].shape == (3, 50, 50)  # resized square 40 / 0.8; the 40 px centre crop is cut per batch


# ---------------------------------------------------------------- layer-wise learning rates

def test_layer_decay_groups_have_the_expected_learning_rates():
    model = build_model("resnet18", 3, weights="none")
    cfg = Config(lr=1e-3, layer_decay=0.5, head_lr_mult=10, weight_decay=0.05)
    groups = param_groups(model, cfg)
    lrs = {g["stage"]: g["lr"] for g in groups}
    assert lrs == pytest.approx({"layer4": 1e-3, "layer3": 5e-4, "layer2": 2.5e-4, "layer1": 1.25e-4,
                                 "stem": 6.25e-5, "head": 1e-2})
    named = dict(model.named_parameters())
    stage_of_param = {id(p): g["stage"] for g in groups for p in g["params"]}
    assert stage_of_param[id(named["layer3.1.conv2.weight"])] == "layer3"
    assert stage_of_param[id(named["bn1.weight"])] == "stem"
    assert sum(len(g["params"]) for g in groups) == len(named)
    for g in groups:  # no decay on BatchNorm weights and biases, decay on conv and linear weights
        assert g["weight_decay"] == (0.05 if all(p.ndim > 1 for p in g["params"]) else 0.0)
        assert all(p.ndim > 1 for p in g["params"]) or all(p.ndim == 1 for p in g["params"])
    assert all(g["weight_decay"] == 0.05 for g in param_groups(model, Config(weight_decay=0.05,
                                                                             decay_norm_bias=True)))
    assert all(g["lr"] == Config().lr for g in param_groups(model, Config()))  # the seed: one learning rate


def test_every_group_anneals_in_proportion_to_its_learning_rate():
    model = build_model("resnet18", 3, weights="none", head="linear")
    cfg = Config(lr=1e-3, min_lr=1e-4, layer_decay=0.1, epochs=2)
    optimizer = engine.build_optimizer(model, cfg)
    scheduler = engine.build_scheduler(optimizer, cfg, steps_per_epoch=5)
    start = {g["stage"]: g["lr"] for g in optimizer.param_groups}
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    for g in optimizer.param_groups:  # stem starts at 1e-7, below --min-lr, and still ends 10x lower
        assert g["lr"] == pytest.approx(start[g["stage"]] * 0.1, rel=1e-6)


def test_frozen_phase_leaves_the_backbone_unchanged(small_data, tmp_path, capsys):
    init = tmp_path / "init.pt"
    torch.save(build_model("resnet18", 3, weights="none", head="linear").state_dict(), init)
    code, out, err = run_main(train.main, ["--data-dir", small_data, "--output-dir", tmp_path, "--run-name", "f",
                                           *TINY, "--weights", init, "--head", "linear", "--epochs", 1,
                                           "--freeze-epochs", 1, "--no-ema", "--batch-size", 8, "--cutmix", 1.0,
                                           "--mixup", 0.2, "--aug", "policy", "--auto-augment", "ta_wide"], capsys)
    assert code == 0, err
    before = torch.load(init, weights_only=True)
    after = torch.load(tmp_path / "f" / "last.pt", weights_only=True)["model"]
    backbone = [k for k in before if not k.startswith("fc.")]
    assert all(torch.equal(before[k], after[k]) for k in backbone)  # BatchNorm running stats included
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    history = pd.read_csv(tmp_path / "f" / "history.csv")
    assert 0 <= history["train_acc"].iloc[0] <= 1


# ---------------------------------------------------------------- folds and ensembles

def test_fold_assignment_is_stratified_disjoint_and_reproducible():
    targets = np.repeat([0, 1, 2], [10, 20, 15])
    folds = assign_folds(targets, 5, seed=7)
    assert sorted(set(folds)) == [0, 1, 2, 3, 4]  # every image in exactly one held-out fold
    for k in range(5):
        assert np.bincount(targets[folds == k], minlength=3).tolist() == [2, 4, 3]
    assert (assign_folds(targets, 5, seed=7) == folds).all()
    assert not (assign_folds(targets, 5, seed=8) == folds).all()
    with pytest.raises(UserError, match="fewer than the folds"):
        assign_folds(np.repeat([0, 1], [10, 3]), 5, seed=0)


@pytest.fixture(scope="module")
def fold_runs(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cv")
    argv = ["--data-dir", small_data, "--output-dir", out, "--run-name", "cv", *TINY, "--head", "linear",
            "--epochs", 1, "--batch-size", 8, "--folds", 2, "--all-folds", "--mixup", 0.2]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert train.main([str(a) for a in argv]) == 0
    return out / "cv", stdout.getvalue()


def test_all_folds_trains_every_fold_on_a_stored_split(fold_runs, small_data):
    run, out = fold_runs
    split = pd.read_csv(run / "fold0" / "folds.csv", dtype=str)
    assert split.equals(pd.read_csv(run / "fold1" / "folds.csv", dtype=str))  # one split for both runs
    assert len(split) == 36 and split["image"].is_unique
    assert (split.groupby("label")["fold"].value_counts() == 6).all()  # each class split evenly
    oof = pd.read_csv(run / "oof.csv", dtype=str)
    assert sorted(oof["image"]) == sorted(split["image"])  # each image predicted once, by the other fold's model
    held_out = split[split["fold"] == "1"]["image"]
    assert set(pd.read_csv(run / "fold1" / "oof.csv", dtype=str)["image"]) == set(held_out)
    accuracy = (oof["label"] == oof["pred"]).mean()
    assert f"out-of-fold accuracy {accuracy:.4f} over 36 images" in out
    assert torch.load(run / "fold1" / "best.pt", weights_only=True)["config"]["fold"] == 1


def test_folds_keep_their_assignment_when_the_file_list_changes(small_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    common = ["--data-dir", data, "--output-dir", tmp_path, *TINY, "--head", "linear", "--epochs", 1,
              "--batch-size", 8, "--folds", 3]
    code, _, err = run_main(train.main, [*common, "--fold", 0, "--run-name", "cv/fold0"], capsys)
    assert code == 0, err
    split = pd.read_csv(tmp_path / "cv" / "fold0" / "folds.csv", dtype=str)
    # one image added to train/ (re-drawing the folds from 37 images would move many of the 36 others), one gone
    added = os.path.join("train", "0", "added.png")
    shutil.copy(data / "train" / "1" / sorted(os.listdir(data / "train" / "1"))[0], data / added)
    os.remove(data / split["image"][5])

    # the other folds of --all-folds, after fold 0 (resumed: it is done); each keeps fold 0's assignment
    code, out, err = run_main(train.main, [*common, "--all-folds", "--run-name", "cv", "--resume", "auto",
                                           "--allow-schedule-change"], capsys)
    assert code == 0, err
    # fold 0 resumed on its own folds.csv, folds 1 and 2 started on it
    assert out.count(f"--folds: the fold assignment of {tmp_path / 'cv' / 'fold0' / 'folds.csv'} (36 images)") == 3
    for i in range(3):
        assert pd.read_csv(tmp_path / "cv" / f"fold{i}" / "folds.csv", dtype=str).equals(split)
        held_out = set(pd.read_csv(tmp_path / "cv" / f"fold{i}" / "oof.csv", dtype=str)["image"])
        gone = [] if i == 0 else [split["image"][5]]  # fold 0 predicted its fold before the image was removed
        assert held_out == set(split["image"][split["fold"] == str(i)]) - set(gone)
    assert out.count("warning: 1 image(s) are not in ") == 3 and f"never held out: {added}" in out
    assert out.count("warning: 1 image(s) of ") == 3 and "are no longer in the data" in out
    assert "out-of-fold accuracy" in out


def test_a_fold_split_must_fit_the_folds(small_data, tmp_path, capsys):
    split = tmp_path / "folds.csv"
    pd.DataFrame({"image": ["a.png", "b.png"], "label": ["0", "1"], "fold": [0, 1]}).to_csv(split, index=False)
    argv = ["--data-dir", small_data, "--output-dir", tmp_path, *TINY, "--fold-split", split]
    assert "give --folds K with it" in one_line_error(*run_main(train.main, argv, capsys)[::2])
    message = one_line_error(*run_main(train.main, [*argv, "--folds", 3], capsys)[::2])
    assert f"{split} splits the images into 2 folds, not --folds 3" in message
    assert "no such file" in one_line_error(*run_main(train.main, [*argv[:-1], tmp_path / "x.csv", "--folds", 2],
                                                      capsys)[::2])


def test_all_folds_overwrite_leaves_no_fold_of_the_earlier_run(fold_runs, small_data, tmp_path, capsys):
    shutil.copytree(fold_runs[0], tmp_path / "cv")
    for i in (2, 3):  # an earlier run with more folds: their models would join the ensemble of the folder
        shutil.copytree(tmp_path / "cv" / "fold1", tmp_path / "cv" / f"fold{i}")
    argv = ["--data-dir", small_data, "--output-dir", tmp_path, "--run-name", "cv", *TINY, "--head", "linear",
            "--epochs", 1, "--batch-size", 8, "--folds", 2, "--all-folds", "--overwrite"]
    code, out, err = run_main(train.main, argv, capsys)
    assert code == 0, err
    assert "--overwrite: removed the earlier run's fold0, fold1, fold2, fold3, oof.csv" in out
    assert sorted(os.listdir(tmp_path / "cv")) == ["fold0", "fold1", "oof.csv"]
    assert len(pd.read_csv(tmp_path / "cv" / "oof.csv")) == 36


def top_probs(path):
    df = pd.read_csv(path, dtype={"image_name": str, "label_1": str, "label_2": str, "label_3": str})
    return {(row.image_name, row[f"label_{j}"]): row[f"prob_{j}"] for _, row in df.iterrows() for j in (1, 2, 3)}


def test_two_checkpoint_ensemble_is_the_mean_of_the_two_softmaxes(fold_runs, small_data, tmp_path, capsys):
    run, _ = fold_runs
    a, b = run / "fold0" / "best.pt", run / "fold1" / "best.pt"
    common = ["--data-dir", small_data, "--workers", 0, "--topk", 3, "--tta", "flip"]
    for name, checkpoints in [("a", [a]), ("b", [b]), ("ab", [a, b]), ("folder", [run])]:
        code, out, err = run_main(inference.main, ["--checkpoint", *checkpoints, "--output", tmp_path / f"{name}.csv",
                                                   *common], capsys)
        assert code == 0, err
    single_a, single_b = top_probs(tmp_path / "a_top3.csv"), top_probs(tmp_path / "b_top3.csv")
    ensemble = top_probs(tmp_path / "ab_top3.csv")
    assert len(ensemble) == 18
    for key, p in ensemble.items():
        assert p == pytest.approx((single_a[key] + single_b[key]) / 2, abs=2e-6)
    assert top_probs(tmp_path / "folder_top3.csv") == ensemble  # a folder stands for its fold runs

    other = torch.load(b, weights_only=True)
    other["classes"] = other["classes"][::-1]
    torch.save(other, tmp_path / "other.pt")
    code, _, err = run_main(inference.main, ["--checkpoint", a, tmp_path / "other.pt", *common], capsys)
    assert code == 2 and "other classes" in err and "Traceback" not in err


def test_sweep_eval_size_reports_each_size(fold_runs, small_data, tmp_path, capsys):
    run, _ = fold_runs
    code, out, err = run_main(inference.main, ["--checkpoint", run / "fold0" / "best.pt", "--data-dir", small_data,
                                               "--val-dir", small_data / "val", "--workers", 0, "--tta", "none",
                                               "--sweep-eval-size", 32, 40, "--output", tmp_path / "p.csv"], capsys)
    assert code == 0, err
    assert "eval size 32 (resize 37)" in out and "eval size 40 (resize 46)" in out
    assert "out-of-fold accuracy" in out  # fold runs trained on val/ images: the note says what to trust


def test_counting_correct_predictions_leaves_the_sum_on_the_device():
    """The training step reads its sums once per step; a Python number per micro-batch would sync each time."""
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    assert isinstance(count_correct(logits, torch.tensor([0, 2])), torch.Tensor)
    assert isinstance(count_correct(logits, torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])), torch.Tensor)
