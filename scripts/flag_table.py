"""The README's "train.py flags" table, generated from train.py's own parser.

    python scripts/flag_table.py                     # print the table
    python scripts/flag_table.py --write README.md   # put it between the README's flag markers
    python scripts/flag_table.py --check README.md   # exit 1 when the README's table differs (the tests run this)

The parser is the single source: every Config field becomes a flag there (config.add_config_args) and train.py adds
its own few, so reading the parser's argument groups copies nothing by hand.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import default_suffix, shown_value  # noqa: E402 (after the path insert above)

START, END = "<!-- flags:start -->", "<!-- flags:end -->"


def cell(text):
    """Markdown-safe table cell: | would split the cell, <run> would vanish as an HTML tag, * could start emphasis."""
    for char, escaped in (("|", "\\|"), ("<", "&lt;"), (">", "&gt;"), ("*", "\\*")):
        text = text.replace(char, escaped)
    return text


def default_cell(action):
    # an empty default ("", None or []) means "not set": a dash reads better than an empty pair of quotes
    if action.default in ("", None, []):
        return "—"
    # on/off are words, not values to type: the flag cell already shows --x/--no-x
    if isinstance(action.default, bool):
        return shown_value(action.default)
    return f"`{shown_value(action.default)}`"


def flag_cell(action):
    """`--name`, with the values it takes: `--ema/--no-ema`, `--loss ce|focal`, `--rrc-scale N N`, `--resume PATH`."""
    text = "/".join(action.option_strings)
    if action.choices:
        text += " " + "|".join(action.choices)
    elif isinstance(action.nargs, int) and action.nargs and action.metavar:
        text += " " + " ".join([action.metavar] * action.nargs)
    elif action.nargs == "+" and action.metavar:
        text += f" {action.metavar} [{action.metavar} ...]"
    elif action.metavar and action.nargs != 0:
        text += " " + action.metavar
    return "`" + text.replace("|", "\\|") + "`"


def help_cell(action):
    """The --help text without its "(default: ...)" tail (config.default_suffix), which has its own column here."""
    text = action.help.removesuffix(default_suffix(action.default))
    # expand any other %(...)s (and %%) the way argparse does for --help
    text = text % dict(vars(action), prog="train.py")
    return cell(text)


def flag_rows(parser):
    """(group title, actions) per argument group that holds flags, --help left out (argparse's own)."""
    # argparse has no public accessor for its groups; _action_groups is how its own HelpFormatter walks them
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if actions:
            yield group.title, actions


def flag_table(parser=None):
    """The markdown table: one row per flag, a bold row opening each group in --help's order."""
    if parser is None:
        import train  # imported here: it pulls in torch, which --help of this script does not need
        parser = train.build_parser()
    lines = ["| flag | default | what it does |", "| --- | --- | --- |"]
    for title, actions in flag_rows(parser):
        lines.append(f"| **{cell(title)}** | | |")
        lines += [f"| {flag_cell(a)} | {default_cell(a)} | {help_cell(a)} |" for a in actions]
    return "\n".join(lines)


def split_markers(text, path):
    """(before, between, after) the flag markers; a README without them cannot be checked, so that is an error."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        sys.exit(f"{path} needs one {START} line and, after it, one {END} line around the flag table")
    before, rest = text.split(START)
    between, after = rest.split(END)
    return before, between, after


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Print the README's train.py flag table, generated from train.build_parser(); or write it "
                    f"between the {START} and {END} markers of a README, or check that the README's is current.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", metavar="README", help="replace the table between the markers in this file")
    mode.add_argument("--check", metavar="README", help="exit 1 when this file's table differs from the generated one")
    args = parser.parse_args(argv)
    table = flag_table()
    path = args.write or args.check
    if path is None:
        print(table)
        return 0
    with open(path, encoding="utf-8") as f:
        text = f.read()
    before, between, after = split_markers(text, path)
    if args.check:
        if between.strip() != table:
            print(f"{os.path.basename(path)}'s flag table differs from train.py --help: "
                  f"run python scripts/flag_table.py --write {path}", file=sys.stderr)
            return 1
        return 0
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{before}{START}\n{table}\n{END}{after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
