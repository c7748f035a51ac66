"""inference.py --export: the ONNX and TorchScript files give PyTorch's predictions on the sample test set, carry
what a user needs in their metadata, and every mistake is one line."""
import dataclasses
import json
import os
import sys
import warnings

import numpy as np
import onnxruntime
import pytest
import torch

import inference
import predict
from augment import center_crop, eval_transform
from conftest import SAMPLE, call_script, one_line_error, run_main
from dataset import FlatImages
from export import loaded_metadata, quiet_exporters

CPU = torch.device("cpu")


def sample_test_crops(crop, resize, ratio):
    """The sample test set as inference.py reads it: the resized squares, and their centre crops, which the
    exported model takes (resize the short side to `resize`, centre crop `crop`, uint8)."""
    dataset = FlatImages(os.path.join(SAMPLE, "test"), eval_transform(crop, ratio), draft_size=resize)
    squares = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert squares.dtype == torch.uint8 and squares.shape[-1] == resize
    return squares, center_crop(squares, crop).contiguous()


def float32_probs(model, squares, cfg, tta):
    """inference.py's probabilities from the float32 model, which the exported file holds: the tiny run's --amp auto
    predicts in bf16 on a CPU with AMX or AVX512-BF16, off by about 1e-3 from float32."""
    return predict.predict_probs(model, squares, CPU, dataclasses.replace(cfg, amp="off"), tta).numpy()


def run_exported(path, crops):
    if path.endswith(".onnx"):
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["images"]
        return session.run(["probs"], {"images": crops.numpy()})[0]
    with quiet_exporters(), torch.no_grad():
        return torch.jit.load(path, map_location="cpu")(crops).numpy()


@pytest.mark.parametrize("ext,tta", [(".onnx", "flip"), (".pt", "flip"), (".onnx", "none")])
def test_exported_model_gives_pytorchs_predictions(trained_run, tmp_path, ext, tta):
    run_dir, _ = trained_run
    checkpoint, path = str(run_dir / "best.pt"), str(tmp_path / f"model{ext}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        proc = call_script("inference.py", "--checkpoint", checkpoint, "--export", path, "--tta", tta, "--workers", 0)
    assert f"wrote {path}: " in proc.stdout and "prediction" not in proc.stdout
    assert "gives PyTorch's float32 probabilities to" in proc.stdout  # whatever --amp the run trained with
    # the exporters' deprecation notices are not the user's business
    assert not [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning, torch.jit.TracerWarning))
                and "export" in str(w.filename) + str(w.message)], [str(w.message) for w in caught]

    meta = loaded_metadata(path)
    model, cfg, classes, source, _ = inference.load_model(checkpoint, "best", CPU)
    assert json.loads(meta["classes"]) == classes == [str(i) for i in range(10)]
    assert (meta["eval_size"], meta["resize"], meta["eval_crop_ratio"]) == ("32", "37", "0.875")
    assert meta["weights"] == source and meta["tta"] == tta and meta["arch"] == "resnet18"
    assert json.loads(meta["normalisation"])["mean"] == [0.485, 0.456, 0.406]
    assert "uint8" in meta["input"] and "softmax" in meta["output"]

    squares, crops = sample_test_crops(int(meta["eval_size"]), int(meta["resize"]), cfg.eval_crop_ratio)
    expected = float32_probs(model, squares, cfg, tta)
    got = run_exported(path, crops)
    assert got.shape == expected.shape == (50, 10)
    assert np.array_equal(got.argmax(1), expected.argmax(1))
    assert np.abs(got - expected).max() < 1e-4
    assert np.allclose(got.sum(1), 1, atol=1e-5)


def test_exported_ensemble_averages_its_members(trained_run, tmp_path):
    run_dir, _ = trained_run
    path = str(tmp_path / "pair.onnx")
    call_script("inference.py", "--checkpoint", run_dir / "best.pt", run_dir / "last.pt", "--export", path,
               "--tta", "none", "--workers", 0)
    meta = loaded_metadata(path)
    assert len(json.loads(meta["checkpoints"])) == 2 and "averaged over 2 models" in meta["output"]
    squares, crops = sample_test_crops(32, 37, 0.875)
    members = [inference.load_model(str(run_dir / f), "best", CPU) for f in ("best.pt", "last.pt")]
    expected = np.mean([float32_probs(model, squares, cfg, "none") for model, cfg, *_ in members], axis=0)
    assert np.abs(run_exported(path, crops) - expected).max() < 1e-4


@pytest.mark.parametrize("extra,expected", [
    (["--export", "model.txt"], "must end in .onnx (ONNX) or .pt (TorchScript)"),
    (["--export", "model.onnx", "--tta", "flip-crops"], "--tta flip-crops cannot be exported"),
    (["--export", "{best}"], "would overwrite the checkpoint it exports"),
])
def test_export_mistakes_are_one_line(trained_run, tmp_path, capsys, monkeypatch, extra, expected):
    run_dir, _ = trained_run
    monkeypatch.chdir(tmp_path)
    best = str(run_dir / "best.pt")
    code, _, err = run_main(inference.main, ["--checkpoint", best, *[e.format(best=best) for e in extra]], capsys)
    assert expected in one_line_error(code, err)
    assert os.listdir(tmp_path) == []


def test_export_without_onnx_says_what_to_install(trained_run, tmp_path, capsys, monkeypatch):
    run_dir, _ = trained_run
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if it were not installed: importing it fails
    code, _, err = run_main(inference.main, ["--checkpoint", run_dir / "best.pt", "--export", tmp_path / "m.onnx"],
                            capsys)
    assert one_line_error(code, err) == "error: ONNX export needs the onnx package: pip install onnx onnxruntime"
    assert not (tmp_path / "m.onnx").exists()
