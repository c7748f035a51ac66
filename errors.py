"""The user's mistakes as one line, never a traceback: UserError, the wrapper every script's main runs in, and the
check of an output folder before any work."""
from __future__ import annotations

import atexit
import gc
import os
import sys
from collections.abc import Callable
from typing import NoReturn

# The interpreter's last garbage collections walk every object torch, torchvision and timm created: 1-2 s at exit on
# a 2-core CPU, after the end a --budget run planned for. At exit files are closed and the OS frees the memory, so
# they are skipped: registered at import, this runs after the run's own exit functions (the process group's
# teardown), which exit functions do last in, first out.
atexit.register(gc.freeze)


class UserError(Exception):
    """A mistake in the user's input: printed as one line, never as a traceback."""


def check_folder_path(path: str, what: str) -> None:
    """A one-line error before any work when `path` cannot become a folder to write in: a file stands where a folder
    of it should be, or the nearest folder on it that exists is not writable. what: how the user named it."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{what} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: {probe} is not writable")


def run_cli(main: Callable[[], int]) -> NoReturn:
    """Run a script's main(); a UserError becomes one line on stderr and exit code 2, never a traceback. The entry
    scripts import with the garbage collector off, as its walks over torch's many new objects slow the start-up;
    from here it runs as usual."""
    gc.enable()
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)
