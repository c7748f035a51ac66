import contextlib
import io
import os
import shutil
import subprocess
import sys
import time
import types

import pytest

# Under pytest-xdist (pytest.ini starts one worker per core) each worker's torch, and every script it starts, gets
# its share of the cores: two workers with a thread per core each would fight over the same cores and run slower
# than one. Set before any test module imports torch.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1)
                                                    // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "data", "sample")
sys.path.insert(0, ROOT)

# wall-clock measurements: the only history.csv columns that may differ between two runs of one command
TIMING_COLUMNS = ["images_per_s", "epoch_seconds"]

# the smallest setting that still trains a real torchvision ResNet on real images
TINY = ["--arch", "resnet18", "--weights", "none", "--img-size", "32", "--batch-size", "32", "--workers", "0",
        "--lr", "1e-3"]
# lighter still, where neither the arch nor the head is what a test checks: timm's 0.4M-parameter test ResNet with a
# linear head trains several times faster than a ResNet-18 and writes checkpoints of 6 MB instead of 250 MB
LIGHT = ["--arch", "test_resnet", "--weights", "none", "--img-size", "32", "--batch-size", "32", "--workers", "0",
         "--lr", "1e-3", "--head", "linear"]


# torchrun on a free rendezvous port of its own (--standalone): two test workers may start one at the same time
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run_script(script, *args, check=True, cwd=ROOT, env=None):
    """Run one of the repository's scripts as a user would; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=full_env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def call_script(script, *args, check=True):
    """Run one of the repository's scripts in this process, through the same wrapper as its command line (no
    second start-up of torch): where the process itself is not what a test checks. Returns what run_script does:
    an object with returncode, stdout and stderr."""
    import importlib
    from errors import run_cli
    module = importlib.import_module(os.path.splitext(os.path.basename(script))[0])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_cli(lambda: module.main([str(a) for a in args]))
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    proc = types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{script} failed ({code}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def copy_sample(root, classes, train, val, test):
    """The first `train` / `val` images of each of the sample's `classes` and its first `test` test images, copied
    under root in the homework layout: a small real data set for fast runs."""
    for split, n in [("train", train), ("val", val)]:
        for c in classes:
            os.makedirs(root / split / c)
            for name in sorted(os.listdir(os.path.join(SAMPLE, split, c)))[:n]:
                shutil.copy(os.path.join(SAMPLE, split, c, name), root / split / c / name)
    os.makedirs(root / "test")
    for name in sorted(os.listdir(os.path.join(SAMPLE, "test")))[:test]:
        shutil.copy(os.path.join(SAMPLE, "test", name), root / "test" / name)
    return root


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One tiny 2-epoch run on the sample data, shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("runs")
    proc = call_script("train.py", "--data-dir", SAMPLE, "--output-dir", out, "--run-name", "tiny", "--epochs", 2,
                      *TINY)
    return out / "tiny", proc


def run_main(main, argv, capsys):
    """Call a script's main() in this process through the same wrapper as the command line.

    Returns (exit code, stdout, stderr); quicker than a subprocess for the many error-path tests.
    """
    from errors import run_cli
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: main([str(a) for a in argv]))
    out = capsys.readouterr()
    return stop.value.code, out.out, out.err




def wait_for(path, proc, timeout=600):
    """Wait until a running script has written `path` (it must not exit first)."""
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def error_line(code, err):
    """The one-line error of a user mistake (progress bars may come before it on stderr)."""
    assert code == 2, err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.strip()][-1]


def one_line_error(code, stderr):
    """The user mistake's error: exit code 2 and exactly one line on stderr, no traceback."""
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1, stderr
    return lines[0]
