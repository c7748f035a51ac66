import os

import pytest
import torch
from torch import nn
from torchvision import models

from conftest import call_script
from errors import UserError
from model import build_model, count_params


def test_default_model_is_94_2m_parameters_with_the_mlp_head():
    model = build_model("resnext101_32x8d", 100, weights="none")
    assert count_params(model) / 1e6 == pytest.approx(94.2, abs=0.1)
    head = model.fc
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 2048), (2048, 1024), (1024, 1024),
                                                                  (1024, 100)]
    assert [m.p for m in head if isinstance(m, nn.Dropout)] == [0.4, 0.3, 0.2]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head) == 3
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 100)


def test_linear_head_and_unknown_arch():
    model = build_model("resnet18", 7, weights="none", head="linear")
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 7
    with pytest.raises(UserError, match="--arch resnet7"):
        build_model("resnet7", 7, weights="none")


def test_weights_default_reads_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = models.ResNet18_Weights.DEFAULT.url
    reference = models.resnet18(weights=None)
    os.makedirs(tmp_path / "hub" / "checkpoints")
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / os.path.basename(url))
    model = build_model("resnet18", 5, weights="default")
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    assert model.fc[-1].out_features == 5


def test_weights_unreachable_gives_one_line_advice(tmp_path, monkeypatch):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as err:
        build_model("resnet18", 5, weights="IMAGENET1K_V1")
    message = str(err.value)
    assert "network is unreachable" in message and "--weights none" in message and "\n" not in message
    with pytest.raises(UserError, match="IMAGENET1K_V1"):
        build_model("resnet18", 5, weights="IMAGENET9K")


def test_weights_file_torchvision_format_reinitialises_the_head(tmp_path, capsys):
    reference = models.resnet18(weights=None)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", 3, weights=str(path))
    assert torch.equal(model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    assert model.fc[-1].out_features == 3
    assert "head starts fresh" in capsys.readouterr().out


def test_weights_file_of_another_arch_is_refused(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(UserError, match="does not fit --arch resnet18"):
        build_model("resnet18", 3, weights=str(path))
    with pytest.raises(UserError, match="no such file"):
        build_model("resnet18", 3, weights=str(tmp_path / "missing" / "x.pth"))


def test_model_list_prints_every_arch_with_its_size():
    out = call_script("model.py", "--list", "--num-classes", "100").stdout
    line = next(l for l in out.splitlines() if l.startswith("resnext101_32x8d"))
    assert "94.2M" in line and line.rstrip().endswith("yes")
    assert next(l for l in out.splitlines() if l.startswith("wide_resnet101_2")).rstrip().endswith("no")
