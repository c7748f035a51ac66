"""Two processes under torchrun on CPU (gloo): the run trains, the ranks stay in step, evaluation is exact, a stopped
run resumes (with two processes or one), and inference writes the same files as one process."""
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import engine
import inference
import train
from batches import collate_skipping_bad
from config import config_from_dict
from conftest import LIGHT, ROOT, SAMPLE, TIMING_COLUMNS, TINY, TORCHRUN, run_main, wait_for
from dataset import build_train_val
from model import build_model
from run import Run

# 2 processes x 16 images: 9 steps per epoch on the 300 sample images; the LR is scaled to 2 x 1e-3. In float32
# (--amp off): evaluation under torchrun equals one process's bit for bit only there; under bf16 autocast (--amp
# auto on a CPU with AMX or AVX512-BF16) the kernels round differently for the shards' batch sizes, and an image near
# a tie can change class
ARGS = ["--data-dir", SAMPLE, "--epochs", 2, *LIGHT, "--batch-size", 16, "--lr-scale", "linear",
        "--save-every-steps", 2, "--tensorboard", "--amp", "off"]


def torchrun(script, *args, wait=True):
    command = [*TORCHRUN, os.path.join(ROOT, script), *map(str, args)]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if wait:
        proc.stdout_text, proc.stderr_text = proc.communicate(timeout=900)
    return proc


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One 2-process, 2-epoch run, never interrupted."""
    out = tmp_path_factory.mktemp("ddp")
    proc = torchrun("train.py", *ARGS, "--output-dir", out, "--run-name", "ddp")
    assert proc.returncode == 0, proc.stderr_text[-3000:]
    return out / "ddp", proc.stdout_text


def test_two_process_run_evaluates_exactly_like_one_process(ddp_run):
    run_dir, out = ddp_run
    assert "2 process(es) x --batch-size 16 = global batch 32, lr 0.002 (--lr 0.001 x 2, --lr-scale linear)" in out
    assert out.count("best val accuracy") == 1  # only rank 0 prints
    assert len(os.listdir(run_dir / "tensorboard")) == 1  # and logs
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == [1, 2] and history["lr"].iloc[0] == 0.002

    # the train columns count the images of both processes: 9 steps x 16 images x 2 processes
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    assert ckpt["progress"]["seen"] == 288 and history["train_loss"].nunique() == 2
    correct = history["train_acc"].iloc[1] * 288
    assert abs(correct - round(correct)) < 1e-3

    # one process, the saved weights of epoch 2, the whole val set
    cfg = config_from_dict(ckpt["config"])
    _, val_set, classes = build_train_val(cfg)
    model = build_model(cfg.arch, len(classes), "none", cfg.head, cfg.head_dropout)
    loader = torch.utils.data.DataLoader(val_set, batch_size=64, collate_fn=collate_skipping_bad)
    for key, column in [("model", "val_acc"), ("ema", "val_acc_ema")]:
        model.load_state_dict(ckpt[key])
        val = engine.evaluate(model, loader, Run(cfg=cfg, model=model, device=torch.device("cpu")))
        assert len(val["targets"]) == len(val_set) == 100
        assert val["acc"] == history[column].iloc[1], key
        assert np.isclose(val["loss"], history[column.replace("acc", "loss")].iloc[1], rtol=1e-4)


# the script of small_checks
CHECKS = """import datetime
import sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import torch
import distributed
import engine
import run_folder
from augment import erasing_boxes
from config import Config
from losses import TrainLoss
from model import resolve_data
from run import Run
from test_stopping import batch, norm, step_gradient, tiny_net
from utils import seed_everything, seed_rank_streams

distributed.setup(torch.device("cpu"))

# the weight check: equal weights pass, a drift of 1e-6 on one rank is named
torch.manual_seed(0)
model = torch.nn.Linear(3, 2)
distributed.check_in_sync(model)
print("equal weights pass", file=sys.stderr)
if distributed.rank() == 1:
    with torch.no_grad():
        model.weight[0, 0] += 1e-6
try:
    distributed.check_in_sync(model)
except RuntimeError as error:
    print(error, file=sys.stderr)

# random streams: the same model on every process, then draws of its own
seed_everything(42)
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
weights = model[0].weight.detach().clone()  # built before the streams part: the same on every process
seed_rank_streams(42)
draws = (torch.rand(4), erasing_boxes(16, 32, 32, 1.0), model(torch.ones(8, 4)) == 0)
theirs = distributed.gather((weights, draws))
if distributed.rank() == 0:
    same_weights = torch.equal(theirs[0][0], theirs[1][0])
    same_draws = [torch.equal(a, b) for a, b in zip(theirs[0][1], theirs[1][1])]
    print(f"weights equal {{same_weights}}, draws equal {{same_draws}}", file=sys.stderr)

class Later(datetime.datetime):  # this process's clock has just passed a second
    @classmethod
    def now(cls, tz=None):
        return datetime.datetime(2026, 1, 2, 3, 4, 5 + distributed.rank())

run_folder.datetime = Later
print(f"rank {{distributed.rank()}} run name {{run_folder.run_name(Config(arch='resnet18'))}}", file=sys.stderr)

# --clip-grad: the gradient averaged over the processes is clipped, as one process's of all the images
whole = step_gradient(0.01)  # one process, all 8 images
cfg = resolve_data(Config(erasing=0.0, channels_last=False, augment_on="loader", clip_grad=0.01))
model = tiny_net()
ddp = torch.nn.parallel.DistributedDataParallel(model)
images, targets = batch()
mine = slice(4 * distributed.rank(), 4 * distributed.rank() + 4)  # each process its half, in two micro-batches
run = Run(cfg=cfg, model=model, device=torch.device("cpu"), criterion=TrainLoss(cfg, None), train_model=ddp,
          optimizer=torch.optim.SGD(model.parameters(), lr=0.0), scaler=torch.amp.GradScaler("cpu", enabled=False))
halves = [(images[mine][:2], targets[mine][:2]), (images[mine][2:], targets[mine][2:])]
engine.train_step(run, halves, epoch=0)
grads = [p.grad for p in model.parameters()]
same = all(torch.allclose(g, w, rtol=1e-4, atol=1e-8) for g, w in zip(grads, whole))
print(f"rank {{distributed.rank()}} norm {{norm(grads):.6f}} matches one process {{same}}", file=sys.stderr)

# the process group is destroyed at exit: drop the DDP wrapper first, and leave together, or gloo may abort a
# process whose partner has already gone
del run, ddp
torch.distributed.barrier()
"""


@pytest.fixture(scope="module")
def small_checks(tmp_path_factory):
    """One torchrun of two processes for the checks that need no training run (each torchrun start costs three
    Python processes): the weight check, each process's random streams and the run name, and clipping."""
    script = tmp_path_factory.mktemp("checks") / "checks.py"
    script.write_text(CHECKS.format(root=ROOT, tests=os.path.dirname(__file__)))
    proc = torchrun(script)
    assert proc.returncode == 0, proc.stderr_text[-3000:]
    return proc.stderr_text


def test_weight_check_passes_on_equal_ranks_and_catches_a_difference(small_checks):
    # the training run checks its ranks after every epoch (the run above passed); here one rank drifts
    assert small_checks.count("equal weights pass") == 2
    assert "rank 0 and rank 1 hold different weights" in small_checks
    assert "rank 1 and rank 0 hold different weights" in small_checks


def test_each_process_draws_its_own_random_numbers_and_the_first_names_the_run(small_checks):
    assert "weights equal True, draws equal [False, False, False]" in small_checks
    assert "rank 0 run name resnet18-20260102-030405" in small_checks
    assert "rank 1 run name resnet18-20260102-030405" in small_checks


def test_clip_grad_under_torchrun_clips_the_averaged_gradient(small_checks):
    for rank in (0, 1):
        assert f"rank {rank} norm 0.010000 matches one process True" in small_checks, small_checks[-3000:]


def test_a_stopped_two_process_run_resumes_with_two_processes_or_one(ddp_run, tmp_path, capsys):
    reference, _ = ddp_run
    run_dir = tmp_path / "stopped"
    # SIGTERM to torchrun, which passes it on: both processes stop after the same step, rank 0 saves
    proc = torchrun("train.py", *ARGS, "--output-dir", tmp_path, "--run-name", "stopped", wait=False)
    wait_for(run_dir / "last.pt", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert "SIGTERM: stopped at epoch 1 step" in out, err[-3000:]
    stopped = torch.load(run_dir / "last.pt", weights_only=True)["progress"]
    assert stopped["epoch"] == 0 and 2 <= stopped["step"] < 9 and stopped["processes"] == 2
    assert stopped["done"] == stopped["step"] * 32 and stopped["seen"] == stopped["done"]
    shutil.copytree(run_dir, tmp_path / "one")

    # the same command with --resume auto gives the uninterrupted run, bit for bit
    proc = torchrun("train.py", *ARGS, "--output-dir", tmp_path, "--run-name", "stopped", "--resume", "auto")
    assert proc.returncode == 0, proc.stderr_text[-3000:]
    assert f"resuming at epoch 1 step {stopped['step']}/9" in proc.stdout_text
    ours, theirs = pd.read_csv(run_dir / "history.csv"), pd.read_csv(reference / "history.csv")
    pd.testing.assert_frame_equal(ours.drop(columns=TIMING_COLUMNS), theirs.drop(columns=TIMING_COLUMNS))
    ours, theirs = (torch.load(d / "last.pt", weights_only=True) for d in (run_dir, reference))
    for key in ("model", "ema"):
        for name, tensor in theirs[key].items():
            assert torch.equal(ours[key][name], tensor), (key, name)

    # one process carries on with the images of epoch 1 that neither process had trained on, 16 per step
    code, out, err = run_main(train.main, ["--resume", tmp_path / "one" / "last.pt", "--keep-epochs", 2], capsys)
    assert code == 0, err[-3000:]
    assert "the run was trained by 2 process(es), now 1" in out
    assert "1 process(es) x --batch-size 16 = global batch 16, lr 0.001 (--lr 0.001 x 1, --lr-scale linear)" in out
    epochs = [torch.load(tmp_path / "one" / f"epoch-00{e}.pt", weights_only=True)["progress"] for e in (1, 2)]
    assert epochs[0]["seen"] == stopped["seen"] + (300 - stopped["done"]) // 16 * 16
    assert epochs[1]["seen"] == 288  # then 18 steps of 16 images per epoch
    assert list(pd.read_csv(tmp_path / "one" / "history.csv")["epoch"]) == [1, 2]


def test_two_process_inference_writes_the_files_of_one_process(ddp_run, tmp_path, capsys):
    run_dir, _ = ddp_run
    args = ["--checkpoint", run_dir / "best.pt", "--data-dir", SAMPLE, "--val-dir", os.path.join(SAMPLE, "val"),
            "--tta", "flip", "--topk", 3, "--workers", 0]
    proc = torchrun("inference.py", *args, "--output", tmp_path / "two.csv")
    assert proc.returncode == 0, proc.stderr_text[-3000:]
    code, out, err = run_main(inference.main, [*args, "--output", tmp_path / "one.csv"], capsys)
    assert code == 0, err
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "one.csv").read_text()
    assert len(pd.read_csv(tmp_path / "two.csv")) == 50
    two, one = pd.read_csv(tmp_path / "two_top3.csv"), pd.read_csv(tmp_path / "one_top3.csv")
    pd.testing.assert_frame_equal(two, one, atol=1e-5)
    accuracy = [line for line in out.splitlines() if line.startswith("val accuracy")]
    assert len(accuracy) == 2 and all(line in proc.stdout_text for line in accuracy)


def test_sync_bn_on_the_cpu_is_one_clear_error(tmp_path, capsys):
    code, _, err = run_main(train.main, ["--data-dir", SAMPLE, "--output-dir", tmp_path, *TINY, "--device", "cpu",
                                         "--sync-bn"], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("error: --sync-bn needs CUDA: PyTorch's SyncBatchNorm does not run on "
                                            "the CPU (train without it)")


def test_freeze_epochs_under_torchrun_trains_the_head_then_everything(tmp_path):
    init = tmp_path / "init.pt"
    torch.save(build_model("test_resnet", 10, weights="none").state_dict(), init)
    proc = torchrun("train.py", "--data-dir", SAMPLE, "--output-dir", tmp_path, "--run-name", "frozen", *LIGHT,
                    "--head", "mlp", "--batch-size", 16, "--epochs", 2, "--freeze-epochs", 1, "--weights", init,
                    "--keep-epochs", 2)
    assert proc.returncode == 0, proc.stderr_text[-3000:]
    before = torch.load(init, weights_only=True)
    first, second = (torch.load(tmp_path / "frozen" / f"epoch-00{e}.pt", weights_only=True)["model"] for e in (1, 2))
    backbone = [k for k in before if not k.startswith("fc.")]
    assert all(torch.equal(before[k], first[k]) for k in backbone)  # epoch 1: the head alone
    assert not torch.equal(before["fc.0.weight"], first["fc.0.weight"])
    assert not torch.equal(first["backbone.conv1.0.weight"], second["backbone.conv1.0.weight"])  # epoch 2: all
