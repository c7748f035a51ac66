"""Two processes under torchrun on CPU (gloo): the run trains, the ranks stay in step, evaluation is exact."""
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import torch

import train
from conftest import ROOT, SAMPLE, TINY
from dataset import build_train_val, collate_skipping_bad, eval_crop
from model import build_model
from config import config_from_dict


def test_two_process_run_evaluates_exactly_like_one_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           os.path.join(ROOT, "train.py"), "--data-dir", SAMPLE, "--output-dir", tmp_path,
                           "--run-name", "ddp", "--epochs", "2", *TINY], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) x --batch-size 32 = global batch 64" in proc.stdout
    assert proc.stdout.count("best val accuracy") == 1  # only rank 0 prints
    run_dir = tmp_path / "ddp"
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == [1, 2]

    # one process, the saved weights of epoch 2, the whole val set
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    cfg = config_from_dict(ckpt["config"])
    _, val_set, classes = build_train_val(cfg)
    model = build_model(cfg.arch, len(classes), "none", cfg.head, cfg.head_dropout)
    loader = torch.utils.data.DataLoader(val_set, batch_size=64, collate_fn=collate_skipping_bad)
    for key, column in [("model", "val_acc"), ("ema", "val_acc_ema")]:
        model.load_state_dict(ckpt[key])
        val = train.evaluate(model, loader, torch.device("cpu"), None, eval_crop(cfg))
        assert len(val["targets"]) == len(val_set) == 100
        assert val["acc"] == history[column].iloc[1], key
        assert np.isclose(val["loss"], history[column.replace("acc", "loss")].iloc[1], rtol=1e-4)
