"""timm's ResNet family as --arch: end to end per family, weight files, the model's own data config, stages for
layer decay, refusals, the Hugging Face cache, resume, ensembles with torchvision members, torchrun.

Nothing is downloaded: the models are built without pretrained weights and the weight files are written here."""
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

import inference
import train
from config import Config
from conftest import ROOT, TIMING_COLUMNS, TORCHRUN, call_script, copy_sample, one_line_error, run_main
from errors import UserError
from finetune import param_groups, reported_lr, stage_depths
from model import TimmNet, build_model, resolve_data, to_sync_batchnorm

CLASSES = ["0", "1", "2"]
# the smallest setting that trains a timm model on real images: 32 px, three steps of 6 images per epoch
SMALL = ["--img-size", "32", "--batch-size", "6", "--workers", "0", "--lr", "1e-3"]
TINY_TIMM = [*SMALL, "--weights", "none", "--epochs", "1"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Three sample classes, 6 train + 3 val images each, and 4 test images."""
    return copy_sample(tmp_path_factory.mktemp("timm_data"), CLASSES, train=6, val=3, test=4)


# one architecture per family: ResNet-D, SE-ResNeXt-D, ResNeSt; named as a user may write them
FAMILIES = {"resnet18d": "bicubic", "timm/seresnext26d_32x4d": "bicubic", "resnest14d.gluon_in1k": "bilinear"}


@pytest.fixture(scope="module")
def timm_runs(small_data, tmp_path_factory):
    """{arch: run folder} of one tiny epoch per family (in this process: no start-up time per run)."""
    out, runs = tmp_path_factory.mktemp("timm_runs"), {}
    for i, arch in enumerate(FAMILIES):
        argv = ["--data-dir", small_data, "--output-dir", out, "--run-name", f"r{i}", "--arch", arch, *TINY_TIMM]
        assert train.main([str(a) for a in argv]) == 0
        runs[arch] = out / f"r{i}"
    return runs


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_each_family_trains_and_predicts_every_test_image(arch, timm_runs, small_data, tmp_path, capsys):
    best = torch.load(timm_runs[arch] / "best.pt", weights_only=True)
    cfg = best["config"]
    # the model's own interpolation and normalisation, the flagged train size, stored with the weights
    assert cfg["arch"] == arch and cfg["interpolation"] == FAMILIES[arch]
    assert cfg["img_size"] == 32 and cfg["eval_size"] == 32 and cfg["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert any(k.startswith("backbone.") for k in best["model"]) and "fc.0.weight" in best["model"]
    csv = tmp_path / "prediction.csv"
    code, out, err = run_main(inference.main, ["--checkpoint", timm_runs[arch] / "best.pt", "--data-dir", small_data,
                                               "--output", csv, "--topk", 3], capsys)
    assert code == 0, err
    assert f"{FAMILIES[arch]} resize, mean 0.485 0.456 0.406" in out  # inference feeds what the run trained on
    predictions = pd.read_csv(csv)
    assert len(predictions) == 4 and set(predictions["pred_label"].astype(str)) <= set(CLASSES)

    # inference normalises with the checkpoint's stored mean/std: another stored mean changes the probabilities
    best["config"]["mean"] = [0.1, 0.9, 0.5]
    torch.save(best, tmp_path / "other_mean.pt")
    code, out, err = run_main(inference.main, ["--checkpoint", tmp_path / "other_mean.pt", "--data-dir", small_data,
                                               "--output", tmp_path / "other.csv", "--topk", 3], capsys)
    assert code == 0 and "mean 0.1 0.9 0.5" in out, err
    theirs, ours = (pd.read_csv(tmp_path / name)["prob_1"] for name in ("other_top3.csv", "prediction_top3.csv"))
    assert not ours.equals(theirs)


# ---------------------------------------------------------------- weight files

def save_weights(state, path):
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif str(path).endswith(".bin"):
        torch.save({"state_dict": state, "epoch": 3}, path)  # as timm's training scripts wrap it
    else:
        torch.save(state, path)


@pytest.mark.parametrize("arch, classifier, file", [("resnet18d", "fc", "r18d.pth"),
                                                    ("legacy_seresnet18", "last_linear", "se18.safetensors"),
                                                    ("resnetv2_50x1_bit", "head.fc", "bit.bin")])
def test_weights_file_in_timm_format_fills_every_backbone_tensor(arch, classifier, file, tmp_path, capsys):
    reference = timm.create_model(arch, pretrained=False).state_dict()  # with timm's 1000-class classifier
    save_weights(reference, tmp_path / file)
    model = build_model(arch, 3, weights=str(tmp_path / file))
    own = model.backbone.state_dict()
    backbone = [k for k in reference if not k.startswith(classifier + ".")]
    assert sorted(own) == sorted(backbone) and all(torch.equal(own[k], reference[k]) for k in backbone)
    assert model.fc[-1].out_features == 3  # our head, new
    assert "head starts fresh" in capsys.readouterr().out


def test_weights_file_of_ours_keeps_its_head_across_tags_and_other_layouts_are_refused(tmp_path):
    trained = build_model("resnet18d.ra2_in1k", 3, weights="none")
    path = tmp_path / "ours.pt"
    torch.save({"model": trained.state_dict(), "config": {"arch": "resnet18d.ra2_in1k"}, "classes": CLASSES}, path)
    again = build_model("timm/resnet18d", 3, weights=str(path), classes=CLASSES)  # same network, another tag
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in trained.state_dict().items())
    torch.save(build_model("resnet18", 3, weights="none").state_dict(), tmp_path / "tv.pth")
    from errors import UserError
    with pytest.raises(UserError, match="does not fit --arch resnet18d"):
        build_model("resnet18d", 3, weights=str(tmp_path / "tv.pth"))
    with pytest.raises(UserError, match="is a resnet18d.ra2_in1k checkpoint, not --arch resnet18"):
        build_model("resnet18", 3, weights=str(path))


# ---------------------------------------------------------------- data config, stages

def test_each_model_gets_its_own_pretrained_data_config_unless_flags_override_it():
    tv = resolve_data(Config(arch="resnet18"))  # torchvision: as this project always fed it
    assert (tv.img_size, tv.eval_size, tv.eval_crop_ratio, tv.interpolation) == (224, 224, 0.875, "bilinear")
    assert tv.mean == pytest.approx([0.485, 0.456, 0.406]) and tv.std == pytest.approx([0.229, 0.224, 0.225])
    bit = resolve_data(Config(arch="resnetv2_50x1_bit.goog_distilled_in1k"))  # BiT: mean and std 0.5
    assert bit.mean == [0.5, 0.5, 0.5] and bit.std == [0.5, 0.5, 0.5] and bit.interpolation == "bicubic"
    big = resolve_data(Config(arch="timm/seresnextaa101d_32x8d.sw_in12k_ft_in1k_288"))  # trained at 288, tested at 320
    assert (big.img_size, big.eval_size, big.eval_crop_ratio) == (288, 320, 1.0)
    small = resolve_data(Config(arch="seresnextaa101d_32x8d.sw_in12k_ft_in1k_288", img_size=64))
    assert (small.img_size, small.eval_size, small.eval_crop_ratio) == (64, 64, 0.95)  # its crop_pct at its size
    flagged = resolve_data(Config(arch="resnetv2_50x1_bit.goog_distilled_in1k", mean=[0.4, 0.4, 0.4],
                                  interpolation="bilinear", eval_crop_ratio=0.8))
    assert flagged.mean == [0.4, 0.4, 0.4] and flagged.std == [0.5, 0.5, 0.5]
    assert flagged.interpolation == "bilinear" and flagged.eval_crop_ratio == 0.8
    assert resolve_data(big) == big  # a stored config stays as it is


@pytest.mark.parametrize("arch, stem_param, top_param", [
    ("resnet18d", "backbone.conv1.0.weight", "backbone.layer4.1.conv2.weight"),
    ("legacy_seresnet18", "backbone.layer0.conv1.weight", "backbone.layer4.1.conv2.weight"),
    ("resnetv2_50x1_bit", "backbone.stem.conv.weight", "backbone.norm.weight")])
def test_layer_decay_groups_of_a_timm_model_come_from_its_stages(arch, stem_param, top_param):
    model = build_model(arch, 3, weights="none")
    cfg = Config(lr=1e-3, layer_decay=0.5, head_lr_mult=10, weight_decay=0.05)
    groups = param_groups(model, cfg)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(named)  # every parameter in one group
    stages = sorted({g["depth"] for g in groups if g["depth"] is not None})
    assert len(stages) >= 5  # the stem and four stages at least, from the model's group_matcher
    assert lr_of[id(named[stem_param])] == pytest.approx(1e-3 * 0.5 ** stages[-1]) == min(lr_of.values())
    assert lr_of[id(named[top_param])] == pytest.approx(1e-3)
    assert lr_of[id(named["fc.0.weight"])] == pytest.approx(1e-2) == max(lr_of.values())
    assert reported_lr(torch.optim.AdamW(groups)) == pytest.approx(1e-3)


def test_sync_bn_keeps_the_activation_of_timm_fused_norm_layers():
    from timm.layers import BatchNormAct2d
    model = build_model("skresnet18", 3, weights="none")  # its convolutions carry BatchNormAct2d
    fused = [name for name, m in model.named_modules() if isinstance(m, BatchNormAct2d)]
    synced = to_sync_batchnorm(model)
    modules = dict(synced.named_modules())
    assert fused and all(type(modules[name]).__name__ == "SyncBatchNormAct" for name in fused)
    assert isinstance(modules["fc.1"], torch.nn.SyncBatchNorm)  # our head's BatchNorm1d too
    assert synced.state_dict().keys() == build_model("skresnet18", 3, weights="none").state_dict().keys()


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("arch, message", [
    ("vit_base_patch16_224", "vit_base_patch16_224 is not a ResNet-family model (the homework's rule, and the "
                             "default here); nearest ResNet-family choices: "),
    ("convnext_tiny.fb_in1k", "for your own data, --any-arch takes any timm image classifier"),
    ("no_such_net", "no_such_net is neither a torchvision ResNet nor a timm model"),
    ("resnet18d.no_such_tag", "resnet18d has no pretrained tag 'no_such_tag' (its pretrained tags: ra2_in1k, "),
    ("ecaresnet269d", "parameters with the mlp head, over --max-params 100.0M; nearest that fit: ")])
def test_refused_archs_get_one_line_naming_the_nearest_choices(arch, message, small_data, tmp_path, capsys):
    code, _, err = run_main(train.main, ["--data-dir", small_data, "--output-dir", tmp_path, "--arch", arch,
                                         *TINY_TIMM], capsys)
    line = one_line_error(code, err)
    assert message in line and os.listdir(tmp_path) == []  # refused before any run folder is made
    if "nearest that fit" in line:  # real names, each within the budget
        for name in line.split("nearest that fit: ")[1].split(" (")[0].split(", "):
            assert timm.is_model(name) and name != "ecaresnet269d"


def test_a_torchvision_weights_name_with_a_timm_arch_is_refused(small_data, tmp_path, capsys):
    code, _, err = run_main(train.main, ["--data-dir", small_data, "--output-dir", tmp_path, "--arch", "resnet18d",
                                         *TINY_TIMM, "--weights", "IMAGENET1K_V1"], capsys)
    assert "a timm --arch takes default" in one_line_error(code, err)


# ---------------------------------------------------------------- --weights default: the Hugging Face hub cache

def hub_cache_entry(hf_home, repo, state):
    """Lay out a Hugging Face hub cache entry as hf_hub_download leaves it: refs/main names a snapshot folder."""
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    os.makedirs(folder / "refs")
    os.makedirs(folder / "snapshots" / commit)
    (folder / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "snapshots" / commit / "model.safetensors"))


def test_weights_default_reads_the_hub_cache_offline_and_a_miss_is_one_line(small_data, tmp_path):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    argv = [sys.executable, os.path.join(ROOT, "train.py"), "--data-dir", str(small_data), "--output-dir",
            str(tmp_path), "--run-name", "hub", "--arch", "resnet18d", *SMALL, "--epochs", "1", "--weights",
            "default", "--freeze-epochs", "1", "--no-ema"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    line = one_line_error(proc.returncode, proc.stderr)
    where = str(tmp_path / "hf" / "hub" / "models--timm--resnet18d.ra2_in1k")
    assert "could not load the timm weights of resnet18d" in line and where in line
    assert "model.safetensors of https://huggingface.co/timm/resnet18d.ra2_in1k" in line and "--weights FILE" in line

    reference = timm.create_model("resnet18d", pretrained=False).state_dict()
    hub_cache_entry(tmp_path / "hf", "timm/resnet18d.ra2_in1k", reference)
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the backbone stayed frozen for the one epoch: it holds the cached weights, running statistics included
    trained = torch.load(tmp_path / "hub" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(trained["backbone." + k], v) for k, v in reference.items() if not k.startswith("fc."))


# ---------------------------------------------------------------- model.py --list

def test_model_list_shows_the_pretrained_timm_models_with_size_input_and_budget():
    out = call_script("model.py", "--list", "--filter", "res*1[48]d.*", "--max-params", "15.8e6", "--flops").stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert "resnet18" not in rows and "resnet18d.ra4_e3600_r224_in1k" in rows  # every tag that matches
    assert rows["resnet18d.ra2_in1k"][:3] == ["15.5M", "224/288", "yes"]  # trained at 224, tested at 288
    assert rows["resnest14d.gluon_in1k"][1:3] == ["224", "no"]
    assert 3 < float(rows["resnet18d.ra2_in1k"][3]) < 5  # GFLOPs at its own 224 px


# ---------------------------------------------------------------- resume, ensembles, folds, torchrun

def test_a_resumed_timm_run_matches_the_uninterrupted_one(small_data, tmp_path, capsys):
    argv = ["--data-dir", small_data, "--output-dir", tmp_path, "--arch", "resnet18d", *SMALL, "--weights", "none",
            "--epochs", 2, "--keep-epochs", 2]
    assert run_main(train.main, [*argv, "--run-name", "whole"], capsys)[0] == 0
    os.makedirs(tmp_path / "stopped")  # the state after epoch 1, as a run stopped there left it
    shutil.copy(tmp_path / "whole" / "epoch-001.pt", tmp_path / "stopped" / "last.pt")
    code, _, err = run_main(train.main, ["--resume", tmp_path / "stopped" / "last.pt"], capsys)
    assert code == 0, err
    whole, resumed = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("whole", "stopped"))
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])
    assert all(torch.equal(whole["ema"][k], resumed["ema"][k]) for k in whole["ema"])
    histories = [pd.read_csv(tmp_path / run / "history.csv").drop(columns=TIMING_COLUMNS)
                 for run in ("whole", "stopped")]
    pd.testing.assert_frame_equal(*histories)


def test_an_ensemble_mixes_a_timm_fold_and_torchvision_with_tta_and_report(timm_runs, small_data, tmp_path, capsys):
    common = ["--data-dir", small_data, "--output-dir", tmp_path, *TINY_TIMM]
    code, _, err = run_main(train.main, [*common, "--run-name", "cv", "--arch", "resnet18d", "--folds", 2], capsys)
    assert code == 0 and 0 < len(pd.read_csv(tmp_path / "cv" / "oof.csv")) < 27, err  # fold 0 of train + val
    assert run_main(train.main, [*common, "--run-name", "tv", "--arch", "resnet18"], capsys)[0] == 0
    csv = tmp_path / "prediction.csv"
    code, out, err = run_main(inference.main, ["--checkpoint", tmp_path / "cv" / "best.pt", tmp_path / "tv" / "best.pt",
                                               timm_runs["resnest14d.gluon_in1k"] / "best.pt", "--data-dir",
                                               small_data, "--val-dir", small_data / "val", "--tta", "flip-crops",
                                               "--report", tmp_path / "report", "--output", csv], capsys)
    assert code == 0, err
    assert "3 model(s)" in out and "bilinear resize" in out and "bicubic resize" in out
    assert len(pd.read_csv(csv)) == 4 and (tmp_path / "report" / "report.md").exists()


def test_torchrun_trains_a_timm_model_on_two_processes(small_data, tmp_path):
    command = [*TORCHRUN, os.path.join(ROOT, "train.py"), "--data-dir", str(small_data), "--output-dir",
               str(tmp_path), "--run-name", "ddp", "--arch", "seresnext26d_32x4d", "--weights", "none", "--img-size", "32", "--batch-size", "3", "--workers", "0",
               "--lr", "1e-3", "--epochs", "2", "--freeze-epochs", "1"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) x --batch-size 3 = global batch 6" in proc.stdout
    history = pd.read_csv(tmp_path / "ddp" / "history.csv")
    assert list(history["epoch"]) == [1, 2]


def test_lr_finder_sweeps_on_the_data_a_training_run_sees(small_data, tmp_path, capsys):
    # timm's test ResNet normalises with mean and std 0.5 and crops 95% (BiT and the ra4 tags have their own too):
    # the sweep must feed it that, as a training run would, and name its folder as train.py does (timm/NAME is one
    # folder); --tensorboard logs from the resolved sizes
    argv = ["--data-dir", small_data, "--output-dir", tmp_path, "--arch", "timm/test_resnet", *SMALL,
            "--weights", "none", "--tensorboard", "--find-lr", "--lr-find-steps", 5]
    code, out, err = run_main(train.main, argv, capsys)
    assert code == 0, err
    data_line = next(line for line in out.splitlines() if line.startswith("data: "))
    assert data_line.startswith("data: train 32 px, eval 32 px at crop ratio 0.95, bilinear resize, mean 0.5 0.5 "
                                "0.5, std 0.5 0.5 0.5"), data_line
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("timm-test_resnet-") and os.listdir(run_dir) == ["lr_find.png"]
    command = out.split("train with: ")[1].splitlines()[0]
    assert f"--run-name {run_dir.name}" in command

    # the training run of the printed command (one epoch) states the same data line
    words = command.split()[2:]
    code, out, err = run_main(train.main, [*words, "--epochs", 1], capsys)
    assert code == 0, err
    assert data_line in out.splitlines()
    saved = torch.load(run_dir / "best.pt", weights_only=True)["config"]
    assert saved["mean"] == saved["std"] == [0.5, 0.5, 0.5] and saved["eval_crop_ratio"] == 0.95


# ---------------------------------------------------------------- --any-arch: any timm classifier, for one's own data

def test_any_arch_trains_predicts_and_exports_a_model_outside_the_family(small_data, tmp_path, capsys):
    # timm's test EfficientNet (0.1M parameters): stages from its group_matcher for --layer-decay, our head, the
    # prediction and the ONNX export as for the ResNets
    argv = ["--data-dir", small_data, "--output-dir", tmp_path, "--run-name", "effnet", "--arch", "test_efficientnet",
            "--any-arch", *TINY_TIMM, "--layer-decay", 0.8, "--head", "linear"]
    code, out, err = run_main(train.main, argv, capsys)
    assert code == 0, err
    assert "test_efficientnet with linear head" in out and "bicubic resize" in out
    best = tmp_path / "effnet" / "best.pt"
    csv = tmp_path / "prediction.csv"
    code, out, err = run_main(inference.main, ["--checkpoint", best, "--data-dir", small_data, "--output", csv],
                              capsys)
    assert code == 0, err
    assert len(pd.read_csv(csv)) == 4
    code, out, err = run_main(inference.main, ["--checkpoint", best, "--export", tmp_path / "effnet.onnx"], capsys)
    assert code == 0 and "gives PyTorch's float32 probabilities to" in out, err


def test_a_fixed_size_model_trains_and_predicts_at_its_own_size_only(small_data, tmp_path, capsys):
    # timm's test ViT is laid out for 160 px: other sides are one-line errors naming the size it takes
    base = ["--data-dir", small_data, "--output-dir", tmp_path, "--arch", "test_vit", "--any-arch", "--weights",
            "none", "--batch-size", 6, "--workers", 0, "--epochs", 1, "--head", "linear"]
    for extra, said in ([["--img-size", 32], "not --img-size 32, --eval-size 32"],
                        [["--img-size", 160, "--progressive", 0.5], "not --progressive"]):
        code, _, err = run_main(train.main, [*base, *extra], capsys)
        assert "--arch test_vit takes 160 px input only" in one_line_error(code, err) and said in err
    code, out, err = run_main(train.main, [*base, "--img-size", 160, "--run-name", "vit"], capsys)
    assert code == 0, err
    best = tmp_path / "vit" / "best.pt"
    code, _, err = run_main(inference.main, ["--checkpoint", best, "--data-dir", small_data, "--output",
                                             tmp_path / "vit.csv"], capsys)
    assert code == 0 and len(pd.read_csv(tmp_path / "vit.csv")) == 4, err
    code, _, err = run_main(inference.main, ["--checkpoint", best, "--data-dir", small_data, "--eval-size", 224],
                            capsys)
    assert "not --eval-size 224" in one_line_error(code, err)


def test_layer_decay_on_a_model_without_stages_is_one_line():
    # a timm backbone with no group_matcher is one stage: its parameters train, --layer-decay has nothing to decay
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    model = TimmNet(backbone, torch.nn.Linear(4, 2))
    assert set(stage_depths(model).values()) == {("backbone", 0)}
    with pytest.raises(UserError, match="--layer-decay 0.7: this model names no stages"):
        stage_depths(model, layer_decay=0.7)
