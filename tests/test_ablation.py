import os
import shutil

import pandas as pd
import pytest
import torch

import ablation
import dataset
import engine
import inference
import train
from conftest import LIGHT, SAMPLE, TINY, one_line_error, run_main
from model import resolve_data

ARGS = ["--data-dir", SAMPLE, *LIGHT, "--epochs", 1]


def test_default_grid_then_repeats_resume(tmp_path, capsys):
    """The EMA x loss grid (4 runs, 1 epoch each), then the same grid with 2 seeds: the 4 runs are kept, 4 added."""
    argv = [*ARGS, "--output-dir", tmp_path]
    code, out, _ = run_main(ablation.main, argv, capsys)
    assert code == 0
    grid = tmp_path / "ablation"
    summary = pd.read_csv(grid / "summary.csv", dtype={"ema": str, "loss": str})
    assert len(summary) == 4
    assert set(zip(summary["ema"], summary["loss"])) == {("on", "schedule"), ("on", "ce"), ("off", "schedule"),
                                                         ("off", "ce")}
    assert summary["best_val_acc"].between(0, 1).all() and (summary["best_epoch"] == 1).all()
    assert summary.loc[summary["ema"] == "off", "best_val_acc_ema"].isna().all()
    assert summary.loc[summary["ema"] == "on", "best_val_acc_ema"].notna().all()
    history = pd.read_csv(grid / summary["run"][0] / "history.csv")
    assert summary["final_val_loss"][0] == pytest.approx(history["val_loss"].iloc[-1], rel=1e-5)
    for name in ["report.md", "curves.png", "confusion_grid.png"]:
        assert (grid / name).stat().st_size > 0
    assert "## Main effects" in (grid / "report.md").read_text()

    _, _, runs = ablation.plan(*ablation.parse_args([str(a) for a in argv]))
    assert ablation.plot_curves(runs, str(tmp_path / "c.png")) == [
        "ema=on, loss=schedule", "ema=on, loss=ce", "ema=off, loss=schedule", "ema=off, loss=ce"]
    titles = ablation.plot_confusion_grid(runs, {"ema": ["on", "off"], "loss": ["schedule", "ce"]}, summary,
                                          str(tmp_path / "g.png"))
    assert len(titles) == 4 and titles[0].startswith("ema=on, loss=schedule\nbest val acc ")

    kept = {r: os.path.getmtime(grid / r / "best.pt") for r in summary["run"]}
    marker = grid / summary["run"][3] / ablation.DONE_FILE  # as if this run had been stopped before its end
    marker.write_text(marker.read_text().replace('"finished": true', '"finished": false'))
    code, out, _ = run_main(ablation.main, [*argv, "--repeats", 2], capsys)
    assert code == 0 and out.count("already done, kept") == 3
    assert f"{summary['run'][3]}: resuming python train.py" in out  # and nothing retrained: best.pt as it was
    summary = pd.read_csv(grid / "summary.csv")
    assert len(summary) == 8 and sorted(set(summary["seed"])) == [42, 43]
    assert all(os.path.getmtime(grid / r / "best.pt") == t for r, t in kept.items())
    report = (grid / "report.md").read_text()
    assert "mean ± std over the seeds" in report and " ± " in report


def test_main_effects_on_a_crafted_summary():
    # seed 1: on/ce .70, on/focal .74, off/ce .60, off/focal .66 -> ema off - on = (.63 - .72) = -.09
    # seed 2: on/ce .72, on/focal .74, off/ce .62, off/focal .66 -> ema off - on = (.64 - .73) = -.09
    # focal - ce: seed 1 (.70 - .65) = .05, seed 2 (.70 - .67) = .03 -> .04 ± .0141
    rows = [("on", "ce", 1, .70), ("on", "focal", 1, .74), ("off", "ce", 1, .60), ("off", "focal", 1, .66),
            ("on", "ce", 2, .72), ("on", "focal", 2, .74), ("off", "ce", 2, .62), ("off", "focal", 2, .66)]
    summary = pd.DataFrame(rows, columns=["ema", "loss", "seed", "best_val_acc"])
    summary["final_val_loss"] = 1.0
    effects = ablation.main_effects(summary, {"ema": ["on", "off"], "loss": ["ce", "focal"]})
    table = effects.set_index(["factor", "level"])
    assert table.loc[("ema", "on"), "best_val_acc difference"] == "reference"
    assert table.loc[("ema", "off"), "best_val_acc difference"] == "-0.0900 ± 0.0000"
    assert table.loc[("loss", "focal"), "best_val_acc difference"] == "+0.0400 ± 0.0141"
    assert table.loc[("ema", "on"), "best_val_acc"] == "0.7250 ± 0.0071"
    assert table.loc[("loss", "ce"), "final_val_loss difference"] == "reference"


@pytest.mark.parametrize("argv,message", [
    (["--grid", "colour=red,blue"], "not a train.py setting"),
    (["--grid", "ema=maybe,off"], "levels are on and off"),
    (["--grid", "ema"], "FIELD=LEVEL1,LEVEL2"),
    (["--loss", "ce"], "comes from ablation.py's --grid"),
    (["--los", "ce"], "--loss: this setting comes from ablation.py's --grid"),  # abbreviated, as argparse takes it
    (["--run-name", "x"], "--name"),
    (["--test-tta", "flip-crops"], "it needs --test-labels"),
])
def test_grid_mistakes_are_one_line_before_any_training(tmp_path, capsys, argv, message):
    code, _, err = run_main(ablation.main, [*ARGS, "--output-dir", tmp_path, *argv], capsys)
    assert message in one_line_error(code, err)
    assert not (tmp_path / "ablation").exists()


def test_a_validation_pass_leaves_the_training_random_stream_alone():
    """So that EMA on/off runs train identically and differ only in the extra EMA evaluation."""
    cfg = resolve_data(train.parse_args(["--data-dir", SAMPLE, *TINY])[0])
    train_set, val_set, _ = dataset.build_train_val(cfg)
    val_loader = engine.make_loaders(cfg, train_set, val_set, torch.device("cpu"))[1]
    state = torch.get_rng_state()
    assert sum(len(y) for _, y, _ in val_loader) == len(val_set)
    assert torch.equal(state, torch.get_rng_state())


def test_test_labels_add_test_accuracy_per_tta_mode(tmp_path, capsys):
    """Each run's best.pt predicts the flat test folder once per mode; the summary carries those accuracies."""
    labels = os.path.join(SAMPLE, "test_labels.csv")
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data)
    argv = [*ARGS, "--data-dir", data, "--output-dir", tmp_path, "--grid", "ema=off", "--test-labels", labels,
            "--test-tta", "none", "flip"]
    code, out, _ = run_main(ablation.main, argv, capsys)
    assert code == 0
    grid = tmp_path / "ablation"
    summary = pd.read_csv(grid / "summary.csv")
    truth = pd.read_csv(labels, dtype=str)
    for mode in ["none", "flip"]:
        pred = pd.read_csv(grid / summary["run"][0] / f"test_prediction_{mode}.csv", dtype=str)
        assert len(pred) == len(truth) == 50
        merged = truth.merge(pred, on="image_name")
        assert summary[f"test_acc_{mode}"][0] == pytest.approx((merged["label"] == merged["pred_label"]).mean())
    assert "test_acc_flip" in (grid / "report.md").read_text() and "test_acc_none" in out

    # the same grid with another --epochs retrains the run in place: its test predictions are the new model's
    run_dir = grid / summary["run"][0]
    code, out, _ = run_main(ablation.main, [*argv, "--epochs", 2], capsys)
    assert code == 0 and "already done, kept" not in out
    assert len(pd.read_csv(run_dir / "history.csv")) == 2
    fresh = tmp_path / "fresh.csv"
    code, _, _ = run_main(inference.main, ["--checkpoint", run_dir / "best.pt", "--data-dir", data, "--tta", "none",
                                           "--output", fresh], capsys)
    assert code == 0
    kept = pd.read_csv(run_dir / "test_prediction_none.csv", dtype=str)
    assert kept.equals(pd.read_csv(fresh, dtype=str))
    assert os.path.getmtime(run_dir / "test_prediction_none.csv") > os.path.getmtime(run_dir / "best.pt")

    # kept as long as the model and the test folder are; a test image rewritten since is predicted again
    before = os.path.getmtime(run_dir / "test_prediction_none.csv")
    code, out, _ = run_main(ablation.main, [*argv, "--epochs", 2], capsys)
    assert code == 0 and "already done, kept" in out
    assert os.path.getmtime(run_dir / "test_prediction_none.csv") == before
    os.utime(data / "test" / sorted(os.listdir(data / "test"))[0])
    code, out, _ = run_main(ablation.main, [*argv, "--epochs", 2], capsys)
    assert code == 0 and "already done, kept" in out
    assert os.path.getmtime(run_dir / "test_prediction_none.csv") > before
