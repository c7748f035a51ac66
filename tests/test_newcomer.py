"""What a newcomer trips over: flags that refuse what they imply, one flag name with two meanings, --help texts
that show nothing or a raw float, a script whose --help is silent, epochs counted two ways, a quick start that does
not say it trains from scratch."""
import os
import re

import pytest

import inference
import report
import train
from augment import train_transform
from config import Config
from conftest import ROOT, SAMPLE, TINY, call_script, one_line_error, run_main
from errors import UserError

EPOCH_COUNTED = ["focal_start", "focal_full", "mix_off_epoch", "freeze_epochs", "ema_start_epoch"]


def help_of(parser):
    return " ".join(parser.format_help().split())  # one line: argparse wraps at the terminal width


def test_auto_augment_alone_implies_aug_policy(tmp_path, capsys):
    cfg, _, _ = train.parse_args(["--auto-augment", "ta_wide"])
    assert cfg.aug == "policy" and cfg.auto_augment == "ta_wide"
    assert [type(t).__name__ for t in train_transform(cfg).transforms][-2] == "TrivialAugmentWide"
    assert train.parse_args([])[0].aug == "seed"
    with pytest.raises(UserError, match="drop --aug light"):
        train_transform(train.parse_args(["--aug", "light", "--auto-augment", "rand-m9"])[0])
    code, _, err = run_main(train.main, ["--data-dir", SAMPLE, "--output-dir", tmp_path, *TINY, "--aug", "light",
                                         "--auto-augment", "augmix"], capsys)
    assert "--auto-augment augmix is a policy of --aug policy, not of --aug light" in one_line_error(code, err)


def test_inference_names_its_weight_choice_use_and_refuses_the_old_spelling(capsys, tmp_path):
    args = inference.parse_args(["--checkpoint", "best.pt", "--use", "ema"])
    assert args.use == "ema"
    code, _, err = run_main(inference.main, ["--checkpoint", tmp_path / "best.pt", "--weights", "ema"], capsys)
    assert one_line_error(code, err) == ("error: inference.py --weights is now --use (--use ema): --weights names "
                                         "the pretrained weights of train.py")
    with pytest.raises(SystemExit):
        inference.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--use {best,ema,raw}" in text and "--weights" not in text
    assert re.search(r"--device \{auto,cpu,cuda\} where to predict: auto = cuda when available", text)


def test_train_help_shows_no_empty_default_and_no_raw_float():
    text = help_of(train.build_parser())
    assert "(default: )" not in text and "100000000.0" not in text
    assert "rule is 100M) (default: 1e+08)" in text and "(default: 0.4 0.3 0.2)" in text
    assert "--run-name RUN_NAME run folder name under --output-dir (default: <arch>-<date>-<time>) --workers" in text


def test_epoch_counted_flags_say_one_convention():
    actions = {a.dest: a for a in train.build_parser()._actions}
    for name in EPOCH_COUNTED:
        default_example = re.search(r"counted from 0 \((\d+) = the console's epoch (\d+)", actions[name].help)
        assert default_example, name
        assert int(default_example[2]) == int(default_example[1]) + 1, name
    # the console counts from 1: epoch index 0 is printed as "epoch 1/N"; the schedules take the index
    from finetune import backbone_frozen
    from losses import loss_phase
    cfg = Config(freeze_epochs=2, focal_start=14, focal_full=17)
    assert [backbone_frozen(cfg, e) for e in (1, 2)] == [True, False]  # console epochs 2 and 3
    assert loss_phase(cfg, 13)[0] == "ce" and loss_phase(cfg, 14)[0] != "ce"


def test_report_py_help_says_what_it_is(capsys):
    proc = call_script("report.py", "--help")
    assert "model report" in proc.stdout and "inference.py --checkpoint" in proc.stdout and "--report" in proc.stdout
    message = one_line_error(*run_main(report.main, [], capsys)[::2])
    assert "report.py has no command of its own" in message and "inference.py" in message


def test_readme_quick_start_says_it_trains_from_scratch():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    quick_start = " ".join(text[:text.index("Flat scripts")].split())
    assert "--weights none" in quick_start and "from scratch" in quick_start
    assert "the real job fine-tunes ImageNet-pretrained weights" in quick_start
