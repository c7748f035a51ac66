"""The README cannot drift from the code: its flag table is generated, its quick-start commands stay runnable."""
import argparse
import contextlib
import importlib.util
import io
import os
import re
import shutil
import sys
import types

from conftest import ROOT

README = os.path.join(ROOT, "README.md")
FLAG_TABLE = os.path.join(ROOT, "scripts", "flag_table.py")


def load_flag_table():
    # scripts/ is a folder of scripts, not a package: load the file itself
    spec = importlib.util.spec_from_file_location("flag_table", FLAG_TABLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_readme(path, mode="--check"):
    """scripts/flag_table.py --check (or --write) PATH, in this process: (returncode, stderr) as its command line
    gives them (sys.exit with a message: code 1, the message on stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = load_flag_table().main([mode, str(path)])
        except SystemExit as stop:
            code = 1 if isinstance(stop.code, str) else stop.code
            print(stop.code if isinstance(stop.code, str) else "", file=sys.stderr)
    return types.SimpleNamespace(returncode=code, stderr=err.getvalue())


def bash_blocks(text):
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_flag_table_is_current():
    proc = check_readme(README)
    assert proc.returncode == 0, proc.stderr


def test_flag_table_names_every_train_flag():
    import train
    parser = train.build_parser()
    table = load_flag_table().flag_table(parser)
    # --help is argparse's own; every other flag, a new Config field's included, must have its row
    flags = [s for a in parser._actions if not isinstance(a, argparse._HelpAction) for s in a.option_strings]
    assert len(flags) > 70
    missing = [s for s in flags if not re.search(rf"[`/]{re.escape(s)}[ `/]", table)]
    assert not missing


def test_arch_help_names_every_arch():
    # the --arch help lists the archs by hand (config.py cannot import torch), so it is held to model.ARCHS here
    import train
    from model import ARCHS
    arch = next(a for a in train.build_parser()._actions if a.dest == "arch")
    assert [name for name in ARCHS if name not in arch.help] == []


def test_check_fails_on_an_edited_default(tmp_path):
    text = open(README, encoding="utf-8").read()
    edited = text.replace("| `--epochs` | `100` |", "| `--epochs` | `90` |")
    assert edited != text
    copy = tmp_path / "README.md"
    copy.write_text(edited, encoding="utf-8")
    proc = check_readme(copy)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"README.md's flag table differs from train.py --help: "
                                   f"run python scripts/flag_table.py --write {copy}")
    # and --write repairs it
    assert check_readme(copy, "--write").returncode == 0
    assert copy.read_text(encoding="utf-8") == text


def test_check_fails_without_markers(tmp_path):
    copy = tmp_path / "README.md"
    shutil.copy(README, copy)
    copy.write_text(copy.read_text(encoding="utf-8").replace("<!-- flags:start -->", ""), encoding="utf-8")
    proc = check_readme(copy)
    assert proc.returncode == 1 and "flags:start" in proc.stderr


def test_quick_start_blocks():
    blocks = bash_blocks(open(README, encoding="utf-8").read())
    # the first block is one copy-paste: joining its backslash-continued lines gives back one command line
    first = blocks[0].replace("\\\n", " ").strip()
    assert "\n" not in first
    assert "pip install -r requirements.txt" in first and "python inference.py" in first
    # CI reads the second block verbatim
    assert blocks[1] == "python -m pytest -q tests\n"
