"""Errors shared by the commands, and the one place they become exit codes.

Host-free: importing this pulls in nothing else, so every command module can use it without
importing the console script (``solo_deepfusion.cli``) that imports them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class UsageError(ValueError):
    """A bad command line, recipe or input: reported in one line, without a traceback (exit 2)."""

    def one_line(self) -> str:
        """The message. Raised in a DataLoader worker, it comes back with the worker's traceback
        prepended; then its last line, without the ``module.Class: `` prefix."""
        lines = str(self).strip().splitlines()
        return lines[0] if len(lines) == 1 else lines[-1].split(": ", 1)[-1]


def exit_status(command: Callable[[], Any]) -> int:
    """Run ``command`` and map its outcome to an exit code.

    2 with a one-line ``error:`` for a :class:`UsageError` (bad command line, recipe or
    input); else the status ``command`` returned, 1 for an interrupted Lightning trainer,
    0 otherwise.
    """
    try:
        result = command()
    except UsageError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        return 2
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    return 1 if getattr(result, "interrupted", False) else 0
