"""The precision and loader workers a run picks for its machine: --amp auto on the CPU follows the CPU's bf16
instructions, --amp bf16 trains and predicts on the CPU, --workers -1 follows the number of cores."""
import os

import numpy as np
import pandas as pd
import pytest
import torch

import inference
import train
import utils
from config import Config
from conftest import TINY, call_script, copy_sample, run_main

CPU = torch.device("cpu")

X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
X86_AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
X86_AMX = "processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
ARM_PLAIN = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n"


@pytest.mark.parametrize("cpuinfo, native", [(X86_AVX2, False), (X86_AVX512_BF16, True), (X86_AMX, True),
                                             (ARM_BF16, True), (ARM_PLAIN, False), ("", False)])
def test_amp_auto_on_the_cpu_is_bf16_only_with_native_bf16(monkeypatch, cpuinfo, native):
    monkeypatch.setattr(utils, "cpu_flags", lambda: utils.parse_cpu_flags(cpuinfo))
    assert utils.native_cpu_bf16() == native
    assert utils.amp_dtype(Config(amp="auto"), CPU) == (torch.bfloat16 if native else None)
    # the explicit settings do not depend on the CPU: bf16 even when emulated, fp16 and off in float32
    assert utils.amp_dtype(Config(amp="bf16"), CPU) == torch.bfloat16
    assert utils.amp_dtype(Config(amp="fp16"), CPU) is None
    assert utils.amp_dtype(Config(amp="off"), CPU) is None


@pytest.mark.parametrize("capability, auto", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                              ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_amp_auto_on_cuda_is_bf16_only_where_the_gpu_computes_it(monkeypatch, capability, auto):
    # a T4 (7.5) or V100 (7.0), where torch.cuda.is_bf16_supported() says yes because bf16 is emulated, against an
    # A100 (8.0) or H100 (9.0); torch is asked nothing else about the GPU
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    gpu = torch.device("cuda")
    assert utils.amp_dtype(Config(amp="auto"), gpu) == auto
    assert utils.amp_dtype(Config(amp="bf16"), gpu) == torch.bfloat16  # as asked, with a warning where emulated
    assert utils.amp_dtype(Config(amp="fp16"), gpu) == torch.float16
    assert utils.amp_dtype(Config(amp="off"), gpu) is None
    warnings = train.precision_notes(Config(amp="bf16"), gpu)
    if auto == torch.float16:
        assert warnings == [f"--amp bf16 on this GPU (compute capability {capability[0]}.{capability[1]}, below 8.0) "
                            "is emulated: the run computes in bf16 but far slower than in fp16 (or without cuDNN "
                            "kernels); --amp auto picks fp16 with loss scaling here"]
        assert "emulated on this GPU" in inference.precision_note(Config(amp="bf16"), gpu)
    else:
        assert warnings == [] and inference.precision_note(Config(amp="bf16"), gpu) == "bfloat16 autocast"
    assert train.precision_notes(Config(amp="auto"), gpu) == train.precision_notes(Config(amp="fp16"), gpu) == []


def test_amp_auto_describes_this_machines_choice(trained_run):
    _, proc = trained_run  # trained with the default --amp auto on the CPU
    expected = "bfloat16 autocast" if utils.native_cpu_bf16() else "float32"
    assert f"device cpu, {expected}" in proc.stdout


def test_bf16_training_and_prediction_on_the_cpu(tmp_path, capsys):
    data = copy_sample(tmp_path / "data", ["0", "1"], train=8, val=4, test=4)  # emulated bf16 is slow: one step
    argv = ["--data-dir", data, "--output-dir", tmp_path, "--run-name", "bf16", "--epochs", 1, *TINY,
            "--batch-size", 16, "--amp", "bf16", "--device", "cpu"]
    code, out, err = run_main(train.main, argv, capsys)
    assert code == 0, err
    assert "device cpu, bfloat16 autocast" in out
    assert ("--amp bf16 on this CPU is emulated" in out) != utils.native_cpu_bf16()
    history = pd.read_csv(tmp_path / "bf16" / "history.csv")
    assert np.isfinite(history[["train_loss", "val_loss", "val_loss_ema"]].to_numpy()).all()
    best = torch.load(tmp_path / "bf16" / "best.pt", weights_only=True)
    assert best["config"]["amp"] == "bf16"
    assert all(v.dtype != torch.bfloat16 for v in best["model"].values())  # autocast leaves the weights float32
    output = tmp_path / "prediction.csv"
    code, out, err = run_main(inference.main, ["--checkpoint", tmp_path / "bf16" / "best.pt", "--data-dir", data,
                                               "--val-dir", data / "val", "--tta", "flip", "--workers", 0,
                                               "--device", "cpu", "--output", output], capsys)
    assert code == 0, err
    assert "bfloat16 autocast" in out
    predictions = pd.read_csv(output, dtype=str)
    assert len(predictions) == 4 and set(predictions["pred_label"]) <= {"0", "1"}


def test_fp16_on_the_cpu_warns_and_trains_in_float32(tmp_path, capsys):
    data = copy_sample(tmp_path / "data", ["0", "1"], train=8, val=4, test=0)
    argv = ["--data-dir", data, "--output-dir", tmp_path, "--run-name", "fp16", "--epochs", 1, *TINY,
            "--batch-size", 8, "--amp", "fp16", "--device", "cpu"]
    code, out, err = run_main(train.main, argv, capsys)
    assert code == 0, err
    assert "warning: --amp fp16 has no effect on the CPU" in out and "device cpu, float32" in out


@pytest.mark.parametrize("cores, workers", [(1, 0), (2, 0), (3, 2), (8, 7), (64, 16)])
def test_default_workers_fit_the_cores(monkeypatch, cores, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert utils.default_workers(-1) == workers
    assert utils.default_workers(-1, torch.device("cpu")) == workers
    assert utils.default_workers(3) == 3  # a number given is kept


@pytest.mark.parametrize("cores, gpu_processes, workers", [(1, 1, 1), (2, 1, 2), (2, 4, 1), (16, 2, 8), (64, 1, 16)])
def test_default_workers_on_a_gpu_use_the_free_cores(monkeypatch, cores, gpu_processes, workers):
    # with the step on the GPU the cores decode and augment: a 2-core notebook with a T4 gets workers, not none;
    # the GPU processes of one machine share its cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(gpu_processes))
    assert utils.default_workers(-1, torch.device("cuda")) == workers
    assert utils.default_workers(0, torch.device("cuda")) == 0  # a number given is kept
    assert utils.default_workers(-1, torch.device("cpu")) == (0 if cores <= 2 else min(16, cores - 1))


def test_help_states_the_workers_rule():
    for script in ["train.py", "inference.py"]:
        text = " ".join(call_script(script, "--help").stdout.split())
        assert "<= 2 cores" in text and "on a GPU one per core" in text.replace("GPU,", "GPU"), script
        assert "at most 16" in text, script
