"""Errors shared by the commands (host-free: importing this pulls in nothing else)."""


class UsageError(ValueError):
    """A bad command line, recipe or input: reported in one line, without a traceback (exit 2)."""

    def one_line(self) -> str:
        """The message. Raised in a DataLoader worker, it comes back with the worker's traceback
        prepended; then its last line, without the ``module.Class: `` prefix."""
        lines = str(self).strip().splitlines()
        return lines[0] if len(lines) == 1 else lines[-1].split(": ", 1)[-1]
