"""tune.py: a real Optuna study of tiny train.py runs on a few sample images (SQLite storage), resumed, shared by
two processes at once, pruned, its winner trained by train.py; and its one-line errors."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import optuna
import pandas as pd
import pytest

import search_budget
import search_cv
import search_selection
import search_space
import train
import trials
import tune
from history import epoch_acc, read_history
from conftest import ROOT, call_script, copy_sample, one_line_error, run_main, wait_for

FIXED = ["--", "--arch", "test_resnet", "--weights", "none", "--img-size", "32", "--batch-size", "32", "--workers", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return copy_sample(tmp_path_factory.mktemp("tune") / "data", ["0", "1", "2"], train=6, val=4, test=1)


def tune_args(data, out, *more):
    return ["--data-dir", data, "--output-dir", out, "--epochs-per-trial", 1, *more, *FIXED]


def search_trials(study_dir, name="tune", storage=""):
    study = optuna.load_study(study_name=name, storage=storage or f"sqlite:///{study_dir / 'study.db'}")
    return [t for t in study.get_trials() if t.user_attrs.get("role") == "search"]


def postgres_program(name):
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    assert found, f"{name} not found: the PostgreSQL test needs Debian's postgresql (apt-get install postgresql)"
    return found


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server listening on a Unix socket in a folder of its own (no port to collide), run as
    the postgres user when the tests run as root (the server refuses to run as root); stopped and deleted after."""
    home = tempfile.mkdtemp(prefix="tune-pg-")
    owner = []
    if os.geteuid() == 0:
        shutil.chown(home, "postgres", "postgres")
        owner = ["runuser", "-u", "postgres", "--"]
    data = os.path.join(home, "data")
    subprocess.run([*owner, postgres_program("initdb"), "-D", data, "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)
    pg_ctl = [*owner, postgres_program("pg_ctl"), "-D", data]
    subprocess.run([*pg_ctl, "-l", os.path.join(home, "server.log"), "-w", "-o",
                    f"-c listen_addresses='' -k {home}", "start"], check=True, capture_output=True)
    yield f"postgresql://postgres@/postgres?host={home}"
    subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(home, ignore_errors=True)


def test_study_resumes_and_its_winner_trains(data, tmp_path):
    out = tmp_path / "studies"
    proc = call_script("tune.py", *tune_args(data, out, "--trials", 2, "--confirm-top", 1, "--confirm-seeds", 1))
    study_dir = out / "tune"
    lines = proc.stdout.splitlines()
    assert [line.split(" |")[0] for line in lines if " epochs | " in line][:2] == ["trial 0", "trial 1"]
    assert any(line.startswith("confirm ") and "seed 43 |" in line and "| complete |" in line for line in lines)
    assert "train the final model with: python train.py --config" in proc.stdout
    for name in ("best_config.json", "report.md", "history.png", "curves.png", "trials.csv", "ranking.csv",
                 "study.db"):
        assert (study_dir / name).is_file(), name
    assert len(list((study_dir / "trials").glob("*/history.csv"))) == 3  # kept: their .pt files are deleted
    assert not list((study_dir / "trials").glob("*/*.pt"))
    report = (study_dir / "report.md").read_text()
    assert "## Winner" in report and "standard error" in report and "best_config.json" in report
    first = {t.number: t.value for t in search_trials(study_dir)}
    assert sorted(first) == [0, 1] and all(0 <= v <= 1 for v in first.values())
    # the val set's size, for the SE: from history.csv's val_images, not from a console line
    assert all(t.user_attrs["n_val"] == 12 for t in search_trials(study_dir))
    assert set(pd.read_csv(study_dir / "trials" / "0000" / "history.csv")["val_images"]) == {12}
    # a new study tries train.py's defaults first, then the plain recipe; from scratch (--weights none) the seed
    # space draws from-scratch learning rates, so the plain recipe's 1e-3 lies inside it and train.py's 5e-5 does not
    trial0, trial1 = search_trials(study_dir)
    assert "space seed from scratch (--weights none): lr drawn from 0.0003 to 0.003, not the fine-tuning range" \
        in proc.stdout
    low, high = search_space.SCRATCH_LR["log"]
    assert low <= trial0.params.pop("lr") <= high and trial1.params["lr"] == 1e-3
    assert trial0.params == dict(weight_decay=0.01, augment="seed", rrc_scale_low=0.08, label_smoothing=0.05,
                                 loss="schedule", head="mlp", ema=True, mixup=0.0, cutmix=0.0)
    assert {k: trial1.params[k] for k in ("augment", "head", "loss", "ema")} == dict(augment="light", head="linear",
                                                                                     loss="ce", ema=False)

    proc = call_script("tune.py", *tune_args(data, out, "--trials", 1, "--confirm-seeds", 0))
    assert "3 trials so far" in proc.stdout  # two search trials and one confirmation run
    again = search_trials(study_dir)
    assert len(again) == 3 and {t.number: t.value for t in again if t.number in first} == first

    best = json.loads((study_dir / "best_config.json").read_text())
    assert best["epochs"] == 100 and "run_name" not in best and best["arch"] == "test_resnet"
    call_script("train.py", "--config", study_dir / "best_config.json", "--epochs", 1, "--output-dir", tmp_path,
               "--run-name", "final")
    saved = json.loads((tmp_path / "final" / "config.json").read_text())
    assert (tmp_path / "final" / "best.pt").is_file()
    assert {k: saved[k] for k in best if k != "epochs"} == {k: v for k, v in best.items() if k != "epochs"}


@pytest.mark.parametrize("server", ["sqlite", "postgresql"])
def test_two_processes_share_one_study(server, data, tmp_path, request):
    """Two processes join one study at the same moment: SQLite in the study folder, and the many-machine setup the
    README documents, a PostgreSQL server (--storage postgresql://...)."""
    storage = request.getfixturevalue("postgres_url") if server == "postgresql" else ""
    command = [sys.executable, os.path.join(ROOT, "tune.py"), *(["--storage", storage] if storage else []),
               *map(str, tune_args(data, tmp_path, "--trials", 1, "--confirm-seeds", 0))]
    procs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    found = search_trials(tmp_path / "tune", storage=storage)
    assert sorted(t.number for t in found) == [0, 1]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in found)
    # the known first recipes were queued once and each process ran one of them
    assert found[0].params != found[1].params
    assert (not storage) == (tmp_path / "tune" / "study.db").is_file()


def test_processes_starting_one_study_queue_its_first_recipes_once_and_draw_apart(data, tmp_path):
    """The interleaving the two-process test meets only by chance: both processes open the new study before either
    queues. Exactly one of them is its creator, the one that tune.main lets queue the first recipes; the seed is the
    same in both, yet their drawn trials differ, each seeded by its own trial number, and a new study with that seed
    draws the same settings again."""
    args, _ = tune.parse_args(["--data-dir", str(data), "--output-dir", str(tmp_path), "--space", "wide",
                               "--trials", "2"])
    tune.check_args(args)
    space = search_space.load_space(args.space)

    def draws(folder, processes):
        os.makedirs(folder)
        opened = [tune.open_study(args, str(folder)) for _ in range(processes)]
        assert [created for _, _, created in opened] == [True] + [False] * (processes - 1)
        settings = []
        for study, _, _ in opened:
            trial = study.ask()
            tune.seed_sampler(study, trial, args.seed)
            settings.append(search_space.suggest(trial, space))
        return settings

    first, second = draws(tmp_path / "shared", 2)
    assert first != second
    assert draws(tmp_path / "again", 1) == [first]


def test_a_pruned_trial_is_stopped_by_sigterm(data, tmp_path):
    """--prune-below 1.01 prunes every trial after its first epoch: train.py must get SIGTERM, save last.pt and
    stop long before its 30 epochs; with no complete trial there is no winner, said in one line."""
    code = call_script("tune.py", *tune_args(data, tmp_path, "--trials", 1, "--prune-below", 1.01, "--prune-warmup",
                                            1, "--confirm-seeds", 0, "--keep-checkpoints")[:-len(FIXED)],
                      "--epochs-per-trial", 30, *FIXED, check=False)
    assert code.returncode == 2, code.stdout + code.stderr
    assert "no trial of study tune finished all its epochs" in code.stderr
    line = next(line for line in code.stdout.splitlines() if line.startswith("trial 0 |"))
    assert "| pruned |" in line
    (trial,) = search_trials(tmp_path / "tune")
    assert trial.state == optuna.trial.TrialState.PRUNED and 1 <= trial.user_attrs["epochs"] < 30
    run_dir = tmp_path / "tune" / "trials" / "0000"
    assert (run_dir / "last.pt").is_file()
    assert "SIGTERM: stopped at epoch" in (tmp_path / "tune" / "trials" / "0000.log").read_text()


def test_trials_with_val_every_report_their_validated_epochs(data, tmp_path):
    """-- --val-every 2 reaches every trial: the pruner sees epochs 2, 4, ... only, so the trial is pruned at
    epoch 2, the first that has a val accuracy."""
    code = call_script("tune.py", *tune_args(data, tmp_path, "--trials", 1, "--prune-below", 1.01, "--prune-warmup",
                                            1, "--confirm-seeds", 0)[:-len(FIXED)],
                      "--epochs-per-trial", 30, *FIXED, "--val-every", 2, check=False)
    assert code.returncode == 2, code.stdout + code.stderr
    (trial,) = search_trials(tmp_path / "tune")
    assert trial.state == optuna.trial.TrialState.PRUNED and list(trial.intermediate_values) == [2]
    history = pd.read_csv(tmp_path / "tune" / "trials" / "0000" / "history.csv")
    assert list(history["val_acc"].notna())[:2] == [False, True]
    assert trial.intermediate_values[2] == max(history["val_acc"][1], history["val_acc_ema"][1])
    assert trial.user_attrs["epochs"] == len(history)


def ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a shell gives a command it starts in the background


@pytest.mark.parametrize("start", ["foreground", "background"])
def test_ctrl_c_stops_the_trial_and_keeps_the_study(start, data, tmp_path):
    command = [sys.executable, os.path.join(ROOT, "tune.py"),
               *map(str, tune_args(data, tmp_path, "--trials", 1, "--epochs-per-trial", 30)[:-len(FIXED)]), *FIXED]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ignore_sigint if start == "background" else None)
    wait_for(tmp_path / "tune" / "trials" / "0000" / "history.csv", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130
    assert one_line_error(2, err).startswith("interrupted: the running trial was stopped")
    assert "SIGTERM: stopped at epoch" in (tmp_path / "tune" / "trials" / "0000.log").read_text()
    trial, plain = optuna.load_study(study_name="tune", storage=f"sqlite:///{tmp_path / 'tune' / 'study.db'}").trials
    assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["error"] == "interrupted (Ctrl-C)"
    assert plain.state == optuna.trial.TrialState.WAITING  # the plain recipe: the resumed study runs it next


def write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("argv, expected", [
    (["--data-dir", "nowhere", "--trials", "1"], "--data-dir nowhere: no train/ folder"),
    (["--budget", "soon"], "--budget 'soon': give a duration"),
    ([], "give --budget (e.g. 30m), --trials N"),
    (["--trials", "1", "--space", "narrow"], "--space narrow: give seed, wide, or a .json/.yaml file"),
    (["--trials", "1", "--space", "missing.yaml"], "--space missing.yaml: no such file"),
    (["--trials", "1", "--storage", "nosuchdb://x"], "--storage nosuchdb://x: cannot open it"),
    (["--trials", "1", "--", "--epochs", "3"], "--epochs: tune.py sets this for every trial"),
    (["--trials", "1", "--", "--lr", "0.1"], "--lr: the search space varies this setting"),
    (["--trials", "1", "--", "--pati", "3"], "--patience: not in a search"),  # abbreviated, as argparse takes it
    (["--trials", "1", "--", "--config", "{config}"], "--lr (from the --config file): the search space varies"),
    (["--trials", "1", "--train-final", "--search-share", "1"], "--search-share 1 must lie in (0, 1)"),
])
def test_one_line_errors(argv, expected, data, capsys, tmp_path):
    config = write(tmp_path / "base.json", '{"lr": 0.001, "epochs": 30}')  # a file's epochs: tune.py's win
    argv = [a.format(config=config) for a in argv]
    code, _, err = run_main(tune.main, ["--data-dir", data, "--output-dir", tmp_path, *argv], capsys)
    assert one_line_error(code, err).startswith("error: " + expected)


@pytest.mark.parametrize("text, expected", [
    ("lr: {log: [0, 1]}", "lr: need low < high and low > 0 on a log scale"),
    ("lr: {between: [1, 2]}", "lr: write {log: [low, high]}"),
    ("epochs: [1, 2]", "epochs is not a setting a search can vary"),
    ("colour: [red]", "colour is not a setting a search can vary"),
    ("loss: [ce, hinge]", "loss must be one of ce, focal, smooth-focal, schedule (it is 'hinge')"),
    ("ema: [yes-please]", "ema must be true or false"),
    ("augment: [heavy]", "augment must be one of seed, light"),
    ("mixup: []", "mixup has an empty list of choices"),
    ("warmup_epochs: {int: [0, 2]}\nfocal_start: {range: [1, 5]}", "focal_start is a whole number"),
    ("[1, 2]", "expected settings as key: value pairs"),
])
def test_space_file_errors(text, expected, data, capsys, tmp_path):
    space = write(tmp_path / "space.yaml", text)
    code, _, err = run_main(tune.main, ["--data-dir", data, "--trials", 1, "--space", space], capsys)
    assert expected in one_line_error(code, err)


def test_the_plan_counts_a_full_trial_from_complete_ones():
    """A pruned trial's seconds, scaled up per epoch, stand in only until a trial completes: its start-up counted
    once per epoch would reserve several times the confirmation's real length and end the search early."""
    search = trials.Search(args=type("Args", (), {"epochs_per_trial": 10, "cv": 0})(), train_args=[], space={}, cfg=None,
                         study_dir="", deadline=None)
    search_budget.update_trial_seconds(search, trials.Outcome("pruned", 0.1, 1, 12.0, 300))
    assert search.trial_seconds == 120 and not search.measured  # nothing better known yet
    search_budget.update_trial_seconds(search, trials.Outcome("complete", 0.8, 10, 37.0, 300))
    assert search.trial_seconds == 37 and search.measured
    search_budget.update_trial_seconds(search, trials.Outcome("pruned", 0.1, 1, 14.0, 300))  # would scale to 140 s
    search_budget.update_trial_seconds(search, trials.Outcome("complete", 0.9, 10, 45.0, 300))
    assert search.trial_seconds == 45  # the longest complete trial


@pytest.mark.parametrize("more, warmup", [([], 1), (["--epochs-per-trial", "10"], 3),
                                          (["--epochs-per-trial", "10", "--prune-warmup", "0"], 0)])
def test_prune_warmup_defaults_to_a_third_of_a_trial(data, more, warmup):
    args, _ = tune.parse_args(["--data-dir", str(data), "--trials", "1", *more])
    tune.check_args(args)
    assert args.prune_warmup == warmup


def first_points(*argv):
    args, train_args = tune.parse_args(["--data-dir", str(ROOT), "--trials", "1", *argv])
    space = search_space.load_space(args.space)
    search = trials.Search(args=args, train_args=train_args, space=space,
                         cfg=tune.fixed_config(args, train_args, space), study_dir="", deadline=None)
    return tune.first_points(search)


def test_first_trials_are_the_known_recipes_inside_the_space(data, capsys):
    defaults, plain, no_flip = first_points("--space", "wide")
    assert defaults["lr"] == 5e-5 and defaults["augment"] == "seed" and defaults["rrc_scale_low"] == 0.08
    assert defaults["hflip"] == 0.5 and defaults["loss"] == "schedule" and defaults["ema"] is True
    assert plain == search_space.PLAIN  # every plain setting lies inside the wide space
    assert no_flip == {**search_space.PLAIN, "hflip": 0.0}
    seed_space = first_points("--space", "seed")  # no hflip there: the mirror-free plain recipe is the plain one
    assert len(seed_space) == 2 and "lr" not in seed_space[1] and first_points("--first-trials", "none") == []
    (only,) = first_points("--first-trials", "plain", "--space", "wide")
    assert only == search_space.PLAIN
    code, _, err = run_main(tune.main, ["--data-dir", data, "--trials", "1", "--first-trials", "none", "plain"], capsys)
    assert one_line_error(code, err).startswith("error: --first-trials none: give it alone")


def test_the_confirmation_keeps_back_the_top_configurations_own_times():
    """A slow trial outside the top must not shrink the search: the reserve is the top trials' seconds per seed."""
    study = optuna.create_study(direction="maximize")
    for value, seconds in [(0.9, 40.0), (0.5, 200.0), (0.8, 50.0)]:
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs={"role": "search", "seconds": seconds}))
    args = type("Args", (), {"confirm_top": 2, "confirm_seeds": 2})()
    search = trials.Search(args=args, train_args=[], space={}, cfg=None, study_dir="", deadline=None,
                         trial_seconds=200.0, measured=True)
    assert search_budget.confirm_reserve(search, study) == 2 * (40 + 50)
    args.confirm_top = 4  # more places than complete trials: the longest trial stands in for the missing one
    assert search_budget.confirm_reserve(search, study) == 2 * (40 + 50 + 200 + 200)


def study_with(*trials):
    """An in-memory study of (role, value, extra user attrs) trials, numbered in order."""
    study = optuna.create_study(direction="maximize")
    for role, value, extra in trials:
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs={"role": role, "n_val": 300,
                                                                           "settings": {}, **extra}))
    return study


def test_an_unconfirmed_configuration_is_ranked_after_the_confirmed_ones():
    # trial 0 scored 0.90, then 0.86 and 0.87 on its confirmation seeds; trial 1 scored 0.89 once (its confirmation
    # cut by the budget): 0.89 is a selected maximum, not comparable with trial 0's mean of 0.877
    study = study_with(("search", 0.90, {}), ("search", 0.89, {}), ("confirm", 0.86, {"source": 0, "seed": 43}),
                       ("confirm", 0.87, {"source": 0, "seed": 44}))
    args = type("Args", (), {"confirm_top": 3, "confirm_seeds": 2})()
    ranked = search_selection.ranking(study, args)
    assert [(r["trial"], r["seeds"]) for r in ranked] == [(0, 3), (1, 1)]
    assert ranked[0]["mean"] == pytest.approx(0.8767, abs=1e-4)
    note = search_selection.noise_note(ranked)
    assert note.startswith("trial 0 (3 seeds) leads trial 1 (1 seed) by -1.33 points of mean val accuracy")
    assert "(no seed spread: trial 1 has one seed)" in note
    assert search_selection.fewer_seeds_note(ranked).startswith("ranked after the configurations with 3 seeds: trial 1 (1 seed, "
                                                    "mean 0.8900)")

    # another machine adds three higher single values to the shared study: the confirmed trial 0 stays in the
    # comparison (it is no longer among the top three by single value) and still wins
    for value in (0.95, 0.94, 0.93):
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs={"role": "search", "n_val": 300,
                                                                           "settings": {}}))
    ranked = search_selection.ranking(study, args)
    assert ranked[0]["trial"] == 0 and sorted(r["trial"] for r in ranked[1:]) == [4, 5, 6]


def search_of(data, tmp_path, *argv):
    args, train_args = tune.parse_args(["--data-dir", str(data), "--output-dir", str(tmp_path), "--trials", "1",
                                        *map(str, argv)])
    tune.check_args(args)
    space = search_space.load_space(args.space)
    tune.check_train_args(train_args, space)
    return trials.Search(args=args, train_args=train_args, space=space, cfg=tune.fixed_config(args, train_args, space),
                       study_dir=str(tmp_path), deadline=None)


def test_epoch_counted_settings_take_the_same_share_of_a_trial(data, tmp_path, capsys):
    space = write(tmp_path / "space.yaml", "loss: [schedule]\nfocal_start: {int: [20, 40]}\nfocal_full: {int: [50, 60]}")
    search = search_of(data, tmp_path, "--space", space, "--epochs-per-trial", 10, "--", "--warmup-epochs", 10,
                       "--ema-start-epoch", 50, "--mixup", 0.2, "--mix-off-epoch", 3, "--t-max", 50)
    params = {"loss": "schedule", "focal_start": 40, "focal_full": 60}
    command = trials.trial_command(search, params, "0000", 42, 0)
    cfg, _, _ = train.parse_args(command[2:])
    # drawn and shared alike: a tenth of the final 100 epochs (whole numbers rounded, mixing off from epoch 1)
    assert (cfg.focal_start, cfg.focal_full, cfg.ema_start_epoch, cfg.mix_off_epoch) == (4, 6, 5, 1)
    assert (cfg.warmup_epochs, cfg.t_max, cfg.epochs) == (1.0, 5.0, 10)
    assert trials.epoch_plan(search).endswith("take the same share of each 10-epoch trial: --warmup-epochs 10 -> 1, "
                                            "--t-max 50 -> 5, --ema-start-epoch 50 -> 5, --mix-off-epoch 3 -> 1, "
                                            "focal_start, focal_full as drawn")
    # best_config.json holds the values for the final run: what the trial trained with, at full length
    best = json.loads(open(tune.write_best_config(search, params)).read())
    assert (best["focal_start"], best["focal_full"], best["warmup_epochs"], best["ema_start_epoch"]) == (40, 60, 10, 50)
    assert best["epochs"] == 100

    # a space whose focal_start could be drawn after focal_full is refused before any trial
    bad = write(tmp_path / "bad.yaml", "focal_start: {int: [10, 40]}")
    code, _, err = run_main(tune.main, ["--data-dir", data, "--trials", 1, "--space", bad], capsys)
    assert "focal_start can be drawn up to 40, after focal_full 17" in one_line_error(code, err)
    # and a shared flag that makes trials of different lengths
    code, _, err = run_main(tune.main, ["--data-dir", data, "--trials", 1, "--", "--patience", 3], capsys)
    assert "--patience: not in a search: it ends trials at different epochs" in one_line_error(code, err)


def test_the_first_trial_leaves_the_confirmation_its_share(data, tmp_path):
    search = search_of(data, tmp_path, "--confirm-top", 3, "--confirm-seeds", 2)
    search.deadline = time.monotonic() + 700
    assert search_budget.trial_time_limit(search) == pytest.approx(100, abs=1)  # 700 s for it and 6 runs as long
    search.trial_seconds, search.reserve = 50.0, 300.0  # measured: the search's own share
    assert search_budget.trial_time_limit(search) == pytest.approx(400, abs=1)


def test_a_study_refuses_a_command_that_would_not_compare(data, tmp_path, capsys):
    args, train_args = tune.parse_args(["--data-dir", str(data), "--output-dir", str(tmp_path), "--trials", "1",
                                        "--epochs-per-trial", "3", "--", "--img-size", "32"])
    tune.check_args(args)
    space = search_space.load_space(args.space)
    cfg = tune.fixed_config(args, train_args, space)
    os.makedirs(tmp_path / "tune")
    study, _, _ = tune.open_study(args, str(tmp_path / "tune"))
    tune.check_setup(study, args, cfg, space)  # what the first process records
    tune.check_setup(study, args, cfg, space)  # the same command again: fine
    common = ["--data-dir", data, "--output-dir", tmp_path, "--trials", 1]
    same_size = write(tmp_path / "size.json", '{"img_size": 32}')
    for argv, expected in [
        (["--epochs-per-trial", 5, "--", "--img-size", 32], "was started with --epochs-per-trial 3, this command "
                                                          "gives --epochs-per-trial 5"),
        (["--epochs-per-trial", 3, "--", "--img-size", 64], "the shared train.py settings img_size 32, this "
                                                          "command's img_size 64"),
        (["--epochs-per-trial", 3, "--space", "wide", "--", "--img-size", 32], "the space's lr {\"log\": [2e-05, "
                                                                              "0.0002]}"),
    ]:
        code, _, err = run_main(tune.main, [*common, *argv], capsys)
        assert expected in one_line_error(code, err), err
    assert not (tmp_path / "tune" / "trials").exists()
    # the settings as train.py reads them: the same size from a --config file is the same study
    assert tune.check_setup(study, args, tune.fixed_config(args, ["--config", str(same_size)], space), space) is None


def test_a_confirmation_run_another_process_holds_is_waited_for_then_run(data, tmp_path, capsys, monkeypatch):
    """Two processes of one study reach the confirmation together: each run is claimed, never trained twice at
    once in one folder; one claimed by a process that ends without a result is run after all."""
    search = search_of(data, tmp_path, "--confirm-top", 1, "--confirm-seeds", 1)
    study = study_with(("search", 0.8, {}))
    lock = tmp_path / "locks" / "0000-seed43.lock"
    os.makedirs(lock.parent)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(2)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    trained = []
    monkeypatch.setattr(search_cv, "run_training", lambda search, command, run_dir, trial=None: trained.append(run_dir)
                        or trials.Outcome("complete", 0.7, 1, 1.0, 12))
    search_selection.confirm(search, study)
    out = capsys.readouterr().out
    assert "confirm 0 seed 43: another process is running it; waiting for it at the end" in out
    assert holder.wait() == 0 and trained == [str(tmp_path / "trials" / "0000-seed43")]
    assert search_selection.confirmations(study, 0) == {43: 0.7}
    search_selection.confirm(search, study)  # done: nothing runs again
    assert len(trained) == 1


def test_train_final_trains_the_winner_in_what_is_left_and_writes_the_prediction(data, tmp_path):
    # one command from a folder to a hand-in: half the budget searches, the winner trains in the rest (here capped
    # at 2 epochs by --final-epochs), then predicts the test folder
    out = tmp_path / "studies"
    proc = call_script("tune.py", *tune_args(data, out, "--budget", "10m", "--trials", 1, "--confirm-seeds", 0,
                                             "--first-trials", "defaults", "--train-final", "--final-epochs", 2))
    study_dir = out / "tune"
    assert "final run: python train.py --config" in proc.stdout and "--budget " in proc.stdout
    # 12 val images: the plan says how far apart two recipes must be for the search to tell them apart
    assert "note: the recipes are scored by val accuracy on 12 images: two recipes' scores differ by up to 29.2 " \
           "points" in proc.stdout and "--cv 5 scores each recipe on all of train/ + val/" in proc.stdout
    history = pd.read_csv(study_dir / "final" / "history.csv")
    assert list(history["epoch"]) == [1, 2]  # --final-epochs is the cap of the planned run
    prediction = pd.read_csv(study_dir / "prediction.csv")
    assert len(prediction) == len(os.listdir(data / "test")) and list(prediction.columns) == ["image_name",
                                                                                             "pred_label"]
    report = (study_dir / "report.md").read_text()
    assert "## Final run" in report and str(study_dir / "prediction.csv") in report and "TTA (flip)" in report


def test_cv_scores_each_recipe_by_out_of_fold_accuracy_on_one_split(data, tmp_path, capsys):
    """--cv 2: each recipe is two fold runs over train/ + val/ (30 images), the search trial and its confirmation
    seed on the study's one split; the value is the folds' best val accuracies weighted by their images."""
    out = tmp_path / "studies"
    proc = call_script("tune.py", *tune_args(data, out, "--cv", 2, "--trials", 1, "--first-trials", "plain",
                                             "--confirm-top", 1, "--confirm-seeds", 1))
    study_dir = out / "tune"
    assert "note: the recipes are scored by out-of-fold accuracy over 30 images (--cv 2)" in proc.stdout
    assert "| 2/2 epochs | complete |" in proc.stdout  # one epoch in each of the two folds
    split = pd.read_csv(study_dir / "folds.csv")
    assert len(split) == 30 and sorted(split["fold"].value_counts()) == [15, 15]
    for run in ("0000", "0000-seed43"):  # another seed, the same held-out images
        assert pd.read_csv(study_dir / "trials" / run / "fold1" / "folds.csv").equals(split)
    (trial,) = search_trials(study_dir)
    folds = [read_history(study_dir / "trials" / "0000" / f"fold{i}" / "history.csv")[-1] for i in (0, 1)]
    assert [int(float(row["val_images"])) for row in folds] == [15, 15] and trial.user_attrs["n_val"] == 30
    assert trial.value == pytest.approx(sum(epoch_acc(row) for row in folds) / 2)
    for argv, expected in [(["--cv", "1"], "--cv 1: give K >= 2 folds"),
                           (["--cv", "2", "--", "--folds", "3"], "--folds: --cv 2 chooses the validation images"),
                           (["--cv", "11"], "--cv 11: 3 class(es) have fewer images than folds in train/ + val/: "
                                            "0 (10), 1 (10), 2 (10); give fewer folds")]:
        code, _, err = run_main(tune.main, ["--data-dir", data, "--trials", "1", "--output-dir", tmp_path, *argv],
                                capsys)
        assert expected in one_line_error(code, err), err

