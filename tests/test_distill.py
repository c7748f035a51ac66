"""--teacher: a student distilled from the suite's trained run, the loss it learns from, a teacher that saw the
student's val images named, and the mistakes."""
import os
import shutil

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import inference
import train
from config import Config
from conftest import LIGHT, SAMPLE, copy_sample, error_line, run_main
from distill import distilled_loss


def student(tmp_path, teacher, *extra, name="student"):
    return ["--data-dir", SAMPLE, "--output-dir", tmp_path, "--run-name", name, *LIGHT, "--epochs", 1,
            "--teacher", teacher, *extra]


def test_a_student_trains_on_its_teachers_predictions_and_records_them(trained_run, tmp_path, capsys):
    teacher = trained_run[0] / "best.pt"  # a ResNet-18 with the MLP head teaches timm's test ResNet
    code, out, err = run_main(train.main, student(tmp_path, teacher), capsys)
    assert code == 0, err
    assert f"distilling from 1 teacher(s) at temperature 4, weight 0.5: {teacher}" in out
    assert "warning: --teacher" not in out  # it trained on train/, the student validates on val/
    last = torch.load(tmp_path / "student" / "last.pt", weights_only=True)
    assert [t["file"] for t in last["teachers"]] == [str(teacher)] and len(last["teachers"][0]["sha256"]) == 64
    csv = tmp_path / "prediction.csv"  # best.pt is an ordinary checkpoint: it predicts alone
    code, _, err = run_main(inference.main, ["--checkpoint", tmp_path / "student" / "best.pt", "--data-dir", SAMPLE,
                                             "--output", csv], capsys)
    assert code == 0 and len(pd.read_csv(csv)) == 50, err

    # a resumed run learns from the same teachers: a changed teacher file is refused
    copy = tmp_path / "teacher.pt"
    shutil.copy(teacher, copy)
    code, _, err = run_main(train.main, student(tmp_path, copy, name="again"), capsys)
    assert code == 0, err
    state = torch.load(copy, weights_only=True)
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, copy)
    code, _, err = run_main(train.main, ["--resume", tmp_path / "again" / "last.pt", "--epochs", 2,
                                         "--allow-schedule-change"], capsys)
    assert "the run was distilled from other teachers" in error_line(code, err)


def test_a_teacher_that_trained_on_the_val_images_is_named(trained_run, tmp_path, capsys):
    # the sample's train/ alone (a link: the same files), split by --val-fraction: its val part is images the teacher
    # trained on, every one of them
    data = tmp_path / "data"
    os.makedirs(data)
    os.symlink(os.path.join(SAMPLE, "train"), data / "train")
    argv = student(tmp_path, trained_run[0] / "best.pt", "--val-fraction", 0.1)
    argv[argv.index("--data-dir") + 1] = data
    code, out, err = run_main(train.main, argv, capsys)
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("warning: --teacher"))
    val_images = int(pd.read_csv(tmp_path / "student" / "history.csv")["val_images"].iloc[0])
    assert f"trained on {val_images} of the {val_images} val images" in line and "optimistic" in line


def test_the_loss_blends_the_labels_with_the_teachers_at_the_temperature():
    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))
    label_loss = F.cross_entropy(logits, labels)
    cfg = Config(distill_weight=0.3, distill_temperature=2.0)
    agreeing = (logits / 2.0).softmax(1)  # a teacher that predicts what the student does: no distillation loss
    assert distilled_loss(label_loss, logits, agreeing, cfg).item() == pytest.approx(0.7 * label_loss.item(), abs=1e-6)
    other = torch.full((8, 5), 0.2)
    kl = F.kl_div(F.log_softmax(logits / 2.0, 1), other, reduction="batchmean") * 4.0
    assert distilled_loss(label_loss, logits, other, cfg).item() == pytest.approx(
        0.7 * label_loss.item() + 0.3 * kl.item(), rel=1e-5)


def test_distillation_mistakes_are_one_line(trained_run, tmp_path, capsys):
    three = copy_sample(tmp_path / "three", ["0", "1", "2"], train=4, val=2, test=2)
    code, _, err = run_main(train.main, ["--data-dir", three, "--output-dir", tmp_path, *LIGHT, "--epochs", 1,
                                         "--teacher", trained_run[0] / "best.pt"], capsys)
    assert "was trained on other classes than this run's (10 vs 3" in error_line(code, err)
    code, _, err = run_main(train.main, student(tmp_path, tmp_path / "none.pt"), capsys)
    assert "--teacher" in error_line(code, err) and "none.pt" in err
    code, _, err = run_main(train.main, student(tmp_path, trained_run[0] / "best.pt", "--distill-weight", 1.5),
                            capsys)
    assert "--distill-weight must lie in [0, 1]" in error_line(code, err)
    code, out, _ = run_main(train.main, ["--data-dir", SAMPLE, "--output-dir", tmp_path, "--run-name", "plain",
                                         *LIGHT, "--epochs", 1, "--distill-weight", 0.2], capsys)
    assert code == 0 and "--distill-weight has no effect in this run: there is no --teacher" in out
