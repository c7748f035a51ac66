"""The user's mistakes as one line, never a traceback: UserError and the wrapper every script's main runs in."""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


class UserError(Exception):
    """A mistake in the user's input: printed as one line, never as a traceback."""


def run_cli(main: Callable[[], int]) -> NoReturn:
    """Run a script's main(); a UserError becomes one line on stderr and exit code 2, never a traceback."""
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
